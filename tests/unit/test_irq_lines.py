"""Interrupt lines and DMA on the device side: a host collects the changes an access makes into that access's
Completion and publishes the others to its watchers, all ordered by one generation; DMA handles reach the target
a watch grants."""

from __future__ import annotations

import threading
import time

import pytest

from device_service.bus import DeviceBus
from device_service.host import DeviceHost
from device_service.model import DmaError, NoDma
from device_service.models.dma_probe import ADDR_LO, BUF, CMD, DONE, LEN, STATUS, DmaProbe
from device_service.models.pl011 import INT_RX, INT_TX, Pl011
from mmiosplit.mmio import DmaWindow, LineChange, MmioExit

UART, PROBE = 0x0900_0000, 0x0A20_0000
DR, IMSC, ICR = 0x00, 0x38, 0x44


def word(value: int) -> bytes:
    return value.to_bytes(4, "little")


def write(address: int, value: int) -> MmioExit:
    return MmioExit(0, address, 4, True, word(value))


def read(address: int) -> MmioExit:
    return MmioExit(0, address, 4, False)


class Memory:
    """A DmaTarget over a bytearray at ``base``, with one window."""

    def __init__(self, base: int = 0x4000_0000, size: int = 0x1000) -> None:
        self.base = base
        self.mem = bytearray(size)
        self.windows = (DmaWindow("ram", base, size),)
        self.calls: list[tuple[str, str, int]] = []

    def _check(self, device: str, address: int, length: int) -> int:
        if not (self.base <= address and address + length <= self.base + len(self.mem)):
            raise DmaError(f"{device}: 0x{address:x} is outside ram")
        return address - self.base

    def dma_read(self, device: str, address: int, length: int) -> bytes:
        self.calls.append(("read", device, address))
        off = self._check(device, address, length)
        return bytes(self.mem[off:off + length])

    def dma_write(self, device: str, address: int, data: bytes) -> None:
        self.calls.append(("write", device, address))
        off = self._check(device, address, len(data))
        self.mem[off:off + len(data)] = data


@pytest.fixture
def host() -> DeviceHost:
    return DeviceHost(DeviceBus([Pl011("uart0", UART), DmaProbe("dma0", PROBE)]), "devs", shadows=False)


def watch(host: DeviceHost, dma: Memory | None = None) -> list[LineChange]:
    events: list[LineChange] = []
    host.watch(lambda e: events.append(e) if isinstance(e, LineChange) else None, dma)
    return events


def test_describe_lists_each_devices_lines(host: DeviceHost) -> None:
    lines = {d.name: [(s.index, s.name, s.trigger.value) for s in d.lines] for d in host.describe()}
    assert lines == {"uart0": [(0, "uartintr", "level")], "dma0": [(0, "done", "level")]}


def test_a_change_made_by_an_access_rides_on_its_completion_not_the_watch(host: DeviceHost) -> None:
    events = watch(host)
    (snapshot,) = events
    assert snapshot.levels == (("dma0", 0, False), ("uart0", 0, False)) and snapshot.generation == 0
    session = host.session()
    assert session.exit(write(UART + IMSC, INT_TX)).lines == ()  # no change
    done = session.exit(write(UART + DR, ord("a")))  # TX raised, unmasked: the line goes high inside the access
    (change,) = done.lines
    assert change.service == "devs" and change.levels == (("uart0", 0, True),) and change.generation == 1
    assert events == [snapshot]  # the watchers did not hear it
    (low,) = session.exit(write(UART + ICR, INT_TX)).lines
    assert low.levels == (("uart0", 0, False),) and low.generation == 2


def test_a_change_without_an_access_goes_to_the_watchers(host: DeviceHost) -> None:
    events = watch(host)
    host.session().exit(write(UART + IMSC, INT_RX))
    host.console_input("uart0", b"x")
    assert events[-1] == LineChange("devs", 1, (("uart0", 0, True),))
    popped = host.session().exit(read(UART + DR))  # the read drains the FIFO: low, on the completion
    assert popped.data == word(ord("x")) and popped.lines == (LineChange("devs", 2, (("uart0", 0, False),)),)
    assert len(events) == 2


def test_posted_batches_collect_too(host: DeviceHost) -> None:
    session = host.session()
    done = session.flush([(UART + IMSC, word(INT_TX)), (UART + DR, word(ord("a")))])
    assert done.lines == (LineChange("devs", 1, (("uart0", 0, True),)),)


def test_a_change_from_another_thread_during_an_access_is_published_not_collected(host: DeviceHost) -> None:
    """Only the thread answering the access collects; a model's own thread publishes even meanwhile."""
    events = watch(host)
    uart = host.bus.device("uart0")
    assert isinstance(uart, Pl011)
    host.session().exit(write(UART + IMSC, INT_RX))
    host.lines.begin()  # as if this thread were inside an access
    try:
        t = threading.Thread(target=uart.receive, args=(b"z",))
        t.start()
        t.join()
    finally:
        assert host.lines.end() == ()
    assert events[-1].levels == (("uart0", 0, True),)


