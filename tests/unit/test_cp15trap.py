"""The AArch32 timer trap: which words are timer accesses, where they are found, and the trap on real Unicorn."""

from __future__ import annotations

import struct

import pytest
from unicorn import UC_ARCH_ARM, UC_MODE_ARM, Uc
from unicorn import arm_const as a32

from vcpu_service.arch import arch_by_name
from vcpu_service.cp15trap import TimerAccess, TimerTrap, decode, find_sites
from vcpu_service.gentimer import REGISTERS

# A32 encodings (cond AL).
MCR_CNTV_CTL_R1 = 0xEE0E1F33  # mcr p15, 0, r1, c14, c3, 1
MRC_CNTV_CTL_R2 = 0xEE1E2F33  # mrc p15, 0, r2, c14, c3, 1
MRRC_CNTVCT_R4_R5 = 0xEC554F1E  # mrrc p15, 1, r4, r5, c14
MCRR_CNTV_CVAL_R6_R7 = 0xEC476F3E  # mcrr p15, 3, r6, r7, c14
MRC_MIDR = 0xEE100F10  # mrc p15, 0, r0, c0, c0, 0: not the timer
MOV_R1_5 = 0xE3A01005
B_SELF = 0xEAFFFFFE


def test_decode_names_the_timer_registers_and_nothing_else() -> None:
    assert decode(MCR_CNTV_CTL_R1, False) == TimerAccess("CNTV_CTL_EL0", False, 1, None)
    assert decode(MRC_CNTV_CTL_R2, False) == TimerAccess("CNTV_CTL_EL0", True, 2, None)
    assert decode(MRRC_CNTVCT_R4_R5, False) == TimerAccess("CNTVCT_EL0", True, 4, 5)
    assert decode(MCRR_CNTV_CVAL_R6_R7, False) == TimerAccess("CNTV_CVAL_EL0", False, 6, 7)
    assert decode(MRC_MIDR, False) is None
    assert decode(MOV_R1_5, False) is None
    assert decode(0xFE0E1F33, False) is None  # MCR2: unconditional space, not CP15's MCR
    assert decode(0xEE0EFF33, False) is None  # Rt = PC is UNPREDICTABLE: left to Unicorn


def test_every_cp15_register_of_the_model_decodes() -> None:
    for name, info in REGISTERS.items():
        assert info.aa32 is not None
        if info.aa32_64bit:
            opc1, crm = info.aa32
            word = 0xEC500F00 | 2 << 16 | 1 << 12 | opc1 << 4 | crm  # mrrc p15, opc1, r1, r2, crm
        else:
            opc1, crn, crm, opc2 = info.aa32
            word = 0xEE100F10 | opc1 << 21 | crn << 16 | 3 << 12 | opc2 << 5 | crm  # mrc p15, ..., r3, ...
        access = decode(word, False)
        assert access is not None and access.name == name and access.is_read


def test_thumb_encodings_decode_from_their_two_halfwords() -> None:
    # T32 MRC/MCR use the same fields as A32 with 1110 in the condition's place.
    assert decode(MCR_CNTV_CTL_R1, True) == TimerAccess("CNTV_CTL_EL0", False, 1, None)
    assert decode(0xDE0E1F33, True) is None


def _words(*words: int) -> bytes:
    return b"".join(struct.pack("<I", w) for w in words)


def test_find_sites_at_arm_and_thumb_alignment() -> None:
    data = _words(MOV_R1_5, MCR_CNTV_CTL_R1, MRC_MIDR, MRRC_CNTVCT_R4_R5)
    sites = find_sites(data, 0x1000)
    # The ARM instructions, and halfword offsets that would read as T32 ones (decoded again when they run).
    assert {0x1004, 0x100C} <= set(sites)
    assert all(s % 4 == 2 for s in set(sites) - {0x1004, 0x100C})
    thumb = b"\x00\xbf" + struct.pack("<HH", MCR_CNTV_CTL_R1 >> 16, MCR_CNTV_CTL_R1 & 0xFFFF)  # nop; mcr
    assert find_sites(thumb, 0x2000) == [0x2002]
    assert find_sites(b"", 0) == []
    assert find_sites(bytes(range(256)) * 16, 0) == []


