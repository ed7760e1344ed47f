/* The firmware's VTA core; see vta_core.h. Semantics: VTA-ISA.md section 3, and vta/sim.py
 * wherever the text is silent (scheduling, error cases, shift amounts past 31). */
#include "vta_core.h"

#include <stddef.h>

enum { STAGE_LOAD, STAGE_COMPUTE, STAGE_STORE, STAGES };
/* Token FIFOs. */
enum { L2G, G2L, G2S, S2G, FIFOS, NONE = -1 };

/* (pop_prev, pop_next, push_prev, push_next) FIFO of each stage; NONE where it has none. */
static const int stage_fifos[STAGES][4] = {
    [STAGE_LOAD] = {NONE, G2L, NONE, L2G},
    [STAGE_COMPUTE] = {L2G, S2G, G2L, G2S},
    [STAGE_STORE] = {G2S, NONE, S2G, NONE},
};
static const char *const stage_names[STAGES] = {"load", "compute", "store"};
static const char *const opcode_names[] = {"LOAD", "STORE", "GEMM", "FINISH", "ALU"};
static const char *const flag_names[4] = {"pop_prev", "pop_next", "push_prev", "push_next"};

typedef struct {
    unsigned opcode;
    unsigned flags[4]; /* pop_prev, pop_next, push_prev, push_next */
    /* LOAD and STORE */
    unsigned memory_type, sram_base, y_size, x_size, x_stride, y_pad_0, y_pad_1, x_pad_0, x_pad_1;
    uint32_t dram_base;
    /* GEMM and ALU */
    unsigned reset, uop_bgn, uop_end, iter_out, iter_in;
    unsigned dst_factor_out, dst_factor_in, src_factor_out, src_factor_in;
    unsigned wgt_factor_out, wgt_factor_in, alu_opcode, use_imm;
    int32_t imm;
} insn_t;

/* -- errors ------------------------------------------------------------------------------- */

void vta_error_str(vta_error_t *error, const char *text) {
    while (*text && error->length + 1 < VTA_ERROR_TEXT) {
        error->text[error->length++] = *text++;
    }
    error->text[error->length] = '\0';
}

void vta_error_int(vta_error_t *error, int64_t value) {
    char digits[24];
    unsigned n = 0;
    uint64_t magnitude = value < 0 ? 0u - (uint64_t)value : (uint64_t)value;
    do {
        digits[n++] = (char)('0' + magnitude % 10u);
        magnitude /= 10u;
    } while (magnitude);
    if (value < 0) {
        digits[n++] = '-';
    }
    char text[24];
    for (unsigned i = 0; i < n; i++) {
        text[i] = digits[n - 1 - i];
    }
    text[n] = '\0';
    vta_error_str(error, text);
}

static int fail(vta_error_t *error, int status, const char *text) {
    error->status = status;
    vta_error_str(error, text);
    return status;
}

/* "<what> index N is outside the D-entry buffer" */
static int out_of_buffer(vta_error_t *error, const char *what, uint32_t index, uint32_t depth) {
    error->status = VTA_STATUS_SIMULATION;
    vta_error_str(error, what);
    vta_error_str(error, " index ");
    vta_error_int(error, index);
    vta_error_str(error, " is outside the ");
    vta_error_int(error, depth);
    vta_error_str(error, "-entry buffer");
    return error->status;
}

/* -- decoding ----------------------------------------------------------------------------- */

/* Fields never straddle bit 64 (the layout rule), so each lies in one 64-bit word. */
static uint32_t field(const uint64_t word[2], unsigned lo, unsigned width) {
    uint64_t bits = lo >= 64 ? word[1] >> (lo - 64) : word[0] >> lo;
    return (uint32_t)(bits & ((UINT64_C(1) << width) - 1u));
}

#define FIELD(word, kind, name) field(word, VTA_##kind##_##name##_LO, VTA_##kind##_##name##_WIDTH)

