"""Exception entry by hand: what the CPU does when it takes an exception, done on a stopped Unicorn vCPU.

Unicorn 2.1.4 delivers no exception to the guest while a ``UC_HOOK_INTR`` hook is installed and has no API to
raise an interrupt (docs/guest-exceptions.md), so the vcpu service enters the guest's vectors itself. Every
exception goes through one routine per architecture, ``_enter_a64`` or ``_enter_a32``, which follows QEMU's
``arm_cpu_do_interrupt_aarch64`` / ``take_aarch32_exception`` (Unicorn's own copy, target/arm/helper.c):

* AArch64, taken to EL1 from EL0 or EL1: ESR_EL1 (synchronous exceptions only), FAR_EL1 (aborts only),
  ELR_EL1 = the preferred return address, SPSR_EL1 = the old PSTATE, PSTATE = EL1h with D, A, I and F set
  (QEMU's ``pstate_write(PSTATE_DAIF | mode)``: NZCV reads as zero in the handler), the stack pointer switched
  to SP_EL1, PC = VBAR_EL1 + group + kind, where the group is 0x000 (current EL with SP0), 0x200 (current EL
  with SPx), 0x400 (lower EL, AArch64) and the kind 0x000 synchronous, 0x080 IRQ, 0x100 FIQ, 0x180 SError.
* AArch32, taken from User or SVC (any PL1 mode but Monitor and Hyp) to the mode of the exception: the banked
  LR = the return link, the banked SPSR = the old CPSR, CPSR.M = the mode, I (and A, F as the kind says) set,
  IT, J, IL cleared, T = SCTLR.TE, E = SCTLR.EE, PC = (SCTLR.V ? 0xffff0000 : VBAR) + the vector offset.

Unicorn facts this relies on (checked in its source and by the tests in tests/unit/test_exceptions.py):
* ``uc_reg_write(PSTATE)`` is ``pstate_write``: it neither saves nor restores the banked stack pointer and does
  not rebuild the cached hflags (the EL the translator uses). Writing a system register through
  ``UC_ARM64_REG_CP_REG`` does rebuild them, so SPSR_EL1 is written after PSTATE.
* ``uc_reg_write(CPSR)`` is ``cpsr_write(..., CPSRWriteByUnicorn)``: a mode change banks SP, LR and SPSR (and
  r8-r12 for FIQ), so LR and SPSR written after it are the new mode's. ``uc_reg_write(PC)`` takes the Thumb state
  from bit 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from unicorn import Uc
from unicorn import arm64_const as a64
from unicorn import arm_const as a32

from vcpu_service import fastreg
from vcpu_service.arch import AArch64, Arch, ArchError

MASK32 = 0xFFFF_FFFF
MASK64 = 0xFFFF_FFFF_FFFF_FFFF

# ----- AArch64 ---------------------------------------------------------------------------------------------

# The kind of exception: the offset inside a group of the vector table.
A64_SYNC = 0x000
A64_IRQ = 0x080
A64_FIQ = 0x100
A64_SERROR = 0x180

PSTATE_F = 1 << 6
PSTATE_I = 1 << 7
PSTATE_SP = 1 << 0
PSTATE_PAN = 1 << 22
PSTATE_DAIF = 0xF << 6
PSTATE_EL1H = 0b0101
SCTLR_SPAN = 1 << 23


def _spsr_el1_write(uc: Uc, value: int) -> None:
    uc.cpr_write(3, 0, 4, 0, 0, value)  # type: ignore[attr-defined]  # SPSR_EL1


def _has_pan(uc: Uc) -> bool:
    """ID_AA64MMFR1_EL1.PAN: FEAT_PAN (``max``; not the Cortex-A57/A53/A72)."""
    return bool((int(uc.cpr_read(3, 0, 0, 7, 1)) >> 20) & 0xF)  # type: ignore[attr-defined]


def a64_vector_group(pstate: int) -> int:
    """The group of VBAR_EL1's table an exception taken to EL1 uses, from the PSTATE it is taken from."""
    el = (pstate >> 2) & 3
    if el == 0:
        return 0x400  # lower EL, AArch64 (an AArch32 EL0 would be 0x600: not supported by this service)
    return 0x200 if pstate & PSTATE_SP else 0x000


