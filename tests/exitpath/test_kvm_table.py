"""kvm-mmio.md section 5, the data path: cases 1-13 and 25-29, for every ISA where they apply.

Each guest is a few literal instruction words (assembled with aarch64-linux-gnu-as / arm-none-eabi-as
-mcpu=cortex-a15 [-mthumb]; the assembly is in the comments), run in-process through the real exit path.
A marker instruction after the access (`add x2, x2, #1` / `add r2, r2, #1` / T16 `adds r2, #1`) proves
that PC advanced by exactly the instruction's length: too far skips the marker, not far enough repeats
the access (the device log would show it twice).
"""

from __future__ import annotations

import pytest

from tests.exitpath.harness import (
    A32,
    A64,
    DEV,
    MASK32,
    MASK64,
    T32,
    Access,
    Probe,
    Result,
    body_addr,
    code,
    expect_sea,
    halfwords,
    refuse_from,
    run,
    words,
)

MARK = {A64: 0x91000442, A32: 0xE2822001, T32: 0x3201}  # add x2,x2,#1 / add r2,r2,#1 / adds r2,#1
RT = {A64: "x1", A32: "r1", T32: "r1"}


def _probe(value: int = 0, size: int = 8, offset: int = 0) -> Probe:
    probe = Probe()
    probe.load(offset, value, size)
    return probe


def _load(isa: str, insn: tuple[int, ...], value: int, size: int, rt_before: int, **regs: int) -> tuple[Result, Probe]:
    """Run one load (insn: its word, or its halfwords for T32) followed by the marker; check the common part."""
    probe = _probe(value, size)
    base = "x0" if isa == A64 else "r0"
    res = run(isa, code(isa, *insn, MARK[isa]), regs={base: DEV, RT[isa]: rt_before, **regs}, devices=[probe])
    assert res.finished_body, res.final
    assert probe.log == [Access(0, size, False, 0)]
    assert res.regs["x2" if isa == A64 else "r2"] == 1  # the marker ran once: PC advanced by exactly one insn
    assert res.vcpu_stats.reads == 1 and res.vcpu_stats.exits == 1
    (record,) = res.trace
    assert record.size == size and not record.is_write and record.srt == 1 and record.outcome == "ok"
    return res, probe


# ----- cases 1-7: width, sign and zero extension -------------------------------------------------------------

