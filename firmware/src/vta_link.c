/* The serial protocol, device side; see vta_link.h and vta/link.py. */
#include "vta_link.h"

#include <stddef.h>

static uint32_t crc_table[256];

static void crc_init(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++) {
            c = c & 1u ? UINT32_C(0xEDB88320) ^ (c >> 1) : c >> 1;
        }
        crc_table[n] = c;
    }
}

/* zlib's CRC-32. */
static uint32_t crc32(const uint8_t *data, uint32_t length) {
    uint32_t c = UINT32_C(0xFFFFFFFF);
    for (uint32_t i = 0; i < length; i++) {
        c = crc_table[(c ^ data[i]) & 0xFFu] ^ (c >> 8);
    }
    return c ^ UINT32_C(0xFFFFFFFF);
}

static uint32_t get32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void put16(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static void put32(uint8_t *p, uint32_t v) {
    put16(p, v);
    put16(p + 2, v >> 16);
}

static void put64(uint8_t *p, uint64_t v) {
    put32(p, (uint32_t)v);
    put32(p + 4, (uint32_t)(v >> 32));
}

static void copy(uint8_t *dst, const uint8_t *src, uint32_t n) {
    for (uint32_t i = 0; i < n; i++) {
        dst[i] = src[i];
    }
}

/* COBS-decode in place; the decoded length, or -1 when the bytes are not COBS. */
static int32_t cobs_decode(uint8_t *data, uint32_t length) {
    uint32_t in = 0, out = 0;
    while (in < length) {
        uint32_t code = data[in];
        if (code == 0 || in + code > length) {
            return -1;
        }
        for (uint32_t k = 1; k < code; k++) {
            data[out++] = data[in + k];
        }
        in += code;
        if (code < 255 && in < length) {
            data[out++] = 0;
        }
    }
    return (int32_t)out;
}

static uint32_t cobs_encode(const uint8_t *data, uint32_t length, uint8_t *out) {
    uint32_t code_at = 0, o = 1;
    uint8_t code = 1;
    for (uint32_t i = 0; i < length; i++) {
        if (data[i]) {
            out[o++] = data[i];
            code++;
        }
        if (!data[i] || code == 255) {
            out[code_at] = code;
            code_at = o++;
            code = 1;
        }
    }
    out[code_at] = code;
    return o;
}

/* Frame the reply (header, body of `length`) and send it. A reply to a command is kept for a
 * repeat of its request; a complaint about a damaged frame is not, and leaves the kept one. */
static void send(vta_link_t *link, uint32_t command, int status, uint32_t seq, uint32_t length) {
    uint8_t *reply = link->reply;
    reply[0] = (uint8_t)command;
    reply[1] = (uint8_t)status;
    put16(reply + 2, seq);
    length += VTA_LINK_HEADER;
    put32(reply + length, crc32(reply, length));
    int remember = command != 0;
    uint8_t *frame = remember ? link->frame : link->complaint;
    uint32_t n = cobs_encode(reply, length + VTA_LINK_CRC, frame);
    frame[n++] = 0;
    if (remember) {
        link->frame_length = n;
        link->have_last = 1;
        link->last_command = (uint8_t)command;
        link->last_seq = (uint16_t)seq;
    }
    link->write(link->context, frame, n);
}

static void send_error(vta_link_t *link, uint32_t command, int status, uint32_t seq,
                       const char *text) {
    uint32_t n = 0;
    while (text[n] && n < VTA_ERROR_TEXT) {
        link->reply[VTA_LINK_HEADER + n] = (uint8_t)text[n];
        n++;
    }
    send(link, command, status, seq, n);
}

static int in_dram(const vta_link_t *link, uint32_t address, uint32_t length) {
    return (uint64_t)address + length <= link->core->dram_bytes;
}

static void handle(vta_link_t *link, const uint8_t *payload, uint32_t length) {
    uint32_t command = payload[0]; /* payload[1]: flags, none defined for requests */
    uint32_t seq = (uint32_t)payload[2] | (uint32_t)payload[3] << 8;
    const uint8_t *body = payload + VTA_LINK_HEADER;
    uint32_t size = length - VTA_LINK_HEADER;
    uint8_t *out = link->reply + VTA_LINK_HEADER;
    vta_core_t *core = link->core;
    if (link->have_last && command != VTA_CMD_HELLO && command == link->last_command &&
        seq == link->last_seq) {
        link->write(link->context, link->frame, link->frame_length); /* a retry: same answer */
        return;
    }
    switch (command) {
    case VTA_CMD_HELLO: {
        if (size != 2) {
            break;
        }
        uint32_t version = (uint32_t)body[0] | (uint32_t)body[1] << 8;
        if (version != VTA_LINK_VERSION) {
            send_error(link, command, VTA_STATUS_VERSION, seq,
                       "this firmware speaks another protocol version (see the HELLO reply)");
            return;
        }
        static const char design[] = VTA_DESIGN_ID;
        put16(out, VTA_LINK_VERSION);
        put32(out + 2, core->dram_bytes);
        put32(out + 6, VTA_LINK_MAX_DATA);
        copy(out + 10, (const uint8_t *)design, sizeof design - 1);
        send(link, command, VTA_STATUS_OK, seq, 10 + sizeof design - 1);
        return;
    }
    case VTA_CMD_WRITE: {
        if (size < 4 || size - 4 > VTA_LINK_MAX_DATA) {
            break;
        }
        uint32_t address = get32(body);
        if (!in_dram(link, address, size - 4)) {
            send_error(link, command, VTA_STATUS_OUT_OF_RANGE, seq,
                       "WRITE past the end of the device's DRAM");
            return;
        }
        copy(core->dram + address, body + 4, size - 4);
        send(link, command, VTA_STATUS_OK, seq, 0);
        return;
    }
    case VTA_CMD_READ: {
        if (size != 8 || get32(body + 4) > VTA_LINK_MAX_DATA) {
            break;
        }
        uint32_t address = get32(body), n = get32(body + 4);
        if (!in_dram(link, address, n)) {
            send_error(link, command, VTA_STATUS_OUT_OF_RANGE, seq,
                       "READ past the end of the device's DRAM");
            return;
        }
        copy(out, core->dram + address, n);
        send(link, command, VTA_STATUS_OK, seq, n);
        return;
    }
    case VTA_CMD_RUN: {
        if (size != 9) {
            break;
        }
        static vta_error_t error;
        core->hls = (body[8] & VTA_LINK_RUN_FLAG_HLS) != 0;
        int status = vta_core_run(core, get32(body), get32(body + 4), &error);
        if (status != VTA_STATUS_OK) {
            send_error(link, command, status, seq, error.text);
            return;
        }
        const vta_counters_t *c = &core->counters;
        const uint64_t counters[7] = {c->inp_load_nbytes, c->wgt_load_nbytes, c->acc_load_nbytes,
                                      c->uop_load_nbytes, c->out_store_nbytes, c->gemm_counter,
                                      c->alu_counter};
        for (int i = 0; i < 7; i++) {
            put64(out + 8 * i, counters[i]);
        }
        send(link, command, VTA_STATUS_OK, seq, 56);
        return;
    }
    case VTA_CMD_RESET:
        if (size != 0) {
            break;
        }
        vta_core_reset(core);
        send(link, command, VTA_STATUS_OK, seq, 0);
        return;
    default:
        send_error(link, command, VTA_STATUS_UNKNOWN_COMMAND, seq, "unknown command");
        return;
    }
    send_error(link, command, VTA_STATUS_BAD_LENGTH, seq,
               "the request body does not have the command's length");
}

static void frame_done(vta_link_t *link) {
    uint32_t length = link->rx_length;
    int overflow = link->rx_overflow;
    link->rx_length = 0;
    link->rx_overflow = 0;
    if (length == 0 && !overflow) {
        return; /* a lone delimiter: a host flushing the line */
    }
    int32_t raw = overflow ? -1 : cobs_decode(link->rx, length);
    if (raw < VTA_LINK_HEADER + VTA_LINK_CRC) {
        send_error(link, 0, VTA_STATUS_FRAME, VTA_LINK_NO_SEQ, "not a frame");
        return;
    }
    uint32_t n = (uint32_t)raw - VTA_LINK_CRC;
    if (crc32(link->rx, n) != get32(link->rx + n)) {
        send_error(link, 0, VTA_STATUS_CRC, VTA_LINK_NO_SEQ, "CRC mismatch: send it again");
        return;
    }
    copy(link->payload, link->rx, n);
    handle(link, link->payload, n);
}

void vta_link_init(vta_link_t *link, vta_core_t *core, vta_link_write_t write, void *context) {
    crc_init();
    link->core = core;
    link->write = write;
    link->context = context;
    link->rx_length = 0;
    link->rx_overflow = 0;
    link->have_last = 0;
    link->frame_length = 0;
}

void vta_link_feed(vta_link_t *link, const uint8_t *data, uint32_t length) {
    for (uint32_t i = 0; i < length; i++) {
        if (data[i] == 0) {
            frame_done(link);
        } else if (link->rx_length < sizeof link->rx) {
            link->rx[link->rx_length++] = data[i];
        } else {
            link->rx_overflow = 1;
        }
    }
}