def _enter_a64(uc: Uc, kind: int, return_address: int, esr: int | None = None, far: int | None = None) -> int:
    """Take an exception to EL1 (AArch64); returns the vector address, which is also the new PC."""
    pstate = fastreg.reg_read(uc, a64.UC_ARM64_REG_PSTATE)
    el = (pstate >> 2) & 3
    if el > 1:
        raise ArchError(f"cannot take an exception to EL1 from EL{el}: only guests at EL0/EL1 are supported")
    if pstate & (1 << 4):
        raise ArchError("cannot take an exception from AArch32 EL0 on an AArch64 vCPU: not supported")
    vector = (int(uc.reg_read(a64.UC_ARM64_REG_VBAR_EL1)) + a64_vector_group(pstate) + kind) & MASK64
    new_pstate = PSTATE_DAIF | PSTATE_EL1H
    if _has_pan(uc):  # PAN is kept, and set when SCTLR_EL1.SPAN is 0 (QEMU's aa64_pan case)
        new_pstate |= pstate & PSTATE_PAN
        if not fastreg.sctlr_el1(uc) & SCTLR_SPAN:
            new_pstate |= PSTATE_PAN
    # The stack pointer is banked: entering EL1h from EL0 or EL1t moves from SP_EL0 to SP_EL1. Unicorn keeps the
    # current one in SP and the other in SP_ELn, and a PSTATE write does not switch them.
    switch_sp = not (el == 1 and pstate & PSTATE_SP)
    if switch_sp:
        uc.reg_write(a64.UC_ARM64_REG_SP_EL0, fastreg.reg_read(uc, a64.UC_ARM64_REG_SP))
        new_sp = int(uc.reg_read(a64.UC_ARM64_REG_SP_EL1))
    if esr is not None:
        uc.reg_write(a64.UC_ARM64_REG_ESR_EL1, esr)
    if far is not None:
        uc.reg_write(a64.UC_ARM64_REG_FAR_EL1, far & MASK64)
    uc.reg_write(a64.UC_ARM64_REG_ELR_EL1, return_address & MASK64)
    fastreg.reg_write(uc, a64.UC_ARM64_REG_PSTATE, new_pstate)
    # SPSR_EL1 after PSTATE: the CP-register write rebuilds Unicorn's cached hflags for EL1 (see the module doc).
    _spsr_el1_write(uc, pstate)
    if switch_sp:
        fastreg.reg_write(uc, a64.UC_ARM64_REG_SP, new_sp)
    fastreg.reg_write(uc, a64.UC_ARM64_REG_PC, vector)
    return vector


# ----- AArch32 ---------------------------------------------------------------------------------------------

MODE_USR = 0x10
MODE_FIQ = 0x11
MODE_IRQ = 0x12
MODE_SVC = 0x13
MODE_MON = 0x16
MODE_ABT = 0x17
MODE_HYP = 0x1A
MODE_UND = 0x1B
MODE_SYS = 0x1F
MODE_NAMES = {MODE_USR: "User", MODE_FIQ: "FIQ", MODE_IRQ: "IRQ", MODE_SVC: "Supervisor", MODE_MON: "Monitor",
              MODE_ABT: "Abort", MODE_HYP: "Hyp", MODE_UND: "Undefined", MODE_SYS: "System"}

CPSR_T = 1 << 5
CPSR_F = 1 << 6
CPSR_I = 1 << 7
CPSR_A = 1 << 8
CPSR_E = 1 << 9
CPSR_IT = (0x3 << 25) | (0x3F << 10)
CPSR_J = 1 << 24
CPSR_IL = 1 << 20
CPSR_SS = 1 << 21
CPSR_PAN = 1 << 22
CPSR_M = 0x1F
SCTLR_V = 1 << 13
SCTLR_EE = 1 << 25
SCTLR_TE = 1 << 30


@dataclass(frozen=True, slots=True)
class A32Kind:
    """One AArch32 exception: the mode it is taken to, its vector offset, the CPSR mask bits it sets."""

    name: str
    mode: int
    offset: int
    mask: int


A32_UNDEF = A32Kind("undefined instruction", MODE_UND, 0x04, CPSR_I)
A32_SVC = A32Kind("supervisor call", MODE_SVC, 0x08, CPSR_I)
A32_PREFETCH_ABORT = A32Kind("prefetch abort", MODE_ABT, 0x0C, CPSR_A | CPSR_I)
A32_DATA_ABORT = A32Kind("data abort", MODE_ABT, 0x10, CPSR_A | CPSR_I)
A32_IRQ = A32Kind("IRQ", MODE_IRQ, 0x18, CPSR_A | CPSR_I)
A32_FIQ = A32Kind("FIQ", MODE_FIQ, 0x1C, CPSR_A | CPSR_I | CPSR_F)


