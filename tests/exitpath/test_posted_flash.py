"""A flash bank's stores are posted while it is out of array mode, and only then: the command that leaves array
mode exits (the mirror must be unmapped before the next load), every load after it exits and delivers the queue
first, and the command that returns to array mode may wait in the queue because the mirror stays off until the
device says otherwise. A VM of several vCPUs keeps every flash store an exit (another vCPU's load would not
deliver this one's queue)."""

from __future__ import annotations

import pytest

from tests.exitpath.harness import A64, Machine, words

FLASH = "pflash@0x00000000,size=256k,sector=64k,name=flash"
PROGRAM, READ_ARRAY = 0x0040_0040, 0x00FF_00FF  # the command on both interleaved x16 chips
STATUS_READY = 0x0080_0080
VALUE = 0x1234_5678
BODY = words(
    0xB9000001,  # str w1, [x0]   program command: leaves array mode, so it exits
    0xB9000002,  # str w2, [x0]   the data: posted
    0xB9400004,  # ldr w4, [x0]   status: exits, the queue goes first
    0xB9000003,  # str w3, [x0]   read array: posted, the mirror is still off
    0xB9400005,  # ldr w5, [x0]   exits (mirror off), the queue goes first, the device is in array mode again
    0xB9400006,  # ldr w6, [x0]   from the mirror, now on again
)


def _program(vcpus: int, spec: str = FLASH):  # type: ignore[no-untyped-def]
    regs = {"x0": 0x1000, "x1": PROGRAM, "x2": VALUE, "x3": READ_ARRAY}
    with Machine(A64, BODY, regs=regs, devices=[], specs=[spec], vcpus=vcpus, trace=False) as machine:
        machine.start()
        res = machine.result(machine.wait())
        mirror = machine.vm.mirrors[("local", "flash", "flash")]
        return res, mirror.enabled, mirror.block.read(0x1000, 4)


def test_program_and_status_reads_with_the_data_and_the_return_to_array_mode_posted() -> None:
    res, mirror_on, mirrored = _program(1)
    assert res.finished_body
    assert res.regs["x4"] & STATUS_READY == STATUS_READY
    assert res.regs["x5"] == VALUE and res.regs["x6"] == VALUE
    assert mirror_on and mirrored == VALUE.to_bytes(4, "little")
    stats = res.vcpu_stats
    assert stats.posted_writes == 2 and stats.exits == 3, stats


@pytest.mark.parametrize("why", ["two vCPUs", "posted=off"])
def test_every_flash_store_exits_with_two_vcpus_or_posted_off(why: str) -> None:
    res, mirror_on, _ = _program(2, FLASH) if why == "two vCPUs" else _program(1, FLASH + ",posted=off")
    assert res.finished_body
    assert res.regs["x5"] == VALUE and res.regs["x6"] == VALUE and mirror_on
    stats = res.vcpu_stats
    # Three stores and the status read; the read-array store's own completion turned the mirror back on.
    assert stats.posted_writes == 0 and stats.exits == 4 and stats.reads == 1, stats
