"""Exception entry by hand (vcpu_service.exceptions) on real Unicorn CPUs: an interrupt taken between two
instructions enters the right vector with the right return state, the handler runs at the new level (Unicorn's
cached state followed the change), and its exception return comes back to the interrupted instruction.

The guests are literal instruction words (assembled with llvm-mc; the source is in the comments). A UC_HOOK_INTR
hook records any exception Unicorn itself raises, which would mean the entry left the CPU in a state it refuses.
"""

from __future__ import annotations

import struct

import pytest
from unicorn import UC_HOOK_INTR, UC_PROT_ALL, Uc
from unicorn import arm64_const as a64
from unicorn import arm_const as a32

from vcpu_service import exceptions
from vcpu_service.arch import AArch32, AArch64, close_uc

RAM = 0x4000_0000
CODE = 0x4000_0000
BODY = 0x4000_0100
VBAR = 0x4000_0800
SP_EL1 = 0x4000_8000
SP_EL0 = 0x4000_6000


def _words(*ws: int) -> bytes:
    return struct.pack(f"<{len(ws)}I", *ws)


def _halfwords(*hws: int) -> bytes:
    return struct.pack(f"<{len(hws)}H", *hws)


class _Cpu:
    """A bare Unicorn vCPU of the service's architectures with 64 KiB of RAM; records Unicorn's own exceptions."""

    def __init__(self, arch: AArch64 | AArch32) -> None:
        self.arch = arch
        self.uc: Uc = arch.new_uc("")
        self.uc.mem_map(RAM, 0x10000, UC_PROT_ALL)
        self.intr: list[int] = []
        self.uc.hook_add(UC_HOOK_INTR, self._on_intr)

    def _on_intr(self, uc: Uc, intno: int, _user: object) -> None:
        self.intr.append(intno)
        uc.emu_stop()

    def load(self, address: int, code: bytes) -> None:
        self.uc.mem_write(address, code)

    def run(self, begin: int, until: int, count: int = 100) -> None:
        self.uc.emu_start(begin, until, 0, count)
        assert self.intr == [], f"Unicorn raised exceptions {self.intr}"

    def close(self) -> None:
        close_uc(self.uc)


# ----- AArch64 ---------------------------------------------------------------------------------------------

A64_ENTER = [  # at CODE, EL1h: SP_EL0 = x7, then ERET to x2 with SPSR = x1
    0xD5184107,  # msr  sp_el0, x7
    0xD5184001,  # msr  spsr_el1, x1
    0xD5184022,  # msr  elr_el1, x2
    0xD69F03E0,  # eret
]
A64_BODY = [0xD503201F] * 4  # nop x4, at BODY: interrupted before the second
A64_HANDLER = [  # at each IRQ/FIQ vector
    0xD5384023,  # mrs  x3, elr_el1
    0xD5384004,  # mrs  x4, spsr_el1
    0xD5384245,  # mrs  x5, currentel
    0x910003E6,  # mov  x6, sp
    0xD69F03E0,  # eret
]

# PSTATE the body runs with (DAIF clear), the vector group it takes interrupts to, the SP it runs on.
A64_STATES = {
    "EL1h": (0x5, 0x200, SP_EL1),
    "EL1t": (0x4, 0x000, SP_EL0),
    "EL0": (0x0, 0x400, SP_EL0),
}


def _a64_cpu() -> _Cpu:
    cpu = _Cpu(AArch64())
    cpu.load(CODE, _words(*A64_ENTER))
    cpu.load(BODY, _words(*A64_BODY))
    for group in (0x000, 0x200, 0x400):
        for kind in (0x080, 0x100):
            cpu.load(VBAR + group + kind, _words(*A64_HANDLER))
    uc = cpu.uc
    uc.reg_write(a64.UC_ARM64_REG_VBAR_EL1, VBAR)
    uc.reg_write(a64.UC_ARM64_REG_SP, SP_EL1)
    uc.reg_write(a64.UC_ARM64_REG_X7, SP_EL0)
    uc.reg_write(a64.UC_ARM64_REG_X2, BODY)
    return cpu


