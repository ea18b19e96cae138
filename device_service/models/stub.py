"""Stub devices that make probes of absent hardware see what QEMU shows.

``zero`` reads as zero (an empty virtio-mmio slot, fw_cfg) and ``ones`` reads
as all ones (an empty PCIe ECAM function); both ignore writes.
"""

from __future__ import annotations

from typing import ClassVar

from device_service.model import (
    AccessResult,
    ConfigError,
    DeviceModel,
    Option,
    RegionSpec,
    check_span,
    parse_size,
)

DEFAULT_SIZE = 0x1000


def parse_stub_size(text: str) -> int:
    """Any positive size: a stub keeps no memory, so it may cover a whole window (e.g. 256 MiB of ECAM)."""
    size = parse_size(text)
    if size <= 0:
        raise ValueError("size must be positive")
    return size


class _ConstantStub(DeviceModel):
    """Reads answer a fixed bit pattern of the access size; writes are accepted and ignored."""

    all_ones: ClassVar[bool]
    options = (Option("size", parse_stub_size, "a positive size like 0x1000 or 4k"),)

    def __init__(self, name: str, base: int, size: int = DEFAULT_SIZE) -> None:
        super().__init__(name, base)
        if size <= 0:
            raise ConfigError(f"{name}: size must be positive, got {size:#x}")
        self.size = size

    def regions(self) -> list[RegionSpec]:
        return [RegionSpec("regs", 0, self.size)]

    def read(self, offset: int, size: int) -> AccessResult:
        error = check_span(offset, size, self.size, "read")
        if error is not None:
            return error
        return AccessResult.success((1 << (8 * size)) - 1 if self.all_ones else 0)

    def write(self, offset: int, size: int, value: int) -> AccessResult:
        return check_span(offset, size, self.size, "write") or AccessResult.success()

    def reset(self) -> None:
        """Nothing to reset: a stub has no state."""

    def describe(self) -> dict[str, str]:
        return {"size": f"{self.size:#x}"}


class ReadAsZero(_ConstantStub):
    """Reads as zero, writes ignored (QEMU's unimplemented-device behaviour)."""

    type_name = "zero"
    compatible = ("mmiosplit,zero",)
    all_ones = False


class ReadAsOnes(_ConstantStub):
    """Reads as all ones of the access size, writes ignored (an empty PCI bus)."""

    type_name = "ones"
    compatible = ("mmiosplit,ones",)
    all_ones = True
