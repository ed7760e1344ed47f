/* The firmware's VTA core: the ISA of VTA-ISA.md executed exactly as vta/sim.py does.
 *
 * Written apart from the Python simulator (plain loops, one multiply-accumulate at a time) and
 * checked against it on the same instruction streams. State that persists across runs: the SRAM
 * buffers, the output-valid marks and the DRAM the caller hands in. No allocation. */
#ifndef VTA_CORE_H
#define VTA_CORE_H

#include <stdint.h>

#include "vta_hw.h"

#define VTA_LANES (VTA_BATCH * VTA_BLOCK)
#define VTA_ERROR_TEXT 200

typedef struct {
    /* The order of vta.sim.Counters. */
    uint64_t inp_load_nbytes;
    uint64_t wgt_load_nbytes;
    uint64_t acc_load_nbytes;
    uint64_t uop_load_nbytes;
    uint64_t out_store_nbytes;
    uint64_t gemm_counter;
    uint64_t alu_counter;
} vta_counters_t;

/* Why a run failed: a VTA_STATUS_* code and a message for people. */
typedef struct {
    int status;
    char text[VTA_ERROR_TEXT];
    unsigned length;
} vta_error_t;

typedef struct {
    uint8_t *dram;
    uint32_t dram_bytes;
    int hls; /* reject what the FPGA design cannot run (VTA-ISA.md section 4) */
    int8_t inp[VTA_INP_DEPTH][VTA_LANES];
    int8_t wgt[VTA_WGT_DEPTH][VTA_BLOCK * VTA_BLOCK];
    int32_t acc[VTA_ACC_DEPTH][VTA_LANES];
    uint32_t uop[VTA_UOP_DEPTH];
    uint8_t out_valid[VTA_ACC_DEPTH]; /* written by GEMM/ALU since the last load or reset */
    vta_counters_t counters;          /* of the last run */
} vta_core_t;

void vta_core_init(vta_core_t *core, uint8_t *dram, uint32_t dram_bytes);

/* Clears SRAM, marks and DRAM: the state of a device just switched on. */
void vta_core_reset(vta_core_t *core);

/* Runs the `count` instructions at byte address `program` to their FINISH. Returns
 * VTA_STATUS_OK, or another status with `error` filled in. */
int vta_core_run(vta_core_t *core, uint32_t program, uint32_t count, vta_error_t *error);

/* Error text building without a C library: append a string or a signed integer. */
void vta_error_str(vta_error_t *error, const char *text);
void vta_error_int(vta_error_t *error, int64_t value);

#endif /* VTA_CORE_H */
