"""A second opinion on a decoded load/store: Capstone's disassembly, reduced to what a syndrome says.

``reference(isa, word)`` gives (access size, sign-extends, stores, Rt, Rt is a 64-bit X register) read from
Capstone's mnemonic and first operand, or None when Capstone does not decode the encoding to a single-register
load/store it knows. The decoder target compares a ``Syndrome`` with it.
"""

from __future__ import annotations

from typing import NamedTuple

import capstone

from vcpu_service.decode import Isa


class Reference(NamedTuple):
    size: int
    signed: bool
    store: bool
    rt: int
    x_register: bool
    text: str


_CS = {
    Isa.A64: capstone.Cs(capstone.CS_ARCH_ARM64, capstone.CS_MODE_ARM),
    Isa.A32: capstone.Cs(capstone.CS_ARCH_ARM, capstone.CS_MODE_ARM),
    Isa.T32: capstone.Cs(capstone.CS_ARCH_ARM, capstone.CS_MODE_THUMB),
}
_CONDITIONS = ("eq", "ne", "hs", "cs", "lo", "cc", "mi", "pl", "vs", "vc", "hi", "ls", "ge", "lt", "gt", "le", "al")
# AArch32 mnemonics (without a condition) of single-register loads/stores: (size, signed).
_A32 = {
    **{f"{op}{t}": (4, False) for op in ("ldr", "str") for t in ("", "t")},
    **{f"{op}b{t}": (1, False) for op in ("ldr", "str") for t in ("", "t")},
    **{f"{op}h{t}": (2, False) for op in ("ldr", "str") for t in ("", "t")},
    "ldrsb": (1, True), "ldrsbt": (1, True), "ldrsh": (2, True), "ldrsht": (2, True),
    "lda": (4, False), "ldab": (1, False), "ldah": (2, False), "stl": (4, False), "stlb": (1, False),
    "stlh": (2, False),
}
# A64: what comes before and after the last "r" of the mnemonic (ldr, ldur, ldtr, ldar, ldlar, ldapr, ldapur,
# stlr, stllr, stlur...); not LSE atomics (ldclr...) or exclusives (ldxr...).
_A64_PREFIX = frozenset({"ld", "st", "ldu", "stu", "ldt", "stt", "lda", "stl", "ldla", "stll", "ldap", "ldapu",
                         "stlu"})
_A64_SUFFIX = {"": (0, False), "b": (1, False), "h": (2, False), "sb": (1, True), "sh": (2, True), "sw": (4, True)}
_A32_REGS = {**{f"r{i}": i for i in range(16)}, "sb": 9, "sl": 10, "fp": 11, "ip": 12, "sp": 13, "lr": 14,
             "pc": 15}


def _raw(isa: Isa, word: int) -> bytes:
    if isa is not Isa.T32:
        return word.to_bytes(4, "little")
    if word <= 0xFFFF:
        return word.to_bytes(2, "little")
    return (word >> 16).to_bytes(2, "little") + (word & 0xFFFF).to_bytes(2, "little")


def reference(isa: Isa, word: int) -> Reference | None:
    raw = _raw(isa, word)
    insns = list(_CS[isa].disasm(raw, 0x1000, 1))
    if not insns or insns[0].size != len(raw):
        return None
    insn = insns[0]
    mnemonic = insn.mnemonic.split(".")[0]
    first = insn.op_str.split(",")[0].strip()
    text = f"{insn.mnemonic} {insn.op_str}"
    if isa is Isa.A64:
        prefix, _r, suffix = mnemonic.rpartition("r")
        if prefix not in _A64_PREFIX or suffix not in _A64_SUFFIX or first[:1] not in ("w", "x"):
            return None
        size, signed = _A64_SUFFIX[suffix]
        x_register = first[0] == "x"
        if size == 0:
            size = 8 if x_register else 4
        rt = 31 if first[1:] == "zr" else int(first[1:])
        return Reference(size, signed, mnemonic.startswith("st"), rt, x_register, text)
    if mnemonic not in _A32 and mnemonic[-2:] in _CONDITIONS:
        mnemonic = mnemonic[:-2]
    if mnemonic not in _A32 or first not in _A32_REGS:
        return None
    size, signed = _A32[mnemonic]
    return Reference(size, signed, mnemonic.startswith("st"), _A32_REGS[first], False, text)
