"""kvm-mmio.md section 5, the accesses without a usable syndrome: cases 14-20.

Writeback forms (14-16) are hand-decoded and emulated completely by default (the base register is
updated once, at completion), or refused like upstream KVM in strict mode. Pairs, duals, multiples,
exclusives, SIMD&FP loads/stores and loads to PC (17, 18) are emulated the same way, as a sequence of
single accesses in QEMU's order, with registers written only after the last one (a load to PC is an
interworking branch); strict mode refuses them by the NISV policy. Atomics, SWP and LD1/ST1 follow the
NISV policy always: a precise external abort with no device access (default) or a stop. Cache
maintenance on a device (19) is a NOP. A page-table walk into device memory (20) never reaches a device.
"""

from __future__ import annotations

import pytest

from tests.exitpath.harness import (
    A32,
    A64,
    DATA,
    DEV,
    DEV_SIZE,
    HOLE,
    MASK64,
    T32,
    Access,
    Probe,
    body_addr,
    code,
    expect_sea,
    policies,
    refuse_from,
    run,
    words,
)
from vcpu_service.domain import ErrorKind, EventKind

MARK = {A64: 0x91000442, A32: 0xE2822001, T32: 0x3201}  # add x2,x2,#1 / add r2,r2,#1 / adds r2,#1


# ----- case 14: A64 pre/post-index ------------------------------------------------------------------------

A64_WRITEBACK = [
    # (id, instruction, base register, base before (offset from DEV), device offset accessed, base after,
    #  size, is_write, "pre"/"post")
    ("ldr-post", 0xB8404401, "x0", 0x10, 0x10, 0x14, 4, False, "post"),  # ldr w1, [x0], #4
    ("ldr-pre", 0xB8404C01, "x0", 0x10, 0x14, 0x14, 4, False, "pre"),  # ldr w1, [x0, #4]!
    ("str-post", 0xF8008401, "x0", 0x10, 0x10, 0x18, 8, True, "post"),  # str x1, [x0], #8
    ("ldr-x-pre", 0xF8408C01, "x0", 0x10, 0x18, 0x18, 8, False, "pre"),  # ldr x1, [x0, #8]!
    ("ldrb-post-neg", 0x385FF401, "x0", 0x10, 0x10, 0x0F, 1, False, "post"),  # ldrb w1, [x0], #-1
    ("ldrsh-x-pre", 0x78802C01, "x0", 0x10, 0x12, 0x12, 2, False, "pre"),  # ldrsh x1, [x0, #2]!
    ("ldr-sp-post", 0xF84087E1, "sp", 0x10, 0x10, 0x18, 8, False, "post"),  # ldr x1, [sp], #8
    ("str-sp-pre", 0xF81F0FE1, "sp", 0x20, 0x10, 0x10, 8, True, "pre"),  # str x1, [sp, #-16]!
]


@pytest.mark.parametrize(("insn", "base", "before", "accessed", "after", "size", "write", "kind"),
                         [w[1:] for w in A64_WRITEBACK], ids=[w[0] for w in A64_WRITEBACK])
def test_case14_a64_writeback_is_emulated_completely(insn: int, base: str, before: int, accessed: int, after: int,
                                                     size: int, write: bool, kind: str) -> None:
    probe = Probe()
    probe.load(accessed, 0x8877_6655_4433_2211, 8)
    res = run(A64, words(insn, MARK[A64]), regs={base: DEV + before, "x1": 0x0102_0304_0506_0708}, devices=[probe])
    assert res.finished_body
    assert res.regs[base] == DEV + after  # the base moved once, by the immediate
    assert res.regs["x2"] == 1
    if write:
        assert probe.log == [Access(accessed, size, True, 0x0102_0304_0506_0708 & ((1 << (8 * size)) - 1))]
    else:
        assert probe.log == [Access(accessed, size, False, 0)]
        expected = {1: 0x11, 2: 0x2211, 4: 0x4433_2211, 8: 0x8877_6655_4433_2211}[size]
        if insn == 0x78802C01:  # ldrsh x1: 0x2211 is positive
            expected = 0x2211
        assert res.regs["x1"] == expected
    assert res.vcpu_stats.hand_decoded == 1
    (entry,) = res.vcpu_stats.kvm_report.values()
    assert entry.handled and entry.instruction == insn and "writeback" in entry.reason
    (record,) = res.trace
    assert record.writeback == kind and not (record.syndrome >> 24) & 1  # ISV=0: KVM would get no syndrome


@pytest.mark.parametrize(("insn", "far"), [
    (0xB8404401, DEV + 0x10),  # ldr w1, [x0], #4    (accesses x0)
    (0xB8404C01, DEV + 0x14),  # ldr w1, [x0, #4]!   (accesses x0 + 4)
    (0xF8008401, DEV + 0x10),  # str x1, [x0], #8
], ids=["ldr-post", "ldr-pre", "str-post"])
def test_case14_strict_kvm_refuses_writeback_with_a_precise_abort(insn: int, far: int) -> None:
    probe = Probe()
    res = run(A64, words(insn, MARK[A64]), regs={"x0": DEV + 0x10, "x1": 0x77}, devices=[probe], strict_kvm=True)
    expect_sea(res, pc=body_addr(A64), far=far, write=insn == 0xF8008401)
    assert probe.log == []  # no device access
    assert res.regs["x0"] == DEV + 0x10 and res.regs["x1"] == 0x77 and res.regs["x2"] == 0  # nothing retired
    assert res.vcpu_stats.hand_decoded == 0
    (entry,) = res.vcpu_stats.kvm_report.values()
    assert not entry.handled


def test_case14_strict_kvm_with_nisv_stop_ends_the_run_naming_the_instruction() -> None:
    probe = Probe()
    res = run(A64, words(0xB8404401), regs={"x0": DEV + 0x10}, devices=[probe], strict_kvm=True,
              pol=policies(nisv="stop"))
    assert res.final.kind == EventKind.ERROR
    assert res.final.error_kind == ErrorKind.NISV
    assert res.final.pc == body_addr(A64) and res.final.instruction == 0xB8404401
    assert "strict KVM" in res.final.reason and "b8404401" in res.final.reason
    assert res.regs["pc"] == body_addr(A64) and res.regs["x0"] == DEV + 0x10
    assert probe.log == []


# ----- case 15: AArch32 immediate writeback -----------------------------------------------------------------