/* The loop fields GEMM and ALU share (their positions may differ per kind). */
#define DECODE_LOOP(word, insn, kind)                                                          \
    do {                                                                                       \
        (insn)->reset = FIELD(word, kind, RESET);                                              \
        (insn)->uop_bgn = FIELD(word, kind, UOP_BGN);                                          \
        (insn)->uop_end = FIELD(word, kind, UOP_END);                                          \
        (insn)->iter_out = FIELD(word, kind, ITER_OUT);                                        \
        (insn)->iter_in = FIELD(word, kind, ITER_IN);                                          \
        (insn)->dst_factor_out = FIELD(word, kind, DST_FACTOR_OUT);                            \
        (insn)->dst_factor_in = FIELD(word, kind, DST_FACTOR_IN);                              \
        (insn)->src_factor_out = FIELD(word, kind, SRC_FACTOR_OUT);                            \
        (insn)->src_factor_in = FIELD(word, kind, SRC_FACTOR_IN);                              \
    } while (0)

static uint32_t read_le(const uint8_t *bytes, unsigned n) {
    uint32_t value = 0;
    for (unsigned i = n; i-- > 0;) {
        value = (value << 8) | bytes[i];
    }
    return value;
}

static int decode(const uint8_t *bytes, insn_t *insn) {
    uint64_t word[2] = {0, 0};
    for (unsigned i = 16; i-- > 0;) {
        word[i / 8] = (word[i / 8] << 8) | bytes[i];
    }
    insn->opcode = (unsigned)(word[0] & 7u);
    insn->flags[0] = FIELD(word, MEM, POP_PREV);
    insn->flags[1] = FIELD(word, MEM, POP_NEXT);
    insn->flags[2] = FIELD(word, MEM, PUSH_PREV);
    insn->flags[3] = FIELD(word, MEM, PUSH_NEXT);
    switch (insn->opcode) {
    case VTA_OPCODE_LOAD:
    case VTA_OPCODE_STORE:
        insn->memory_type = FIELD(word, MEM, MEMORY_TYPE);
        if (insn->memory_type > VTA_MEM_ACC_8BIT) {
            return 0;
        }
        insn->sram_base = FIELD(word, MEM, SRAM_BASE);
        insn->dram_base = FIELD(word, MEM, DRAM_BASE);
        insn->y_size = FIELD(word, MEM, Y_SIZE);
        insn->x_size = FIELD(word, MEM, X_SIZE);
        insn->x_stride = FIELD(word, MEM, X_STRIDE);
        insn->y_pad_0 = FIELD(word, MEM, Y_PAD_0);
        insn->y_pad_1 = FIELD(word, MEM, Y_PAD_1);
        insn->x_pad_0 = FIELD(word, MEM, X_PAD_0);
        insn->x_pad_1 = FIELD(word, MEM, X_PAD_1);
        return 1;
    case VTA_OPCODE_GEMM:
        DECODE_LOOP(word, insn, GEMM);
        insn->wgt_factor_out = FIELD(word, GEMM, WGT_FACTOR_OUT);
        insn->wgt_factor_in = FIELD(word, GEMM, WGT_FACTOR_IN);
        return 1;
    case VTA_OPCODE_ALU:
        DECODE_LOOP(word, insn, ALU);
        insn->wgt_factor_out = 0;
        insn->wgt_factor_in = 0;
        insn->alu_opcode = FIELD(word, ALU, ALU_OPCODE);
        insn->use_imm = FIELD(word, ALU, USE_IMM);
        {
            uint32_t imm = FIELD(word, ALU, IMM);
            uint32_t sign = UINT32_C(1) << (VTA_ALU_IMM_WIDTH - 1);
            insn->imm = (int32_t)(imm ^ sign) - (int32_t)sign;
        }
        return insn->alu_opcode <= VTA_ALU_MUL;
    case VTA_OPCODE_FINISH:
        return 1;
    default:
        return 0;
    }
}

static int stage_of(const insn_t *insn) {
    if (insn->opcode == VTA_OPCODE_STORE) {
        return STAGE_STORE;
    }
    if (insn->opcode == VTA_OPCODE_LOAD &&
        (insn->memory_type == VTA_MEM_INP || insn->memory_type == VTA_MEM_WGT)) {
        return STAGE_LOAD;
    }
    return STAGE_COMPUTE;
}

/* -- element packing ---------------------------------------------------------------------- */

