"""The local transport: device models called inside the vcpu process, no gRPC.

KVM keeps a few devices in the kernel for speed; this is our equivalent, and the floor every
benchmark compares the gRPC transport against. The models are the same classes the device service
hosts, reached through the same ``dispatch``, so they answer exactly as they would remotely.
"""

from __future__ import annotations

import queue
import threading

from device_service.bus import DeviceBus
from device_service.dispatch import BusReply, Outcome, dispatch, dispatch_posted
from device_service.model import DeviceModel, RegionKind, supports_console, supports_romd
from device_service.shadows import ShadowEvent, ShadowFailure, ShadowTracker, ShadowValues
from mmiosplit.mmio import (
    POSTED_BATCH_MAX,
    Completion,
    CompletionStatus,
    ExitChannel,
    MirrorChange,
    MmioExit,
    RemoteRegion,
    ShadowChange,
    ShadowWatch,
    TransportError,
)

_STATUS = {
    Outcome.OK: CompletionStatus.OK,
    Outcome.DEVICE_ERROR: CompletionStatus.DEVICE_ERROR,
    Outcome.NO_DEVICE: CompletionStatus.NO_DEVICE,
    Outcome.BAD_REQUEST: CompletionStatus.BAD_REQUEST,
}


class LocalExitChannel:
    """Calls the bus directly; posted writes are queued and applied in order like the remote ones."""

    def __init__(self, endpoint: LocalEndpoint) -> None:
        self._endpoint = endpoint
        self._posted: list[tuple[int, bytes]] = []
        self._touched: set[DeviceModel] = set()
        self._shadows_seen = 0  # the shadow generation this vCPU has been given up to

    def _dispatch(self, address: int, length: int, is_write: bool, data: bytes) -> BusReply:
        reply = self._endpoint.dispatch(address, length, is_write, data)
        if reply.region is not None:
            self._touched.add(reply.region.device)
        return reply

    def _apply_posted(self) -> tuple[str, ...]:
        failed, touched = self._endpoint.dispatch_posted(self._posted)
        self._touched |= touched
        self._posted.clear()
        return tuple(f"posted write to 0x{address:x}: {error}" for _index, address, error in failed)

    def _shadow(self) -> ShadowChange | None:
        """What the accesses changed, and anything else this vCPU was not given yet (lock held)."""
        tracker = self._endpoint.tracker
        if not tracker.active:
            return None
        tracker.refresh(self._touched)
        self._touched.clear()
        update = tracker.since(self._shadows_seen)
        if update is None:
            return None
        self._shadows_seen = update.generation
        return self._endpoint.shadow_change(update)

    def access(self, request: MmioExit) -> Completion:
        with self._endpoint.lock:
            errors = self._apply_posted() if self._posted else ()
            reply = self._dispatch(request.address, request.length, request.is_write, request.data)
            changes = self._endpoint.take_mirror_changes()
            shadow = self._shadow()
        return Completion(_STATUS[reply.outcome], reply.data, reply.error, errors, changes,
                          () if shadow is None else (shadow,))

    def post(self, address: int, data: bytes) -> Completion | None:
        self._posted.append((address, data))
        if len(self._posted) >= POSTED_BATCH_MAX:  # the same batches as over gRPC, and bounded memory
            return self.flush()
        return None

    def flush(self, wait: bool = True) -> Completion:
        with self._endpoint.lock:
            errors = self._apply_posted()
            changes = self._endpoint.take_mirror_changes()
            shadow = self._shadow()
        return Completion(CompletionStatus.OK, posted_errors=errors, mirror_changes=changes,
                          shadows=() if shadow is None else (shadow,))

    def pending_posted(self) -> int:
        return len(self._posted)

    def broken(self) -> bool:
        return False

    def close(self) -> None:
        self._posted.clear()


class LocalShadowWatch:
    """The shadow-register updates of a LocalEndpoint, queued for one reader thread."""

    def __init__(self, endpoint: LocalEndpoint) -> None:
        self._endpoint = endpoint
        self._queue: queue.SimpleQueue[ShadowEvent | None] = queue.SimpleQueue()
        self._unsubscribe = endpoint.tracker.subscribe(self._queue.put)

    def next(self, timeout: float | None = None) -> ShadowChange | None:
        try:
            event = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise TransportError(f"{self._endpoint.name}: no shadow registers within {timeout:g} s") from None
        if event is None:
            return None
        if isinstance(event, ShadowFailure):
            raise TransportError(f"{self._endpoint.name}: shadow registers stopped: {event.message}")
        return self._endpoint.shadow_change(event)

    def cancel(self) -> None:
        self._unsubscribe()
        self._queue.put(None)


