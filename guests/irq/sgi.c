/*
 * sgi.c -- software-generated interrupts between two vCPUs (GICv2 GICD_SGIR).
 *
 * CPU 0 starts CPU 1 with PSCI CPU_ON. CPU 1 turns on its GIC CPU interface,
 * enables and prioritises its (banked) SGIs and sleeps in WFI. CPU 0 sends:
 *   SGI 1 to the target list {cpu1}, SGI 2 to "all but self", SGI 3 to
 *   "self only" (taken by CPU 0 itself), SGI 4 asking CPU 1 to send SGI 5
 *   back to CPU 0, then SGIs 6 (priority 0xa0) and 7 (0x80) while CPU 1 holds
 *   IRQs masked: CPU 1 then takes 7 before 6. SGI 0 is the doorbell that
 *   wakes CPU 1 to read a command (hold, off) from RAM.
 * Every handler records the INTID and the source CPU (GICC_IAR bits 12:10)
 * in its own CPU's log; only CPU 0 prints, so the output is deterministic.
 * After each step (being up, each SGI taken, holding) CPU 1 sends SGI 15 to
 * CPU 0, which waits for the step's result in RAM sleeping in WFI, woken by
 * those SGIs, instead of polling for a bounded time: nothing depends on how
 * fast either CPU runs. (SGI 15s can merge while pending, so they are only
 * wake-ups, never counted.)
 * At the end CPU 1 calls PSCI CPU_OFF, CPU 0 waits for AFFINITY_INFO to say
 * OFF, and powers the system off.
 */
#include "irq.h"

#define MAX_LOG 16
#define DOORBELL 0
#define ACK 15

enum { CMD_NONE, CMD_HOLD, CMD_RELEASE, CMD_OFF };

struct cpu_log {
    volatile u32 n;
    volatile u32 intid[MAX_LOG];
    volatile u32 source[MAX_LOG];
};

static struct cpu_log logs[2];
static volatile u32 cpu1_ready, cpu1_aff0, cpu1_targets;
static volatile u32 cmd, cmd_ack, cpu1_hppir;
static volatile u32 doorbells; /* SGI 0s taken by cpu1 */

void irq_handler(u32 iar)
{
    u32 me = cpu_id() & 1; /* the CPU number from start*.S, not MPIDR */
    u32 intid = iar & 0x3ff, source = (iar >> 10) & 7;
    struct cpu_log *log = &logs[me];
    if (me == 0 && intid == ACK && source == 1)
        return; /* a wake-up only */
    u32 n = log->n;
    if (n < MAX_LOG) {
        log->intid[n] = intid;
        log->source[n] = source;
    }
    dsb();
    log->n = n + 1;
    if (me == 1 && intid == DOORBELL)
        doorbells++;
    if (me == 1 && intid == 4)
        gic_send_sgi(0, 1u << 0, 5); /* target list: cpu0 */
    if (me == 1)
        gic_send_sgi(0, 1u << 0, ACK);
}

/* the SGIs of this CPU (banked): enabled, priority 0xa0, SGI 7 at 0x80 */
static void sgi_setup(void)
{
    for (u32 i = 0; i < 16; i++)
        gic_set_priority(i, i == 7 ? 0x80 : 0xa0);
    gicd_write(GICD_ISENABLER, 0xffff);
    gic_cpu_init();
}

/* cpu0 sleeps until `cpu` has taken `upto` SGIs (other than cpu1's wake-ups) */
static void wait_log(u32 cpu, u32 upto) { WAIT_FOR(logs[cpu].n >= upto); }

static void print_log(u32 cpu, u32 i, const char *note)
{
    uart_puts("cpu");
    put_dec(cpu);
    uart_puts(" took sgi ");
    put_dec(logs[cpu].intid[i]);
    uart_puts(" from cpu");
    put_dec(logs[cpu].source[i]);
    uart_puts(note);
    uart_putc('\n');
}

static void command(u32 c)
{
    cmd = c;
    gic_send_sgi(0, 1u << 1, DOORBELL); /* dsb inside: cmd is visible first */
}