@pytest.mark.parametrize("fiq", [False, True], ids=["irq", "fiq"])
@pytest.mark.parametrize("state", list(A64_STATES))
def test_a64_interrupt_entry_and_return(state: str, fiq: bool) -> None:
    pstate, group, sp = A64_STATES[state]
    cpu = _a64_cpu()
    uc, arch = cpu.uc, cpu.arch
    try:
        uc.reg_write(a64.UC_ARM64_REG_X1, pstate | (0xF << 28))  # NZCV set, to see it saved
        cpu.run(CODE, BODY + 4)  # into the body's state, one NOP done
        assert uc.reg_read(a64.UC_ARM64_REG_PSTATE) & 0xF == pstate
        assert not exceptions.irq_masked(arch, uc, fiq)
        vector = exceptions.take_irq(arch, uc, fiq)
        assert vector == VBAR + group + (0x100 if fiq else 0x080)
        assert uc.reg_read(a64.UC_ARM64_REG_PC) == vector
        assert uc.reg_read(a64.UC_ARM64_REG_ELR_EL1) == BODY + 4  # the instruction not yet run
        assert uc.reg_read(a64.UC_ARM64_REG_PSTATE) == 0x3C5  # EL1h, DAIF set, NZCV clear (as QEMU)
        assert uc.reg_read(a64.UC_ARM64_REG_SP) == SP_EL1
        assert exceptions.irq_masked(arch, uc) and exceptions.irq_masked(arch, uc, fiq=True)
        # The handler runs at EL1 (EL0 could not read ELR_EL1 or SPSR_EL1) and returns to the body.
        cpu.run(vector, BODY + 8)
        regs = {n: uc.reg_read(getattr(a64, f"UC_ARM64_REG_X{n}")) for n in (3, 4, 5, 6)}
        assert regs[3] == BODY + 4
        assert regs[4] == pstate | (0xF << 28)  # SPSR_EL1: the interrupted PSTATE
        assert regs[5] == 1 << 2  # CurrentEL: EL1
        assert regs[6] == SP_EL1
        assert uc.reg_read(a64.UC_ARM64_REG_PSTATE) == pstate | (0xF << 28)
        assert uc.reg_read(a64.UC_ARM64_REG_SP) == sp
    finally:
        cpu.close()


def test_a64_irq_masked_follows_daif() -> None:
    cpu = _a64_cpu()
    uc, arch = cpu.uc, cpu.arch
    try:
        uc.reg_write(a64.UC_ARM64_REG_X1, 0x5 | 0x80)  # EL1h, I set, F clear
        cpu.run(CODE, BODY + 4)
        assert exceptions.irq_masked(arch, uc)
        assert not exceptions.irq_masked(arch, uc, fiq=True)
    finally:
        cpu.close()


def test_a64_esr_and_far_untouched_by_an_interrupt() -> None:
    cpu = _a64_cpu()
    uc, arch = cpu.uc, cpu.arch
    try:
        uc.reg_write(a64.UC_ARM64_REG_X1, 0x5)
        cpu.run(CODE, BODY + 4)
        uc.reg_write(a64.UC_ARM64_REG_ESR_EL1, 0x5600_0000)
        uc.reg_write(a64.UC_ARM64_REG_FAR_EL1, 0x1234)
        exceptions.take_irq(arch, uc)
        assert uc.reg_read(a64.UC_ARM64_REG_ESR_EL1) == 0x5600_0000
        assert uc.reg_read(a64.UC_ARM64_REG_FAR_EL1) == 0x1234
    finally:
        cpu.close()


# ----- AArch32 ---------------------------------------------------------------------------------------------

A32_CPS_USR = 0xF1020010  # cps  #0x10
A32_BX_R3 = 0xE12FFF13  # bx   r3
A32_NOP = 0xE320F000  # nop
T32_NOP = 0xBF00  # nop (16-bit)
A32_HANDLER = [  # at VBAR + 0x18 / 0x1c, ARM state
    0xE14F4000,  # mrs  r4, spsr
    0xE1A0500E,  # mov  r5, lr
    0xE10F6000,  # mrs  r6, cpsr
    0xE1A0700D,  # mov  r7, sp
    0xE25EF004,  # subs pc, lr, #4
]
T32_HANDLER = [  # the same in Thumb state (SCTLR.TE = 1)
    0xF3FF, 0x8400,  # mrs  r4, spsr
    0x4675,  # mov  r5, lr
    0xF3EF, 0x8600,  # mrs  r6, cpsr
    0x466F,  # mov  r7, sp
    0xF3DE, 0x8F04,  # subs pc, lr, #4
]
SP_IRQ = 0x4000_7000