/* Lane `lane` of a packed element of `width`-bit values, sign-extended (bit 0 of a byte first). */
static int32_t lane_get(const uint8_t *element, unsigned lane, unsigned width) {
    unsigned bit = lane * width;
    uint32_t value = ((uint32_t)element[bit / 8] >> (bit % 8)) & ((1u << width) - 1u);
    uint32_t sign = 1u << (width - 1);
    return (int32_t)(value ^ sign) - (int32_t)sign;
}

/* Store the low `width` bits of `value` into lane `lane` (the element starts zeroed). */
static void lane_put(uint8_t *element, unsigned lane, unsigned width, int32_t value) {
    unsigned bit = lane * width;
    uint32_t low = (uint32_t)value & ((1u << width) - 1u);
    element[bit / 8] = (uint8_t)(element[bit / 8] | (low << (bit % 8)));
}

/* -- LOAD and STORE ----------------------------------------------------------------------- */

static unsigned elem_bytes(unsigned mem) {
    static const unsigned bytes[] = {
        [VTA_MEM_UOP] = VTA_UOP_ELEM_BYTES, [VTA_MEM_WGT] = VTA_WGT_ELEM_BYTES,
        [VTA_MEM_INP] = VTA_INP_ELEM_BYTES, [VTA_MEM_ACC] = VTA_ACC_ELEM_BYTES,
        [VTA_MEM_OUT] = VTA_OUT_ELEM_BYTES, [VTA_MEM_ACC_8BIT] = VTA_ACC_8BIT_ELEM_BYTES,
    };
    return bytes[mem];
}

static uint32_t depth_of(unsigned mem) {
    switch (mem) {
    case VTA_MEM_UOP:
        return VTA_UOP_DEPTH;
    case VTA_MEM_INP:
        return VTA_INP_DEPTH;
    case VTA_MEM_WGT:
        return VTA_WGT_DEPTH;
    default:
        return VTA_ACC_DEPTH;
    }
}

/* The DRAM bytes [first, last) a transfer touches must lie in the device's memory. */
static int check_dram(const vta_core_t *core, const insn_t *op, unsigned eb, const char *what,
                      int64_t *first, vta_error_t *error) {
    int64_t base = (int64_t)op->dram_base;
    *first = base * eb;
    int64_t last = (base + ((int64_t)op->y_size - 1) * op->x_stride + op->x_size) * eb;
    if (*first < 0 || last > (int64_t)core->dram_bytes) {
        error->status = VTA_STATUS_SIMULATION;
        vta_error_str(error, what);
        vta_error_str(error, " touches DRAM bytes up to ");
        vta_error_int(error, last);
        vta_error_str(error, ", outside the ");
        vta_error_int(error, core->dram_bytes);
        vta_error_str(error, "-byte memory");
        return error->status;
    }
    return VTA_STATUS_OK;
}

static void load_element(vta_core_t *core, unsigned mem, uint32_t index, const uint8_t *src) {
    switch (mem) {
    case VTA_MEM_UOP:
        core->uop[index] = src ? read_le(src, 4) : 0;
        break;
    case VTA_MEM_INP:
        for (unsigned l = 0; l < VTA_LANES; l++) {
            core->inp[index][l] = (int8_t)(src ? lane_get(src, l, VTA_INP_WIDTH) : 0);
        }
        break;
    case VTA_MEM_WGT:
        for (unsigned l = 0; l < VTA_BLOCK * VTA_BLOCK; l++) {
            core->wgt[index][l] = (int8_t)(src ? lane_get(src, l, VTA_WGT_WIDTH) : 0);
        }
        break;
    case VTA_MEM_ACC:
        for (unsigned l = 0; l < VTA_LANES; l++) {
            core->acc[index][l] = src ? (int32_t)read_le(src + 4 * l, 4) : 0;
        }
        break;
    default: /* ACC_8BIT: int8 values sign-extended */
        for (unsigned l = 0; l < VTA_LANES; l++) {
            core->acc[index][l] = src ? (int8_t)src[l] : 0;
        }
        break;
    }
}

