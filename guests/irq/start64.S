/*
 * start64.S -- AArch64 (EL1) entry points and exception vectors for the
 * interrupt guests. The image runs from flash at address 0.
 *
 * _start          : CPU 0 out of reset at 0 (EL1h, DAIF masked). Copies
 *                   .data from flash to RAM, clears .bss, then main(0).
 * secondary_entry : entry point given to PSCI CPU_ON; x0 = context id,
 *                   which must be the CPU number (it picks the stack).
 *                   A RAM trampoline (copied with .data) that jumps to
 *                   secondary_start in flash: QEMU's PSCI takes an entry
 *                   point in flash, but a CPU_ON entry outside RAM is
 *                   something a VMM may refuse (mmiosplit does), and the
 *                   guests are about interrupts, not that.
 *
 * Both keep the CPU number (0, or the context id) in TPIDR_EL1 for cpu_id(),
 * set VBAR_EL1 to the vector table below and call C with IRQs still
 * masked. Only the "current EL with SP_ELx" IRQ and FIQ vectors (+0x280, +0x300) are used; every
 * other vector reports an unexpected exception and powers off. No access
 * here touches a device, and no load/store writes back its base register.
 */
        .equ    STACK_SHIFT, 14                 /* 16 KiB per CPU, as link.ld */
        .equ    MAX_CPUS, 2

        .section .text.start, "ax"
        .global _start
        .type   _start, %function
_start:
        ldr     x1, =__data_load
        ldr     x2, =__data_start
        ldr     x3, =__data_end
1:      cmp     x2, x3
        b.hs    2f
        ldr     x4, [x1]
        str     x4, [x2]
        add     x1, x1, #8
        add     x2, x2, #8
        b       1b
2:      ldr     x2, =__bss_start
        ldr     x3, =__bss_end
3:      cmp     x2, x3
        b.hs    4f
        str     xzr, [x2]
        add     x2, x2, #8
        b       3b
4:      ic      iallu                           /* code was copied (the trampoline) */
        dsb     sy
        isb
        mov     x0, #0
        ldr     x30, =main
        b       cpu_entry_common
        .size   _start, . - _start

        .type   secondary_start, %function
secondary_start:
        ldr     x30, =secondary_main
cpu_entry_common:
        cmp     x0, #MAX_CPUS
        b.hs    park                            /* no stack for it */
        ldr     x1, =__stacks_start
        add     x2, x0, #1
        lsl     x2, x2, #STACK_SHIFT
        add     x1, x1, x2
        mov     sp, x1
        msr     tpidr_el1, x0                   /* cpu_id() */
        ldr     x1, =vectors
        msr     vbar_el1, x1
        isb
        blr     x30                             /* main(0) / secondary_main(ctx) */
park:   msr     daifset, #0xf
        wfi
        b       park
        .size   secondary_start, . - secondary_start
        .ltorg

/* in RAM (.ramtext, copied with .data): the address given to PSCI CPU_ON */
        .section .ramtext, "awx"
        .balign 8
        .global secondary_entry
        .type   secondary_entry, %function
secondary_entry:
        ldr     x1, 1f
        br      x1
        .balign 8
1:      .quad   secondary_start
        .size   secondary_entry, . - secondary_entry

/* -------------------------------------------------------------------------- */
/* vectors: 16 entries of 0x80 bytes, table aligned to 2 KiB                 */
/* -------------------------------------------------------------------------- */

        .macro  unexpected n
        .balign 0x80
        mov     x0, #\n
        b       unexpected_entry
        .endm

        .section .text.vectors, "ax"
        .balign 0x800
        .global vectors
vectors:
        unexpected 0                            /* current EL, SP_EL0: sync */
        unexpected 1                            /* IRQ */
        unexpected 2                            /* FIQ */
        unexpected 3                            /* SError */
        unexpected 4                            /* current EL, SP_ELx: sync */
        .balign 0x80                            /* +0x280: IRQ, current EL, SP_ELx */
        b       irq_entry
        .balign 0x80                            /* +0x300: FIQ, current EL, SP_ELx (the fiq guest) */
        b       fiq_entry
        unexpected 7                            /* SError */
        unexpected 8                            /* lower EL, AArch64 */
        unexpected 9
        unexpected 10
        unexpected 11
        unexpected 12                           /* lower EL, AArch32 */
        unexpected 13
        unexpected 14
        unexpected 15
        .balign 0x80

/* IRQ and FIQ: save the caller-saved registers, irq_dispatch() or
 * fiq_dispatch(), restore, eret. The interrupt stays masked throughout
 * (PSTATE.I, or PSTATE.F, is set on entry): no nesting of one kind, so
 * ELR_EL1 and SPSR_EL1 need no saving. */
        .macro  interrupt_entry name, dispatch
\name:
        sub     sp, sp, #(22 * 8)
        stp     x0, x1, [sp, #(0 * 8)]
        stp     x2, x3, [sp, #(2 * 8)]
        stp     x4, x5, [sp, #(4 * 8)]
        stp     x6, x7, [sp, #(6 * 8)]
        stp     x8, x9, [sp, #(8 * 8)]
        stp     x10, x11, [sp, #(10 * 8)]
        stp     x12, x13, [sp, #(12 * 8)]
        stp     x14, x15, [sp, #(14 * 8)]
        stp     x16, x17, [sp, #(16 * 8)]
        stp     x18, x29, [sp, #(18 * 8)]
        str     x30, [sp, #(20 * 8)]
        bl      \dispatch
        ldp     x0, x1, [sp, #(0 * 8)]
        ldp     x2, x3, [sp, #(2 * 8)]
        ldp     x4, x5, [sp, #(4 * 8)]
        ldp     x6, x7, [sp, #(6 * 8)]
        ldp     x8, x9, [sp, #(8 * 8)]
        ldp     x10, x11, [sp, #(10 * 8)]
        ldp     x12, x13, [sp, #(12 * 8)]
        ldp     x14, x15, [sp, #(14 * 8)]
        ldp     x16, x17, [sp, #(16 * 8)]
        ldp     x18, x29, [sp, #(18 * 8)]
        ldr     x30, [sp, #(20 * 8)]
        add     sp, sp, #(22 * 8)
        eret
        .endm
        interrupt_entry irq_entry, irq_dispatch
        interrupt_entry fiq_entry, fiq_dispatch

/* unexpected_exception(vector index, ESR_EL1, ELR_EL1) prints and powers off */
unexpected_entry:
        mrs     x1, esr_el1
        mrs     x2, elr_el1
        bl      unexpected_exception
        b       park
