"""kvm-mmio.md section 5, when an access cannot complete: cases 21 (hole), 22 (device error), 30 (unaligned)
and 31 (straddling a region).

README.md ("Unaligned accesses and accesses that straddle a region") chooses: inside a region any
alignment goes to the device, which decides; an access that crosses the end of a device region is a bus
error (the device-error policy: a precise external abort by default, or a stop). An access that starts in
RAM and runs into a device or a hole is the same kind of bus error.
"""

from __future__ import annotations

import pytest

from tests.exitpath.harness import (
    A32,
    A64,
    DEV,
    DEV_SIZE,
    HOLE,
    MASK32,
    MASK64,
    RAM_BASE,
    RAM_SIZE,
    T32,
    Access,
    Probe,
    Result,
    body_addr,
    code,
    expect_sea,
    policies,
    refuse_from,
    run,
    words,
)
from tests.exitpath.test_kvm_nisv import A64_MMU_ON, MAIR, TABLES, TCR, block
from vcpu_service.domain import ErrorKind, EventKind

MARK = {A64: 0x91000442, A32: 0xE2822001, T32: 0x3201}  # add x2,x2,#1 / add r2,r2,#1 / adds r2,#1
LOAD_WORD = {A64: (0xB9400001,), A32: (0xE5901000,), T32: (0x6801,)}  # ldr w1,[x0] / ldr r1,[r0] / ldr r1,[r0,#0]
STORE_WORD = {A64: (0xB9000001,), A32: (0xE5801000,), T32: (0x6001,)}  # str w1,[x0] / str r1,[r0] / str r1,[r0,#0]
BASE = {A64: "x0", A32: "r0", T32: "r0"}
RT = {A64: "x1", A32: "r1", T32: "r1"}
RAM_END = RAM_BASE + RAM_SIZE


# ----- case 21: no device at the address ----------------------------------------------------------------

@pytest.mark.parametrize("isa", [A64, A32, T32])
def test_case21_hole_reads_as_zero_and_ignores_writes_by_default(isa: str) -> None:
    body = code(isa, *LOAD_WORD[isa], *STORE_WORD[isa], MARK[isa])
    res = run(isa, body, regs={BASE[isa]: HOLE, RT[isa]: 0x5A5A_5A5A})
    assert res.finished_body
    assert res.regs[RT[isa]] == 0  # read as zero, then the store of 0 is ignored
    assert res.regs["x2" if isa == A64 else "r2"] == 1
    assert [r.outcome for r in res.trace] == ["unmapped (RAZ/WI)"] * 2
    assert res.vcpu_stats.aborts == 0 and res.vcpu_stats.exits == 0


def test_case21_raz_wi_retires_a_writeback_form_completely() -> None:
    res = run(A64, words(0xB8404401), regs={"x0": HOLE, "x1": MASK64})  # ldr w1, [x0], #4
    assert res.finished_body
    assert res.regs["x1"] == 0 and res.regs["x0"] == HOLE + 4


@pytest.mark.parametrize(("isa", "store"), [(A64, False), (A64, True), (A32, False), (T32, False), (T32, True)],
                         ids=["a64-load", "a64-store", "a32-load", "t16-load", "t16-store"])
def test_case21_hole_can_be_an_external_abort(isa: str, store: bool) -> None:
    insn = STORE_WORD[isa] if store else LOAD_WORD[isa]
    res = run(isa, code(isa, *insn, MARK[isa]), regs={BASE[isa]: HOLE + 8, RT[isa]: 0x5A5A_5A5A},
              pol=policies(unmapped="abort"))
    expect_sea(res, pc=body_addr(isa), far=HOLE + 8, write=store)
    assert res.regs[RT[isa]] == 0x5A5A_5A5A and res.regs[BASE[isa]] == HOLE + 8


def test_case21_hole_can_stop_the_vm() -> None:
    res = run(A64, words(0xB9400001), regs={"x0": HOLE, "x1": 3}, pol=policies(unmapped="stop"))
    assert res.final.kind == EventKind.ERROR
    assert res.final.error_kind == ErrorKind.UNMAPPED_ACCESS
    assert res.final.pc == body_addr(A64) and res.final.fault_address == HOLE
    assert f"0x{HOLE:x}" in res.final.reason and "no device" in res.final.reason
    assert res.regs["x1"] == 3 and res.regs["pc"] == body_addr(A64)


# ----- case 22: the device answers with an error ------------------------------------------------------------