AARCH32_WRITEBACK = [
    # (id, isa, instruction, r0 before (offset), accessed, r0 after, size, is_write)
    ("a32-ldrh-post", A32, (0xE0D010B2,), 0x10, 0x10, 0x12, 2, False),  # ldrh r1, [r0], #2
    ("a32-ldrh-pre", A32, (0xE1F010B2,), 0x10, 0x12, 0x12, 2, False),  # ldrh r1, [r0, #2]!
    ("a32-str-pre", A32, (0xE5A01004,), 0x10, 0x14, 0x14, 4, True),  # str r1, [r0, #4]!
    ("a32-strb-post-neg", A32, (0xE4401001,), 0x10, 0x10, 0x0F, 1, True),  # strb r1, [r0], #-1
    ("a32-ldrsb-post-neg", A32, (0xE05010D1,), 0x10, 0x10, 0x0F, 1, False),  # ldrsb r1, [r0], #-1
    ("a32-ldrt", A32, (0xE4B01004,), 0x10, 0x10, 0x14, 4, False),  # ldrt r1, [r0], #4 (always writes back)
    ("t32-ldrh-post", T32, (0xF830, 0x1B02), 0x10, 0x10, 0x12, 2, False),  # ldrh.w r1, [r0], #2
    ("t32-ldrh-pre", T32, (0xF830, 0x1F02), 0x10, 0x12, 0x12, 2, False),  # ldrh.w r1, [r0, #2]!
    ("t32-ldr-post-neg", T32, (0xF850, 0x1904), 0x10, 0x10, 0x0C, 4, False),  # ldr.w r1, [r0], #-4
    ("t32-strb-pre-neg", T32, (0xF800, 0x1D01), 0x10, 0x0F, 0x0F, 1, True),  # strb.w r1, [r0, #-1]!
    ("t32-ldrsb-post", T32, (0xF910, 0x1B01), 0x10, 0x10, 0x11, 1, False),  # ldrsb.w r1, [r0], #1
]


@pytest.mark.parametrize(("isa", "insn", "before", "accessed", "after", "size", "write"),
                         [w[1:] for w in AARCH32_WRITEBACK], ids=[w[0] for w in AARCH32_WRITEBACK])
def test_case15_aarch32_writeback_updates_the_base_exactly_once(isa: str, insn: tuple[int, ...], before: int,
                                                                accessed: int, after: int, size: int,
                                                                write: bool) -> None:
    probe = Probe()
    probe.load(accessed, 0x8483_8281, 4)
    res = run(isa, code(isa, *insn, MARK[isa]), regs={"r0": DEV + before, "r1": 0x1122_3344}, devices=[probe])
    assert res.finished_body
    assert res.regs["r0"] == DEV + after
    assert res.regs["r2"] == 1
    if write:
        assert probe.log == [Access(accessed, size, True, 0x1122_3344 & ((1 << (8 * size)) - 1))]
    else:
        assert probe.log == [Access(accessed, size, False, 0)]
        signed = insn[0] in (0xE05010D1, 0xF910)
        expected = {1: 0x81, 2: 0x8281, 4: 0x8483_8281}[size]
        assert res.regs["r1"] == (0xFFFF_FF81 if signed else expected)
    assert res.vcpu_stats.hand_decoded == 1


@pytest.mark.parametrize(("isa", "insn"), [(A32, (0xE0D010B2,)), (T32, (0xF830, 0x1F02))], ids=["a32", "t32"])
def test_case15_strict_kvm_refuses_aarch32_writeback(isa: str, insn: tuple[int, ...]) -> None:
    probe = Probe()
    res = run(isa, code(isa, *insn), regs={"r0": DEV + 0x10, "r1": 0x77}, devices=[probe], strict_kvm=True)
    far = DEV + 0x10 if isa == A32 else DEV + 0x12  # post-index accesses r0, pre-index r0 + 2
    expect_sea(res, pc=body_addr(isa), far=far)
    assert probe.log == [] and res.regs["r0"] == DEV + 0x10 and res.regs["r1"] == 0x77


def test_case15_t32_ldrt_has_a_syndrome_and_no_writeback() -> None:
    probe = Probe()
    probe.load(0x14, 0xABCD, 4)
    res = run(T32, code(T32, 0xF850, 0x1E04, MARK[T32]), regs={"r0": DEV + 0x10}, devices=[probe])  # ldrt r1,[r0,#4]
    assert res.finished_body
    assert probe.log == [Access(0x14, 4, False, 0)] and res.regs["r1"] == 0xABCD
    assert res.regs["r0"] == DEV + 0x10 and res.vcpu_stats.hand_decoded == 0


# ----- case 16: A32 register-offset writeback, every shift (the 2013 decoder truncated or BUG()ed) ----------

REGISTER_OFFSETS = [
    # (id, body words, r2, C flag set by `cmp r0, r0`?, accessed offset from r0, r0 delta (mod 2**32))
    ("lsl4-post", (0xE6901202,), 0x100, 0x0, 0x1000),  # ldr r1, [r0], r2, lsl #4
    ("lsl8-post", (0xE6901402,), 0x100, 0x0, 0x1_0000),  # ldr r1, [r0], r2, lsl #8  (2013: host BUG_ON)
    ("lsl4-pre", (0xE7B01202,), 0x100, 0x1000, 0x1000),  # ldr r1, [r0, r2, lsl #4]!
    ("minus-lsl2", (0xE6101102,), 0x100, 0x0, -0x400),  # ldr r1, [r0], -r2, lsl #2
    ("minus-asr2", (0xE6101142,), 0xFFFF_FF00, 0x0, 0x40),  # ldr r1, [r0], -r2, asr #2  (r2 = -256)
    ("minus-lsr32", (0xE6101022,), 0xFFFF_FFFF, 0x0, 0x0),  # ldr r1, [r0], -r2, lsr #32  (imm5 0 = 32)
    ("ror4", (0xE6901262,), 0x1, 0x0, 0x1000_0000),  # ldr r1, [r0], r2, ror #4
    ("rrx", (0xE1500000, 0xE6901062), 0x20, 0x0, 0x8000_0010),  # cmp r0, r0 (C=1); ldr r1, [r0], r2, rrx
]


@pytest.mark.parametrize(("body", "r2", "accessed", "delta"), [r[1:] for r in REGISTER_OFFSETS],
                         ids=[r[0] for r in REGISTER_OFFSETS])
def test_case16_a32_register_offset_writeback_uses_the_full_shift(body: tuple[int, ...], r2: int, accessed: int,
                                                                 delta: int) -> None:
    probe = Probe(size=0x2000)
    probe.load(accessed, 0x600D_F00D, 4)
    res = run(A32, words(*body, MARK[A32]), regs={"r0": DEV, "r2": r2}, devices=[probe])
    assert res.finished_body
    assert probe.log == [Access(accessed, 4, False, 0)]
    assert res.regs["r1"] == 0x600D_F00D
    assert res.regs["r0"] == (DEV + delta) & 0xFFFF_FFFF
    assert res.regs["r2"] == (r2 + 1) & 0xFFFF_FFFF  # the marker (add r2, r2, #1) ran once


# ----- cases 17 and 18: no syndrome, emulated as a sequence of single accesses ---------------------------------
#
# Pairs, duals, multiples, exclusives and SIMD&FP loads/stores are performed as QEMU's TCG performs them: one
# exit per part, in QEMU's order (first register / lowest address first, a Q register as two 8-byte halves), and
# the registers, the base and PC change only after the last part. Strict KVM refuses them all, as upstream KVM
# does. Atomics and LD1/ST1 stay refused.

