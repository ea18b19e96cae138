"""The in-process transport: a LocalEndpoint around a DeviceHost answers exits, posted writes and flushes with
the completions the device service would send, and keeps shadow watchers current."""

from __future__ import annotations

import re
import threading

import pytest

from device_service.bus import DeviceBus
from device_service.local import LocalEndpoint
from device_service.models.pflash import PFlashCfi01
from device_service.models.pl011 import FR_RXFE, FR_RXFF, FR_TXFE, Pl011
from device_service.models.scratch import Scratch
from mmiosplit.mmio import (
    POSTED_BATCH_MAX,
    Completion,
    CompletionStatus,
    LineChange,
    MirrorChange,
    MmioExit,
    ShadowChange,
    TransportError,
)

UART, SCRATCH, FLASH = 0x0900_0000, 0x0A00_0000, 0x0400_0000
DR, FR = 0x00, 0x18
MiB = 1 << 20


def word(value: int) -> bytes:
    return value.to_bytes(4, "little")


def read(address: int, length: int = 4) -> MmioExit:
    return MmioExit(0, address, length, False)


@pytest.fixture
def endpoint() -> LocalEndpoint:
    return LocalEndpoint(DeviceBus([Pl011("uart0", UART), Scratch("s0", SCRATCH, size=0x1000, posted=True),
                                    PFlashCfi01("flash0", FLASH, size=4 * MiB, sector=256 * 1024)]), name="here")


def test_describe_flattens_the_regions_under_the_endpoint_name(endpoint: LocalEndpoint) -> None:
    regions = {r.device: r for r in endpoint.describe()}
    assert set(regions) == {"uart0", "s0", "flash0"}
    assert all(r.service == "here" for r in regions.values())
    assert regions["s0"].posted and regions["flash0"].romd and regions["uart0"].has_console
    assert (FR, 4) in regions["uart0"].shadows


def test_access_answers_as_the_device_service_would(endpoint: LocalEndpoint) -> None:
    channel = endpoint.open_exit_channel("vm", 0, "aarch64")
    assert channel.access(MmioExit(0, SCRATCH, 4, True, b"\x01\x02\x03\x04")).status is CompletionStatus.OK
    assert channel.access(read(SCRATCH + 1, 2)).data == b"\x02\x03"
    assert channel.access(read(0x0C00_0000)).status is CompletionStatus.NO_DEVICE
    assert channel.access(read(SCRATCH + 0xFFE)).status is CompletionStatus.DEVICE_ERROR
    assert not channel.broken()


def test_posted_writes_wait_for_the_next_exit_and_land_before_it_in_order(endpoint: LocalEndpoint) -> None:
    channel = endpoint.open_exit_channel("vm", 0, "aarch64")
    scratch = endpoint.bus.device("s0")
    assert isinstance(scratch, Scratch)
    assert channel.post(SCRATCH, b"\x01") is None
    assert channel.post(SCRATCH, b"\x02") is None
    assert channel.post(0x0C00_0000, b"\x00\x00\x00\x00") is None  # fails, reported later
    assert channel.post(SCRATCH + 1, b"\x03") is None
    assert channel.pending_posted() == 4 and scratch.memory[:2] == b"\0\0"  # nothing applied yet
    done = channel.access(read(SCRATCH, 2))
    assert done.data == b"\x02\x03" and channel.pending_posted() == 0
    (error,) = done.posted_errors
    assert (error.index, error.address) == (2, 0x0C00_0000) and "no device there" in error.error


def test_a_full_batch_is_applied_at_once_and_its_completion_returned(endpoint: LocalEndpoint) -> None:
    channel = endpoint.open_exit_channel("vm", 0, "aarch64")
    scratch = endpoint.bus.device("s0")
    assert isinstance(scratch, Scratch)
    replies = [channel.post(SCRATCH + i % 0x1000, bytes([i & 0xFF])) for i in range(POSTED_BATCH_MAX - 2)]
    replies.append(channel.post(0x0C00_0000, b"\xee"))  # the one failure, at index MAX - 2
    assert all(r is None for r in replies) and channel.pending_posted() == POSTED_BATCH_MAX - 1
    full = channel.post(SCRATCH, b"\xaa")
    assert full is not None and channel.pending_posted() == 0
    assert [(e.index, e.address) for e in full.posted_errors] == [(POSTED_BATCH_MAX - 2, 0x0C00_0000)]
    assert scratch.memory[0] == 0xAA and scratch.memory[1] == 1  # every write landed, the last one last
    assert endpoint.bus.stats.posted_writes == POSTED_BATCH_MAX


def test_flush_applies_what_is_queued_and_an_empty_flush_reports_nothing(endpoint: LocalEndpoint) -> None:
    channel = endpoint.open_exit_channel("vm", 0, "aarch64")
    assert channel.flush() == Completion()  # nothing queued: no request, as over gRPC
    channel.post(SCRATCH + 0x10, b"\x05\x06")
    channel.post(SCRATCH + 0x2000, b"\x07")
    done = channel.flush(wait=False)
    assert channel.pending_posted() == 0
    assert [e.index for e in done.posted_errors] == [1]
    assert channel.access(read(SCRATCH + 0x10, 2)).data == b"\x05\x06"
    channel.post(SCRATCH, b"\x09")
    channel.close()  # dropped, never applied
    assert channel.pending_posted() == 0 and endpoint.bus.device("s0").memory[0] == 0  # type: ignore[attr-defined]


