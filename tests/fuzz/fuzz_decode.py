"""Target ``decode``: the instruction decoder over random encodings of every ISA.

Every encoding decodes to a ``Syndrome`` or a ``Refused`` (``decode`` promises never to raise), and a ``Syndrome``
is one the exit path can use: a bus size, registers in range for the ISA, the instruction length of the encoding,
ISV=0 only with a writeback or cache maintenance, a writeback naming the base register and never a load into its own
base, and an ISS/ESR that re-encodes the fields (decoded back here bit by bit). ``exits.decode_cached`` agrees with
``decode`` and gives an ESR exactly when there is an access to forward. Every forwarded access agrees with
Capstone's disassembly (``tests/fuzz/reference.py``) on its size, sign extension, direction, Rt and (A64) register
width. The A32 helpers (``decode_imm_shift``, ``a32_shift``, ``Writeback.amount``, ``condition_passed``) are run on
the decoded fields with random register values.
"""

from __future__ import annotations

import atheris

from tests.fuzz.common import check
from tests.fuzz.reference import reference
from vcpu_service.arch import EC_DABT_LOW
from vcpu_service.decode import (
    Isa,
    Refused,
    ShiftType,
    Syndrome,
    a32_shift,
    condition_passed,
    decode,
    decode_imm_shift,
    thumb_insn_len,
)
from vcpu_service.exits import DFSC_TRANSLATION_L3, decode_cached

_ISAS = (Isa.A64, Isa.A32, Isa.T32)
_MASK32 = 0xFFFF_FFFF


def _t32_word(fdp: atheris.FuzzedDataProvider) -> int:
    """A T32 encoding: a 16-bit one, or two halfwords with a 32-bit first one (the shapes the exit path makes)."""
    if fdp.ConsumeBool():
        return fdp.ConsumeIntInRange(0, 0xFFFF)
    hw1 = fdp.ConsumeIntInRange(0, 0xFFFF)
    hw1 = (hw1 & 0x07FF) | (fdp.PickValueInList([0b11101, 0b11110, 0b11111]) << 11)
    return (hw1 << 16) | fdp.ConsumeIntInRange(0, 0xFFFF)


def _word(fdp: atheris.FuzzedDataProvider, isa: Isa) -> int:
    shape = fdp.ConsumeIntInRange(0, 15)
    if shape == 15:  # not a 32-bit value: a defined refusal
        return fdp.PickValueInList([-1, -(1 << 40), 1 << 32, (1 << 64) - 1, 1 << 100])
    if shape == 14:  # any 32-bit value, whatever the ISA
        return fdp.ConsumeIntInRange(0, _MASK32)
    if isa is Isa.T32:
        return _t32_word(fdp)
    return fdp.ConsumeIntInRange(0, _MASK32)


def _check_syndrome(isa: Isa, word: int, syn: Syndrome) -> None:
    what = f"{isa.value} {word:#010x} -> {syn}"
    check(syn.size in (1, 2, 4, 8) and syn.size == 1 << syn.sas, f"{what}: size {syn.size}")
    aarch32 = isa is not Isa.A64
    limit = 16 if aarch32 else 32
    check(0 <= syn.srt < limit and 0 <= syn.rn < limit, f"{what}: register out of range")
    if aarch32:
        check(not syn.sf and syn.sas <= 2, f"{what}: AArch32 with SF or a 64-bit access")
    if syn.sse:
        check(not syn.wnr and syn.sas < 3, f"{what}: sign extension on a store or a 64-bit load")
    if not aarch32 and syn.sas == 3 and not syn.cm:
        check(syn.sf, f"{what}: 64-bit access to a W register")
    expected_len = 2 if isa is Isa.T32 and word <= 0xFFFF else 4
    check(syn.insn_len == expected_len, f"{what}: insn_len {syn.insn_len}, expected {expected_len}")
    if syn.cm:
        check(not syn.isv and syn.wnr and syn.writeback is None, f"{what}: cache maintenance with an access")
    elif syn.isv:
        check(syn.writeback is None, f"{what}: ISV=1 with a writeback")
    else:
        check(syn.writeback is not None, f"{what}: ISV=0 without a writeback or cache maintenance")
    wb = syn.writeback
    if wb is not None:
        check(wb.rn == syn.rn, f"{what}: writeback base {wb.rn} is not Rn {syn.rn}")
        if not syn.wnr:
            check(syn.srt != syn.rn or (not aarch32 and syn.rn == 31), f"{what}: load with writeback into its base")
        if wb.offset_reg is None:
            bound = 256 if isa is Isa.A64 else 4096
            check(-bound <= wb.offset < bound, f"{what}: writeback offset {wb.offset}")
        else:
            check(aarch32 and 0 <= wb.offset_reg < 15, f"{what}: offset register {wb.offset_reg}")
            check(0 <= wb.shift_amount <= 32, f"{what}: shift amount {wb.shift_amount}")
    # ISS and ESR decoded back field by field.
    iss = syn.iss()
    check(iss >> 25 == 0, f"{what}: ISS {iss:#x} wider than 25 bits")
    check((iss >> 6) & 1 == int(syn.wnr) and (iss >> 8) & 1 == int(syn.cm), f"{what}: ISS WnR/CM {iss:#x}")
    check((iss >> 24) & 1 == int(syn.isv), f"{what}: ISS ISV {iss:#x}")
    if syn.isv:
        fields = ((iss >> 22) & 3, bool((iss >> 21) & 1), (iss >> 16) & 31, bool((iss >> 15) & 1),
                  bool((iss >> 14) & 1))
        check(fields == (syn.sas, syn.sse, syn.srt, syn.sf, syn.ar), f"{what}: ISS {iss:#x} decodes to {fields}")
    else:
        check(iss & 0x00FF_C000 == 0, f"{what}: ISV=0 with bits 23:14 set in {iss:#x}")
    esr = syn.esr(EC_DABT_LOW, DFSC_TRANSLATION_L3)
    check(esr >> 26 == EC_DABT_LOW and esr & 0x3F == DFSC_TRANSLATION_L3, f"{what}: ESR {esr:#x}")
    check((esr >> 25) & 1 == int(syn.il or not syn.isv) and esr & 0x1FF_FFC0 == iss & 0x1FF_FFC0,
          f"{what}: ESR {esr:#x} / ISS {iss:#x}")


