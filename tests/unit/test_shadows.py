"""Shadow registers: the PL011's declarations and side-effect-free peek, the device-side tracker, the vcpu
side's table (the generation rule) and the decoding of what a device service sends. The device host's
part (generations on completions and on the watch) is in test_device_host.py and test_device_local.py."""

from __future__ import annotations

import re

import pytest

from device_service.bus import DeviceBus
from device_service.model import AccessResult, DeviceModel, RegionSpec
from device_service.models.pl011 import FR_RXFE, FR_RXFF, FR_TXFE, INT_RT, INT_RX, PRIMECELL_ID, Pl011
from device_service.shadows import ShadowFailure, ShadowTracker, ShadowValues
from mmiosplit.mmio import RemoteRegion, ShadowChange, TransportError, check_shadow_windows
from mmiosplit.v1 import device_pb2
from vcpu_service.shadows import ShadowTable
from vcpu_service.transport import shadow_change

UART = 0x0900_0000
FR, DR, RIS, MIS, IMSC, ICR, LCR_H = 0x18, 0x00, 0x3C, 0x40, 0x38, 0x44, 0x2C


def word(value: int) -> bytes:
    return value.to_bytes(4, "little")


# ----- the PL011 ----------------------------------------------------------------------------------------------

def test_pl011_declares_fr_and_the_id_registers_but_not_dr_or_icr() -> None:
    (spec,) = Pl011("uart0", UART).regions()
    windows = dict(spec.shadows)
    assert windows[FR] == 4
    assert all(windows[0xFE0 + 4 * i] == 4 for i in range(8))
    assert DR not in windows  # a read pops the RX FIFO
    assert ICR not in windows  # write-only
    assert all(size == 4 for size in windows.values())


def test_pl011_peek_gives_what_a_read_gives() -> None:
    uart = Pl011("uart0", UART)
    uart.write(IMSC, 4, INT_RX | INT_RT)
    uart.receive(b"ab")
    (spec,) = uart.regions()
    for offset, size in spec.shadows:
        assert uart.peek("regs", offset, size) == word(uart.read(offset, size).value), hex(offset)
    assert uart.peek("regs", FR, 4) == word(FR_TXFE | FR_RXFF)  # FIFO off: one character fills it
    assert [uart.peek("regs", 0xFE0 + 4 * i, 4)[0] for i in range(8)] == list(PRIMECELL_ID)


def test_pl011_peek_has_no_side_effects() -> None:
    uart = Pl011("uart0", UART)
    uart.write(LCR_H, 4, 1 << 4)  # FIFO on
    uart.write(IMSC, 4, INT_RT)
    uart.receive(b"xyz")
    before = (list(uart.rx_fifo), dict(uart.regs.values))
    (spec,) = uart.regions()
    for _ in range(3):
        for offset, size in spec.shadows:
            uart.peek("regs", offset, size)
    assert (list(uart.rx_fifo), dict(uart.regs.values)) == before
    assert uart.peek("regs", FR, 4) == word(FR_TXFE)  # data waiting: RXFE clear
    assert uart.peek("regs", MIS, 4) == word(INT_RT)
    assert uart.read(DR, 4).value == ord("x")  # the FIFO still holds everything, in order


@pytest.mark.parametrize(("region", "offset", "size"), [
    ("regs", DR, 4),  # reading it pops the FIFO
    ("regs", ICR, 4),  # write-only
    ("regs", FR, 1),  # only the declared size
    ("regs", 0x19, 4),  # inside FR, not at it
    ("fifo", FR, 4),  # no such region
])
def test_pl011_refuses_to_peek_what_it_did_not_declare(region: str, offset: int, size: int) -> None:
    uart = Pl011("uart0", UART)
    uart.receive(b"q")
    with pytest.raises(ValueError, match=f"uart0: no shadow register of {size} bytes"):
        uart.peek(region, offset, size)
    assert list(uart.rx_fifo) == [ord("q")]


def test_input_tells_the_host_the_shadows_changed() -> None:
    uart = Pl011("uart0", UART)
    seen: list[DeviceModel] = []
    uart.set_shadow_listener(seen.append)
    assert uart.receive(b"a") == 1
    assert seen == [uart]
    assert uart.receive(b"b") == 0  # the FIFO (one deep) is full: nothing changed
    assert seen == [uart]


