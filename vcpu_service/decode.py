"""Decode a faulting load/store encoding into the data-abort syndrome the hardware would report.

This is the software half of a stage-2 data abort: given the instruction at the faulting PC, produce
what ESR_ELx/HSR would say (ISV, SAS, SSE, SRT, SF, AR, WnR, IL), the way KVM's `io_mem_abort()`
consumes it. Every function here is pure over integers: no Unicorn, no gRPC, no guest state.

Rules followed (see `shared/reference/kvm-mmio.md`, section 1.3):

* ISV=1 only for a single general-purpose register load/store without base writeback and, on
  AArch32, without PC as Rt. Those are returned as `Syndrome(isv=True, writeback=None)`.
* Single-register forms that do write back the base (A64 pre/post-index, A32 P=0 or W=1 including
  every A32 LDR*T/STR*T, T32 imm8 with P=0 or W=1) come back as `Syndrome(isv=False)` with
  `writeback` filled in, so a later version can emulate them completely. The base update is meant to
  be applied at completion, never at decode.
* Data/instruction cache maintenance by address (A64 DC CIVAC/CVAC/IVAC.../IC IVAU, AArch32
  MCR p15 c7 DCCIMVAC/...) is `Syndrome(isv=False, cm=True, wnr=True)`, as the hardware reports it;
  KVM retires these as a NOP (`kvm-mmio.md` 2.1). Its `sas`/`srt` carry no access: check `cm` first.
* Everything else (multiple, dual, pair, exclusive, SIMD/FP/SVE, LSE atomics, prefetch, literal/PC
  as Rt or Rn, UNPREDICTABLE or should-be-zero/one violations, non-memory instructions) is a
  `Refused` whose reason names the class: none of them has a syndrome. The exit path emulates some of
  them anyway, planned by `split.decode_split`.

`decode()` never raises. The A32 condition field is ignored here; callers check it with
`a32_condition()` and `condition_passed()` (a conditional instruction may trap even if it would not
have executed).
"""

import enum
from dataclasses import dataclass, field
from typing import TypeAlias

__all__ = [
    "Decoded",
    "Isa",
    "Refused",
    "ShiftType",
    "Syndrome",
    "Writeback",
    "a32_condition",
    "a32_shift",
    "condition_passed",
    "decode",
    "decode_imm_shift",
    "thumb_insn_len",
]

_MASK32 = 0xFFFF_FFFF


class Isa(enum.Enum):
    """Instruction set of the faulting instruction. T32 covers 16-bit and 32-bit Thumb encodings."""

    A64 = "A64"
    A32 = "A32"
    T32 = "T32"


class ShiftType(enum.IntEnum):
    """A32 shift applied to an offset register (the 2-bit `type` field, plus RRX)."""

    LSL = 0
    LSR = 1
    ASR = 2
    ROR = 3
    RRX = 4


def decode_imm_shift(type2: int, imm5: int) -> tuple[ShiftType, int]:
    """ARM ARM `DecodeImmShift`: LSR/ASR #0 encode #32, ROR #0 encodes RRX (by one bit)."""
    if type2 == 0:
        return ShiftType.LSL, imm5
    if type2 == 1:
        return ShiftType.LSR, imm5 or 32
    if type2 == 2:
        return ShiftType.ASR, imm5 or 32
    if imm5 == 0:
        return ShiftType.RRX, 1
    return ShiftType.ROR, imm5


def a32_shift(value: int, shift_type: ShiftType | int, amount: int, carry_in: bool = False) -> int:
    """Shift a 32-bit register value as an A32 offset register is shifted (`Shift(value, type, n, C)`).

    `amount` may be given decoded or exactly as encoded in imm5: for LSR and ASR an amount of 0
    means 32, and ROR with an amount of 0 means RRX (DecodeImmShift), so both
    `a32_shift(v, LSR, 32)` and `a32_shift(v, LSR, 0)` shift by 32. RRX rotates right by one bit
    through `carry_in` (PSTATE.C) and ignores `amount`. Returns the 32-bit result.
    """
    kind = ShiftType(shift_type)
    if not 0 <= amount <= 32:
        raise ValueError(f"shift amount {amount} out of range 0..32")
    value &= _MASK32
    if kind is ShiftType.LSL:
        return (value << amount) & _MASK32
    if kind is ShiftType.LSR:
        return value >> (amount or 32)
    if kind is ShiftType.ASR:
        signed = value - (1 << 32) if value & 0x8000_0000 else value
        return (signed >> (amount or 32)) & _MASK32
    if kind is ShiftType.ROR and amount != 0:
        amount %= 32
        return ((value >> amount) | (value << (32 - amount))) & _MASK32
    return (int(carry_in) << 31) | (value >> 1)  # RRX