A64_ENABLE_FP = [
    0xD2A00609,  # mov x9, #0x300000
    0xD5181049,  # msr cpacr_el1, x9          (FPEN: SIMD/FP at EL1)
    0xD5033FDF,  # isb
]
A64_BIG_ENDIAN = [
    0xD5381009,  # mrs  x9, sctlr_el1
    0xB2670129,  # orr  x9, x9, #0x2000000     (EE: big-endian data at EL1)
    0xD5181009,  # msr  sctlr_el1, x9
    0xD5033FDF,  # isb
]
PATTERN = bytes(i & 0xFF for i in range(0x200))


def v(offset: int, size: int, big_endian: bool = False) -> int:
    """The value ``size`` bytes of PATTERN at ``offset`` load as."""
    return int.from_bytes(PATTERN[offset:offset + size], "big" if big_endian else "little")


def R(offset: int, size: int) -> Access:
    return Access(offset, size, False, 0)


def W(offset: int, size: int, value: int) -> Access:
    return Access(offset, size, True, value)


X1, X2 = 0x1111_2222_3333_4444, 0x5555_6666_7777_8888
A64_SPLIT = [
    # (id, body (after A64_ENABLE_FP), extra registers, device log, registers after, class in the report)
    ("ldp", [0xA9400801], {}, [R(0, 8), R(8, 8)], {"x1": v(0, 8), "x2": v(8, 8)}, "pair"),
    ("ldp-w", [0x29410801], {}, [R(8, 4), R(12, 4)], {"x1": v(8, 4), "x2": v(12, 4)}, "pair"),  # [x0, #8]
    ("ldp-pre", [0xA9C10801], {}, [R(16, 8), R(24, 8)], {"x1": v(16, 8), "x2": v(24, 8), "x0": DEV + 16}, "pair"),
    ("ldp-post", [0xA8C10801], {}, [R(0, 8), R(8, 8)], {"x1": v(0, 8), "x2": v(8, 8), "x0": DEV + 16}, "pair"),
    ("ldnp", [0xA8400801], {}, [R(0, 8), R(8, 8)], {"x1": v(0, 8), "x2": v(8, 8)}, "pair"),
    ("stp", [0xA9000801], {}, [W(0, 8, X1), W(8, 8, X2)], {}, "pair"),
    ("stnp", [0xA8000801], {}, [W(0, 8, X1), W(8, 8, X2)], {}, "pair"),
    ("stp-pre-neg", [0xA9BF0801], {"x0": DEV + 0x20}, [W(0x10, 8, X1), W(0x18, 8, X2)], {"x0": DEV + 0x10}, "pair"),
    ("ldr-q0", [0x3DC00000, 0x9E660005, 0x4E183C06], {}, [R(0, 8), R(8, 8)],  # ...; fmov x5, d0; mov x6, v0.d[1]
     {"x5": v(0, 8), "x6": v(8, 8)}, "SIMD"),
    ("str-q0", [0x9E670020, 0x4E181C40, 0x3D800000], {}, [W(0, 8, X1), W(8, 8, X2)], {}, "SIMD"),
    ("ldr-q1-post", [0x3CC10401, 0x9E660025, 0x4E183C26], {}, [R(0, 8), R(8, 8)],  # ldr q1, [x0], #16
     {"x5": v(0, 8), "x6": v(8, 8), "x0": DEV + 16}, "SIMD"),
    ("ldur-q1", [0x3CC10001, 0x9E660025, 0x4E183C26], {}, [R(16, 8), R(24, 8)],  # ldur q1, [x0, #16]
     {"x5": v(16, 8), "x6": v(24, 8)}, "SIMD"),
    ("ldr-d1", [0xFD400401, 0x9E660025, 0x4E183C26], {}, [R(8, 8)], {"x5": v(8, 8), "x6": 0}, "SIMD"),
    ("ldr-s1-reg", [0xBC637801, 0x9E660025, 0x4E183C26], {"x3": 2}, [R(8, 4)],  # ldr s1, [x0, x3, lsl #2]
     {"x5": v(8, 4), "x6": 0}, "SIMD"),
    ("ldr-b1-post", [0x3C401401, 0x9E660025], {}, [R(0, 1)], {"x5": v(0, 1), "x0": DEV + 1}, "SIMD"),
    ("ldp-q1-q2", [0xAD400801, 0x9E660025, 0x4E183C26, 0x9E660047, 0x4E183C48], {},
     [R(0, 8), R(8, 8), R(16, 8), R(24, 8)], {"x5": v(0, 8), "x6": v(8, 8), "x7": v(16, 8), "x8": v(24, 8)}, "SIMD"),
    ("stp-d1-d2", [0x9E670021, 0x9E670042, 0x6D000801], {}, [W(0, 8, X1), W(8, 8, X2)], {}, "SIMD"),
    ("ldxr-stxr", [0xC85F7C01, 0xC8037C04], {"x4": X2}, [R(0, 8), W(0, 8, X2)], {"x1": v(0, 8), "x3": 0},
     "exclusive"),
    ("ldxr-stxr-stxr", [0xC85F7C01, 0xC8037C04, 0xC8057C04], {"x4": X2, "x5": 7}, [R(0, 8), W(0, 8, X2)],
     {"x1": v(0, 8), "x3": 0, "x5": 1}, "exclusive"),  # the second store-exclusive finds the monitor open
    ("ldxp-stxp", [0xC87F0801, 0xC8230801], {}, [R(0, 8), R(8, 8), W(0, 8, v(0, 8)), W(8, 8, v(8, 8))],
     {"x1": v(0, 8), "x2": v(8, 8), "x3": 0}, "exclusive"),
    ("ldxrb", [0x085F7C01], {}, [R(0, 1)], {"x1": v(0, 1)}, "exclusive"),
]


@pytest.mark.parametrize(("body", "regs", "log", "after", "what"), [n[1:] for n in A64_SPLIT],
                         ids=[n[0] for n in A64_SPLIT])
def test_case17_a64_no_syndrome_is_emulated_as_single_accesses_in_order(
        body: list[int], regs: dict[str, int], log: list[Access], after: dict[str, int], what: str) -> None:
    probe = Probe()
    probe.memory[:len(PATTERN)] = PATTERN
    before = {"x0": DEV, "x1": X1, "x2": X2, "x3": 0x33, "x5": 0x55, "x6": 0x66, "x7": 0x77, "x8": 0x88} | regs
    res = run(A64, words(*A64_ENABLE_FP, *body, MARK[A64]), regs=before, devices=[probe])
    assert res.finished_body, (res.final, res.abort)
    assert probe.log == log
    expected = before | after
    expected["x2"] = (expected["x2"] + 1) & MASK64  # the marker
    for reg, value in expected.items():
        assert res.regs[reg] == value, (reg, hex(res.regs[reg]), hex(value))
    entries = list(res.vcpu_stats.kvm_report.values())
    assert entries and all(e.handled and what in e.reason for e in entries)
    assert len(res.trace) == len(log)
    assert all(not (r.syndrome >> 24) & 1 for r in res.trace)  # ISV=0: KVM would get no syndrome


