/*
 * irq.h -- the small library shared by the interrupt guests (timer-tick,
 * uart-echo, sgi): PL011 output, GICv2, generic timer, PSCI, IRQ masking.
 * Built for a64 (AArch64, EL1) and a32 (AArch32 ARM state, SVC mode).
 *
 * As in guests/hello, every device access is one inline-asm load or store of
 * 32 bits without base writeback (so the instruction has a syndrome under
 * KVM's rules), and plain C only ever touches RAM.
 */
#ifndef IRQ_H
#define IRQ_H

typedef unsigned char u8;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned long ureg; /* general register width */
typedef long sreg;

#if defined(__aarch64__)
#define BUILD "a64"
#elif defined(__thumb__)
#error "the interrupt guests are built for a64 and a32 only"
#else
#define BUILD "a32"
#endif

/* QEMU virt board addresses */
#define UART_BASE 0x09000000UL
#define GICD_BASE 0x08000000UL
#define GICC_BASE 0x08010000UL

/* PL011 */
#define UART_DR    0x00
#define UART_FR    0x18
#define UART_IBRD  0x24
#define UART_FBRD  0x28
#define UART_LCR_H 0x2c
#define UART_CR    0x30
#define UART_IMSC  0x38
#define UART_RIS   0x3c
#define UART_MIS   0x40
#define UART_ICR   0x44
#define FR_RXFE    (1u << 4)
#define FR_TXFF    (1u << 5)
#define INT_RX     (1u << 4) /* RXIM / RXRIS / RXIC */
#define INT_RT     (1u << 6) /* RTIM / RTRIS / RTIC */
#define UART_SPI_INTID 33    /* SPI 1 on virt */

/* GICv2 distributor */
#define GICD_CTLR       0x000
#define GICD_TYPER      0x004
#define GICD_ISENABLER  0x100
#define GICD_ICENABLER  0x180
#define GICD_ISPENDR    0x200
#define GICD_ICPENDR    0x280
#define GICD_ISACTIVER  0x300
#define GICD_IPRIORITYR 0x400
#define GICD_ITARGETSR  0x800
#define GICD_ICFGR      0xc00
#define GICD_SGIR       0xf00
/* GICv2 CPU interface */
#define GICC_CTLR  0x00
#define GICC_CTLR_ENABLE_GRP0 (1u << 0)
#define GICC_CTLR_FIQEN       (1u << 3) /* Group 0 signalled as FIQ */
#define GICC_PMR   0x04
#define GICC_BPR   0x08
#define GICC_IAR   0x0c
#define GICC_EOIR  0x10
#define GICC_RPR   0x14
#define GICC_HPPIR 0x18
#define INTID_SPURIOUS 1023

/* generic timer PPIs on virt and CNT*_CTL bits */
#define PPI_PHYS_TIMER 30
#define PPI_VIRT_TIMER 27
#define CTL_ENABLE  (1u << 0)
#define CTL_IMASK   (1u << 1)
#define CTL_ISTATUS (1u << 2)

/* PSCI function ids (SMCCC) */
#define PSCI_CPU_OFF    0x84000002u
#define PSCI_SYSTEM_OFF 0x84000008u
#if defined(__aarch64__)
#define PSCI_CPU_ON        0xC4000003u /* SMC64 */
#define PSCI_AFFINITY_INFO 0xC4000004u
#else
#define PSCI_CPU_ON        0x84000003u /* SMC32 */
#define PSCI_AFFINITY_INFO 0x84000004u
#endif

/* a wait that should take far less: a few seconds under a slow emulator */
#define SPIN_LIMIT 500000000u

/* ---- MMIO: ldr/str of 32 bits, register base, no writeback ---- */
static inline u32 mmio_read32(ureg addr)
{
    u32 v;
#if defined(__aarch64__)
    __asm__ volatile("ldr %w0, [%1]" : "=r"(v) : "r"(addr) : "memory");
#else
    __asm__ volatile("ldr %0, [%1]" : "=r"(v) : "r"(addr) : "memory");
#endif
    return v;
}

static inline void mmio_write32(ureg addr, u32 v)
{
#if defined(__aarch64__)
    __asm__ volatile("str %w0, [%1]" ::"r"(v), "r"(addr) : "memory");
#else
    __asm__ volatile("str %0, [%1]" ::"r"(v), "r"(addr) : "memory");
#endif
}

