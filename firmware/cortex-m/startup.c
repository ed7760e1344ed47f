/* Reset and vector table for a Cortex-M: copy .data, clear .bss, run main. The C library is not
 * linked, so the two functions the compiler may call for block moves are here. */
#include <stddef.h>
#include <stdint.h>

int main(void);

extern uint32_t _sidata, _sdata, _edata, _sbss, _ebss, _estack;

void *memcpy(void *dst, const void *src, size_t n);
void *memset(void *dst, int value, size_t n);

void *memcpy(void *dst, const void *src, size_t n) {
    uint8_t *d = dst;
    const uint8_t *s = src;
    while (n--) {
        *d++ = *s++;
    }
    return dst;
}

void *memset(void *dst, int value, size_t n) {
    uint8_t *d = dst;
    while (n--) {
        *d++ = (uint8_t)value;
    }
    return dst;
}

void reset_handler(void);
void fault_handler(void);

void reset_handler(void) {
    uint32_t *src = &_sidata;
    for (uint32_t *dst = &_sdata; dst < &_edata;) {
        *dst++ = *src++;
    }
    for (uint32_t *dst = &_sbss; dst < &_ebss;) {
        *dst++ = 0;
    }
    main();
    for (;;) {
    }
}

void fault_handler(void) {
    for (;;) {
    }
}

typedef void (*handler_t)(void);

__attribute__((section(".vectors"), used)) static const handler_t vectors[16] = {
    (handler_t)(uintptr_t)&_estack, /* initial stack pointer */
    reset_handler,
    fault_handler, /* NMI */
    fault_handler, /* hard fault */
    fault_handler, /* memory management */
    fault_handler, /* bus fault */
    fault_handler, /* usage fault */
};
