"""The harness's instruction encoders against capstone (and against GNU as: the literal words were assembled by it)."""

from __future__ import annotations

from collections.abc import Callable

import capstone
import pytest

from tests.differential.encoders import A32, A64, T32, Halfwords, a32_modified_immediate, it_mask

_A64 = capstone.Cs(capstone.CS_ARCH_ARM64, capstone.CS_MODE_ARM)
_A32 = capstone.Cs(capstone.CS_ARCH_ARM, capstone.CS_MODE_ARM | capstone.CS_MODE_V8)
_T32 = capstone.Cs(capstone.CS_ARCH_ARM, capstone.CS_MODE_THUMB | capstone.CS_MODE_V8)


def _text(md: capstone.Cs, code: bytes) -> str:
    insns = list(md.disasm(code, 0x1000))
    assert len(insns) == 1 and insns[0].size == len(code), code.hex()
    return f"{insns[0].mnemonic} {insns[0].op_str}".strip()


def a64(word: int) -> str:
    return _text(_A64, word.to_bytes(4, "little"))


def a32(word: int) -> str:
    return _text(_A32, word.to_bytes(4, "little"))


def t32(halfwords: Halfwords) -> str:
    return _text(_T32, b"".join(hw.to_bytes(2, "little") for hw in halfwords))


@pytest.mark.parametrize(
    ("word", "gnu_as", "text"),
    [
        (A64.movz(3, 0x1234), 0xD2824683, "mov x3, #0x1234"),
        (A64.movz(3, 0x1234, 3), 0xD2E24683, "mov x3, #0x1234000000000000"),
        (A64.movk(30, 0xFFFF, 1), 0xF2BFFFFE, "movk x30, #0xffff, lsl #16"),
        (A64.ldr(5, 7, 0x7FF8), 0xF97FFCE5, "ldr x5, [x7, #0x7ff8]"),
        (A64.str(5, 31, 8), 0xF90007E5, "str x5, [sp, #8]"),
        (A64.add_imm(4, 9, 0xFFF), 0x913FFD24, "add x4, x9, #0xfff"),
        (A64.add_imm(31, 2, 0), 0x9100005F, "mov sp, x2"),
        (A64.add_imm(2, 31, 0), 0x910003E2, "mov x2, sp"),
        (A64.orr_bit(0, 0, 25), 0xB2670000, "orr x0, x0, #0x2000000"),
        (A64.mrs_nzcv(1), 0xD53B4201, "mrs x1, nzcv"),
        (A64.msr_nzcv(1), 0xD51B4201, "msr nzcv, x1"),
        (A64.mrs_sctlr_el1(0), 0xD5381000, "mrs x0, sctlr_el1"),
        (A64.msr_sctlr_el1(0), 0xD5181000, "msr sctlr_el1, x0"),
        (A64.hvc(0), 0xD4000002, "hvc #0"),
        (A64.hvc(0x1234), 0xD4024682, "hvc #0x1234"),
        (A64.b(0), 0x14000000, "b #0x1000"),
        (A64.b(4), 0x14000001, "b #0x1004"),
        (A64.ISB, 0xD5033FDF, "isb"),
        (A64.adr(0, 12), 0x10000060, "adr x0, #0x100c"),
        (A64.msr_spsr_el1(31), 0xD518401F, "msr spsr_el1, xzr"),
        (A64.msr_elr_el1(0), 0xD5184020, "msr elr_el1, x0"),
        (A64.ERET, 0xD69F03E0, "eret"),
        (A64.UDF, 0x00000000, "udf #0"),
    ],
)
def test_a64(word: int, gnu_as: int, text: str) -> None:
    assert word == gnu_as
    assert a64(word) == text


@pytest.mark.parametrize(
    ("word", "gnu_as", "text"),
    [
        (A32.ldr(1, 12, 0xFFF), 0xE59C1FFF, "ldr r1, [ip, #0xfff]"),
        (A32.str(13, 3, 4), 0xE583D004, "str sp, [r3, #4]"),
        (A32.add_imm(9, 9, 0x100), 0xE2899C01, "add sb, sb, #0x100"),
        (A32.add_imm(2, 3, 0xFF00_0000), 0xE28324FF, "add r2, r3, #0xff000000"),
        (A32.movw(4, 0xABCD), 0xE30A4BCD, "movw r4, #0xabcd"),
        (A32.movt(4, 0x8400), 0xE3484400, "movt r4, #0x8400"),
        (A32.msr_apsr_nzcvq(5), 0xE128F005, "msr apsr_nzcvq, r5"),
        (A32.mrs_apsr(6), 0xE10F6000, "mrs r6, apsr"),
        (A32.setend(True), 0xF1010200, "setend be"),
        (A32.setend(False), 0xF1010000, "setend le"),
        (A32.hvc(0), 0xE1400070, "hvc #0"),
        (A32.hvc(0x1234), 0xE1412374, "hvc #0x1234"),
        (A32.b(0), 0xEAFFFFFE, "b #0x1000"),
        (A32.b(4), 0xEAFFFFFF, "b #0x1004"),
        (A32.UDF, 0xE7F000F0, "udf #0"),
        (A32.cps(0x10), 0xF1020010, "cps #0x10"),
    ],
)
def test_a32(word: int, gnu_as: int, text: str) -> None:
    assert word == gnu_as
    assert a32(word) == text


