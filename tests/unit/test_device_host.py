"""The device host both transports wrap: accesses, posted batches, ROMD mirrors, shadow generations, consoles,
reset and the description, as a session (one vCPU's exit stream) sees them."""

from __future__ import annotations

import threading
import time

import pytest

from device_service.bus import DeviceBus
from device_service.host import MIRROR_CHUNK, DeviceHost
from device_service.model import AccessResult, DeviceModel, RegionSpec
from device_service.models.pflash import PFlashCfi01
from device_service.models.pl011 import FR_RXFE, FR_RXFF, FR_TXFE, LCR_H_FEN, Pl011
from device_service.models.scratch import Scratch
from device_service.shadows import ShadowFailure
from mmiosplit.mmio import (
    Completion,
    CompletionStatus,
    GoingAway,
    LineChange,
    MirrorChange,
    MmioExit,
    PostedError,
    ShadowChange,
)

UART, SCRATCH, FLASH = 0x0900_0000, 0x0A00_0000, 0x0400_0000
DR, FR, LCR_H = 0x00, 0x18, 0x2C
MiB = 1 << 20


def word(value: int) -> bytes:
    return value.to_bytes(4, "little")


def read(address: int, length: int = 4) -> MmioExit:
    return MmioExit(0, address, length, False)


def write(address: int, data: bytes) -> MmioExit:
    return MmioExit(0, address, len(data), True, data)


def flash_command(byte: int) -> bytes:
    return word(byte | byte << 16)  # one byte per x16 chip, as U-Boot writes a command


@pytest.fixture
def host() -> DeviceHost:
    return DeviceHost(DeviceBus([Pl011("uart0", UART), Scratch("s0", SCRATCH, size=0x100),
                                 PFlashCfi01("flash0", FLASH, size=4 * MiB, sector=256 * 1024)]), "devs")


def fr(change: ShadowChange) -> bytes | None:
    """FR's value in a shadow change, if it carries one."""
    return next((data for device, _, offset, data in change.values if device == "uart0" and offset == FR), None)


# ----- accesses and posted writes ---------------------------------------------------------------------------------

def test_an_access_completes_with_its_status_and_data(host: DeviceHost) -> None:
    session = host.session()
    first = session.exit(write(SCRATCH + 8, b"\x11\x22\x33\x44"))
    assert first.status is CompletionStatus.OK and first.shadows  # a session's first completion: the snapshot
    assert session.exit(read(SCRATCH + 8)) == Completion(data=b"\x11\x22\x33\x44")
    assert session.exit(read(SCRATCH + 9, 2)).data == b"\x22\x33"
    nothing = session.exit(read(0x0C00_0000))
    assert nothing.status is CompletionStatus.NO_DEVICE and "no device there" in nothing.error
    straddle = session.exit(read(SCRATCH + 0xFE))
    assert straddle.status is CompletionStatus.DEVICE_ERROR and "straddles the end of s0.mem" in straddle.error
    bad = session.exit(MmioExit(0, SCRATCH, 3, False))
    assert bad.status is CompletionStatus.BAD_REQUEST and "access length 3" in bad.error
    assert host.bus.stats.accesses["s0", "mem", "read"] == 4


def test_posted_writes_land_in_order_before_the_exit_and_failures_name_index_and_address(host: DeviceHost) -> None:
    session = host.session()
    session.flush([])  # the snapshot of the shadow registers
    posted = [(SCRATCH, b"\x01"), (SCRATCH, b"\x02"), (0x0C00_0000, b"\xff\xff\xff\xff"), (SCRATCH + 1, b"\x03"),
              (SCRATCH + 0xFF, b"\x00\x00")]
    done = session.exit(read(SCRATCH, 2), posted)
    assert done.status is CompletionStatus.OK and done.data == b"\x02\x03"  # the exit saw every write before it
    assert [(e.index, e.address) for e in done.posted_errors] == [(2, 0x0C00_0000), (4, SCRATCH + 0xFF)]
    assert str(done.posted_errors[0]).startswith("posted write to 0xc000000: ")
    assert host.bus.stats.posted_writes == 5
    flushed = session.flush([(SCRATCH + 4, b"\xaa\xbb"), (SCRATCH + 5, b"\xcc")])
    assert flushed == Completion()  # a batch that all landed reports nothing
    assert session.exit(read(SCRATCH + 4, 2)).data == b"\xaa\xcc"
    assert host.bus.stats.posted_batches.snapshot().count == 3