REFUSED = DEV + 0x1000  # the Probe refuses every access from here on


@pytest.mark.parametrize(("isa", "insn", "write"), [
    (A64, (0xB9400001,), False),  # ldr w1, [x0]
    (A64, (0xF9000001,), True),  # str x1, [x0]
    (A32, (0xE1D010F0,), False),  # ldrsh r1, [r0]
    (A32, (0xE5801000,), True),  # str r1, [r0]
    (T32, (0x6801,), False),  # ldr r1, [r0, #0]
    (T32, (0x8001,), True),  # strh r1, [r0, #0]
    (T32, (0xF8D0, 0x1000), False),  # ldr.w r1, [r0]
], ids=["a64-ldr", "a64-str", "a32-ldrsh", "a32-str", "t16-ldr", "t16-strh", "t32-ldr.w"])
def test_case22_device_error_is_a_precise_external_abort(isa: str, insn: tuple[int, ...], write: bool) -> None:
    probe = Probe(fail=refuse_from(0x1000))
    res = run(isa, code(isa, *insn, MARK[isa]), regs={BASE[isa]: REFUSED, RT[isa]: 0x5A5A_5A5A}, devices=[probe])
    expect_sea(res, pc=body_addr(isa), far=REFUSED, write=write)
    assert len(probe.log) == 1 and probe.log[0].is_write == write  # the device saw it once, and refused it
    assert res.regs[RT[isa]] == 0x5A5A_5A5A  # no register written
    assert res.regs["x2" if isa == A64 else "r2"] == 0  # nothing after it ran
    assert res.vcpu_stats.reads == 0 and res.vcpu_stats.writes == 0


def test_case22_from_el0_the_abort_is_a_lower_el_one() -> None:
    from tests.exitpath.test_kvm_table import A64_TO_EL0

    probe = Probe(fail=refuse_from(0x1000))
    res = run(A64, words(*A64_TO_EL0, 0xB9500001),  # ...eret to EL0; ldr w1, [x0, #0x1000]
              regs={"x0": DEV, "x1": 9, "sp_el0": 0x4030_0000, "sp": 0x4038_0000}, devices=[probe])
    expect_sea(res, pc=body_addr(A64, 4 * len(A64_TO_EL0)), far=DEV + 0x1000, el0=True)
    assert res.regs["x1"] == 9
    assert res.regs["sp_el0"] == 0x4030_0000 and res.regs["sp"] == 0x4038_0000  # the handler runs on SP_EL1


def test_case22_from_el1_with_sp_el0_uses_the_sp0_vector() -> None:
    probe = Probe(fail=refuse_from(0x1000))
    body = words(
        0xD50040BF,  # msr spsel, #0              (EL1t)
        0xB9500001,  # ldr w1, [x0, #0x1000]
    )
    res = run(A64, body, regs={"x0": DEV, "x1": 9, "sp": 0x4038_0000, "sp_el0": 0x4030_0000}, devices=[probe])
    abort = expect_sea(res, pc=body_addr(A64, 4), far=DEV + 0x1000, vector=0x000)
    assert abort.spsr & 0xF == 0x4  # EL1t
    assert res.regs["sp_el0"] == 0x4030_0000 and res.regs["sp"] == 0x4038_0000


@pytest.mark.parametrize(("isa", "insn"), [(A64, (0xB8404401,)), (A32, (0xE0D010B2,)), (T32, (0xF830, 0x1B02))],
                         ids=["a64-ldr-post", "a32-ldrh-post", "t32-ldrh-post"])
def test_case22_refused_writeback_leaves_the_base_alone(isa: str, insn: tuple[int, ...]) -> None:
    probe = Probe(fail=refuse_from(0x1000))
    res = run(isa, code(isa, *insn), regs={BASE[isa]: REFUSED, RT[isa]: 0x77}, devices=[probe])
    expect_sea(res, pc=body_addr(isa), far=REFUSED)
    assert res.regs[BASE[isa]] == REFUSED and res.regs[RT[isa]] == 0x77  # restartable: nothing retired


def test_case22_a_model_that_raises_is_a_device_error() -> None:
    def explode(_access: Access) -> bool:
        raise RuntimeError("model bug")

    probe = Probe(fail=explode)
    res = run(A64, words(0xB9400001), regs={"x0": DEV, "x1": 1}, devices=[probe])
    expect_sea(res, pc=body_addr(A64), far=DEV)
    assert "RuntimeError: model bug" in res.aborts_events()[0].reason