static int load(vta_core_t *core, const insn_t *op, vta_error_t *error) {
    if (op->x_size == 0) { /* a no-op that only moves tokens */
        return VTA_STATUS_OK;
    }
    unsigned mem = op->memory_type;
    if (mem == VTA_MEM_OUT) {
        return fail(error, VTA_STATUS_SIMULATION,
                    "LOAD cannot read into the output buffer (memory type OUT)");
    }
    if (core->hls && mem == VTA_MEM_ACC_8BIT) {
        return fail(error, VTA_STATUS_HLS,
                    "the FPGA design has no 8-bit accumulator load (ACC_8BIT)");
    }
    if (core->hls && mem == VTA_MEM_WGT &&
        (op->y_pad_0 || op->y_pad_1 || op->x_pad_0 || op->x_pad_1)) {
        return fail(error, VTA_STATUS_HLS,
                    "the FPGA design ignores padding on weight loads; pad in DRAM");
    }
    unsigned eb = elem_bytes(mem);
    int64_t first;
    if (check_dram(core, op, eb, "LOAD", &first, error)) {
        return error->status;
    }
    uint32_t xtotal = op->x_pad_0 + op->x_size + op->x_pad_1;
    uint32_t ytotal = op->y_pad_0 + op->y_size + op->y_pad_1;
    if (op->sram_base + xtotal * ytotal > depth_of(mem)) {
        error->status = VTA_STATUS_SIMULATION;
        vta_error_str(error, "LOAD writes SRAM entries up to ");
        vta_error_int(error, op->sram_base + xtotal * ytotal);
        vta_error_str(error, ", beyond the ");
        vta_error_int(error, depth_of(mem));
        vta_error_str(error, "-entry buffer");
        return error->status;
    }
    uint64_t moved = (uint64_t)op->x_size * op->y_size;
    switch (mem) {
    case VTA_MEM_UOP:
        core->counters.uop_load_nbytes += moved * eb;
        break;
    case VTA_MEM_INP:
        core->counters.inp_load_nbytes += moved * eb;
        break;
    case VTA_MEM_WGT:
        core->counters.wgt_load_nbytes += moved * eb;
        break;
    default: /* ACC and ACC_8BIT count accumulator-sized elements, as the original does */
        core->counters.acc_load_nbytes += moved * VTA_ACC_ELEM_BYTES;
        break;
    }
    for (uint32_t y = 0; y < ytotal; y++) {
        for (uint32_t x = 0; x < xtotal; x++) {
            uint32_t index = op->sram_base + y * xtotal + x;
            const uint8_t *src = NULL;
            if (y >= op->y_pad_0 && y < op->y_pad_0 + op->y_size && x >= op->x_pad_0 &&
                x < op->x_pad_0 + op->x_size) {
                uint64_t element = (uint64_t)(y - op->y_pad_0) * op->x_stride + (x - op->x_pad_0);
                src = core->dram + first + element * eb;
            }
            load_element(core, mem, index, src);
            if (mem == VTA_MEM_ACC || mem == VTA_MEM_ACC_8BIT) {
                core->out_valid[index] = 0;
            }
        }
    }
    return VTA_STATUS_OK;
}

static int store(vta_core_t *core, const insn_t *op, vta_error_t *error) {
    if (op->x_size == 0) {
        return VTA_STATUS_OK;
    }
    if (op->memory_type != VTA_MEM_OUT) {
        return fail(error, VTA_STATUS_SIMULATION,
                    "STORE writes only the output buffer (memory type OUT)");
    }
    if (op->y_pad_0 || op->y_pad_1 || op->x_pad_0 || op->x_pad_1) {
        return fail(error, VTA_STATUS_SIMULATION, "STORE cannot pad: set every pad field to 0");
    }
    uint32_t count = op->x_size * op->y_size;
    if (op->sram_base + count > VTA_ACC_DEPTH) {
        return out_of_buffer(error, "STORE output", op->sram_base + count - 1, VTA_ACC_DEPTH);
    }
    if (core->hls) {
        for (uint32_t i = 0; i < count; i++) {
            if (!core->out_valid[op->sram_base + i]) {
                error->status = VTA_STATUS_HLS;
                vta_error_str(error, "STORE of accumulator entry ");
                vta_error_int(error, op->sram_base + i);
                vta_error_str(error, ", which no GEMM or ALU op wrote since it was loaded or "
                                     "reset: the FPGA stores from a separate output buffer");
                return error->status;
            }
        }
    }
    int64_t first;
    if (check_dram(core, op, VTA_OUT_ELEM_BYTES, "STORE", &first, error)) {
        return error->status;
    }
    for (uint32_t y = 0; y < op->y_size; y++) {
        for (uint32_t x = 0; x < op->x_size; x++) {
            uint8_t *dst = core->dram + first +
                           ((uint64_t)y * op->x_stride + x) * VTA_OUT_ELEM_BYTES;
            const int32_t *acc = core->acc[op->sram_base + y * op->x_size + x];
            for (unsigned b = 0; b < VTA_OUT_ELEM_BYTES; b++) {
                dst[b] = 0;
            }
            for (unsigned l = 0; l < VTA_LANES; l++) {
                lane_put(dst, l, VTA_OUT_WIDTH, acc[l]);
            }
        }
    }
    core->counters.out_store_nbytes += (uint64_t)count * VTA_OUT_ELEM_BYTES;
    return VTA_STATUS_OK;
}