A64_STILL_REFUSED = [
    # (id, instruction, is_write, cpu model, name of its class in the report)
    ("ld1", 0x4C407000, False, "", "SIMD"),  # ld1 {v0.16b}, [x0]
    ("st1", 0x4C007000, True, "", "SIMD"),  # st1 {v0.16b}, [x0]
    ("ldadd", 0xF8210002, False, "max", "atomic"),  # ldadd x1, x2, [x0]      (ARMv8.1: cpu "max")
    ("swp", 0xF8218002, False, "max", "atomic"),  # swp x1, x2, [x0]
    ("casal", 0xC8E1FC02, False, "max", "compare-and-swap"),  # casal x1, x2, [x0]
]
A64_STRICT = [
    ("ldp", 0xA9400801, False, "", "pair"),  # ldp x1, x2, [x0]
    ("stp", 0xA9000801, True, "", "pair"),  # stp x1, x2, [x0]
    ("ldnp", 0xA8400801, False, "", "pair"),  # ldnp x1, x2, [x0]
    ("ldpsw", 0x69400801, False, "", "pair"),  # ldpsw x1, x2, [x0]
    ("ldr-q0", 0x3DC00000, False, "", "SIMD"),  # ldr q0, [x0]
    ("str-q0", 0x3D800000, True, "", "SIMD"),  # str q0, [x0]
    ("ldxr", 0xC85F7C01, False, "", "exclusive"),  # ldxr x1, [x0]
    ("ldaxr", 0xC85FFC01, False, "", "exclusive"),  # ldaxr x1, [x0]
]


A64_REFUSED = [(*n[1:], False) for n in A64_STILL_REFUSED] + [(*n[1:], True) for n in A64_STILL_REFUSED + A64_STRICT]


@pytest.mark.parametrize(("insn", "write", "cpu", "what", "strict"), A64_REFUSED,
                         ids=[f"{n[0]}-{'strict' if strict else 'default'}"
                              for n, strict in [(n, False) for n in A64_STILL_REFUSED]
                              + [(n, True) for n in A64_STILL_REFUSED + A64_STRICT]])
def test_case17_a64_refused_gets_a_precise_abort_and_no_access(insn: int, write: bool, cpu: str, what: str,
                                                              strict: bool) -> None:
    probe = Probe()
    probe.memory[:16] = bytes(range(16))
    res = run(A64, words(*A64_ENABLE_FP, insn, MARK[A64]), regs={"x0": DEV, "x1": 0x11, "x2": 0x22, "x3": 0x33},
              devices=[probe], cpu_model=cpu, strict_kvm=strict)
    # Atomics fault on their read first, so they report WnR=0 (as the architecture allows for a
    # read-modify-write whose read aborts).
    expect_sea(res, pc=body_addr(A64, 12), far=DEV, write=write)
    assert probe.log == [] and probe.memory[:16] == bytes(range(16))
    assert (res.regs["x0"], res.regs["x1"], res.regs["x2"], res.regs["x3"]) == (DEV, 0x11, 0x22, 0x33)
    (entry,) = res.vcpu_stats.kvm_report.values()
    assert not entry.handled and entry.instruction == insn and what in entry.reason
    assert res.vcpu_stats.hand_decoded == 0


def test_case17_stxr_without_a_reservation_fails_without_any_access() -> None:
    # STXR with no LDXR before it: the exclusive monitor is open, so the store does not happen at all
    # (status 1) and there is nothing to trap, as on hardware.
    probe = Probe()
    res = run(A64, words(0xC8037C01, MARK[A64]), regs={"x0": DEV, "x1": 0x11, "x3": 0x33}, devices=[probe])
    assert res.finished_body
    assert res.regs["x3"] == 1 and probe.log == [] and res.trace == []


def test_case17_stxr_to_another_address_than_the_ldxr_fails_without_any_access() -> None:
    probe = Probe()
    probe.memory[:len(PATTERN)] = PATTERN
    # ldxr x1, [x0]; stxr w3, x4, [x2]  (x2 = x0 + 8)
    res = run(A64, words(0xC85F7C01, 0xC8037C44, MARK[A64]), regs={"x0": DEV, "x2": DEV + 8, "x4": 0x44},
              devices=[probe])
    assert res.finished_body
    assert probe.log == [R(0, 8)] and res.regs["x1"] == v(0, 8) and res.regs["x3"] == 1


def test_case17_nisv_stop_ends_the_run_naming_the_class() -> None:
    probe = Probe()
    res = run(A64, words(0xA9400801), regs={"x0": DEV, "x1": 0x11}, devices=[probe], pol=policies(nisv="stop"),
              strict_kvm=True)
    assert res.final.kind == EventKind.ERROR
    assert res.final.error_kind == ErrorKind.NISV
    assert res.final.pc == body_addr(A64) and res.final.fault_address == DEV and res.final.instruction == 0xA9400801
    assert "pair" in res.final.reason and "a9400801" in res.final.reason
    assert res.regs["x1"] == 0x11 and res.regs["pc"] == body_addr(A64)
    assert probe.log == []


def test_case17_big_endian_pair_and_q_are_assembled_per_register() -> None:
    probe = Probe()
    probe.memory[:len(PATTERN)] = PATTERN
    # ...EE; ldp x1, x2, [x0]; ldr q0, [x0, #16]... as `ldur q0`: 0x3CC10000; fmov x5, d0; mov x6, v0.d[1];
    # stp x1, x2, [x0, #32] (0xA9020801)
    body = [*A64_ENABLE_FP, *A64_BIG_ENDIAN, 0xA9400801, 0x3CC10000, 0x9E660005, 0x4E183C06, 0xA9020801, MARK[A64]]
    res = run(A64, words(*body), regs={"x0": DEV}, devices=[probe])
    assert res.finished_body, (res.final, res.abort)
    assert res.regs["x1"] == v(0, 8, True) and res.regs["x2"] == v(8, 8, True) + 1  # (+1: the marker)
    # A big-endian Q register: the byte at the lowest address is its most significant one.
    assert (res.regs["x6"] << 64) | res.regs["x5"] == v(16, 16, True)
    assert [a for a in probe.log if a.is_write] == [W(32, 8, v(0, 8)), W(40, 8, v(8, 8))]  # the same bytes back
    assert probe.memory[32:48] == PATTERN[0:16]


def test_case17_device_error_on_the_second_register_of_an_ldp_aborts_with_no_register_written() -> None:
    probe = Probe(fail=refuse_from(24))
    res = run(A64, words(0xA9C10801, MARK[A64]), regs={"x0": DEV, "x1": 0x11, "x2": 0x22},  # ldp ..., [x0, #16]!
              devices=[probe])
    expect_sea(res, pc=body_addr(A64), far=DEV + 24)
    assert probe.log == [R(16, 8), R(24, 8)]
    assert (res.regs["x0"], res.regs["x1"], res.regs["x2"]) == (DEV, 0x11, 0x22)  # no writeback either


def test_case17_pair_straddling_the_end_of_the_device_is_refused_before_any_access() -> None:
    probe = Probe()
    res = run(A64, words(0xA9000801, MARK[A64]), regs={"x0": DEV + DEV_SIZE - 8}, devices=[probe])  # stp x1, x2
    expect_sea(res, pc=body_addr(A64), far=DEV + DEV_SIZE, write=True)
    assert probe.log == []
    assert "straddles" in res.aborts_events()[0].reason


