"""The address decoder: absolute addresses to (device, offset), as Firecracker's and rust-vmm's bus.

The gRPC adapter and the in-process transport both go through a ``DeviceBus``,
so both see the same decode and the same errors. Overlaps are refused when the
bus is built, never discovered at run time. A device only ever sees offsets
relative to its own base address.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from device_service.model import (
    BUS_ACCESS_SIZES,
    AccessError,
    AccessResult,
    ConfigError,
    DeviceModel,
    RegionSpec,
)
from device_service.stats import DeviceStats


@dataclass(frozen=True, slots=True)
class BusRegion:
    """A device region placed at its absolute address."""

    device: DeviceModel
    spec: RegionSpec
    base: int
    size: int
    #: First address past the region (computed once: every access asks).
    end: int = field(init=False, repr=False, compare=False)
    #: The access counters' keys, (device, region, "read"/"write"), built once rather than per access.
    read_key: tuple[str, str, str] = field(init=False, repr=False, compare=False)
    write_key: tuple[str, str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "end", self.base + self.size)
        object.__setattr__(self, "read_key", (self.device.name, self.spec.name, "read"))
        object.__setattr__(self, "write_key", (self.device.name, self.spec.name, "write"))

    def __str__(self) -> str:
        return f"{self.device.name}.{self.spec.name} [{self.base:#x}-{self.end - 1:#x}]"


class DeviceBus:
    """The devices of one device service, decoded by address."""

    def __init__(self, devices: Sequence[DeviceModel]) -> None:
        self.devices: list[DeviceModel] = list(devices)
        self._by_name: dict[str, DeviceModel] = {}
        for device in self.devices:
            other = self._by_name.get(device.name)
            if other is not None:
                raise ConfigError(
                    f"two devices are named {device.name!r}: {other.type_name} at {other.base:#x} "
                    f"and {device.type_name} at {device.base:#x}"
                )
            self._by_name[device.name] = device

        regions = [
            BusRegion(device, spec, device.base + spec.offset, spec.size)
            for device in self.devices
            for spec in device.regions()
        ]
        regions.sort(key=lambda region: region.base)
        for region in regions:
            if region.end > 1 << 64:
                raise ConfigError(f"{region} runs past the end of the 64-bit address space")
        for before, after in itertools.pairwise(regions):
            if after.base < before.end:
                raise ConfigError(f"{before} overlaps {after}")
        self.regions: list[BusRegion] = regions
        self._bases = [region.base for region in regions]
        self.stats = DeviceStats()  # counted by dispatch(), read by the metrics collector

    def find(self, address: int) -> BusRegion | None:
        """The region that contains ``address``, if any."""
        index = bisect.bisect_right(self._bases, address) - 1
        if index >= 0:
            region = self.regions[index]
            if address < region.end:
                return region
        return None

    def read(self, address: int, size: int) -> AccessResult:
        """Read ``size`` bytes at an absolute address."""
        region = self._route(address, size, "read")
        if isinstance(region, AccessResult):
            return region
        return self.read_routed(region, address, size)

    def write(self, address: int, size: int, value: int) -> AccessResult:
        """Write the ``size``-byte ``value`` at an absolute address."""
        region = self._route(address, size, "write")
        if isinstance(region, AccessResult):
            return region
        if not 0 <= value < 1 << (8 * size):
            return AccessResult.failure(
                AccessError.INVALID_ACCESS_SIZE,
                f"{size}-byte write at {address:#x}: value {value:#x} does not fit in {size} bytes",
            )
        return self.write_routed(region, address, size, value)

    def read_routed(self, region: BusRegion, address: int, size: int) -> AccessResult:
        """``read`` for a caller that already routed and checked the access (``dispatch``'s fast path)."""
        device = region.device
        try:
            with device.lock:
                result = device.read(address - device.base, size)
        except Exception as exc:
            return _device_fault(device, address, size, "read", exc)
        return result if result.error is None else _name_device(result, device, address)

    def write_routed(self, region: BusRegion, address: int, size: int, value: int) -> AccessResult:
        """``write`` for a caller that already routed and checked the access (a run of posted writes)."""
        device = region.device
        try:
            with device.lock:
                result = device.write(address - device.base, size, value)
        except Exception as exc:
            return _device_fault(device, address, size, "write", exc)
        return result if result.ok else _name_device(result, device, address)

    def reset(self) -> None:
        """Reset every device, as a machine reset does."""
        for device in self.devices:
            with device.lock:
                device.reset()

    def device(self, name: str) -> DeviceModel:
        """The device called ``name``."""
        try:
            return self._by_name[name]
        except KeyError:
            known = ", ".join(sorted(self._by_name)) or "none"
            raise KeyError(f"no device named {name!r} on this bus; devices: {known}") from None

    def _route(self, address: int, size: int, verb: str) -> BusRegion | AccessResult:
        """The region an access goes to, or why it goes nowhere."""
        if size not in BUS_ACCESS_SIZES:
            return AccessResult.failure(
                AccessError.INVALID_ACCESS_SIZE, f"{size}-byte {verb} at {address:#x}: not a bus access size"
            )
        region = self.find(address)
        if region is None:
            return AccessResult.failure(
                AccessError.OUT_OF_RANGE, f"{size}-byte {verb} at {address:#x}: no device there"
            )
        if size not in region.spec.access_sizes:
            accepted = ", ".join(str(s) for s in region.spec.access_sizes)
            return AccessResult.failure(
                AccessError.INVALID_ACCESS_SIZE,
                f"{size}-byte {verb} at {address:#x}: {region} takes {accepted}-byte accesses",
            )
        if address + size > region.end:
            return AccessResult.failure(
                AccessError.OUT_OF_RANGE,
                f"{size}-byte {verb} at {address:#x} straddles the end of {region}",
            )
        return region


def _name_device(result: AccessResult, device: DeviceModel, address: int) -> AccessResult:
    """Prefix a device's error with where it happened, so the user sees device and address."""
    assert result.error is not None
    return AccessResult.failure(result.error, f"{device.name} at {address:#x}: {result.message}")


def _device_fault(device: DeviceModel, address: int, size: int, verb: str, exc: Exception) -> AccessResult:
    """A model that raises is a bug in the model; the guest gets a fault, not a dead service."""
    return AccessResult.failure(
        AccessError.DEVICE_FAULT,
        f"{device.name}: {size}-byte {verb} at {address:#x} raised {type(exc).__name__}: {exc}",
    )