static inline u32 gicd_read(u32 off) { return mmio_read32(GICD_BASE + off); }
static inline void gicd_write(u32 off, u32 v) { mmio_write32(GICD_BASE + off, v); }
static inline u32 gicc_read(u32 off) { return mmio_read32(GICC_BASE + off); }
static inline void gicc_write(u32 off, u32 v) { mmio_write32(GICC_BASE + off, v); }
static inline u32 uart_read(u32 off) { return mmio_read32(UART_BASE + off); }
static inline void uart_write(u32 off, u32 v) { mmio_write32(UART_BASE + off, v); }

/* ---- barriers, WFI, IRQ mask ---- */
static inline void dsb(void) { __asm__ volatile("dsb sy" ::: "memory"); }
static inline void isb(void) { __asm__ volatile("isb" ::: "memory"); }
static inline void wfi(void) { __asm__ volatile("wfi" ::: "memory"); }
#if defined(__aarch64__)
static inline void irq_mask(void) { __asm__ volatile("msr daifset, #2" ::: "memory"); }
static inline void irq_unmask(void) { __asm__ volatile("msr daifclr, #2" ::: "memory"); }
static inline void fiq_mask(void) { __asm__ volatile("msr daifset, #1" ::: "memory"); }
static inline void fiq_unmask(void) { __asm__ volatile("msr daifclr, #1" ::: "memory"); }
#else
static inline void irq_mask(void) { __asm__ volatile("cpsid i" ::: "memory"); }
static inline void irq_unmask(void) { __asm__ volatile("cpsie i" ::: "memory"); }
static inline void fiq_mask(void) { __asm__ volatile("cpsid f" ::: "memory"); }
static inline void fiq_unmask(void) { __asm__ volatile("cpsie f" ::: "memory"); }
#endif

/*
 * Sleep until COND holds. COND is tested with IRQs masked, so an interrupt
 * that makes it true cannot slip in between the test and the WFI (WFI wakes
 * on a pending interrupt even while it is masked); the interrupt is then
 * taken in the unmasked window. Returns with IRQs masked.
 */
#define WAIT_FOR_WITH(COND, MASK, UNMASK) \
    do {                      \
        MASK();               \
        while (!(COND)) {     \
            wfi();            \
            UNMASK();         \
            isb();            \
            MASK();           \
        }                     \
    } while (0)
#define WAIT_FOR(COND) WAIT_FOR_WITH(COND, irq_mask, irq_unmask)
/* the same with FIQs: returns with FIQs masked */
#define WAIT_FOR_FIQ(COND) WAIT_FOR_WITH(COND, fiq_mask, fiq_unmask)

/* ---- system registers: MPIDR and the generic timer ---- */
#if defined(__aarch64__)
#define SYSREG_R(name) ({ u64 _v; __asm__ volatile("mrs %0, " #name : "=r"(_v)::"memory"); _v; })
#define SYSREG_W(name, v) __asm__ volatile("msr " #name ", %0" ::"r"((u64)(v)) : "memory")
static inline u32 mpidr_aff0(void) { return (u32)SYSREG_R(mpidr_el1) & 0xff; }
static inline u32 cpu_id(void) { return (u32)SYSREG_R(tpidr_el1); } /* set by start64.S */
static inline u32 cntfrq(void) { return (u32)SYSREG_R(cntfrq_el0); }
static inline u64 cntvct(void) { isb(); return SYSREG_R(cntvct_el0); }
static inline u64 cntpct(void) { isb(); return SYSREG_R(cntpct_el0); }
static inline u32 cntv_ctl(void) { return (u32)SYSREG_R(cntv_ctl_el0); }
static inline void cntv_ctl_set(u32 v) { SYSREG_W(cntv_ctl_el0, v); isb(); }
static inline u64 cntv_cval(void) { return SYSREG_R(cntv_cval_el0); }
static inline void cntv_cval_set(u64 v) { SYSREG_W(cntv_cval_el0, v); isb(); }
static inline void cntv_tval_set(u32 v) { SYSREG_W(cntv_tval_el0, v); isb(); }
static inline u32 cntp_ctl(void) { return (u32)SYSREG_R(cntp_ctl_el0); }
static inline void cntp_ctl_set(u32 v) { SYSREG_W(cntp_ctl_el0, v); isb(); }
static inline u64 cntp_cval(void) { return SYSREG_R(cntp_cval_el0); }
static inline void cntp_cval_set(u64 v) { SYSREG_W(cntp_cval_el0, v); isb(); }
static inline void cntp_tval_set(u32 v) { SYSREG_W(cntp_tval_el0, v); isb(); }
#else
#define CP15_R(crn, op1, crm, op2) ({ u32 _v; __asm__ volatile( \
    "mrc p15, " #op1 ", %0, " #crn ", " #crm ", " #op2 : "=r"(_v)::"memory"); _v; })
