"""Posted windows: stores to a page-aligned posted region are queued by a write hook without any exit,
while loads of it still exit precisely. The exit trace is off here (a traced VM exits for every store)."""

from __future__ import annotations

import pytest

from tests.exitpath.harness import A32, A64, DEV, Access, Machine, Probe, run, words
from vcpu_service.domain import ErrorKind, EventKind

POSTED = DEV + 0x1000  # Probe(posted_from=0x1000): a whole page, so stores go through the write hook


def _run(isa: str, body: bytes, probe: Probe, regs: dict[str, int]):  # type: ignore[no-untyped-def]
    with Machine(isa, body, regs=regs, devices=[probe], trace=False) as machine:
        # AArch32 keeps an exit per posted store (Unicorn mishandles write hooks in Thumb IT blocks); the
        # A32 cases here check that both ways give the same result.
        assert [r.name for r, _sink in machine.vm.posted_windows] == (["posted"] if isa == A64 else [])
        machine.start()
        return machine.result(machine.wait())


@pytest.mark.parametrize("isa", [A64, A32])
def test_stores_are_posted_in_order_and_loads_still_exit(isa: str) -> None:
    body = {
        A64: words(0xB9000061, 0xB9000462, 0x39002064, 0xB9400006, 0xB9401067),  # str,str,strb; ldr [x0]; ldr [x3,#16]
        A32: words(0xE5831000, 0xE5832004, 0xE5C34008, 0xE5906000, 0xE5937010),
    }[isa]
    probe = Probe(posted_from=0x1000)
    probe.load(0, 0xABCD, 4)
    probe.load(0x1010, 0x1234_5678, 4)  # never stored to: a load served from the sink would read 0
    x = "x" if isa == A64 else "r"
    res = _run(isa, body, probe, {f"{x}0": DEV, f"{x}3": POSTED, f"{x}1": 0x11, f"{x}2": 0x22, f"{x}4": 0x44})
    assert res.finished_body
    assert probe.log == [Access(0x1000, 4, True, 0x11), Access(0x1004, 4, True, 0x22), Access(0x1008, 1, True, 0x44),
                         Access(0, 4, False, 0), Access(0x1010, 4, False, 0)]
    assert res.regs[f"{x}6"] == 0xABCD and res.regs[f"{x}7"] == 0x1234_5678
    stats = res.vcpu_stats
    assert stats.posted_writes == 3 and stats.reads == 2 and stats.exits == 2


def test_a64_store_pair_is_two_posted_writes() -> None:
    # stp x1, x2, [x3, #16]: no syndrome (KVM could not handle it as an exit), but no exit is taken here
    res = _run(A64, words(0xA9010861, 0xB9400006), probe := Probe(posted_from=0x1000),
               {"x0": DEV, "x3": POSTED, "x1": 0x1111_2222_3333_4444, "x2": 0x5555_6666_7777_8888})
    assert res.finished_body
    assert probe.log[:2] == [Access(0x1010, 8, True, 0x1111_2222_3333_4444),
                             Access(0x1018, 8, True, 0x5555_6666_7777_8888)]


def test_a32_posted_stores_follow_setend_without_an_exit_between() -> None:
    body = words(
        0xF1010200,  # setend be
        0xE5831000,  # str  r1, [r3]      (big-endian bytes)
        0xE1C320B4,  # strh r2, [r3, #4]  (big-endian bytes)
        0xF1010000,  # setend le
        0xE5831008,  # str  r1, [r3, #8]  (little-endian again)
        0xE5906000,  # ldr  r6, [r0]      (an exit: the batch goes out before it)
    )
    probe = Probe(posted_from=0x1000)
    res = _run(A32, body, probe, {"r0": DEV, "r3": POSTED, "r1": 0x1122_3344, "r2": 0xAABB})
    assert res.finished_body
    assert probe.log[:3] == [Access(0x1000, 4, True, 0x4433_2211), Access(0x1004, 2, True, 0xBBAA),
                             Access(0x1008, 4, True, 0x1122_3344)]