def test_a_bad_request_still_carries_what_the_stream_was_not_sent(host: DeviceHost) -> None:
    session = host.session()
    session.exit(read(SCRATCH))  # the vCPU is current
    host.console_input("uart0", b"q")
    refused = session.bad_request("sequence number 7, expected 6")
    assert refused.status is CompletionStatus.BAD_REQUEST and refused.error == "sequence number 7, expected 6"
    (change,) = refused.shadows
    assert fr(change) == word(FR_TXFE | FR_RXFF)


# ----- ROMD mirrors -------------------------------------------------------------------------------------------------

def test_mirror_changes_ride_on_the_completion_that_caused_them_and_the_mode_is_remembered(host: DeviceHost) -> None:
    session = host.session()
    chunks, enabled = host.read_mirror("flash0", "flash")
    assert enabled and chunks == [(0, bytes(MIRROR_CHUNK))]  # an empty flash: the first chunk only
    program = session.exit(write(FLASH + 2 * MiB, flash_command(0x40)))
    assert program.mirror_changes == (MirrorChange("devs", "flash0", "flash", False),)  # reads must trap now
    data = session.exit(write(FLASH + 2 * MiB, word(0x12345678)))
    (change,) = data.mirror_changes
    assert not change.enabled and change.patches == ((2 * MiB, word(0x12345678)),)
    assert session.exit(read(SCRATCH)).mirror_changes == ()  # reported once
    chunks, enabled = host.read_mirror("flash0", "flash")
    assert not enabled  # a mirror built now starts trapping
    assert [offset for offset, _ in chunks] == [0, 2 * MiB]  # the zero chunks between are left out
    assert chunks[1][1][:4] == word(0x12345678) and len(chunks[1][1]) == MIRROR_CHUNK
    back = session.exit(write(FLASH, flash_command(0xFF)))
    assert back.mirror_changes == (MirrorChange("devs", "flash0", "flash", True),)
    assert host.read_mirror("flash0", "flash")[1]


def test_reset_reports_the_mirrors_back_in_array_mode(host: DeviceHost) -> None:
    host.session().exit(write(FLASH, flash_command(0x90)))  # read ID: trapping
    assert not host.read_mirror("flash0", "flash")[1]
    assert host.reset() == (MirrorChange("devs", "flash0", "flash", True),)
    assert host.read_mirror("flash0", "flash")[1]
    assert host.reset() == ()


def test_read_mirror_refuses_what_is_not_a_romd_region(host: DeviceHost) -> None:
    with pytest.raises(LookupError, match="no ROMD region 'mem' on a device named 's0'"):
        host.read_mirror("s0", "mem")
    with pytest.raises(LookupError, match="no ROMD region 'flash' on a device named 'nope'"):
        host.read_mirror("nope", "flash")


# ----- shadow registers ---------------------------------------------------------------------------------------------

def test_each_session_is_sent_every_shadow_change_once_with_rising_generations(host: DeviceHost) -> None:
    one, two = host.session(), host.session()
    first = one.exit(read(SCRATCH))
    (snapshot,) = first.shadows  # sent nothing before: everything, as of now
    assert snapshot.service == "devs" and fr(snapshot) == word(FR_TXFE | FR_RXFE)
    assert one.exit(read(SCRATCH)).shadows == ()  # nothing changed since
    host.console_input("uart0", b"k")
    (change,) = one.exit(read(SCRATCH)).shadows
    assert change.generation > snapshot.generation and fr(change) == word(FR_TXFE | FR_RXFF)
    assert len(change.values) < len(snapshot.values)  # only what changed
    (caught_up,) = two.flush([]).shadows  # the other vCPU gets everything it has not seen, once
    assert caught_up.generation == change.generation and fr(caught_up) == word(FR_TXFE | FR_RXFF)
    assert two.flush([]).shadows == ()
    # The access itself changes FR (the read pops the byte): the completion brings the new value.
    popped = one.exit(read(UART + DR))
    assert popped.data == word(ord("k"))
    (after,) = popped.shadows
    assert after.generation > change.generation and fr(after) == word(FR_TXFE | FR_RXFE)