/* -- GEMM and ALU ------------------------------------------------------------------------- */

typedef struct {
    uint32_t dst, src, wgt;
} issue_t;

/* The indices of one micro-op issue of a loop instruction. */
static issue_t issue_of(const vta_core_t *core, const insn_t *op, uint32_t i_out, uint32_t i_in,
                        uint32_t u) {
    uint64_t w[2] = {core->uop[u], 0};
    issue_t issue = {
        FIELD(w, UOP, DST) + i_out * op->dst_factor_out + i_in * op->dst_factor_in,
        FIELD(w, UOP, SRC) + i_out * op->src_factor_out + i_in * op->src_factor_in,
        FIELD(w, UOP, WGT) + i_out * op->wgt_factor_out + i_in * op->wgt_factor_in,
    };
    return issue;
}

typedef struct {
    uint64_t issues;
    uint32_t max_dst, max_src, max_wgt;
    int hazard; /* two GEMM writes to one accumulator closer than the HLS pipeline allows */
} scan_t;

/* Every index an instruction will use, checked before anything changes (as the simulator
 * plans an instruction before it runs it). */
static int scan(const vta_core_t *core, const insn_t *op, scan_t *s, vta_error_t *error) {
    if (op->uop_end > VTA_UOP_DEPTH) {
        error->status = VTA_STATUS_SIMULATION;
        vta_error_str(error, "micro-ops up to ");
        vta_error_int(error, op->uop_end);
        vta_error_str(error, " run past the ");
        vta_error_int(error, VTA_UOP_DEPTH);
        vta_error_str(error, "-entry micro-op buffer");
        return error->status;
    }
    uint32_t recent[VTA_HLS_GEMM_DEP_DISTANCE - 1];
    uint32_t seen = 0;
    s->issues = 0;
    s->max_dst = s->max_src = s->max_wgt = 0;
    s->hazard = 0;
    for (uint32_t i_out = 0; i_out < op->iter_out; i_out++) {
        for (uint32_t i_in = 0; i_in < op->iter_in; i_in++) {
            for (uint32_t u = op->uop_bgn; u < op->uop_end; u++) {
                issue_t is = issue_of(core, op, i_out, i_in, u);
                s->issues++;
                s->max_dst = is.dst > s->max_dst ? is.dst : s->max_dst;
                s->max_src = is.src > s->max_src ? is.src : s->max_src;
                s->max_wgt = is.wgt > s->max_wgt ? is.wgt : s->max_wgt;
                for (uint32_t k = 0; k < seen && k < VTA_HLS_GEMM_DEP_DISTANCE - 1; k++) {
                    s->hazard |= recent[k] == is.dst;
                }
                for (uint32_t k = VTA_HLS_GEMM_DEP_DISTANCE - 2; k > 0; k--) {
                    recent[k] = recent[k - 1];
                }
                recent[0] = is.dst;
                seen++;
            }
        }
    }
    if (s->issues && s->max_dst >= VTA_ACC_DEPTH) {
        return out_of_buffer(error, "accumulator", s->max_dst, VTA_ACC_DEPTH);
    }
    return VTA_STATUS_OK;
}

