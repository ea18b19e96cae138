/*
 * hello.c -- bare-metal test guest for mmiosplit.
 *
 * One source, three builds: a64 (AArch64), a32 (ARM state) and t32 (Thumb-2).
 * See guests/README.md for the machine it expects and the exact output.
 *
 * Rule for this file: every access to a device (PL011, scratch) is done by
 * inline asm below, one single-register load or store without base writeback
 * per access, so the instruction form is fixed by us and not by the compiler.
 * Plain C code only ever touches RAM.
 */

typedef unsigned char u8;
typedef unsigned int u32;
typedef unsigned long ureg; /* general register width: 64 on a64, 32 on a32/t32 */
typedef long sreg;

#if defined(__aarch64__)
#define BUILD "a64"
#define REG_HEX 16
#elif defined(__thumb__)
#define BUILD "t32"
#define REG_HEX 8
#else
#define BUILD "a32"
#define REG_HEX 8
#endif

#define UART_BASE    0x09000000UL
#define SCRATCH_BASE 0x0a000000UL
#define SCRATCH_SIZE 0x1000

#define STR_(x) #x
#define STR(x) STR_(x) /* stringify after macro expansion */

/* PL011 registers and bits */
#define UART_DR    0x00
#define UART_FR    0x18
#define UART_IBRD  0x24
#define UART_FBRD  0x28
#define UART_LCR_H 0x2c
#define UART_CR    0x30
#define FR_TXFF    (1u << 5)
#define LCR_H_FEN  (1u << 4)
#define LCR_H_WLEN8 (3u << 5)
#define CR_UARTEN  (1u << 0)
#define CR_TXE     (1u << 8)
#define CR_RXE     (1u << 9)

/* PSCI (SMCCC) function ids */
#define PSCI_VERSION    0x84000000u
#define PSCI_CPU_OFF    0x84000002u
#define PSCI_SYSTEM_OFF 0x84000008u
#if defined(__aarch64__)
#define PSCI_CPU_ON     0xC4000003u /* SMC64 */
#else
#define PSCI_CPU_ON     0x84000003u /* SMC32 */
#endif

#define ROUNDS     1000u
#define SPIN_LIMIT 500000000u /* ~4-8 s in Unicorn 2.1.4, well under 1 s on hardware */

/* -------------------------------------------------------------------------- */
/* barriers, hvc                                                              */
/* -------------------------------------------------------------------------- */

static inline void dmb_ish(void) { __asm__ volatile("dmb ish" ::: "memory"); }
static inline void wfi(void) { __asm__ volatile("wfi" ::: "memory"); }

static inline sreg psci_call(ureg fn, ureg a1, ureg a2, ureg a3)
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

/* -------------------------------------------------------------------------- */
/* PL011 accessors                                                            */
/* -------------------------------------------------------------------------- */

#if defined(__aarch64__)
/* ldr Wt, [Xn, #imm] / str Wt, [Xn, #imm] (unsigned offset) */
#define UART_RD(OFF) ({ u32 _v; __asm__ volatile("ldr %w0, [%1, #" STR(OFF) "]" \
    : "=r"(_v) : "r"(UART_BASE) : "memory"); _v; })
#define UART_WR(OFF, V) __asm__ volatile("str %w0, [%1, #" STR(OFF) "]" \
    :: "r"((u32)(V)), "r"(UART_BASE) : "memory")
#define UART_WR_INIT UART_WR
#elif defined(__thumb__)
/* FR poll and DR write: 16-bit Thumb ldr.n/str.n Rt, [Rn, #imm5*4];
 * init registers: 32-bit Thumb-2 str.w Rt, [Rn, #imm12] */
#define UART_RD(OFF) ({ u32 _v; __asm__ volatile("ldr.n %0, [%1, #" STR(OFF) "]" \
    : "=l"(_v) : "l"(UART_BASE) : "memory"); _v; })
#define UART_WR(OFF, V) __asm__ volatile("str.n %0, [%1, #" STR(OFF) "]" \
    :: "l"((u32)(V)), "l"(UART_BASE) : "memory")
#define UART_WR_INIT(OFF, V) __asm__ volatile("str.w %0, [%1, #" STR(OFF) "]" \
    :: "r"((u32)(V)), "r"(UART_BASE) : "memory")
#else
/* ldr/str Rt, [Rn, #imm12] */
#define UART_RD(OFF) ({ u32 _v; __asm__ volatile("ldr %0, [%1, #" STR(OFF) "]" \
    : "=r"(_v) : "r"(UART_BASE) : "memory"); _v; })
#define UART_WR(OFF, V) __asm__ volatile("str %0, [%1, #" STR(OFF) "]" \
    :: "r"((u32)(V)), "r"(UART_BASE) : "memory")
#define UART_WR_INIT UART_WR
#endif

static void uart_init(void)
{
    /* What a PL011 driver does: disable, set the divisor (24 MHz / 115200:
     * IBRD 13, FBRD 1), 8 bits + FIFOs (LCR_H latches IBRD/FBRD, so it comes
     * after them), then enable UART, TX and RX. */
    UART_WR_INIT(UART_CR, 0);
    UART_WR_INIT(UART_IBRD, 13);
    UART_WR_INIT(UART_FBRD, 1);
    UART_WR_INIT(UART_LCR_H, LCR_H_FEN | LCR_H_WLEN8);
    UART_WR_INIT(UART_CR, CR_UARTEN | CR_TXE | CR_RXE);
}

