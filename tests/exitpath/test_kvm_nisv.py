"""kvm-mmio.md section 5, the accesses without a usable syndrome: cases 14-20.

Writeback forms (14-16) are hand-decoded and emulated completely by default (the base register is
updated once, at completion), or refused like upstream KVM in strict mode. Pairs, vectors, exclusives,
atomics, multiples, duals and PC as Rt (17, 18) follow the NISV policy: a precise external abort with no
device access (default) or a stop. Cache maintenance on a device (19) is a NOP. A page-table walk into
device memory (20) never reaches a device.
"""

from __future__ import annotations

import pytest

from tests.exitpath.harness import (
    A32,
    A64,
    DATA,
    DEV,
    HOLE,
    MASK64,
    T32,
    Access,
    Probe,
    body_addr,
    code,
    expect_sea,
    policies,
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


# ----- cases 17 and 18: no syndrome, not emulated: a precise abort and no device access --------------------

A64_ENABLE_FP = [
    0xD2A00609,  # mov x9, #0x300000
    0xD5181049,  # msr cpacr_el1, x9          (FPEN: SIMD/FP at EL1)
    0xD5033FDF,  # isb
]
A64_NISV = [
    # (id, instruction, is_write, cpu model, name of its class in the report)
    ("ldp", 0xA9400801, False, "", "pair"),  # ldp x1, x2, [x0]
    ("stp", 0xA9000801, True, "", "pair"),  # stp x1, x2, [x0]
    ("ldnp", 0xA8400801, False, "", "pair"),  # ldnp x1, x2, [x0]
    ("ldpsw", 0x69400801, False, "", "pair"),  # ldpsw x1, x2, [x0]
    ("ldr-q0", 0x3DC00000, False, "", "SIMD"),  # ldr q0, [x0]
    ("str-q0", 0x3D800000, True, "", "SIMD"),  # str q0, [x0]
    ("ld1", 0x4C407000, False, "", "SIMD"),  # ld1 {v0.16b}, [x0]
    ("st1", 0x4C007000, True, "", "SIMD"),  # st1 {v0.16b}, [x0]
    ("ldxr", 0xC85F7C01, False, "", "exclusive"),  # ldxr x1, [x0]
    ("ldaxr", 0xC85FFC01, False, "", "exclusive"),  # ldaxr x1, [x0]
    ("ldadd", 0xF8210002, False, "max", "atomic"),  # ldadd x1, x2, [x0]      (ARMv8.1: cpu "max")
    ("swp", 0xF8218002, False, "max", "atomic"),  # swp x1, x2, [x0]
    ("casal", 0xC8E1FC02, False, "max", "compare-and-swap"),  # casal x1, x2, [x0]
]


@pytest.mark.parametrize(("insn", "write", "cpu", "what"), [n[1:] for n in A64_NISV], ids=[n[0] for n in A64_NISV])
def test_case17_a64_no_syndrome_gets_a_precise_abort_and_no_access(insn: int, write: bool, cpu: str,
                                                                  what: str) -> None:
    probe = Probe()
    probe.memory[:16] = bytes(range(16))
    res = run(A64, words(*A64_ENABLE_FP, insn, MARK[A64]), regs={"x0": DEV, "x1": 0x11, "x2": 0x22, "x3": 0x33},
              devices=[probe], cpu_model=cpu)
    # Atomics fault on their read first, so they report WnR=0 (as the architecture allows for a
    # read-modify-write whose read aborts).
    expect_sea(res, pc=body_addr(A64, 12), far=DEV, write=write)
    assert probe.log == [] and probe.memory[:16] == bytes(range(16))
    assert (res.regs["x0"], res.regs["x1"], res.regs["x2"], res.regs["x3"]) == (DEV, 0x11, 0x22, 0x33)
    (entry,) = res.vcpu_stats.kvm_report.values()
    assert not entry.handled and entry.instruction == insn and what in entry.reason


def test_case17_stxr_without_a_reservation_fails_without_any_access() -> None:
    # STXR with no LDXR before it: the exclusive monitor is open, so the store does not happen at all
    # (status 1) and there is nothing to trap, as on hardware.
    probe = Probe()
    res = run(A64, words(0xC8037C01, MARK[A64]), regs={"x0": DEV, "x1": 0x11, "x3": 0x33}, devices=[probe])
    assert res.finished_body
    assert res.regs["x3"] == 1 and probe.log == [] and res.trace == []


def test_case17_nisv_stop_ends_the_run_naming_the_class() -> None:
    probe = Probe()
    res = run(A64, words(0xA9400801), regs={"x0": DEV, "x1": 0x11}, devices=[probe], pol=policies(nisv="stop"))
    assert res.final.kind == EventKind.ERROR
    assert res.final.error_kind == ErrorKind.NISV
    assert res.final.pc == body_addr(A64) and res.final.fault_address == DEV and res.final.instruction == 0xA9400801
    assert "pair" in res.final.reason and "a9400801" in res.final.reason
    assert res.regs["x1"] == 0x11 and res.regs["pc"] == body_addr(A64)
    assert probe.log == []


AARCH32_NISV = [
    # (id, isa, instruction, is_write, address accessed (offset from DEV), class in the report)
    ("a32-ldm", A32, (0xE8900006,), False, 0x0, "multiple"),  # ldm r0, {r1, r2}
    ("a32-push", A32, (0xE92D0006,), True, 0xF8, "multiple"),  # push {r1, r2}          (sp = DEV + 0x100)
    ("a32-ldrd", A32, (0xE1C020D0,), False, 0x0, "dual"),  # ldrd r2, r3, [r0]
    ("a32-ldrex", A32, (0xE1901F9F,), False, 0x0, "exclusive"),  # ldrex r1, [r0]
    ("a32-ldr-pc", A32, (0xE590F000,), False, 0x0, "PC as Rt"),  # ldr pc, [r0]
    ("t16-ldm-wb", T32, (0xC806,), False, 0x0, "multiple"),  # ldmia r0!, {r1, r2}
    ("t16-push", T32, (0xB406,), True, 0xF8, "multiple"),  # push {r1, r2}
    ("t32-ldm", T32, (0xE890, 0x0006), False, 0x0, "multiple"),  # ldmia.w r0, {r1, r2}
    ("t32-ldrd", T32, (0xE9D0, 0x2300), False, 0x0, "dual"),  # ldrd r2, r3, [r0]
    ("t32-ldrex", T32, (0xE850, 0x1F00), False, 0x0, "exclusive"),  # ldrex r1, [r0]
    ("t32-ldr-pc", T32, (0xF8D0, 0xF000), False, 0x0, "PC as Rt"),  # ldr.w pc, [r0]
]


@pytest.mark.parametrize(("isa", "insn", "write", "offset", "what"), [n[1:] for n in AARCH32_NISV],
                         ids=[n[0] for n in AARCH32_NISV])
def test_case18_aarch32_no_syndrome_gets_a_precise_abort_and_no_access(isa: str, insn: tuple[int, ...], write: bool,
                                                                      offset: int, what: str) -> None:
    probe = Probe()
    res = run(isa, code(isa, *insn, MARK[isa]), regs={"r0": DEV, "r1": 0x11, "r2": 0x22, "r3": 0x33,
                                                      "sp": DEV + 0x100}, devices=[probe])
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
