/*
 * uart_echo.c -- PL011 receive interrupts through the GICv2 (SPI 1, INTID 33).
 *
 * The UART interrupts on receive (IMSC: RXIM | RTIM); the SPI targets CPU 0.
 * The IRQ handler clears the interrupt, then drains the receive FIFO into a
 * ring buffer; the main loop sleeps in WFI and echoes each complete input
 * line upper-cased with a prefix ("echo N: ..."). A line "q" ends it: "bye".
 * Carriage returns are dropped, so "\r\n" and "\n" line ends give the same
 * output. Only whole lines are ever printed, so the transcript does not depend
 * on how the input was split across interrupts.
 */
#include "irq.h"

#define RING 256 /* power of two */
#define LINE 80

static volatile u8 ring[RING];
static volatile u32 ring_head;   /* written by the IRQ handler */
static volatile u32 ring_tail;   /* written by main */
static volatile u32 overflow;
static volatile u32 uart_irqs;

void irq_handler(u32 iar)
{
    u32 intid = iar & 0x3ff;
    if (intid != UART_SPI_INTID) {
        uart_puts("unexpected intid ");
        put_dec(intid);
        uart_putc('\n');
        return;
    }
    uart_irqs++;
    /* clear first: a byte arriving after the last RXFE check below raises it anew */
    uart_write(UART_ICR, INT_RX | INT_RT);
    while (!(uart_read(UART_FR) & FR_RXFE)) {
        u32 c = uart_read(UART_DR) & 0xff;
        u32 h = ring_head;
        if (h - ring_tail < RING) {
            ring[h % RING] = (u8)c;
            ring_head = h + 1;
        } else {
            overflow++;
        }
    }
}

static char upper(char c) { return (c >= 'a' && c <= 'z') ? (char)(c - 'a' + 'A') : c; }

int main(ureg ctx)
{
    (void)ctx;
    uart_init();
    uart_puts("uart-echo (" BUILD ")\n");

    gic_dist_init();
    gic_set_priority(UART_SPI_INTID, 0xa0);
    gic_set_target(UART_SPI_INTID, 0x01); /* CPU 0 */
    gic_enable(UART_SPI_INTID);
    gic_cpu_init();

    uart_write(UART_ICR, 0x7ff);
    uart_write(UART_IMSC, INT_RX | INT_RT);
    uart_puts("imsc ");
    put_hex(uart_read(UART_IMSC), 3);
    uart_puts(", spi 33 target ");
    put_hex((gicd_read(GICD_ITARGETSR + 32) >> 8) & 0xff, 2);
    uart_puts(", enabled ");
    put_dec((gicd_read(GICD_ISENABLER + 4) >> 1) & 1);
    uart_putc('\n');
    uart_puts("ready: type lines, a line \"q\" ends\n");

    char line[LINE + 1];
    u32 len = 0, lines = 0, bytes = 0;
    for (;;) {
        WAIT_FOR(ring_head != ring_tail);
        u32 t = ring_tail;
        char c = (char)ring[t % RING];
        ring_tail = t + 1;
        if (c == '\r')
            continue;
        bytes++;
        if (c != '\n') {
            if (len < LINE)
                line[len++] = c;
            continue;
        }
        line[len] = 0;
        if (len == 1 && line[0] == 'q')
            break;
        lines++;
        uart_puts("echo ");
        put_dec(lines);
        uart_puts(": ");
        for (u32 i = 0; i < len; i++)
            uart_putc(upper(line[i]));
        uart_putc('\n');
        len = 0;
    }
    uart_puts("lines ");
    put_dec(lines);
    uart_puts(", bytes (without CR) ");
    put_dec(bytes);
    uart_puts(", overflow ");
    put_dec(overflow);
    uart_puts(", irqs > 0: ");
    uart_puts(uart_irqs ? "yes" : "no");
    uart_puts("\nbye\n");
    system_off();
}

void secondary_main(ureg ctx)
{
    (void)ctx; /* never started */
}