static void uart_putc(char c)
{
    while (UART_RD(UART_FR) & FR_TXFF)
        ;
    UART_WR(UART_DR, c);
}

static void uart_puts(const char *s)
{
    while (*s)
        uart_putc(*s++);
}

static void puthex(ureg v, int digits)
{
    static const char hex[] = "0123456789abcdef";
    uart_puts("0x");
    for (int i = digits - 1; i >= 0; i--)
        uart_putc(hex[(v >> (4 * i)) & 0xf]);
}

static void putudec(u32 v)
{
    static const u32 pow10[] = {1000000000u, 100000000u, 10000000u, 1000000u,
                                100000u, 10000u, 1000u, 100u, 10u, 1u};
    int started = 0;
    for (unsigned i = 0; i < sizeof(pow10) / sizeof(pow10[0]); i++) {
        char d = '0';
        while (v >= pow10[i]) { /* no division: no libgcc/__aeabi_uidiv needed */
            v -= pow10[i];
            d++;
        }
        if (d != '0' || started || pow10[i] == 1) {
            uart_putc(d);
            started = 1;
        }
    }
}

static void putsdec(sreg v)
{
    if (v < 0) {
        uart_putc('-');
        putudec((u32)(0 - (ureg)v));
    } else {
        putudec((u32)v);
    }
}

/* -------------------------------------------------------------------------- */
/* scratch device checks                                                      */
/* -------------------------------------------------------------------------- */

/*
 * A shadow copy of what was stored to the scratch device; the expected value
 * of every load is computed from it (little-endian, zero or sign extension to
 * the register width), so nothing here is hard-coded from a previous run.
 */
static u8 shadow[SCRATCH_SIZE];
static u8 known[SCRATCH_SIZE];
static unsigned nbad;

static void put_op(const char *name, unsigned size_bits, char suffix)
{
    /* op name padded to 6 columns: "st8", "ld16", "ldsb" (a32/t32),
     * "ldsbx"/"ldsbw"/"ldshx"/"ldshw"/"ldsw" (a64, X or W target) */
    unsigned n = 0;
    for (const char *p = name; *p; p++, n++)
        uart_putc(*p);
    if (size_bits >= 10) {
        uart_putc('0' + size_bits / 10);
        n++;
    }
    if (size_bits) {
        uart_putc('0' + size_bits % 10);
        n++;
    }
    if (suffix) {
        uart_putc(suffix);
        n++;
    }
    while (n++ < 6)
        uart_putc(' ');
}

static void put_off(unsigned off)
{
    static const char hex[] = "0123456789abcdef";
    uart_puts("+0x");
    uart_putc(hex[(off >> 8) & 0xf]);
    uart_putc(hex[(off >> 4) & 0xf]);
    uart_putc(hex[off & 0xf]);
}

static void rec_st(unsigned off, ureg val, unsigned size, const char *form)
{
    for (unsigned i = 0; i < size; i++) {
        shadow[off + i] = (u8)(val >> (8 * i));
        known[off + i] = 1;
    }
    put_op("st", size * 8, 0);
    put_off(off);
    uart_puts(" <- ");
    puthex(val, size * 2);
    uart_puts("  ");
    uart_puts(form);
    uart_putc('\n');
}

/*
 * sext: 0 = zero-extend to the register; 32 = sign-extend to 32 bits (the
 * whole register on a32/t32; a W register on a64, whose upper half then reads
 * as zero); 64 = sign-extend to a 64-bit X register (a64).
 */
static void rec_ld(unsigned off, ureg got, unsigned size, unsigned sext, const char *form)
{
    ureg exp = 0;
    int unknown = 0;
    for (unsigned i = 0; i < size; i++) {
        exp |= (ureg)shadow[off + i] << (8 * i);
        unknown |= !known[off + i];
    }
    if (sext && (exp >> (size * 8 - 1)) & 1) {
        exp |= ~(ureg)0 << (size * 8 - 1);   /* sign bits up to the top */
        if (sext < sizeof(ureg) * 8)
            exp &= ((ureg)1 << sext) - 1;    /* W register: upper half is zero */
    }

    if (!sext) {
        put_op("ld", size * 8, 0);
    } else {
        char suffix = 0;
#if defined(__aarch64__)
        if (size < 4)
            suffix = sext == 64 ? 'x' : 'w';
#endif
        put_op(size == 1 ? "ldsb" : size == 2 ? "ldsh" : "ldsw", 0, suffix);
    }
    put_off(off);
    uart_puts(" -> ");
    puthex(got, REG_HEX);
    uart_puts("  ");
    uart_puts(form);
    if (unknown || got != exp) {
        nbad++;
        uart_puts("  MISMATCH expected ");
        puthex(exp, REG_HEX);
        if (unknown)
            uart_puts(" (reads unwritten bytes)");
    }
    uart_putc('\n');
}

#if defined(__aarch64__)
/* ---- A64 ---------------------------------------------------------------- */
/* T: "W" or "X" (for the form text), M: "w" or "x" (operand modifier) */

