"""Seeded random instances of every load/store class `decode()` turns into a `Syndrome`, per ISA.

An instance is one access: its encoding (plus, on T32, an optional IT block around it), every general register's
initial value, the flags, and the 16 bytes of its slot in the device window. The base (and offset) registers are
solved so that the access lands, aligned to its size, inside the instance's slot; everything else is random:
registers including 31 (A64 XZR and SP), immediates, shift types and amounts (RRX too), signs, sizes, register
values, slot bytes, conditions.

A batch is what one guest program runs: instances of one ISA sharing a CPU model, a data endianness, a privilege
level (EL1/SVC, or EL0/User), posted or non-posted device writes, a window base and a *reserved* pointer register
that the harness uses for the register tables and that no instance touches. The reserved register and the four
configuration bits rotate between batches, so a campaign of a few dozen batches per ISA uses every register number
in every role and every configuration.

Classes that need a newer architecture (A64 LDLAR/LDAPR/LDAPUR, AArch32 LDA/STL) are generated only for batches on
the `max` CPU; the others run on the default CPU of `vcpu_service.arch`. UNPREDICTABLE encodings are never
generated: writeback with Rt == Rn (loads and stores), AArch32 PC anywhere, T32 SP as Rt where the ARM ARM forbids it
and SP/PC as Rm. Refused classes are not generated at all.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from tests.differential.encoders import T32, Halfwords, it_mask
from vcpu_service.decode import Isa, ShiftType, a32_shift, condition_passed, decode_imm_shift

SLOT = 16
MASK32 = 0xFFFF_FFFF
MASK64 = 0xFFFF_FFFF_FFFF_FFFF
AL = 0xE
COND_NAMES = ("eq", "ne", "cs", "cc", "mi", "pl", "vs", "vc", "hi", "ls", "ge", "lt", "gt", "le", "al")

# CPU models per ISA: (default, max). Batches alternate between them.
CPU_MODELS = {Isa.A64: ("cortex-a57", "max"), Isa.A32: ("cortex-a15", "max"), Isa.T32: ("cortex-a15", "max")}
GPR_COUNT = {Isa.A64: 31, Isa.A32: 15, Isa.T32: 15}


@dataclass(frozen=True, slots=True)
class Instance:
    """One access under test and the machine state it starts from."""

    index: int
    isa: Isa
    klass: str  # the addressing class, e.g. "register offset" or "imm8 pre-index"
    op: str  # mnemonic-like name of the access, e.g. "LDRSH x" or "STRB"
    detail: str  # what else was drawn: shift, extend, condition, IT block
    encoding: int  # the access as decode() takes it
    code: tuple[int, ...]  # A64/A32: words; T32: halfwords (IT block and fillers included)
    regs: tuple[int, ...]  # x0..x30 (A64) or r0..r14 (AArch32)
    sp: int  # A64 SP (AArch32 SP is regs[13])
    flags: int  # A64: NZCV in bits 31:28; AArch32: NZCVQ in bits 31:27
    address: int  # where the access goes (inside this instance's slot)
    size: int
    is_store: bool
    executes: bool  # False when the condition (A32 cond field or IT block) fails: no access at all
    extra_accesses: int  # T32: device accesses by a second load/store in the IT block that execute (0 or 1)
    rt: int
    rn: int
    rm: int | None
    signed: bool
    x_reg: bool  # A64: the transfer register is Xt
    acquire_release: bool
    writeback: str  # "", "pre" or "post"
    slot: bytes  # the 16 bytes of device memory (or RAM) this instance may touch


@dataclass(frozen=True, slots=True)
class Batch:
    """Instances that run as one guest program (one VM)."""

    isa: Isa
    seed: str
    number: int
    cpu_model: str
    big_endian: bool
    unprivileged: bool  # run at EL0 (A64) or in User mode (AArch32) instead of EL1/SVC
    posted: bool  # the scratch device takes posted writes: stores retire at once and reach it later, in order
    reserved: int  # the pointer register of the harness; no instance uses it
    window_base: int
    window_size: int
    instances: tuple[Instance, ...]
    window: bytes  # initial contents of the whole window: the slots, then random padding

    @property
    def used(self) -> int:
        """Bytes of the window the instances can touch (the slots)."""
        return SLOT * len(self.instances)


# --------------------------------------------------------------------------------------------- helpers


def _value(rng: random.Random, bits: int) -> int:
    """A register value: mostly uniform, sometimes small, near the sign boundary, or all-zeros/ones."""
    r = rng.random()
    if r < 0.7:
        return rng.getrandbits(bits)
    if r < 0.8:
        return rng.randrange(256)
    if r < 0.9:
        return ((1 << (bits - 1)) + rng.randrange(-128, 128)) % (1 << bits)
    return rng.choice((0, (1 << bits) - 1, 1 << (bits - 1), (1 << (bits - 1)) - 1))


def _sext(value: int, bits: int) -> int:
    sign = 1 << (bits - 1)
    return ((value & ((1 << bits) - 1)) ^ sign) - sign


def solve_self_offset(target: int, shift: int, subtract: bool, bits: int, rng: random.Random) -> int | None:
    """v with v +- (v << shift) == target (mod 2**bits): the base when Rm == Rn; None when there is none."""
    modulus = 1 << bits
    mult = (1 - (1 << shift)) if subtract else (1 + (1 << shift))
    mult %= modulus
    if mult & 1:
        return target * pow(mult, -1, modulus) % modulus
    if mult == 2 and not target & 1:
        return (target >> 1) + rng.choice((0, modulus >> 1))
    return None


class _Regs:
    """Initial register values of one instance (A64: x0..x30 and SP; AArch32: r0..r14)."""

    def __init__(self, rng: random.Random, isa: Isa) -> None:
        self.isa = isa
        self.bits = 64 if isa is Isa.A64 else 32
        self.values = [_value(rng, self.bits) for _ in range(GPR_COUNT[isa])]
        self.sp = _value(rng, 64) if isa is Isa.A64 else 0

    def read(self, n: int, sp: bool) -> int:
        """Register n as an operand: on A64 31 is SP when `sp`, else XZR."""
        if self.isa is Isa.A64 and n == 31:
            return self.sp if sp else 0
        return self.values[n]

    def write(self, n: int, value: int, sp: bool) -> None:
        value &= (1 << self.bits) - 1
        if self.isa is Isa.A64 and n == 31:
            if sp:
                self.sp = value
            return
        self.values[n] = value


@dataclass
class _Draw:
    """What a class generator decided, before the common bookkeeping turns it into an `Instance`."""

    klass: str
    op: str
    encoding: int
    size: int
    is_store: bool
    rt: int
    rn: int
    signed: bool
    rm: int | None = None
    x_reg: bool = False
    acquire_release: bool = False
    writeback: str = ""
    detail: str = ""
    cond: int = AL


class _Gen:
    """State shared by the class generators of one instance."""

    def __init__(self, rng: random.Random, isa: Isa, reserved: int, slot_address: int, max_cpu: bool) -> None:
        self.rng = rng
        self.isa = isa
        self.reserved = reserved
        self.slot_address = slot_address
        self.max_cpu = max_cpu
        self.regs = _Regs(rng, isa)
        self.flags = rng.getrandbits(4) << 28 if isa is Isa.A64 else rng.getrandbits(5) << 27
        self.target = 0

    def reg(self, choices: range | list[int] | tuple[int, ...], exclude: tuple[int, ...] = ()) -> int:
        pool = [r for r in choices if r != self.reserved and r not in exclude]
        return self.rng.choice(pool)

    def pick_target(self, size: int, even: bool = False) -> int:
        """An address inside the slot, aligned to the access size (even when `even`)."""
        step = max(size, 2 if even else 1)
        self.target = self.slot_address + step * self.rng.randrange(SLOT // step)
        return self.target

    def imm(self, bits: int) -> int:
        """An unsigned immediate field: often small, otherwise uniform."""
        if self.rng.random() < 0.3:
            return self.rng.randrange(min(16, 1 << bits))
        return self.rng.getrandbits(bits)

    @property
    def carry(self) -> bool:
        return bool(self.flags >> 29 & 1)


# --------------------------------------------------------------------------------------------- A64

# (opc, size) of the LDR/STR size:opc table and what they mean: (store, signed, X target)
_A64_OPS: list[tuple[int, int, str]] = (
    [(0, s, f"STR{'BH'[s] if s < 2 else ''} {'x' if s == 3 else 'w'}") for s in range(4)]
    + [(1, s, f"LDR{'BH'[s] if s < 2 else ''} {'x' if s == 3 else 'w'}") for s in range(4)]
    + [(2, s, f"LDRS{'BHW'[s]} x") for s in range(3)]
    + [(3, s, f"LDRS{'BH'[s]} w") for s in range(2)]
)


def _a64_op(g: _Gen) -> tuple[int, int, bool, bool, bool, str]:
    opc, size, name = g.rng.choice(_A64_OPS)
    return opc, size, opc == 0, opc >= 2, (opc == 2) or (opc < 2 and size == 3), name


def _a64_regs(g: _Gen, writeback: bool) -> tuple[int, int]:
    rt = g.reg(range(32))
    # Writeback with Rt == Rn is refused for loads and CONSTRAINED UNPREDICTABLE for stores (31 is XZR vs SP).
    rn = g.reg(range(32), exclude=(rt,) if writeback and rt != 31 else ())
    return rt, rn


def _a64_imm12(g: _Gen) -> _Draw:
    opc, size, store, signed, x, name = _a64_op(g)
    rt, rn = _a64_regs(g, False)
    imm12 = g.imm(12)
    target = g.pick_target(1 << size)
    g.regs.write(rn, target - (imm12 << size), sp=True)
    enc = size << 30 | 0x3900_0000 | opc << 22 | imm12 << 10 | rn << 5 | rt
    return _Draw("unsigned imm12", name, enc, 1 << size, store, rt, rn, signed, x_reg=x, detail=f"#{imm12 << size}")


def _a64_imm9(g: _Gen, kind: int) -> _Draw:
    """kind (bits 11:10): 00 unscaled, 01 post-index, 10 unprivileged, 11 pre-index."""
    opc, size, store, signed, x, name = _a64_op(g)
    wb = {1: "post", 3: "pre"}.get(kind, "")
    rt, rn = _a64_regs(g, bool(wb))
    imm9 = _sext(g.rng.getrandbits(9), 9) if g.rng.random() < 0.7 else g.rng.randrange(-16, 16)
    target = g.pick_target(1 << size)
    g.regs.write(rn, target if wb == "post" else target - imm9, sp=True)
    enc = size << 30 | 0x3800_0000 | opc << 22 | (imm9 & 0x1FF) << 12 | kind << 10 | rn << 5 | rt
    klass = {0: "unscaled imm9", 1: "imm9 post-index", 2: "unprivileged", 3: "imm9 pre-index"}[kind]
    if kind == 2:
        name = name.replace("LDR", "LDTR").replace("STR", "STTR")
    elif kind == 0:
        name = name.replace("LDR", "LDUR").replace("STR", "STUR")
    return _Draw(klass, name, enc, 1 << size, store, rt, rn, signed, x_reg=x, writeback=wb, detail=f"#{imm9}")


_A64_EXTEND = {2: "uxtw", 3: "lsl", 6: "sxtw", 7: "sxtx"}


def _a64_extend(option: int, value: int) -> int:
    if option == 2:
        return value & MASK32
    if option == 6:
        return _sext(value, 32) & MASK64
    return value & MASK64


def _a64_register(g: _Gen) -> _Draw:
    opc, size, store, signed, x, name = _a64_op(g)
    rt, rn = _a64_regs(g, False)
    option = g.rng.choice(tuple(_A64_EXTEND))
    s = g.rng.getrandbits(1)
    shift = size if s else 0
    for _ in range(20):
        rm = g.reg(range(32))
        target = g.pick_target(1 << size, even=True)
        if rm != rn or rn == 31:  # Rn 31 is SP, Rm 31 is XZR: different registers
            offset = _a64_extend(option, g.regs.read(rm, sp=False)) << shift
            g.regs.write(rn, target - offset, sp=True)
            break
        low = solve_self_offset(target & MASK32 if option in (2, 6) else target, shift, False,
                                32 if option in (2, 6) else 64, g.rng)
        if low is None:
            continue
        value = (target - (_a64_extend(option, low) << shift)) & MASK64 if option in (2, 6) else low
        g.regs.write(rn, value, sp=True)
        break
    else:
        raise AssertionError("no register-offset operands found")
    offset = _a64_extend(option, g.regs.read(rm, sp=False)) << shift
    assert (g.regs.read(rn, sp=True) + offset) & MASK64 == target, "register-offset address"
    enc = size << 30 | 0x3820_0800 | opc << 22 | rm << 16 | option << 13 | s << 12 | rn << 5 | rt
    return _Draw("register offset", name, enc, 1 << size, store, rt, rn, signed, rm=rm, x_reg=x,
                 detail=f"{_A64_EXTEND[option]} #{shift}" + (" rm=rn" if rm == rn else ""))


def _a64_ordered(g: _Gen) -> _Draw:
    """LDAR/STLR (v8.0), and on the max CPU LDLAR/STLLR (LOR) and LDAPR (RCpc)."""
    size = g.rng.randrange(4)
    kinds = ["ldar", "stlr"] + (["ldlar", "stllr", "ldapr"] if g.max_cpu else [])
    kind = g.rng.choice(kinds)
    store = kind.startswith("st")
    rt, rn = _a64_regs(g, False)
    g.regs.write(rn, g.pick_target(1 << size), sp=True)
    if kind == "ldapr":
        enc = size << 30 | 0x38BF_C000 | rn << 5 | rt
        klass = "RCpc LDAPR"
    else:
        o0 = int(kind in ("ldar", "stlr"))
        enc = size << 30 | 0x089F_7C00 | int(not store) << 22 | o0 << 15 | rn << 5 | rt
        klass = "acquire/release" if o0 else "LORegion"
    suffix = "BH"[size] if size < 2 else ""
    return _Draw(klass, f"{kind.upper()}{suffix} {'x' if size == 3 else 'w'}", enc, 1 << size, store, rt, rn,
                 False, x_reg=size == 3, acquire_release=True)


def _a64_rcpc_unscaled(g: _Gen) -> _Draw:
    """LDAPUR/STLUR and the sign-extending LDAPURS* (FEAT_LRCPC2, max CPU)."""
    opc, size, store, signed, x, name = g.rng.choice(
        [(0, s, True, False, s == 3, "STLUR") for s in range(4)]
        + [(1, s, False, False, s == 3, "LDAPUR") for s in range(4)]
        + [(2, s, False, True, True, "LDAPURS") for s in range(3)]
        + [(3, s, False, True, False, "LDAPURS") for s in range(2)]
    )
    rt, rn = _a64_regs(g, False)
    imm9 = _sext(g.rng.getrandbits(9), 9)
    g.regs.write(rn, g.pick_target(1 << size) - imm9, sp=True)
    enc = size << 30 | 0x1900_0000 | opc << 22 | (imm9 & 0x1FF) << 12 | rn << 5 | rt
    suffix = ("B", "H", "W" if signed else "", "")[size]
    return _Draw("RCpc unscaled", f"{name}{suffix} {'x' if x else 'w'}", enc, 1 << size, store, rt, rn, signed,
                 x_reg=x, acquire_release=True, detail=f"#{imm9}")


_A64_CLASSES: list[tuple[float, Callable[[_Gen], _Draw], bool]] = [
    (3, _a64_imm12, False),
    (2, lambda g: _a64_imm9(g, 0), False),
    (1.5, lambda g: _a64_imm9(g, 2), False),
    (3, _a64_register, False),
    (2.5, lambda g: _a64_imm9(g, 1), False),
    (2.5, lambda g: _a64_imm9(g, 3), False),
    (1.5, _a64_ordered, False),
    (1.5, _a64_rcpc_unscaled, True),
]


# --------------------------------------------------------------------------------------------- A32

_A32_MODES = ("offset", "pre-index", "post-index", "unprivileged")  # (P, W) = (1, 0), (1, 1), (0, 0), (0, 1)
_PW = {"offset": (1, 0), "pre-index": (1, 1), "post-index": (0, 0), "unprivileged": (0, 1)}


def _a32_cond(g: _Gen) -> int:
    return g.rng.randrange(15) if g.rng.random() < 0.2 else AL


def _a32_offset_base(g: _Gen, mode: str, rn: int, rm: int | None, offset_of: Callable[[int], int],
                     target: int) -> bool:
    """Set Rn so that the access goes to target; False when Rm == Rn makes that impossible."""
    if mode in ("post-index", "unprivileged"):
        g.regs.write(rn, target, sp=True)
        return True
    if rm != rn:
        g.regs.write(rn, target - offset_of(g.regs.read(rm, sp=False) if rm is not None else 0), sp=True)
        return True
    return False


def _a32_word_byte(g: _Gen, register: bool) -> _Draw:
    mode = g.rng.choice(_A32_MODES)
    p, w = _PW[mode]
    byte, load, u = g.rng.getrandbits(1), g.rng.getrandbits(1), g.rng.getrandbits(1)
    size = 1 if byte else 4
    wb = mode != "offset"
    rt = g.reg(range(15))
    rn = g.reg(range(15), exclude=(rt,) if wb else ())
    cond = _a32_cond(g)
    name = ("LDR" if load else "STR") + ("B" if byte else "") + ("T" if mode == "unprivileged" else "")
    rm: int | None = None
    if not register:
        imm12 = g.imm(12)
        g.pick_target(size)
        _a32_offset_base(g, mode, rn, None, lambda _: imm12 if u else -imm12, g.target)
        enc = cond << 28 | 0x0400_0000 | p << 24 | u << 23 | byte << 22 | w << 21 | load << 20 | rn << 16
        enc |= rt << 12 | imm12
        detail = f"#{'' if u else '-'}{imm12}"
    else:
        for _ in range(40):
            rm = g.reg(range(15))
            type2, imm5 = g.rng.randrange(4), g.rng.randrange(32)
            kind, amount = decode_imm_shift(type2, imm5)
            carry = g.carry

            def offset_of(value: int, kind: ShiftType = kind, amount: int = amount, carry: bool = carry,
                          u: int = u) -> int:
                shifted = a32_shift(value, kind, amount, carry)
                return shifted if u else -shifted

            target = g.pick_target(size, even=True)
            if _a32_offset_base(g, mode, rn, rm, offset_of, target):
                break
            if kind is ShiftType.LSL:
                value = solve_self_offset(target, amount, not u, 32, g.rng)
                if value is not None:
                    g.regs.write(rn, value, sp=True)
                    break
        else:
            raise AssertionError("no A32 register-offset operands found")
        enc = cond << 28 | 0x0600_0000 | p << 24 | u << 23 | byte << 22 | w << 21 | load << 20 | rn << 16
        enc |= rt << 12 | imm5 << 7 | type2 << 5 | rm
        detail = f"{'' if u else '-'}r{rm}, {kind.name.lower()} #{amount}" + (" rm=rn" if rm == rn else "")
        if p:
            shifted = a32_shift(g.regs.read(rm, sp=False), kind, amount, g.carry)
            assert (g.regs.read(rn, sp=True) + (shifted if u else -shifted)) & MASK32 == g.target
    klass = f"word/byte {'register' if register else 'imm12'} {mode}"
    return _Draw(klass, name, enc, size, not load, rt, rn, False, rm=rm, cond=cond,
                 writeback={"pre-index": "pre", "post-index": "post", "unprivileged": "post"}.get(mode, ""),
                 detail=detail)


def _a32_extra(g: _Gen, register: bool) -> _Draw:
    """LDRH/STRH/LDRSB/LDRSH and their unprivileged (T) forms, imm8 or register offset."""
    mode = g.rng.choice(_A32_MODES)
    p, w = _PW[mode]
    name, op2, load, size, signed = g.rng.choice([
        ("STRH", 1, 0, 2, False), ("LDRH", 1, 1, 2, False), ("LDRSB", 2, 1, 1, True), ("LDRSH", 3, 1, 2, True)
    ])
    u = g.rng.getrandbits(1)
    wb = mode != "offset"
    rt = g.reg(range(15))
    rn = g.reg(range(15), exclude=(rt,) if wb else ())
    cond = _a32_cond(g)
    if mode == "unprivileged":
        name += "T"
    base = cond << 28 | p << 24 | u << 23 | w << 21 | load << 20 | rn << 16 | rt << 12 | 0x90 | op2 << 5
    rm: int | None = None
    if not register:
        imm8 = g.imm(8)
        g.pick_target(size)
        _a32_offset_base(g, mode, rn, None, lambda _: imm8 if u else -imm8, g.target)
        enc = base | 1 << 22 | (imm8 >> 4) << 8 | (imm8 & 0xF)
        detail = f"#{'' if u else '-'}{imm8}"
    else:
        for _ in range(40):
            rm = g.reg(range(15))
            target = g.pick_target(size, even=True)
            if _a32_offset_base(g, mode, rn, rm, lambda v: v if u else -v, target):
                break
            value = solve_self_offset(target, 0, not u, 32, g.rng)
            if value is not None:
                g.regs.write(rn, value, sp=True)
                break
        else:
            raise AssertionError("no A32 extra register-offset operands found")
        assert rm is not None
        enc = base | rm
        detail = f"{'' if u else '-'}r{rm}" + (" rm=rn" if rm == rn else "")
    klass = f"halfword/signed {'register' if register else 'imm8'} {mode}"
    return _Draw(klass, name, enc, size, not load, rt, rn, signed, rm=rm, cond=cond,
                 writeback={"pre-index": "pre", "post-index": "post", "unprivileged": "post"}.get(mode, ""),
                 detail=detail)


def _a32_ordered(g: _Gen) -> _Draw:
    """LDA/LDAB/LDAH/STL/STLB/STLH (ARMv8 AArch32, max CPU)."""
    size = g.rng.choice((1, 2, 4))
    load = g.rng.getrandbits(1)
    field_ = {4: 0b00, 1: 0b10, 2: 0b11}[size]
    rt = g.reg(range(15))
    rn = g.reg(range(15))
    cond = _a32_cond(g)
    g.regs.write(rn, g.pick_target(size), sp=True)
    if load:
        enc = cond << 28 | 0x0190_0C9F | field_ << 21 | rn << 16 | rt << 12
    else:
        enc = cond << 28 | 0x0180_FC90 | field_ << 21 | rn << 16 | rt
    name = ("LDA" if load else "STL") + {1: "B", 2: "H", 4: ""}[size]
    return _Draw("acquire/release", name, enc, size, not load, rt, rn, False, acquire_release=True, cond=cond)


_A32_CLASSES: list[tuple[float, Callable[[_Gen], _Draw], bool]] = [
    (4, lambda g: _a32_word_byte(g, False), False),
    (4, lambda g: _a32_word_byte(g, True), False),
    (3, lambda g: _a32_extra(g, False), False),
    (3, lambda g: _a32_extra(g, True), False),
    (1, _a32_ordered, True),
]


# --------------------------------------------------------------------------------------------- T32

_T16_REGISTER_OPS = (("STR", 4, 1, 0), ("STRH", 2, 1, 0), ("STRB", 1, 1, 0), ("LDRSB", 1, 0, 1),
                     ("LDR", 4, 0, 0), ("LDRH", 2, 0, 0), ("LDRB", 1, 0, 0), ("LDRSH", 2, 0, 1))


def _t16_register(g: _Gen) -> _Draw:
    opb = g.rng.randrange(8)
    name, size, store, signed = _T16_REGISTER_OPS[opb]
    rt, rn = g.reg(range(8)), g.reg(range(8))
    rm = g.reg(range(8))
    target = g.pick_target(size, even=True)
    if rm != rn:
        g.regs.write(rn, target - g.regs.read(rm, sp=False), sp=True)
    else:
        value = solve_self_offset(target, 0, False, 32, g.rng)
        assert value is not None
        g.regs.write(rn, value, sp=True)
    enc = 0x5000 | opb << 9 | rm << 6 | rn << 3 | rt
    return _Draw("T16 register offset", name, enc, size, bool(store), rt, rn, bool(signed), rm=rm,
                 detail="rm=rn" if rm == rn else "")


def _t16_imm5(g: _Gen) -> _Draw:
    name, size, store = g.rng.choice([("STR", 4, 1), ("LDR", 4, 0), ("STRB", 1, 1), ("LDRB", 1, 0),
                                      ("STRH", 2, 1), ("LDRH", 2, 0)])
    rt, rn = g.reg(range(8)), g.reg(range(8))
    imm5 = g.rng.randrange(32)
    g.regs.write(rn, g.pick_target(size) - imm5 * size, sp=True)
    if size == 2:
        enc = 0x8000 | (1 - store) << 11 | imm5 << 6 | rn << 3 | rt
    else:
        enc = 0x6000 | int(size == 1) << 12 | (1 - store) << 11 | imm5 << 6 | rn << 3 | rt
    return _Draw("T16 imm5", name, enc, size, bool(store), rt, rn, False, detail=f"#{imm5 * size}")


def _t16_sp(g: _Gen) -> _Draw:
    store = g.rng.getrandbits(1)
    rt = g.reg(range(8))
    imm8 = g.rng.randrange(256)
    g.regs.write(13, g.pick_target(4) - imm8 * 4, sp=True)
    enc = 0x9000 | (1 - store) << 11 | rt << 8 | imm8
    return _Draw("T16 SP-relative", "STR" if store else "LDR", enc, 4, bool(store), rt, 13, False,
                 detail=f"#{imm8 * 4}")


# (S, size field, L): name, bytes, signed
_T32_OPS = [((0, 0, 0), "STRB", 1, False), ((0, 1, 0), "STRH", 2, False), ((0, 2, 0), "STR", 4, False),
            ((0, 0, 1), "LDRB", 1, False), ((0, 1, 1), "LDRH", 2, False), ((0, 2, 1), "LDR", 4, False),
            ((1, 0, 1), "LDRSB", 1, True), ((1, 1, 1), "LDRSH", 2, True)]


def _t32_rt(g: _Gen, size: int, unprivileged: bool, exclude: tuple[int, ...] = ()) -> int:
    """Rt of a 32-bit Thumb load/store: never PC; SP only for word LDR/STR (ARM ARM: UNPREDICTABLE otherwise)."""
    sp_ok = size == 4 and not unprivileged
    return g.reg(range(15), exclude=exclude + (() if sp_ok else (13,)))


def _t32_single(g: _Gen, form: str) -> _Draw:
    """form: imm12, negative, unprivileged, pre-index, post-index, register."""
    (s, sz, load), name, size, signed = g.rng.choice(_T32_OPS)
    hw1 = 0xF800 | s << 8 | sz << 5 | load << 4
    wb = form in ("pre-index", "post-index")
    rn = g.reg(range(15))
    rt = _t32_rt(g, size, form == "unprivileged", exclude=(rn,) if wb else ())
    rm: int | None = None
    detail = ""
    if form == "imm12":
        imm12 = g.imm(12)
        g.regs.write(rn, g.pick_target(size) - imm12, sp=True)
        hw1 |= 1 << 7
        hw2 = rt << 12 | imm12
        detail = f"#{imm12}"
    elif form == "register":
        imm2 = g.rng.randrange(4)
        for _ in range(40):
            rm = g.reg(range(15), exclude=(13,))
            target = g.pick_target(size, even=True)
            if rm != rn:
                g.regs.write(rn, target - (g.regs.read(rm, sp=False) << imm2), sp=True)
                break
            value = solve_self_offset(target, imm2, False, 32, g.rng)
            if value is not None:
                g.regs.write(rn, value, sp=True)
                break
        else:
            raise AssertionError("no T32 register-offset operands found")
        assert rm is not None
        hw2 = rt << 12 | imm2 << 4 | rm
        detail = f"r{rm}, lsl #{imm2}" + (" rm=rn" if rm == rn else "")
    else:
        imm8 = g.imm(8)
        p, u, w = {"negative": (1, 0, 0), "unprivileged": (1, 1, 0)}.get(form, (int(form == "pre-index"),
                                                                             g.rng.getrandbits(1), 1))
        offset = imm8 if u else -imm8
        target = g.pick_target(size)
        g.regs.write(rn, target if form == "post-index" else target - offset, sp=True)
        hw2 = rt << 12 | 1 << 11 | p << 10 | u << 9 | w << 8 | imm8
        detail = f"#{offset}"
        if form == "unprivileged":
            name += "T"
    klass = {"imm12": "T32 imm12", "register": "T32 register offset", "negative": "T32 negative imm8",
             "unprivileged": "T32 unprivileged", "pre-index": "T32 imm8 pre-index",
             "post-index": "T32 imm8 post-index"}[form]
    return _Draw(klass, name, (hw1 | rn) << 16 | hw2, size, not load, rt, rn, signed, rm=rm,
                 writeback={"pre-index": "pre", "post-index": "post"}.get(form, ""), detail=detail)


def _t32_ordered(g: _Gen) -> _Draw:
    """LDA/LDAB/LDAH/STL/STLB/STLH in T32 (max CPU); SP as Rt is UNPREDICTABLE."""
    size = g.rng.choice((1, 2, 4))
    load = g.rng.getrandbits(1)
    rn = g.reg(range(15))
    rt = g.reg(range(15), exclude=(13,))
    g.regs.write(rn, g.pick_target(size), sp=True)
    sz = {1: 0, 2: 1, 4: 2}[size]
    enc = (0xE8C0 | load << 4 | rn) << 16 | rt << 12 | 0xF00 | (0b1000 | sz) << 4 | 0xF
    name = ("LDA" if load else "STL") + {1: "B", 2: "H", 4: ""}[size]
    return _Draw("T32 acquire/release", name, enc, size, not load, rt, rn, False, acquire_release=True)


_T32_CLASSES: list[tuple[float, Callable[[_Gen], _Draw], bool]] = [
    (2, _t16_register, False),
    (2, _t16_imm5, False),
    (1, _t16_sp, False),
    (2, lambda g: _t32_single(g, "imm12"), False),
    (1.5, lambda g: _t32_single(g, "negative"), False),
    (1, lambda g: _t32_single(g, "unprivileged"), False),
    (2, lambda g: _t32_single(g, "pre-index"), False),
    (2, lambda g: _t32_single(g, "post-index"), False),
    (2, lambda g: _t32_single(g, "register"), False),
    (1, _t32_ordered, True),
]


def _wrap_in_it_block(g: _Gen, draw: _Draw) -> tuple[tuple[int, ...], int, str, int]:
    """Maybe put the access in an IT block with 16-bit ADD fillers and sometimes a second device access.

    The second access is a 16-bit LDR/STR Rx, [Ry] at the slot's start, with registers the first access and the
    fillers do not touch. Returns (halfwords, condition of the access, detail, second accesses that execute).
    """
    access = (draw.encoding,) if draw.encoding <= 0xFFFF else (draw.encoding >> 16, draw.encoding & 0xFFFF)
    if g.rng.random() >= 0.3:
        return access, AL, "", 0
    length = g.rng.randrange(1, 5)
    position = g.rng.randrange(length)
    firstcond = g.rng.randrange(14)
    then = [bool(g.rng.getrandbits(1)) for _ in range(length - 1)]
    conds = [firstcond] + [firstcond if t else firstcond ^ 1 for t in then]
    used = {draw.rt, draw.rn, g.reserved} | ({draw.rm} if draw.rm is not None else set())
    free = [r for r in range(8) if r not in used]
    second = -1
    if length > 1 and g.rng.random() < 0.3:
        second = g.rng.choice([i for i in range(length) if i != position])
        rx, ry = g.rng.sample(free, 2)
        free = [r for r in free if r not in (rx, ry)]
        g.regs.write(ry, g.slot_address, sp=True)
        load = g.rng.getrandbits(1)
        second_access: Halfwords = (0x6000 | load << 11 | ry << 3 | rx,)
    code: list[int] = [*T32.it(firstcond, it_mask(firstcond, then))]
    for i in range(length):
        if i == position:
            code += access
        elif i == second:
            code += second_access
        else:
            filler: Halfwords = T32.add_imm3(g.rng.choice(free), g.reg(range(8)), g.rng.randrange(8))
            code += filler
    pattern = "".join("t" if t else "e" for t in then)
    detail = f"it{pattern} {COND_NAMES[firstcond]} at {position + 1}/{length}"
    extra = 0
    if second >= 0:
        detail += f", second access {'ldr' if load else 'str'} at {second + 1}/{length}"
        extra = int(condition_passed(conds[second], g.flags >> 28))
    return tuple(code), conds[position], detail, extra


# --------------------------------------------------------------------------------------------- batches

_CLASSES = {Isa.A64: _A64_CLASSES, Isa.A32: _A32_CLASSES, Isa.T32: _T32_CLASSES}


def _instance(rng: random.Random, isa: Isa, index: int, reserved: int, slot_address: int, max_cpu: bool) -> Instance:
    g = _Gen(rng, isa, reserved, slot_address, max_cpu)
    table = [(w, fn) for w, fn, needs_max in _CLASSES[isa] if max_cpu or not needs_max]
    if isa is Isa.T32 and reserved == 13:
        table = [(w, fn) for w, fn in table if fn is not _t16_sp]
    draw = rng.choices([fn for _, fn in table], weights=[w for w, _ in table])[0](g)
    if isa is Isa.T32:
        code, cond, detail, extra = _wrap_in_it_block(g, draw)
        draw.detail = " ".join(x for x in (draw.detail, detail) if x)
    else:
        code, cond, extra = (draw.encoding,), draw.cond, 0
        if cond != AL:
            draw.detail = " ".join(x for x in (draw.detail, f"cond {COND_NAMES[cond]}") if x)
    nzcv = g.flags >> 28
    return Instance(
        index=index, isa=isa, klass=draw.klass, op=draw.op, detail=draw.detail, encoding=draw.encoding,
        code=code, regs=tuple(g.regs.values), sp=g.regs.sp, flags=g.flags, address=g.target, size=draw.size,
        is_store=draw.is_store, executes=condition_passed(cond, nzcv), extra_accesses=extra, rt=draw.rt,
        rn=draw.rn, rm=draw.rm,
        signed=draw.signed, x_reg=draw.x_reg, acquire_release=draw.acquire_release, writeback=draw.writeback,
        slot=rng.randbytes(SLOT),
    )


def batch_seed(seed: int, isa: Isa, number: int) -> str:
    """The string a batch's generator is seeded with: any batch can be regenerated on its own."""
    return f"{seed}:{isa.value}:{number}"


