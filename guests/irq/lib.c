/*
 * lib.c -- PL011 output, GICv2 set-up, PSCI and the IRQ dispatcher shared by
 * the interrupt guests. See irq.h.
 */
#include "irq.h"

void uart_init(void)
{
    /* disable, 115200 8N1 from 24 MHz (IBRD 13, FBRD 1), FIFOs on, enable */
    uart_write(UART_CR, 0);
    uart_write(UART_IBRD, 13);
    uart_write(UART_FBRD, 1);
    uart_write(UART_LCR_H, (1u << 4) | (3u << 5)); /* FEN | WLEN 8 */
    uart_write(UART_CR, (1u << 0) | (1u << 8) | (1u << 9)); /* UARTEN | TXE | RXE */
}

void uart_putc(char c)
{
    while (uart_read(UART_FR) & FR_TXFF)
        ;
    uart_write(UART_DR, (u8)c);
}

void uart_puts(const char *s)
{
    while (*s)
        uart_putc(*s++);
}

void put_hex(u32 v, int digits)
{
    static const char hex[] = "0123456789abcdef";
    uart_puts("0x");
    for (int i = digits - 1; i >= 0; i--)
        uart_putc(hex[(v >> (4 * i)) & 0xf]);
}

void put_dec(u32 v)
{
    static const u32 pow10[] = {1000000000u, 100000000u, 10000000u, 1000000u,
                                100000u, 10000u, 1000u, 100u, 10u, 1u};
    int started = 0;
    for (unsigned i = 0; i < sizeof(pow10) / sizeof(pow10[0]); i++) {
        char d = '0';
        while (v >= pow10[i]) { /* no division */
            v -= pow10[i];
            d++;
        }
        if (d != '0' || started || pow10[i] == 1) {
            uart_putc(d);
            started = 1;
        }
    }
}

void put_sdec(sreg v)
{
    if (v < 0) {
        uart_putc('-');
        put_dec((u32)(0 - (ureg)v));
    } else {
        put_dec((u32)v);
    }
}

void put_line_dec(const char *label, u32 v)
{
    uart_puts(label);
    uart_putc(' ');
    put_dec(v);
    uart_putc('\n');
}

/* ---- GICv2 ---- */

void gic_dist_init(void)
{
    gicd_write(GICD_CTLR, 0);
    u32 lines = 32 * ((gicd_read(GICD_TYPER) & 0x1f) + 1);
    for (u32 i = 32; i < lines; i += 32) {
        gicd_write(GICD_ICENABLER + i / 8, 0xffffffffu);
        gicd_write(GICD_ICPENDR + i / 8, 0xffffffffu);
    }
    gicd_write(GICD_CTLR, 1);
}

void gic_cpu_init(void)
{
    gicc_write(GICC_PMR, 0xf0);
    gicc_write(GICC_BPR, 0);
    gicc_write(GICC_CTLR, 1);
}

static void gicd_set_byte(u32 base, u32 intid, u8 value)
{
    u32 off = base + (intid & ~3u);
    u32 shift = 8 * (intid & 3u);
    u32 v = gicd_read(off);
    v = (v & ~(0xffu << shift)) | ((u32)value << shift);
    gicd_write(off, v);
}

void gic_set_priority(u32 intid, u8 prio) { gicd_set_byte(GICD_IPRIORITYR, intid, prio); }
void gic_set_target(u32 intid, u8 cpus) { gicd_set_byte(GICD_ITARGETSR, intid, cpus); }
void gic_enable(u32 intid) { gicd_write(GICD_ISENABLER + 4 * (intid / 32), 1u << (intid % 32)); }

void gic_send_sgi(u32 filter, u32 targets, u32 intid)
{
    dsb(); /* RAM writes before the SGI is seen */
    gicd_write(GICD_SGIR, (filter << 24) | (targets << 16) | intid);
}

/* One acknowledged interrupt per exception; another pending one is taken
 * again after the return. Spurious INTIDs (1020-1023) are not EOId. */
/* acknowledge, handle, end: spurious IDs 1020-1023 are not EOId */
static void dispatch(void (*handler)(u32 iar))
{
    u32 iar = gicc_read(GICC_IAR);
    if ((iar & 0x3ff) >= 1020)
        return;
    handler(iar);
    gicc_write(GICC_EOIR, iar);
}

void irq_dispatch(void) { dispatch(irq_handler); }

/* FIQ: a Group 0 interrupt while GICC_CTLR.FIQEn is set. Only the fiq guest
 * sets it; in the others a FIQ is a surprise, reported before powering off. */
__attribute__((weak)) void fiq_handler(u32 iar)
{
    uart_puts("unexpected FIQ: intid ");
    put_dec(iar & 0x3ff);
    uart_putc('\n');
    system_off();
}

void fiq_dispatch(void) { dispatch(fiq_handler); }

/* ---- PSCI (HVC) ---- */

sreg psci_call(ureg fn, ureg a1, ureg a2, ureg a3)
{
#if defined(__aarch64__)
    register ureg r0 __asm__("x0") = fn;
    register ureg r1 __asm__("x1") = a1;
    register ureg r2 __asm__("x2") = a2;
    register ureg r3 __asm__("x3") = a3;
    __asm__ volatile("hvc #0"
                     : "+r"(r0), "+r"(r1), "+r"(r2), "+r"(r3)
                     :
                     : "x4", "x5", "x6", "x7", "x8", "x9", "x10", "x11", "x12",
                       "x13", "x14", "x15", "x16", "x17", "memory");
#else
    register ureg r0 __asm__("r0") = fn;
    register ureg r1 __asm__("r1") = a1;
    register ureg r2 __asm__("r2") = a2;
    register ureg r3 __asm__("r3") = a3;
    __asm__ volatile(".arch_extension virt\n\thvc #0"
                     : "+r"(r0), "+r"(r1), "+r"(r2), "+r"(r3)
                     :
                     : "memory");
#endif
    return (sreg)r0;
}

void system_off(void)
{
    psci_call(PSCI_SYSTEM_OFF, 0, 0, 0);
    for (;;) {
        irq_mask();
        wfi();
    }
}

void unexpected_exception(ureg n, ureg syndrome, ureg ret)
{
    uart_puts("unexpected exception ");
    put_dec((u32)n);
    uart_puts(" on cpu");
    put_dec(cpu_id());
    uart_puts(": syndrome ");
    put_hex((u32)syndrome, 8);
    uart_puts(" at ");
    put_hex((u32)ret, 8);
    uart_putc('\n');
    system_off();
}
