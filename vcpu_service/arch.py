"""What differs between AArch64 and AArch32 on Unicorn: registers, CPU models, reset fixes, state bits.

The exit path is written once against this small interface, so the vCPU loop never asks which
architecture it runs.
"""

from __future__ import annotations

import abc
from typing import ClassVar, NamedTuple

from unicorn import UC_ARCH_ARM, UC_ARCH_ARM64, UC_MODE_ARM, Uc
from unicorn import arm64_const as a64
from unicorn import arm_const as a32

from vcpu_service import fastreg
from vcpu_service.decode import Isa, a32_condition, condition_passed, thumb_insn_len

# PSCI arrives through UC_HOOK_INTR with QEMU's exception numbers (target/arm/cpu.h).
EXCP_UDEF = 1
EXCP_SWI = 2
EXCP_PREFETCH_ABORT = 3
EXCP_DATA_ABORT = 4
EXCP_IRQ = 5
EXCP_FIQ = 6
EXCP_BKPT = 7
EXCP_HVC = 11
EXCP_HYP_TRAP = 12
EXCP_SMC = 13
EXCEPTION_NAMES = {
    EXCP_UDEF: "undefined instruction",
    EXCP_SWI: "SVC",
    EXCP_PREFETCH_ABORT: "prefetch abort",
    EXCP_DATA_ABORT: "data abort",
    EXCP_IRQ: "IRQ",
    EXCP_FIQ: "FIQ",
    EXCP_BKPT: "breakpoint",
    EXCP_HVC: "HVC",
    EXCP_HYP_TRAP: "hyp trap",
    EXCP_SMC: "SMC",
}


def close_uc(uc: Uc) -> None:
    """Free a Unicorn instance now (its weakref finalizer runs uc_close exactly once)."""
    finalizer = getattr(uc, "_Uc__finalizer", None)
    if finalizer is not None:
        finalizer()


EC_DABT_LOW = 0x24
EC_DABT_CUR = 0x25
DFSC_SYNC_EXTERNAL = 0x10


class ArchError(ValueError):
    """A configuration the architecture cannot honour (unknown CPU model, bad register name)."""


class FetchedInsn(NamedTuple):
    """The instruction at PC, read the way the CPU would fetch it."""

    isa: Isa
    word: int
    length: int