static int gemm(vta_core_t *core, const insn_t *op, vta_error_t *error) {
    scan_t s;
    if (scan(core, op, &s, error)) {
        return error->status;
    }
    if (s.issues == 0) {
        return VTA_STATUS_OK;
    }
    if (!op->reset) {
        if (s.max_src >= VTA_INP_DEPTH) {
            return out_of_buffer(error, "input", s.max_src, VTA_INP_DEPTH);
        }
        if (s.max_wgt >= VTA_WGT_DEPTH) {
            return out_of_buffer(error, "weight", s.max_wgt, VTA_WGT_DEPTH);
        }
        if (core->hls && s.hazard) {
            return fail(error, VTA_STATUS_HLS,
                        "two GEMM issues write one accumulator within the pipeline's 3 issues "
                        "(vary an output coordinate in the loop just outside the GEMM)");
        }
        core->counters.gemm_counter += s.issues;
    }
    for (uint32_t i_out = 0; i_out < op->iter_out; i_out++) {
        for (uint32_t i_in = 0; i_in < op->iter_in; i_in++) {
            for (uint32_t u = op->uop_bgn; u < op->uop_end; u++) {
                issue_t is = issue_of(core, op, i_out, i_in, u);
                int32_t *acc = core->acc[is.dst];
                if (op->reset) {
                    for (unsigned l = 0; l < VTA_LANES; l++) {
                        acc[l] = 0;
                    }
                    core->out_valid[is.dst] = 0;
                    continue;
                }
                const int8_t *x = core->inp[is.src];
                const int8_t *w = core->wgt[is.wgt];
                for (unsigned b = 0; b < VTA_BATCH; b++) {
                    for (unsigned oc = 0; oc < VTA_BLOCK; oc++) {
                        int32_t sum = 0;
                        for (unsigned k = 0; k < VTA_BLOCK; k++) {
                            sum += (int32_t)x[b * VTA_BLOCK + k] * w[oc * VTA_BLOCK + k];
                        }
                        uint32_t *cell = (uint32_t *)&acc[b * VTA_BLOCK + oc];
                        *cell += (uint32_t)sum; /* wraps modulo 2**32 */
                    }
                }
                core->out_valid[is.dst] = 1;
            }
        }
    }
    return VTA_STATUS_OK;
}

static int32_t wrap32(uint64_t value) {
    uint32_t low = (uint32_t)value;
    return low >= UINT32_C(0x80000000) ? -(int32_t)(~low) - 1 : (int32_t)low;
}

static int32_t alu_apply(unsigned opcode, int32_t x, int32_t y) {
    switch (opcode) {
    case VTA_ALU_MIN:
        return x < y ? x : y;
    case VTA_ALU_MAX:
        return x > y ? x : y;
    case VTA_ALU_ADD:
        return wrap32((uint64_t)(uint32_t)x + (uint32_t)y);
    case VTA_ALU_MUL:
        return wrap32((uint64_t)(int64_t)x * (uint64_t)(int64_t)y);
    default: /* SHR: right by y >= 0 (the sign fills from 32 on), left by -y (0 from 32 on) */
        if (y >= 0) {
            unsigned shift = y > 31 ? 31u : (unsigned)y;
            return x >= 0 ? (int32_t)((uint32_t)x >> shift)
                          : -(int32_t)((~(uint32_t)x) >> shift) - 1;
        } else {
            unsigned shift = y < -32 ? 32u : (unsigned)(-(int64_t)y);
            return wrap32((uint64_t)(int64_t)x << shift);
        }
    }
}