/* unsigned offset (LDR/STR imm12, scaled) or unscaled (LDUR/STUR simm9) */
#define ST_I(INSN, T, M, SZ, B, IMM, VAL) do { ureg _v = (VAL); \
    __asm__ volatile(INSN " %" M "0, [%1, #" #IMM "]" \
        :: "r"(_v), "r"(SCRATCH_BASE + (B)) : "memory"); \
    rec_st((B) + (IMM), _v, SZ, INSN " " T "t, [Xn, #" #IMM "]"); } while (0)
#define LD_I(INSN, T, M, SZ, SX, B, IMM) do { ureg _v; \
    __asm__ volatile(INSN " %" M "0, [%1, #" #IMM "]" \
        : "=r"(_v) : "r"(SCRATCH_BASE + (B)) : "memory"); \
    rec_ld((B) + (IMM), _v, SZ, SX, INSN " " T "t, [Xn, #" #IMM "]"); } while (0)

/* register offset: [Xn, Xm] or [Xn, Xm, lsl #SH] */
#define ST_R(INSN, T, M, SZ, B, IDX, VAL) do { ureg _v = (VAL); \
    __asm__ volatile(INSN " %" M "0, [%1, %2]" \
        :: "r"(_v), "r"(SCRATCH_BASE + (B)), "r"((ureg)(IDX)) : "memory"); \
    rec_st((B) + (IDX), _v, SZ, INSN " " T "t, [Xn, Xm]"); } while (0)
#define LD_R(INSN, T, M, SZ, SX, B, IDX) do { ureg _v; \
    __asm__ volatile(INSN " %" M "0, [%1, %2]" \
        : "=r"(_v) : "r"(SCRATCH_BASE + (B)), "r"((ureg)(IDX)) : "memory"); \
    rec_ld((B) + (IDX), _v, SZ, SX, INSN " " T "t, [Xn, Xm]"); } while (0)
