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

import ctypes
import struct
import threading
from dataclasses import dataclass

from unicorn import UC_HOOK_INTR, UC_PROT_ALL, Uc
from unicorn import arm64_const as a64
from unicorn import arm_const as a32

from vcpu_service import fastreg
from vcpu_service.arch import (
    DFSC_SYNC_EXTERNAL,
    EC_DABT_CUR,
    EC_DABT_LOW,
    EXCEPTION_NAMES,
    EXCP_BKPT,
    EXCP_DATA_ABORT,
    EXCP_PREFETCH_ABORT,
    EXCP_SMC,
    EXCP_SWI,
    EXCP_UDEF,
    AArch64,
    Arch,
    ArchError,
    close_uc,
)

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


# ----- what Unicorn knows about the exception it raised ------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Raised:
    """QEMU's ``env->exception`` for the exception Unicorn just reported: what ``raise_exception`` computed before
    Unicorn called the UC_HOOK_INTR hook instead of ``arm_cpu_do_interrupt``.

    ``syndrome`` is the ESR_ELx value (EC, IL, ISS) QEMU would write; ``fsr`` the DFSR/IFSR value for an AArch32
    target (short-descriptor or LPAE format as TTBCR.EAE says); ``vaddress`` the FAR/DFAR/IFAR value;
    ``target_el`` the exception level QEMU routed it to.
    """

    syndrome: int
    fsr: int
    vaddress: int
    target_el: int


# ``struct { uint32_t syndrome; uint32_t fsr; uint64_t vaddress; uint32_t target_el; } exception`` (target/arm/cpu.h)
_RAISED = struct.Struct("<IIQI")
_PROBE_IMMS = (0x5A5A, 0x1234)
_offsets: dict[str, int] = {}
_offsets_lock = threading.Lock()


class RaisedUnavailable(ArchError):
    """This libunicorn's saved context does not hold ``env->exception`` where the calibration expects it."""


def _probe_syndrome(arch: Arch, imm: int) -> tuple[bytes, int]:
    """Run ``SVC #imm`` on a scratch CPU of ``arch``; return its saved context and the syndrome QEMU gives it."""
    uc = arch.new_uc("")
    try:
        uc.mem_map(0x1000, 0x1000, UC_PROT_ALL)
        if isinstance(arch, AArch64):
            uc.mem_write(0x1000, struct.pack("<I", 0xD4000001 | imm << 5))  # svc #imm
            syndrome = 0x15 << 26 | 1 << 25 | imm  # syn_aa64_svc
        else:
            uc.mem_write(0x1000, struct.pack("<I", 0xEF000000 | imm))  # svc #imm
            syndrome = 0x11 << 26 | 1 << 25 | imm  # syn_aa32_svc (imm16 of the 24-bit comment)
        saved: list[bytes] = []

        def hook(uc: Uc, _intno: int, _user: object) -> None:
            saved.append(_context_bytes(uc))
            uc.emu_stop()

        uc.hook_add(UC_HOOK_INTR, hook)
        uc.emu_start(0x1000, 0x1004, 0, 1)
        if not saved:
            raise RaisedUnavailable("the calibration SVC raised no exception")
        return saved[0], syndrome
    finally:
        close_uc(uc)


def _context_bytes(uc: Uc, length: int | None = None) -> bytes:
    context = uc.context_save()
    return ctypes.string_at(context.context.value, context.size if length is None else length)


def _raised_offset(arch: Arch) -> int:
    """Where ``env->exception`` sits in a saved context of ``arch``, found once by raising known SVCs."""
    offset = _offsets.get(arch.name)
    if offset is not None:
        return offset
    with _offsets_lock:
        if arch.name in _offsets:
            return _offsets[arch.name]
        candidates: set[int] | None = None
        for imm in _PROBE_IMMS:
            blob, syndrome = _probe_syndrome(arch, imm)
            needle = struct.pack("<I", syndrome)
            found = {i for i in range(0, len(blob) - _RAISED.size, 4) if blob[i:i + 4] == needle
                     and _RAISED.unpack_from(blob, i)[3] == 1}
            candidates = found if candidates is None else candidates & found
        if not candidates or len(candidates) != 1:
            raise RaisedUnavailable(f"cannot locate env->exception in this libunicorn's {arch.name} context "
                                    f"(candidates {sorted(candidates or ())})")
        offset = _offsets[arch.name] = candidates.pop()
        return offset