LOADS = [
    # (id, isa, instruction, device value, access size, Rt before, Rt after, SSE, SF)
    # case 1: a W target clears the upper half (SF=0)
    ("c01-a64-ldr-w", A64, (0xB9400001,), 0x8000_0000, 4, MASK64, 0x0000_0000_8000_0000, False, False),  # ldr w1,[x0]
    ("c01-a32-ldr", A32, (0xE5901000,), 0x8000_0000, 4, MASK32, 0x8000_0000, False, False),  # ldr r1,[r0]
    ("c01-t16-ldr", T32, (0x6801,), 0x8000_0000, 4, MASK32, 0x8000_0000, False, False),  # ldr r1,[r0,#0]
    ("c01-t32-ldr.w", T32, (0xF8D0, 0x1000), 0x8000_0000, 4, MASK32, 0x8000_0000, False, False),  # ldr.w r1,[r0]
    # case 2: 8 bytes
    ("c02-a64-ldr-x", A64, (0xF9400001,), 0x8877_6655_4433_2211, 8, 0, 0x8877_6655_4433_2211, False, True),
    # case 3: ldrsb w1,[x0]: sign-extended to 32 bits, upper half zero (upstream KVM zero-extends, [S27])
    ("c03-a64-ldrsb-w", A64, (0x39C00001,), 0x80, 1, MASK64, 0x0000_0000_FFFF_FF80, True, False),
    # case 4: ldrsb x1,[x0]
    ("c04-a64-ldrsb-x", A64, (0x39800001,), 0x80, 1, 0, 0xFFFF_FFFF_FFFF_FF80, True, True),
    # case 5: ldrsh w1,[x0] / ldrsh x1,[x0]
    ("c05-a64-ldrsh-w", A64, (0x79C00001,), 0x8001, 2, MASK64, 0x0000_0000_FFFF_8001, True, False),
    ("c05-a64-ldrsh-x", A64, (0x79800001,), 0x8001, 2, 0, 0xFFFF_FFFF_FFFF_8001, True, True),
    # case 6: ldrsw x1,[x0]
    ("c06-a64-ldrsw", A64, (0xB9800001,), 0x8000_0000, 4, 0, 0xFFFF_FFFF_8000_0000, True, True),
    # case 7: unsigned loads zero-extend even with the top bit set; a positive signed byte stays as it is
    ("c07-a64-ldrb", A64, (0x39400001,), 0x80, 1, MASK64, 0x80, False, False),  # ldrb w1,[x0]
    ("c07-a64-ldrh", A64, (0x79400001,), 0x8001, 2, MASK64, 0x8001, False, False),  # ldrh w1,[x0]
    ("c07-a64-ldrsb-7f", A64, (0x39C00001,), 0x7F, 1, MASK64, 0x7F, True, False),  # ldrsb w1,[x0]
    ("c07-a64-ldrsb-x-7f", A64, (0x39800001,), 0x7F, 1, MASK64, 0x7F, True, True),  # ldrsb x1,[x0]
    ("c07-a32-ldrb", A32, (0xE5D01000,), 0x80, 1, MASK32, 0x80, False, False),  # ldrb r1,[r0]
    ("c07-a32-ldrh", A32, (0xE1D010B0,), 0x8001, 2, MASK32, 0x8001, False, False),  # ldrh r1,[r0]
    ("c07-a32-ldrsb-7f", A32, (0xE1D010D0,), 0x7F, 1, MASK32, 0x7F, True, False),  # ldrsb r1,[r0]
    ("c07-t16-ldrb", T32, (0x7801,), 0x80, 1, MASK32, 0x80, False, False),  # ldrb r1,[r0,#0]
    ("c07-t16-ldrh", T32, (0x8801,), 0x8001, 2, MASK32, 0x8001, False, False),  # ldrh r1,[r0,#0]
    ("c07-t16-ldrsb-7f", T32, (0x5681,), 0x7F, 1, MASK32, 0x7F, True, False),  # ldrsb r1,[r0,r2] (r2=0)
    ("c07-t32-ldrb.w", T32, (0xF890, 0x1000), 0x80, 1, MASK32, 0x80, False, False),  # ldrb.w r1,[r0]
    ("c07-t32-ldrh.w", T32, (0xF8B0, 0x1000), 0x8001, 2, MASK32, 0x8001, False, False),  # ldrh.w r1,[r0]
    # case 29: AArch32 sign extension (r1 = 0xFFFFFF80 / 0xFFFF8001)
    ("c29-a32-ldrsb", A32, (0xE1D010D0,), 0x80, 1, 0, 0xFFFF_FF80, True, False),  # ldrsb r1,[r0]
    ("c29-a32-ldrsh", A32, (0xE1D010F0,), 0x8001, 2, 0, 0xFFFF_8001, True, False),  # ldrsh r1,[r0]
    ("c29-t16-ldrsb", T32, (0x5681,), 0x80, 1, 0, 0xFFFF_FF80, True, False),  # ldrsb r1,[r0,r2] (r2=0)
    ("c29-t16-ldrsh", T32, (0x5E81,), 0x8001, 2, 0, 0xFFFF_8001, True, False),  # ldrsh r1,[r0,r2] (r2=0)
    ("c29-t32-ldrsb.w", T32, (0xF990, 0x1000), 0x80, 1, 0, 0xFFFF_FF80, True, False),  # ldrsb.w r1,[r0]
    ("c29-t32-ldrsh.w", T32, (0xF9B0, 0x1000), 0x8001, 2, 0, 0xFFFF_8001, True, False),  # ldrsh.w r1,[r0]
]


@pytest.mark.parametrize(("isa", "insn", "value", "size", "before", "after", "sse", "sf"),
                         [case[1:] for case in LOADS], ids=[case[0] for case in LOADS])