def test_case17_q_access_to_a_device_taking_4_bytes_is_refused_before_any_access() -> None:
    probe = Probe(access_sizes=(1, 2, 4))
    res = run(A64, words(*A64_ENABLE_FP, 0x3DC00000, MARK[A64]), regs={"x0": DEV}, devices=[probe])
    expect_sea(res, pc=body_addr(A64, 12), far=DEV)
    assert probe.log == []


def test_case17_posted_stp_posts_both_halves_in_order() -> None:
    probe = Probe(posted_from=0)
    res = run(A64, words(0xA9000801, 0xA9010801, MARK[A64]), regs={"x0": DEV, "x1": X1, "x2": X2},
              devices=[probe])
    assert res.finished_body
    assert probe.log == [W(0, 8, X1), W(8, 8, X2), W(16, 8, X1), W(24, 8, X2)]
    assert res.vcpu_stats.posted_writes == 4 and res.vcpu_stats.exits == 0


def test_case17_unmapped_pair_reads_as_zero_and_ignores_writes() -> None:
    res = run(A64, words(0xA9000801, 0xA9401003, MARK[A64]), regs={"x0": HOLE, "x1": X1, "x2": X2, "x3": 3,
                                                                   "x4": 4})  # stp x1, x2; ldp x3, x4
    assert res.finished_body
    assert (res.regs["x3"], res.regs["x4"]) == (0, 0)


A32_REGS = {"r0": DEV, "r1": 0x11, "r2": 0x22, "r3": 0x33, "r4": 0x44, "r5": 0x55, "r6": 0x66, "r7": 0x77,
            "sp": DEV + 0x100, "lr": 0xEE}
AARCH32_SPLIT = [
    # (id, isa, instruction, extra registers, device log, registers after, class in the report)
    ("a32-ldm", A32, (0xE8900006,), {}, [R(0, 4), R(4, 4)], {"r1": v(0, 4), "r2": v(4, 4)}, "multiple"),
    ("a32-ldmib", A32, (0xE9900006,), {}, [R(4, 4), R(8, 4)], {"r1": v(4, 4), "r2": v(8, 4)}, "multiple"),
    ("a32-ldmda-wb", A32, (0xE8300006,), {"r0": DEV + 0x10}, [R(0xC, 4), R(0x10, 4)],
     {"r1": v(0xC, 4), "r2": v(0x10, 4), "r0": DEV + 8}, "multiple"),
    ("a32-stm", A32, (0xE8800006,), {}, [W(0, 4, 0x11), W(4, 4, 0x22)], {}, "multiple"),
    ("a32-stmdb-wb", A32, (0xE920000E,), {"r0": DEV + 0x10}, [W(4, 4, 0x11), W(8, 4, 0x22), W(0xC, 4, 0x33)],
     {"r0": DEV + 4}, "multiple"),
    ("a32-push", A32, (0xE92D0006,), {}, [W(0xF8, 4, 0x11), W(0xFC, 4, 0x22)], {"sp": DEV + 0xF8}, "multiple"),
    ("a32-push-4", A32, (0xE92D400E,), {},  # push {r1, r2, r3, lr}
     [W(0xF0, 4, 0x11), W(0xF4, 4, 0x22), W(0xF8, 4, 0x33), W(0xFC, 4, 0xEE)], {"sp": DEV + 0xF0}, "multiple"),
    ("a32-pop-4", A32, (0xE8BD00F0,), {}, [R(0x100, 4), R(0x104, 4), R(0x108, 4), R(0x10C, 4)],  # pop {r4-r7}
     {"r4": v(0x100, 4), "r5": v(0x104, 4), "r6": v(0x108, 4), "r7": v(0x10C, 4), "sp": DEV + 0x110}, "multiple"),
    ("a32-ldrd", A32, (0xE1C020D0,), {}, [R(0, 4), R(4, 4)], {"r2": v(0, 4), "r3": v(4, 4)}, "dual"),
    ("a32-ldrd-pre", A32, (0xE1E020D8,), {}, [R(8, 4), R(12, 4)],  # ldrd r2, r3, [r0, #8]!
     {"r2": v(8, 4), "r3": v(12, 4), "r0": DEV + 8}, "dual"),
    ("a32-ldrd-post-neg", A32, (0xE04020D8,), {"r0": DEV + 0x10}, [R(0x10, 4), R(0x14, 4)],  # [r0], #-8
     {"r2": v(0x10, 4), "r3": v(0x14, 4), "r0": DEV + 8}, "dual"),
    ("a32-ldrd-reg", A32, (0xE18020D1,), {"r1": 0x10}, [R(0x10, 4), R(0x14, 4)],  # ldrd r2, r3, [r0, r1]
     {"r2": v(0x10, 4), "r3": v(0x14, 4)}, "dual"),
    ("a32-strd", A32, (0xE1C020F0,), {}, [W(0, 4, 0x22), W(4, 4, 0x33)], {}, "dual"),
    ("a32-ldrex-strex", A32, (0xE1901F9F, 0xE1803F94), {},  # ldrex r1, [r0]; strex r3, r4, [r0]
     [R(0, 4), W(0, 4, 0x44)], {"r1": v(0, 4), "r3": 0}, "exclusive"),
    ("a32-ldrexb", A32, (0xE1D01F9F,), {}, [R(0, 1)], {"r1": v(0, 1)}, "exclusive"),
    ("a32-ldrexd-strexd", A32, (0xE1B02F9F, 0xE1A01F94), {},  # ldrexd r2, r3, [r0]; strexd r1, r4, r5, [r0]
     [R(0, 4), R(4, 4), W(0, 4, 0x44), W(4, 4, 0x55)], {"r2": v(0, 4), "r3": v(4, 4), "r1": 0}, "exclusive"),
    ("t16-ldm-wb", T32, (0xC806,), {}, [R(0, 4), R(4, 4)], {"r1": v(0, 4), "r2": v(4, 4), "r0": DEV + 8},
     "multiple"),
    ("t16-ldm-3-wb", T32, (0xC80E,), {}, [R(0, 4), R(4, 4), R(8, 4)],  # ldmia r0!, {r1, r2, r3}
     {"r1": v(0, 4), "r2": v(4, 4), "r3": v(8, 4), "r0": DEV + 12}, "multiple"),
    ("t16-stmia", T32, (0xC006,), {}, [W(0, 4, 0x11), W(4, 4, 0x22)], {"r0": DEV + 8}, "multiple"),
    ("t16-push", T32, (0xB406,), {}, [W(0xF8, 4, 0x11), W(0xFC, 4, 0x22)], {"sp": DEV + 0xF8}, "multiple"),
    ("t16-push-4", T32, (0xB50E,), {},  # push {r1, r2, r3, lr}
     [W(0xF0, 4, 0x11), W(0xF4, 4, 0x22), W(0xF8, 4, 0x33), W(0xFC, 4, 0xEE)], {"sp": DEV + 0xF0}, "multiple"),
    ("t16-pop-4", T32, (0xBCF0,), {}, [R(0x100, 4), R(0x104, 4), R(0x108, 4), R(0x10C, 4)],  # pop {r4-r7}
     {"r4": v(0x100, 4), "r5": v(0x104, 4), "r6": v(0x108, 4), "r7": v(0x10C, 4), "sp": DEV + 0x110}, "multiple"),
    ("t32-ldm", T32, (0xE890, 0x0006), {}, [R(0, 4), R(4, 4)], {"r1": v(0, 4), "r2": v(4, 4)}, "multiple"),
    ("t32-ldmdb", T32, (0xE910, 0x0006), {"r0": DEV + 0x10}, [R(8, 4), R(0xC, 4)],
     {"r1": v(8, 4), "r2": v(0xC, 4)}, "multiple"),
    ("t32-stmdb-wb", T32, (0xE920, 0x0006), {"r0": DEV + 0x10}, [W(8, 4, 0x11), W(0xC, 4, 0x22)],
     {"r0": DEV + 8}, "multiple"),
    ("t32-ldrd", T32, (0xE9D0, 0x2300), {}, [R(0, 4), R(4, 4)], {"r2": v(0, 4), "r3": v(4, 4)}, "dual"),
    ("t32-strd-pre", T32, (0xE9E0, 0x2302), {}, [W(8, 4, 0x22), W(12, 4, 0x33)], {"r0": DEV + 8}, "dual"),
    ("t32-ldrd-post-neg", T32, (0xE870, 0x2302), {"r0": DEV + 0x10}, [R(0x10, 4), R(0x14, 4)],
     {"r2": v(0x10, 4), "r3": v(0x14, 4), "r0": DEV + 8}, "dual"),
    ("t32-ldrex-strex", T32, (0xE850, 0x1F00, 0xE840, 0x4300), {},  # ldrex r1, [r0]; strex r3, r4, [r0]
     [R(0, 4), W(0, 4, 0x44)], {"r1": v(0, 4), "r3": 0}, "exclusive"),
    ("t32-ldrexh", T32, (0xE8D0, 0x1F5F), {}, [R(0, 2)], {"r1": v(0, 2)}, "exclusive"),
]


