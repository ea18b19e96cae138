/*
 * start64.S -- AArch64 entry points for the mmiosplit "hello" guest.
 *
 * _start          : primary CPU, entered at 0x40080000 at EL1 with all
 *                   general registers 0 and SP unset.
 * secondary_entry : entry point passed to PSCI CPU_ON; x0 = context id.
 *
 * Both pick a private 16 KiB stack from the context id (0 for the primary)
 * and call into C: main(0) / secondary_main(ctx). Only RAM is touched here,
 * never a device, so any load/store form is fine in this file.
 */
        .equ    STACK_SHIFT, 14                 /* 16 KiB, keep in sync with link.ld */
        .equ    MAX_CPUS, 2

        .section .text.start, "ax"
        .global _start
        .type   _start, %function
_start:
        /* clear .bss (RAM only) */
        ldr     x1, =__bss_start
        ldr     x2, =__bss_end
1:      cmp     x1, x2
        b.hs    2f
        str     xzr, [x1], #8
        b       1b
2:      mov     x0, #0                          /* primary: context id 0 */
        ldr     x30, =main
        b       cpu_entry_common
        .size   _start, . - _start

        .global secondary_entry
        .type   secondary_entry, %function
secondary_entry:
        /* x0 = PSCI context id, everything else 0, SP unset */
        ldr     x30, =secondary_main
        /* fall through */
cpu_entry_common:
        cmp     x0, #MAX_CPUS
        b.hs    park                            /* unknown context id: no stack for it */
        ldr     x1, =__stacks_start
        add     x2, x0, #1
        lsl     x2, x2, #STACK_SHIFT
        add     x1, x1, x2
        mov     sp, x1
        blr     x30                             /* main(ctx) / secondary_main(ctx) */
park:   wfi
        b       park
        .size   secondary_entry, . - secondary_entry
        .ltorg
