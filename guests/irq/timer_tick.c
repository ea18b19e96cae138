/*
 * timer_tick.c -- the generic timer through the GICv2, taken as IRQs.
 *
 *  1. five ticks of the virtual timer (PPI 27), 10 ms apart: the first armed
 *     with CNTV_TVAL, the next ones by moving CNTV_CVAL on; sleeping in WFI
 *     in between. The last tick masks the timer (IMASK) instead of re-arming.
 *  2. the virtual timer with IMASK set: ISTATUS rises, nothing is pending in
 *     the GIC and no IRQ comes (IRQs unmasked at the CPU meanwhile); clearing
 *     IMASK delivers it.
 *  3. three ticks of the physical timer (PPI 30) with CNTP_TVAL.
 *  4. both timers expired at once with IRQs masked at the CPU: the GIC takes
 *     the higher priority first (PPI 30 at 0x80 before PPI 27 at 0xa0).
 *
 * All output is deterministic: no time or counter value is ever printed,
 * only facts that hold however slowly the machine runs.
 */
#include "irq.h"

#define TICKS 5
#define PTICKS 3
#define MAX_EVENTS 16

struct event {
    u32 intid;
    u32 ctl;       /* CNTx_CTL as the handler found it */
    u32 rpr;       /* GICC_RPR in the handler: the running priority */
    u32 late;      /* the counter had reached the compare value */
};

static volatile struct event events[MAX_EVENTS];
static volatile u32 nevents;
static volatile u32 vticks, pticks;
static volatile u32 v_rearm, p_rearm; /* re-arm this many more times, then mask */
static u32 interval;                   /* counter ticks in 10 ms */

void irq_handler(u32 iar)
{
    u32 intid = iar & 0x3ff;
    u32 n = nevents;
    u32 ctl = 0, late = 0;

    if (intid == PPI_VIRT_TIMER) {
        ctl = cntv_ctl();
        late = cntvct() >= cntv_cval();
        if (v_rearm) {
            v_rearm--;
            cntv_cval_set(cntv_cval() + interval);
        } else {
            cntv_ctl_set(CTL_ENABLE | CTL_IMASK);
        }
        vticks++;
    } else if (intid == PPI_PHYS_TIMER) {
        ctl = cntp_ctl();
        late = cntpct() >= cntp_cval();
        if (p_rearm) {
            p_rearm--;
            cntp_tval_set(interval);
        } else {
            cntp_ctl_set(CTL_ENABLE | CTL_IMASK);
        }
        pticks++;
    }
    if (n < MAX_EVENTS) {
        events[n].intid = intid;
        events[n].ctl = ctl;
        events[n].rpr = gicc_read(GICC_RPR);
        events[n].late = late;
    }
    nevents = n + 1;
}

static void put_event(const char *what, u32 n)
{
    uart_puts(what);
    uart_puts(": intid ");
    put_dec(events[n].intid);
    uart_puts(", ctl ");
    put_hex(events[n].ctl, 1);
    uart_puts(", rpr ");
    put_hex(events[n].rpr, 2);
    uart_puts(events[n].late ? ", counter >= cval\n" : ", EARLY: counter < cval\n");
}

static u32 ppi_pending(u32 intid) { return (gicd_read(GICD_ISPENDR) >> intid) & 1; }

/* spin (IRQs masked) until the counter passes `until`; 0 if it never does */
static int spin_until(int virt, u64 until)
{
    for (u32 i = 0; i < SPIN_LIMIT; i++)
        if ((virt ? cntvct() : cntpct()) >= until)
            return 1;
    return 0;
}