class LocalEndpoint:
    """A DeviceBus in this process, shared by every vCPU (accesses serialised by one lock).

    ``shadows`` False declares no shadow registers (every read exits), like ``serve-devices --no-shadows``.
    """

    def __init__(self, bus: DeviceBus, name: str = "local", shadows: bool = True) -> None:
        self.name = name
        self.bus = bus
        self.lock = threading.Lock()
        self.tracker = ShadowTracker(bus, enabled=shadows)
        # Console input the RX FIFO could not take yet, by device; pumped in as the guest drains the FIFO.
        self._pending_input: dict[str, bytearray] = {}
        # Found once: a runtime Protocol check per access would cost more than the access itself.
        self._romd = [(dev.name, romd) for dev in bus.devices if (romd := supports_romd(dev)) is not None]

    def dispatch(self, address: int, length: int, is_write: bool, data: bytes) -> BusReply:
        """One access (lock held), then any waiting console input the device can take now."""
        reply = dispatch(self.bus, address, length, is_write, data)
        if reply.region is not None and self._pending_input:
            self._pump(reply.region.device.name)
        return reply

    def dispatch_posted(self, writes: list[tuple[int, bytes]]) -> tuple[list[tuple[int, int, str]], set[DeviceModel]]:
        """A posted batch (lock held), applied as the device service applies one; then waiting console input."""
        failed, touched = dispatch_posted(self.bus, writes)
        if self._pending_input:
            for device in touched:
                self._pump(device.name)
        return failed, touched

    def _pump(self, device: str) -> None:
        pending = self._pending_input.get(device)
        console = supports_console(self.bus.device(device))
        if pending and console is not None:
            del pending[:console.receive(bytes(pending))]

    def console_input(self, device: str, data: bytes) -> None:
        """Type ``data`` on the console of UART ``device`` (what the gRPC Console stream does remotely):
        what the RX FIFO cannot take now waits for the guest to drain it. Shadow watchers hear at once."""
        model = self.bus.device(device)
        if supports_console(model) is None:
            raise TransportError(f"{self.name}: {device} is not a UART")
        with self.lock:
            self._pending_input.setdefault(device, bytearray()).extend(data)
            self._pump(device)
        self.tracker.refresh((model,))

    def shadow_change(self, values: ShadowValues) -> ShadowChange:
        return ShadowChange(self.name, values.generation, values.values)

    def watch_shadows(self, vm_id: str) -> ShadowWatch:
        return LocalShadowWatch(self)

    def describe(self) -> list[RemoteRegion]:
        regions = []
        for dev in self.bus.devices:
            console = supports_console(dev) is not None
            for spec in dev.regions():
                regions.append(RemoteRegion(
                    service=self.name, device=dev.name, device_type=dev.type_name, name=spec.name,
                    base=dev.base + spec.offset, size=spec.size, romd=spec.kind is RegionKind.ROMD,
                    posted=spec.posted, access_sizes=tuple(spec.access_sizes), has_console=console,
                    compatible=tuple(dev.compatible),
                    shadows=frozenset(self.tracker.windows(dev.name, spec.name)),
                ))
        return regions

    def open_exit_channel(self, vm_id: str, vcpu_id: int, architecture: str) -> ExitChannel:
        return LocalExitChannel(self)

    def take_mirror_changes(self) -> tuple[MirrorChange, ...]:
        """What ROMD devices changed since the last call (the lock is held by the caller)."""
        out: list[MirrorChange] = []
        for name, romd in self._romd:
            out += [MirrorChange(self.name, name, u.region, u.mirror_enabled, u.patches)
                    for u in romd.take_mirror_updates()]
        return tuple(out)

    def read_mirror(self, device: str, region: str) -> tuple[list[tuple[int, bytes]], bool]:
        with self.lock:
            romd = supports_romd(self.bus.device(device))
            if romd is None:
                raise TransportError(f"{self.name}: {device} has no ROMD region {region!r}")
            size = next(s.size for s in self.bus.device(device).regions() if s.name == region)
            pending = self.take_mirror_changes()
            enabled = next((c.enabled for c in reversed(pending) if c.device == device and c.region == region), True)
            return [(0, romd.mirror_contents(region, 0, size))], enabled

    def reset(self) -> tuple[MirrorChange, ...]:
        with self.lock:
            self.bus.reset()
            for device in self._pending_input:
                self._pump(device)
            self.tracker.refresh_all()
            return self.take_mirror_changes()

    def close(self) -> None:
        pass