def test_case01_07_29_load_width_and_extension(isa: str, insn: tuple[int, ...], value: int, size: int, before: int,
                                               after: int, sse: bool, sf: bool) -> None:
    res, _probe = _load(isa, insn, value, size, before)
    assert res.regs[RT[isa]] == after, hex(res.regs[RT[isa]])
    (record,) = res.trace
    assert record.sign_extend == sse and record.sixty_four == sf
    # The syndrome the exit carried: ISV=1, SAS, SSE, SRT=1, SF, WnR=0.
    iss = record.syndrome
    assert (iss >> 24) & 1 == 1 and (iss >> 22) & 3 == size.bit_length() - 1
    assert (iss >> 21) & 1 == sse and (iss >> 16) & 0x1F == 1 and (iss >> 15) & 1 == sf and not (iss >> 6) & 1


# More A64 forms that have a syndrome (kvm-mmio.md 1.3): unscaled, register offset, acquire, unprivileged.
A64_ISV_FORMS = [
    ("ldur", 0xB85FC001, 0x10 - 4, {}),  # ldur w1, [x0, #-4]            (x0 = DEV + 0x10)
    ("ldr-reg", 0xB8626801, 0x10 + 0x20, {"x2": 0x20}),  # ldr w1, [x0, x2]
    ("ldr-uxtw", 0xB8625801, 0x10 + 0x40, {"x2": 0x10}),  # ldr w1, [x0, w2, uxtw #2]
    ("ldar", 0x88DFFC01, 0x10, {}),  # ldar w1, [x0]
    ("ldtr", 0xB8400801, 0x10, {}),  # ldtr w1, [x0]
]


@pytest.mark.parametrize(("insn", "offset", "regs"), [f[1:] for f in A64_ISV_FORMS], ids=[f[0] for f in A64_ISV_FORMS])
def test_case01_a64_single_register_forms_with_a_syndrome(insn: int, offset: int, regs: dict[str, int]) -> None:
    probe = _probe(0xCAFE_F00D, 4, offset)
    res = run(A64, words(insn), regs={"x0": DEV + 0x10, "x1": MASK64, **regs}, devices=[probe])
    assert res.finished_body
    assert probe.log == [Access(offset, 4, False, 0)]
    assert res.regs["x1"] == 0xCAFE_F00D and res.regs["x0"] == DEV + 0x10
    assert res.vcpu_stats.hand_decoded == 0 and res.trace[0].writeback == ""


# ----- cases 8-10: the zero register and SP ----------------------------------------------------------------

def test_case08_store_of_wzr_and_xzr_writes_zeros_not_sp() -> None:
    probe = _probe(MASK64, 8)
    probe.load(8, MASK64, 8)
    sp = 0x403F_FEF0  # if Rt=31 were read as SP, the device would see these bytes
    body = words(
        0xB900001F,  # str wzr, [x0]
        0xF900041F,  # str xzr, [x0, #8]
        0x91000442,  # add x2, x2, #1
    )
    regs = {"x0": DEV, "x1": 0x1111, "sp": sp}
    res = run(A64, body, regs=regs, devices=[probe])
    assert res.finished_body
    assert probe.log == [Access(0, 4, True, 0), Access(8, 8, True, 0)]
    assert probe.memory[:16] == bytes(4) + b"\xff" * 4 + bytes(8)
    assert res.regs["sp"] == sp and res.regs["x1"] == 0x1111 and res.regs["x2"] == 1
    assert [r.srt for r in res.trace] == [31, 31]


def test_case09_load_to_xzr_reads_the_device_and_discards_the_value() -> None:
    probe = _probe(0x1234_5678_9ABC_DEF0, 8)
    sp = 0x403F_FEF0
    res = run(A64, words(0xF940001F, 0x91000442),  # ldr xzr, [x0]; add x2, x2, #1
              regs={"x0": DEV, "x1": 0x1111, "sp": sp}, devices=[probe])
    assert res.finished_body
    assert probe.log == [Access(0, 8, False, 0)]  # the side effect of the read happened
    assert res.regs["sp"] == sp  # Rt=31 is XZR, never SP
    assert res.regs["x1"] == 0x1111 and res.regs["x2"] == 1
    assert res.vcpu_stats.reads == 1


