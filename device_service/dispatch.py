"""One access from the wire onto the bus: the checks and byte conversion every transport shares.

The gRPC servicer and the in-process local transport both call ``dispatch``, so a device model
answers exactly the same whichever way the vCPU reaches it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from device_service.bus import BusRegion, DeviceBus
from device_service.model import AccessError


class Outcome(enum.Enum):
    OK = "ok"
    DEVICE_ERROR = "device error"
    NO_DEVICE = "no device"
    BAD_REQUEST = "bad request"


@dataclass(frozen=True, slots=True)
class BusReply:
    outcome: Outcome
    data: bytes = b""
    error: str = ""
    region: BusRegion | None = None


def dispatch(bus: DeviceBus, address: int, length: int, is_write: bool, data: bytes) -> BusReply:
    """Perform one access; data (for a write) and the reply's data (for a read) are in guest-memory order.

    Devices are little-endian bus slaves: the bytes are the register value, least significant first.
    """
    if length not in (1, 2, 4, 8):
        return BusReply(Outcome.BAD_REQUEST, error=f"access length {length} at 0x{address:x} is not 1, 2, 4 or 8")
    if is_write:
        if len(data) != length:
            return BusReply(Outcome.BAD_REQUEST,
                            error=f"write of length {length} at 0x{address:x} carries {len(data)} data bytes")
        result = bus.write(address, length, int.from_bytes(data, "little"))
    else:
        result = bus.read(address, length)
    region = bus.find(address)
    if result.ok:
        out = b"" if is_write else (result.value & ((1 << (8 * length)) - 1)).to_bytes(length, "little")
        return BusReply(Outcome.OK, out, region=region)
    outcome = (Outcome.NO_DEVICE if result.error is AccessError.OUT_OF_RANGE and region is None
               else Outcome.DEVICE_ERROR)
    return BusReply(outcome, error=result.message, region=region)