#define ST_RS(INSN, T, M, SZ, B, IDX, SH, VAL) do { ureg _v = (VAL); \
    __asm__ volatile(INSN " %" M "0, [%1, %2, lsl #" #SH "]" \
        :: "r"(_v), "r"(SCRATCH_BASE + (B)), "r"((ureg)(IDX)) : "memory"); \
    rec_st((B) + ((IDX) << (SH)), _v, SZ, INSN " " T "t, [Xn, Xm, lsl #" #SH "]"); } while (0)
#define LD_RS(INSN, T, M, SZ, SX, B, IDX, SH) do { ureg _v; \
    __asm__ volatile(INSN " %" M "0, [%1, %2, lsl #" #SH "]" \
        : "=r"(_v) : "r"(SCRATCH_BASE + (B)), "r"((ureg)(IDX)) : "memory"); \
    rec_ld((B) + ((IDX) << (SH)), _v, SZ, SX, INSN " " T "t, [Xn, Xm, lsl #" #SH "]"); } while (0)

static void scratch_test(void)
{
    /* unsigned offset, every size, top bit set and clear */
    ST_I("strb",  "W", "w", 1,     0, 0x10, 0xa5);
    ST_I("strb",  "W", "w", 1,     0, 0x11, 0x7f);
    LD_I("ldrb",  "W", "w", 1, 0,  0, 0x10);
    LD_I("ldrb",  "W", "w", 1, 0,  0, 0x11);
    LD_I("ldrsb", "X", "x", 1, 64, 0, 0x10);
    LD_I("ldrsb", "W", "w", 1, 32, 0, 0x10);
    LD_I("ldrsb", "X", "x", 1, 64, 0, 0x11);
    LD_I("ldrsb", "W", "w", 1, 32, 0, 0x11);

    ST_I("strh",  "W", "w", 2,     0, 0x20, 0x8001);
    ST_I("strh",  "W", "w", 2,     0, 0x22, 0x7ffe);
    LD_I("ldrh",  "W", "w", 2, 0,  0, 0x20);
    LD_I("ldrsh", "X", "x", 2, 64, 0, 0x20);
    LD_I("ldrsh", "W", "w", 2, 32, 0, 0x20);
    LD_I("ldrsh", "X", "x", 2, 64, 0, 0x22);
    LD_I("ldrsh", "W", "w", 2, 32, 0, 0x22);
    LD_I("ldr",   "W", "w", 4, 0,  0, 0x20);     /* both halves at once */

    ST_I("str",   "W", "w", 4,     0, 0x30, 0x80000000);
    ST_I("str",   "W", "w", 4,     0, 0x34, 0x12345678);
    LD_I("ldr",   "W", "w", 4, 0,  0, 0x30);
    LD_I("ldrsw", "X", "x", 4, 64, 0, 0x30);
    LD_I("ldrsw", "X", "x", 4, 64, 0, 0x34);
    /* little-endian order: bytes and halves of the word at +0x34 */
    LD_I("ldrb",  "W", "w", 1, 0,  0, 0x34);
    LD_I("ldrb",  "W", "w", 1, 0,  0, 0x35);
    LD_I("ldrb",  "W", "w", 1, 0,  0, 0x36);
    LD_I("ldrb",  "W", "w", 1, 0,  0, 0x37);
    LD_I("ldrh",  "W", "w", 2, 0,  0, 0x34);
    LD_I("ldrh",  "W", "w", 2, 0,  0, 0x36);
    LD_I("ldr",   "X", "x", 8, 0,  0, 0x30);     /* two words as one doubleword */
    /* a byte store into the middle of the word */
    ST_I("strb",  "W", "w", 1,     0, 0x35, 0xee);
    LD_I("ldr",   "W", "w", 4, 0,  0, 0x34);

    ST_I("str",   "X", "x", 8,     0, 0x40, 0x8877665544332211ull);
    LD_I("ldr",   "X", "x", 8, 0,  0, 0x40);
    LD_I("ldr",   "W", "w", 4, 0,  0, 0x40);
    LD_I("ldr",   "W", "w", 4, 0,  0, 0x44);
    LD_I("ldrsw", "X", "x", 4, 64, 0, 0x44);
    LD_I("ldrh",  "W", "w", 2, 0,  0, 0x46);
    LD_I("ldrsh", "X", "x", 2, 64, 0, 0x46);
    LD_I("ldrb",  "W", "w", 1, 0,  0, 0x47);
    LD_I("ldrsb", "X", "x", 1, 64, 0, 0x47);
    ST_I("str",   "X", "x", 8,     0, 0x48, 0x0123456789abcdefull);
    LD_I("ldr",   "X", "x", 8, 0,  0, 0x48);

    /* unscaled, negative offsets (LDUR/STUR family) from base +0x100 */
    ST_I("stur",  "X", "x", 8,     0x100, -16, 0xfedcba9876543210ull);
    ST_I("stur",  "W", "w", 4,     0x100, -8,  0x89abcdef);
    ST_I("sturh", "W", "w", 2,     0x100, -4,  0xc001);
    ST_I("sturb", "W", "w", 1,     0x100, -2,  0x80);
    ST_I("sturb", "W", "w", 1,     0x100, -1,  0x01);
    LD_I("ldur",  "X", "x", 8, 0,  0x100, -16);
    LD_I("ldur",  "W", "w", 4, 0,  0x100, -12);
    LD_I("ldursw","X", "x", 4, 64, 0x100, -8);
    LD_I("ldurh", "W", "w", 2, 0,  0x100, -4);
    LD_I("ldursh","X", "x", 2, 64, 0x100, -4);
    LD_I("ldursh","W", "w", 2, 32, 0x100, -4);
    LD_I("ldurb", "W", "w", 1, 0,  0x100, -2);
    LD_I("ldursb","X", "x", 1, 64, 0x100, -2);
    LD_I("ldursb","W", "w", 1, 32, 0x100, -1);
    LD_I("ldur",  "W", "w", 4, 0,  0x100, -4);

    /* register offset from base +0x200 */
    ST_RS("str",  "W", "w", 4,     0x200, 3, 2, 0xcafef00d);
    LD_RS("ldr",  "W", "w", 4, 0,  0x200, 3, 2);
    LD_RS("ldrsw","X", "x", 4, 64, 0x200, 3, 2);
    ST_RS("strh", "W", "w", 2,     0x200, 9, 1, 0xfffe);
    LD_RS("ldrh", "W", "w", 2, 0,  0x200, 9, 1);
    LD_RS("ldrsh","X", "x", 2, 64, 0x200, 9, 1);
    LD_RS("ldrsh","W", "w", 2, 32, 0x200, 9, 1);
    ST_R ("strb", "W", "w", 1,     0x200, 0x20, 0x81);
    LD_R ("ldrb", "W", "w", 1, 0,  0x200, 0x20);
    LD_R ("ldrsb","X", "x", 1, 64, 0x200, 0x20);
    LD_R ("ldrsb","W", "w", 1, 32, 0x200, 0x20);
    ST_RS("str",  "X", "x", 8,     0x200, 5, 3, 0x0000000180000001ull);
    LD_RS("ldr",  "X", "x", 8, 0,  0x200, 5, 3);
    LD_R ("ldr",  "W", "w", 4, 0,  0x200, 0x2c);
    {   /* extended register: ldr Wt, [Xn, Wm, sxtw #2] with Wm = -1 */
        ureg v;
        __asm__ volatile("ldr %w0, [%1, %w2, sxtw #2]"
                         : "=r"(v) : "r"(SCRATCH_BASE + 0x210), "r"(-1) : "memory");
        rec_ld(0x20c, v, 4, 0, "ldr Wt, [Xn, Wm, sxtw #2]");
    }

    /* stores of the zero register */
    __asm__ volatile("str wzr, [%0]" :: "r"(SCRATCH_BASE + 0x34) : "memory");
    rec_st(0x34, 0, 4, "str wzr, [Xn]");
    LD_I("ldr",   "W", "w", 4, 0,  0, 0x34);
    __asm__ volatile("str xzr, [%0, #8]" :: "r"(SCRATCH_BASE + 0x40) : "memory");
    rec_st(0x48, 0, 8, "str xzr, [Xn, #8]");
    LD_I("ldr",   "X", "x", 8, 0,  0, 0x48);
    LD_I("ldr",   "X", "x", 8, 0,  0, 0x40);      /* neighbour untouched */
}

static u32 roundtrip(ureg addr, u32 n)
{
    u32 bad = 0;
    for (u32 i = 0; i < n; i++) {
        u32 v;
        __asm__ volatile("str %w0, [%1]" :: "r"(i), "r"(addr) : "memory");
        __asm__ volatile("ldr %w0, [%1]" : "=r"(v) : "r"(addr) : "memory");
        bad += (v != i);
    }
    return bad;
}

#elif defined(__thumb__)
/* ---- T32 ---------------------------------------------------------------- */
/* 16-bit encodings (.n) need low registers: constraint "l" (r0-r7). */

/* T16 immediate: LDR/STR{,B,H}.n Rt, [Rn, #imm5 (scaled)] */
#define ST_N(INSN, SZ, B, IMM, VAL) do { u32 _v = (VAL); \
    __asm__ volatile(INSN ".n %0, [%1, #" #IMM "]" \
        :: "l"(_v), "l"(SCRATCH_BASE + (B)) : "memory"); \
    rec_st((B) + (IMM), _v, SZ, INSN ".n Rt, [Rn, #" #IMM "]"); } while (0)
#define LD_N(INSN, SZ, SX, B, IMM) do { u32 _v; \
    __asm__ volatile(INSN ".n %0, [%1, #" #IMM "]" \
        : "=l"(_v) : "l"(SCRATCH_BASE + (B)) : "memory"); \
    rec_ld((B) + (IMM), _v, SZ, SX, INSN ".n Rt, [Rn, #" #IMM "]"); } while (0)
/* T16 register: LDR/STR{,B,H}.n, LDRSB.n, LDRSH.n Rt, [Rn, Rm] */
#define ST_NR(INSN, SZ, B, IDX, VAL) do { u32 _v = (VAL); \
    __asm__ volatile(INSN ".n %0, [%1, %2]" \
        :: "l"(_v), "l"(SCRATCH_BASE + (B)), "l"((u32)(IDX)) : "memory"); \
    rec_st((B) + (IDX), _v, SZ, INSN ".n Rt, [Rn, Rm]"); } while (0)
#define LD_NR(INSN, SZ, SX, B, IDX) do { u32 _v; \
    __asm__ volatile(INSN ".n %0, [%1, %2]" \
        : "=l"(_v) : "l"(SCRATCH_BASE + (B)), "l"((u32)(IDX)) : "memory"); \
    rec_ld((B) + (IDX), _v, SZ, SX, INSN ".n Rt, [Rn, Rm]"); } while (0)
/* T32 immediate: .w Rt, [Rn, #imm12] */
#define ST_W(INSN, SZ, B, IMM, VAL) do { u32 _v = (VAL); \
    __asm__ volatile(INSN ".w %0, [%1, #" #IMM "]" \
        :: "r"(_v), "r"(SCRATCH_BASE + (B)) : "memory"); \
    rec_st((B) + (IMM), _v, SZ, INSN ".w Rt, [Rn, #" #IMM "]"); } while (0)
#define LD_W(INSN, SZ, SX, B, IMM) do { u32 _v; \
    __asm__ volatile(INSN ".w %0, [%1, #" #IMM "]" \
        : "=r"(_v) : "r"(SCRATCH_BASE + (B)) : "memory"); \
    rec_ld((B) + (IMM), _v, SZ, SX, INSN ".w Rt, [Rn, #" #IMM "]"); } while (0)
/* T32 negative immediate: Rt, [Rn, #-imm8] (P=1 U=0 W=0). Only a 32-bit encoding
 * exists, so no suffix is needed (clang 14 rejects ".w" on this form). */
#define ST_WN(INSN, SZ, B, IMM, VAL) do { u32 _v = (VAL); \
    __asm__ volatile(INSN " %0, [%1, #" #IMM "]" \
        :: "r"(_v), "r"(SCRATCH_BASE + (B)) : "memory"); \
    rec_st((B) + (IMM), _v, SZ, INSN " Rt, [Rn, #" #IMM "] (T32)"); } while (0)
#define LD_WN(INSN, SZ, SX, B, IMM) do { u32 _v; \
    __asm__ volatile(INSN " %0, [%1, #" #IMM "]" \
        : "=r"(_v) : "r"(SCRATCH_BASE + (B)) : "memory"); \
    rec_ld((B) + (IMM), _v, SZ, SX, INSN " Rt, [Rn, #" #IMM "] (T32)"); } while (0)
/* T32 register: .w Rt, [Rn, Rm, lsl #SH] */
#define ST_WR(INSN, SZ, B, IDX, SH, VAL) do { u32 _v = (VAL); \
    __asm__ volatile(INSN ".w %0, [%1, %2, lsl #" #SH "]" \
        :: "r"(_v), "r"(SCRATCH_BASE + (B)), "r"((u32)(IDX)) : "memory"); \
    rec_st((B) + ((IDX) << (SH)), _v, SZ, INSN ".w Rt, [Rn, Rm, lsl #" #SH "]"); } while (0)
#define LD_WR(INSN, SZ, SX, B, IDX, SH) do { u32 _v; \
    __asm__ volatile(INSN ".w %0, [%1, %2, lsl #" #SH "]" \
        : "=r"(_v) : "r"(SCRATCH_BASE + (B)), "r"((u32)(IDX)) : "memory"); \
    rec_ld((B) + ((IDX) << (SH)), _v, SZ, SX, INSN ".w Rt, [Rn, Rm, lsl #" #SH "]"); } while (0)

static void scratch_test(void)
{
    /* 16-bit immediate forms, every size, top bit set and clear */
    ST_N ("strb",  1,     0, 0x10, 0xa5);
    ST_N ("strb",  1,     0, 0x11, 0x7f);
    LD_N ("ldrb",  1, 0,  0, 0x10);
    LD_N ("ldrb",  1, 0,  0, 0x11);
    ST_N ("strh",  2,     0, 0x20, 0x8001);
    ST_N ("strh",  2,     0, 0x22, 0x7ffe);
    LD_N ("ldrh",  2, 0,  0, 0x20);
    LD_N ("ldrh",  2, 0,  0, 0x22);
    ST_N ("str",   4,     0, 0x30, 0x80000000);
    ST_N ("str",   4,     0, 0x34, 0x12345678);
    LD_N ("ldr",   4, 0,  0, 0x30);
    LD_N ("ldr",   4, 0,  0, 0x20);              /* both halves at once */
    /* 16-bit register forms; LDRSB/LDRSH only exist as register forms in T16 */
    LD_NR("ldrsb", 1, 32, 0, 0x10);
    LD_NR("ldrsb", 1, 32, 0, 0x11);
    LD_NR("ldrsh", 2, 32, 0, 0x20);
    LD_NR("ldrsh", 2, 32, 0, 0x22);
    /* little-endian order: bytes and halves of the word at +0x34 */
    LD_NR("ldrb",  1, 0,  0, 0x34);
    LD_NR("ldrb",  1, 0,  0, 0x35);
    LD_NR("ldrb",  1, 0,  0, 0x36);
    LD_NR("ldrb",  1, 0,  0, 0x37);
    LD_NR("ldrh",  2, 0,  0, 0x34);
    LD_NR("ldrh",  2, 0,  0, 0x36);
    ST_NR("strb",  1,     0, 0x35, 0xee);        /* a byte into the middle of the word */
    LD_NR("ldr",   4, 0,  0, 0x34);
    ST_NR("strh",  2,     0, 0x38, 0x8899);
    ST_NR("str",   4,     0, 0x3c, 0x7fffffff);
    LD_NR("ldrh",  2, 0,  0, 0x38);
    LD_NR("ldrsh", 2, 32, 0, 0x38);
    LD_NR("ldr",   4, 0,  0, 0x3c);

    /* 32-bit Thumb-2 forms, imm12 (positive) from base +0x100 */
    ST_W ("str",   4,     0x100, 0x40, 0x88776655);
    ST_W ("strh",  2,     0x100, 0x44, 0x4433);
    ST_W ("strb",  1,     0x100, 0x46, 0x22);
    ST_W ("strb",  1,     0x100, 0x47, 0x91);
    LD_W ("ldr",   4, 0,  0x100, 0x40);
    LD_W ("ldr",   4, 0,  0x100, 0x44);
    LD_W ("ldrh",  2, 0,  0x100, 0x42);
    LD_W ("ldrsh", 2, 32, 0x100, 0x42);
    LD_W ("ldrsh", 2, 32, 0x100, 0x44);
    LD_W ("ldrb",  1, 0,  0x100, 0x47);
    LD_W ("ldrsb", 1, 32, 0x100, 0x47);
    LD_W ("ldrsb", 1, 32, 0x100, 0x46);
    /* 32-bit Thumb-2, negative imm8 (P=1 U=0 W=0: no writeback) from base +0x160 */
    ST_WN("str",   4,     0x160, -8, 0x80000001);
    ST_WN("strh",  2,     0x160, -4, 0xfff0);
    ST_WN("strb",  1,     0x160, -2, 0x80);
    ST_WN("strb",  1,     0x160, -1, 0x7e);
    LD_WN("ldr",   4, 0,  0x160, -8);
    LD_WN("ldrh",  2, 0,  0x160, -4);
    LD_WN("ldrsh", 2, 32, 0x160, -4);
    LD_WN("ldrb",  1, 0,  0x160, -2);
    LD_WN("ldrsb", 1, 32, 0x160, -2);
    LD_WN("ldrsb", 1, 32, 0x160, -1);
    LD_WN("ldr",   4, 0,  0x160, -4);
    /* 32-bit Thumb-2, register offset with shift, from base +0x200 */
    ST_WR("str",   4,     0x200, 3, 2, 0xcafef00d);
    LD_WR("ldr",   4, 0,  0x200, 3, 2);
    ST_WR("strh",  2,     0x200, 9, 1, 0xfffe);
    LD_WR("ldrh",  2, 0,  0x200, 9, 1);
    LD_WR("ldrsh", 2, 32, 0x200, 9, 1);
    ST_WR("strb",  1,     0x200, 0x20, 0, 0x81);
    LD_WR("ldrb",  1, 0,  0x200, 0x20, 0);
    LD_WR("ldrsb", 1, 32, 0x200, 0x20, 0);
    LD_WR("ldrh",  2, 0,  0x200, 6, 1);          /* low half of the word at +0x20c */
}

static u32 roundtrip(ureg addr, u32 n)
{
    u32 bad = 0;
    for (u32 i = 0; i < n; i++) {
        u32 v;
        __asm__ volatile("str.w %0, [%1]" :: "r"(i), "r"(addr) : "memory");
        __asm__ volatile("ldr.w %0, [%1]" : "=r"(v) : "r"(addr) : "memory");
        bad += (v != i);
    }
    return bad;
}

#else
/* ---- A32 ---------------------------------------------------------------- */

/* immediate offset: LDR/STR{,B} #+-imm12, "extra" LDRH/STRH/LDRSB/LDRSH #+-imm8 */
#define ST_I(INSN, SZ, B, IMM, VAL) do { u32 _v = (VAL); \
    __asm__ volatile(INSN " %0, [%1, #" #IMM "]" \
        :: "r"(_v), "r"(SCRATCH_BASE + (B)) : "memory"); \
    rec_st((B) + (IMM), _v, SZ, INSN " Rt, [Rn, #" #IMM "]"); } while (0)
#define LD_I(INSN, SZ, SX, B, IMM) do { u32 _v; \
    __asm__ volatile(INSN " %0, [%1, #" #IMM "]" \
        : "=r"(_v) : "r"(SCRATCH_BASE + (B)) : "memory"); \
    rec_ld((B) + (IMM), _v, SZ, SX, INSN " Rt, [Rn, #" #IMM "]"); } while (0)
/* register offset: [Rn, Rm] (all forms) */
#define ST_R(INSN, SZ, B, IDX, VAL) do { u32 _v = (VAL); \
    __asm__ volatile(INSN " %0, [%1, %2]" \
        :: "r"(_v), "r"(SCRATCH_BASE + (B)), "r"((u32)(IDX)) : "memory"); \
    rec_st((B) + (IDX), _v, SZ, INSN " Rt, [Rn, Rm]"); } while (0)
#define LD_R(INSN, SZ, SX, B, IDX) do { u32 _v; \
    __asm__ volatile(INSN " %0, [%1, %2]" \
        : "=r"(_v) : "r"(SCRATCH_BASE + (B)), "r"((u32)(IDX)) : "memory"); \
    rec_ld((B) + (IDX), _v, SZ, SX, INSN " Rt, [Rn, Rm]"); } while (0)
/* register offset, subtracted: [Rn, -Rm] */
#define LD_RM(INSN, SZ, SX, B, IDX) do { u32 _v; \
    __asm__ volatile(INSN " %0, [%1, -%2]" \
        : "=r"(_v) : "r"(SCRATCH_BASE + (B)), "r"((u32)(IDX)) : "memory"); \
    rec_ld((B) - (IDX), _v, SZ, SX, INSN " Rt, [Rn, -Rm]"); } while (0)
/* scaled register offset (LDR/STR{,B} only): [Rn, Rm, lsl #SH] */
#define ST_RS(INSN, SZ, B, IDX, SH, VAL) do { u32 _v = (VAL); \
    __asm__ volatile(INSN " %0, [%1, %2, lsl #" #SH "]" \
        :: "r"(_v), "r"(SCRATCH_BASE + (B)), "r"((u32)(IDX)) : "memory"); \
    rec_st((B) + ((IDX) << (SH)), _v, SZ, INSN " Rt, [Rn, Rm, lsl #" #SH "]"); } while (0)
#define LD_RS(INSN, SZ, SX, B, IDX, SH) do { u32 _v; \
    __asm__ volatile(INSN " %0, [%1, %2, lsl #" #SH "]" \
        : "=r"(_v) : "r"(SCRATCH_BASE + (B)), "r"((u32)(IDX)) : "memory"); \
    rec_ld((B) + ((IDX) << (SH)), _v, SZ, SX, INSN " Rt, [Rn, Rm, lsl #" #SH "]"); } while (0)

static void scratch_test(void)
{
    /* immediate offset, every size, top bit set and clear */
    ST_I ("strb",  1,     0, 0x10, 0xa5);
    ST_I ("strb",  1,     0, 0x11, 0x7f);
    LD_I ("ldrb",  1, 0,  0, 0x10);
    LD_I ("ldrb",  1, 0,  0, 0x11);
    LD_I ("ldrsb", 1, 32, 0, 0x10);
    LD_I ("ldrsb", 1, 32, 0, 0x11);
    ST_I ("strh",  2,     0, 0x20, 0x8001);
    ST_I ("strh",  2,     0, 0x22, 0x7ffe);
    LD_I ("ldrh",  2, 0,  0, 0x20);
    LD_I ("ldrsh", 2, 32, 0, 0x20);
    LD_I ("ldrsh", 2, 32, 0, 0x22);
    LD_I ("ldr",   4, 0,  0, 0x20);              /* both halves at once */
    ST_I ("str",   4,     0, 0x30, 0x80000000);
    ST_I ("str",   4,     0, 0x34, 0x12345678);
    LD_I ("ldr",   4, 0,  0, 0x30);
    /* little-endian order: bytes and halves of the word at +0x34 */
    LD_I ("ldrb",  1, 0,  0, 0x34);
    LD_I ("ldrb",  1, 0,  0, 0x35);
    LD_I ("ldrb",  1, 0,  0, 0x36);
    LD_I ("ldrb",  1, 0,  0, 0x37);
    LD_I ("ldrh",  2, 0,  0, 0x34);
    LD_I ("ldrh",  2, 0,  0, 0x36);
    ST_I ("strb",  1,     0, 0x35, 0xee);        /* a byte into the middle of the word */
    LD_I ("ldr",   4, 0,  0, 0x34);

    /* negative immediate offsets from base +0x100 */
    ST_I ("str",   4,     0x100, -8, 0x88776655);
    ST_I ("strh",  2,     0x100, -4, 0xc001);
    ST_I ("strb",  1,     0x100, -2, 0x80);
    ST_I ("strb",  1,     0x100, -1, 0x01);
    LD_I ("ldr",   4, 0,  0x100, -8);
    LD_I ("ldrsh", 2, 32, 0x100, -8);
    LD_I ("ldrsh", 2, 32, 0x100, -6);
    LD_I ("ldrh",  2, 0,  0x100, -4);
    LD_I ("ldrsb", 1, 32, 0x100, -2);
    LD_I ("ldrb",  1, 0,  0x100, -1);
    LD_I ("ldr",   4, 0,  0x100, -4);

    /* register offset from base +0x200 */
    ST_RS("str",   4,     0x200, 3, 2, 0xcafef00d);
    LD_RS("ldr",   4, 0,  0x200, 3, 2);
    LD_R ("ldr",   4, 0,  0x200, 0xc);
    ST_R ("strh",  2,     0x200, 0x12, 0xfffe);
    LD_R ("ldrh",  2, 0,  0x200, 0x12);
    LD_R ("ldrsh", 2, 32, 0x200, 0x12);
    ST_R ("strb",  1,     0x200, 0x20, 0x81);
    ST_RS("strb",  1,     0x200, 0x11, 1, 0x7f);
    LD_R ("ldrb",  1, 0,  0x200, 0x20);
    LD_R ("ldrsb", 1, 32, 0x200, 0x20);
    LD_R ("ldrsb", 1, 32, 0x200, 0x22);
    LD_RS("ldrb",  1, 0,  0x200, 0x11, 1);
    LD_RM("ldr",   4, 0,  0x210, 4);             /* [Rn, -Rm] */
    LD_RM("ldrsh", 2, 32, 0x220, 0xe);
}

static u32 roundtrip(ureg addr, u32 n)
{
    u32 bad = 0;
    for (u32 i = 0; i < n; i++) {
        u32 v;
        __asm__ volatile("str %0, [%1]" :: "r"(i), "r"(addr) : "memory");
        __asm__ volatile("ldr %0, [%1]" : "=r"(v) : "r"(addr) : "memory");
        bad += (v != i);
    }
    return bad;
}
#endif

/* -------------------------------------------------------------------------- */
/* second CPU                                                                 */
/* -------------------------------------------------------------------------- */

void secondary_entry(void); /* start64.S / start32.S; a Thumb function in t32 */

static struct {
    volatile u32 iters;
    volatile u32 mismatches;
    volatile u32 done;
} cpu1;

void secondary_main(ureg ctx);
void secondary_main(ureg ctx)
{
    if (ctx == 1) {
        u32 bad = roundtrip(SCRATCH_BASE + 0x800, ROUNDS);
        cpu1.iters = ROUNDS;
        cpu1.mismatches = bad;
        dmb_ish(); /* results visible before the flag */
        cpu1.done = 1;
    }
    psci_call(PSCI_CPU_OFF, 0, 0, 0);
    for (;;)
        wfi();
}

/* -------------------------------------------------------------------------- */
/* primary CPU                                                                */
/* -------------------------------------------------------------------------- */

static void put_rounds(const char *who, u32 iters, u32 bad)
{
    uart_puts(who);
    uart_putc(' ');
    putudec(iters);
    uart_puts(" round trips, ");
    putudec(bad);
    uart_puts(" mismatches\n");
}

int main(void);
int main(void)
{
    uart_init();
    uart_puts("hello from mmiosplit guest (" BUILD ")\n");

    sreg ver = psci_call(PSCI_VERSION, 0, 0, 0);
    uart_puts("psci version ");
    if (ver < 0) {
        uart_puts("error ");
        putsdec(ver);
    } else {
        putudec((u32)ver >> 16);
        uart_putc('.');
        putudec((u32)ver & 0xffff);
    }
    uart_putc('\n');

    scratch_test();
    if (nbad) {
        uart_puts("scratch MISMATCH ");
        putudec(nbad);
        uart_putc('\n');
    } else {
        uart_puts("scratch ok\n");
    }

    /* second CPU: target MPIDR 1, context id 1 (CPUs are told apart by it) */
    sreg on = psci_call(PSCI_CPU_ON, 1, (ureg)secondary_entry, 1);

    u32 bad0 = roundtrip(SCRATCH_BASE + 0x900, ROUNDS);
    put_rounds("cpu0", ROUNDS, bad0);

    if (on == 0) {
        u32 spin;
        for (spin = 0; spin < SPIN_LIMIT; spin++)
            if (cpu1.done)
                break;
        if (spin == SPIN_LIMIT) {
            uart_puts("cpu1 timeout\n");
        } else {
            dmb_ish(); /* flag before results */
            put_rounds("cpu1", cpu1.iters, cpu1.mismatches);
        }
    } else {
        uart_puts("cpu1 not started (psci ");
        putsdec(on);
        uart_puts(")\n");
    }

    uart_puts("bye\n");
    psci_call(PSCI_SYSTEM_OFF, 0, 0, 0);
    for (;;)
        wfi();
}
