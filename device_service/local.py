"""The local transport: device models called inside the vcpu process, no gRPC.

KVM keeps a few devices in the kernel for speed; this is our equivalent, and the floor every benchmark
compares the gRPC transport against. It is a thin wrapper around the same ``DeviceHost`` the device
service runs, so the models answer exactly as they would remotely, with the same completions and the same
line changes. A model's DMA goes straight to the ``DmaTarget`` the VM hands ``watch`` (the VM's RAM, with the
same window checks as over gRPC). The classes here satisfy the endpoint protocols of ``mmiosplit.mmio``
structurally; nothing here knows the vCPU side.
"""

from __future__ import annotations

import queue
from typing import TYPE_CHECKING

from device_service.bus import DeviceBus
from device_service.host import DeviceHost, HostSession, WatchEvent
from device_service.shadows import ShadowFailure
from mmiosplit.mmio import (
    Completion,
    DmaTarget,
    GoingAway,
    MirrorChange,
    MmioExit,
    PostedQueue,
    RemoteLine,
    RemoteRegion,
    TransportError,
    unpack_posted,
)
from mmiosplit.mmio import WatchEvent as ServiceEvent
from mmiosplit.wire import DEVICE_FEATURES

_NOTHING = Completion()  # a flush with nothing queued, as over gRPC: no request, nothing to report


class LocalExitChannel:
    """One vCPU's session with the host; posted writes are queued and applied in the same batches as the
    gRPC transport sends (a full batch at once, the rest before the next exit or on a flush)."""

    def __init__(self, session: HostSession) -> None:
        self._session = session
        self._posted = PostedQueue()

    def _take_posted(self) -> list[tuple[int, bytes]]:
        return unpack_posted(*self._posted.take())

    def access(self, exit: MmioExit) -> Completion:
        """The queued posted writes, then the access, in one request to the host."""
        return self._session.exit(exit, self._take_posted() if len(self._posted) else None)

    def post(self, address: int, data: bytes) -> Completion | None:
        """Queue a posted write; a full batch is applied at once and its completion returned."""
        if self._posted.add(address, data):
            return self._session.flush(self._take_posted())
        return None

    def flush(self, wait: bool = True) -> Completion:
        """Apply the queued posted writes (they have reached their devices when this returns)."""
        if not len(self._posted):
            return _NOTHING
        return self._session.flush(self._take_posted())

    def pending_posted(self) -> int:
        return len(self._posted)

    def broken(self) -> bool:
        return False

    def close(self) -> None:
        self._posted.take()


class LocalServiceWatch:
    """What a host says unasked (shadow-register values, line levels, going away), queued for one reader thread.
    With ``dma``, the host's models reach guest memory through it, directly, while the watch is open."""

    def __init__(self, endpoint: LocalEndpoint, dma: DmaTarget | None = None) -> None:
        self._name = endpoint.name
        self._gone = False
        self._queue: queue.SimpleQueue[WatchEvent | None] = queue.SimpleQueue()
        self._unsubscribe = endpoint.host.watch(self._queue.put, dma)

    def next(self, timeout: float | None = None) -> ServiceEvent | None:
        """The next event; None once cancelled or gone. TransportError if the values stopped or none came in
        time."""
        if self._gone:
            return None
        try:
            event = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise TransportError(f"{self._name}: no shadow registers within {timeout:g} s") from None
        if isinstance(event, ShadowFailure):
            raise TransportError(f"{self._name}: shadow registers stopped: {event.message}")
        if isinstance(event, GoingAway):
            self._gone = True
        return event

    def cancel(self) -> None:
        self._unsubscribe()
        self._queue.put(None)


class LocalEndpoint:
    """A DeviceBus in this process, shared by every vCPU (the host's lock serialises them).

    ``name`` names it in what it reports (``MirrorChange.service``, ``ShadowChange.service``); ``shadows``
    False declares no shadow registers (every read exits), like ``serve-devices --no-shadows``.
    """

    def __init__(self, bus: DeviceBus, name: str = "local", shadows: bool = True) -> None:
        self.name = name
        self.bus = bus
        self.host = DeviceHost(bus, name, shadows=shadows)
        self.leaving: GoingAway | None = None
        self.same_clock = True  # the same process
        self.instance_id = ""  # it cannot restart without this process
        self.features = frozenset(DEVICE_FEATURES)

    def describe(self) -> list[RemoteRegion]:
        return [region for device in self.host.describe() for region in device.regions]

    def interrupt_lines(self) -> list[RemoteLine]:
        return [RemoteLine(self.name, device.name, spec.index, spec.name, spec.trigger.value, device.type_name,
                           device.compatible)
                for device in self.host.describe() for spec in device.lines]

    def watch(self, vm_id: str, dma: DmaTarget | None = None) -> LocalServiceWatch:
        return LocalServiceWatch(self, dma)

    def open_exit_channel(self, vm_id: str, vcpu_id: int, architecture: str) -> LocalExitChannel:
        return LocalExitChannel(self.host.session())

    def read_mirror(self, vm_id: str, device: str, region: str) -> tuple[list[tuple[int, bytes]], bool]:
        """In this process the devices belong to one VM: ``vm_id`` is not checked."""
        try:
            return self.host.read_mirror(device, region)
        except LookupError as exc:
            raise TransportError(f"{self.name}: {exc.args[0]}") from None

    def reset(self, vm_id: str) -> tuple[MirrorChange, ...]:
        return self.host.reset()

    def console_input(self, device: str, data: bytes) -> None:
        """Type ``data`` on the console of UART ``device`` (what the gRPC Console stream does remotely):
        what the RX FIFO cannot take now waits for the guest to drain it. Shadow watchers hear at once."""
        try:
            self.host.console_input(device, data)
        except LookupError as exc:
            raise TransportError(f"{self.name}: {exc.args[0]}") from None

    def close(self) -> None:
        pass


if TYPE_CHECKING:  # the endpoint protocols are met structurally; mypy checks that here
    from mmiosplit.mmio import DeviceEndpoint, ExitChannel, ServiceWatch

    _endpoint: DeviceEndpoint = LocalEndpoint(DeviceBus([]))
    _channel: ExitChannel = LocalExitChannel(DeviceHost(DeviceBus([])).session())
    _watch: ServiceWatch = LocalServiceWatch(LocalEndpoint(DeviceBus([])))