@dataclass(frozen=True, slots=True)
class Writeback:
    """Base-register update of a writeback load/store, to be applied at completion.

    The access address is the old Rn (`post_index`) or Rn plus the amount (pre-index); afterwards
    Rn becomes Rn plus the amount. For an immediate form the amount is `offset`. For an A32 register
    form it depends on a register value the encoding cannot know: then `offset` is 0,
    `offset_reg` is Rm, `shift_type`/`shift_amount` are the decoded shift (`decode_imm_shift`), and
    `subtract` says the shifted Rm is subtracted (U=0). Call `amount()` with Rm's value (read
    before any writeback) and PSTATE.C to get the signed amount; add it to Rn modulo 2**32
    (AArch32) or 2**64 (A64).
    """

    rn: int
    offset: int
    post_index: bool
    offset_reg: int | None = None
    shift_type: ShiftType = ShiftType.LSL
    shift_amount: int = 0
    subtract: bool = False

    def amount(self, offset_reg_value: int = 0, carry_in: bool = False) -> int:
        """Signed amount added to Rn; `offset_reg_value` is only used by register forms."""
        if self.offset_reg is None:
            return self.offset
        shifted = a32_shift(offset_reg_value, self.shift_type, self.shift_amount, carry_in)
        return self.offset - shifted if self.subtract else self.offset + shifted


@dataclass(frozen=True, slots=True)
class Syndrome:
    """The data-abort instruction syndrome of one decoded single-register load/store.

    `srt` is Rt exactly as encoded: on A64, 31 is XZR/WZR (never SP) for the transfer register,
    while `rn` 31 is SP. On AArch32 both are 0..15 and `sf` is always False. `isv` False with
    `writeback` set is a writeback load/store the caller may emulate; `cm` True is a cache
    maintenance instruction (no data transfer; `srt` = `rn` = the address register).
    """

    isv: bool
    sas: int
    sse: bool
    srt: int
    sf: bool
    ar: bool
    wnr: bool
    il: bool
    rn: int
    writeback: Writeback | None = None
    cm: bool = False
    #: Access size in bytes (1, 2, 4 or 8), ``1 << sas``: computed once, since every exit asks for it.
    size: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 <= self.sas <= 3:
            raise ValueError(f"sas {self.sas} out of range 0..3")
        if not 0 <= self.srt <= 31:
            raise ValueError(f"srt {self.srt} out of range 0..31")
        if not 0 <= self.rn <= 31:
            raise ValueError(f"rn {self.rn} out of range 0..31")
        object.__setattr__(self, "size", 1 << self.sas)

    @property
    def insn_len(self) -> int:
        """Length of the faulting instruction in bytes: the PC advance on completion."""
        return 4 if self.il else 2

    def iss(self) -> int:
        """ISS bits 24:0 of ESR_ELx/HSR for this data abort, with DFSC left 0 for the caller.

        When `isv` is False, bits 23:14 are RES0 as on hardware: only WnR and CM are reported.
        On AArch32 `srt` < 16 and `sf` is False, so SRT lands in 19:16 and bits 20 and 15 stay 0.
        """
        value = (int(self.wnr) << 6) | (int(self.cm) << 8)
        if self.isv:
            value |= (
                (1 << 24)
                | (self.sas << 22)
                | (int(self.sse) << 21)
                | (self.srt << 16)
                | (int(self.sf) << 15)
                | (int(self.ar) << 14)
            )
        return value

    def esr(self, ec: int, dfsc: int) -> int:
        """The whole syndrome register: EC<<26 | IL<<25 | ISS | DFSC.

        IL is RES1 for a data abort with ISV=0 (ARM ARM ESR_ELx.IL), so it is only 0 for a
        16-bit Thumb instruction with a valid syndrome.
        """
        if not 0 <= ec <= 0x3F:
            raise ValueError(f"ec {ec:#x} out of range 0..0x3f")
        if not 0 <= dfsc <= 0x3F:
            raise ValueError(f"dfsc {dfsc:#x} out of range 0..0x3f")
        il = self.il or not self.isv
        return (ec << 26) | (int(il) << 25) | self.iss() | dfsc


@dataclass(frozen=True, slots=True)
class Refused:
    """An instruction this decoder will not turn into an MMIO access; `reason` names its class."""

    reason: str
    insn_len: int


Decoded: TypeAlias = Syndrome | Refused


def thumb_insn_len(first_halfword: int) -> int:
    """Length of a Thumb instruction from its first halfword: 4 if hw[15:11] is 0b11101/0b11110/0b11111."""
    return 4 if (first_halfword >> 11) & 0x1F in (0b11101, 0b11110, 0b11111) else 2


def a32_condition(insn: int) -> int:
    """The A32 condition field, bits 31:28 (0xE = AL, 0xF = unconditional space)."""
    return (insn >> 28) & 0xF


