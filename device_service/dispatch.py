"""One access from the wire onto the bus: the checks and byte conversion every transport shares.

The device host (``device_service.host``) calls ``dispatch`` for the gRPC servicer and the in-process
transport alike, so a device model answers exactly the same whichever way the vCPU reaches it. The answer
is the ``Completion`` the vCPU receives, plus the region the access reached, which the host needs for
console input and shadow registers.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable

from device_service.bus import BusRegion, DeviceBus
from device_service.model import AccessError, AccessResult, DeviceModel
from device_service.stats import DeviceStats
from mmiosplit.mmio import Completion, CompletionStatus, PostedError

#: Every successful write completes alike: one shared, immutable answer.
_WRITTEN = Completion()


def dispatch(bus: DeviceBus, address: int, length: int, is_write: bool,
             data: bytes) -> tuple[Completion, BusRegion | None]:
    """Perform one access: its completion, and the region it reached (None when no region covers the
    address or the request is malformed). Data (for a write) and the completion's data (for a read) are
    in guest-memory order.

    Devices are little-endian bus slaves: the bytes are the register value, least significant first.
    Every access is counted in ``bus.stats`` (and timed once metrics are enabled).
    """
    stats = bus.stats
    handling = stats.handling
    if handling is None:
        return _dispatch(bus, stats, address, length, is_write, data)
    t0 = time.perf_counter_ns()
    done = _dispatch(bus, stats, address, length, is_write, data)
    handling.record(time.perf_counter_ns() - t0)
    return done


def _dispatch(bus: DeviceBus, stats: DeviceStats, address: int, length: int, is_write: bool,
              data: bytes) -> tuple[Completion, BusRegion | None]:
    region = bus.find(address)
    if region is not None and length in region.spec.access_sizes and address + length <= region.end:
        # The usual access: routed once, checked here, straight to the device.
        if is_write:
            stats.accesses[region.write_key] += 1
            if len(data) == length:
                result = bus.write_routed(region, address, length, int.from_bytes(data, "little"))
                if result.error is None:
                    return _WRITTEN, region
                return _failed(stats, result, region), region
        else:
            stats.accesses[region.read_key] += 1
            result = bus.read_routed(region, address, length)
            if result.error is None:
                return Completion(data=(result.value & ((1 << (8 * length)) - 1)).to_bytes(length, "little")), region
            return _failed(stats, result, region), region
    elif region is not None:
        stats.accesses[region.write_key if is_write else region.read_key] += 1
    else:
        stats.accesses["", "", "write" if is_write else "read"] += 1
    # Everything else goes the long way, which names what is wrong.
    device = region.device.name if region is not None else ""
    if length not in (1, 2, 4, 8):
        stats.errors[device, "bad_request"] += 1
        return Completion(CompletionStatus.BAD_REQUEST,
                          error=f"access length {length} at 0x{address:x} is not 1, 2, 4 or 8"), None
    if is_write:
        if len(data) != length:
            stats.errors[device, "bad_request"] += 1
            return Completion(CompletionStatus.BAD_REQUEST,
                              error=f"write of length {length} at 0x{address:x} carries {len(data)} data bytes"), None
        result = bus.write(address, length, int.from_bytes(data, "little"))
    else:
        result = bus.read(address, length)
    if result.ok:
        if is_write:
            return _WRITTEN, region
        return Completion(data=(result.value & ((1 << (8 * length)) - 1)).to_bytes(length, "little")), region
    return _failed(stats, result, region), region


def _failed(stats: DeviceStats, result: AccessResult, region: BusRegion | None) -> Completion:
    """The completion of a refused access, counted by kind."""
    no_device = result.error is AccessError.OUT_OF_RANGE and region is None
    stats.errors[region.device.name if region is not None else "", "no_device" if no_device else "device_error"] += 1
    return Completion(CompletionStatus.NO_DEVICE if no_device else CompletionStatus.DEVICE_ERROR, error=result.message)


def dispatch_posted(bus: DeviceBus,
                    writes: Iterable[tuple[int, bytes]]) -> tuple[list[PostedError], set[DeviceModel]]:
    """Apply a posted batch in order: the writes that failed, and the devices written.

    Each write gets the checks and the answer ``dispatch`` would give it, but a run of writes to one
    region looks the region up once and is counted once: a posted batch can hold a thousand writes,
    and per-write routing was most of the device service's cost for them.
    """
    stats = bus.stats
    handling = stats.handling
    errors: list[PostedError] = []
    touched: set[DeviceModel] = set()
    counted: collections.Counter[tuple[str, str, str]] = collections.Counter()
    region: BusRegion | None = None
    lo = hi = 0
    for index, (address, data) in enumerate(writes):
        length = len(data)
        if region is None or not lo <= address <= hi - length or length not in region.spec.access_sizes:
            done, region = dispatch(bus, address, length, True, data)  # routes, counts and checks this one in full
            if region is not None:
                lo, hi = region.base, region.end
                touched.add(region.device)
            if done.status is not CompletionStatus.OK:
                errors.append(PostedError(index, address, done.error))
                region = None
            continue
        if handling is None:
            result = bus.write_routed(region, address, length, int.from_bytes(data, "little"))
        else:  # metrics on: time each write, as dispatch does
            t0 = time.perf_counter_ns()
            result = bus.write_routed(region, address, length, int.from_bytes(data, "little"))
            handling.record(time.perf_counter_ns() - t0)
        name = region.device.name
        counted[name, region.spec.name, "write"] += 1
        if not result.ok:
            errors.append(PostedError(index, address, result.message))
            stats.errors[name, "device_error"] += 1
    stats.accesses.update(counted)
    return errors, touched