def raised(arch: Arch, uc: Uc) -> Raised:
    """The syndrome, fault status and address of the exception Unicorn last raised on ``uc``.

    Unicorn has no API for them; its saved CPU context is a copy of ``CPUARMState``, which holds them, and their
    place in it is found once per architecture by raising two SVCs with known syndromes (``_raised_offset``).
    """
    offset = _raised_offset(arch)
    return Raised(*_RAISED.unpack(_context_bytes(uc, offset + _RAISED.size)[offset:]))


# ----- synchronous exceptions ------------------------------------------------------------------------------

EC_UNKNOWN = 0x00
IL_BIT = 1 << 25
EC_SVC64 = 0x15
EC_HVC64 = 0x16
EC_IABT_LOW = 0x20
EC_IABT_CUR = 0x21
EC_BRK64 = 0x3C
DFSC_ALIGNMENT = 0x21
# AArch32 fault status: short-descriptor FS (FS[4] is DFSR bit 10) and LPAE (bit 9 set, STATUS in 5:0).
FSR_LPAE = 1 << 9
FSR_WNR = 1 << 11
FS_SHORT_ALIGNMENT = 0x01
FS_SHORT_SYNC_EXTERNAL = 0x08

EXCEPTION_KINDS = {EXCP_UDEF, EXCP_SWI, EXCP_PREFETCH_ABORT, EXCP_DATA_ABORT, EXCP_BKPT, EXCP_SMC}


@dataclass(frozen=True, slots=True)
class Taken:
    """An exception entered: what it was, where it came from and went to, and what the handler will see."""

    name: str
    pc: int  # the instruction that raised it (the SVC itself, although Unicorn reports the one after it)
    vector: int
    syndrome: int  # ESR_EL1, or the DFSR/IFSR written (0 when the exception writes none)
    address: int | None  # FAR_EL1 / DFAR / IFAR written, if any
    return_address: int  # ELR_EL1, or LR_<mode>

    def describe(self) -> str:
        fault = f", address 0x{self.address:x}" if self.address is not None else ""
        return f"{self.name} at 0x{self.pc:x} (syndrome 0x{self.syndrome:x}{fault}) to its vector 0x{self.vector:x}"


def _a32_link(kind: A32Kind, pc: int, thumb: bool) -> int:
    """LR_<mode> for a synchronous exception raised by the instruction at ``pc`` (QEMU's ``offset``)."""
    if kind is A32_UNDEF:
        return pc + (2 if thumb else 4)
    if kind is A32_SVC:
        return pc  # Unicorn reports an SVC with PC already on the next instruction
    if kind is A32_PREFETCH_ABORT:
        return pc + 4
    return pc + 8  # data abort


