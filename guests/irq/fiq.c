/*
 * fiq.c -- a Group 0 interrupt signalled as FIQ (GICC_CTLR.FIQEn), then as
 * IRQ once FIQEn is cleared, as QEMU's GICv2 without security extensions
 * does on virt.
 *
 *  1. three ticks of the virtual timer (PPI 27, Group 0) taken as FIQs, IRQs
 *     masked at the CPU all along; sleeping in WFI in between.
 *  2. FIQEn cleared: the next tick comes as an IRQ, FIQs masked at the CPU.
 *
 * All output is deterministic: no time or counter value is printed.
 */
#include "irq.h"

#define TICKS 3

#define MAX_EVENTS 8

struct event {
    u32 fiq;      /* taken as FIQ (1) or IRQ (0) */
    u32 intid;
    u32 ctl;      /* CNTV_CTL as the handler found it */
    u32 rpr;      /* GICC_RPR in the handler */
    u32 before;   /* interrupts taken before this one */
};

static volatile struct event events[MAX_EVENTS];
static volatile u32 fiqs, irqs, rearm;
static u32 interval; /* counter ticks in 10 ms */

/* Each handler records what it saw, so the output does not depend on how
 * long printing takes; the next tick is armed from now, not from the last
 * compare value, so a slow console never makes two ticks due at once. */
static void tick(u32 iar, u32 fiq)
{
    u32 n = fiqs + irqs;
    if (n < MAX_EVENTS) {
        events[n].fiq = fiq;
        events[n].intid = iar & 0x3ff;
        events[n].ctl = cntv_ctl();
        events[n].rpr = gicc_read(GICC_RPR);
        events[n].before = n;
    }
    if (rearm) {
        rearm--;
        cntv_tval_set(interval);
    } else {
        cntv_ctl_set(CTL_ENABLE | CTL_IMASK);
    }
}

void fiq_handler(u32 iar)
{
    tick(iar, 1);
    fiqs++;
}

void irq_handler(u32 iar)
{
    tick(iar, 0);
    irqs++;
}

static void put_tick(u32 k, u32 n)
{
    uart_puts("tick ");
    put_dec(k);
    uart_puts(events[n].fiq ? " as FIQ" : " as IRQ");
    uart_puts(": intid ");
    put_dec(events[n].intid);
    uart_puts(", ctl ");
    put_hex(events[n].ctl, 1);
    uart_puts(", rpr ");
    put_hex(events[n].rpr, 2);
    uart_puts(", after ");
    put_dec(events[n].before);
    uart_putc('\n');
}

int main(ureg ctx)
{
    (void)ctx;
    uart_init();
    uart_puts("fiq (" BUILD ")\n");
    interval = cntfrq() / 100;

    gic_dist_init();
    gic_set_priority(PPI_VIRT_TIMER, 0xa0);
    gic_enable(PPI_VIRT_TIMER); /* Group 0: GICD_IGROUPR is 0 out of reset */
    gic_cpu_init();
    gicc_write(GICC_CTLR, GICC_CTLR_ENABLE_GRP0 | GICC_CTLR_FIQEN);
    uart_puts("gicc_ctlr ");
    put_hex(gicc_read(GICC_CTLR), 2);
    uart_putc('\n');

    /* 1. as FIQ, IRQs masked throughout */
    irq_mask();
    rearm = TICKS - 1;
    cntv_tval_set(interval);
    cntv_ctl_set(CTL_ENABLE);
    for (u32 k = 1; k <= TICKS; k++) {
        WAIT_FOR_FIQ(fiqs >= k);
        put_tick(k, k - 1);
    }
    cntv_ctl_set(0);

    /* 2. FIQEn cleared: the same Group 0 interrupt is an IRQ now */
    gicc_write(GICC_CTLR, GICC_CTLR_ENABLE_GRP0);
    rearm = 0;
    cntv_tval_set(interval);
    cntv_ctl_set(CTL_ENABLE);
    WAIT_FOR(irqs >= 1);
    put_tick(TICKS + 1, TICKS);
    cntv_ctl_set(0);
    uart_puts("fiqs ");
    put_dec(fiqs);
    uart_puts(", irqs ");
    put_dec(irqs);
    uart_putc('\n');

    uart_puts("done\n");
    system_off();
}

void secondary_main(ureg ctx)
{
    (void)ctx; /* never started */
}