class Arch(abc.ABC):
    """One guest architecture as the vCPU loop sees it."""

    name: ClassVar[str]
    cpu_models: ClassVar[dict[str, int]]
    default_cpu: ClassVar[str]
    gpr_count: ClassVar[int]
    # Address width for `until` in emu_start: a value PC can never hold.
    never_pc: ClassVar[int]

    def new_uc(self, cpu_model: str) -> Uc:
        """Create a Unicorn CPU of this architecture with the reset-state fixes applied."""
        key = (cpu_model or self.default_cpu).lower()
        if key not in self.cpu_models:
            raise ArchError(
                f"unknown CPU model {cpu_model!r} for {self.name}; known: {', '.join(sorted(self.cpu_models))}"
            )
        uc = self._create()
        uc.ctl_set_cpu_model(self.cpu_models[key])
        self.reset_fixes(uc)
        return uc

    @abc.abstractmethod
    def _create(self) -> Uc: ...

    @abc.abstractmethod
    def reset_fixes(self, uc: Uc) -> None:
        """Make Unicorn's reset state consistent (see real-guests.md) so HVC traps and the MMU works."""

    @abc.abstractmethod
    def gpr_ids(self) -> list[int]: ...

    @abc.abstractmethod
    def read_gpr(self, uc: Uc, n: int) -> int:
        """Read general register n as a load/store Rt (A64: 31 reads as zero, XZR)."""

    @abc.abstractmethod
    def write_gpr(self, uc: Uc, n: int, value: int) -> None:
        """Write Rt (A64: 31 is XZR and the write is dropped)."""

    @abc.abstractmethod
    def read_base(self, uc: Uc, n: int) -> int:
        """Read a base register Rn (A64: 31 is SP)."""

    @abc.abstractmethod
    def pc(self, uc: Uc) -> int: ...

    @abc.abstractmethod
    def start_address(self, uc: Uc, pc: int) -> int:
        """The `begin` to give emu_start so execution resumes at pc in the current state."""

    @abc.abstractmethod
    def fetch(self, uc: Uc, pc: int) -> FetchedInsn: ...

    @abc.abstractmethod
    def big_endian_data(self, uc: Uc) -> bool:
        """Whether data accesses at the current exception level are big-endian."""

    @abc.abstractmethod
    def advance(self, uc: Uc, pc: int, length: int) -> None:
        """Retire the instruction at pc: PC += length (and, on AArch32 Thumb, advance ITSTATE)."""

    @abc.abstractmethod
    def set_entry(self, uc: Uc, entry: int, context: int) -> int:
        """Prepare a vCPU to start at entry with x0/r0 = context; returns the emu_start address."""

    @abc.abstractmethod
    def register_names(self) -> list[str]: ...

    @abc.abstractmethod
    def reg_id(self, name: str) -> int: ...

    def read_named(self, uc: Uc, name: str) -> int:
        return int(uc.reg_read(self.reg_id(name)))

    def write_named(self, uc: Uc, name: str, value: int) -> None:
        uc.reg_write(self.reg_id(name), value)

    @abc.abstractmethod
    def is_wfi_before(self, uc: Uc, pc: int) -> bool:
        """True when the instruction just before pc is WFI (emu_start returns after it)."""

    def condition_passed(self, uc: Uc, word: int) -> bool:
        """Whether an A32 instruction's condition holds (always true on AArch64)."""
        return True

    def store_fault_is_deferred(self, uc: Uc) -> bool:
        """Whether Unicorn will run on past a store that faults now (called from the unmapped-memory hook).

        Unicorn 2.1.4 runs a Thumb IT block as one instruction (`no_exit_request`): a store that faults inside
        one is dropped and execution continues past the block, to the next exit check. The state seen by the
        hook is still exact, so the caller saves it and goes back to it.
        """
        return False

    @abc.abstractmethod
    def write_base(self, uc: Uc, n: int, value: int) -> None:
        """Write back a base register Rn (A64: 31 is SP)."""

    def load_write_pc(self, uc: Uc, value: int) -> None:
        """AArch32 ``LoadWritePC``: a load to PC is an interworking branch (bit 0 selects Thumb)."""
        raise ArchError(f"{self.name} has no load to PC")

    @abc.abstractmethod
    def carry_flag(self, uc: Uc) -> bool:
        """PSTATE.C, for the RRX shift of an AArch32 register offset."""

    @abc.abstractmethod
    def psci_args(self, uc: Uc) -> tuple[int, int, int, int]: ...

    @abc.abstractmethod
    def set_psci_result(self, uc: Uc, value: int) -> None: ...


_A64_WFI = 0xD503207F
SCTLR_EE_E0E = (1 << 25) | (1 << 24)  # SCTLR_EL1.EE (EL1 data) and E0E (EL0 data)