def condition_passed(cond: int, nzcv: int) -> bool:
    """ARM ARM `ConditionHolds(cond)` with N,Z,C,V given as CPSR bits 31:28 shifted down by 28."""
    n, z, c, v = (nzcv >> 3) & 1, (nzcv >> 2) & 1, (nzcv >> 1) & 1, nzcv & 1
    base = (cond >> 1) & 7
    result = (
        z == 1,
        c == 1,
        n == 1,
        v == 1,
        c == 1 and z == 0,
        n == v,
        n == v and z == 0,
        True,
    )[base]
    if cond & 1 and cond != 0xF:
        result = not result
    return result


def decode(isa: Isa, insn: int) -> Decoded:
    """Decode one instruction into a `Syndrome`, or `Refused` with the reason. Never raises.

    `insn` is the 32-bit word for A64 and A32. For T32 it is the halfword of a 16-bit instruction,
    or `(hw1 << 16) | hw2` for a 32-bit one.
    """
    if not 0 <= insn <= _MASK32:
        return Refused(f"encoding {insn:#x} is not a 32-bit value", 2 if isa is Isa.T32 else 4)
    if isa is Isa.A64:
        return _decode_a64(insn)
    if isa is Isa.A32:
        return _decode_a32(insn)
    return _decode_t32(insn)


# --------------------------------------------------------------------------------------------- helpers


def _bits(value: int, hi: int, lo: int) -> int:
    return (value >> lo) & ((1 << (hi - lo + 1)) - 1)


def _bit(value: int, n: int) -> bool:
    return bool((value >> n) & 1)


def _sign_extend(value: int, width: int) -> int:
    sign = 1 << (width - 1)
    return (value ^ sign) - sign


_NO_SYNDROME = "has no instruction syndrome"
_A64_PAIR = f"load/store pair (LDP/STP/LDNP/STNP/LDPSW) {_NO_SYNDROME}"
_A64_EXCLUSIVE = f"load/store exclusive (LDXR/STXR/LDAXR/STLXR) {_NO_SYNDROME}"
_A64_EXCLUSIVE_PAIR = f"load/store exclusive pair (LDXP/STXP/LDAXP/STLXP) {_NO_SYNDROME}"
_NOT_GPR = "is not a general-purpose register transfer"
_A64_SIMD = f"SIMD/FP load/store (LDR/STR Q/D/S/H/B, LDP Q, LD1/ST1...) {_NOT_GPR}"
_SIMD_STRUCT = f"SIMD element/structure load/store (VLD1/VST1...) {_NOT_GPR}"
_LSE = f"LSE atomic (LDADD/LDCLR/LDEOR/LDSET/LDSMAX/LDUMIN.../SWP) {_NO_SYNDROME}"
_LSE_CAS = f"LSE atomic compare-and-swap (CAS/CASP) {_NO_SYNDROME}"
_PREFETCH_A64 = "prefetch (PRFM/PRFUM) is not a load"
_MULTIPLE = f"load/store multiple (LDM/STM/PUSH/POP) {_NO_SYNDROME}"
_DUAL = f"load/store dual (LDRD/STRD) {_NO_SYNDROME}"
_A32_EXCLUSIVE = f"load/store exclusive (LDREX/STREX/LDAEX/STLEX) {_NO_SYNDROME}"
_NOT_LS = "not a load/store"
_UNALLOCATED = "unallocated or unsupported load/store encoding"
_SBZ_SBO = "CONSTRAINED UNPREDICTABLE: should-be-zero/should-be-one bits have the wrong value"
_WB_OVERLAP = "UNPREDICTABLE: load with writeback where Rt == Rn"


# --------------------------------------------------------------------------------------------- A64


def _a64_size_opc(size: int, opc: int, prefetch_allowed: bool) -> tuple[int, bool, bool, bool] | str:
    """(sas, sse, sf, wnr) of the LDR/STR{B,H}/LDRS{B,H,W} size:opc table, or a refusal reason."""
    if opc == 0b00:
        return size, False, size == 3, True
    if opc == 0b01:
        return size, False, size == 3, False
    if opc == 0b10:
        if size < 3:
            return size, True, True, False  # LDRSB/LDRSH Xt, LDRSW
        return _PREFETCH_A64 if prefetch_allowed else _UNALLOCATED
    if size < 2:
        return size, True, False, False  # LDRSB/LDRSH Wt
    return _UNALLOCATED


def _a64_single(insn: int, wb: Writeback | None, prefetch_allowed: bool) -> Decoded:
    fields = _a64_size_opc(_bits(insn, 31, 30), _bits(insn, 23, 22), prefetch_allowed)
    if isinstance(fields, str):
        return Refused(fields, 4)
    sas, sse, sf, wnr = fields
    rt, rn = _bits(insn, 4, 0), _bits(insn, 9, 5)
    if wb is not None and not wnr and rt == rn and rn != 31:
        return Refused(_WB_OVERLAP, 4)
    return Syndrome(
        isv=wb is None, sas=sas, sse=sse, srt=rt, sf=sf, ar=False, wnr=wnr, il=True, rn=rn, writeback=wb
    )