def test_case22_access_size_the_region_does_not_take() -> None:
    probe = Probe(access_sizes=(4,))
    res = run(A64, words(0x39400001), regs={"x0": DEV, "x1": 1}, devices=[probe])  # ldrb w1, [x0]
    expect_sea(res, pc=body_addr(A64), far=DEV)
    assert probe.log == []  # refused by the vcpu side, from the region's description
    assert "accepts accesses of 4 bytes" in res.aborts_events()[0].reason


def test_case22_device_error_can_stop_the_vm_naming_device_and_address() -> None:
    probe = Probe(fail=refuse_from(0x1000))
    res = run(A64, words(0xB9400001), regs={"x0": REFUSED, "x1": 1}, devices=[probe],
              pol=policies(device_error="stop"))
    assert res.final.kind == EventKind.ERROR
    assert res.final.error_kind == ErrorKind.DEVICE_ERROR
    assert res.final.pc == body_addr(A64) and res.final.fault_address == REFUSED and res.final.device == "dev"
    assert "dev refused the 4-byte read" in res.final.reason and f"0x{REFUSED:x}" in res.final.reason
    assert res.regs["x1"] == 1 and res.regs["pc"] == body_addr(A64)


# ----- case 30: unaligned accesses inside a region -------------------------------------------------------------

def expect_alignment_fault(res: Result, *, pc: int, far: int, write: bool = False) -> None:
    """The guest took an alignment fault on the instruction at ``pc`` (taken from EL1 / SVC mode), not an exit."""
    a = res.abort
    assert res.powered_off and a is not None, (res.final, res.abort)
    if res.isa == A64:
        # EC 0x25 (data abort, same EL), IL=1, ISV=0, WnR, DFSC 0x21 (alignment fault), as QEMU's syndrome.
        assert a.esr == (0x25 << 26) | (1 << 25) | (int(write) << 6) | 0x21, hex(a.esr)
        assert a.elr == pc and a.vector == 0x200, (hex(a.elr), hex(a.vector))
    else:
        assert a.esr == 0x1 | (int(write) << 11), hex(a.esr)  # DFSR, short-descriptor FS 0b00001: alignment
        assert a.elr == pc + 8, hex(a.elr)  # LR_abt
        assert a.spsr & 0x1F == 0x13 and bool(a.spsr & 0x20) == (res.isa == T32), hex(a.spsr)
    assert a.far == far, hex(a.far)
    assert res.aborts_events() == [] and res.vcpu_stats.aborts == 0 and res.vcpu_stats.guest_faults == 1


@pytest.mark.parametrize(("isa", "insn", "offset"), [
    (A64, (0xB9400001,), 1),  # ldr w1, [x0]
    (A64, (0xF9400001,), 3),  # ldr x1, [x0]
    (A32, (0xE5901000,), 1),  # ldr r1, [r0]
    (T32, (0x6801,), 2),  # ldr r1, [r0, #0]
    (T32, (0xF8B0, 0x1000), 1),  # ldrh.w r1, [r0]
], ids=["a64-w+1", "a64-x+3", "a32+1", "t16+2", "t32-ldrh+1"])
def test_case30_unaligned_load_with_the_mmu_off_is_an_alignment_fault(isa: str, insn: tuple[int, ...],
                                                                      offset: int) -> None:
    # With the MMU off every data access is Device-nGnRnE, where an unaligned access takes an alignment fault
    # (DFSC 0x21) before it reaches the bus: the device never sees it, Rt keeps its value.
    probe = Probe()
    probe.memory[:16] = bytes(range(0x10, 0x20))
    res = run(isa, code(isa, *insn, MARK[isa]), regs={BASE[isa]: DEV + offset, RT[isa]: 0x77}, devices=[probe])
    expect_alignment_fault(res, pc=body_addr(isa), far=DEV + offset)
    assert probe.log == [] and res.regs[RT[isa]] == 0x77


def test_case30_unaligned_store_with_the_mmu_off_is_an_alignment_fault() -> None:
    probe = Probe()
    res = run(A64, words(0xB9000001), regs={"x0": DEV + 3, "x1": 0x4433_2211}, devices=[probe])  # str w1, [x0]
    expect_alignment_fault(res, pc=body_addr(A64), far=DEV + 3, write=True)
    assert probe.log == []