int main(ureg ctx)
{
    (void)ctx;
    uart_init();
    uart_puts("timer-tick (" BUILD ")\n");

    u32 frq = cntfrq();
    put_line_dec("cntfrq", frq);
    interval = frq / 100;

    gic_dist_init();
    gic_set_priority(PPI_VIRT_TIMER, 0xa0);
    gic_set_priority(PPI_PHYS_TIMER, 0x80);
    gic_enable(PPI_VIRT_TIMER);
    gic_enable(PPI_PHYS_TIMER);
    gic_cpu_init();
    uart_puts("gic on, idle iar ");
    put_dec(gicc_read(GICC_IAR) & 0x3ff);
    uart_putc('\n');

    u64 c0 = cntvct();
    uart_puts(spin_until(1, c0 + 1) ? "cntvct advances\n" : "cntvct is stuck\n");

    /* 1. virtual timer ticks */
    uart_puts("virtual timer: 5 ticks of 10 ms\n");
    u64 start = cntvct();
    v_rearm = TICKS - 1;
    cntv_tval_set(interval);
    cntv_ctl_set(CTL_ENABLE);
    for (u32 k = 1; k <= TICKS; k++) {
        WAIT_FOR(vticks >= k);
        uart_puts("tick ");
        put_dec(k);
        put_event("", k - 1); /* events 0-4 are these ticks */
    }
    u64 elapsed = cntvct() - start;
    uart_puts(elapsed >= (u64)TICKS * interval ? "elapsed >= 50 ms\n" : "elapsed < 50 ms: too early\n");
    uart_puts("after the last tick: ctl ");
    put_hex(cntv_ctl(), 1);
    uart_puts(", ppi 27 pending ");
    put_dec(ppi_pending(PPI_VIRT_TIMER));
    uart_putc('\n');
    cntv_ctl_set(0);

    /* 2. masked at the timer (IMASK): condition met, no interrupt */
    u32 before = nevents;
    cntv_cval_set(cntvct() + interval);
    cntv_ctl_set(CTL_ENABLE | CTL_IMASK);
    irq_unmask(); /* an interrupt the timer should not raise would be taken here */
    spin_until(1, cntv_cval());
    /* ISTATUS may trail the counter a little (QEMU updates it from a host timer) */
    for (u32 i = 0; i < SPIN_LIMIT && !(cntv_ctl() & CTL_ISTATUS); i++)
        ;
    isb();
    irq_mask();
    uart_puts("imask set: ctl ");
    put_hex(cntv_ctl(), 1);
    uart_puts(", ppi 27 pending ");
    put_dec(ppi_pending(PPI_VIRT_TIMER));
    uart_puts(", irqs taken ");
    put_dec(nevents - before);
    uart_putc('\n');
    v_rearm = 0;
    cntv_ctl_set(CTL_ENABLE); /* IMASK cleared: the interrupt comes now */
    WAIT_FOR(nevents > before);
    put_event("imask cleared", before);
    cntv_ctl_set(0);

    /* 3. physical timer ticks */
    uart_puts("physical timer: 3 ticks of 10 ms\n");
    u32 first = nevents;
    p_rearm = PTICKS - 1;
    cntp_tval_set(interval);
    cntp_ctl_set(CTL_ENABLE);
    for (u32 k = 1; k <= PTICKS; k++) {
        WAIT_FOR(pticks >= k);
        uart_puts("ptick ");
        put_dec(k);
        put_event("", first + k - 1);
    }
    cntp_ctl_set(0);

    /* 4. both pending at once: priority decides */
    irq_mask();
    before = nevents;
    v_rearm = p_rearm = 0;
    cntv_cval_set(cntvct() + interval);
    cntp_cval_set(cntpct() + interval);
    cntv_ctl_set(CTL_ENABLE);
    cntp_ctl_set(CTL_ENABLE);
    for (u32 i = 0; i < SPIN_LIMIT; i++)
        if (ppi_pending(PPI_VIRT_TIMER) && ppi_pending(PPI_PHYS_TIMER))
            break;
    uart_puts("both timers pending: 27 ");
    put_dec(ppi_pending(PPI_VIRT_TIMER));
    uart_puts(", 30 ");
    put_dec(ppi_pending(PPI_PHYS_TIMER));
    uart_puts(", hppir ");
    put_dec(gicc_read(GICC_HPPIR) & 0x3ff);
    uart_putc('\n');
    WAIT_FOR(nevents >= before + 2);
    put_event("first", before);
    put_event("second", before + 1);
    cntv_ctl_set(0);
    cntp_ctl_set(0);

    put_line_dec("irqs taken", nevents);
    uart_puts("done\n");
    system_off();
}

void secondary_main(ureg ctx)
{
    (void)ctx; /* never started */
}