class AArch64(Arch):
    name = "aarch64"
    cpu_models: ClassVar[dict[str, int]] = {
        "cortex-a57": a64.UC_CPU_ARM64_A57,
        "cortex-a53": a64.UC_CPU_ARM64_A53,
        "cortex-a72": a64.UC_CPU_ARM64_A72,
        "max": a64.UC_CPU_ARM64_MAX,
    }
    default_cpu = "cortex-a57"
    gpr_count = 31
    never_pc = 0xFFFF_FFFF_FFFF_FFFF

    def __init__(self) -> None:
        self._gprs = [getattr(a64, f"UC_ARM64_REG_X{i}") for i in range(29)] + [
            a64.UC_ARM64_REG_X29,
            a64.UC_ARM64_REG_X30,
        ]
        self._names = {f"x{i}": r for i, r in enumerate(self._gprs)}
        self._names.update(
            fp=a64.UC_ARM64_REG_X29,
            lr=a64.UC_ARM64_REG_X30,
            sp=a64.UC_ARM64_REG_SP,
            pc=a64.UC_ARM64_REG_PC,
            pstate=a64.UC_ARM64_REG_PSTATE,
            nzcv=a64.UC_ARM64_REG_NZCV,
            elr_el1=a64.UC_ARM64_REG_ELR_EL1,
            esr_el1=a64.UC_ARM64_REG_ESR_EL1,
            far_el1=a64.UC_ARM64_REG_FAR_EL1,
            vbar_el1=a64.UC_ARM64_REG_VBAR_EL1,
            sp_el0=a64.UC_ARM64_REG_SP_EL0,
            sp_el1=a64.UC_ARM64_REG_SP_EL1,
        )

    def _create(self) -> Uc:
        return Uc(UC_ARCH_ARM64, UC_MODE_ARM)

    def reset_fixes(self, uc: Uc) -> None:
        # Unicorn resets at EL1 with SCR_EL3.RW=0 and HCR_EL2.RW=0, so QEMU's MMU treats EL1 as AArch32
        # and HVC is UNDEF. SCR_EL3 = RW|HCE|NS, HCR_EL2.RW = 1 (real-guests.md section 1).
        uc.cpr_write(3, 6, 1, 1, 0, 0x501)  # type: ignore[attr-defined]
        uc.cpr_write(3, 4, 1, 1, 0, 1 << 31)  # type: ignore[attr-defined]

    def gpr_ids(self) -> list[int]:
        return self._gprs

    def read_gpr(self, uc: Uc, n: int) -> int:
        if n == 31:
            return 0
        return fastreg.reg_read(uc, self._gprs[n])

    def write_gpr(self, uc: Uc, n: int, value: int) -> None:
        if n != 31:
            fastreg.reg_write(uc, self._gprs[n], value & 0xFFFF_FFFF_FFFF_FFFF)

    def read_base(self, uc: Uc, n: int) -> int:
        return fastreg.reg_read(uc, a64.UC_ARM64_REG_SP if n == 31 else self._gprs[n])

    def pc(self, uc: Uc) -> int:
        return fastreg.reg_read(uc, a64.UC_ARM64_REG_PC)

    def start_address(self, uc: Uc, pc: int) -> int:
        return pc

    def fetch(self, uc: Uc, pc: int) -> FetchedInsn:
        return FetchedInsn(Isa.A64, fastreg.mem_read_le(uc, pc, 4), 4)

    def big_endian_data(self, uc: Uc, sctlr: int | None = None) -> bool:
        """``sctlr``: SCTLR_EL1 if the caller holds a current copy (read from the vCPU otherwise)."""
        sctlr = (fastreg.sctlr_el1(uc) if sctlr is None else sctlr) & SCTLR_EE_E0E
        if sctlr == 0 or sctlr == SCTLR_EE_E0E:  # the same at EL0 and EL1: no need for PSTATE
            return bool(sctlr)
        el = (fastreg.reg_read(uc, a64.UC_ARM64_REG_PSTATE) >> 2) & 3
        return bool(sctlr & (1 << 24)) if el == 0 else bool(sctlr & (1 << 25))

    def advance(self, uc: Uc, pc: int, length: int) -> None:
        fastreg.reg_write(uc, a64.UC_ARM64_REG_PC, pc + length)

    def set_entry(self, uc: Uc, entry: int, context: int) -> int:
        uc.reg_write(a64.UC_ARM64_REG_X0, context)
        uc.reg_write(a64.UC_ARM64_REG_PC, entry)
        return entry

    def register_names(self) -> list[str]:
        return [f"x{i}" for i in range(31)] + ["sp", "pc", "pstate"]

    def reg_id(self, name: str) -> int:
        try:
            return self._names[name.lower()]
        except KeyError:
            raise ArchError(f"unknown aarch64 register {name!r}; known: {', '.join(self._names)}") from None

    def is_wfi_before(self, uc: Uc, pc: int) -> bool:
        try:  # asked after every slice that ends without a cause: fastreg's read costs a third of Uc.mem_read's
            return fastreg.mem_read_le(uc, pc - 4, 4) == _A64_WFI
        except Exception:
            return False

    def write_base(self, uc: Uc, n: int, value: int) -> None:
        fastreg.reg_write(uc, a64.UC_ARM64_REG_SP if n == 31 else self._gprs[n], value & 0xFFFF_FFFF_FFFF_FFFF)

    def carry_flag(self, uc: Uc) -> bool:
        return bool(int(uc.reg_read(a64.UC_ARM64_REG_NZCV)) & (1 << 29))

    def psci_args(self, uc: Uc) -> tuple[int, int, int, int]:
        return (
            int(uc.reg_read(a64.UC_ARM64_REG_X0)),
            int(uc.reg_read(a64.UC_ARM64_REG_X1)),
            int(uc.reg_read(a64.UC_ARM64_REG_X2)),
            int(uc.reg_read(a64.UC_ARM64_REG_X3)),
        )

    def set_psci_result(self, uc: Uc, value: int) -> None:
        uc.reg_write(a64.UC_ARM64_REG_X0, value & 0xFFFF_FFFF_FFFF_FFFF)