def _a32_cpu(*, user: bool, thumb: bool, te: bool = False, high: bool = False) -> tuple[_Cpu, int]:
    """An AArch32 CPU at reset (SVC mode) with a guest that goes to User mode and/or Thumb state and runs NOPs.
    Returns the CPU and the address of the body's second instruction (where the interrupt is taken)."""
    cpu = _Cpu(AArch32())
    uc = cpu.uc
    prologue = ([A32_CPS_USR] if user else []) + [A32_BX_R3]
    cpu.load(CODE, _words(*prologue))
    cpu.load(BODY, _halfwords(*[T32_NOP] * 4) if thumb else _words(*[A32_NOP] * 4))
    base = 0xFFFF_0000 if high else VBAR
    if high:
        uc.mem_map(base, 0x1000, UC_PROT_ALL)
    handler = _halfwords(*T32_HANDLER) if te else _words(*A32_HANDLER)
    cpu.load(base + 0x18, handler)
    cpu.load(base + 0x40, handler)  # the FIQ vector at +0x1c branches here
    cpu.load(base + 0x1C, _halfwords(0xF000, 0xB810) if te else _words(0xEA000007))  # b.w / b  VBAR+0x40
    exceptions.cp15_write(uc, 12, 0, 0, VBAR)
    sctlr = exceptions.cp15_read(uc, 1, 0, 0)
    sctlr = (sctlr | exceptions.SCTLR_TE) if te else sctlr
    sctlr = (sctlr | exceptions.SCTLR_V) if high else sctlr
    exceptions.cp15_write(uc, 1, 0, 0, sctlr)
    # SP_irq and SP_fiq: switch to each mode, set SP, and come back to SVC.
    cpsr = int(uc.reg_read(a32.UC_ARM_REG_CPSR))
    for mode in (exceptions.MODE_IRQ, exceptions.MODE_FIQ):
        uc.reg_write(a32.UC_ARM_REG_CPSR, (cpsr & ~0x1F) | mode)
        uc.reg_write(a32.UC_ARM_REG_SP, SP_IRQ)
    uc.reg_write(a32.UC_ARM_REG_CPSR, cpsr & ~0x1C0)  # SVC, A I F clear
    uc.reg_write(a32.UC_ARM_REG_R3, BODY | int(thumb))
    step = 2 if thumb else 4
    cpu.run(CODE, BODY + step)
    return cpu, BODY + step


A32_CASES = {
    "svc-arm": (False, False),
    "svc-thumb": (False, True),
    "user-arm": (True, False),
    "user-thumb": (True, True),
}


@pytest.mark.parametrize("te", [False, True], ids=["arm-handler", "thumb-handler"])
@pytest.mark.parametrize("fiq", [False, True], ids=["irq", "fiq"])
@pytest.mark.parametrize("case", list(A32_CASES))
def test_a32_interrupt_entry_and_return(case: str, fiq: bool, te: bool) -> None:
    user, thumb = A32_CASES[case]
    cpu, at = _a32_cpu(user=user, thumb=thumb, te=te)
    uc, arch = cpu.uc, cpu.arch
    try:
        before = int(uc.reg_read(a32.UC_ARM_REG_CPSR))
        assert before & 0x1F == (0x10 if user else 0x13)
        assert bool(before & exceptions.CPSR_T) == thumb
        assert not exceptions.irq_masked(arch, uc, fiq)
        vector = exceptions.take_irq(arch, uc, fiq)
        assert vector == VBAR + (0x1C if fiq else 0x18)
        cpsr = int(uc.reg_read(a32.UC_ARM_REG_CPSR))
        assert cpsr & 0x1F == (0x11 if fiq else 0x12)
        assert cpsr & 0x1C0 == (0x1C0 if fiq else 0x180)  # A, I (and F)
        assert bool(cpsr & exceptions.CPSR_T) == te
        assert uc.reg_read(a32.UC_ARM_REG_LR) == at + 4  # the next instruction to run + 4, ARM or Thumb
        assert uc.reg_read(a32.UC_ARM_REG_SPSR) == before
        assert uc.reg_read(a32.UC_ARM_REG_PC) == vector
        assert exceptions.irq_masked(arch, uc)
        # The handler runs in the new mode on its own SP and returns with SUBS PC, LR, #4.
        cpu.run(vector | int(te), at + (2 if thumb else 4))
        regs = {n: int(uc.reg_read(getattr(a32, f"UC_ARM_REG_R{n}"))) for n in (4, 5, 6, 7)}
        assert regs[4] == before
        assert regs[5] == at + 4
        assert regs[6] == cpsr & ~exceptions.CPSR_T  # MRS reads the execution state bits as zero
        assert regs[7] == SP_IRQ
        assert int(uc.reg_read(a32.UC_ARM_REG_CPSR)) == before
    finally:
        cpu.close()