def reserved_register(isa: Isa, seed: int, number: int) -> int:
    """The harness pointer register of batch `number`: rotates through every general register."""
    return (seed + number) % GPR_COUNT[isa]


def batch_configuration(number: int) -> tuple[bool, bool, bool, bool]:
    """(big-endian, max CPU, unprivileged, posted writes) of batch `number`: 16 batches go through every mix."""
    return bool(number & 1), bool(number & 2), bool(number & 4), bool(number & 8)


def generate_batch(isa: Isa, seed: int, number: int, count: int, window_base: int | None = None) -> Batch:
    """Batch `number` of a campaign: `count` instances; the window is placed at random unless given."""
    if not 1 <= count <= 1024:
        raise ValueError(f"a batch holds 1..1024 instances, not {count}")
    rng = random.Random(batch_seed(seed, isa, number))
    big_endian, max_cpu, unprivileged, posted = batch_configuration(number)
    reserved = reserved_register(isa, seed, number)
    window_size = -(-SLOT * count // 0x1000) * 0x1000
    if window_base is None:
        # Below the harness RAM at 0x40000000, or (A64) anywhere up to 2**40.
        high = isa is Isa.A64 and rng.random() < 0.5
        window_base = rng.randrange(0x1_0000_0000 if high else 0x100_0000,
                                    (1 << 40) if high else 0x3000_0000, 0x1000)
    instances = tuple(
        _instance(rng, isa, i, reserved, window_base + SLOT * i, max_cpu) for i in range(count)
    )
    padding = rng.randbytes(window_size - SLOT * count)
    return Batch(
        isa=isa, seed=batch_seed(seed, isa, number), number=number, cpu_model=CPU_MODELS[isa][int(max_cpu)],
        big_endian=big_endian, unprivileged=unprivileged, posted=posted, reserved=reserved,
        window_base=window_base, window_size=window_size, instances=instances,
        window=b"".join(i.slot for i in instances) + padding,
    )