@pytest.mark.parametrize(("attr", "kind"), [(0, "device"), (1, "normal")])
def test_case30_unaligned_load_with_the_mmu_on(attr: int, kind: str) -> None:
    # Normal memory: unaligned is architecturally fine. Device memory: the architecture says alignment
    # fault; with the MMU on mmiosplit does not know the memory type (Unicorn does not expose the walk), so it
    # passes the access on (README "Unaligned accesses...").
    probe = Probe()
    probe.memory[:8] = bytes(range(1, 9))
    tables = block(0, attr) + block(0x4000_0000, 1)
    res = run(A64, words(*A64_MMU_ON, 0xB9400001), regs={"x0": DEV + 1, "x2": MAIR, "x3": TCR, "x4": TABLES},
              devices=[probe], ram={TABLES: tables})
    assert res.finished_body, kind
    assert probe.log == [Access(1, 4, False, 0)]
    assert res.regs["x1"] == 0x0504_0302


def test_case30_a_device_that_refuses_a_misaligned_register_access_aborts() -> None:
    # With the MMU on (Normal memory) the access reaches the PL011, which answers only at a register's start:
    # the device decides, the guest gets the abort.
    res = run_mmu_on(0xB9400001, [], regs={"x0": 0x0900_0001, "x1": 1}, specs=["pl011@0x09000000,name=uart0"])
    expect_sea(res, pc=MMU_BODY, far=0x0900_0001)
    assert res.regs["x1"] == 1


# ----- case 31: accesses that straddle the end of a region -----------------------------------------------------

@pytest.mark.parametrize(("isa", "insn", "offset", "write"), [
    (A64, (0xF9400001,), DEV_SIZE - 4, False),  # ldr x1, [x0]
    (A64, (0xF9000001,), DEV_SIZE - 1, True),  # str x1, [x0]
    (A32, (0xE5901000,), DEV_SIZE - 2, False),  # ldr r1, [r0]
    (T32, (0x8801,), DEV_SIZE - 1, False),  # ldrh r1, [r0, #0]
], ids=["a64-ldr-x", "a64-str-x", "a32-ldr", "t16-ldrh"])
def test_case31_straddling_the_end_of_a_device_with_the_mmu_off_is_an_alignment_fault(
        isa: str, insn: tuple[int, ...], offset: int, write: bool) -> None:
    # Such an access is unaligned, and with the MMU off (Device memory) the alignment fault comes first.
    probe = Probe()
    res = run(isa, code(isa, *insn), regs={BASE[isa]: DEV + offset, RT[isa]: 0x77}, devices=[probe])
    expect_alignment_fault(res, pc=body_addr(isa), far=DEV + offset, write=write)
    assert probe.log == [] and res.regs[RT[isa]] == 0x77


def run_mmu_on(insn: int, devices: list[Probe], **kw: object) -> Result:
    """Run one A64 instruction with the MMU on and everything mapped flat as Normal memory (MAIR attr 1), where
    an unaligned access is allowed: what reaches the exit path is the straddle itself."""
    regs = {"x2": MAIR, "x3": TCR, "x4": TABLES, **kw.pop("regs", {})}  # type: ignore[dict-item]
    return run(A64, words(*A64_MMU_ON, insn), regs=regs, devices=devices,
               ram={TABLES: block(0, 1) + block(0x4000_0000, 1)}, **kw)  # type: ignore[arg-type]


MMU_BODY = body_addr(A64, 4 * len(A64_MMU_ON))


@pytest.mark.parametrize(("insn", "offset", "write"), [
    (0xF9400001, DEV_SIZE - 4, False),  # ldr x1, [x0]
    (0xF9000001, DEV_SIZE - 1, True),  # str x1, [x0]
], ids=["a64-ldr-x", "a64-str-x"])
def test_case31_straddling_the_end_of_a_device_is_a_bus_error(insn: int, offset: int, write: bool) -> None:
    probe = Probe()
    res = run_mmu_on(insn, [probe], regs={"x0": DEV + offset, "x1": 0x77})
    expect_sea(res, pc=MMU_BODY, far=DEV + offset, write=write)
    assert probe.log == [] and res.regs["x1"] == 0x77
    assert "straddles the end of dev" in res.aborts_events()[0].reason


def test_case31_straddle_into_a_neighbour_reads_neither_device() -> None:
    a, b = Probe("a", DEV, 0x1000), Probe("b", DEV + 0x1000, 0x1000)
    res = run_mmu_on(0xF9400001, [a, b], regs={"x0": DEV + 0xFFC, "x1": 0x77})
    expect_sea(res, pc=MMU_BODY, far=DEV + 0xFFC)
    assert a.log == [] and b.log == [] and res.regs["x1"] == 0x77