_CPSR_T = 1 << 5
_CPSR_E = 1 << 9
_A32_WFI = 0x0320F003  # without the condition field
_T16_WFI = 0xBF30
_T32_WFI = (0xF3AF, 0x8003)


def it_advance(cpsr: int) -> int:
    """ITAdvance() on the IT bits of a CPSR (IT[1:0] = CPSR[26:25], IT[7:2] = CPSR[15:10])."""
    it = ((cpsr >> 25) & 0x3) | (((cpsr >> 10) & 0x3F) << 2)
    if it == 0:
        return cpsr
    it = 0 if (it & 0x7) == 0 else (it & 0xE0) | ((it << 1) & 0x1F)
    cpsr &= ~((0x3 << 25) | (0x3F << 10))
    return cpsr | ((it & 0x3) << 25) | (((it >> 2) & 0x3F) << 10)


class AArch32(Arch):
    name = "arm"
    cpu_models: ClassVar[dict[str, int]] = {
        "cortex-a15": a32.UC_CPU_ARM_CORTEX_A15,
        "cortex-a7": a32.UC_CPU_ARM_CORTEX_A7,
        "cortex-a9": a32.UC_CPU_ARM_CORTEX_A9,
        "cortex-a8": a32.UC_CPU_ARM_CORTEX_A8,
        "max": a32.UC_CPU_ARM_MAX,
    }
    default_cpu = "cortex-a15"
    gpr_count = 15
    never_pc = 0xFFFF_FFFF

    def __init__(self) -> None:
        self._gprs = [getattr(a32, f"UC_ARM_REG_R{i}") for i in range(13)] + [
            a32.UC_ARM_REG_SP,
            a32.UC_ARM_REG_LR,
            a32.UC_ARM_REG_PC,
        ]
        self._names = {f"r{i}": r for i, r in enumerate(self._gprs)}
        self._names.update(sp=a32.UC_ARM_REG_SP, lr=a32.UC_ARM_REG_LR, pc=a32.UC_ARM_REG_PC,
                           cpsr=a32.UC_ARM_REG_CPSR, spsr=a32.UC_ARM_REG_SPSR)

    def _create(self) -> Uc:
        return Uc(UC_ARCH_ARM, UC_MODE_ARM)

    def reset_fixes(self, uc: Uc) -> None:
        # SCR (cp15 c1 c1 0) = NS|HCE so that HVC traps for PSCI instead of being UNDEF.
        uc.cpr_write(15, 0, 1, 1, 0, 1, False, 0x101)  # type: ignore[attr-defined]

    def gpr_ids(self) -> list[int]:
        return self._gprs

    def read_gpr(self, uc: Uc, n: int) -> int:
        return fastreg.reg_read(uc, self._gprs[n])

    def write_gpr(self, uc: Uc, n: int, value: int) -> None:
        fastreg.reg_write(uc, self._gprs[n], value & 0xFFFF_FFFF)

    def read_base(self, uc: Uc, n: int) -> int:
        return self.read_gpr(uc, n)

    def pc(self, uc: Uc) -> int:
        return fastreg.reg_read(uc, a32.UC_ARM_REG_PC)

    def _thumb(self, uc: Uc) -> bool:
        return bool(fastreg.reg_read(uc, a32.UC_ARM_REG_CPSR) & _CPSR_T)

    def start_address(self, uc: Uc, pc: int) -> int:
        # Unicorn takes the Thumb state from bit 0 of the start address.
        return pc | 1 if self._thumb(uc) else pc

    def fetch(self, uc: Uc, pc: int) -> FetchedInsn:
        if self._thumb(uc):
            hw1 = fastreg.mem_read_le(uc, pc, 2)
            if thumb_insn_len(hw1) == 4:
                hw2 = fastreg.mem_read_le(uc, pc + 2, 2)
                return FetchedInsn(Isa.T32, (hw1 << 16) | hw2, 4)
            return FetchedInsn(Isa.T32, hw1, 2)
        return FetchedInsn(Isa.A32, fastreg.mem_read_le(uc, pc, 4), 4)

    def big_endian_data(self, uc: Uc) -> bool:
        return bool(fastreg.reg_read(uc, a32.UC_ARM_REG_CPSR) & _CPSR_E)

    def advance(self, uc: Uc, pc: int, length: int) -> None:
        cpsr = fastreg.reg_read(uc, a32.UC_ARM_REG_CPSR)
        if cpsr & _CPSR_T:
            advanced = it_advance(cpsr)
            if advanced != cpsr:
                fastreg.reg_write(uc, a32.UC_ARM_REG_CPSR, advanced)
            fastreg.reg_write(uc, a32.UC_ARM_REG_PC, (pc + length) | 1)
        else:
            fastreg.reg_write(uc, a32.UC_ARM_REG_PC, pc + length)

    def set_entry(self, uc: Uc, entry: int, context: int) -> int:
        uc.reg_write(a32.UC_ARM_REG_R0, context & 0xFFFF_FFFF)
        uc.reg_write(a32.UC_ARM_REG_PC, entry)
        return entry

    def register_names(self) -> list[str]:
        return [f"r{i}" for i in range(13)] + ["sp", "lr", "pc", "cpsr"]

    def reg_id(self, name: str) -> int:
        try:
            return self._names[name.lower()]
        except KeyError:
            raise ArchError(f"unknown arm register {name!r}; known: {', '.join(self._names)}") from None

    def is_wfi_before(self, uc: Uc, pc: int) -> bool:
        try:
            if self._thumb(uc):
                if fastreg.mem_read_le(uc, pc - 2, 2) == _T16_WFI:
                    return True
                word = fastreg.mem_read_le(uc, pc - 4, 4)
                return (word & 0xFFFF, word >> 16) == _T32_WFI
            return (fastreg.mem_read_le(uc, pc - 4, 4) & 0x0FFFFFFF) == _A32_WFI
        except Exception:
            return False

    def store_fault_is_deferred(self, uc: Uc) -> bool:
        cpsr = int(uc.reg_read(a32.UC_ARM_REG_CPSR))
        return bool(cpsr & _CPSR_T) and bool(cpsr & ((0x3 << 25) | (0x3F << 10)))

    def condition_passed(self, uc: Uc, word: int) -> bool:
        cond = a32_condition(word)
        if cond >= 0xE:
            return True
        return condition_passed(cond, int(uc.reg_read(a32.UC_ARM_REG_CPSR)) >> 28)

    def write_base(self, uc: Uc, n: int, value: int) -> None:
        self.write_gpr(uc, n, value)

    def load_write_pc(self, uc: Uc, value: int) -> None:
        # Unicorn takes the Thumb state from bit 0 of a PC write; ARM state needs a word-aligned address.
        fastreg.reg_write(uc, a32.UC_ARM_REG_PC, value if value & 1 else value & ~3)

    def carry_flag(self, uc: Uc) -> bool:
        return bool(int(uc.reg_read(a32.UC_ARM_REG_CPSR)) & (1 << 29))

    def psci_args(self, uc: Uc) -> tuple[int, int, int, int]:
        return (
            int(uc.reg_read(a32.UC_ARM_REG_R0)),
            int(uc.reg_read(a32.UC_ARM_REG_R1)),
            int(uc.reg_read(a32.UC_ARM_REG_R2)),
            int(uc.reg_read(a32.UC_ARM_REG_R3)),
        )

    def set_psci_result(self, uc: Uc, value: int) -> None:
        uc.reg_write(a32.UC_ARM_REG_R0, value & 0xFFFF_FFFF)


ARCHES: dict[str, type[Arch]] = {"aarch64": AArch64, "arm": AArch32}


def arch_by_name(name: str) -> Arch:
    try:
        return ARCHES[name]()
    except KeyError:
        raise ArchError(f"unknown architecture {name!r}; known: {', '.join(ARCHES)}") from None
