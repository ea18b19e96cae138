"""dispatch_posted: a posted batch gets exactly the answers per-write dispatch would give, in order."""

from __future__ import annotations

import random

from device_service.bus import DeviceBus
from device_service.dispatch import dispatch, dispatch_posted
from device_service.models import Pl011, ReadAsZero, Scratch
from mmiosplit.mmio import CompletionStatus, PostedError

SCRATCH, SCRATCH2, UART, ZERO = 0x0A00_0000, 0x0A00_1000, 0x0900_0000, 0x0B00_0000


def _bus() -> DeviceBus:
    return DeviceBus([Scratch("s0", SCRATCH, size=0x100), Scratch("s1", SCRATCH2, size=0x100),
                      Pl011("uart0", UART), ReadAsZero("z", ZERO, size=0x100)])


def _batch(seed: int, n: int) -> list[tuple[int, bytes]]:
    rng = random.Random(seed)
    bases = [SCRATCH, SCRATCH2, UART, ZERO, 0x0C00_0000]  # the last one has no device
    writes = []
    for _ in range(n):
        base = rng.choice(bases[:2]) if rng.random() < 0.8 else rng.choice(bases)
        length = rng.choice((1, 2, 4, 8, 3))  # 3 is not a bus access size
        offset = rng.randrange(0, 0x100)  # some straddle the end of a region
        writes.append((base + offset, rng.randbytes(length)))
    return writes


def test_same_answers_and_state_as_per_write_dispatch() -> None:
    for seed in range(20):
        writes = _batch(seed, 300)
        one, batch = _bus(), _bus()
        expected = []
        for i, (address, data) in enumerate(writes):
            done, _region = dispatch(one, address, len(data), True, data)
            if done.status is not CompletionStatus.OK:
                expected.append(PostedError(i, address, done.error))
        errors, touched = dispatch_posted(batch, writes)
        assert errors == expected
        for name in ("s0", "s1"):
            assert batch.device(name).memory == one.device(name).memory  # type: ignore[attr-defined]
        assert batch.stats.accesses == one.stats.accesses
        assert batch.stats.errors == one.stats.errors
        assert {d.name for d in touched} <= {"s0", "s1", "uart0", "z"}


def test_a_run_of_writes_to_one_region_lands_in_order() -> None:
    bus = _bus()
    writes = [(SCRATCH, bytes([i])) for i in range(256)] + [(SCRATCH + 1, b"\xaa")]
    errors, touched = dispatch_posted(bus, writes)
    assert errors == []
    assert [d.name for d in touched] == ["s0"]
    assert bus.device("s0").memory[:2] == bytes([255, 0xAA])  # type: ignore[attr-defined]
    assert bus.stats.accesses["s0", "mem", "write"] == 257