@pytest.mark.parametrize(("isa", "insn", "size"), [
    (A64, (0xF94007E1,), 8),  # ldr x1, [sp, #8]
    (A32, (0xE59D1008,), 4),  # ldr r1, [sp, #8]
    (T32, (0x9902,), 4),  # ldr r1, [sp, #8]   (T16, the SP-relative encoding)
], ids=["a64", "a32", "t16"])
def test_case10_load_with_sp_as_the_base(isa: str, insn: tuple[int, ...], size: int) -> None:
    value = 0x0102_0304_0506_0708 & ((1 << (8 * size)) - 1)
    probe = _probe(value, size, 0x108)
    res = run(isa, code(isa, *insn, MARK[isa]), regs={"sp": DEV + 0x100}, devices=[probe])
    assert res.finished_body
    assert probe.log == [Access(0x108, size, False, 0)]
    assert res.regs[RT[isa]] == value
    assert res.regs["sp"] == DEV + 0x100  # the base is not written back
    assert res.regs["x2" if isa == A64 else "r2"] == 1


# ----- cases 11-13: store data and endianness ----------------------------------------------------------------

STORES_LE = [
    # (id, isa, instruction, Rt value, bytes the device must receive)
    ("a64-str-w", A64, (0xB9000001,), 0x1122_3344_5566_7788, b"\x88\x77\x66\x55"),  # str w1, [x0]
    ("a64-str-x", A64, (0xF9000001,), 0x1122_3344_5566_7788, bytes.fromhex("8877665544332211")),  # str x1, [x0]
    ("a64-strh", A64, (0x79000001,), 0x1122_3344_5566_7788, b"\x88\x77"),  # strh w1, [x0]
    ("a64-strb", A64, (0x39000001,), 0x1122_3344_5566_7788, b"\x88"),  # strb w1, [x0]
    ("a32-str", A32, (0xE5801000,), 0x5566_7788, b"\x88\x77\x66\x55"),  # str r1, [r0]
    ("a32-strh", A32, (0xE1C010B0,), 0x5566_7788, b"\x88\x77"),  # strh r1, [r0]
    ("a32-strb", A32, (0xE5C01000,), 0x5566_7788, b"\x88"),  # strb r1, [r0]
    ("t16-str", T32, (0x6001,), 0x5566_7788, b"\x88\x77\x66\x55"),  # str r1, [r0, #0]
    ("t16-strh", T32, (0x8001,), 0x5566_7788, b"\x88\x77"),  # strh r1, [r0, #0]
    ("t32-str.w", T32, (0xF8C0, 0x1000), 0x5566_7788, b"\x88\x77\x66\x55"),  # str.w r1, [r0]
]


@pytest.mark.parametrize(("isa", "insn", "rt", "data"), [s[1:] for s in STORES_LE], ids=[s[0] for s in STORES_LE])
def test_case11_little_endian_store_data(isa: str, insn: tuple[int, ...], rt: int, data: bytes) -> None:
    probe = Probe()
    probe.memory[:8] = b"\xee" * 8
    base = "x0" if isa == A64 else "r0"
    res = run(isa, code(isa, *insn, MARK[isa]), regs={base: DEV, RT[isa]: rt}, devices=[probe])
    assert res.finished_body
    assert probe.log == [Access(0, len(data), True, int.from_bytes(data, "little"))]
    assert probe.memory[:8] == data + b"\xee" * (8 - len(data))  # no byte beyond the access is touched
    assert res.regs[RT[isa]] == rt  # a store leaves Rt alone
    assert res.vcpu_stats.writes == 1 and res.vcpu_stats.reads == 0


# Big-endian data at EL1: SCTLR_EL1.EE=1 (A64); CPSR.E=1 via SETEND BE (AArch32).
A64_SET_EE = [
    0xD5381009,  # mrs x9, sctlr_el1
    0xB2670129,  # orr x9, x9, #0x2000000     (EE, bit 25)
    0xD5181009,  # msr sctlr_el1, x9
    0xD5033FDF,  # isb
]
A32_SETEND_BE, A32_SETEND_LE = 0xF1010200, 0xF1010000  # setend be / setend le
T16_SETEND_BE, T16_SETEND_LE = 0xB658, 0xB650