def _a64_ordered(insn: int, load: bool) -> Syndrome:
    """LDAR/STLR/LDLAR/STLLR/LDAPR and friends: single register, acquire/release, zero-extending."""
    size = _bits(insn, 31, 30)
    return Syndrome(
        isv=True,
        sas=size,
        sse=False,
        srt=_bits(insn, 4, 0),
        sf=size == 3,
        ar=True,
        wnr=not load,
        il=True,
        rn=_bits(insn, 9, 5),
    )


def _a64_exclusive_ordered(insn: int) -> Decoded:
    o2, o1 = _bit(insn, 23), _bit(insn, 21)
    if o2 and not o1:
        if _bits(insn, 20, 16) != 31 or _bits(insn, 14, 10) != 31:
            return Refused(_SBZ_SBO, 4)  # Rs and Rt2 are (1)
        return _a64_ordered(insn, load=_bit(insn, 22))  # LDAR/STLR (o0=1), LDLAR/STLLR (o0=0)
    if o2:
        return Refused(_LSE_CAS, 4)
    if not o1:
        return Refused(_A64_EXCLUSIVE, 4)
    if _bits(insn, 31, 30) < 2:
        return Refused(_LSE_CAS, 4)  # CASP
    return Refused(_A64_EXCLUSIVE_PAIR, 4)


def _a64_atomic(insn: int) -> Decoded:
    """The `size 111 0 00 A R 1 Rs o3 opc 00` group: LSE atomics, LDAPR, LD64B/ST64B."""
    if _bits(insn, 23, 22) == 0b10 and _bits(insn, 20, 16) == 31 and _bits(insn, 15, 12) == 0b1100:
        return _a64_ordered(insn, load=True)  # LDAPR/LDAPRH/LDAPRB
    if _bits(insn, 31, 30) == 3 and _bit(insn, 15) and _bits(insn, 14, 12) in (1, 2, 3, 5):
        return Refused(f"64-byte single-copy atomic load/store (LD64B/ST64B) {_NO_SYNDROME}", 4)
    return Refused(_LSE, 4)


def _a64_rcpc_unscaled(insn: int) -> Decoded:
    """LDAPUR/STLUR (FEAT_LRCPC2): `size 011001 opc 0 imm9 00 Rn Rt`."""
    size, opc = _bits(insn, 31, 30), _bits(insn, 23, 22)
    if opc == 0b00:
        sas, sse, sf, wnr = size, False, size == 3, True
    elif opc == 0b01:
        sas, sse, sf, wnr = size, False, size == 3, False
    elif size < 3 and not (size == 2 and opc == 0b11):
        sas, sse, sf, wnr = size, True, opc == 0b10, False  # LDAPURS{B,H} Xt/Wt, LDAPURSW
    else:
        return Refused(_UNALLOCATED, 4)
    return Syndrome(
        isv=True,
        sas=sas,
        sse=sse,
        srt=_bits(insn, 4, 0),
        sf=sf,
        ar=True,
        wnr=wnr,
        il=True,
        rn=_bits(insn, 9, 5),
    )


# (op1, CRm, op2) of `SYS #op1, C7, Cm, #op2, Xt` that maintain caches by VA: DC IVAC/CVAC/CVAU/CVAP/
# CVADP/CIVAC (with their MTE G/GD variants) and IC IVAU. DC ZVA/GVA/GZVA (C7, C4) write memory.
_A64_CACHE_BY_VA = frozenset(
    [(0, 6, op2) for op2 in (1, 3, 5)]
    + [(3, crm, op2) for crm in (10, 12, 13, 14) for op2 in (1, 3, 5)]
    + [(3, 11, 1), (3, 5, 1)]
)


def _cache_maintenance(rt: int, sf: bool, il: bool) -> Syndrome:
    """CM=1 abort: WnR reads as 1, no instruction syndrome. KVM retires these as a NOP."""
    return Syndrome(isv=False, sas=0, sse=False, srt=rt, sf=sf, ar=False, wnr=True, il=il, rn=rt, cm=True)