static int alu(vta_core_t *core, const insn_t *op, vta_error_t *error) {
    if (core->hls && op->alu_opcode == VTA_ALU_MUL) {
        return fail(error, VTA_STATUS_HLS, "the FPGA design has no ALU MUL");
    }
    scan_t s;
    if (scan(core, op, &s, error)) {
        return error->status;
    }
    if (s.issues && s.max_src >= VTA_ACC_DEPTH) {
        return out_of_buffer(error, "accumulator (ALU source)", s.max_src, VTA_ACC_DEPTH);
    }
    core->counters.alu_counter += s.issues;
    for (uint32_t i_out = 0; i_out < op->iter_out; i_out++) {
        for (uint32_t i_in = 0; i_in < op->iter_in; i_in++) {
            for (uint32_t u = op->uop_bgn; u < op->uop_end; u++) {
                issue_t is = issue_of(core, op, i_out, i_in, u);
                int32_t *acc = core->acc[is.dst];
                const int32_t *src = core->acc[is.src];
                for (unsigned l = 0; l < VTA_LANES; l++) {
                    int32_t y = op->use_imm ? op->imm : src[l];
                    if (core->hls && op->alu_opcode == VTA_ALU_SHR &&
                        (y < VTA_HLS_SHIFT_MIN || y > VTA_HLS_SHIFT_MAX)) {
                        error->status = VTA_STATUS_HLS;
                        vta_error_str(error, "SHR by ");
                        vta_error_int(error, y);
                        vta_error_str(error, ": the FPGA uses only the low 5 bits of the shift");
                        return error->status;
                    }
                    acc[l] = alu_apply(op->alu_opcode, acc[l], y);
                }
                core->out_valid[is.dst] = 1;
            }
        }
    }
    return VTA_STATUS_OK;
}

/* -- running programs --------------------------------------------------------------------- */

void vta_core_init(vta_core_t *core, uint8_t *dram, uint32_t dram_bytes) {
    core->dram = dram;
    core->dram_bytes = dram_bytes;
    core->hls = 0;
    vta_core_reset(core);
}

static void clear(void *memory, size_t n) {
    volatile uint8_t *bytes = memory;
    for (size_t i = 0; i < n; i++) {
        bytes[i] = 0;
    }
}

void vta_core_reset(vta_core_t *core) {
    clear(core->inp, sizeof core->inp);
    clear(core->wgt, sizeof core->wgt);
    clear(core->acc, sizeof core->acc);
    clear(core->uop, sizeof core->uop);
    clear(core->out_valid, sizeof core->out_valid);
    clear(&core->counters, sizeof core->counters);
    clear(core->dram, core->dram_bytes);
}

typedef struct {
    const uint8_t *program;
    uint32_t count;
    uint32_t next[STAGES]; /* index of each queue's head; count when the queue is empty */
    insn_t head[STAGES];
} queues_t;

/* Move a queue's head to its next instruction at or after `from`. */
static void advance(queues_t *q, int stage, uint32_t from) {
    for (uint32_t i = from; i < q->count; i++) {
        insn_t insn;
        decode(q->program + (size_t)i * VTA_INSN_BYTES, &insn);
        if (stage_of(&insn) == stage) {
            q->next[stage] = i;
            q->head[stage] = insn;
            return;
        }
    }
    q->next[stage] = q->count;
}

static int ready(const insn_t *insn, int stage, const uint32_t tokens[FIFOS]) {
    for (int f = 0; f < 2; f++) {
        int fifo = stage_fifos[stage][f];
        if (insn->flags[f] && fifo != NONE && tokens[fifo] == 0) {
            return 0;
        }
    }
    return 1;
}

static int execute(vta_core_t *core, const insn_t *insn, vta_error_t *error) {
    switch (insn->opcode) {
    case VTA_OPCODE_LOAD:
        return load(core, insn, error);
    case VTA_OPCODE_STORE:
        return store(core, insn, error);
    case VTA_OPCODE_GEMM:
        return gemm(core, insn, error);
    default:
        return alu(core, insn, error);
    }
}

static void where(vta_error_t *error, uint32_t index, const insn_t *insn) {
    vta_error_str(error, "instruction ");
    vta_error_int(error, index);
    vta_error_str(error, " (");
    vta_error_str(error, opcode_names[insn->opcode]);
    vta_error_str(error, "): ");
}

static int deadlock(const queues_t *q, const uint32_t tokens[FIFOS], vta_error_t *error) {
    static const char *const fifo_names[FIFOS] = {"load->compute", "compute->load",
                                                  "compute->store", "store->compute"};
    error->status = VTA_STATUS_DEADLOCK;
    vta_error_str(error, "deadlock: no queue can proceed:");
    for (int s = 0; s < STAGES; s++) {
        if (q->next[s] == q->count) {
            continue;
        }
        vta_error_str(error, " ");
        vta_error_str(error, stage_names[s]);
        vta_error_str(error, " instruction ");
        vta_error_int(error, q->next[s]);
        vta_error_str(error, " waits for");
        for (int f = 0; f < 2; f++) {
            int fifo = stage_fifos[s][f];
            if (q->head[s].flags[f] && fifo != NONE && tokens[fifo] == 0) {
                vta_error_str(error, " a ");
                vta_error_str(error, fifo_names[fifo]);
                vta_error_str(error, " token;");
            }
        }
    }
    return error->status;
}

