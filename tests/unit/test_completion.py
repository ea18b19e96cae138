"""load_value()/store_data(): the completion arithmetic, from the kvm-mmio.md section 5 table.

Syndromes come from decoding literal encodings, so these tests also pin the decode -> completion
contract. `data` is always in guest-memory byte order (the `kvm_run.mmio.data` rule).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vcpu_service.completion import load_value, store_data
from vcpu_service.decode import Isa, Syndrome, decode


def syn(isa: Isa, insn: int) -> Syndrome:
    got = decode(isa, insn)
    assert isinstance(got, Syndrome), got
    return got


LDR_W1 = syn(Isa.A64, 0xB9400001)  # ldr w1, [x0]
LDR_X1 = syn(Isa.A64, 0xF9400001)  # ldr x1, [x0]
LDR_XZR = syn(Isa.A64, 0xF940001F)  # ldr xzr, [x0]
LDRB_W1 = syn(Isa.A64, 0x39400001)  # ldrb w1, [x0]
LDRH_W1 = syn(Isa.A64, 0x79400001)  # ldrh w1, [x0]
LDRSB_W1 = syn(Isa.A64, 0x39C00001)  # ldrsb w1, [x0]
LDRSB_X1 = syn(Isa.A64, 0x39800001)  # ldrsb x1, [x0]
LDRSH_W1 = syn(Isa.A64, 0x79C00001)  # ldrsh w1, [x0]
LDRSH_X1 = syn(Isa.A64, 0x79800001)  # ldrsh x1, [x0]
LDRSW_X1 = syn(Isa.A64, 0xB9800001)  # ldrsw x1, [x0]
LDAR_W1 = syn(Isa.A64, 0x88DFFFE1)  # ldar w1, [sp]
STR_W1 = syn(Isa.A64, 0xB9000001)  # str w1, [x0]
STR_X1 = syn(Isa.A64, 0xF9000001)  # str x1, [x0]
STR_WZR = syn(Isa.A64, 0xB900001F)  # str wzr, [x0]
STR_XZR = syn(Isa.A64, 0xF900001F)  # str xzr, [x0]
STRB_W1 = syn(Isa.A64, 0x39000001)  # strb w1, [x0]
STRH_W1 = syn(Isa.A64, 0x79000001)  # strh w1, [x0]
A32_LDR = syn(Isa.A32, 0xE5901000)  # ldr r1, [r0]
A32_LDRH = syn(Isa.A32, 0xE1D010B0)  # ldrh r1, [r0]
A32_LDRSB = syn(Isa.A32, 0xE1D010D0)  # ldrsb r1, [r0]
A32_LDRSH = syn(Isa.A32, 0xE1501FFF)  # ldrsh r1, [r0, #-255]
A32_STR = syn(Isa.A32, 0xE58D2004)  # str r2, [sp, #4]
A32_STRH = syn(Isa.A32, 0xE1CDE0B0)  # strh lr, [sp]
T16_LDRSB = syn(Isa.T32, 0x5681)  # ldrsb r1, [r0, r2]
T16_LDR = syn(Isa.T32, 0x6841)  # ldr r1, [r0, #4]


@pytest.mark.parametrize(
    ("case", "syndrome", "data", "big_endian", "expected"),
    [
        # 1: a W target clears the upper half of X1 (SF=0) and is not sign-extended
        ("1 ldr w1", LDR_W1, bytes.fromhex("00000080"), False, 0x0000_0000_8000_0000),
        ("2 ldr x1", LDR_X1, bytes.fromhex("1122334455667788"), False, 0x8877_6655_4433_2211),
        # 3/4: the architecture, not upstream KVM (which masks the sign extension away again)
        ("3 ldrsb w1", LDRSB_W1, b"\x80", False, 0x0000_0000_FFFF_FF80),
        ("4 ldrsb x1", LDRSB_X1, b"\x80", False, 0xFFFF_FFFF_FFFF_FF80),
        ("5 ldrsh w1", LDRSH_W1, bytes.fromhex("0180"), False, 0x0000_0000_FFFF_8001),
        ("5 ldrsh x1", LDRSH_X1, bytes.fromhex("0180"), False, 0xFFFF_FFFF_FFFF_8001),
        ("6 ldrsw x1", LDRSW_X1, bytes.fromhex("00000080"), False, 0xFFFF_FFFF_8000_0000),
        ("7 ldrb top bit", LDRB_W1, b"\x80", False, 0x80),
        ("7 ldrh top bit", LDRH_W1, bytes.fromhex("0180"), False, 0x8001),
        ("7 ldrsb 0x7f", LDRSB_W1, b"\x7f", False, 0x7F),
        ("7 ldrsh 0x7fff", LDRSH_X1, bytes.fromhex("ff7f"), False, 0x7FFF),
        # 9: the device is read (its side effect happens); the caller drops the write to XZR
        ("9 ldr xzr", LDR_XZR, bytes.fromhex("0102030405060708"), False, 0x0807_0605_0403_0201),
        ("ldar w1", LDAR_W1, bytes.fromhex("00000080"), False, 0x8000_0000),
        # 13 and other big-endian guests: bytes arrive in guest-memory order
        ("13 BE ldrsh w1", LDRSH_W1, bytes.fromhex("8001"), True, 0x0000_0000_FFFF_8001),
        ("BE ldr w1", LDR_W1, bytes.fromhex("11223344"), True, 0x1122_3344),
        ("BE ldr x1", LDR_X1, bytes.fromhex("1122334455667788"), True, 0x1122_3344_5566_7788),
        ("BE ldrb w1", LDRB_W1, b"\xa5", True, 0xA5),
        ("BE ldrsw x1", LDRSW_X1, bytes.fromhex("80000001"), True, 0xFFFF_FFFF_8000_0001),
        # 29 and AArch32: 32-bit registers, sign extension stops at bit 31
        ("29 a32 ldrsb r1", A32_LDRSB, b"\x80", False, 0xFFFF_FF80),
        ("29 t16 ldrsb r1", T16_LDRSB, b"\x80", False, 0xFFFF_FF80),
        ("a32 ldrsh r1", A32_LDRSH, bytes.fromhex("0080"), False, 0xFFFF_8000),
        ("a32 ldrh r1", A32_LDRH, bytes.fromhex("ffff"), False, 0xFFFF),
        ("a32 ldr r1", A32_LDR, bytes.fromhex("efbeadde"), False, 0xDEAD_BEEF),
        ("a32 BE8 ldr r1", A32_LDR, bytes.fromhex("deadbeef"), True, 0xDEAD_BEEF),
        ("t16 ldr r1", T16_LDR, bytes.fromhex("78563412"), False, 0x1234_5678),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_load_value(case: str, syndrome: Syndrome, data: bytes, big_endian: bool, expected: int) -> None:
    assert load_value(data, syndrome, big_endian) == expected


@pytest.mark.parametrize(
    ("case", "syndrome", "reg_value", "big_endian", "expected"),
    [
        # 8: Rt=31 is XZR/WZR: the caller reads it as zero (never SP) and passes 0
        ("8 str wzr", STR_WZR, 0, False, bytes(4)),
        ("8 str xzr", STR_XZR, 0, False, bytes(8)),
        # 11/12: the low 4 bytes of X1, in guest byte order
        ("11 str w1 LE", STR_W1, 0x1122_3344_5566_7788, False, bytes.fromhex("88776655")),
        ("12 str w1 BE", STR_W1, 0x1122_3344_5566_7788, True, bytes.fromhex("55667788")),
        ("str x1 LE", STR_X1, 0x1122_3344_5566_7788, False, bytes.fromhex("8877665544332211")),
        ("str x1 BE", STR_X1, 0x1122_3344_5566_7788, True, bytes.fromhex("1122334455667788")),
        ("strb BE is one byte", STRB_W1, 0x1234, True, b"\x34"),
        ("strh LE", STRH_W1, 0xABCD_1234, False, bytes.fromhex("3412")),
        ("strh BE", STRH_W1, 0xABCD_1234, True, bytes.fromhex("1234")),
        ("negative is two's complement", STRB_W1, -1, False, b"\xff"),
        ("a32 str", A32_STR, 0xDEAD_BEEF, False, bytes.fromhex("efbeadde")),
        ("a32 BE8 str", A32_STR, 0xDEAD_BEEF, True, bytes.fromhex("deadbeef")),
        ("a32 strh", A32_STRH, 0xFFFF_8001, False, bytes.fromhex("0180")),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_store_data(case: str, syndrome: Syndrome, reg_value: int, big_endian: bool, expected: bytes) -> None:
    assert store_data(reg_value, syndrome, big_endian) == expected


def test_xzr_is_rt_31_for_the_caller() -> None:
    assert STR_WZR.srt == STR_XZR.srt == LDR_XZR.srt == 31


@pytest.mark.parametrize(("syndrome", "length"), [(LDR_W1, 2), (LDR_W1, 8), (LDRSB_X1, 0), (LDR_X1, 4)])
def test_load_value_rejects_a_wrong_length(syndrome: Syndrome, length: int) -> None:
    with pytest.raises(ValueError, match=rf"expected {syndrome.size} data bytes, got {length}"):
        load_value(bytes(length), syndrome, False)


def test_direction_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="store"):
        load_value(bytes(4), STR_W1, False)
    with pytest.raises(ValueError, match="load"):
        store_data(0, LDR_W1, False)


LOAD_STORE_PAIRS = [
    (STRB_W1, LDRB_W1),
    (STRH_W1, LDRH_W1),
    (STR_W1, LDR_W1),
    (STR_X1, LDR_X1),
    (A32_STR, A32_LDR),
    (A32_STRH, A32_LDRH),
]


@settings(max_examples=200, deadline=None, database=None)
@given(
    pair=st.sampled_from(LOAD_STORE_PAIRS),
    value=st.integers(0, 2**64 - 1),
    big_endian=st.booleans(),
)
def test_a_load_reads_back_what_a_store_wrote(
    pair: tuple[Syndrome, Syndrome], value: int, big_endian: bool
) -> None:
    stored, loaded = pair
    data = store_data(value, stored, big_endian)
    assert len(data) == stored.size
    assert load_value(data, loaded, big_endian) == value & ((1 << (8 * stored.size)) - 1)


@settings(max_examples=200, deadline=None, database=None)
@given(
    loaded=st.sampled_from([LDRSB_W1, LDRSB_X1, LDRSH_W1, LDRSH_X1, LDRSW_X1, A32_LDRSB, A32_LDRSH]),
    raw=st.integers(0, 2**32 - 1),
    big_endian=st.booleans(),
)
def test_sign_extension_fills_the_register_width(loaded: Syndrome, raw: int, big_endian: bool) -> None:
    bits = 8 * loaded.size
    raw &= (1 << bits) - 1
    data = raw.to_bytes(loaded.size, "big" if big_endian else "little")
    signed = raw - (1 << bits) if raw >> (bits - 1) else raw
    register_bits = 64 if loaded.sf else 32
    assert load_value(data, loaded, big_endian) == signed & ((1 << register_bits) - 1)