def test_a32_high_vectors() -> None:
    cpu, at = _a32_cpu(user=False, thumb=False, high=True)
    try:
        assert exceptions.take_irq(cpu.arch, cpu.uc) == 0xFFFF_0018
        cpu.run(0xFFFF_0018, at + 4)
        assert int(cpu.uc.reg_read(a32.UC_ARM_REG_R5)) == at + 4
    finally:
        cpu.close()


def test_a32_it_state_cleared_and_saved() -> None:
    """An interrupt inside an IT block: SPSR keeps ITSTATE, the handler runs with it clear."""
    cpu = _Cpu(AArch32())
    uc = cpu.uc
    try:
        cpu.load(CODE, _words(A32_BX_R3))
        cpu.load(BODY, _halfwords(0xBF04, T32_NOP, T32_NOP, T32_NOP))  # itt eq; nop; nop; nop
        cpu.load(VBAR + 0x18, _words(*A32_HANDLER))
        exceptions.cp15_write(uc, 12, 0, 0, VBAR)
        uc.reg_write(a32.UC_ARM_REG_R3, BODY | 1)
        uc.reg_write(a32.UC_ARM_REG_CPSR, (int(uc.reg_read(a32.UC_ARM_REG_CPSR)) & ~0x1C0) | (1 << 30))  # Z
        cpu.run(CODE, BODY + 4)  # IT and the first NOP: one conditional NOP left in the block
        before = int(uc.reg_read(a32.UC_ARM_REG_CPSR))
        assert before & exceptions.CPSR_IT
        exceptions.take_irq(cpu.arch, uc)
        assert not int(uc.reg_read(a32.UC_ARM_REG_CPSR)) & exceptions.CPSR_IT
        assert uc.reg_read(a32.UC_ARM_REG_SPSR) == before
    finally:
        cpu.close()


# ----- the syndrome Unicorn computed --------------------------------------------------------------------------

@pytest.mark.parametrize(("word", "syndrome"), [
    (0xD4000841, 0x5600_0042),  # svc #0x42: EC 0x15, IL, imm16
    (0xD42000E0, 0xF200_0007),  # brk #7: EC 0x3C
    (0x00001234, 0x0200_0000),  # udf #0x1234: EC 0x00, IL
], ids=["svc", "brk", "udf"])
def test_raised_reads_the_syndrome_in_the_hook(word: int, syndrome: int) -> None:
    arch = AArch64()
    uc = arch.new_uc("")
    seen: list[exceptions.Raised] = []
    try:
        uc.mem_map(RAM, 0x1000, UC_PROT_ALL)
        uc.mem_write(RAM, _words(word))

        def hook(uc: Uc, _intno: int, _user: object) -> None:
            seen.append(exceptions.raised(arch, uc))
            uc.emu_stop()

        uc.hook_add(UC_HOOK_INTR, hook)
        uc.emu_start(RAM, RAM + 4, 0, 1)
        assert seen and seen[0].syndrome == syndrome and seen[0].target_el == 1, seen
    finally:
        close_uc(uc)