def _decode_a64(insn: int) -> Decoded:
    if insn & 0xFFF8_F000 == 0xD508_7000:  # SYS #op1, C7, Cm, #op2, Xt
        op1, crm, op2 = _bits(insn, 18, 16), _bits(insn, 11, 8), _bits(insn, 7, 5)
        if (op1, crm, op2) in _A64_CACHE_BY_VA:
            return _cache_maintenance(_bits(insn, 4, 0), sf=True, il=True)
        if op1 == 3 and crm == 4:
            return Refused(f"DC ZVA/GVA/GZVA (zeroes a whole block) {_NO_SYNDROME}", 4)
    if not _bit(insn, 27) or _bit(insn, 25):
        if _bits(insn, 28, 25) == 0b0010 and _bit(insn, 31):
            return Refused(f"SVE load/store {_NOT_GPR}", 4)
        if insn >> 25 == 0b1110000:
            return Refused(f"SME load/store (LD1x/ST1x ZA tile, LDR/STR ZA) {_NOT_GPR}", 4)
        return Refused(_NOT_LS, 4)
    group = _bits(insn, 29, 24)  # bit 26 (V) included
    if group & 0b111011 == 0b011001 and not _bit(insn, 21) and _bits(insn, 11, 10) == 0b01:  # bit 26 free
        return Refused(f"memory copy/set (CPY*/SET*) {_NO_SYNDROME}", 4)
    if _bit(insn, 26):
        return Refused(_A64_SIMD, 4)
    if _bits(insn, 29, 27) == 0b101:
        return Refused(_A64_PAIR, 4)
    if group == 0b001000:
        return _a64_exclusive_ordered(insn)
    if group == 0b011000:
        if _bits(insn, 31, 30) == 0b11:
            return Refused(_PREFETCH_A64.replace("PRFM/PRFUM", "PRFM literal"), 4)
        return Refused("PC-relative literal load (LDR literal) not handled", 4)
    if group == 0b011001:
        if _bit(insn, 21) and _bits(insn, 31, 30) == 0b11:
            return Refused(f"memory tagging load/store (LDG/STG/STZG...) {_NO_SYNDROME}", 4)
        if not _bit(insn, 21) and _bits(insn, 11, 10) == 0b00:
            return _a64_rcpc_unscaled(insn)
        return Refused(_UNALLOCATED, 4)
    if group == 0b111001:
        return _a64_single(insn, None, prefetch_allowed=True)  # unsigned imm12
    if group != 0b111000:
        return Refused(_UNALLOCATED, 4)
    kind = _bits(insn, 11, 10)
    if _bit(insn, 21):
        if kind == 0b00:
            return _a64_atomic(insn)
        if kind == 0b10:
            if not _bit(insn, 14):  # option<1> == 0 is unallocated
                return Refused(_UNALLOCATED, 4)
            return _a64_single(insn, None, prefetch_allowed=True)  # register offset
        if _bits(insn, 31, 30) == 0b11:
            return Refused(f"pointer-authenticated load (LDRAA/LDRAB) {_NO_SYNDROME}", 4)
        return Refused(_UNALLOCATED, 4)
    if kind == 0b00:
        return _a64_single(insn, None, prefetch_allowed=True)  # LDUR/STUR (PRFUM)
    if kind == 0b10:
        return _a64_single(insn, None, prefetch_allowed=False)  # LDTR/STTR
    imm9 = _sign_extend(_bits(insn, 20, 12), 9)
    wb = Writeback(rn=_bits(insn, 9, 5), offset=imm9, post_index=kind == 0b01)
    return _a64_single(insn, wb, prefetch_allowed=False)


# --------------------------------------------------------------------------------------------- A32


def _coprocessor_space(coproc: int, unconditional: bool) -> Refused:
    """`110P UDWL` (A32) / `111x 110P UDWL` (T32): coprocessor and SIMD/FP register loads/stores.

    In the unconditional space coprocessor numbers 8, 9, 12 and 13 hold the Advanced SIMD
    extensions (VCMLA, VCADD, VSDOT, VFMAL, VMMLA...), which are not memory accesses.
    """
    if unconditional and coproc in (0b1000, 0b1001, 0b1100, 0b1101):
        return Refused(f"{_NOT_LS} (Advanced SIMD data processing)", 4)
    if unconditional:
        return Refused(f"coprocessor load/store (LDC2/STC2) {_NO_SYNDROME}", 4)
    return Refused(
        f"SIMD/FP or coprocessor load/store (VLDR/VSTR/VLDM/VSTM/VPUSH/VPOP/LDC/STC) {_NO_SYNDROME}", 4
    )


def _a32_unconditional(insn: int) -> Refused:
    if _bits(insn, 27, 24) == 0b0100 and not _bit(insn, 20):
        return Refused(_SIMD_STRUCT, 4)
    if _bits(insn, 27, 26) == 0b01 and _bits(insn, 21, 20) == 0b01:
        return Refused("prefetch (PLD/PLDW/PLI) is not a load", 4)
    if _bits(insn, 27, 25) == 0b110 and not (_bits(insn, 24, 23) == 0 and not _bit(insn, 21)):
        return _coprocessor_space(_bits(insn, 11, 8), unconditional=True)
    if _bits(insn, 27, 25) == 0b100:
        return Refused(f"load/store multiple (RFE/SRS) {_NO_SYNDROME}", 4)
    return Refused(_NOT_LS, 4)


