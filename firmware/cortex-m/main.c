/* The firmware on an Arm Cortex-M3 board: the VTA core and the serial protocol on UART0.
 *
 * The board support below is for Arm's MPS2 AN385 (Cortex-M3, CMSDK APB UART at 0x40004000,
 * 25 MHz, 4 MiB SRAM from 0x20000000), which QEMU also emulates (-M mps2-an385); another board
 * changes the UART functions, the clock and cortex-m/link.ld. The DRAM region is static. */
#include <stdint.h>

#include "vta_link.h"

#ifndef VTA_FW_DRAM_BYTES
#define VTA_FW_DRAM_BYTES (1u << 20)
#endif
#define UART_BASE 0x40004000u
#define UART_CLOCK_HZ 25000000u
#define UART_BAUD 921600u

typedef struct {
    volatile uint32_t data;
    volatile uint32_t state; /* bit 0: transmit buffer full, bit 1: receive buffer full */
    volatile uint32_t ctrl;  /* bit 0: transmit enable, bit 1: receive enable */
    volatile uint32_t intstatus;
    volatile uint32_t bauddiv;
} uart_t;

#define UART ((uart_t *)UART_BASE)

static uint8_t dram[VTA_FW_DRAM_BYTES];
static vta_core_t core;
static vta_link_t serial_link;

static void uart_write(void *context, const uint8_t *data, uint32_t length) {
    (void)context;
    for (uint32_t i = 0; i < length; i++) {
        while (UART->state & 1u) {
        }
        UART->data = data[i];
    }
}

int main(void) {
    UART->bauddiv = UART_CLOCK_HZ / UART_BAUD;
    UART->ctrl = 3u;
    vta_core_init(&core, dram, sizeof dram);
    vta_link_init(&serial_link, &core, uart_write, 0);
    for (;;) {
        while (!(UART->state & 2u)) {
        }
        uint8_t byte = (uint8_t)UART->data;
        vta_link_feed(&serial_link, &byte, 1);
    }
}