def take_reported(arch: Arch, uc: Uc, intno: int, info: Raised) -> Taken:
    """Enter the vector of the synchronous exception Unicorn reported through UC_HOOK_INTR as ``intno`` (after
    ``emu_start`` returned: PC is where Unicorn left it), with the syndrome QEMU computed for it: ``info``, which
    the hook itself must read (``raised``): once the hook returns, Unicorn goes on and may raise (and drop) another
    exception before ``emu_start`` returns, which overwrites it.

    Unicorn's PC is the preferred return address on AArch64 for all of them: the next instruction for SVC, the
    instruction itself for an undefined instruction, BRK and aborts. Raises ArchError for what the service does
    not model (an exception QEMU routes to EL2 or EL3, an asynchronous or hypervisor one).
    """
    if intno not in EXCEPTION_KINDS:
        raise ArchError(f"{EXCEPTION_NAMES.get(intno, f'exception {intno}')} is not delivered by this service")
    pc = arch.pc(uc)
    name = EXCEPTION_NAMES.get(intno, f"exception {intno}")
    if intno == EXCP_SMC:
        return _smc_undefined(arch, uc, pc - 4)
    if isinstance(arch, AArch64):
        if info.target_el != 1:
            raise ArchError(f"the {name} at 0x{pc:x} is routed to EL{info.target_el} (syndrome "
                            f"0x{info.syndrome:x}); only EL1 is modelled")
        far = info.vaddress if intno in (EXCP_PREFETCH_ABORT, EXCP_DATA_ABORT) else None
        vector = _enter_a64(uc, A64_SYNC, pc, esr=info.syndrome, far=far)
        return Taken(name, pc - 4 if intno == EXCP_SWI else pc, vector, info.syndrome, far, pc)
    kind = {EXCP_UDEF: A32_UNDEF, EXCP_SWI: A32_SVC, EXCP_BKPT: A32_PREFETCH_ABORT,
            EXCP_PREFETCH_ABORT: A32_PREFETCH_ABORT, EXCP_DATA_ABORT: A32_DATA_ABORT}[intno]
    return _take_a32(uc, kind, name, pc, info)


def _smc_undefined(arch: Arch, uc: Uc, smc_pc: int) -> Taken:
    """SMC is UNDEFINED on QEMU's virt, which has no EL3 (``pre_smc``: no EL3 and PSCI on HVC), and KVM injects
    an undefined instruction for it too. Unicorn's CPU has EL3 and raises EXCP_SMC with PC past the instruction
    (A64, A32 and T32 encodings are all 4 bytes): enter the Undefined Instruction exception at the SMC itself."""
    name = "SMC (UNDEFINED: no EL3)"
    if isinstance(arch, AArch64):
        esr = (EC_UNKNOWN << 26) | IL_BIT
        return Taken(name, smc_pc, _enter_a64(uc, A64_SYNC, smc_pc, esr=esr), esr, None, smc_pc)
    return _take_a32(uc, A32_UNDEF, name, smc_pc, None)


def take_undefined_a32(arch: Arch, uc: Uc) -> Taken:
    """The AArch32 Undefined Instruction exception for the instruction at PC, which Unicorn reports by ending
    ``emu_start`` with UC_ERR_INSN_INVALID instead of calling the hook (``arm_stop_interrupt``)."""
    return _take_a32(uc, A32_UNDEF, EXCEPTION_NAMES[EXCP_UDEF], arch.pc(uc), None)


def _take_a32(uc: Uc, kind: A32Kind, name: str, pc: int, info: Raised | None) -> Taken:
    thumb = bool(fastreg.reg_read(uc, a32.UC_ARM_REG_CPSR) & CPSR_T)
    fsr = 0
    address = None
    if info is not None and kind is A32_DATA_ABORT:
        fsr, address = info.fsr, info.vaddress & MASK32
        cp15_write(uc, 5, 0, 0, fsr)  # DFSR
        cp15_write(uc, 6, 0, 0, address)  # DFAR
    elif info is not None and kind is A32_PREFETCH_ABORT:
        fsr, address = info.fsr, info.vaddress & MASK32
        cp15_write(uc, 5, 0, 1, fsr)  # IFSR
        cp15_write(uc, 6, 0, 2, address)  # IFAR
    link = _a32_link(kind, pc, thumb)
    vector = _enter_a32(uc, kind, link)
    at = pc - (2 if thumb else 4) if kind is A32_SVC else pc
    return Taken(name, at, vector, fsr, address, link & MASK32)


# ----- data aborts the service raises itself -----------------------------------------------------------------

def _a32_lpae(uc: Uc) -> bool:
    return bool(cp15_read(uc, 2, 0, 2) >> 31)  # TTBCR.EAE