def test_completion_levels_are_current_as_of_their_generation(host: DeviceHost) -> None:
    """Levels collected for a completion are the lines' levels when the access ends, stamped with the generation
    then: a watch event older than that can never undo them."""
    events = watch(host)
    uart = host.bus.device("uart0")
    session = host.session()
    session.exit(write(UART + IMSC, INT_RX | INT_TX))
    host.lines.begin()
    uart.irq_lines[0].set(True)  # the access raised it (generation 1) ...
    t = threading.Thread(target=uart.irq_lines[0].set, args=(False,))  # ... another thread lowered it (2)
    t.start()
    t.join()
    (collected,) = host.lines.end()
    assert events[-1] == LineChange("devs", 2, (("uart0", 0, False),))
    assert collected == LineChange("devs", 2, (("uart0", 0, False),))  # the level now, not the one it set


def test_dma_handles_follow_the_watch_that_grants_windows(host: DeviceHost) -> None:
    probe = host.bus.device("dma0")
    assert isinstance(probe.dma, NoDma)
    memory = Memory()
    memory.mem[0:4] = b"abcd"
    unsubscribe = host.watch(lambda _e: None, memory)
    session = host.session()
    for address, value in ((PROBE + ADDR_LO, 0x4000_0000), (PROBE + LEN, 4), (PROBE + CMD, 1)):
        session.exit(write(address, value))
    assert session.exit(read(PROBE + STATUS)).data == word(0)
    assert session.exit(read(PROBE + BUF)).data == b"abcd"
    assert memory.calls == [("read", "dma0", 0x4000_0000)]
    unsubscribe()
    assert isinstance(probe.dma, NoDma)
    with pytest.raises(DmaError, match="dma0: DMA read of 4 bytes at 0x40000000 refused: no DMA window"):
        probe.dma.read(0x4000_0000, 4)


def test_a_refused_dma_sets_the_error_status_and_still_raises_done(host: DeviceHost) -> None:
    memory = Memory()
    host.watch(lambda _e: None, memory)
    session = host.session()
    for address, value in ((PROBE + ADDR_LO, 0x5000_0000), (PROBE + LEN, 8)):
        session.exit(write(address, value))
    done = session.exit(write(PROBE + CMD, 2))
    assert done.lines == (LineChange("devs", 1, (("dma0", 0, True),)),)
    assert session.exit(read(PROBE + STATUS)).data == word(2)
    probe = host.bus.device("dma0")
    assert isinstance(probe, DmaProbe) and "0x50000000 is outside ram" in probe.last_error
    (low,) = session.exit(write(PROBE + DONE, 1)).lines
    assert low.levels == (("dma0", 0, False),)


def test_a_dma_on_the_devices_own_thread_raises_the_line_on_the_watch(host: DeviceHost) -> None:
    memory = Memory()
    events = watch(host, memory)
    session = host.session()
    session.exit(write(PROBE + BUF, 0x11223344))
    for address, value in ((PROBE + ADDR_LO, 0x4000_0010), (PROBE + LEN, 4), (PROBE + CMD, 3)):
        assert session.exit(write(address, value)).lines == ()
    deadline = time.monotonic() + 5
    while not (events and events[-1].levels == (("dma0", 0, True),)) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert events[-1].levels == (("dma0", 0, True),)
    assert memory.mem[0x10:0x14] == word(0x11223344)


def test_stream_dma_refuses_the_event_loop_answers_by_id_and_fails_waiters_when_closed() -> None:
    """The gRPC device server's DMA port: a DMA on the loop itself would deadlock, so it is refused at once; from
    another thread the request goes out and the answer with its id comes back; closing fails what still waits."""
    import asyncio

    from device_service.server import StreamDma
    from mmiosplit.v1 import device_pb2

    async def main() -> None:
        loop = asyncio.get_running_loop()
        out: asyncio.Queue[object] = asyncio.Queue()
        dma = StreamDma(loop, out.put_nowait, (DmaWindow("ram", 0x4000_0000, 0x1000),), "VM v")
        with pytest.raises(DmaError, match="dev: DMA read of 4 bytes at 0x40000000 refused: issued on the device "
                                           "service's event loop"):
            dma.dma_read("dev", 0x4000_0000, 4)
        reading = loop.run_in_executor(None, dma.dma_read, "dev", 0x4000_0000, 4)
        request = (await out.get()).request  # type: ignore[attr-defined]
        assert (request.device, request.address, request.length) == ("dev", 0x4000_0000, 4)
        dma.resolve(device_pb2.DmaResult(id=request.id + 100, data=b"????"))  # not ours: dropped
        dma.resolve(device_pb2.DmaResult(id=request.id, data=b"abcd"))
        assert await reading == b"abcd"
        writing = loop.run_in_executor(None, dma.dma_write, "dev", 0x5000_0000, b"x")
        request = (await out.get()).request  # type: ignore[attr-defined]
        dma.resolve(device_pb2.DmaResult(id=request.id, error="dev: refused, outside every window"))
        with pytest.raises(DmaError, match="outside every window"):
            await writing
        waiting = loop.run_in_executor(None, dma.dma_write, "dev", 0x4000_0000, b"y")
        await out.get()
        dma.close("the watch stream of VM v ended")
        with pytest.raises(DmaError, match="DMA failed: the watch stream of VM v ended"):
            await waiting
        with pytest.raises(DmaError, match="dev: DMA write of 1 bytes at 0x40000000 failed: the watch stream"):
            await loop.run_in_executor(None, dma.dma_write, "dev", 0x4000_0000, b"z")

    asyncio.run(main())
