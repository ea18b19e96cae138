"""Interrupt latency as ``loadtest --irq`` measures it: the irq-probe raises its line on its own thread, the line
change carries the raise time, and the GIC samples raised -> GICC_IAR and raised -> GICC_EOIR."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from device_service.bus import DeviceBus
from device_service.host import DeviceHost
from device_service.models.irq_probe import ACK, COUNT, DELAY, FIRE, LEVEL, MAX_DELAY_US, IrqProbe
from mmiosplit.mmio import CompletionStatus, LineChange, MmioExit, clock_id
from mmiosplit.v1 import device_pb2
from tests.unit.test_gic import cread, cwrite, enable_all, enable_irq
from vcpu_service import gic as g
from vcpu_service.gic import Gic
from vcpu_service.irq import IrqRouter, Route
from vcpu_service.transport import line_change

BASE = 0x0A00_0000


def write(offset: int, value: int) -> MmioExit:
    return MmioExit(0, BASE + offset, 4, True, value.to_bytes(4, "little"))


def read(offset: int) -> MmioExit:
    return MmioExit(0, BASE + offset, 4, False)


@pytest.fixture
def host() -> DeviceHost:
    return DeviceHost(DeviceBus([IrqProbe("probe", BASE)]), "devs", shadows=False)


def watch(host: DeviceHost) -> list[LineChange]:
    events: list[LineChange] = []
    host.watch(lambda e: events.append(e) if isinstance(e, LineChange) else None)
    return events


def wait_for(events: list[LineChange], n: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while len(events) < n and time.monotonic() < deadline:
        time.sleep(0.001)
    assert len(events) >= n, events


def test_fire_raises_the_line_later_on_the_watch_never_on_the_completion(host: DeviceHost) -> None:
    events = watch(host)  # the first event is the snapshot: low
    session = host.session()
    assert session.exit(write(DELAY, 20_000)).lines == ()
    t0 = time.monotonic_ns()
    done = session.exit(write(FIRE, 1))
    assert done.lines == ()  # not inside the access: it is the device speaking first
    wait_for(events, 2)
    raised = events[-1]
    assert raised.levels == (("probe", 0, True),)
    assert raised.time_ns - t0 >= 20_000_000  # DELAY microseconds after FIRE, stamped when it rose
    assert int.from_bytes(session.exit(read(LEVEL)).data, "little") == 1
    assert int.from_bytes(session.exit(read(COUNT)).data, "little") == 1
    lowered = session.exit(write(ACK, 0))
    assert lowered.lines[0].levels == (("probe", 0, False),)  # the ACK's own change rides on its completion
    assert lowered.lines[0].time_ns >= raised.time_ns


def test_a_fire_while_one_waits_replaces_it_and_reset_cancels(host: DeviceHost) -> None:
    events = watch(host)
    session = host.session()
    session.exit(write(DELAY, 200_000))
    session.exit(write(FIRE, 1))
    session.exit(write(DELAY, 0))
    session.exit(write(FIRE, 1))
    wait_for(events, 2)
    time.sleep(0.3)
    assert len(events) == 2  # one raise, not two
    host.reset()
    session.exit(write(DELAY, 50_000))
    session.exit(write(FIRE, 1))
    host.reset()
    time.sleep(0.1)
    assert [e.levels for e in events[2:]] in ([(("probe", 0, False),)], [])  # lowered by the reset, never raised


@pytest.mark.parametrize(("exit", "message"), [
    (write(DELAY, MAX_DELAY_US + 1), "one second"),
    (MmioExit(0, BASE + FIRE, 2, True, b"\1\0"), "4-byte"),
    (write(0x40, 1), "no register"),
])
def test_bad_accesses_are_refused_by_name(host: DeviceHost, exit: MmioExit, message: str) -> None:
    done = host.session().exit(exit)
    assert done.status is CompletionStatus.DEVICE_ERROR and message in done.error


def test_the_gic_samples_raised_to_acknowledge_and_to_eoi() -> None:
    gic = Gic(1)
    enable_all(gic)
    enable_irq(gic, 44)
    raised = time.monotonic_ns() - 1_000_000  # the device raised it 1 ms ago
    gic.set_spi(12, True, since_ns=raised)
    assert gic.pending_for(0)
    irq = cread(gic, g.GICC_IAR)
    assert irq == 44
    gic.set_spi(12, False)
    gic.set_spi(12, True, since_ns=time.monotonic_ns())  # raised again before the EOI: the first raise counts
    cwrite(gic, g.GICC_EOIR, irq)
    ack, eoi = gic.take_latency()
    assert len(ack) == 1 and len(eoi) == 1
    assert 1_000_000 <= ack[0] <= eoi[0] < 1_000_000_000
    assert gic.take_latency() == (type(ack)("q"), type(eoi)("q"))  # handed over once


def test_an_spi_raised_without_a_time_gives_no_samples() -> None:
    gic = Gic(1)
    enable_all(gic)
    enable_irq(gic, 35)
    gic.set_spi(3, True)
    cwrite(gic, g.GICC_EOIR, cread(gic, g.GICC_IAR))
    assert [len(s) for s in gic.take_latency()] == [0, 0]


def test_an_edge_line_pends_its_spi_with_the_raise_time() -> None:
    gic = Gic(1)
    enable_all(gic)
    enable_irq(gic, 52)
    router = IrqRouter(gic, {("devs", "probe", 0): Route(20, edge=True)})
    router.apply(LineChange("devs", 1, (("probe", 0, True),), time.monotonic_ns()))
    irq = cread(gic, g.GICC_IAR)
    assert irq == 52
    cwrite(gic, g.GICC_EOIR, irq)
    assert [len(s) for s in gic.take_latency()] == [1, 1]


def test_a_line_update_keeps_the_devices_time_only_when_the_clocks_are_shared() -> None:
    update = device_pb2.LineUpdate(generation=3, raised_ns=12345, levels=[device_pb2.LineLevel(device="p", index=0,
                                                                                                level=True)])
    assert line_change("svc", update, same_clock=True).time_ns == 12345
    before = time.monotonic_ns()
    assert line_change("svc", update, same_clock=False).time_ns >= before  # stamped on arrival
    assert clock_id() == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
