"""Decode the load/store instructions that carry no syndrome (ISV=0) into a plan of single accesses.

KVM refuses these (``KVM_EXIT_ARM_NISV``); the architecture performs them, and QEMU's TCG performs them as a
sequence of single accesses. ``decode_split`` turns one such encoding into a ``Transfer``: which registers move,
how big each one is, and how the address and the base writeback are computed. ``Transfer.parts`` lays the
registers out in memory in the order QEMU issues the accesses:

* A64 LDP/STP/LDNP/STNP/LDPSW (general and SIMD&FP): two accesses of the register size, first register first.
* A64 SIMD&FP LDR/STR (B/H/S/D/Q): one access; a 128-bit Q register is two 8-byte accesses, lower address first
  (QEMU's memory core splits a 16-byte access for a device whose largest access is 8 bytes this way).
* A64 LDXR/LDAXR/STXR/STLXR (B/H/W/X) and LDXP/STXP (W/X pairs): as the plain forms, plus the exclusive monitor.
* A32/T32 LDRD/STRD: two 4-byte accesses, Rt at the address, Rt2 at address + 4.
* A32/T32 LDM/STM/PUSH/POP (IA/IB/DA/DB, T16 and T32): ascending addresses, lowest register first, 4 bytes each.
* A32/T32 LDREX/STREX (word, byte, halfword; LDREXD/STREXD as a dual).
* A32/T32 LDR PC (POP {pc} included): one 4-byte load, then an interworking branch (as an LDM loading PC).

Pure functions over integers, like ``decode``: no Unicorn, no guest state. ``None`` means "not a class this
module emulates" (the caller keeps the NISV refusal). UNPREDICTABLE and CONSTRAINED UNPREDICTABLE forms (writeback
onto a transferred register, Rt == Rt2 in a load pair, an odd LDRD Rt, an empty register list, user-register and
exception-return LDM/STM) are left refused too: the architecture lets them do anything, so refusing is allowed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

from vcpu_service.decode import Isa, ShiftType, a32_shift, decode_imm_shift, thumb_insn_len

__all__ = ["Part", "Transfer", "decode_split", "offset_amount"]

_MASK64 = 0xFFFF_FFFF_FFFF_FFFF
PC = 15


@dataclass(frozen=True, slots=True)
class Part:
    """One single access of a transfer: ``offset`` bytes from the transfer's first address, ``size`` bytes,
    for register ``regs[element]``; ``chunk`` is the part's index within that register (Q: 0 low, 1 high)."""

    offset: int
    size: int
    element: int
    chunk: int


@dataclass(frozen=True, slots=True)
class Transfer:
    """A multi-register (or SIMD) load/store to be emulated as ``parts``, in that order.

    The first address is ``base + bias`` plus, unless ``post_index``, the offset amount (an immediate
    ``offset``, or a register ``offset_reg`` shifted or extended, see ``offset_amount``). With ``writeback`` the
    base becomes ``base + amount``, where the amount is ``wb_offset`` if set (LDM/STM: 4 * registers, signed),
    else the offset amount. ``regs`` lists the registers in address order; ``reg_size`` is each register's size
    in memory; ``sse`` sign-extends a load to ``sf`` (64-bit) or 32 bits; ``simd`` says they are V registers.
    ``status`` is a store-exclusive's status register; ``exclusive`` marks LDXR/STXR-style transfers.
    """

    kind: str  # the class named in the KVM report: "pair", "dual", "multiple", "exclusive", "SIMD", "PC as Rt"
    name: str  # the mnemonic, for messages
    wnr: bool
    rn: int
    regs: tuple[int, ...]
    reg_size: int
    il: bool = True
    sf: bool = False
    sse: bool = False
    simd: bool = False
    offset: int = 0
    offset_reg: int | None = None
    shift_type: ShiftType = ShiftType.LSL
    shift_amount: int = 0
    subtract: bool = False
    extend: int | None = None  # A64 register offset: the option field (UXTW 0b010, LSL 0b011, SXTW, SXTX)
    post_index: bool = False
    writeback: bool = False
    wb_offset: int | None = None
    bias: int = 0
    exclusive: bool = False
    status: int | None = None
    a64: bool = False

    @property
    def insn_len(self) -> int:
        return 4 if self.il else 2

    @property
    def size(self) -> int:
        """Bytes transferred in all."""
        return self.reg_size * len(self.regs)

    @property
    def parts(self) -> tuple[Part, ...]:
        return _parts(self.reg_size, len(self.regs))