@pytest.mark.parametrize(("isa", "insn", "regs", "log", "after", "what"), [n[1:] for n in AARCH32_SPLIT],
                         ids=[n[0] for n in AARCH32_SPLIT])
def test_case18_aarch32_no_syndrome_is_emulated_as_single_accesses_in_order(
        isa: str, insn: tuple[int, ...], regs: dict[str, int], log: list[Access], after: dict[str, int],
        what: str) -> None:
    probe = Probe()
    probe.memory[:len(PATTERN)] = PATTERN
    before = A32_REGS | regs
    res = run(isa, code(isa, *insn, MARK[isa]), regs=before, devices=[probe])
    assert res.finished_body, (res.final, res.abort)
    assert probe.log == log
    expected = before | after
    expected["r2"] = (expected["r2"] + 1) & 0xFFFF_FFFF  # the marker
    for reg, value in expected.items():
        assert res.regs[reg] == value, (reg, hex(res.regs[reg]), hex(value))
    entries = list(res.vcpu_stats.kvm_report.values())
    assert entries and all(e.handled and what in e.reason for e in entries)


@pytest.mark.parametrize(("isa", "insn", "target"), [
    (A32, (0xE8900030,), body_addr(A32, 8)),  # ldm r0, {r4, r5}: no PC (the control: both adds run)
    (A32, (0xE8908010,), body_addr(A32, 8)),  # ldm r0, {r4, pc}: to the second add, ARM state
    (T32, (0xBD10,), body_addr(T32, 4) | 1),  # pop {r4, pc}: to the second adds, Thumb state
    (A32, (0xE590F004,), body_addr(A32, 8)),  # ldr pc, [r0, #4]
    (A32, (0xE49DF004,), body_addr(A32, 8)),  # pop {pc}  (ldr pc, [sp], #4)
    (T32, (0xF8D0, 0xF004), body_addr(T32, 6) | 1),  # ldr.w pc, [r0, #4]
], ids=["a32-ldm-control", "a32-ldm-pc", "t16-pop-pc", "a32-ldr-pc", "a32-pop-pc", "t32-ldr-pc"])
def test_case18_ldm_with_pc_loads_pc_after_every_part_as_an_interworking_branch(isa: str, insn: tuple[int, ...],
                                                                             target: int) -> None:
    probe = Probe()
    probe.load(0, 0x4444, 4)
    probe.load(4, target, 4)
    probe.load(0x100, 0x4444, 4)
    probe.load(0x104, target, 4)
    sp = DEV + (0x104 if insn == (0xE49DF004,) else 0x100)  # pop {pc} reads the target alone
    res = run(isa, code(isa, *insn, MARK[isa], MARK[isa]), regs={"r0": DEV, "sp": sp}, devices=[probe])
    assert res.finished_body, (res.final, res.abort)
    if insn[0] in (0xE8900030, 0xE8908010, 0xBD10):
        assert res.regs["r4"] == 0x4444
    assert res.regs["r2"] == (2 if insn == (0xE8900030,) else 1)  # the branch skipped the first add
    if insn == (0xE49DF004,):
        assert res.regs["sp"] == DEV + 0x108  # sp += 4 (the pop read the word at DEV + 0x104)
    assert all(e.handled for e in res.vcpu_stats.kvm_report.values())


def test_case18_ldr_pc_to_a_thumb_address_switches_to_thumb() -> None:
    probe = Probe()
    probe.load(0, body_addr(A32, 8) | 1, 4)
    # ldr pc, [r0]; add r2, r2, #1 (skipped); Thumb: adds r2, #1; nop; bx pc (word-aligned: back to ARM 4 bytes
    # on, at the epilogue); nop
    res = run(A32, words(0xE590F000, 0xE2822001, 0xBF00_3201, 0xBF00_4778), regs={"r0": DEV}, devices=[probe])
    assert res.finished_body, (res.final, res.abort)
    assert res.regs["r2"] == 1 and probe.log == [R(0, 4)]


def test_case18_strd_whose_second_half_fails_leaves_the_first_half_performed() -> None:
    probe = Probe(fail=refuse_from(12))
    res = run(A32, words(0xE1E020F8, MARK[A32]), regs={"r0": DEV, "r2": 0x22, "r3": 0x33},  # strd r2, r3, [r0, #8]!
              devices=[probe])
    expect_sea(res, pc=body_addr(A32), far=DEV + 12, write=True)
    assert probe.log == [W(8, 4, 0x22), W(12, 4, 0x33)]
    assert probe.memory[8:12] == (0x22).to_bytes(4, "little")  # performed, as under QEMU
    assert res.regs["r0"] == DEV  # no writeback