def _a32_regs_check(rt: int, rn: int, rm: int | None, name: str) -> Refused | None:
    if rt == 15:
        return Refused(f"PC as Rt ({name}) {_NO_SYNDROME}", 4)
    if rn == 15:
        return Refused(f"PC as base register Rn ({name}, literal/PC-relative) not handled", 4)
    if rm == 15:
        return Refused(f"UNPREDICTABLE: PC as offset register Rm ({name})", 4)
    return None


def _a32_single(
    insn: int,
    name: str,
    sas: int,
    sse: bool,
    offset_imm: int,
    rm: int | None,
    shift: tuple[ShiftType, int] = (ShiftType.LSL, 0),
) -> Decoded:
    """Common tail of the word/byte and halfword/signed-byte A32 forms (P, U, W, L at 24, 23, 21, 20)."""
    p, u, w, load = _bit(insn, 24), _bit(insn, 23), _bit(insn, 21), _bit(insn, 20)
    rn, rt = _bits(insn, 19, 16), _bits(insn, 15, 12)
    refused = _a32_regs_check(rt, rn, rm, name)
    if refused is not None:
        return refused
    wb: Writeback | None = None
    if not p or w:
        if load and rt == rn:
            return Refused(_WB_OVERLAP, 4)
        if rm is None:
            wb = Writeback(rn=rn, offset=offset_imm if u else -offset_imm, post_index=not p)
        else:
            wb = Writeback(
                rn=rn,
                offset=0,
                post_index=not p,
                offset_reg=rm,
                shift_type=shift[0],
                shift_amount=shift[1],
                subtract=not u,
            )
    return Syndrome(
        isv=wb is None,
        sas=sas,
        sse=sse,
        srt=rt,
        sf=False,
        ar=False,
        wnr=not load,
        il=True,
        rn=rn,
        writeback=wb,
    )


def _a32_word_byte(insn: int) -> Decoded:
    """LDR/STR/LDRB/STRB (+T): `cond 01 I P U B W L Rn Rt imm12 | imm5 type 0 Rm`."""
    byte, load = _bit(insn, 22), _bit(insn, 20)
    unprivileged = not _bit(insn, 24) and _bit(insn, 21)
    name = ("LDR" if load else "STR") + ("B" if byte else "") + ("T" if unprivileged else "")
    if _bit(insn, 25):
        shift = decode_imm_shift(_bits(insn, 6, 5), _bits(insn, 11, 7))
        return _a32_single(insn, name, 0 if byte else 2, False, 0, _bits(insn, 3, 0), shift)
    return _a32_single(insn, name, 0 if byte else 2, False, _bits(insn, 11, 0), None)


def _a32_extra(insn: int) -> Decoded:
    """LDRH/STRH/LDRSB/LDRSH (+T) and LDRD/STRD: `cond 000 P U I W L Rn Rt imm4H 1 op2 1 imm4L|Rm`."""
    op2, load = _bits(insn, 6, 5), _bit(insn, 20)
    if op2 == 0b01:
        name, sas, sse = ("LDRH" if load else "STRH"), 1, False
    elif not load:
        return Refused(_DUAL, 4)
    elif op2 == 0b10:
        name, sas, sse = "LDRSB", 0, True
    else:
        name, sas, sse = "LDRSH", 1, True
    if not _bit(insn, 24) and _bit(insn, 21):
        name += "T"
    if _bit(insn, 22):
        imm8 = (_bits(insn, 11, 8) << 4) | _bits(insn, 3, 0)
        return _a32_single(insn, name, sas, sse, imm8, None)
    if _bits(insn, 11, 8) != 0:
        return Refused(_SBZ_SBO, 4)  # register form: bits 11:8 are (0)
    return _a32_single(insn, name, sas, sse, 0, _bits(insn, 3, 0))


def _a32_sync(insn: int) -> Decoded:
    """`cond 0001 xxxx .... .... 1001 ....`: SWP, LDREX/STREX family, LDA/STL family."""
    if _bits(insn, 27, 23) == 0b00011:
        if _bits(insn, 9, 8) != 0b00:
            return Refused(_A32_EXCLUSIVE, 4)
        size_field = _bits(insn, 22, 21)
        if size_field == 0b01:
            return Refused(_UNALLOCATED, 4)
        sas = {0b00: 2, 0b10: 0, 0b11: 1}[size_field]
        load = _bit(insn, 20)
        # LDA: cond 0001 1sz1 Rn Rt (1)(1)00 1001 (1)(1)(1)(1)
        # STL: cond 0001 1sz0 Rn (1)(1)(1)(1) (1)(1)00 1001 Rt
        if _bits(insn, 11, 10) != 0b11 or (_bits(insn, 3, 0) if load else _bits(insn, 15, 12)) != 0xF:
            return Refused(_SBZ_SBO, 4)
        rn = _bits(insn, 19, 16)
        rt = _bits(insn, 15, 12) if load else _bits(insn, 3, 0)  # STL keeps Rt in bits 3:0
        name = ("LDA" if load else "STL") + {0: "B", 1: "H", 2: ""}[sas]
        refused = _a32_regs_check(rt, rn, None, name)
        if refused is not None:
            return refused
        return Syndrome(isv=True, sas=sas, sse=False, srt=rt, sf=False, ar=True, wnr=not load, il=True, rn=rn)
    if _bits(insn, 27, 23) == 0b00010 and _bits(insn, 21, 20) == 0b00:
        return Refused(f"atomic swap (SWP/SWPB) {_NO_SYNDROME}", 4)
    return Refused(_NOT_LS, 4)