class _Model:
    def __init__(self) -> None:
        self.regs = {"CNTV_CTL_EL0": 0, "CNTV_CVAL_EL0": 0, "CNTVCT_EL0": 0x1_2345_6789}
        self.writes: list[tuple[str, int]] = []

    def read(self, name: str) -> int:
        return self.regs[name] | (4 if name == "CNTV_CTL_EL0" and self.regs[name] & 1 else 0)

    def write(self, name: str, value: int) -> None:
        self.writes.append((name, value))
        self.regs[name] = value


def _run(code: bytes, thumb: bool = False) -> tuple[Uc, _Model, TimerTrap]:
    uc = Uc(UC_ARCH_ARM, UC_MODE_ARM)
    uc.mem_map(0x10000, 0x4000)
    uc.mem_write(0x10000, code)
    model = _Model()
    readable = set(REGISTERS) - {"CNTVOFF_EL2"}
    writable = {n for n, i in REGISTERS.items() if i.writable} - {"CNTVOFF_EL2"}
    trap = TimerTrap(uc, arch_by_name("arm"), model.read, model.write, readable, writable)
    uc.reg_write(a32.UC_ARM_REG_R6, 0x89ABCDEF)
    uc.reg_write(a32.UC_ARM_REG_R7, 0x1)
    end = 0x10000 + len(code) - (2 if thumb else 4)
    pc = 0x10000 | int(thumb)
    for _ in range(100):
        uc.emu_start(pc, end)
        pc = uc.reg_read(a32.UC_ARM_REG_PC)
        if not trap.instrument_pending():
            break
        pc |= int(thumb)
    assert uc.reg_read(a32.UC_ARM_REG_PC) == end
    return uc, model, trap


def test_the_trap_answers_a32_timer_accesses_before_they_first_run() -> None:
    code = _words(MOV_R1_5, MCR_CNTV_CTL_R1, MRC_CNTV_CTL_R2, MRRC_CNTVCT_R4_R5, MCRR_CNTV_CVAL_R6_R7, B_SELF)
    uc, model, trap = _run(code)
    assert model.writes == [("CNTV_CTL_EL0", 5), ("CNTV_CVAL_EL0", 0x1_89AB_CDEF)]
    assert uc.reg_read(a32.UC_ARM_REG_R2) == 5 | 4
    assert (uc.reg_read(a32.UC_ARM_REG_R4), uc.reg_read(a32.UC_ARM_REG_R5)) == (0x2345_6789, 0x1)
    assert trap.traps == 4
    assert {0x10004, 0x10008, 0x1000C, 0x10010} <= set(trap.sites)


@pytest.mark.parametrize("loops", [3])
def test_a_loop_traps_every_time_it_runs(loops: int) -> None:
    # r3 counts down: mcr; mrc; subs r3, r3, #1; bne back to the mcr
    code = _words(MOV_R1_5, MCR_CNTV_CTL_R1, MRC_CNTV_CTL_R2, 0xE2533001, 0x1AFFFFFB, B_SELF)
    code = _words(0xE3A03000 | loops) + code  # mov r3, #loops
    _uc, model, trap = _run(code)
    assert len(model.writes) == loops
    assert trap.traps == 2 * loops


def test_thumb_code_is_trapped_too() -> None:
    # movs r1, #1 ; mcr p15,0,r1,c14,c3,1 ; mrc p15,0,r2,c14,c3,1 ; b .
    mcr = struct.pack("<HH", MCR_CNTV_CTL_R1 >> 16, MCR_CNTV_CTL_R1 & 0xFFFF)
    mrc = struct.pack("<HH", MRC_CNTV_CTL_R2 >> 16, MRC_CNTV_CTL_R2 & 0xFFFF)
    code = b"\x01\x21" + mcr + mrc + b"\xfe\xe7"
    uc, model, _trap = _run(code, thumb=True)
    assert model.writes == [("CNTV_CTL_EL0", 1)]
    assert uc.reg_read(a32.UC_ARM_REG_R2) == 1 | 4
