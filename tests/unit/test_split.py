"""split.decode_split: the plan of each ISV=0 class the exit path emulates, and the classes it leaves refused.

The end-to-end behaviour (the accesses a device sees, the registers after) is in tests/exitpath/test_kvm_nisv.py;
these check the pure decoder: registers, sizes, addressing and writeback, per encoding (cross-checked with
llvm-mc), and that no instruction with a syndrome is ever planned here (the single-access path owns those).
"""

from __future__ import annotations

import random

import pytest

from tests.unit.test_decode import REFUSED_ROWS, SYNDROME_ROWS
from vcpu_service.decode import Isa, Syndrome, decode
from vcpu_service.split import Transfer, decode_split, offset_amount

# (isa, encoding, disassembly, kind, name, registers, register size, first address relative to the base (with
#  offset register value 0x10), base change by the writeback or None, is_write)
PLANS = [
    (Isa.A64, 0xA9400801, "ldp x1, x2, [x0]", "pair", "LDP", (1, 2), 8, 0, None, False),
    (Isa.A64, 0x29410801, "ldp w1, w2, [x0, #8]", "pair", "LDP", (1, 2), 4, 8, None, False),
    (Isa.A64, 0xA9C10801, "ldp x1, x2, [x0, #16]!", "pair", "LDP", (1, 2), 8, 16, 16, False),
    (Isa.A64, 0xA8C10801, "ldp x1, x2, [x0], #16", "pair", "LDP", (1, 2), 8, 0, 16, False),
    (Isa.A64, 0xA9BF7BFD, "stp x29, x30, [sp, #-16]!", "pair", "STP", (29, 30), 8, -16, -16, True),
    (Isa.A64, 0x69400801, "ldpsw x1, x2, [x0]", "pair", "LDPSW", (1, 2), 4, 0, None, False),
    (Isa.A64, 0xA8000801, "stnp x1, x2, [x0]", "pair", "STNP", (1, 2), 8, 0, None, True),
    (Isa.A64, 0xAD400801, "ldp q1, q2, [x0]", "SIMD", "LDP", (1, 2), 16, 0, None, False),
    (Isa.A64, 0x3DC00000, "ldr q0, [x0]", "SIMD", "LDR Q", (0,), 16, 0, None, False),
    (Isa.A64, 0xFD400401, "ldr d1, [x0, #8]", "SIMD", "LDR D", (1,), 8, 8, None, False),
    (Isa.A64, 0xBC637801, "ldr s1, [x0, x3, lsl #2]", "SIMD", "LDR S", (1,), 4, 0x40, None, False),
    (Isa.A64, 0x3C401401, "ldr b1, [x0], #1", "SIMD", "LDR B", (1,), 1, 0, 1, False),
    (Isa.A64, 0x7C402C01, "ldr h1, [x0, #2]!", "SIMD", "LDR H", (1,), 2, 2, 2, False),
    (Isa.A64, 0x3CC10001, "ldur q1, [x0, #16]", "SIMD", "LDUR Q", (1,), 16, 16, None, False),
    (Isa.A64, 0xC85F7C01, "ldxr x1, [x0]", "exclusive", "LDXR", (1,), 8, 0, None, False),
    (Isa.A64, 0xC8037C01, "stxr w3, x1, [x0]", "exclusive", "STXR", (1,), 8, 0, None, True),
    (Isa.A64, 0x085F7C01, "ldxrb w1, [x0]", "exclusive", "LDXRB", (1,), 1, 0, None, False),
    (Isa.A64, 0xC87F0801, "ldxp x1, x2, [x0]", "exclusive", "LDXP", (1, 2), 8, 0, None, False),
    (Isa.A32, 0xE8900006, "ldm r0, {r1, r2}", "multiple", "LDMIA", (1, 2), 4, 0, None, False),
    (Isa.A32, 0xE9900006, "ldmib r0, {r1, r2}", "multiple", "LDMIB", (1, 2), 4, 4, None, False),
    (Isa.A32, 0xE8300006, "ldmda r0!, {r1, r2}", "multiple", "LDMDA", (1, 2), 4, -4, -8, False),
    (Isa.A32, 0xE920000E, "stmdb r0!, {r1, r2, r3}", "multiple", "STMDB", (1, 2, 3), 4, -12, -12, True),
    (Isa.A32, 0xE92D400E, "push {r1, r2, r3, lr}", "multiple", "PUSH", (1, 2, 3, 14), 4, -16, -16, True),
    (Isa.A32, 0xE8BD8010, "pop {r4, pc}", "multiple", "POP", (4, 15), 4, 0, 8, False),
    (Isa.A32, 0xE1E020D8, "ldrd r2, r3, [r0, #8]!", "dual", "LDRD", (2, 3), 4, 8, 8, False),
    (Isa.A32, 0xE04020D8, "ldrd r2, r3, [r0], #-8", "dual", "LDRD", (2, 3), 4, 0, -8, False),
    (Isa.A32, 0xE18020D1, "ldrd r2, r3, [r0, r1]", "dual", "LDRD", (2, 3), 4, 0x10, None, False),
    (Isa.A32, 0xE1C020F0, "strd r2, r3, [r0]", "dual", "STRD", (2, 3), 4, 0, None, True),
    (Isa.A32, 0xE1803F91, "strex r3, r1, [r0]", "exclusive", "STREX", (1,), 4, 0, None, True),
    (Isa.A32, 0xE1B02F9F, "ldrexd r2, r3, [r0]", "exclusive", "LDREXD", (2, 3), 4, 0, None, False),
    (Isa.T32, 0xB50E, "push {r1, r2, r3, lr}", "multiple", "PUSH", (1, 2, 3, 14), 4, -16, -16, True),
    (Isa.T32, 0xBD10, "pop {r4, pc}", "multiple", "POP", (4, 15), 4, 0, 8, False),
    (Isa.T32, 0xC80E, "ldmia r0!, {r1, r2, r3}", "multiple", "LDMIA", (1, 2, 3), 4, 0, 12, False),
    (Isa.T32, 0xC90E, "ldmia r1, {r1, r2, r3}  (Rn in the list: no writeback)", "multiple", "LDMIA", (1, 2, 3), 4,
     0, None, False),
    (Isa.T32, 0xE9100006, "ldmdb r0, {r1, r2}", "multiple", "LDMDB.W", (1, 2), 4, -8, None, False),
    (Isa.T32, 0xE92D4FF0, "push.w {r4-r11, lr}", "multiple", "PUSH.W", (4, 5, 6, 7, 8, 9, 10, 11, 14), 4, -36, -36,
     True),
    (Isa.T32, 0xE9E02302, "strd r2, r3, [r0, #8]!", "dual", "STRD", (2, 3), 4, 8, 8, True),
    (Isa.T32, 0xE8702302, "ldrd r2, r3, [r0], #-8", "dual", "LDRD", (2, 3), 4, 0, -8, False),
    (Isa.T32, 0xE8401300, "strex r3, r1, [r0]", "exclusive", "STREX", (1,), 4, 0, None, True),
    (Isa.A32, 0xE590F000, "ldr pc, [r0]", "PC as Rt", "LDR", (15,), 4, 0, None, False),
    (Isa.A32, 0xE49DF004, "pop {pc}", "PC as Rt", "LDR", (15,), 4, 0, 4, False),
    (Isa.A32, 0xE790F101, "ldr pc, [r0, r1, lsl #2]", "PC as Rt", "LDR", (15,), 4, 0x40, None, False),
    (Isa.T32, 0xF8D0F004, "ldr.w pc, [r0, #4]", "PC as Rt", "LDR.W", (15,), 4, 4, None, False),
    (Isa.T32, 0xF85DFB04, "ldr pc, [sp], #4", "PC as Rt", "LDR", (15,), 4, 0, 4, False),
    (Isa.T32, 0xE8D01F5F, "ldrexh r1, [r0]", "exclusive", "LDREXH", (1,), 2, 0, None, False),
]