# (CRm, opc2) of `MCR p15, 0, Rt, c7, CRm, opc2` that maintain caches by MVA: DCIMVAC, DCCMVAC,
# DCCMVAU, DCCIMVAC, ICIMVAU.
_A32_CACHE_BY_MVA = frozenset([(6, 1), (10, 1), (11, 1), (14, 1), (5, 1)])


def _a32_cache_maintenance(insn: int) -> Decoded | None:
    """`MCR p15, 0, Rt, c7, CRm, opc2` (same low 28 bits in A32 and T32), or None if it is not one."""
    if insn & 0x0FFF_0F10 != 0x0E07_0F10 or (_bits(insn, 3, 0), _bits(insn, 7, 5)) not in _A32_CACHE_BY_MVA:
        return None
    rt = _bits(insn, 15, 12)
    if rt == 15:
        return Refused("UNPREDICTABLE: PC as Rt of a cache maintenance MCR", 4)
    return _cache_maintenance(rt, sf=False, il=True)


def _decode_a32(insn: int) -> Decoded:
    if a32_condition(insn) == 0xF:
        return _a32_unconditional(insn)
    cm = _a32_cache_maintenance(insn)
    if cm is not None:
        return cm
    op1 = _bits(insn, 27, 25)
    if op1 in (0b010, 0b011):
        if op1 == 0b011 and _bit(insn, 4):
            return Refused(f"{_NOT_LS} (media instruction)", 4)
        return _a32_word_byte(insn)
    if op1 == 0b100:
        return Refused(_MULTIPLE, 4)
    if op1 == 0b110 and not (_bits(insn, 24, 23) == 0 and not _bit(insn, 21)):
        return _coprocessor_space(_bits(insn, 11, 8), unconditional=False)
    if op1 == 0b000 and _bit(insn, 7) and _bit(insn, 4):
        if _bits(insn, 6, 5) == 0b00:
            return _a32_sync(insn)
        return _a32_extra(insn)
    return Refused(_NOT_LS, 4)


# --------------------------------------------------------------------------------------------- T32


# opB of `0101 opB Rm Rn Rt`: (sas, sse, load)
_T16_REGISTER_OFFSET = (
    (2, False, False),  # STR
    (1, False, False),  # STRH
    (0, False, False),  # STRB
    (0, True, True),  # LDRSB
    (2, False, True),  # LDR
    (1, False, True),  # LDRH
    (0, False, True),  # LDRB
    (1, True, True),  # LDRSH
)


def _t16(hw: int) -> Decoded:
    rt, rn = _bits(hw, 2, 0), _bits(hw, 5, 3)
    if hw >> 12 == 0b0101:  # register offset: 0101 opB Rm Rn Rt
        sas, sse, load = _T16_REGISTER_OFFSET[_bits(hw, 11, 9)]
    elif hw >> 13 == 0b011:  # LDR/STR/LDRB/STRB imm5: 011 B L imm5 Rn Rt
        sas, sse, load = (0 if _bit(hw, 12) else 2), False, _bit(hw, 11)
    elif hw >> 12 == 0b1000:  # LDRH/STRH imm5
        sas, sse, load = 1, False, _bit(hw, 11)
    elif hw >> 12 == 0b1001:  # LDR/STR Rt, [SP, #imm8*4]
        sas, sse, load = 2, False, _bit(hw, 11)
        rt, rn = _bits(hw, 10, 8), 13
    elif hw >> 11 == 0b01001:
        return Refused("PC as base register Rn (LDR literal, PC-relative) not handled", 2)
    elif hw & 0xF600 == 0xB400 or hw >> 12 == 0b1100:
        return Refused(_MULTIPLE, 2)
    else:
        return Refused(_NOT_LS, 2)
    return Syndrome(isv=True, sas=sas, sse=sse, srt=rt, sf=False, ar=False, wnr=not load, il=False, rn=rn)