def test_case18_big_endian_strd_and_ldm() -> None:
    probe = Probe()
    probe.memory[:len(PATTERN)] = PATTERN
    # setend be; strd r2, r3, [r0, #16]; ldm r0, {r4, r5}; setend le (0xF1010000)
    res = run(A32, words(0xF1010200, 0xE1C021F0, 0xE8900030, 0xF1010000, MARK[A32]),
              regs={"r0": DEV, "r2": 0x1122_3344, "r3": 0x5566_7788}, devices=[probe])
    assert res.finished_body, (res.final, res.abort)
    assert probe.memory[16:24] == bytes.fromhex("1122334455667788")
    assert res.regs["r4"] == v(0, 4, True) and res.regs["r5"] == v(4, 4, True)


AARCH32_REFUSED = [
    # (id, isa, instruction, is_write, address accessed (offset from DEV), class in the report, refused by default)
    ("a32-ldm", A32, (0xE8900006,), False, 0x0, "multiple", False),  # ldm r0, {r1, r2}
    ("a32-push", A32, (0xE92D0006,), True, 0xF8, "multiple", False),  # push {r1, r2}          (sp = DEV + 0x100)
    ("a32-ldrd", A32, (0xE1C020D0,), False, 0x0, "dual", False),  # ldrd r2, r3, [r0]
    ("a32-ldrex", A32, (0xE1901F9F,), False, 0x0, "exclusive", False),  # ldrex r1, [r0]
    ("a32-ldr-pc", A32, (0xE590F000,), False, 0x0, "PC as Rt", False),  # ldr pc, [r0]
    ("t16-ldm-wb", T32, (0xC806,), False, 0x0, "multiple", False),  # ldmia r0!, {r1, r2}
    ("t16-push", T32, (0xB406,), True, 0xF8, "multiple", False),  # push {r1, r2}
    ("t32-ldm", T32, (0xE890, 0x0006), False, 0x0, "multiple", False),  # ldmia.w r0, {r1, r2}
    ("t32-ldrd", T32, (0xE9D0, 0x2300), False, 0x0, "dual", False),  # ldrd r2, r3, [r0]
    ("t32-ldrex", T32, (0xE850, 0x1F00), False, 0x0, "exclusive", False),  # ldrex r1, [r0]
    ("t32-ldr-pc", T32, (0xF8D0, 0xF000), False, 0x0, "PC as Rt", False),  # ldr.w pc, [r0]
    ("a32-swp", A32, (0xE1001092,), False, 0x0, "swap", True),  # swp r1, r2, [r0]
]


AARCH32_CASES = [(n, strict) for n in AARCH32_REFUSED for strict in (False, True) if strict or n[6]]


@pytest.mark.parametrize(("isa", "insn", "write", "offset", "what", "always", "strict"),
                         [(*n[1:], strict) for n, strict in AARCH32_CASES],
                         ids=[f"{n[0]}-{'strict' if strict else 'default'}" for n, strict in AARCH32_CASES])
def test_case18_aarch32_refused_gets_a_precise_abort_and_no_access(isa: str, insn: tuple[int, ...], write: bool,
                                                                  offset: int, what: str, always: bool,
                                                                  strict: bool) -> None:
    probe = Probe()
    res = run(isa, code(isa, *insn, MARK[isa]), regs={"r0": DEV, "r1": 0x11, "r2": 0x22, "r3": 0x33,
                                                      "sp": DEV + 0x100}, devices=[probe], strict_kvm=strict)
    expect_sea(res, pc=body_addr(isa), far=DEV + offset, write=write)
    assert probe.log == []
    assert (res.regs["r0"], res.regs["r1"], res.regs["r2"], res.regs["r3"]) == (DEV, 0x11, 0x22, 0x33)
    (entry,) = res.vcpu_stats.kvm_report.values()
    assert not entry.handled and what in entry.reason


# ----- case 19: cache maintenance by address on a device is a NOP ------------------------------------------

@pytest.mark.parametrize(("isa", "insn"), [
    (A64, (0xD50B7E20,)),  # dc civac, x0
    (A32, (0xEE070F3E,)),  # mcr p15, 0, r0, c7, c14, 1     (DCCIMVAC)
    (T32, (0xEE07, 0x0F3E)),  # mcr p15, 0, r0, c7, c14, 1
], ids=["a64-dc-civac", "a32-dccimvac", "t32-dccimvac"])
@pytest.mark.parametrize("where", [DEV, HOLE], ids=["device", "hole"])
def test_case19_cache_maintenance_on_mmio_is_a_nop(isa: str, insn: tuple[int, ...], where: int) -> None:
    probe = Probe()
    base = "x0" if isa == A64 else "r0"
    res = run(isa, code(isa, *insn, MARK[isa]), regs={base: where}, devices=[probe],
              pol=policies(unmapped="abort"))
    assert res.finished_body  # PC moved past it (the marker ran) and nothing was injected
    assert res.regs["x2" if isa == A64 else "r2"] == 1
    assert probe.log == [] and res.vcpu_stats.aborts == 0 and res.trace == []


# ----- case 20: a stage-1 page-table walk into device memory -------------------------------------------------

# 4 KiB granule, T0SZ=25 (walk starts at level 1), TTBR1 walks off, inner/outer WBWA, 40-bit IPA.
TCR = 25 | (1 << 8) | (1 << 10) | (3 << 12) | (1 << 23) | (2 << 32)
MAIR = 0xFF00  # Attr0 = Device-nGnRnE, Attr1 = Normal write-back
TABLES = DATA + 0x1000
A64_MMU_ON = [
    0xD518A202,  # msr mair_el1, x2
    0xD5182043,  # msr tcr_el1, x3
    0xD5182004,  # msr ttbr0_el1, x4
    0xD5033FDF,  # isb
    0xD5381005,  # mrs x5, sctlr_el1
    0xB24000A5,  # orr x5, x5, #1              (M)
    0xD5181005,  # msr sctlr_el1, x5
    0xD5033FDF,  # isb
]


def block(base: int, attr: int) -> bytes:
    """A level-1 block descriptor (1 GiB): AttrIndx, inner shareable, access flag, EL1 read/write."""
    return (base | (attr << 2) | (3 << 8) | (1 << 10) | 1).to_bytes(8, "little")


def test_case20_page_table_in_device_memory_is_a_data_abort_and_no_device_access() -> None:
    # Level 1: [0] a table descriptor whose level-2 table is at DEV (device memory), [1] RAM as a block.
    probe = Probe()
    tables = (DEV | 3).to_bytes(8, "little") + block(0x4000_0000, 1)
    res = run(A64, words(*A64_MMU_ON, 0xB9400001),  # ...; ldr w1, [x0]
              regs={"x0": DEV + 0x10, "x1": 0x77, "x2": MAIR, "x3": TCR, "x4": TABLES}, devices=[probe],
              ram={TABLES: tables})
    # The walk for the load reads its level-2 descriptor from DEV + 0x280: Unicorn reads nothing there (zero, an
    # invalid descriptor) and raises a data abort, translation fault level 2, which the guest takes at its vector.
    # (QEMU would call it a synchronous external abort on the walk, DFSC 0x16; KVM would inject an abort.) Neither
    # forwards the walk to a device.
    a = res.abort
    assert res.powered_off and a is not None, res.final
    assert a.esr == (0x25 << 26) | (1 << 25) | 0x06, hex(a.esr)  # EC data abort same EL, IL, DFSC 0x06
    assert a.far == DEV + 0x10 and a.elr == body_addr(A64, 4 * len(A64_MMU_ON)) and a.vector == 0x200
    assert probe.log == [] and res.trace == []
    assert res.regs["x1"] == 0x77


