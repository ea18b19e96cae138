"""Encoders for the few fixed instructions of the differential harness, so no assembler is needed at test time.

Each function returns the instruction as `decode()` takes it: a 32-bit word for A64 and A32, and for T32 a tuple
of halfwords in fetch order (one for a 16-bit instruction, two for a 32-bit one). `test_encoders.py` checks every
one against capstone; they were also checked against GNU as while they were written.
"""

from __future__ import annotations

Halfwords = tuple[int, ...]

AL = 0xE


def _check(value: int, lo: int, hi: int, what: str) -> int:
    if not lo <= value <= hi:
        raise ValueError(f"{what} {value:#x} out of range {lo:#x}..{hi:#x}")
    return value


# --------------------------------------------------------------------------------------------- A64


class A64:
    """A64 encodings (registers 0..30; 31 is SP or XZR as the instruction defines)."""

    NOP = 0xD503201F
    ISB = 0xD5033FDF
    ERET = 0xD69F03E0
    UDF = 0x0000_0000  # UDF #0

    @staticmethod
    def movz(rd: int, imm16: int, hw: int = 0) -> int:
        """MOVZ Xd, #imm16, LSL #(16*hw)."""
        return 0xD280_0000 | _check(hw, 0, 3, "hw") << 21 | _check(imm16, 0, 0xFFFF, "imm16") << 5 | rd

    @staticmethod
    def movk(rd: int, imm16: int, hw: int) -> int:
        """MOVK Xd, #imm16, LSL #(16*hw)."""
        return 0xF280_0000 | _check(hw, 0, 3, "hw") << 21 | _check(imm16, 0, 0xFFFF, "imm16") << 5 | rd

    @staticmethod
    def mov_imm(rd: int, value: int) -> list[int]:
        """Xd = value (64 bits): one MOVZ and a MOVK per further non-zero halfword."""
        value &= (1 << 64) - 1
        words = [A64.movz(rd, value & 0xFFFF)]
        words += [A64.movk(rd, (value >> (16 * hw)) & 0xFFFF, hw) for hw in (1, 2, 3) if (value >> (16 * hw)) & 0xFFFF]
        return words

    @staticmethod
    def ldr(rt: int, rn: int, offset: int) -> int:
        """LDR Xt, [Xn|SP, #offset] (unsigned offset, a multiple of 8 below 32 KiB)."""
        if offset % 8:
            raise ValueError(f"offset {offset:#x} is not a multiple of 8")
        return 0xF940_0000 | _check(offset // 8, 0, 0xFFF, "offset/8") << 10 | rn << 5 | rt

    @staticmethod
    def str(rt: int, rn: int, offset: int) -> int:
        """STR Xt, [Xn|SP, #offset] (unsigned offset, a multiple of 8 below 32 KiB)."""
        return A64.ldr(rt, rn, offset) & ~(1 << 22)

    @staticmethod
    def add_imm(rd: int, rn: int, imm12: int) -> int:
        """ADD Xd|SP, Xn|SP, #imm12 (MOV to/from SP when imm12 is 0)."""
        return 0x9100_0000 | _check(imm12, 0, 0xFFF, "imm12") << 10 | rn << 5 | rd

    @staticmethod
    def orr_bit(rd: int, rn: int, bit: int) -> int:
        """ORR Xd, Xn, #(1 << bit) (a one-bit 64-bit logical immediate: N=1, imms=0, immr=-bit mod 64)."""
        return 0xB240_0000 | ((64 - _check(bit, 0, 63, "bit")) % 64) << 16 | rn << 5 | rd

    @staticmethod
    def mrs_nzcv(rt: int) -> int:
        return 0xD53B_4200 | rt

    @staticmethod
    def msr_nzcv(rt: int) -> int:
        return 0xD51B_4200 | rt

    @staticmethod
    def mrs_sctlr_el1(rt: int) -> int:
        return 0xD538_1000 | rt

    @staticmethod
    def msr_sctlr_el1(rt: int) -> int:
        return 0xD518_1000 | rt

    @staticmethod
    def msr_spsr_el1(rt: int) -> int:
        return 0xD518_4000 | rt

    @staticmethod
    def msr_elr_el1(rt: int) -> int:
        return 0xD518_4020 | rt

    @staticmethod
    def adr(rd: int, offset: int) -> int:
        """ADR Xd, PC + offset (within +-1 MiB)."""
        imm = _check(offset, -(1 << 20), (1 << 20) - 1, "offset") & 0x1F_FFFF
        return 0x1000_0000 | (imm & 3) << 29 | (imm >> 2) << 5 | rd

    @staticmethod
    def hvc(imm16: int = 0) -> int:
        return 0xD400_0002 | _check(imm16, 0, 0xFFFF, "imm16") << 5

    @staticmethod
    def b(offset: int) -> int:
        """B to PC + offset (a multiple of 4 within +-128 MiB); `b(0)` is `b .`."""
        if offset % 4:
            raise ValueError(f"branch offset {offset} is not a multiple of 4")
        return 0x1400_0000 | (_check(offset >> 2, -(1 << 25), (1 << 25) - 1, "offset/4") & 0x3FF_FFFF)


# --------------------------------------------------------------------------------------------- A32


def a32_modified_immediate(value: int) -> int | None:
    """The 12-bit rotate:imm8 field that encodes `value`, or None if it cannot be encoded."""
    value &= 0xFFFF_FFFF
    for rot in range(16):
        imm8 = ((value << (2 * rot)) | (value >> (32 - 2 * rot))) & 0xFFFF_FFFF if rot else value
        if imm8 <= 0xFF:
            return rot << 8 | imm8
    return None


class A32:
    """A32 encodings, condition AL unless given."""

    NOP = 0xE320_F000
    UDF = 0xE7F0_00F0  # UDF #0

    @staticmethod
    def ldr(rt: int, rn: int, offset: int, cond: int = AL) -> int:
        """LDR Rt, [Rn, #offset] with 0 <= offset <= 4095."""
        return cond << 28 | 0x0590_0000 | rn << 16 | rt << 12 | _check(offset, 0, 0xFFF, "offset")

    @staticmethod
    def str(rt: int, rn: int, offset: int, cond: int = AL) -> int:
        """STR Rt, [Rn, #offset] with 0 <= offset <= 4095."""
        return A32.ldr(rt, rn, offset, cond) & ~(1 << 20)

    @staticmethod
    def add_imm(rd: int, rn: int, value: int, cond: int = AL) -> int:
        """ADD Rd, Rn, #value (a modified immediate)."""
        field = a32_modified_immediate(value)
        if field is None:
            raise ValueError(f"{value:#x} is not an A32 modified immediate")
        return cond << 28 | 0x0280_0000 | rn << 16 | rd << 12 | field

    @staticmethod
    def movw(rd: int, imm16: int, cond: int = AL) -> int:
        _check(imm16, 0, 0xFFFF, "imm16")
        return cond << 28 | 0x0300_0000 | (imm16 >> 12) << 16 | rd << 12 | (imm16 & 0xFFF)

    @staticmethod
    def movt(rd: int, imm16: int, cond: int = AL) -> int:
        return A32.movw(rd, imm16, cond) | 1 << 22

    @staticmethod
    def mov_imm(rd: int, value: int) -> list[int]:
        """Rd = value (32 bits): MOVW, then MOVT if the top half is not zero."""
        value &= 0xFFFF_FFFF
        return [A32.movw(rd, value & 0xFFFF)] + ([A32.movt(rd, value >> 16)] if value >> 16 else [])

    @staticmethod
    def msr_apsr_nzcvq(rn: int) -> int:
        return 0xE128_F000 | rn

    @staticmethod
    def mrs_apsr(rd: int) -> int:
        return 0xE10F_0000 | rd << 12

    @staticmethod
    def setend(big_endian: bool) -> int:
        return 0xF101_0200 if big_endian else 0xF101_0000

    @staticmethod
    def cps(mode: int) -> int:
        """CPS #mode (change processor mode, e.g. 0x10 User)."""
        return 0xF102_0000 | _check(mode, 0, 0x1F, "mode")

    @staticmethod
    def hvc(imm16: int = 0) -> int:
        _check(imm16, 0, 0xFFFF, "imm16")
        return 0xE140_0070 | (imm16 >> 4) << 8 | (imm16 & 0xF)

    @staticmethod
    def b(offset: int, cond: int = AL) -> int:
        """B to (address of this instruction) + offset; `b(0)` is `b .`."""
        if offset % 4:
            raise ValueError(f"branch offset {offset} is not a multiple of 4")
        return cond << 28 | 0x0A00_0000 | (_check((offset - 8) >> 2, -(1 << 23), (1 << 23) - 1, "imm24") & 0xFF_FFFF)


# --------------------------------------------------------------------------------------------- T32


class T32:
    """Thumb encodings as halfword tuples (a 32-bit instruction is (hw1, hw2))."""

    NOP: Halfwords = (0xBF00,)
    B_SELF: Halfwords = (0xE7FE,)
    B_NEXT: Halfwords = (0xE7FF,)  # b.n to the next instruction
    UDF: Halfwords = (0xDE00,)  # UDF #0

    @staticmethod
    def ldr_w(rt: int, rn: int, offset: int) -> Halfwords:
        """LDR.W Rt, [Rn, #offset] with 0 <= offset <= 4095."""
        return 0xF8D0 | rn, rt << 12 | _check(offset, 0, 0xFFF, "offset")

    @staticmethod
    def str_w(rt: int, rn: int, offset: int) -> Halfwords:
        """STR.W Rt, [Rn, #offset] with 0 <= offset <= 4095."""
        return 0xF8C0 | rn, rt << 12 | _check(offset, 0, 0xFFF, "offset")

    @staticmethod
    def addw(rd: int, rn: int, imm12: int) -> Halfwords:
        """ADDW Rd, Rn, #imm12."""
        _check(imm12, 0, 0xFFF, "imm12")
        return 0xF200 | (imm12 >> 11) << 10 | rn, ((imm12 >> 8) & 7) << 12 | rd << 8 | (imm12 & 0xFF)

    @staticmethod
    def movw(rd: int, imm16: int) -> Halfwords:
        _check(imm16, 0, 0xFFFF, "imm16")
        return (
            0xF240 | ((imm16 >> 11) & 1) << 10 | imm16 >> 12,
            ((imm16 >> 8) & 7) << 12 | rd << 8 | (imm16 & 0xFF),
        )

    @staticmethod
    def movt(rd: int, imm16: int) -> Halfwords:
        hw1, hw2 = T32.movw(rd, imm16)
        return hw1 | 0x0080, hw2

    @staticmethod
    def mov_imm(rd: int, value: int) -> list[Halfwords]:
        value &= 0xFFFF_FFFF
        return [T32.movw(rd, value & 0xFFFF)] + ([T32.movt(rd, value >> 16)] if value >> 16 else [])

    @staticmethod
    def msr_apsr_nzcvq(rn: int) -> Halfwords:
        return 0xF380 | rn, 0x8800

    @staticmethod
    def mrs_apsr(rd: int) -> Halfwords:
        return 0xF3EF, 0x8000 | rd << 8

    @staticmethod
    def setend(big_endian: bool) -> Halfwords:
        return (0xB658 if big_endian else 0xB650,)

    @staticmethod
    def cps(mode: int) -> Halfwords:
        return 0xF3AF, 0x8100 | _check(mode, 0, 0x1F, "mode")

    @staticmethod
    def hvc(imm16: int = 0) -> Halfwords:
        _check(imm16, 0, 0xFFFF, "imm16")
        return 0xF7E0 | imm16 >> 12, 0x8000 | (imm16 & 0xFFF)

    @staticmethod
    def it(firstcond: int, mask: int) -> Halfwords:
        """IT with the raw 4-bit mask (see `it_mask`)."""
        _check(firstcond, 0, 0xE, "firstcond")
        return (0xBF00 | firstcond << 4 | _check(mask, 1, 0xF, "mask"),)

    @staticmethod
    def add_imm3(rd: int, rn: int, imm3: int) -> Halfwords:
        """16-bit ADD(S) Rd, Rn, #imm3 (low registers; ADD without flags inside an IT block)."""
        return (0x1C00 | _check(imm3, 0, 7, "imm3") << 6 | _check(rn, 0, 7, "rn") << 3 | _check(rd, 0, 7, "rd"),)


def it_mask(firstcond: int, then: list[bool]) -> int:
    """IT mask for an IT block whose 2nd.. instructions are Then (True) or Else (False); len(then) <= 3."""
    if len(then) > 3:
        raise ValueError("an IT block holds at most 4 instructions")
    mask = 0
    for i, t in enumerate(then):
        bit = firstcond & 1 if t else (firstcond & 1) ^ 1
        mask |= bit << (3 - i)
    return mask | 1 << (3 - len(then))


def t32_encoding(halfwords: Halfwords) -> int:
    """The `decode()` form of a Thumb instruction: the halfword, or (hw1 << 16) | hw2."""
    return halfwords[0] if len(halfwords) == 1 else halfwords[0] << 16 | halfwords[1]


def t32_halfwords(encoding: int) -> Halfwords:
    """Inverse of `t32_encoding`."""
    return (encoding,) if encoding <= 0xFFFF else (encoding >> 16, encoding & 0xFFFF)