@functools.lru_cache(maxsize=64)
def _parts(reg_size: int, count: int) -> tuple[Part, ...]:
    chunk = min(reg_size, 8)
    return tuple(Part(i * reg_size + c * chunk, chunk, i, c) for i in range(count) for c in range(reg_size // chunk))


def offset_amount(t: Transfer, reg_value: int, carry: bool) -> int:
    """The signed offset amount: the immediate, or the offset register shifted (A32) or extended (A64)."""
    if t.offset_reg is None:
        return t.offset
    if t.extend is not None:
        value = reg_value & (0xFFFF_FFFF if t.extend & 0b011 == 0b010 else _MASK64)
        if t.extend & 0b100:  # SXTW/SXTX
            bits = 32 if t.extend & 0b001 == 0 else 64
            value -= (value >> (bits - 1)) << bits
        return value << t.shift_amount
    shifted = a32_shift(reg_value, t.shift_type, t.shift_amount, carry)
    return t.offset - shifted if t.subtract else t.offset + shifted


def decode_split(isa: Isa, insn: int) -> Transfer | None:
    """The plan for an ISV=0 load/store this module emulates, or None (see the module docstring)."""
    if isa is Isa.A64:
        return _a64(insn)
    if isa is Isa.A32:
        return _a32(insn)
    return _t32(insn)


def _bits(value: int, hi: int, lo: int) -> int:
    return (value >> lo) & ((1 << (hi - lo + 1)) - 1)


def _bit(value: int, n: int) -> bool:
    return bool((value >> n) & 1)


def _sext(value: int, width: int) -> int:
    sign = 1 << (width - 1)
    return (value ^ sign) - sign


# --------------------------------------------------------------------------------------------- A64


def _a64(insn: int) -> Transfer | None:
    if _bits(insn, 29, 27) == 0b101 and not _bit(insn, 25):
        return _a64_pair(insn)
    group = _bits(insn, 29, 24)
    if group == 0b111101 or (group == 0b111100 and (_bits(insn, 11, 10) == 0b10) == _bit(insn, 21)):
        return _a64_simd_single(insn)
    if _bits(insn, 29, 24) == 0b001000 and not _bit(insn, 23):
        return _a64_exclusive(insn)
    return None


def _a64_pair(insn: int) -> Transfer | None:
    """`opc 101 V 0 idx L imm7 Rt2 Rn Rt`: LDP/STP/LDNP/STNP/LDPSW, general or SIMD&FP registers."""
    opc, simd, idx, load = _bits(insn, 31, 30), _bit(insn, 26), _bits(insn, 24, 23), _bit(insn, 22)
    rt, rn, rt2 = _bits(insn, 4, 0), _bits(insn, 9, 5), _bits(insn, 14, 10)
    sse = False
    if simd:
        if opc == 3:
            return None
        size = 4 << opc
    elif opc == 0:
        size = 4
    elif opc == 2:
        size = 8
    elif opc == 1 and load and idx != 0:
        size, sse = 4, True  # LDPSW
    else:
        return None  # STGP (MTE), LDNP with opc 01, unallocated
    if load and rt == rt2:
        return None  # CONSTRAINED UNPREDICTABLE
    writeback = idx in (0b01, 0b11)
    if writeback and not simd and rn != 31 and rn in (rt, rt2):
        return None  # CONSTRAINED UNPREDICTABLE
    name = ("LD" if load else "ST") + ("NP" if idx == 0 else "PSW" if sse else "P")
    return Transfer("SIMD" if simd else "pair", name, not load, rn, (rt, rt2), size, sf=simd or size == 8 or sse,
                    sse=sse, simd=simd, offset=_sext(_bits(insn, 21, 15), 7) * size, post_index=idx == 0b01,
                    writeback=writeback, a64=True)


def _a64_simd_single(insn: int) -> Transfer | None:
    """`size 111 1 0x opc ...`: SIMD&FP LDR/STR B/H/S/D/Q (unsigned offset, unscaled, pre/post, register)."""
    if not _bit(insn, 26):
        return None
    size, opc = _bits(insn, 31, 30), _bits(insn, 23, 22)
    if opc & 0b10:
        if size != 0:
            return None
        scale = 4  # Q
    else:
        scale = size
    reg_size = 1 << scale
    load = bool(opc & 1)
    rt, rn = _bits(insn, 4, 0), _bits(insn, 9, 5)
    name = ("LDR" if load else "STR") + " " + "BHSDQ"[scale]
    plain = Transfer("SIMD", name, not load, rn, (rt,), reg_size, sf=True, simd=True, a64=True)
    if _bits(insn, 29, 24) == 0b111101:
        return replace(plain, offset=_bits(insn, 21, 10) << scale)
    if _bit(insn, 21):
        option = _bits(insn, 15, 13)
        if not option & 0b010:
            return None
        shift = scale if _bit(insn, 12) else 0
        return replace(plain, offset_reg=_bits(insn, 20, 16), extend=option, shift_amount=shift)
    kind = _bits(insn, 11, 10)
    imm9 = _sext(_bits(insn, 20, 12), 9)
    if kind == 0b00:
        return replace(plain, name=name.replace("R", "UR", 1), offset=imm9)
    return replace(plain, offset=imm9, post_index=kind == 0b01, writeback=True)


def _a64_exclusive(insn: int) -> Transfer | None:
    """`size 001000 0 L o1 Rs o0 Rt2 Rn Rt`: LDXR/LDAXR/STXR/STLXR (o1 0) and LDXP/LDAXP/STXP/STLXP (o1 1)."""
    size, load, pair = _bits(insn, 31, 30), _bit(insn, 22), _bit(insn, 21)
    rs, rt2, rn, rt = _bits(insn, 20, 16), _bits(insn, 14, 10), _bits(insn, 9, 5), _bits(insn, 4, 0)
    if pair and size < 2:
        return None  # CASP
    regs = (rt, rt2) if pair else (rt,)
    if load:
        if rs != 31 or (not pair and rt2 != 31) or (pair and rt == rt2):
            return None
    elif rs in regs or (rs == rn and rn != 31):
        return None  # CONSTRAINED UNPREDICTABLE
    acquire = _bit(insn, 15)
    name = ("LDA" if load and acquire else "LD" if load else "STL" if acquire else "ST") + "X" + (
        "P" if pair else "R" + ("B", "H", "", "")[size])
    return Transfer("exclusive", name, not load, rn, regs, 1 << size, sf=size == 3, exclusive=True,
                    status=None if load else rs, a64=True)


# --------------------------------------------------------------------------------------------- A32


def _a32(insn: int) -> Transfer | None:
    if insn >> 28 == 0xF:
        return None
    op1 = _bits(insn, 27, 25)
    if op1 == 0b100:
        return _a32_multiple(insn)
    if op1 in (0b010, 0b011) and not (op1 == 0b011 and _bit(insn, 4)):
        return _a32_load_pc(insn)
    if op1 == 0b000 and _bit(insn, 7) and _bit(insn, 4):
        if _bits(insn, 6, 5) == 0b00:
            return _a32_exclusive(insn)
        if not _bit(insn, 20) and _bits(insn, 6, 5) in (0b10, 0b11):
            return _a32_dual(insn)
    return None


def _multiple(name: str, load: bool, rn: int, reglist: int, increment: bool, before: bool, writeback: bool,
              il: bool = True) -> Transfer | None:
    """LDM/STM in any mode: registers ascending to ascending addresses; ``before`` is IB/DB."""
    regs = tuple(r for r in range(16) if reglist >> r & 1)
    n = len(regs)
    if n == 0 or rn == PC or (writeback and load and rn in regs):
        return None  # UNPREDICTABLE
    bias = (4 if before else 0) if increment else -4 * n + (0 if before else 4)
    return Transfer("multiple", name, not load, rn, regs, 4, il=il, post_index=True, writeback=writeback,
                    wb_offset=4 * n if increment else -4 * n, bias=bias)


def _a32_multiple(insn: int) -> Transfer | None:
    """`cond 100P USWL Rn register_list`."""
    if _bit(insn, 22):
        return None  # LDM (user registers / exception return), STM (user registers)
    p, u, w, load = _bit(insn, 24), _bit(insn, 23), _bit(insn, 21), _bit(insn, 20)
    rn = _bits(insn, 19, 16)
    mode = ("I" if u else "D") + ("B" if p else "A")
    name = ("POP" if load else "PUSH") if rn == 13 and w and mode == ("IA" if load else "DB") else \
        ("LDM" if load else "STM") + mode
    return _multiple(name, load, rn, _bits(insn, 15, 0), u, p, w)


def _a32_load_pc(insn: int) -> Transfer | None:
    """`cond 01IP U0W1 Rn 1111 ...`: LDR PC (POP {pc} included), a load then an interworking branch."""
    p, u, byte, w, load = _bit(insn, 24), _bit(insn, 23), _bit(insn, 22), _bit(insn, 21), _bit(insn, 20)
    rn, rt = _bits(insn, 19, 16), _bits(insn, 15, 12)
    if rt != PC or not load or byte or rn == PC or (not p and w):
        return None  # not LDR PC, a literal, or LDRT
    writeback = not p or w
    if not _bit(insn, 25):
        offset = _bits(insn, 11, 0)
        return Transfer("PC as Rt", "LDR", False, rn, (PC,), 4, offset=offset if u else -offset, post_index=not p,
                        writeback=writeback)
    rm = _bits(insn, 3, 0)
    if rm == PC or (writeback and rm == rn):
        return None
    shift_type, amount = decode_imm_shift(_bits(insn, 6, 5), _bits(insn, 11, 7))
    return Transfer("PC as Rt", "LDR", False, rn, (PC,), 4, offset_reg=rm, shift_type=shift_type,
                    shift_amount=amount, subtract=not u, post_index=not p, writeback=writeback)


def _a32_dual(insn: int) -> Transfer | None:
    """`cond 000P UIW0 Rn Rt imm4H 11S1 imm4L|Rm`: LDRD (S 0) and STRD (S 1)."""
    p, u, imm, w, load = _bit(insn, 24), _bit(insn, 23), _bit(insn, 22), _bit(insn, 21), _bits(insn, 6, 5) == 0b10
    rn, rt = _bits(insn, 19, 16), _bits(insn, 15, 12)
    writeback = not p or w
    if rt & 1 or rt == 14 or rn == PC or (not p and w) or (writeback and rn in (rt, rt + 1)):
        return None  # UNPREDICTABLE, or a literal form
    name = "LDRD" if load else "STRD"
    if imm:
        offset = (_bits(insn, 11, 8) << 4) | _bits(insn, 3, 0)
        return Transfer("dual", name, not load, rn, (rt, rt + 1), 4, offset=offset if u else -offset,
                        post_index=not p, writeback=writeback)
    rm = _bits(insn, 3, 0)
    if _bits(insn, 11, 8) or rm == PC or (load and rm in (rt, rt + 1)):
        return None
    return Transfer("dual", name, not load, rn, (rt, rt + 1), 4, offset_reg=rm, subtract=not u,
                    post_index=not p, writeback=writeback)


def _a32_exclusive(insn: int) -> Transfer | None:
    """`cond 0001 1 sz L Rn Rt|Rd 11 1x 1001 1111|Rt`: LDREX/STREX{B,H,D} and LDAEX/STLEX{B,H,D}."""
    if _bits(insn, 27, 23) != 0b00011 or not _bit(insn, 9) or _bits(insn, 7, 4) != 0b1001:
        return None
    sz, load = _bits(insn, 22, 21), _bit(insn, 20)
    rn = _bits(insn, 19, 16)
    if load:
        rt, status = _bits(insn, 15, 12), None
        if _bits(insn, 3, 0) != 0xF:
            return None
    else:
        status, rt = _bits(insn, 15, 12), _bits(insn, 3, 0)
    return _exclusive(load, rn, rt, status, sz, il=True)


def _exclusive(load: bool, rn: int, rt: int, status: int | None, sz: int, il: bool,
               rt2: int | None = None) -> Transfer | None:
    """An AArch32 LDREX/STREX of size ``sz`` (0 word, 1 dual, 2 byte, 3 halfword)."""
    if sz == 1:
        if rt2 is None:  # A32: the pair is Rt, Rt+1
            if rt & 1 or rt == 14:
                return None
            rt2 = rt + 1
        regs: tuple[int, ...] = (rt, rt2)
    else:
        regs = (rt,)
    if rn == PC or PC in regs or (load and len(set(regs)) != len(regs)):
        return None
    if status is not None and (status in (PC, rn) or status in regs):
        return None
    size = {0: 4, 1: 4, 2: 1, 3: 2}[sz]
    name = ("LDREX" if load else "STREX") + {0: "", 1: "D", 2: "B", 3: "H"}[sz]
    return Transfer("exclusive", name, not load, rn, regs, size, il=il, exclusive=True, status=status)


# --------------------------------------------------------------------------------------------- T32


def _t32(insn: int) -> Transfer | None:
    if insn <= 0xFFFF:
        return _t16(insn)
    hw1, hw2 = insn >> 16, insn & 0xFFFF
    if thumb_insn_len(hw1) != 4:
        return None
    if hw1 & 0xFE40 == 0xE800:
        return _t32_multiple(hw1, hw2)
    if hw1 & 0xFF70 == 0xF850 and _bits(hw2, 15, 12) == PC:
        return _t32_load_pc(hw1, hw2)
    if hw1 & 0xFE40 == 0xE840:
        return _t32_dual_exclusive(hw1, hw2)
    return None


def _t16(hw: int) -> Transfer | None:
    if thumb_insn_len(hw) == 4:
        return None
    if hw & 0xF600 == 0xB400:  # PUSH 1011 010M list, POP 1011 110P list
        load = _bit(hw, 11)
        extra = (1 << PC) if load else (1 << 14)
        reglist = _bits(hw, 7, 0) | (extra if _bit(hw, 8) else 0)
        return _multiple("POP" if load else "PUSH", load, 13, reglist, load, not load, True, il=False)
    if hw >> 12 == 0b1100:  # STMIA/LDMIA Rn!, list (LDM: no writeback when Rn is in the list)
        load, rn, reglist = _bit(hw, 11), _bits(hw, 10, 8), _bits(hw, 7, 0)
        writeback = not (load and reglist >> rn & 1)
        return _multiple("LDMIA" if load else "STMIA", load, rn, reglist, True, False, writeback, il=False)
    return None


def _t32_multiple(hw1: int, hw2: int) -> Transfer | None:
    """`1110 100 op 0 W L Rn | P M 0 register_list`: LDM.W/STM.W IA (op 01) and DB (op 10), PUSH.W/POP.W."""
    op, w, load, rn = _bits(hw1, 8, 7), _bit(hw1, 5), _bit(hw1, 4), _bits(hw1, 3, 0)
    if op not in (0b01, 0b10) or _bit(hw1, 6) or _bit(hw2, 13) or (not load and _bit(hw2, 15)):
        return None  # SRS/RFE, SP in the list, PC stored
    if load and _bit(hw2, 15) and _bit(hw2, 14):
        return None  # UNPREDICTABLE: PC and LR
    increment = op == 0b01
    name = ("POP.W" if load else "PUSH.W") if rn == 13 and w and increment == load else \
        ("LDM" if load else "STM") + ("IA" if increment else "DB") + ".W"
    return _multiple(name, load, rn, hw2, increment, not increment, w)


def _t32_load_pc(hw1: int, hw2: int) -> Transfer | None:
    """`1111 1000 U101 Rn | 1111 ...`: LDR.W PC (imm12, imm8 with P/U/W, register with LSL #0-3)."""
    rn = _bits(hw1, 3, 0)
    if rn == PC:
        return None  # literal
    if _bit(hw1, 7):
        return Transfer("PC as Rt", "LDR.W", False, rn, (PC,), 4, offset=_bits(hw2, 11, 0))
    if _bit(hw2, 11):
        p, u, w, imm8 = _bit(hw2, 10), _bit(hw2, 9), _bit(hw2, 8), _bits(hw2, 7, 0)
        if (not p and not w) or (p and u and not w):
            return None  # unallocated, or LDRT
        return Transfer("PC as Rt", "LDR", False, rn, (PC,), 4, offset=imm8 if u else -imm8, post_index=not p,
                        writeback=w)
    rm = _bits(hw2, 3, 0)
    if _bits(hw2, 11, 6) or rm in (13, PC):
        return None
    return Transfer("PC as Rt", "LDR.W", False, rn, (PC,), 4, offset_reg=rm, shift_amount=_bits(hw2, 5, 4))


def _t32_dual_exclusive(hw1: int, hw2: int) -> Transfer | None:
    """`1110 100P U1WL`: LDRD/STRD (immediate), LDREX/STREX{,B,H,D}."""
    load, rn = _bit(hw1, 4), _bits(hw1, 3, 0)
    rt, rt2 = _bits(hw2, 15, 12), _bits(hw2, 11, 8)
    if hw1 & 0xFFE0 == 0xE840:  # LDREX/STREX: Rt Rd|1111 imm8
        if load and rt2 != 0xF:
            return None
        transfer = _exclusive(load, rn, rt, None if load else rt2, 0, il=True)
        if transfer is None or _bits(hw2, 7, 0) == 0:
            return transfer
        return replace(transfer, offset=_bits(hw2, 7, 0) << 2)
    if hw1 & 0xFFE0 == 0xE8C0:  # LDREXB/H/D, STREXB/H/D (op 0100/0101/0111), TBB/TBH, LDA/STL: Rn | Rt Rt2 op Rd
        op = _bits(hw2, 7, 4)
        sz = {0b0100: 2, 0b0101: 3, 0b0111: 1}.get(op)
        if sz is None:
            return None
        status = None if load else _bits(hw2, 3, 0)
        if load and _bits(hw2, 3, 0) != 0xF:
            return None
        if sz != 1 and rt2 != 0xF:
            return None
        return _exclusive(load, rn, rt, status, sz, il=True, rt2=rt2 if sz == 1 else None)
    p, u, w = _bit(hw1, 8), _bit(hw1, 7), _bit(hw1, 5)
    if not p and not w:
        return None
    if rn == PC or rt in (13, PC) or rt2 in (13, PC) or (load and rt == rt2) or (w and rn in (rt, rt2)):
        return None  # literal, or UNPREDICTABLE
    offset = _bits(hw2, 7, 0) << 2
    return Transfer("dual", "LDRD" if load else "STRD", not load, rn, (rt, rt2), 4,
                    offset=offset if u else -offset, post_index=not p, writeback=w)