def cp15_read(uc: Uc, crn: int, crm: int, opc2: int, opc1: int = 0) -> int:
    """A 32-bit CP15 register, the Non-secure bank (the one a guest running with SCR.NS=1 sees)."""
    return int(uc.cpr_read(15, opc1, crn, crm, opc2, 0, False))  # type: ignore[attr-defined]


def cp15_write(uc: Uc, crn: int, crm: int, opc2: int, value: int, opc1: int = 0) -> None:
    uc.cpr_write(15, opc1, crn, crm, opc2, 0, False, value & MASK32)  # type: ignore[attr-defined]


def _has_aa32_pan(uc: Uc) -> bool:
    """ID_MMFR3.PAN (bits 19:16): FEAT_PAN in AArch32 (``max`` only)."""
    return bool((cp15_read(uc, 0, 1, 7) >> 16) & 0xF)


def _enter_a32(uc: Uc, kind: A32Kind, link: int) -> int:
    """Take an AArch32 exception to ``kind.mode`` with LR_mode = ``link``; returns the vector (the new PC)."""
    cpsr = fastreg.reg_read(uc, a32.UC_ARM_REG_CPSR)
    mode = cpsr & CPSR_M
    if mode in (MODE_HYP, MODE_MON):
        raise ArchError(f"cannot take an exception from {MODE_NAMES[mode]} mode: only PL0/PL1 guests are supported")
    sctlr = cp15_read(uc, 1, 0, 0)
    spsr = cpsr & ~CPSR_SS
    new = cpsr & ~(CPSR_M | CPSR_IT | CPSR_J | CPSR_IL | CPSR_SS | CPSR_E | CPSR_T)
    new |= kind.mode | kind.mask
    if sctlr & SCTLR_EE:
        new |= CPSR_E
    if sctlr & SCTLR_TE:
        new |= CPSR_T
    if _has_aa32_pan(uc) and not sctlr & SCTLR_SPAN:
        new |= CPSR_PAN
    # The mode change banks LR and SPSR: the two writes after it land in LR_<mode> and SPSR_<mode>.
    fastreg.reg_write(uc, a32.UC_ARM_REG_CPSR, new)
    fastreg.reg_write(uc, a32.UC_ARM_REG_LR, link & MASK32)
    fastreg.reg_write(uc, a32.UC_ARM_REG_SPSR, spsr)
    base = 0xFFFF_0000 if sctlr & SCTLR_V else cp15_read(uc, 12, 0, 0) & ~0x1F
    vector = (base + kind.offset) & MASK32
    fastreg.reg_write(uc, a32.UC_ARM_REG_PC, vector | int(bool(new & CPSR_T)))
    return vector


# ----- interrupts ------------------------------------------------------------------------------------------

def irq_masked(arch: Arch, uc: Uc, fiq: bool = False) -> bool:
    """Whether the vCPU masks IRQs now (FIQs with ``fiq``): PSTATE.I (F) on AArch64, CPSR.I (F) on AArch32."""
    bit = PSTATE_F if fiq else PSTATE_I  # the same bit positions in PSTATE's DAIF and the CPSR
    reg = a64.UC_ARM64_REG_PSTATE if isinstance(arch, AArch64) else a32.UC_ARM_REG_CPSR
    return bool(fastreg.reg_read(uc, reg) & bit)


def take_irq(arch: Arch, uc: Uc, fiq: bool = False) -> int:
    """Take an IRQ (or FIQ) now, between two instructions: the one at PC has not run and is where the handler
    returns to. Returns the new PC (the vector; on AArch32 without the Thumb bit). The caller checks the mask
    (``irq_masked``) and restarts the vCPU at the new PC (``Arch.start_address``).

    AArch64: ELR_EL1 = PC, vector + 0x080 (IRQ) or 0x100 (FIQ) in the group of the current state; ESR_EL1 is
    not written. AArch32: IRQ (FIQ) mode, LR = PC + 4 in ARM and Thumb state alike (handlers return with
    ``SUBS PC, LR, #4``), SPSR = CPSR, I and A (and F for an FIQ) set, vector + 0x18 (0x1C).
    """
    pc = arch.pc(uc)
    if isinstance(arch, AArch64):
        return _enter_a64(uc, A64_FIQ if fiq else A64_IRQ, pc)
    return _enter_a32(uc, A32_FIQ if fiq else A32_IRQ, pc + 4)