def test_mirror_changes_come_with_completions_and_read_mirror_is_sparse(endpoint: LocalEndpoint) -> None:
    channel = endpoint.open_exit_channel("vm", 0, "aarch64")
    done = channel.access(MmioExit(0, FLASH + 3 * MiB, 4, True, word(0x0040_0040)))  # program: array mode off
    assert done.mirror_changes == (MirrorChange("here", "flash0", "flash", False),)
    channel.access(MmioExit(0, FLASH + 3 * MiB, 4, True, word(0xCAFE)))
    chunks, enabled = endpoint.read_mirror("vm", "flash0", "flash")
    assert not enabled and [offset for offset, _ in chunks] == [0, 3 * MiB]
    assert chunks[1][1][:4] == word(0xCAFE)
    assert endpoint.reset("vm") == (MirrorChange("here", "flash0", "flash", True),)
    assert endpoint.read_mirror("vm", "flash0", "flash")[1]
    with pytest.raises(TransportError, match="here: no ROMD region 'mem' on a device named 's0'"):
        endpoint.read_mirror("vm", "s0", "mem")


def test_completions_carry_what_the_vcpu_was_not_sent_and_the_watch_hears_everything(
        endpoint: LocalEndpoint) -> None:
    watch = endpoint.watch("vm")
    snapshot = watch.next(1.0)
    assert snapshot is not None and snapshot.service == "here" and snapshot.generation == 1
    channel = endpoint.open_exit_channel("vm", 0, "aarch64")
    lines = watch.next(1.0)  # then every interrupt line's level
    assert isinstance(lines, LineChange) and lines.levels == (("uart0", 0, False),)
    endpoint.console_input("uart0", b"hi")  # one fits (FIFO off); the other waits for the guest
    update = watch.next(1.0)
    assert isinstance(update, ShadowChange)
    assert update is not None and ("uart0", "regs", FR, word(FR_TXFE | FR_RXFF)) in update.values
    done = channel.access(read(UART + DR))
    assert done.data == word(ord("h"))
    # The read popped "h" and the waiting "i" came in: FR is unchanged, but this vCPU's first completion
    # brings its copy up to date with everything (it was sent nothing before).
    (change,) = done.shadows
    assert change.service == "here" and ("uart0", "regs", FR, word(FR_TXFE | FR_RXFF)) in change.values
    done = channel.access(read(UART + DR))
    assert done.data == word(ord("i"))
    (change,) = done.shadows
    assert [v for v in change.values if v[2] == FR] == [("uart0", "regs", FR, word(FR_TXFE | FR_RXFE))]
    assert channel.access(read(UART + FR)).shadows == ()  # nothing changed since the last completion
    watch.cancel()
    drained = []
    while (queued := watch.next(1.0)) is not None:  # the reads' updates went to the watcher too
        drained.append(queued)
    assert drained and [g.generation for g in drained] == sorted(g.generation for g in drained)


def test_a_quiet_watch_times_out_with_a_transport_error(endpoint: LocalEndpoint) -> None:
    watch = endpoint.watch("vm")
    assert isinstance(watch.next(1.0), ShadowChange)
    assert isinstance(watch.next(1.0), LineChange)
    with pytest.raises(TransportError, match=re.escape("here: no shadow registers within 0.05 s")):
        watch.next(0.05)


def test_console_input_refuses_what_is_not_a_uart(endpoint: LocalEndpoint) -> None:
    with pytest.raises(TransportError, match="here: no UART named 's0'; consoles: uart0"):
        endpoint.console_input("s0", b"x")


def test_without_shadows_none_are_declared_or_sent() -> None:
    endpoint = LocalEndpoint(DeviceBus([Pl011("uart0", UART)]), shadows=False)
    (described,) = endpoint.describe()
    assert described.shadows == frozenset()
    endpoint.console_input("uart0", b"a")
    assert endpoint.open_exit_channel("vm", 0, "arm").access(read(UART + DR)) == Completion(data=word(ord("a")))


def test_vcpu_threads_share_one_endpoint_without_losing_a_posted_write(endpoint: LocalEndpoint) -> None:
    """Four vCPUs post to their own words and read them back; every write lands, in each vCPU's order."""
    failures: list[str] = []

    def vcpu(index: int) -> None:
        channel = endpoint.open_exit_channel("vm", index, "aarch64")
        base = SCRATCH + 0x100 * index
        for i in range(300):
            channel.post(base, word(i))
            if i % 7 == 6:
                done = channel.access(read(base))
                if done.data != word(i):
                    failures.append(f"vCPU {index}: read {done.data!r} after writing {i}")
        channel.flush()
        if channel.access(read(base)).data != word(299):
            failures.append(f"vCPU {index}: lost the last write")

    threads = [threading.Thread(target=vcpu, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    assert endpoint.bus.stats.posted_writes == 4 * 300
