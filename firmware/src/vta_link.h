/* The serial protocol of vta/link.py, device side: frames in, commands run, replies out.
 *
 * Bytes arrive in any pieces (vta_link_feed); each complete frame is checked (COBS, CRC), run
 * and answered through the `write` callback. The last reply is kept, so a request repeated with
 * the same sequence number gets the same answer without running twice. No allocation. */
#ifndef VTA_LINK_H
#define VTA_LINK_H

#include <stdint.h>

#include "vta_core.h"

#ifndef VTA_LINK_MAX_DATA
#define VTA_LINK_MAX_DATA 4096 /* data bytes one WRITE or READ carries */
#endif

#define VTA_LINK_HEADER 4
#define VTA_LINK_CRC 4
/* The longest payload either way: a WRITE's address and data, or a run's error text. */
#define VTA_LINK_MAX_PAYLOAD (VTA_LINK_HEADER + 8 + VTA_LINK_MAX_DATA + VTA_ERROR_TEXT)
#define VTA_LINK_MAX_RAW (VTA_LINK_MAX_PAYLOAD + VTA_LINK_CRC)
#define VTA_LINK_MAX_FRAME (VTA_LINK_MAX_RAW + VTA_LINK_MAX_RAW / 254 + 2)

typedef void (*vta_link_write_t)(void *context, const uint8_t *data, uint32_t length);

typedef struct {
    vta_core_t *core;
    vta_link_write_t write;
    void *context;
    uint8_t rx[VTA_LINK_MAX_FRAME];
    uint32_t rx_length;
    int rx_overflow;
    uint8_t payload[VTA_LINK_MAX_RAW];
    uint8_t reply[VTA_LINK_MAX_RAW];
    uint8_t frame[VTA_LINK_MAX_FRAME]; /* the last reply to a command, as sent */
    uint8_t complaint[VTA_LINK_HEADER + VTA_ERROR_TEXT + VTA_LINK_CRC + 4]; /* damaged frames */
    uint32_t frame_length;
    int have_last;
    uint8_t last_command;
    uint16_t last_seq;
} vta_link_t;

void vta_link_init(vta_link_t *link, vta_core_t *core, vta_link_write_t write, void *context);
void vta_link_feed(vta_link_t *link, const uint8_t *data, uint32_t length);

#endif /* VTA_LINK_H */