def _check_against_capstone(isa: Isa, word: int, syn: Syndrome) -> None:
    """A forwarded access agrees with Capstone's disassembly on size, sign, direction, Rt and register width.
    Capstone gives no opinion on some encodings the ARM ARM allows (LDTR with Rt == Rn): those are skipped."""
    ref = reference(isa, word)
    if ref is None or syn.cm:
        return
    got = (syn.size, syn.sse, syn.wnr, syn.srt)
    want = (ref.size, ref.signed, ref.store, ref.rt)
    check(got == want, f"{isa.value} {word:#x}: decoded (size, sse, wnr, srt) {got}, Capstone says {want}: {ref.text}")
    if isa is Isa.A64:
        check(syn.sf == ref.x_register, f"A64 {word:#x}: SF {syn.sf}, Capstone says {ref.text}")


def _check_helpers(fdp: atheris.FuzzedDataProvider, isa: Isa, word: int, syn: Syndrome | None) -> None:
    value = fdp.ConsumeIntInRange(0, _MASK32)
    carry = fdp.ConsumeBool()
    kind, amount = decode_imm_shift(fdp.ConsumeIntInRange(0, 3), fdp.ConsumeIntInRange(0, 31))
    shifted = a32_shift(value, kind, amount, carry)
    check(0 <= shifted <= _MASK32, f"a32_shift({value:#x}, {kind}, {amount}) = {shifted:#x}")
    if kind is ShiftType.LSL:
        check(shifted == (value << amount) & _MASK32, f"LSL #{amount} of {value:#x} gave {shifted:#x}")
    cond = fdp.ConsumeIntInRange(0, 15)
    nzcv = fdp.ConsumeIntInRange(0, 15)
    passed = condition_passed(cond, nzcv)
    check(isinstance(passed, bool), f"condition_passed({cond}, {nzcv}) = {passed!r}")
    if cond in (0xE, 0xF):
        check(passed, f"condition {cond:#x} failed")
    elif cond & 1 == 0:
        check(passed != condition_passed(cond | 1, nzcv), f"condition {cond:#x} and its inverse agree")
    if syn is not None and syn.writeback is not None:
        moved = syn.writeback.amount(value, carry)
        check(-(1 << 33) < moved < 1 << 33, f"{isa.value} {word:#x}: writeback amount {moved}")


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    isa = fdp.PickValueInList(list(_ISAS))
    word = _word(fdp, isa)
    decoded = decode(isa, word)
    check(isinstance(decoded, Syndrome | Refused), f"decode({isa}, {word:#x}) returned {decoded!r}")
    check(decode(isa, word) == decoded, f"decode({isa}, {word:#x}) is not deterministic")
    syn: Syndrome | None = None
    if isinstance(decoded, Refused):
        check(bool(decoded.reason) and isinstance(decoded.reason, str), f"{word:#x}: refusal without a reason")
        check(decoded.insn_len in (2, 4), f"{word:#x}: refusal with insn_len {decoded.insn_len}")
        if isa is not Isa.T32:
            check(decoded.insn_len == 4, f"{isa.value} {word:#x}: refusal with insn_len {decoded.insn_len}")
    else:
        syn = decoded
        _check_syndrome(isa, word, syn)
        _check_against_capstone(isa, word, syn)
    if 0 <= word <= _MASK32:
        cached, esr = decode_cached(isa, word)
        check(cached == decoded, f"decode_cached({isa}, {word:#x}) = {cached}, decode gave {decoded}")
        forwards = isinstance(decoded, Syndrome) and not decoded.cm
        check((esr != -1) == forwards, f"decode_cached({isa}, {word:#x}): ESR {esr} for {decoded}")
        if forwards:
            assert isinstance(decoded, Syndrome)
            check(esr == decoded.esr(EC_DABT_LOW, DFSC_TRANSLATION_L3), f"{word:#x}: cached ESR {esr:#x}")
        if isa is Isa.T32 and word <= 0xFFFF and thumb_insn_len(word) == 2:
            check(decoded.insn_len == 2, f"T16 {word:#06x}: insn_len {decoded.insn_len}")
    _check_helpers(fdp, isa, word, syn)