int main(ureg ctx)
{
    (void)ctx;
    uart_init();
    uart_puts("sgi (" BUILD ")\n");

    gic_dist_init();
    sgi_setup();
    uart_puts("cpu0: itargetsr0 ");
    put_hex(gicd_read(GICD_ITARGETSR), 8);
    uart_putc('\n');

    sreg on = psci_call(PSCI_CPU_ON, 1, (ureg)secondary_entry, 1);
    uart_puts("psci cpu_on cpu1: ");
    put_sdec(on);
    uart_putc('\n');
    if (on != 0)
        system_off();
    WAIT_FOR(cpu1_ready);
    uart_puts("cpu1 up: mpidr aff0 ");
    put_dec(cpu1_aff0);
    uart_puts(", itargetsr0 ");
    put_hex(cpu1_targets, 8);
    uart_putc('\n');

    /* target list */
    gic_send_sgi(0, 1u << 1, 1);
    wait_log(1, 1);
    print_log(1, 0, " (target list)");
    /* all but self */
    gic_send_sgi(1, 0, 2);
    wait_log(1, 2);
    print_log(1, 1, " (all but self)");
    /* self only */
    gic_send_sgi(2, 0, 3);
    wait_log(0, 1);
    print_log(0, 0, " (self)");
    /* cpu1 answers SGI 4 with SGI 5 to cpu0 */
    gic_send_sgi(0, 1u << 1, 4);
    wait_log(0, 2);
    wait_log(1, 3);
    print_log(1, 2, "");
    print_log(0, 1, " (sent by cpu1's handler)");

    /* priorities: two SGIs pending at once on a CPU with IRQs masked */
    command(CMD_HOLD);
    WAIT_FOR(cmd_ack == CMD_HOLD);
    print_log(1, 3, " (doorbell: hold)");
    gic_send_sgi(0, 1u << 1, 6);
    gic_send_sgi(0, 1u << 1, 7);
    dsb();
    cmd = CMD_RELEASE;
    wait_log(1, 6);
    uart_puts("cpu1 hppir with 6 and 7 pending: sgi ");
    put_dec(cpu1_hppir & 0x3ff);
    uart_puts(" from cpu");
    put_dec((cpu1_hppir >> 10) & 7);
    uart_putc('\n');
    print_log(1, 4, " (priority 0x80)");
    print_log(1, 5, " (priority 0xa0)");

    /* cpu1 powers itself off */
    command(CMD_OFF);
    wait_log(1, 7); /* the doorbell taken: cpu_off comes next */
    sreg state = 0;
    for (u32 i = 0; i < SPIN_LIMIT / 64; i++) {
        state = psci_call(PSCI_AFFINITY_INFO, 1, 0, 0);
        if (state == 1)
            break;
    }
    uart_puts("cpu1 off: affinity_info ");
    put_sdec(state);
    uart_putc('\n');
    print_log(1, 6, " (doorbell: off)");
    uart_puts("cpu0 took ");
    put_dec(logs[0].n);
    uart_puts(" sgis, cpu1 took ");
    put_dec(logs[1].n);
    uart_puts(" sgis\ndone\n");
    system_off();
}

void secondary_main(ureg ctx)
{
    (void)ctx;
    sgi_setup();
    cpu1_aff0 = mpidr_aff0();
    cpu1_targets = gicd_read(GICD_ITARGETSR); /* banked, read-only: this CPU's bit */
    cpu1_ready = 1;
    gic_send_sgi(0, 1u << 0, ACK); /* dsb inside */

    /* Commands come with a doorbell SGI sent after the command is written, so
     * the command is read only once its doorbell has been taken (and logged). */
    u32 seen = 0;
    for (;;) {
        WAIT_FOR(doorbells != seen);
        seen = doorbells;
        dsb();
        if (cmd == CMD_HOLD) {
            /* IRQs stay masked (WAIT_FOR returns so) until cpu0 has sent 6 and 7 */
            cmd_ack = CMD_HOLD;
            gic_send_sgi(0, 1u << 0, ACK);
            while (cmd != CMD_RELEASE)
                ;
            dsb();
            cpu1_hppir = gicc_read(GICC_HPPIR);
        } else if (cmd == CMD_OFF) {
            psci_call(PSCI_CPU_OFF, 0, 0, 0);
            uart_puts("cpu1: cpu_off returned\n");
            return;
        }
    }
}
