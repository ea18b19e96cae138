/*
 * start32.S -- AArch32 (ARM state, SVC mode) entry points and exception
 * vectors for the interrupt guests. The image runs from flash at address 0.
 *
 * _start          : CPU 0 out of reset at 0 (SVC mode, I/F/A masked).
 *                   Copies .data from flash to RAM, clears .bss, main(0).
 * secondary_entry : entry point given to PSCI CPU_ON; r0 = context id,
 *                   which must be the CPU number (it picks the stacks).
 *                   A RAM trampoline (copied with .data) that jumps to
 *                   secondary_start in flash (see start64.S for why).
 *
 * The CPU number (0, or the context id) is kept in TPIDRPRW for cpu_id().
 * Each CPU's 16 KiB stack block: SVC stack at the top, IRQ-mode stack in the
 * low 4 KiB, FIQ-mode stack in the next 4 KiB. VBAR points at the table below
 * (SCTLR.V = 0): IRQ at +0x18 and FIQ at +0x1c, returning with the equivalent
 * of `subs pc, lr, #4`. Every other vector reports an unexpected exception
 * and powers off.
 */
        .syntax unified
        .arm
        .equ    STACK_SHIFT, 14                 /* 16 KiB per CPU, as link.ld */
        .equ    IRQ_STACK, 0x1000
        .equ    FIQ_STACK, 0x2000
        .equ    MAX_CPUS, 2
        .equ    MODE_FIQ, 0x11
        .equ    MODE_IRQ, 0x12
        .equ    MODE_SVC, 0x13

        .section .text.start, "ax"
        .global _start
        .type   _start, %function
_start:
        ldr     r1, =__data_load
        ldr     r2, =__data_start
        ldr     r3, =__data_end
1:      cmp     r2, r3
        bhs     2f
        ldr     r4, [r1]
        str     r4, [r2]
        add     r1, r1, #4
        add     r2, r2, #4
        b       1b
2:      ldr     r2, =__bss_start
        ldr     r3, =__bss_end
        mov     r4, #0
3:      cmp     r2, r3
        bhs     4f
        str     r4, [r2]
        add     r2, r2, #4
        b       3b
4:      mcr     p15, 0, r4, c7, c5, 0           /* ICIALLU: code was copied (the trampoline) */
        dsb     sy
        isb
        mov     r0, #0
        ldr     r4, =main
        b       cpu_entry_common
        .size   _start, . - _start

        .type   secondary_start, %function
secondary_start:
        ldr     r4, =secondary_main
cpu_entry_common:
        cmp     r0, #MAX_CPUS
        bhs     park                            /* no stack for it */
        ldr     r1, =__stacks_start
        lsl     r2, r0, #STACK_SHIFT
        add     r1, r1, r2                      /* bottom of this CPU's block */
        add     r2, r1, #IRQ_STACK
        cps     #MODE_IRQ
        mov     sp, r2
        add     r2, r1, #FIQ_STACK
        cps     #MODE_FIQ
        mov     sp, r2
        cps     #MODE_SVC
        add     r2, r1, #(1 << STACK_SHIFT)
        mov     sp, r2
        mcr     p15, 0, r0, c13, c0, 4          /* TPIDRPRW: cpu_id() */
        ldr     r1, =vectors
        mcr     p15, 0, r1, c12, c0, 0          /* VBAR */
        isb
        blx     r4                              /* main(0) / secondary_main(ctx) */
park:   cpsid   aif
        wfi
        b       park
        .size   secondary_start, . - secondary_start
        .ltorg

/* in RAM (.ramtext, copied with .data): the address given to PSCI CPU_ON */
        .section .ramtext, "awx"
        .balign 4
        .global secondary_entry
        .type   secondary_entry, %function
secondary_entry:
        ldr     pc, 1f
1:      .word   secondary_start
        .size   secondary_entry, . - secondary_entry

/* -------------------------------------------------------------------------- */
/* vectors (VBAR needs 32-byte alignment)                                    */
/* -------------------------------------------------------------------------- */

        .section .text.vectors, "ax"
        .balign 32
        .global vectors
vectors:
        b       unexpected_reset                /* +0x00 reset */
        b       unexpected_undef                /* +0x04 undefined instruction */
        b       unexpected_svc                  /* +0x08 SVC */
        b       unexpected_pabt                 /* +0x0c prefetch abort */
        b       unexpected_dabt                 /* +0x10 data abort */
        b       unexpected_hyp                  /* +0x14 (hyp trap, unused) */
        b       irq_entry                       /* +0x18 IRQ */
        b       fiq_entry                       /* +0x1c FIQ (the fiq guest) */

/* IRQ mode, IRQs masked (CPSR.I set on entry), or FIQ mode, FIQs and IRQs masked: no nesting. */
        .macro  interrupt_entry name, dispatch
\name:
        sub     lr, lr, #4                      /* preferred return address */
        push    {r0-r3, r12, lr}                /* 24 bytes: SP stays 8-byte aligned */
        bl      \dispatch
        ldm     sp!, {r0-r3, r12, pc}^          /* return and restore CPSR from SPSR */
        .endm
        interrupt_entry irq_entry, irq_dispatch
        interrupt_entry fiq_entry, fiq_dispatch

        .macro  unexpected name, n
\name:
        mov     r0, #\n
        b       unexpected_common
        .endm
        unexpected unexpected_reset, 0
        unexpected unexpected_undef, 1
        unexpected unexpected_svc, 2
        unexpected unexpected_pabt, 3
        unexpected unexpected_dabt, 4
        unexpected unexpected_hyp, 5

/* unexpected_exception(vector offset / 4, mode's SPSR, mode's LR), on the SVC stack */
unexpected_common:
        mrs     r1, spsr
        mov     r2, lr
        cps     #MODE_SVC
        bl      unexpected_exception
        b       park
        .ltorg