def test_the_watch_gets_a_snapshot_then_each_change_as_shadow_changes(host: DeviceHost) -> None:
    events: list[ShadowChange | ShadowFailure] = []
    unsubscribe = host.watch(lambda e: None if isinstance(e, LineChange) else events.append(e))  # lines: below
    (snapshot,) = events
    assert isinstance(snapshot, ShadowChange) and snapshot.service == "devs" and snapshot.generation == 1
    host.console_input("uart0", b"z")
    change = events[-1]
    assert isinstance(change, ShadowChange) and change.generation == 2 and fr(change) == word(FR_TXFE | FR_RXFF)
    host.session().exit(read(UART + DR))  # a guest access changes it too
    latest = events[-1]
    assert isinstance(latest, ShadowChange) and latest.generation == 3 and fr(latest) == word(FR_TXFE | FR_RXFE)
    unsubscribe()
    host.console_input("uart0", b"y")
    assert events[-1] is latest


def test_going_away_is_heard_once_by_every_watch_and_accesses_are_still_answered(host: DeviceHost) -> None:
    first: list[object] = []
    second: list[object] = []
    host.watch(first.append)
    host.watch(second.append)
    going = host.go_away("device service devs is shutting down (SIGTERM)", 10.0)
    assert going == GoingAway("devs", "device service devs is shutting down (SIGTERM)", 10.0)
    assert first[-1] == going and second[-1] == going
    assert host.go_away("again", 1.0) == going and first.count(going) == 1  # once
    host.console_input("uart0", b"z")  # a change after going away reaches nobody
    assert first[-1] == going
    late: list[object] = []
    host.watch(late.append)  # a watch that starts while draining hears only that
    assert late == [going]
    session = host.session()  # what a vCPU sent before it heard is still answered
    assert session.exit(write(SCRATCH, b"\x01\x02\x03\x04")).status is CompletionStatus.OK
    assert session.exit(read(SCRATCH)).data == b"\x01\x02\x03\x04"


def test_without_shadows_nothing_is_declared_or_sent() -> None:
    host = DeviceHost(DeviceBus([Pl011("uart0", UART)]), "devs", shadows=False)
    (device,) = host.describe()
    assert device.regions[0].shadows == frozenset()
    host.console_input("uart0", b"a")
    assert host.session().exit(read(UART + DR)) == Completion(data=word(ord("a")))


# ----- consoles -----------------------------------------------------------------------------------------------------

def test_console_input_is_pumped_in_as_the_guest_drains_the_fifo(host: DeviceHost) -> None:
    uart = host.bus.device("uart0")
    assert isinstance(uart, Pl011)
    session = host.session()
    host.console_input("uart0", b"abc")  # the FIFO is off: one character fits, the rest waits
    assert list(uart.rx_fifo) == [ord("a")]
    assert [session.exit(read(UART + DR)).data for _ in range(3)] == [word(ord(c)) for c in "abc"]
    assert session.exit(read(UART + DR)).data == word(0)
    assert host.consoles["uart0"].bytes_in == 3


def test_console_input_is_pumped_in_after_a_posted_batch_too(host: DeviceHost) -> None:
    uart = host.bus.device("uart0")
    assert isinstance(uart, Pl011)
    session = host.session()
    session.flush([])  # the snapshot of the shadow registers
    # A batch's own changes come back on its completion (LCR_H is a shadow register too).
    (change,) = session.flush([(UART + LCR_H, word(0x60))]).shadows
    assert change.values == (("uart0", "regs", LCR_H, word(0x60)),)
    host.console_input("uart0", b"xyz")
    # Turning the FIFO on empties it (the "x" is lost, as on the hardware); the waiting "yz" then fit.
    session.flush([(UART + LCR_H, word(0x60 | LCR_H_FEN))])
    assert bytes(uart.rx_fifo) == b"yz"


