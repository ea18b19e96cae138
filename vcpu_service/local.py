"""The local transport: device models called inside the vcpu process, no gRPC.

KVM keeps a few devices in the kernel for speed; this is our equivalent, and the floor every
benchmark compares the gRPC transport against. The models are the same classes the device service
hosts, reached through the same ``dispatch``, so they answer exactly as they would remotely.
"""

from __future__ import annotations

import threading

from device_service.bus import DeviceBus
from device_service.dispatch import Outcome, dispatch
from device_service.model import RegionKind, supports_console, supports_romd
from vcpu_service.transport import (
    AccessReply,
    AccessStatus,
    ExitChannel,
    MirrorChange,
    MmioRequest,
    RemoteRegion,
    TransportError,
)

_STATUS = {
    Outcome.OK: AccessStatus.OK,
    Outcome.DEVICE_ERROR: AccessStatus.DEVICE_ERROR,
    Outcome.NO_DEVICE: AccessStatus.NO_DEVICE,
    Outcome.BAD_REQUEST: AccessStatus.BAD_REQUEST,
}


class LocalExitChannel:
    """Calls the bus directly; posted writes are queued and applied in order like the remote ones."""

    def __init__(self, endpoint: LocalEndpoint) -> None:
        self._endpoint = endpoint
        self._posted: list[tuple[int, bytes]] = []

    def _apply_posted(self) -> tuple[str, ...]:
        errors = []
        for address, data in self._posted:
            reply = dispatch(self._endpoint.bus, address, len(data), True, data)
            if reply.outcome is not Outcome.OK:
                errors.append(f"posted write to 0x{address:x}: {reply.error}")
        self._posted.clear()
        return tuple(errors)

    def access(self, request: MmioRequest) -> AccessReply:
        with self._endpoint.lock:
            errors = self._apply_posted() if self._posted else ()
            reply = dispatch(self._endpoint.bus, request.address, request.length, request.is_write, request.data)
            changes = self._endpoint.take_mirror_changes()
        return AccessReply(_STATUS[reply.outcome], reply.data, reply.error, errors, changes)

    def post(self, address: int, data: bytes) -> AccessReply | None:
        self._posted.append((address, data))
        return None

    def flush(self) -> AccessReply:
        with self._endpoint.lock:
            errors = self._apply_posted()
            changes = self._endpoint.take_mirror_changes()
            return AccessReply(AccessStatus.OK, posted_errors=errors, mirror_changes=changes)

    def pending_posted(self) -> int:
        return len(self._posted)

    def broken(self) -> bool:
        return False

    def close(self) -> None:
        self._posted.clear()


class LocalEndpoint:
    """A DeviceBus in this process, shared by every vCPU (accesses serialised by one lock)."""

    def __init__(self, bus: DeviceBus, name: str = "local") -> None:
        self.name = name
        self.bus = bus
        self.lock = threading.Lock()
        # Found once: a runtime Protocol check per access would cost more than the access itself.
        self._romd = [(dev.name, romd) for dev in bus.devices if (romd := supports_romd(dev)) is not None]

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
                ))
        return regions

    def open_exit_channel(self, vm_id: str, vcpu_id: int, architecture: int) -> ExitChannel:
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
            return self.take_mirror_changes()

    def close(self) -> None:
        pass
