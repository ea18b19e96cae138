"""A scratch device: a register file that behaves exactly like RAM.

It answers any access size at any offset, little-endian, and reads back what
was written: the simplest device that shows an access went through the whole
exit path unchanged, including unaligned and posted writes.

``delay=US`` makes every access take that long (the device's lock held, as a slow
device holds its bus), and ``deadline=MS`` declares the region's exit deadline: a
slow device and a deadline to go with it, for tests and load tests.
"""

from __future__ import annotations

import time

from device_service.model import (
    AccessResult,
    ConfigError,
    DeviceModel,
    Option,
    RegionSpec,
    check_span,
    int_in_range,
    parse_bool,
    parse_size,
)

DEFAULT_SIZE = 0x1000
MAX_SIZE = 64 * 1024 * 1024


def _check_size(size: int, name: str) -> None:
    if not 0 < size <= MAX_SIZE:
        raise ConfigError(f"{name}: size must be between 1 byte and 64 MiB, got {size:#x}")


def parse_scratch_size(text: str) -> int:
    """A size option for RAM-like devices: 1 byte to 64 MiB."""
    size = parse_size(text)
    _check_size(size, "size")
    return size


class Scratch(DeviceModel):
    """Byte-addressable memory behind an MMIO region; zero at reset."""

    type_name = "scratch"
    compatible = ("mmiosplit,scratch",)
    options = (
        Option("size", parse_scratch_size, "a size between 1 byte and 64 MiB, like 0x1000 or 4k"),
        Option("posted", parse_bool, "on or off"),
        Option("delay", int_in_range(0, 10_000_000), "microseconds each access takes, 0 to 10000000"),
        Option("deadline", int_in_range(1, 3_600_000), "the region's exit deadline in milliseconds, 1 to 3600000"),
    )

    def __init__(self, name: str, base: int, size: int = DEFAULT_SIZE, posted: bool = False, delay: int = 0,
                 deadline: int = 0) -> None:
        super().__init__(name, base)
        _check_size(size, name)
        self.size = size
        self.posted = posted
        self.delay_s = delay / 1e6
        self.slow = delay > 0
        self.deadline_ms = deadline
        self.memory = bytearray(size)

    def regions(self) -> list[RegionSpec]:
        return [RegionSpec("mem", 0, self.size, posted=self.posted, deadline_ms=self.deadline_ms)]

    def read(self, offset: int, size: int) -> AccessResult:
        error = check_span(offset, size, self.size, "read")
        if error is not None:
            return error
        if self.delay_s:
            time.sleep(self.delay_s)
        return AccessResult.success(int.from_bytes(self.memory[offset : offset + size], "little"))

    def write(self, offset: int, size: int, value: int) -> AccessResult:
        error = check_span(offset, size, self.size, "write")
        if error is not None:
            return error
        if self.delay_s:
            time.sleep(self.delay_s)
        self.memory[offset : offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        return AccessResult.success()

    def reset(self) -> None:
        self.memory[:] = bytes(self.size)

    def describe(self) -> dict[str, str]:
        out = {"size": f"{self.size:#x}", "posted": "on" if self.posted else "off"}
        if self.delay_s:
            out["delay"] = f"{round(self.delay_s * 1e6)}"
        if self.deadline_ms:
            out["deadline"] = f"{self.deadline_ms}"
        return out