def test_case31_straddle_can_stop_the_vm() -> None:
    probe = Probe()
    res = run_mmu_on(0xF9400001, [probe], regs={"x0": DEV + DEV_SIZE - 4}, pol=policies(device_error="stop"))
    assert res.final.kind == EventKind.ERROR
    assert res.final.error_kind == ErrorKind.DEVICE_ERROR
    assert "straddles the end of dev" in res.final.reason and res.final.device == "dev"
    assert probe.log == []


def test_case31_device_into_ram_is_a_bus_error() -> None:
    low = Probe("low", RAM_BASE - 0x1000, 0x1000)
    res = run_mmu_on(0xF9400001, [low], regs={"x0": RAM_BASE - 4, "x1": 0x77})  # ldr x1, [x0]
    expect_sea(res, pc=MMU_BODY, far=RAM_BASE - 4)
    assert low.log == [] and res.regs["x1"] == 0x77


def test_case31_device_into_ram_with_the_mmu_off_is_an_alignment_fault() -> None:
    low = Probe("low", RAM_BASE - 0x1000, 0x1000)
    res = run(A64, words(0xF9400001), regs={"x0": RAM_BASE - 4, "x1": 0x77}, devices=[low])  # ldr x1, [x0]
    expect_alignment_fault(res, pc=body_addr(A64), far=RAM_BASE - 4)
    assert low.log == [] and res.regs["x1"] == 0x77


@pytest.mark.parametrize(("insn", "start", "write"), [
    (0xF9400001, RAM_END - 4, False),  # ldr x1, [x0]
    (0xB9400001, RAM_END - 1, False),  # ldr w1, [x0]
    (0xF9000001, RAM_END - 4, True),  # str x1, [x0]
    (0x79000001, RAM_END - 1, True),  # strh w1, [x0]
], ids=["ldr-x", "ldr-w", "str-x", "strh"])
@pytest.mark.parametrize("neighbour", ["device", "hole"])
def test_case31_ram_into_a_device_or_a_hole_is_a_bus_error(insn: int, start: int, write: bool,
                                                           neighbour: str) -> None:
    # Unicorn splits such an access at the page boundary and faults on the second part only (a load
    # with its full size at RAM_END, a store byte by byte); the exit path must not forward that as if
    # it were the whole access. The bytes a store put in RAM before the fault are UNKNOWN, as for any
    # aborted store, and not checked.
    high = Probe("high", RAM_END, 0x1000)
    res = run(A64, words(insn, MARK[A64]), regs={"x0": start, "x1": 0x8877_6655_4433_2211},
              devices=[high] if neighbour == "device" else [])
    abort = expect_sea(res, pc=body_addr(A64), far=res.abort.far if res.abort else -1, write=write)
    assert RAM_END <= abort.far < start + 8  # the part that faulted
    assert high.log == []
    assert res.regs["x1"] == 0x8877_6655_4433_2211 and res.regs["x2"] == 0
    assert "starts in RAM" in res.aborts_events()[0].reason


def test_case31_an_access_at_the_base_of_a_device_right_after_ram_is_not_a_straddle() -> None:
    high = Probe("high", RAM_END, 0x1000)
    high.load(0, 0x1122_3344_5566_7788, 8)
    body = words(
        0xF9400001,  # ldr x1, [x0]                 (x0 = RAM_END: the device's first byte)
        0xB9000001,  # str w1, [x0]
        0x91000442,  # add x2, x2, #1
    )
    res = run(A64, body, regs={"x0": RAM_END, "x1": 0}, devices=[high])
    assert res.finished_body
    assert high.log == [Access(0, 8, False, 0), Access(0, 4, True, 0x5566_7788)]
    assert res.regs["x1"] == 0x1122_3344_5566_7788 and res.regs["x2"] == 1


def test_case31_aarch32_ram_into_a_device_is_a_bus_error() -> None:
    high = Probe("high", RAM_END, 0x1000)
    res = run(T32, code(T32, 0xF8D0, 0x1000), regs={"r0": RAM_END - 2, "r1": MASK32}, devices=[high])  # ldr.w r1,[r0]
    expect_sea(res, pc=body_addr(T32), far=RAM_END)
    assert high.log == [] and res.regs["r1"] == MASK32