@pytest.mark.parametrize(
    ("insn", "gnu_as", "text"),
    [
        (T32.ldr_w(1, 12, 0xFFF), (0xF8DC, 0x1FFF), "ldr.w r1, [ip, #0xfff]"),
        (T32.str_w(13, 3, 4), (0xF8C3, 0xD004), "str.w sp, [r3, #4]"),
        (T32.addw(9, 9, 0x8FF), (0xF609, 0x09FF), "addw sb, sb, #0x8ff"),
        (T32.addw(13, 13, 0x80), (0xF20D, 0x0D80), "addw sp, sp, #0x80"),
        (T32.movw(4, 0xABCD), (0xF64A, 0x34CD), "movw r4, #0xabcd"),
        (T32.movt(4, 0x8400), (0xF2C8, 0x4400), "movt r4, #0x8400"),
        (T32.msr_apsr_nzcvq(5), (0xF385, 0x8800), "msr apsr_nzcvq, r5"),
        (T32.mrs_apsr(6), (0xF3EF, 0x8600), "mrs r6, apsr"),
        (T32.setend(True), (0xB658,), "setend be"),
        (T32.setend(False), (0xB650,), "setend le"),
        (T32.hvc(0), (0xF7E0, 0x8000), "hvc.w #0"),
        (T32.hvc(0x1234), (0xF7E1, 0x8234), "hvc.w #0x1234"),
        (T32.B_SELF, (0xE7FE,), "b #0x1000"),
        (T32.B_NEXT, (0xE7FF,), "b #0x1002"),
        (T32.UDF, (0xDE00,), "udf #0"),
        (T32.cps(0x10), (0xF3AF, 0x8110), "cps #0x10"),
        (T32.it(0x1, it_mask(0x1, [])), (0xBF18,), "it ne"),
        (T32.it(0x0, it_mask(0x0, [False, True])), (0xBF0A,), "itet eq"),
        (T32.it(0x2, it_mask(0x2, [True, True])), (0xBF22,), "ittt hs"),
        (T32.it(0x4, it_mask(0x4, [False])), (0xBF4C,), "ite mi"),
        (T32.add_imm3(1, 2, 7), (0x1DD1,), "adds r1, r2, #7"),
    ],
)
def test_t32(insn: Halfwords, gnu_as: Halfwords, text: str) -> None:
    assert insn == gnu_as
    assert t32(insn) == text


def test_mov_imm_sequences() -> None:
    assert [a64(w) for w in A64.mov_imm(7, 0x4020_0000)] == ["mov x7, #0", "movk x7, #0x4020, lsl #16"]
    assert [a64(w) for w in A64.mov_imm(7, 0x8400_0008)] == ["mov x7, #8", "movk x7, #0x8400, lsl #16"]
    assert [a64(w) for w in A64.mov_imm(1, 0xFFFF_0000_0000_0001)] == ["mov x1, #1", "movk x1, #0xffff, lsl #48"]
    assert [a32(w) for w in A32.mov_imm(0, 0x8400_0008)] == ["movw r0, #8", "movt r0, #0x8400"]
    assert [a32(w) for w in A32.mov_imm(0, 0x1234)] == ["movw r0, #0x1234"]
    assert [t32(h) for h in T32.mov_imm(11, 0x4020_0000)] == ["movw fp, #0", "movt fp, #0x4020"]


@pytest.mark.parametrize("value", [0, 0xFF, 0x100, 0x210, 0x220, 0x3FC, 0xFF00_0000, 0xF000_000F, 0x8000_0000])
def test_a32_modified_immediate_round_trips(value: int) -> None:
    field = a32_modified_immediate(value)
    assert field is not None
    imm8, rot = field & 0xFF, field >> 8
    assert ((imm8 >> (2 * rot)) | (imm8 << (32 - 2 * rot))) & 0xFFFF_FFFF == value
    assert a32(A32.add_imm(0, 1, value)).startswith("add r0, r1, #")


def test_a32_modified_immediate_refuses_what_it_cannot_encode() -> None:
    assert a32_modified_immediate(0x101) is None
    with pytest.raises(ValueError):
        A32.add_imm(0, 0, 0x101)


@pytest.mark.parametrize(
    "bad",
    [
        lambda: A64.ldr(0, 1, 4),
        lambda: A64.ldr(0, 1, 0x8000),
        lambda: A32.ldr(0, 1, 0x1000),
        lambda: T32.addw(0, 1, 0x1000),
        lambda: A64.b(2),
        lambda: it_mask(0, [True] * 4),
    ],
)
def test_out_of_range_operands_are_refused(bad: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        bad()
