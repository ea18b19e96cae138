"""Every synchronous exception a guest can raise reaches its vector with the right syndrome and return state,
on every ISA (issue 11 item 4), and the same guest under QEMU (``-d int``) logs the same syndrome.

Each guest installs the vector table of ``guest_exceptions`` (the handler records what it sees and powers off),
optionally turns the MMU on, and runs one instruction that raises the exception. Expected values are the
architecture's; the QEMU comparison (skipped without QEMU) checks them against qemu-system-aarch64 -cpu cortex-a57
and qemu-system-arm -cpu cortex-a15 on the virt board.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from tests.differential.encoders import A64 as E64
from tests.exitpath.guest_exceptions import (
    A32_LPAE_MMU_ON,
    A32_MMU_ON,
    A32_SET_VBAR,
    A32_TO_USER,
    A64_MMU_ON,
    A64_SET_VBAR,
    A64_TO_EL0,
    EXC_VBAR,
    T32_SET_VBAR,
    T32_TO_USER,
    UNMAPPED_VA,
    a32_lpae_block,
    a32_lpae_tables,
    a32_section,
    a32_tables,
    a64_block,
    a64_tables,
    guest_images,
    qemu_available,
    run_qemu,
    seen,
)
from tests.exitpath.harness import A32, A64, DEV, MASK32, MASK64, T32, body_addr, code, policies, run
from vcpu_service.domain import ErrorKind, EventKind

IL = 1 << 25
EC_SHIFT = 26
MOV_X0_UNMAPPED = E64.mov_imm(0, UNMAPPED_VA)
A32_MOV_R0_UNMAPPED = [0xE3A00102]  # mov r0, #0x80000000


@dataclass(frozen=True)
class Case:
    """A guest: ``setup`` then the instruction ``insn`` that raises the exception, at ``pc``."""

    isa: str
    setup: list[int]
    insn: list[int]
    tables: bytes = b""
    # What the handler must see (see guest_exceptions.Seen); None: not checked.
    esr: int | None = None
    far: int | None = None
    vector: int = 0
    # Return address relative to pc (the instruction) unless ``elr_abs`` is given.
    elr_delta: int = 0
    elr_abs: int | None = None
    spsr_mode: int = 0  # the mode/EL the exception was taken from (SPSR.M[3:0] on A64, SPSR.M on AArch32)
    mode: int = 0  # AArch32: the mode the handler runs in
    qemu: dict[str, int] = field(default_factory=dict)  # extra fields QEMU's log must show

    @property
    def body(self) -> bytes:
        return code(self.isa, *self.setup, *self.insn)

    @property
    def pc(self) -> int:
        return body_addr(self.isa, len(code(self.isa, *self.setup)))

    @property
    def elr(self) -> int:
        return self.elr_abs if self.elr_abs is not None else self.pc + self.elr_delta


def a64_data_abort(dfsc: int, *, wnr: bool = False, el0: bool = False) -> int:
    return ((0x24 if el0 else 0x25) << EC_SHIFT) | IL | (int(wnr) << 6) | dfsc


A64_CASES = {
    # SVC: EC 0x15, imm16 in the ISS; ELR is the next instruction.
    "svc-el1": Case(A64, A64_SET_VBAR, [0xD4000841], esr=(0x15 << EC_SHIFT) | IL | 0x42,  # svc #0x42
                    vector=0x200, elr_delta=4, spsr_mode=0b0101),
    "svc-el0": Case(A64, A64_SET_VBAR + A64_TO_EL0, [0xD4000841], esr=(0x15 << EC_SHIFT) | IL | 0x42,
                    vector=0x400, elr_delta=4, spsr_mode=0b0000),
    # Undefined instruction: EC 0x00, IL 1; ELR is the instruction.
    "udf-el1": Case(A64, A64_SET_VBAR, [0x00001234], esr=IL, vector=0x200, spsr_mode=0b0101),  # udf #0x1234
    "udf-el0": Case(A64, A64_SET_VBAR + A64_TO_EL0, [0x00001234], esr=IL, vector=0x400, spsr_mode=0),
    # A system register EL0 may not read is UNDEFINED at EL0 (EC 0x00 in QEMU's syndrome for this one).
    "mrs-sctlr-el0": Case(A64, A64_SET_VBAR + A64_TO_EL0, [0xD5381000], esr=IL, vector=0x400),  # mrs x0, sctlr_el1
    # HVC at EL0 is UNDEFINED (at EL1 every HVC is a PSCI/SMCCC call: see test_hvc_*).
    "hvc-el0": Case(A64, A64_SET_VBAR + A64_TO_EL0, [0xD40000A2], esr=IL, vector=0x400),  # hvc #5
    # SMC: UNDEFINED on virt (no EL3; PSCI is on HVC); ELR is the SMC.
    "smc-el1": Case(A64, A64_SET_VBAR, [0xD4000003], esr=IL, vector=0x200, spsr_mode=0b0101),  # smc #0
    # BRK: EC 0x3C, the immediate in the ISS; ELR is the instruction.
    "brk": Case(A64, A64_SET_VBAR, [0xD42000E0], esr=(0x3C << EC_SHIFT) | IL | 7, vector=0x200,  # brk #7
                spsr_mode=0b0101),
    # MMU faults (level-1 table: entry 2 invalid unless the case maps it).
    "dabt-translation": Case(A64, A64_SET_VBAR + A64_MMU_ON + MOV_X0_UNMAPPED, [0xF9400001],  # ldr x1, [x0]
                             a64_tables(), esr=a64_data_abort(0x05), far=UNMAPPED_VA, vector=0x200),
    "dabt-permission": Case(A64, A64_SET_VBAR + A64_MMU_ON + MOV_X0_UNMAPPED, [0xF9000001],  # str x1, [x0]
                            a64_tables(a64_block(0x4000_0000, read_only=True)),
                            esr=a64_data_abort(0x0D, wnr=True), far=UNMAPPED_VA, vector=0x200),
    "dabt-el0": Case(A64, A64_SET_VBAR + A64_MMU_ON + MOV_X0_UNMAPPED + A64_TO_EL0, [0xF9400001],
                     a64_tables(el0=True), esr=a64_data_abort(0x05, el0=True), far=UNMAPPED_VA, vector=0x400),
    "iabt-translation": Case(A64, A64_SET_VBAR + A64_MMU_ON + MOV_X0_UNMAPPED, [0xD61F0000],  # br x0
                             a64_tables(), esr=(0x21 << EC_SHIFT) | IL | 0x05, far=UNMAPPED_VA, vector=0x200,
                             elr_abs=UNMAPPED_VA),
    "iabt-permission": Case(A64, A64_SET_VBAR + A64_MMU_ON + MOV_X0_UNMAPPED, [0xD61F0000],
                            a64_tables(a64_block(0x4000_0000, pxn=True)), esr=(0x21 << EC_SHIFT) | IL | 0x0D,
                            far=UNMAPPED_VA, vector=0x200, elr_abs=UNMAPPED_VA),
    "iabt-el0": Case(A64, A64_SET_VBAR + A64_MMU_ON + MOV_X0_UNMAPPED + A64_TO_EL0, [0xD61F0000],
                     a64_tables(el0=True), esr=(0x20 << EC_SHIFT) | IL | 0x05, far=UNMAPPED_VA, vector=0x400,
                     elr_abs=UNMAPPED_VA),
}

SVC_MODE, USR_MODE, UND_MODE, ABT_MODE = 0x13, 0x10, 0x1B, 0x17
A32_CASES = {
    # SVC: Supervisor mode, vector +0x08, LR = the next instruction.
    "a32-svc": Case(A32, A32_SET_VBAR, [0xEF000042], vector=0x08, elr_delta=4, spsr_mode=SVC_MODE, mode=SVC_MODE),
    "a32-svc-user": Case(A32, A32_SET_VBAR + A32_TO_USER, [0xEF000042], vector=0x08, elr_delta=4,
                         spsr_mode=USR_MODE, mode=SVC_MODE),
    "t32-svc": Case(T32, T32_SET_VBAR, [0xDF42], vector=0x08, elr_delta=2, spsr_mode=SVC_MODE, mode=SVC_MODE),
    "t32-svc-user": Case(T32, T32_SET_VBAR + T32_TO_USER, [0xDF42], vector=0x08, elr_delta=2, spsr_mode=USR_MODE,
                         mode=SVC_MODE),
    # Undefined instruction: Undefined mode, vector +0x04, LR = the instruction + 4 (ARM) / + 2 (Thumb).
    "a32-udf": Case(A32, A32_SET_VBAR, [0xE7F000F0], vector=0x04, elr_delta=4, spsr_mode=SVC_MODE, mode=UND_MODE),
    "a32-udf-user": Case(A32, A32_SET_VBAR + A32_TO_USER, [0xE7F000F0], vector=0x04, elr_delta=4,
                         spsr_mode=USR_MODE, mode=UND_MODE),
    "t16-udf": Case(T32, T32_SET_VBAR, [0xDE00], vector=0x04, elr_delta=2, spsr_mode=SVC_MODE, mode=UND_MODE),
    "t32-udf-w": Case(T32, T32_SET_VBAR, [0xF7F0, 0xA000], vector=0x04, elr_delta=2, spsr_mode=SVC_MODE,
                      mode=UND_MODE),
    # HVC from User mode is UNDEFINED.
    "a32-hvc-user": Case(A32, A32_SET_VBAR + A32_TO_USER, [0xE1400070], vector=0x04, elr_delta=4,
                         spsr_mode=USR_MODE, mode=UND_MODE),
    "t32-hvc-user": Case(T32, T32_SET_VBAR + T32_TO_USER, [0xF7E0, 0x8000], vector=0x04, elr_delta=2,
                         spsr_mode=USR_MODE, mode=UND_MODE),
    "a32-smc": Case(A32, A32_SET_VBAR, [0xE1600070], vector=0x04, elr_delta=4, spsr_mode=SVC_MODE, mode=UND_MODE),
    "t32-smc": Case(T32, T32_SET_VBAR, [0xF7F0, 0x8000], vector=0x04, elr_delta=2, spsr_mode=SVC_MODE,
                    mode=UND_MODE),
    # BKPT: a prefetch abort (debug event): Abort mode, vector +0x0C, IFSR FS 0b00010, LR = the instruction + 4.
    "a32-bkpt": Case(A32, A32_SET_VBAR, [0xE1200070], esr=0x2, vector=0x0C, elr_delta=4, spsr_mode=SVC_MODE,
                     mode=ABT_MODE),
    "t16-bkpt": Case(T32, T32_SET_VBAR, [0xBE00], esr=0x2, vector=0x0C, elr_delta=4, spsr_mode=SVC_MODE,
                     mode=ABT_MODE),
    # MMU faults, short-descriptor: DFSR/IFSR FS 0b00101 (section translation), 0b01101 (section permission).
    "a32-dabt-translation": Case(A32, A32_SET_VBAR + A32_MMU_ON + A32_MOV_R0_UNMAPPED, [0xE5901000],  # ldr r1,[r0]
                                 a32_tables(), esr=0x5, far=UNMAPPED_VA, vector=0x10, elr_delta=8,
                                 spsr_mode=SVC_MODE, mode=ABT_MODE),
    "a32-dabt-permission": Case(A32, A32_SET_VBAR + A32_MMU_ON + A32_MOV_R0_UNMAPPED, [0xE5801000],  # str r1,[r0]
                                a32_tables({0x800: a32_section(0x4000_0000, read_only=True)}), esr=0x80D,
                                far=UNMAPPED_VA, vector=0x10, elr_delta=8, spsr_mode=SVC_MODE, mode=ABT_MODE),
    "a32-pabt-translation": Case(A32, A32_SET_VBAR + A32_MMU_ON + A32_MOV_R0_UNMAPPED, [0xE12FFF10],  # bx r0
                                 a32_tables(), esr=0x5, far=UNMAPPED_VA, vector=0x0C, elr_abs=UNMAPPED_VA + 4,
                                 spsr_mode=SVC_MODE, mode=ABT_MODE),
    # The same with TTBCR.EAE: the long-descriptor format, bit 9 set and STATUS 0x04+level / 0x0C+level.
    "a32-lpae-dabt-translation": Case(A32, A32_SET_VBAR + A32_LPAE_MMU_ON + A32_MOV_R0_UNMAPPED, [0xE5901000],
                                      a32_lpae_tables(), esr=0x205, far=UNMAPPED_VA, vector=0x10, elr_delta=8,
                                      spsr_mode=SVC_MODE, mode=ABT_MODE),
    "a32-lpae-dabt-permission": Case(A32, A32_SET_VBAR + A32_LPAE_MMU_ON + A32_MOV_R0_UNMAPPED, [0xE5801000],
                                     a32_lpae_tables(a32_lpae_block(0x4000_0000, read_only=True)), esr=0xA0D,
                                     far=UNMAPPED_VA, vector=0x10, elr_delta=8, spsr_mode=SVC_MODE, mode=ABT_MODE),
    "a32-lpae-pabt-translation": Case(A32, A32_SET_VBAR + A32_LPAE_MMU_ON + A32_MOV_R0_UNMAPPED, [0xE12FFF10],
                                      a32_lpae_tables(), esr=0x205, far=UNMAPPED_VA, vector=0x0C,
                                      elr_abs=UNMAPPED_VA + 4, spsr_mode=SVC_MODE, mode=ABT_MODE),
}
CASES = {**A64_CASES, **A32_CASES}


@pytest.mark.parametrize("name", list(CASES))
def test_exception_reaches_its_vector(name: str) -> None:
    case = CASES[name]
    res = run(case.isa, case.body, ram=guest_images(case.isa, case.body, case.tables))
    got = seen(res)
    assert got.vector == case.vector, (name, hex(got.vector), res.final)
    if case.esr is not None:
        assert got.esr == case.esr, (name, hex(got.esr))
    if case.far is not None:
        assert got.far == case.far, (name, hex(got.far))
    assert got.elr == case.elr, (name, hex(got.elr), hex(case.elr))
    if case.isa == A64:
        if case.spsr_mode or "el1" in name:
            assert got.spsr & 0xF == case.spsr_mode, hex(got.spsr)
        assert (got.spsr & 0xF == 0) == ("el0" in name), hex(got.spsr)
    else:
        assert got.mode == case.mode, hex(got.mode)
        assert got.spsr & 0x1F == case.spsr_mode, hex(got.spsr)
        assert bool(got.spsr & 0x20) == (case.isa == T32 and "pabt" not in name), hex(got.spsr)  # SPSR.T


@pytest.mark.parametrize("name", list(CASES))
def test_qemu_agrees(name: str) -> None:
    case = CASES[name]
    if not qemu_available(case.isa):
        pytest.skip("QEMU is not installed")
    entries = run_qemu(case.isa, case.body, guest_images(case.isa, case.body, case.tables))
    assert entries, "QEMU logged no exception"
    first = entries[0].fields
    if case.isa == A64:
        assert first.get("esr") == case.esr, (name, entries[0])
        assert first.get("elr") == case.elr, (name, entries[0])
        if case.far is not None:
            assert first.get("far") == case.far, (name, entries[0])
    elif case.esr is not None:
        prefix = "i" if case.vector == 0x0C else "d"
        assert first.get(f"{prefix}fsr") == case.esr, (name, entries[0])
        if case.far is not None:
            assert first.get(f"{prefix}far") == case.far, (name, entries[0])


# ----- what is not an exception -----------------------------------------------------------------------------

A64_HVC_UNKNOWN = [0xD2824680, 0xF2B0C000, 0xD4000002]  # mov x0, #0x1234; movk x0, #0x8600, lsl #16; hvc #0
A32_HVC_UNKNOWN = [0xE3010234, 0xE3480600, 0xE1400070]  # movw r0, #0x1234; movt r0, #0x8600; hvc #0


@pytest.mark.parametrize("isa", [A64, A32])
def test_hvc_at_el1_with_an_unknown_function_id_returns_not_supported(isa: str) -> None:
    # QEMU >= 7.1 on virt (HVC conduit, no EL2) and KVM: every HVC at EL1 is an SMCCC call; unknown -> -1 in x0/r0.
    body = code(isa, *(A64_HVC_UNKNOWN if isa == A64 else A32_HVC_UNKNOWN))
    res = run(isa, body)
    assert res.finished_body, res.final
    assert res.regs["x0" if isa == A64 else "r0"] == (MASK64 if isa == A64 else MASK32)


@pytest.mark.parametrize(("isa", "hints"), [
    (A64, [0xD503203F, 0xD503205F]),  # yield; wfe
    (A32, [0xE320F001, 0xE320F002]),  # yield; wfe
    (T32, [0xBF10, 0xBF20, 0xF3AF, 0x8001, 0xF3AF, 0x8002]),  # yield; wfe; yield.w; wfe.w
], ids=["a64", "a32", "t32"])
def test_yield_and_wfe_are_hints(isa: str, hints: list[int]) -> None:
    # Unicorn ends emu_start after an AArch32 YIELD/WFE with UC_ERR_INSN_INVALID, as for an undefined instruction.
    mark = {A64: 0x91000442, A32: 0xE2822001, T32: 0x3201}[isa]  # add x2, x2, #1 / add r2, r2, #1 / adds r2, #1
    res = run(isa, code(isa, *hints, mark))
    assert res.finished_body, res.final
    assert res.regs["x2" if isa == A64 else "r2"] == 1


@pytest.mark.parametrize("isa", [A32, T32])
def test_an_undefined_instruction_right_after_wfe_is_still_undefined(isa: str) -> None:
    setup = [*A32_SET_VBAR, 0xE320F002] if isa == A32 else [*T32_SET_VBAR, 0xBF20]  # ...; wfe
    udf = [0xE7F000F0] if isa == A32 else [0xDE00]
    case = Case(isa, setup, udf)
    res = run(isa, case.body, ram=guest_images(isa, case.body))
    got = seen(res)
    assert got.vector == 0x04 and got.mode == UND_MODE
    assert got.elr == case.pc + (4 if isa == A32 else 2)


# ----- a guest with no vectors --------------------------------------------------------------------------------

def test_an_exception_without_vectors_ends_the_run_naming_it() -> None:
    # VBAR_EL1 = 0 and nothing at 0: the fetch of the vector fails, and the error says which exception led there.
    res = run(A64, code(A64, 0xD4000841), regs={"vbar_el1": 0})  # svc #0x42
    assert res.final.kind == EventKind.ERROR and res.final.error_kind == ErrorKind.GUEST_EXCEPTION
    assert res.final.fault_address == 0x200 and res.final.pc == body_addr(A64)  # the SVC
    assert res.final.syndrome == 0x5600_0042
    reason = res.final.reason
    assert "instruction fetch from 0x200" in reason and "vector of the SVC" in reason, reason
    assert f"at 0x{body_addr(A64):x}" in reason and "syndrome 0x56000042" in reason, reason


@pytest.mark.parametrize("isa", [A64, A32])
def test_an_empty_vector_table_in_ram_is_an_exception_loop(isa: str) -> None:
    # Zeroed RAM at the vectors: on A64 0x00000000 is UDF #0, so the vector raises an undefined instruction at
    # itself for ever (on AArch32 zero is ANDEQ: the test puts a UDF at the Undefined vector instead).
    empty = 0x4010_0000
    if isa == A64:
        res = run(A64, code(A64, 0x00001234), regs={"vbar_el1": empty})  # udf #0x1234
    else:
        set_vbar = [0xE3A00601, 0xE3800101, 0xEE0C0F10, 0xF57FF06F]  # mov r0,#0x100000; orr r0,#0x40000000; mcr; isb
        res = run(A32, code(A32, *set_vbar, 0xE7F000F0), ram={empty + 0x4: code(A32, 0xE7F000F0)})
    assert res.final.kind == EventKind.ERROR and res.final.error_kind == ErrorKind.GUEST_EXCEPTION, res.final
    assert "exception loop" in res.final.reason and "undefined instruction" in res.final.reason, res.final.reason


# ----- handlers that return -------------------------------------------------------------------------------------

@pytest.mark.parametrize("isa", [A64, A32, T32])
def test_an_svc_handler_returns_to_the_next_instruction(isa: str) -> None:
    # The handler counts in x2/r2 and returns (ERET / MOVS PC, LR): the body runs on after each SVC, in the state
    # it had (Thumb included: SPSR_svc.T).
    if isa == A64:
        setup, svc, handler, at = A64_SET_VBAR, [0xD4000841], [0x91000442, 0xD69F03E0], 0x200  # add; eret
    else:
        setup = A32_SET_VBAR if isa == A32 else T32_SET_VBAR
        svc = [0xEF000042] if isa == A32 else [0xDF42]
        handler, at = [0xE2822001, 0xE1B0F00E], 0x08  # add r2, r2, #1; movs pc, lr
    vectors = bytearray(guest_images(isa, b"")[EXC_VBAR])
    vectors[at:at + 8] = code(A64 if isa == A64 else A32, *handler)
    res = run(isa, code(isa, *setup, *svc, *svc), ram={EXC_VBAR: bytes(vectors)})
    assert res.finished_body, res.final
    assert res.regs["x2" if isa == A64 else "r2"] == 2


def test_an_aarch32_alignment_fault_with_lpae_has_the_long_descriptor_format() -> None:
    # TTBCR.EAE = 1 (MMU still off): the DFSR of the alignment fault is LPAE-format, bit 9 and STATUS 0x21.
    setup = [*A32_SET_VBAR, 0xE3A00102, 0xEE020F50, 0xF57FF06F]  # ...; mov r0, #0x80000000; mcr TTBCR; isb
    case = Case(A32, setup, [0xE5931000])  # ldr r1, [r3]
    res = run(A32, case.body, regs={"r3": DEV + 1}, ram=guest_images(A32, case.body))
    got = seen(res)
    assert (got.vector, got.mode, got.elr) == (0x10, ABT_MODE, case.pc + 8)
    assert (got.dfsr, got.dfar) == ((1 << 9) | 0x21, DEV + 1)


# ----- a guest that retries a fault for ever -----------------------------------------------------------------

@pytest.mark.parametrize("isa", [A64, A32])
def test_a_handler_that_returns_to_the_faulting_load_is_stopped(isa: str) -> None:
    # The load faults (an unmapped address under the abort policy); the handler returns to it unchanged (ERET to
    # ELR / SUBS PC, LR, #8), so it faults again, for ever. The run ends with an error naming it.
    wild = 0x3000_0000
    handler = 0x4010_0000
    if isa == A64:
        body = code(A64, *E64.mov_imm(1, wild), 0xB9400022)  # ldr w2, [x1]
        res = run(A64, body, regs={"vbar_el1": handler}, pol=policies(unmapped="abort"),
                  ram={handler + 0x200: code(A64, 0xD69F03E0)})  # eret
    else:
        set_vbar = [0xE3A00601, 0xE3800101, 0xEE0C0F10, 0xF57FF06F]  # r0 = 0x40100000; mcr VBAR; isb
        body = code(A32, *set_vbar, 0xE3A01203, 0xE5912000)  # mov r1, #0x3000_0000; ldr r2, [r1]
        res = run(A32, body, pol=policies(unmapped="abort"),
                  ram={handler + 0x10: code(A32, 0xE25EF008)})  # subs pc, lr, #8
    assert res.final.kind == EventKind.ERROR and res.final.error_kind == ErrorKind.GUEST_EXCEPTION, res.final
    assert "re-fault loop" in res.final.reason and "1000 times" in res.final.reason, res.final.reason
    assert res.final.fault_address == wild, res.final


def test_a_handler_that_skips_the_faulting_svc_runs_on() -> None:
    # SVCs raised by one instruction over and over are a loop of system calls, not a re-fault: never stopped.
    handler = 0x4010_0000
    body = code(A64, *E64.mov_imm(3, 2000), 0xD4000001, 0xF1000463, 0x54FFFFC1,  # svc; subs x3, #1; b.ne svc
                *[0xD2800100, 0xF2B08000, 0xD4000002])  # PSCI SYSTEM_OFF
    res = run(A64, body, regs={"vbar_el1": handler}, ram={handler + 0x200: code(A64, 0xD69F03E0)})  # eret
    assert res.final.kind == EventKind.POWERED_OFF, res.final