def _t32_single(hw1: int, hw2: int) -> Decoded:
    """Load/store single: `1111 100 S Y size L Rn | Rt ...` (S: sign-extend, Y: imm12 form)."""
    signed, imm12_form, size, load = _bit(hw1, 8), _bit(hw1, 7), _bits(hw1, 6, 5), _bit(hw1, 4)
    rn, rt = _bits(hw1, 3, 0), _bits(hw2, 15, 12)
    if size == 3 or (signed and (size == 2 or not load)):
        return Refused(_UNALLOCATED, 4)
    name = ("LDR" if load else "STR") + ("S" if signed else "") + {0: "B", 1: "H", 2: ""}[size]
    if rt == 15:
        if load and size < 2:
            return Refused("prefetch/memory hint (PLD/PLI) is not a load (or UNPREDICTABLE PC as Rt)", 4)
        return Refused(f"PC as Rt ({name}) {_NO_SYNDROME}", 4)
    if rn == 15:
        return Refused(f"PC as base register Rn ({name}, literal/PC-relative) not handled", 4)
    wb: Writeback | None = None
    if imm12_form:
        pass  # positive imm12 offset
    elif _bit(hw2, 11):
        p, u, w, imm8 = _bit(hw2, 10), _bit(hw2, 9), _bit(hw2, 8), _bits(hw2, 7, 0)
        if not p and not w:
            return Refused(_UNALLOCATED, 4)
        if w:  # P=0: post-index, P=1: pre-index. P=1,W=0 is a negative offset or (U=1) LDRT/STRT...
            if load and rt == rn:
                return Refused(_WB_OVERLAP, 4)
            wb = Writeback(rn=rn, offset=imm8 if u else -imm8, post_index=not p)
    elif _bits(hw2, 11, 6) == 0:
        if _bits(hw2, 3, 0) in (13, 15):
            return Refused(f"UNPREDICTABLE: SP or PC as offset register Rm ({name})", 4)
    else:
        return Refused(_UNALLOCATED, 4)
    return Syndrome(
        isv=wb is None,
        sas=size,
        sse=signed,
        srt=rt,
        sf=False,
        ar=False,
        wnr=not load,
        il=True,
        rn=rn,
        writeback=wb,
    )


def _t32_dual_exclusive(hw1: int, hw2: int) -> Decoded:
    """`1110 100P U1WL`: LDRD/STRD, LDREX/STREX family, TBB/TBH, LDA/STL family."""
    if hw1 & 0xFFE0 == 0xE840:
        return Refused(_A32_EXCLUSIVE, 4)
    if hw1 & 0xFFE0 != 0xE8C0:
        return Refused(_DUAL, 4)
    op, load = _bits(hw2, 7, 4), _bit(hw1, 4)
    if op in (0b0000, 0b0001):
        return Refused(f"{_NOT_LS} (table branch TBB/TBH)" if load else _UNALLOCATED, 4)
    if op in (0b0100, 0b0101, 0b0111, 0b1100, 0b1101, 0b1110, 0b1111):
        return Refused(_A32_EXCLUSIVE, 4)
    if op not in (0b1000, 0b1001, 0b1010):
        return Refused(_UNALLOCATED, 4)
    if _bits(hw2, 11, 8) != 0xF or _bits(hw2, 3, 0) != 0xF:
        return Refused(_SBZ_SBO, 4)  # LDA/STL: Rn | Rt (1)(1)(1)(1) 10sz (1)(1)(1)(1)
    sas = op - 0b1000
    rn, rt = _bits(hw1, 3, 0), _bits(hw2, 15, 12)
    name = ("LDA" if load else "STL") + ("B", "H", "")[sas]
    if rt == 15:
        return Refused(f"PC as Rt ({name}) {_NO_SYNDROME}", 4)
    if rn == 15:
        return Refused(f"PC as base register Rn ({name}) not handled", 4)
    return Syndrome(isv=True, sas=sas, sse=False, srt=rt, sf=False, ar=True, wnr=not load, il=True, rn=rn)


def _decode_t32(insn: int) -> Decoded:
    if insn <= 0xFFFF:
        if thumb_insn_len(insn) == 4:
            return Refused("only the first halfword of a 32-bit Thumb instruction was given", 4)
        return _t16(insn)
    hw1, hw2 = insn >> 16, insn & 0xFFFF
    if thumb_insn_len(hw1) != 4:
        return Refused(f"first halfword {hw1:#06x} is a 16-bit Thumb instruction, not a 32-bit one", 2)
    if hw1 == 0xEE07:
        cm = _a32_cache_maintenance(insn)
        if cm is not None:
            return cm
    if hw1 & 0xFF10 == 0xF900:
        return Refused(_SIMD_STRUCT, 4)
    if hw1 & 0xFE00 == 0xF800:
        return _t32_single(hw1, hw2)
    if hw1 & 0xFE40 == 0xE840:
        return _t32_dual_exclusive(hw1, hw2)
    if hw1 & 0xFE40 == 0xE800:
        return Refused(_MULTIPLE, 4)
    if hw1 & 0xEE00 == 0xEC00 and not (_bits(hw1, 8, 7) == 0 and not _bit(hw1, 5)):
        return _coprocessor_space(_bits(hw2, 11, 8), unconditional=_bit(hw1, 12))
    return Refused(_NOT_LS, 4)