def test_case20_translation_table_base_in_device_memory_stops_at_the_first_fetch() -> None:
    # The first fetch with the MMU on (the `isb`) takes a prefetch abort (translation fault, level 1), and so
    # does the fetch of its vector, which no table maps either: an exception loop, which ends the run.
    probe = Probe()
    res = run(A64, words(*A64_MMU_ON, 0xB9400001), regs={"x0": DEV, "x2": MAIR, "x3": TCR, "x4": DEV},
              devices=[probe])
    assert res.final.kind == EventKind.ERROR
    assert res.final.error_kind == ErrorKind.GUEST_EXCEPTION
    assert "exception loop" in res.final.reason and "prefetch abort" in res.final.reason
    assert res.final.pc == body_addr(A64, 4 * 7)  # the `isb`: the first instruction fetched with the MMU on
    assert res.final.syndrome == (0x21 << 26) | (1 << 25) | 0x05
    assert probe.log == []


def test_case20_the_same_tables_in_ram_work() -> None:
    """The control for the two tests above: with every table in RAM the load reaches the device."""
    probe = Probe()
    probe.load(0x10, 0x600D, 4)
    tables = block(0, 0) + block(0x4000_0000, 1)
    res = run(A64, words(*A64_MMU_ON, 0xB9400001), regs={"x0": DEV + 0x10, "x1": MASK64, "x2": MAIR, "x3": TCR,
                                                         "x4": TABLES}, devices=[probe], ram={TABLES: tables})
    assert res.finished_body
    assert probe.log == [Access(0x10, 4, False, 0)] and res.regs["x1"] == 0x600D


# ----- cases 17 and 18 against Unicorn itself: the same instruction on RAM, where QEMU's TCG performs it --------

def _to_ram(value: int) -> int:
    return DATA + value - DEV if DEV <= value < DEV + DEV_SIZE else value


def _same(ram_value: int, dev_value: int) -> bool:
    """Equal, or the same offset into the RAM copy and the device (a base register)."""
    return ram_value == dev_value or (DATA <= ram_value < DATA + DEV_SIZE and ram_value - DATA == dev_value - DEV)


DIFFERENTIAL = [(A64, words(*A64_ENABLE_FP, *n[1]), {"x0": DEV, "x1": X1, "x2": X2, "x3": 0x33, "x4": 0x44} | n[2],
                 n[0]) for n in A64_SPLIT] + [
    (n[1], code(n[1], *n[2]), A32_REGS | n[3], n[0]) for n in AARCH32_SPLIT] + [
    (A64, words(*A64_ENABLE_FP, *A64_BIG_ENDIAN, 0xA9400801, 0x3CC10000, 0x9E660005, 0x4E183C06, 0xA9020801),
     {"x0": DEV}, "a64-big-endian"),
    (A32, words(0xF1010200, 0xE1C021F0, 0xE8900030, 0xE92D001E, 0xE8BD00F0, 0xF1010000), A32_REGS, "a32-big-endian"),
]


@pytest.mark.parametrize(("isa", "body", "regs"), [d[:3] for d in DIFFERENTIAL], ids=[d[3] for d in DIFFERENTIAL])
def test_case17_18_split_leaves_what_unicorn_leaves_on_ram(isa: str, body: bytes, regs: dict[str, int]) -> None:
    """The split emulation against QEMU's TCG (Unicorn) running the same code on RAM: every register and every
    byte of memory agree, base registers as offsets."""
    on_ram = run(isa, body, regs={k: _to_ram(v) for k, v in regs.items()}, ram={DATA: PATTERN},
                 read=[(DATA, len(PATTERN))])
    probe = Probe()
    probe.memory[:len(PATTERN)] = PATTERN
    on_dev = run(isa, body, regs=regs, devices=[probe])
    assert on_ram.finished_body and on_dev.finished_body, (on_ram.final, on_ram.abort, on_dev.final, on_dev.abort)
    assert on_dev.vcpu_stats.hand_decoded > 0 and on_ram.vcpu_stats.hand_decoded == 0
    differ = {r: (hex(on_ram.regs[r]), hex(on_dev.regs[r])) for r in on_ram.regs
              if r != "pc" and not _same(on_ram.regs[r], on_dev.regs[r])}
    assert not differ
    assert on_ram.ram[DATA] == bytes(probe.memory[:len(PATTERN)])


@pytest.mark.parametrize(("isa", "insn", "base", "far", "write"), [
    (A64, (0xA9400801,), DEV + 4, DEV + 4, False),  # ldp x1, x2, [x0]: 8-byte registers at a 4-byte boundary
    (A32, (0xE8800006,), DEV + 2, DEV + 2, True),  # stm r0, {r1, r2}
    (T32, (0xE9D0, 0x2300), DEV + 1, DEV + 1, False),  # ldrd r2, r3, [r0]
], ids=["a64-ldp", "a32-stm", "t32-ldrd"])
def test_case17_18_unaligned_split_with_the_mmu_off_is_an_alignment_fault(isa: str, insn: tuple[int, ...], base: int,
                                                                         far: int, write: bool) -> None:
    from tests.exitpath.test_kvm_faults import expect_alignment_fault  # (it imports this module)

    probe = Probe()
    res = run(isa, code(isa, *insn, MARK[isa]), regs={"x0" if isa == A64 else "r0": base}, devices=[probe])
    expect_alignment_fault(res, pc=body_addr(isa), far=far, write=write)
    assert probe.log == []


def test_case17_split_with_the_mmu_on_uses_physical_addresses_and_reports_virtual_ones() -> None:
    # VA 0x8000_0000 + x maps to PA x (device memory): the parts reach the device at its physical address, and a
    # failing part is reported at its virtual address (FAR).
    alias = 0x8000_0000
    tables = block(0, 0) + block(0x4000_0000, 1) + block(0, 0)
    probe = Probe(fail=refuse_from(0x18))
    probe.memory[:len(PATTERN)] = PATTERN
    # ...MMU on; ldp x1, x2, [x0]; ldp x3, x4, [x0, #16]  (the second one's second register fails)
    res = run(A64, words(*A64_MMU_ON, 0xA9400801, 0xA9411003, MARK[A64]),
              regs={"x0": alias + DEV, "x2": MAIR, "x3": TCR, "x4": TABLES}, devices=[probe], ram={TABLES: tables})
    expect_sea(res, pc=body_addr(A64, 4 * len(A64_MMU_ON) + 4), far=alias + DEV + 0x18)
    assert probe.log == [R(0, 8), R(8, 8), R(0x10, 8), R(0x18, 8)]
    assert (res.regs["x1"], res.regs["x2"]) == (v(0, 8), v(8, 8))
    assert (res.regs["x3"], res.regs["x4"]) == (TCR, TABLES)  # untouched by the failed pair