def _big_endian(isa: str, *insn: int) -> bytes:
    if isa == A64:
        return words(*A64_SET_EE, *insn, MARK[A64])
    if isa == A32:
        return words(A32_SETEND_BE, *insn, MARK[A32], A32_SETEND_LE)
    return halfwords(T16_SETEND_BE, *insn, MARK[T32], T16_SETEND_LE)


@pytest.mark.parametrize(("isa", "insn", "rt"), [
    (A64, (0xB9000001,), 0x1122_3344_5566_7788),  # str w1, [x0]
    (A32, (0xE5801000,), 0x5566_7788),  # str r1, [r0]
    (T32, (0x6001,), 0x5566_7788),  # str r1, [r0, #0]
    (T32, (0xF8C0, 0x1000), 0x5566_7788),  # str.w r1, [r0]
], ids=["a64-ee", "a32-setend", "t16-setend", "t32-setend"])
def test_case12_big_endian_store_data(isa: str, insn: tuple[int, ...], rt: int) -> None:
    probe = Probe()
    base = "x0" if isa == A64 else "r0"
    res = run(isa, _big_endian(isa, *insn), regs={base: DEV, RT[isa]: rt}, devices=[probe])
    assert res.finished_body
    assert probe.memory[:4] == b"\x55\x66\x77\x88"
    # The device is a little-endian bus slave: it sees the bytes 55 66 77 88 as the value 0x88776655.
    assert probe.log == [Access(0, 4, True, 0x8877_6655)]


A64_TO_EL0 = [
    0xD5381009,  # mrs  x9, sctlr_el1
    0xB2680129,  # orr  x9, x9, #0x1000000    (E0E, bit 24: EL0 data is big-endian)
    0xD5181009,  # msr  sctlr_el1, x9
    0xD5033FDF,  # isb
    0x10000089,  # adr  x9, .+16
    0xD5184029,  # msr  elr_el1, x9
    0xD518401F,  # msr  spsr_el1, xzr         (EL0t)
    0xD69F03E0,  # eret
]
A64_TO_EL0_EE = [A64_TO_EL0[0], 0xB2670129, *A64_TO_EL0[2:]]  # orr x9, x9, #0x2000000 (EE only)


@pytest.mark.parametrize(("prologue", "data"), [
    (A64_TO_EL0, b"\x55\x66\x77\x88"),  # SCTLR_EL1.E0E=1: big-endian at EL0
    (A64_TO_EL0_EE, b"\x88\x77\x66\x55"),  # SCTLR_EL1.EE=1 only: EL0 stays little-endian
], ids=["e0e", "ee-only"])
def test_case12_el0_data_endianness_follows_e0e(prologue: list[int], data: bytes) -> None:
    # At EL0 the guest cannot call PSCI, so it ends by reading a register the device refuses: the external
    # abort is taken from EL0 (EC 0x24, vector +0x400) and the handler powers off.
    probe = Probe(fail=refuse_from(0x1000))
    body = words(
        *prologue,
        0xB9000001,  # str w1, [x0]                (at EL0)
        0xB9500002,  # ldr w2, [x0, #0x1000]       (refused by the device)
    )
    res = run(A64, body, regs={"x0": DEV, "x1": 0x1122_3344_5566_7788, "x2": 7}, devices=[probe])
    expect_sea(res, pc=body_addr(A64, 4 * len(prologue) + 4), far=DEV + 0x1000, el0=True)
    assert probe.memory[:4] == data
    assert res.regs["x2"] == 7  # the refused load wrote nothing


@pytest.mark.parametrize(("isa", "insn"), [
    (A64, (0x79C00001,)),  # ldrsh w1, [x0]
    (A32, (0xE1D010F0,)),  # ldrsh r1, [r0]
    (T32, (0x5E81,)),  # ldrsh r1, [r0, r2]   (r2 = 0)
    (T32, (0xF9B0, 0x1000)),  # ldrsh.w r1, [r0]
], ids=["a64-ee", "a32-setend", "t16-setend", "t32-setend"])
def test_case13_big_endian_signed_halfword_load(isa: str, insn: tuple[int, ...]) -> None:
    probe = Probe()
    probe.memory[:2] = b"\x80\x01"
    base = "x0" if isa == A64 else "r0"
    res = run(isa, _big_endian(isa, *insn), regs={base: DEV, RT[isa]: MASK64 if isa == A64 else 0}, devices=[probe])
    assert res.finished_body
    assert res.regs[RT[isa]] == 0xFFFF_8001  # W target on A64: the upper half is cleared
    assert probe.log == [Access(0, 2, False, 0)]
    assert res.regs["x2" if isa == A64 else "r2"] == 1