def test_a64_loop_of_thousands_of_posted_stores_arrives_whole_and_in_order() -> None:
    n = 3000
    body = words(
        0xD2800009 | (n << 5),  # movz x9, #n
        0xB9000069,  # 1: str w9, [x3]
        0xF1000529,  # subs x9, x9, #1
        0x54FFFFC1,  # b.ne 1b
        0xB9400006,  # ldr w6, [x0]
    )
    probe = Probe(posted_from=0x1000)
    res = _run(A64, body, probe, {"x0": DEV, "x3": POSTED})
    assert res.finished_body
    writes = [a.value for a in probe.log if a.is_write]
    assert writes == list(range(n, 0, -1))
    assert res.vcpu_stats.posted_writes == n and res.vcpu_stats.posted_batches >= 3  # full batches hold 1024


def test_a_posted_store_of_a_size_the_region_refuses_ends_the_run_naming_it() -> None:
    probe = Probe(posted_from=0x1000, access_sizes=(4,))
    with Machine(A64, words(0x39000061, 0xB9400006), regs={"x0": DEV, "x3": POSTED, "x1": 7}, devices=[probe],
                 trace=False) as machine:
        machine.start()
        final = machine.wait()
    assert final.kind == EventKind.ERROR
    assert final.error_kind == ErrorKind.DEVICE_ERROR
    assert "posted 1-byte write to 0xa001000" in final.reason and "dev" in final.reason and "SError" in final.reason
    assert probe.log == []


def test_traced_or_strict_vms_keep_an_exit_for_every_store() -> None:
    for kw in ({"trace": True}, {"trace": False, "strict_kvm": True}):
        with Machine(A64, words(0xB9000061), devices=[Probe(posted_from=0x1000)], **kw) as machine:  # type: ignore[arg-type]
            assert machine.vm.posted_windows == []
    res = run(A64, words(0xB9000061), regs={"x3": POSTED, "x1": 5}, devices=[probe := Probe(posted_from=0x1000)])
    assert [r.outcome for r in res.trace] == ["posted"] and probe.log == [Access(0x1000, 4, True, 5)]


def test_pauses_and_flush_kicks_in_a_posting_loop_neither_lose_nor_repeat_a_write() -> None:
    # Unicorn resumes at a store whose write hook already ran when it is stopped right after it; kicks on a
    # vCPU with posted windows are taken inside the hook, before the write is queued.
    n = 40000
    body = words(0xD2800009 | (n << 5), 0xB9000069, 0xF1000529, 0x54FFFFC1, 0xB9400006)
    probe = Probe(posted_from=0x1000)
    with Machine(A64, body, regs={"x0": DEV, "x3": POSTED}, devices=[probe], trace=False) as machine:
        machine.start()
        for _ in range(20):
            machine.vm.pause()
            machine.vm.resume()
        final = machine.wait(60)
    assert final.kind == EventKind.POWERED_OFF
    writes = [a.value for a in probe.log if a.is_write]
    assert writes == list(range(n, 0, -1))


def test_a64_posted_stores_follow_sctlr_ee_written_by_msr() -> None:
    # The endianness behind posted stores is cached per vCPU and dropped by any MSR: EE set mid-stream.
    body = words(
        0xB9000061,  # str  w1, [x3]          (little-endian: SCTLR_EL1 read and cached)
        0xD5381009,  # mrs  x9, sctlr_el1
        0xB2670129,  # orr  x9, x9, #0x2000000 (EE)
        0xD5181009,  # msr  sctlr_el1, x9
        0xD5033FDF,  # isb
        0xB9000461,  # str  w1, [x3, #4]      (big-endian now)
        0x79001062,  # strh w2, [x3, #8]      (big-endian)
        0x39003062,  # strb w2, [x3, #12]     (a byte has no order)
        0xB9400006,  # ldr  w6, [x0]          (an exit: the batch goes out before it)
    )
    probe = Probe(posted_from=0x1000)
    res = _run(A64, body, probe, {"x0": DEV, "x3": POSTED, "x1": 0x1122_3344, "x2": 0xAABB})
    assert res.finished_body
    assert probe.log[:4] == [Access(0x1000, 4, True, 0x1122_3344), Access(0x1004, 4, True, 0x4433_2211),
                             Access(0x1008, 2, True, 0xBBAA), Access(0x100C, 1, True, 0xBB)]