def first_address_and_writeback(t: Transfer) -> tuple[int, int | None]:
    amount = offset_amount(t, 0x10, False)
    start = t.bias + (0 if t.post_index else amount)
    return start, (amount if t.wb_offset is None else t.wb_offset) if t.writeback else None


@pytest.mark.parametrize(("isa", "insn", "kind", "name", "regs", "size", "start", "writeback", "write"),
                         [p[:2] + p[3:] for p in PLANS], ids=[p[2] for p in PLANS])
def test_plans(isa: Isa, insn: int, kind: str, name: str, regs: tuple[int, ...], size: int, start: int,
               writeback: int | None, write: bool) -> None:
    t = decode_split(isa, insn)
    assert t is not None
    assert (t.kind, t.name, t.regs, t.reg_size, t.wnr) == (kind, name, regs, size, write)
    assert first_address_and_writeback(t) == (start, writeback)
    # QEMU's order: ascending addresses, each register in pieces of at most 8 bytes, lower half first.
    offsets = [p.offset for p in t.parts]
    assert offsets == sorted(offsets) and offsets[0] == 0 and all(p.size == min(size, 8) for p in t.parts)
    assert sum(p.size for p in t.parts) == t.size


@pytest.mark.parametrize(("isa", "insn", "why"), [
    (Isa.A64, 0x4C407000, "ld1 {v0.16b}, [x0]: multiple structures"),
    (Isa.A64, 0xF8210002, "ldadd x1, x2, [x0]: atomic"),
    (Isa.A64, 0xC8E1FC02, "casal x1, x2, [x0]: compare-and-swap"),
    (Isa.A64, 0xA9C10401, "ldp x1, x1, [x0, #16]!: Rt == Rt2 (CONSTRAINED UNPREDICTABLE)"),
    (Isa.A64, 0xA9C10800, "ldp x0, x2, [x0, #16]!: writeback onto Rt"),
    (Isa.A32, 0xE1001092, "swp r1, r2, [r0]: swap"),
    (Isa.A32, 0xE59FF000, "ldr pc, [pc]: literal"),
    (Isa.A32, 0xE8B00003, "ldm r0!, {r0, r1}: writeback onto a loaded register"),
    (Isa.A32, 0xE8D00006, "ldm r0, {r1, r2}^: user registers"),
    (Isa.A32, 0xE1C030D0, "ldrd r3, r4, [r0]: odd Rt"),
    (Isa.A32, 0xE8900000, "ldm r0, {}: empty list"),
    (Isa.T32, 0xF8DFF000, "ldr.w pc, [pc]: literal"),
    (Isa.T32, 0xE8BDC000, "pop.w {lr, pc}: UNPREDICTABLE"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_left_refused(isa: Isa, insn: int, why: str) -> None:
    assert decode_split(isa, insn) is None, why


def test_a_plan_names_the_class_decode_refused() -> None:
    """The KVM report shows decode's reason for a split instruction: it must name the class planned."""
    planned = 0
    for isa, insn, text, reason in REFUSED_ROWS:
        plan = decode_split(isa, insn)
        if plan is not None:
            planned += 1
            assert isinstance(reason, str) and plan.kind.replace("SIMD", "SIMD/FP") in reason, (text, reason)
    assert planned >= 20


@pytest.mark.parametrize(("isa", "insn", "text"), [r[:3] for r in SYNDROME_ROWS], ids=[r[2] for r in SYNDROME_ROWS])
def test_nothing_with_a_syndrome_is_planned(isa: Isa, insn: int, text: str) -> None:
    assert decode_split(isa, insn) is None


@pytest.mark.parametrize("isa", list(Isa))
def test_random_encodings_with_a_syndrome_are_never_planned(isa: Isa) -> None:
    rng = random.Random(20261206)
    for _ in range(20000):
        insn = rng.getrandbits(16 if isa is Isa.T32 and rng.random() < 0.3 else 32)
        plan = decode_split(isa, insn)  # never raises
        if plan is not None:
            assert not isinstance(decode(isa, insn), Syndrome), hex(insn)
            assert 0 < len(plan.regs) <= 16 and plan.reg_size in (1, 2, 4, 8, 16)