int vta_core_run(vta_core_t *core, uint32_t program, uint32_t count, vta_error_t *error) {
    error->status = VTA_STATUS_OK;
    error->length = 0;
    error->text[0] = '\0';
    clear(&core->counters, sizeof core->counters);
    if ((uint64_t)program + (uint64_t)count * VTA_INSN_BYTES > core->dram_bytes) {
        return fail(error, VTA_STATUS_OUT_OF_RANGE, "the program lies outside the device's DRAM");
    }
    queues_t q = {.program = core->dram + program, .count = count};
    /* Every instruction decodes before anything runs, then the flags and the FINISH. */
    for (uint32_t i = 0; i < count; i++) {
        insn_t insn;
        if (!decode(q.program + (size_t)i * VTA_INSN_BYTES, &insn)) {
            error->status = VTA_STATUS_ENCODING;
            vta_error_str(error, "instruction ");
            vta_error_int(error, i);
            vta_error_str(error, ": unknown opcode, memory type or ALU opcode");
            return error->status;
        }
    }
    int finish = 0;
    for (uint32_t i = 0; i < count; i++) {
        insn_t insn;
        decode(q.program + (size_t)i * VTA_INSN_BYTES, &insn);
        int stage = stage_of(&insn);
        for (int f = 0; f < 4; f++) {
            if (insn.flags[f] && stage_fifos[stage][f] == NONE) {
                where(error, i, &insn);
                vta_error_str(error, "sets ");
                vta_error_str(error, flag_names[f]);
                vta_error_str(error, ", which the ");
                vta_error_str(error, stage_names[stage]);
                vta_error_str(error, " stage does not have");
                return fail(error, VTA_STATUS_SIMULATION, "");
            }
        }
        finish |= insn.opcode == VTA_OPCODE_FINISH;
    }
    if (!finish) {
        return fail(error, VTA_STATUS_SIMULATION,
                    "the program has no FINISH instruction; it would never end");
    }
    for (int s = 0; s < STAGES; s++) {
        advance(&q, s, 0);
    }
    /* Tokens start empty on every run. The load queue runs as far as its tokens allow, then
     * compute, then store, round after round, as the simulator schedules. */
    uint32_t tokens[FIFOS] = {0, 0, 0, 0};
    int finished = 0;
    while (!finished) {
        int progressed = 0;
        for (int s = 0; s < STAGES; s++) {
            while (q.next[s] < count && !finished && ready(&q.head[s], s, tokens)) {
                insn_t insn = q.head[s];
                uint32_t index = q.next[s];
                for (int f = 0; f < 2; f++) {
                    if (insn.flags[f] && stage_fifos[s][f] != NONE) {
                        tokens[stage_fifos[s][f]]--;
                    }
                }
                if (insn.opcode == VTA_OPCODE_FINISH) {
                    finished = 1;
                } else {
                    vta_error_t inner = {VTA_STATUS_OK, "", 0};
                    if (execute(core, &insn, &inner)) {
                        where(error, index, &insn);
                        vta_error_str(error, inner.text);
                        return fail(error, inner.status, "");
                    }
                }
                for (int f = 2; f < 4; f++) {
                    if (insn.flags[f] && stage_fifos[s][f] != NONE) {
                        tokens[stage_fifos[s][f]]++;
                    }
                }
                advance(&q, s, index + 1);
                progressed = 1;
            }
        }
        if (finished) {
            for (int s = 0; s < STAGES; s++) {
                if (q.next[s] < count) {
                    return fail(error, VTA_STATUS_SIMULATION,
                                "FINISH ran while instructions were still queued; make FINISH "
                                "wait for the other stages with dependency tokens");
                }
            }
        } else if (!progressed) {
            return deadlock(&q, tokens, error);
        }
    }
    return VTA_STATUS_OK;
}