@pytest.mark.parametrize(("shadows", "needle"), [
    (((0x10, 8),), "the region takes"),
    (((0xFFE, 4),), "outside the region"),
    (((0x10, 4), (0x12, 2)), "overlaps another"),
])
def test_region_spec_refuses_bad_shadow_declarations(shadows: tuple[tuple[int, int], ...], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        RegionSpec("regs", 0, 0x1000, access_sizes=(1, 2, 4), shadows=shadows)


# ----- the device-side tracker ----------------------------------------------------------------------------------

def test_tracker_sends_a_snapshot_then_only_changes_with_rising_generations() -> None:
    uart = Pl011("uart0", UART)
    tracker = ShadowTracker(DeviceBus([uart]))
    events: list[object] = []
    tracker.subscribe(events.append)
    (first,) = events
    assert isinstance(first, ShadowValues) and first.generation == 1
    assert ("uart0", "regs", FR, word(FR_TXFE | FR_RXFE)) in first.values
    tracker.refresh([uart])  # nothing changed: nothing sent
    assert len(events) == 1
    uart.receive(b"k")  # the model reports it; the tracker re-peeks
    second = events[-1]
    assert isinstance(second, ShadowValues) and second.generation == 2
    assert ("uart0", "regs", FR, word(FR_TXFE | FR_RXFF)) in second.values
    assert all(offset in (FR, RIS) for _, _, offset, _ in second.values)  # only what changed
    # An exit stream that was sent generation 1 gets what changed since; one that is current gets nothing.
    since = tracker.since(1)
    assert since is not None and since.generation == 2 and set(since.values) == set(second.values)
    assert tracker.since(2) is None
    everything = tracker.since(0)
    assert everything is not None and len(everything.values) == len(first.values)


def test_tracker_disabled_declares_nothing() -> None:
    uart = Pl011("uart0", UART)
    tracker = ShadowTracker(DeviceBus([uart]), enabled=False)
    assert not tracker.active and tracker.windows("uart0", "regs") == []
    uart.receive(b"k")
    assert tracker.since(0) is None


class BrokenPeek(DeviceModel):
    type_name = "broken"
    compatible = ("test,broken",)

    def __init__(self, name: str = "broken0", base: int = 0x0A00_0000) -> None:
        super().__init__(name, base)
        self.fail = False

    def regions(self) -> list[RegionSpec]:
        return [RegionSpec("regs", 0, 0x100, shadows=((0x10, 4),))]

    def read(self, offset: int, size: int) -> AccessResult:
        return AccessResult.success(0)

    def write(self, offset: int, size: int, value: int) -> AccessResult:
        return AccessResult.success()

    def reset(self) -> None:
        pass

    def peek(self, region: str, offset: int, size: int) -> bytes:
        if self.fail:
            raise RuntimeError("register file on fire")
        return bytes(4)


def test_a_failing_peek_stops_the_tracker_and_tells_subscribers_why() -> None:
    device = BrokenPeek()
    tracker = ShadowTracker(DeviceBus([device]))
    events: list[object] = []
    tracker.subscribe(events.append)
    device.fail = True
    tracker.refresh([device])  # no exception escapes into the service
    failure = events[-1]
    assert isinstance(failure, ShadowFailure)
    assert "broken0: peek of the shadow register at regs+0x10 (4 bytes) failed: RuntimeError: register file on fire" \
        in failure.message
    assert tracker.since(0) is None
    late: list[object] = []
    tracker.subscribe(late.append)
    assert isinstance(late[0], ShadowFailure)


def test_a_model_that_declares_shadows_without_peek_fails_at_start() -> None:
    class NoPeek(BrokenPeek):
        peek = DeviceModel.peek

    with pytest.raises(NotImplementedError, match="broken0: broken declares shadow registers but does not"):
        ShadowTracker(DeviceBus([NoPeek()]))


# ----- the vcpu side's table ------------------------------------------------------------------------------------

def region(service: str = "dev", shadows: frozenset[tuple[int, int]] = frozenset({(FR, 4), (0xFE0, 4)})
           ) -> RemoteRegion:
    return RemoteRegion(service, "uart0", "pl011", "regs", UART, 0x1000, False, False, (1, 2, 4), True,
                        shadows=shadows)


def test_table_serves_exactly_the_declared_size() -> None:
    table = ShadowTable([region()])
    assert table.lookup(UART + FR, 4) is None  # nothing arrived yet: reads exit
    table.apply(ShadowChange("dev", 1, (("uart0", "regs", FR, word(0x90)),)))
    assert table.lookup(UART + FR, 4) == word(0x90)
    assert table.lookup(UART + FR, 1) is None
    assert table.lookup(UART + FR + 4, 4) is None


def test_table_keeps_the_value_of_the_highest_generation() -> None:
    """The watch stream can deliver generation 5 after a completion carried generation 6: 6 stays."""
    table = ShadowTable([region()])
    table.apply(ShadowChange("dev", 6, (("uart0", "regs", FR, word(0x90)),)))
    table.apply(ShadowChange("dev", 5, (("uart0", "regs", FR, word(0x80)), ("uart0", "regs", 0xFE0, word(0x11)))))
    assert table.lookup(UART + FR, 4) == word(0x90)
    assert table.generation(UART + FR) == 6
    assert table.lookup(UART + 0xFE0, 4) == word(0x11)  # no newer value held for this one
    table.apply(ShadowChange("dev", 6, (("uart0", "regs", FR, word(0xC0)),)))  # same generation: same state
    assert table.lookup(UART + FR, 4) == word(0xC0)
    table.apply(ShadowChange("dev", 7, (("uart0", "regs", FR, word(0x90)),)))
    assert table.lookup(UART + FR, 4) == word(0x90) and table.generation(UART + FR) == 7


@pytest.mark.parametrize(("value", "needle"), [
    (("uart0", "regs", 0x1C, word(0)), "sent a shadow value for uart0/regs+0x1c, which is not a shadow register"),
    (("uart1", "regs", FR, word(0)), "sent a shadow value for uart1/regs+0x18"),
    (("uart0", "regs", FR, b"\x90\x00"), "sent 2 bytes for the 4-byte shadow register uart0/regs+0x18"),
])
def test_table_refuses_bad_values_by_name_and_stops_serving_that_service(
        value: tuple[str, str, int, bytes], needle: str) -> None:
    table = ShadowTable([region()])
    table.apply(ShadowChange("dev", 1, (("uart0", "regs", FR, word(0x90)),)))
    with pytest.raises(TransportError, match=re.escape(needle)):
        table.apply(ShadowChange("dev", 2, (("uart0", "regs", 0xFE0, word(0x11)), value)))
    assert table.lookup(UART + FR, 4) is None  # never a stale or wrong answer: reads exit again
    assert table.lookup(UART + 0xFE0, 4) is None  # nothing of the bad update was applied
    table.apply(ShadowChange("dev", 3, (("uart0", "regs", FR, word(0x90)),)))
    assert table.lookup(UART + FR, 4) is None


def test_table_refuses_values_from_a_service_that_declared_none() -> None:
    table = ShadowTable([region()])
    with pytest.raises(TransportError, match="device service other sent a shadow value for uart0/regs"):
        table.apply(ShadowChange("other", 1, (("uart0", "regs", FR, word(0x90)),)))
    table.apply(ShadowChange("dev", 1, (("uart0", "regs", FR, word(0x90)),)))
    assert table.lookup(UART + FR, 4) == word(0x90)


# ----- decoding what a device service sends ---------------------------------------------------------------------

def test_shadow_update_decodes_to_a_shadow_change() -> None:
    update = device_pb2.ShadowUpdate(generation=42, values=[
        device_pb2.ShadowValue(device="uart0", region="regs", offset=FR, data=word(0x90)),
        device_pb2.ShadowValue(device="uart0", region="regs", offset=0xFE0, data=word(0x11)),
    ])
    wire = device_pb2.Completion.FromString(device_pb2.Completion(shadow=update).SerializeToString())
    assert wire.HasField("shadow")
    change = shadow_change("unix:/x", wire.shadow)
    assert change == ShadowChange("unix:/x", 42, (("uart0", "regs", FR, word(0x90)),
                                                  ("uart0", "regs", 0xFE0, word(0x11))))
    assert not device_pb2.Completion().HasField("shadow")


@pytest.mark.parametrize(("windows", "needle"), [
    ([(0x18, 8)], "shadow register at +0x18 (8 bytes): the region takes 1/2/4-byte accesses"),
    ([(0xFFE, 4)], "shadow register at +0xffe (4 bytes) is outside the region's 0x1000 bytes"),
    ([(0x18, 4), (0x1A, 2)], "shadow register at +0x1a (2 bytes) overlaps another shadow register"),
])
def test_describe_refuses_bad_shadow_windows_by_name(windows: list[tuple[int, int]], needle: str) -> None:
    with pytest.raises(ValueError, match=re.escape("device service dev: uart0/regs: " + needle)):
        check_shadow_windows("device service dev: uart0/regs", 0x1000, (1, 2, 4), windows)
    assert check_shadow_windows("dev", 0x1000, (1, 2, 4), [(0x18, 4), (0x1C, 2)]) == {(0x18, 4), (0x1C, 2)}

