/* The firmware as a host process: the VTA core and the serial protocol behind a pseudo-terminal.
 *
 *   vta-coprocessor [--dram-bytes N] [--baud B] [--link PATH]
 *
 * Prints the terminal's path (or PATH, a symlink to it) on stdout once it serves. --baud paces
 * both directions as a UART at B baud (10 bits a byte) would, for link-overhead figures; 0 (the
 * default) runs as fast as the pseudo-terminal goes. SIGTERM or SIGINT ends it. */
#define _DEFAULT_SOURCE
#define _XOPEN_SOURCE 600
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "vta_link.h"

static vta_core_t core;
static vta_link_t serial_link;
static volatile sig_atomic_t stopping;

typedef struct {
    int fd;
    double baud;
    double rx_free, tx_free; /* when each direction's line is next idle (monotonic seconds) */
} port_t;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* Wait as long as `length` bytes take on a UART line that is busy until *line_free. */
static void pace(const port_t *port, double *line_free, uint32_t length) {
    if (port->baud <= 0) {
        return;
    }
    double start = now() > *line_free ? now() : *line_free;
    *line_free = start + (double)length * 10.0 / port->baud;
    double wait = *line_free - now();
    if (wait > 0) {
        struct timespec t = {(time_t)wait, (long)((wait - (double)(time_t)wait) * 1e9)};
        while (nanosleep(&t, &t) && errno == EINTR && !stopping) {
        }
    }
}

static void write_all(void *context, const uint8_t *data, uint32_t length) {
    port_t *port = context;
    pace(port, &port->tx_free, length);
    while (length) {
        ssize_t n = write(port->fd, data, length);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN) {
                continue;
            }
            perror("vta-coprocessor: write");
            exit(1);
        }
        data += n;
        length -= (uint32_t)n;
    }
}

static void stop(int signal_number) {
    (void)signal_number;
    stopping = 1;
}

static int usage(void) {
    fprintf(stderr, "usage: vta-coprocessor [--dram-bytes N] [--baud B] [--link PATH]\n");
    return 2;
}

int main(int argc, char **argv) {
    unsigned long long dram_bytes = 64ull << 20;
    double baud = 0;
    const char *link_path = NULL;
    for (int i = 1; i < argc; i++) {
        if (i + 1 < argc && !strcmp(argv[i], "--dram-bytes")) {
            dram_bytes = strtoull(argv[++i], NULL, 0);
        } else if (i + 1 < argc && !strcmp(argv[i], "--baud")) {
            baud = strtod(argv[++i], NULL);
        } else if (i + 1 < argc && !strcmp(argv[i], "--link")) {
            link_path = argv[++i];
        } else {
            return usage();
        }
    }
    if (dram_bytes == 0 || dram_bytes > 0xFFFFFFFFull) {
        fprintf(stderr, "vta-coprocessor: --dram-bytes must be 1..4294967295\n");
        return 2;
    }
    uint8_t *dram = calloc(1, (size_t)dram_bytes); /* the only allocation, at start-up */
    int master = posix_openpt(O_RDWR | O_NOCTTY);
    if (!dram || master < 0 || grantpt(master) || unlockpt(master)) {
        perror("vta-coprocessor: start-up");
        return 1;
    }
    const char *name = ptsname(master);
    /* Hold the terminal open, in raw mode, so hosts can come and go. */
    int terminal = name ? open(name, O_RDWR | O_NOCTTY) : -1;
    struct termios mode;
    if (terminal < 0 || tcgetattr(terminal, &mode)) {
        perror("vta-coprocessor: terminal");
        return 1;
    }
    cfmakeraw(&mode);
    tcsetattr(terminal, TCSANOW, &mode);
    if (link_path) {
        unlink(link_path);
        if (symlink(name, link_path)) {
            perror("vta-coprocessor: --link");
            return 1;
        }
    }
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = stop;
    sigaction(SIGTERM, &action, NULL);
    sigaction(SIGINT, &action, NULL);

    port_t port = {master, baud, 0, 0};
    vta_core_init(&core, dram, (uint32_t)dram_bytes);
    vta_link_init(&serial_link, &core, write_all, &port);
    printf("%s\n", link_path ? link_path : name);
    fflush(stdout);
    uint8_t buffer[4096];
    while (!stopping) {
        ssize_t n = read(master, buffer, sizeof buffer);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            perror("vta-coprocessor: read");
            break;
        }
        pace(&port, &port.rx_free, (uint32_t)n);
        vta_link_feed(&serial_link, buffer, (uint32_t)n);
    }
    if (link_path) {
        unlink(link_path);
    }
    return 0;
}