def test_reset_pumps_waiting_input_into_the_emptied_fifo_and_watchers_hear_it(host: DeviceHost) -> None:
    uart = host.bus.device("uart0")
    assert isinstance(uart, Pl011)
    host.console_input("uart0", b"rs")
    events: list[ShadowChange | ShadowFailure] = []
    host.watch(events.append)
    host.reset()
    assert bytes(uart.rx_fifo) == b"s"  # "r" was reset away, "s" was waiting and went in
    assert host.reset() == ()
    assert bytes(uart.rx_fifo) == b""  # nothing waited any more
    last = events[-1]
    assert isinstance(last, ShadowChange) and fr(last) == word(FR_TXFE | FR_RXFE)


def test_console_output_keeps_a_backlog_for_the_first_listener(host: DeviceHost) -> None:
    session = host.session()
    session.exit(write(UART + DR, b"h\0\0\0"))
    heard: list[bytes] = []
    detach = host.attach_console("uart0", heard.append)
    session.exit(write(UART + DR, b"i\0\0\0"))
    assert heard == [b"h", b"i"]
    detach()
    session.exit(write(UART + DR, b"!\0\0\0"))
    assert heard == [b"h", b"i"] and host.consoles["uart0"].bytes_out == 3
    with pytest.raises(LookupError, match="no UART named 's0'; consoles: uart0"):
        host.console_input("s0", b"x")


# ----- the description ----------------------------------------------------------------------------------------------

def test_describe_gives_every_device_and_its_regions_as_a_vcpu_service_maps_them(host: DeviceHost) -> None:
    uart, scratch, flash = host.describe()
    assert (uart.name, uart.type_name, uart.has_console) == ("uart0", "pl011", True)
    assert uart.compatible == ("arm,pl011", "arm,primecell") and uart.properties == {"fifo-depth": "32"}
    (regs,) = uart.regions
    assert (regs.service, regs.device, regs.name, regs.base, regs.size) == ("devs", "uart0", "regs", UART, 0x1000)
    assert (FR, 4) in regs.shadows and (DR, 4) not in regs.shadows and regs.has_console
    (mem,) = scratch.regions
    assert not mem.romd and not mem.has_console and mem.access_sizes == (1, 2, 4, 8)
    (array,) = flash.regions
    assert array.romd and array.size == 4 * MiB and array.base == FLASH


# ----- several vCPU threads -----------------------------------------------------------------------------------------

class Recorder(DeviceModel):
    """Notes whether any other access was in the host while it answered one."""

    type_name = "recorder"
    compatible = ("test,recorder",)
    inside = 0
    overlaps = 0

    def regions(self) -> list[RegionSpec]:
        return [RegionSpec("regs", 0, 0x10)]

    def read(self, offset: int, size: int) -> AccessResult:
        cls = type(self)
        cls.inside += 1
        if cls.inside > 1:
            cls.overlaps += 1
        time.sleep(0.0005)
        cls.inside -= 1
        return AccessResult.success(offset)

    def write(self, offset: int, size: int, value: int) -> AccessResult:
        return AccessResult.success()

    def reset(self) -> None:
        pass


def test_the_host_serialises_sessions_on_several_threads() -> None:
    """Two devices have two model locks; the host's lock still lets only one access in at a time."""
    host = DeviceHost(DeviceBus([Recorder("a", 0x1000), Recorder("b", 0x2000)]), "devs")
    errors: list[Completion] = []

    def vcpu(base: int) -> None:
        session = host.session()
        for _ in range(40):
            done = session.exit(read(base + 4))
            if done.data != word(4):
                errors.append(done)

    threads = [threading.Thread(target=vcpu, args=(base,)) for base in (0x1000, 0x2000, 0x1000, 0x2000)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and Recorder.overlaps == 0


def test_a_posted_error_reads_as_the_sentence_a_user_sees() -> None:
    assert str(PostedError(3, 0x0900_0000, "uart0 at 0x9000000: no such register")) == \
        "posted write to 0x9000000: uart0 at 0x9000000: no such register"