#define CP15_W(crn, op1, crm, op2, v) __asm__ volatile( \
    "mcr p15, " #op1 ", %0, " #crn ", " #crm ", " #op2 ::"r"((u32)(v)) : "memory")
#define CP15_R64(op1, crm) ({ u64 _v; __asm__ volatile( \
    "mrrc p15, " #op1 ", %Q0, %R0, " #crm : "=r"(_v)::"memory"); _v; })
#define CP15_W64(op1, crm, v) __asm__ volatile( \
    "mcrr p15, " #op1 ", %Q0, %R0, " #crm ::"r"((u64)(v)) : "memory")
static inline u32 mpidr_aff0(void) { return CP15_R(c0, 0, c0, 5) & 0xff; }   /* MPIDR */
static inline u32 cpu_id(void) { return CP15_R(c13, 0, c0, 4); }             /* TPIDRPRW, set by start32.S */
static inline u32 cntfrq(void) { return CP15_R(c14, 0, c0, 0); }             /* CNTFRQ */
static inline u64 cntvct(void) { isb(); return CP15_R64(1, c14); }           /* CNTVCT */
static inline u64 cntpct(void) { isb(); return CP15_R64(0, c14); }           /* CNTPCT */
static inline u32 cntv_ctl(void) { return CP15_R(c14, 0, c3, 1); }           /* CNTV_CTL */
static inline void cntv_ctl_set(u32 v) { CP15_W(c14, 0, c3, 1, v); isb(); }
static inline u64 cntv_cval(void) { return CP15_R64(3, c14); }               /* CNTV_CVAL */
static inline void cntv_cval_set(u64 v) { CP15_W64(3, c14, v); isb(); }
static inline void cntv_tval_set(u32 v) { CP15_W(c14, 0, c3, 0, v); isb(); } /* CNTV_TVAL */
static inline u32 cntp_ctl(void) { return CP15_R(c14, 0, c2, 1); }           /* CNTP_CTL */
static inline void cntp_ctl_set(u32 v) { CP15_W(c14, 0, c2, 1, v); isb(); }
static inline u64 cntp_cval(void) { return CP15_R64(2, c14); }               /* CNTP_CVAL */
static inline void cntp_cval_set(u64 v) { CP15_W64(2, c14, v); isb(); }
static inline void cntp_tval_set(u32 v) { CP15_W(c14, 0, c2, 0, v); isb(); } /* CNTP_TVAL */
#endif

/* ---- lib.c ---- */
void uart_init(void);
void uart_putc(char c);
void uart_puts(const char *s);
void put_hex(u32 v, int digits); /* "0x" and exactly `digits` digits */
void put_dec(u32 v);
void put_sdec(sreg v);
void put_line_dec(const char *label, u32 v); /* "label N\n" */

void gic_dist_init(void);          /* distributor off, all SPIs disabled, then on */
void gic_cpu_init(void);           /* PMR 0xf0, BPR 0, CTLR 1 (this CPU) */
void gic_set_priority(u32 intid, u8 prio);  /* byte-lane read-modify-write by words */
void gic_set_target(u32 intid, u8 cpus);
void gic_enable(u32 intid);
void gic_send_sgi(u32 filter, u32 targets, u32 intid);

sreg psci_call(ureg fn, ureg a1, ureg a2, ureg a3);
void system_off(void) __attribute__((noreturn));

/* provided by each guest: one acknowledged interrupt (IAR value, never spurious) */
void irq_handler(u32 iar);
/* the same for a FIQ; lib.c's default reports it and powers off */
void fiq_handler(u32 iar);
/* entry points called from start*.S */
int main(ureg ctx);
void secondary_main(ureg ctx);
void secondary_entry(void);
void irq_dispatch(void);
void fiq_dispatch(void);
void unexpected_exception(ureg n, ureg syndrome, ureg ret) __attribute__((noreturn));

#endif