def data_abort(arch: Arch, uc: Uc, pc: int, address: int, is_write: bool, insn_len: int, *,
               alignment: bool = False) -> Taken:
    """A precise data abort on the instruction at ``pc``, which has not retired: a synchronous external abort
    (a device error) or, with ``alignment``, an alignment fault.

    AArch64: ESR_EL1 = EC 0x24/0x25, IL, ISV 0, WnR, DFSC 0x10 or 0x21; FAR_EL1 = address; ELR_EL1 = pc.
    AArch32: DFSR (FS 0b01000 / 0b00001, or LPAE STATUS 0x10 / 0x21 when TTBCR.EAE), WnR; DFAR; LR_abt = pc + 8.
    """
    name = "alignment fault" if alignment else "synchronous external abort"
    if isinstance(arch, AArch64):
        el = (fastreg.reg_read(uc, a64.UC_ARM64_REG_PSTATE) >> 2) & 3
        ec = EC_DABT_CUR if el == 1 else EC_DABT_LOW
        dfsc = DFSC_ALIGNMENT if alignment else DFSC_SYNC_EXTERNAL
        esr = (ec << 26) | (int(insn_len == 4) << 25) | (int(is_write) << 6) | dfsc
        return Taken(name, pc, _enter_a64(uc, A64_SYNC, pc, esr=esr, far=address), esr, address, pc)
    if _a32_lpae(uc):
        fsr = FSR_LPAE | (DFSC_ALIGNMENT if alignment else DFSC_SYNC_EXTERNAL)
    else:
        fsr = FS_SHORT_ALIGNMENT if alignment else FS_SHORT_SYNC_EXTERNAL
    fsr |= FSR_WNR if is_write else 0
    cp15_write(uc, 5, 0, 0, fsr)  # DFSR
    cp15_write(uc, 6, 0, 0, address)  # DFAR
    return Taken(name, pc, _enter_a32(uc, A32_DATA_ABORT, pc + 8), fsr, address, (pc + 8) & MASK32)


def mmu_enabled(arch: Arch, uc: Uc) -> bool:
    """SCTLR(_EL1).M: stage 1 translation is on (with it off, data accesses are to Device-nGnRnE memory)."""
    if isinstance(arch, AArch64):
        return bool(fastreg.sctlr_el1(uc) & 1)
    return bool(cp15_read(uc, 1, 0, 0) & 1)


# ----- AArch32 hints Unicorn reports as undefined instructions ------------------------------------------------

_A32_HINTS = (0x0320F001, 0x0320F002)  # YIELD, WFE (without the condition)
_T16_HINTS = (0xBF10, 0xBF20)
_T32_HINTS = ((0xF3AF, 0x8001), (0xF3AF, 0x8002))


def _read(uc: Uc, address: int, size: int) -> int | None:
    try:
        return int.from_bytes(uc.mem_read(address, size), "little")
    except Exception:
        return None


def a32_after_hint(uc: Uc, pc: int) -> bool:
    """Whether the instruction before ``pc`` is YIELD or WFE. Unicorn 2.1.4 ends ``emu_start`` after either with
    UC_ERR_INSN_INVALID (EXCP_YIELD goes through ``arm_stop_interrupt`` like EXCP_UDEF), PC on the next instruction."""
    if fastreg.reg_read(uc, a32.UC_ARM_REG_CPSR) & CPSR_T:
        if _read(uc, pc - 2, 2) in _T16_HINTS:
            return True
        first, second = _read(uc, pc - 4, 2), _read(uc, pc - 2, 2)
        return (first, second) in _T32_HINTS
    word = _read(uc, pc - 4, 4)
    return word is not None and (word & 0x0FFFFFFF) in _A32_HINTS


def a32_permanently_undefined(uc: Uc, pc: int) -> bool:
    """Whether the instruction at ``pc`` is UDF (A32 0xe7fXXXfX, T16 0xdeXX, T32 0xf7fX 0xaXXX)."""
    if fastreg.reg_read(uc, a32.UC_ARM_REG_CPSR) & CPSR_T:
        first = _read(uc, pc, 2)
        if first is not None and first & 0xFF00 == 0xDE00:
            return True
        second = _read(uc, pc + 2, 2)
        return first is not None and second is not None and first & 0xFFF0 == 0xF7F0 and second & 0xF000 == 0xA000
    word = _read(uc, pc, 4)
    return word is not None and word & 0xFFF000F0 == 0xE7F000F0
