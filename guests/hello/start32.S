/*
 * start32.S -- AArch32 entry points for the mmiosplit "hello" guest.
 *
 * Assembled as ARM (A32) code for the a32 build and as Thumb-2 (T32) code
 * for the t32 build (-mthumb defines __thumb__). In the t32 build the image
 * starts in Thumb state: _start is a Thumb function, so the ELF entry is
 * 0x40080001 and the vcpu service must start the CPU with CPSR.T = 1.
 *
 * _start          : primary CPU, entered at 0x40080000 (SVC mode) with all
 *                   general registers 0 and SP unset.
 * secondary_entry : entry point passed to PSCI CPU_ON (its address has
 *                   bit 0 set in the t32 build); r0 = context id.
 *
 * Both pick a private 16 KiB stack from the context id (0 for the primary)
 * and call into C: main(0) / secondary_main(ctx). Only RAM is touched here,
 * never a device, so any load/store form is fine in this file.
 */
        .syntax unified
        .arch_extension virt
#ifdef __thumb__
        .thumb
#define FUNC(name) .global name; .type name, %function; .thumb_func; name:
#else
        .arm
#define FUNC(name) .global name; .type name, %function; name:
#endif
        .equ    STACK_SHIFT, 14                 /* 16 KiB, keep in sync with link.ld */
        .equ    MAX_CPUS, 2

        .section .text.start, "ax"
FUNC(_start)
        /* clear .bss (RAM only) */
        ldr     r1, =__bss_start
        ldr     r2, =__bss_end
        movs    r3, #0
1:      cmp     r1, r2
        bhs     2f
        str     r3, [r1], #4
        b       1b
2:      movs    r0, #0                          /* primary: context id 0 */
        ldr     r4, =main
        b       cpu_entry_common
        .size   _start, . - _start

FUNC(secondary_entry)
        /* r0 = PSCI context id, everything else 0, SP unset */
        ldr     r4, =secondary_main
        /* fall through */
cpu_entry_common:
        cmp     r0, #MAX_CPUS
        bhs     park                            /* unknown context id: no stack for it */
        ldr     r1, =__stacks_start
        adds    r2, r0, #1
        lsls    r2, r2, #STACK_SHIFT
        adds    r1, r1, r2
        mov     sp, r1
        blx     r4                              /* main(ctx) / secondary_main(ctx); r4 has bit 0 set for Thumb */
park:   wfi
        b       park
        .size   secondary_entry, . - secondary_entry
        .ltorg