def test_case13_big_endian_doubleword_load() -> None:
    probe = Probe()
    probe.memory[:8] = bytes.fromhex("1122334455667788")
    res = run(A64, _big_endian(A64, 0xF9400001), regs={"x0": DEV}, devices=[probe])  # ldr x1, [x0]
    assert res.finished_body
    assert res.regs["x1"] == 0x1122_3344_5566_7788


# ----- cases 25-28: Thumb lengths, IT blocks, conditions -----------------------------------------------------

@pytest.mark.parametrize(("insn", "length"), [
    ((0x6841,), 2),  # case 25: ldr r1, [r0, #4]       (T16, IL=0)
    ((0xF8D0, 0x1004), 4),  # case 26: ldr.w r1, [r0, #4]  (T32, IL=1)
], ids=["c25-t16", "c26-t32"])
def test_case25_26_thumb_load_advances_pc_by_its_length(insn: tuple[int, ...], length: int) -> None:
    probe = _probe(0xAABB_CCDD, 4, 4)
    body = halfwords(
        *insn,
        0x3201,  # adds r2, #1                   (right after the load: PC + 2 or PC + 4)
        0x3202,  # adds r2, #2
    )
    res = run(T32, body, regs={"r0": DEV}, devices=[probe])
    assert res.finished_body
    assert res.regs["r1"] == 0xAABB_CCDD
    assert res.regs["r2"] == 3  # both markers ran: the load was skipped by exactly its own length
    assert probe.log == [Access(4, 4, False, 0)]
    (record,) = res.trace
    assert record.insn_len == length and record.pc == body_addr(T32)
    assert (record.syndrome >> 25) & 1 == (length == 4)  # IL


IT_BLOCKS = [
    # (id, body halfwords, r2 after, number of loads, registers loaded)
    ("itt-then-then", (
        0x429B,  # cmp   r3, r3                  (Z = 1)
        0xBF04,  # itt   eq
        0x6801,  # ldreq r1, [r0, #0]            (traps in the first slot)
        0x3201,  # addeq r2, #1                  (second slot: runs)
        0x3204,  # adds  r2, #4                  (after the block: sets flags)
    ), 5, {"r1": 0x1111_1111}),
    ("ite-then-else", (
        0x429B,  # cmp   r3, r3
        0xBF0C,  # ite   eq
        0x6801,  # ldreq r1, [r0, #0]
        0x3201,  # addne r2, #1                  (else slot: must not run)
        0x3204,  # adds  r2, #4
    ), 4, {"r1": 0x1111_1111}),
    ("itete-two-loads", (
        0x429B,  # cmp   r3, r3
        0xBF0B,  # itete eq
        0x6801,  # ldreq r1, [r0, #0]
        0x3201,  # addne r2, #1                  (skipped)
        0x6844,  # ldreq r4, [r0, #4]            (traps in the third slot)
        0x3202,  # addne r2, #2                  (skipped)
        0x3204,  # adds  r2, #4
    ), 4, {"r1": 0x1111_1111, "r4": 0x2222_2222}),
    ("itt-load-last", (
        0x429B,  # cmp   r3, r3
        0xBF04,  # itt   eq
        0x3201,  # addeq r2, #1
        0x6801,  # ldreq r1, [r0, #0]            (last slot: the block ends with it)
        0x3204,  # adds  r2, #4                  (outside the block: must set flags, Z = 0)
    ), 5, {"r1": 0x1111_1111}),
    ("itt-t32-load", (
        0x429B,  # cmp   r3, r3
        0xBF04,  # itt   eq
        0xF8D0, 0x1004,  # ldreq.w r1, [r0, #4]   (a 32-bit load in the first slot)
        0x3201,  # addeq r2, #1
        0x3204,  # adds  r2, #4
    ), 5, {"r1": 0x2222_2222}),
]


@pytest.mark.parametrize(("body", "r2", "loaded"), [b[1:] for b in IT_BLOCKS], ids=[b[0] for b in IT_BLOCKS])
def test_case27_thumb_loads_inside_it_blocks_advance_itstate(body: tuple[int, ...], r2: int,
                                                             loaded: dict[str, int]) -> None:
    probe = Probe()
    probe.load(0, 0x1111_1111, 4)
    probe.load(4, 0x2222_2222, 4)
    res = run(T32, halfwords(*body), regs={"r0": DEV}, devices=[probe])
    assert res.finished_body
    assert res.regs["r2"] == r2
    assert {name: res.regs[name] for name in loaded} == loaded
    assert len(probe.log) == len(loaded)
    cpsr = res.regs["cpsr"]
    assert (cpsr >> 10) & 0x3F == 0 and (cpsr >> 25) & 3 == 0  # ITSTATE is clear after the block
    assert not cpsr & (1 << 30)  # the final `adds` ran outside the block and set the flags (Z = 0)


@pytest.mark.parametrize(("body", "r2", "offset"), [
    ((
        0x429B,  # cmp   r3, r3
        0xBF04,  # itt   eq
        0x6001,  # streq r1, [r0, #0]
        0x3201,  # addeq r2, #1
        0x3204,  # adds  r2, #4
    ), 5, 0),
    ((
        0x429B,  # cmp   r3, r3
        0xBF0C,  # ite   eq
        0x6041,  # streq r1, [r0, #4]
        0x3201,  # addne r2, #1                  (must not run)
        0x3204,  # adds  r2, #4
    ), 4, 4),
], ids=["itt", "ite"])
def test_case27_thumb_stores_inside_it_blocks(body: tuple[int, ...], r2: int, offset: int) -> None:
    probe = Probe()
    res = run(T32, halfwords(*body), regs={"r0": DEV, "r1": 0x1234_5678}, devices=[probe])
    assert res.finished_body
    assert probe.log == [Access(offset, 4, True, 0x1234_5678)]
    assert res.regs["r2"] == r2
    assert (res.regs["cpsr"] >> 10) & 0x3F == 0 and not res.regs["cpsr"] & (1 << 30)


def test_case27_abort_inside_an_it_block_keeps_itstate_in_spsr() -> None:
    probe = Probe(fail=refuse_from(0x1000))
    body = halfwords(
        0x429B,  # cmp   r3, r3
        0xBF04,  # itt   eq
        0xF8D0, 0x1000,  # ldreq.w r1, [r0]       (r0 = DEV + 0x1000: refused)
        0x3201,  # addeq r2, #1
    )
    res = run(T32, body, regs={"r0": DEV + 0x1000, "r1": 5}, devices=[probe])
    abort = expect_sea(res, pc=body_addr(T32, 4), far=DEV + 0x1000)
    # SPSR_abt holds the ITSTATE of the aborted instruction: ITT EQ in its first slot is IT = 0x04.
    it = ((abort.spsr >> 25) & 3) | (((abort.spsr >> 10) & 0x3F) << 2)
    assert it == 0x04, hex(abort.spsr)
    assert res.regs["r1"] == 5 and res.regs["r2"] == 0


@pytest.mark.parametrize(("isa", "body"), [
    (A32, words(
        0xE1500000,  # cmp   r0, r0                 (Z = 1)
        0x15901000,  # ldrne r1, [r0]               (condition fails)
        0xE2822001,  # add   r2, r2, #1
    )),
    (T32, halfwords(
        0x429B,  # cmp   r3, r3
        0xBF14,  # ite   ne
        0x6801,  # ldrne r1, [r0, #0]            (condition fails)
        0x3201,  # addeq r2, #1
    )),
], ids=["a32-ldrne", "t16-ite-ne"])
def test_case28_conditional_load_that_fails_its_condition_makes_no_access(isa: str, body: bytes) -> None:
    probe = Probe()
    res = run(isa, body, regs={"r0": DEV, "r1": 0x5555}, devices=[probe])
    assert res.finished_body
    assert probe.log == []
    assert res.regs["r1"] == 0x5555 and res.regs["r2"] == 1  # PC + 4 (+2), nothing loaded
    assert res.vcpu_stats.exits == 0
