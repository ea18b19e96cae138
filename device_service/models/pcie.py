"""A PCIe ECAM window with QEMU's generic host bridge (gpex) alone on its root bus.

The window maps configuration space the ECAM way: bus ``(offset >> 20)`` counted from the first bus
of ``bus_range``, device ``(offset >> 15) & 31``, function ``(offset >> 12) & 7``, register
``offset & 0xfff``. The only function present is the host bridge at device 0 function 0 of the root
bus (00:00.0 with the default range), so U-Boot's ``pci`` lists ``00.00.00 0x1b36 0x0008 Bridge
device 0x00`` as under QEMU. Every other function, and every register past the host bridge's
256-byte conventional configuration space, reads as all ones of the access size (the "no device"
answer) and ignores writes. There are no MMIO or I/O windows.

The host bridge's header is QEMU 7.2's ``gpex-root`` (``hw/pci-host/gpex.c``, ``hw/pci/pci.c``),
checked against ``qemu-system-aarch64 -M virt`` with U-Boot's ``pci header`` and ``mw``/``md``:
vendor 0x1b36 (Red Hat), device 0x0008, class 0x060000 (host bridge), header type 0, no BARs,
subsystem 0x1af4:0x1100 (QEMU's default), and QEMU's write masks: Command bits IO, Memory, Bus
Master, SERR and INTx Disable (0x0507), Cache Line Size, Interrupt Line, and the device-specific
bytes 0x40-0xff are writable; everything else is read-only (Latency Timer included). Reset restores
the header and, as QEMU, leaves the device-specific bytes alone.

Accesses are 1, 2 or 4 bytes aligned to their size; 8-byte accesses are two 4-byte ones, low word
first (QEMU's default ``impl.max_access_size``). Unaligned accesses are refused: a CPU faults on
them for Device memory, and QEMU's memory core refuses them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from device_service.model import (
    AccessError,
    AccessResult,
    ConfigError,
    LineSpec,
    Option,
    RegionSpec,
    WordDevice,
    check_span,
    parse_size,
)

BUS_SHIFT = 20  # 1 MiB of configuration space per bus
DEVFN_SHIFT = 12  # 4 KiB per function
REGISTER_MASK = 0xFFF
MAX_BUSES = 256
DEFAULT_SIZE = MAX_BUSES << BUS_SHIFT
CONFIG_SPACE_SIZE = 0x100  # conventional PCI: gpex-root is not a PCIe function
HEADER_SIZE = 0x40

COMMAND_IO = 0x0001
COMMAND_MEMORY = 0x0002
COMMAND_MASTER = 0x0004
COMMAND_SERR = 0x0100
COMMAND_INTX_DISABLE = 0x0400


@dataclass(frozen=True, slots=True)
class ConfigField:
    """One field of a type-0 configuration header: where, how wide, its reset value, its writable bits."""

    name: str
    offset: int
    width: int  # bytes
    reset: int = 0
    writable: int = 0  # QEMU's wmask for the field


#: QEMU 7.2's gpex-root (the "QEMU generic PCIe host bridge"); fields not listed are zero and read-only.
HOST_BRIDGE_HEADER: tuple[ConfigField, ...] = (
    ConfigField("VendorID", 0x00, 2, 0x1B36),  # PCI_VENDOR_ID_REDHAT
    ConfigField("DeviceID", 0x02, 2, 0x0008),  # PCI_DEVICE_ID_REDHAT_PCIE_HOST
    ConfigField("Command", 0x04, 2, 0,
                COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER | COMMAND_SERR | COMMAND_INTX_DISABLE),
    ConfigField("Status", 0x06, 2, 0),
    ConfigField("RevisionID", 0x08, 1, 0),
    ConfigField("ClassCode", 0x09, 3, 0x06_00_00),  # bridge, host bridge, no programming interface
    ConfigField("CacheLineSize", 0x0C, 1, 0, 0xFF),
    ConfigField("LatencyTimer", 0x0D, 1, 0),
    ConfigField("HeaderType", 0x0E, 1, 0x00),
    ConfigField("BIST", 0x0F, 1, 0),
    *(ConfigField(f"BAR{index}", 0x10 + 4 * index, 4, 0) for index in range(6)),
    ConfigField("CardbusCISPointer", 0x28, 4, 0),
    ConfigField("SubsystemVendorID", 0x2C, 2, 0x1AF4),  # PCI_SUBVENDOR_ID_REDHAT_QUMRANET
    ConfigField("SubsystemID", 0x2E, 2, 0x1100),  # PCI_SUBDEVICE_ID_QEMU
    ConfigField("ExpansionROMBase", 0x30, 4, 0),
    ConfigField("CapabilitiesPointer", 0x34, 1, 0),
    ConfigField("InterruptLine", 0x3C, 1, 0, 0xFF),
    ConfigField("InterruptPin", 0x3D, 1, 0),
    ConfigField("MinGrant", 0x3E, 1, 0),
    ConfigField("MaxLatency", 0x3F, 1, 0),
)  # fmt: skip


class ConfigSpace:
    """One function's 256 bytes of configuration space, with QEMU's per-byte write mask."""

    def __init__(self, header: tuple[ConfigField, ...]) -> None:
        self.reset_image = bytearray(CONFIG_SPACE_SIZE)
        self.wmask = bytearray(CONFIG_SPACE_SIZE)
        for field in header:
            end = field.offset + field.width
            self.reset_image[field.offset : end] = field.reset.to_bytes(field.width, "little")
            self.wmask[field.offset : end] = field.writable.to_bytes(field.width, "little")
        self.wmask[HEADER_SIZE:] = b"\xff" * (CONFIG_SPACE_SIZE - HEADER_SIZE)  # device-specific: free for all
        self.bytes = bytearray(self.reset_image)

    def read(self, register: int, size: int) -> int:
        return int.from_bytes(self.bytes[register : register + size], "little")

    def write(self, register: int, size: int, value: int) -> None:
        for index, byte in enumerate(value.to_bytes(size, "little")):
            mask = self.wmask[register + index]
            self.bytes[register + index] = (self.bytes[register + index] & ~mask) | (byte & mask)

    def reset(self) -> None:
        """Restore the header; device-specific bytes keep their values, as in QEMU."""
        self.bytes[:HEADER_SIZE] = self.reset_image[:HEADER_SIZE]


_BUS_RANGE_RE = re.compile(r"\s*(\d+)\s*-\s*(\d+)\s*\Z")


def parse_bus_range(text: str) -> tuple[int, int]:
    """``FIRST-LAST``, bus numbers from 0 to 255 (the device tree's ``bus-range``)."""
    match = _BUS_RANGE_RE.match(text)
    if match is None:
        raise ValueError("not FIRST-LAST")
    first, last = int(match[1]), int(match[2])
    if not 0 <= first <= last < MAX_BUSES:
        raise ValueError("not an ascending range inside 0-255")
    return first, last


def parse_ecam_size(text: str) -> int:
    """An ECAM window size: a whole number of buses (1 MiB each), at most 256 MiB."""
    size = parse_size(text)
    if not 0 < size <= DEFAULT_SIZE or size % (1 << BUS_SHIFT):
        raise ValueError("not a multiple of 1 MiB up to 256 MiB")
    return size


class PcieHost(WordDevice):
    """A generic ECAM host: the host bridge on the root bus, nothing else."""

    type_name = "pcie"
    compatible = ("pci-host-ecam-generic",)
    options = (
        Option("size", parse_ecam_size, "a multiple of 1M up to 256M, like 16M"),
        Option("bus_range", parse_bus_range, "FIRST-LAST with bus numbers from 0 to 255, like 0-15"),
    )

    def __init__(self, name: str, base: int, size: int | None = None, bus_range: tuple[int, int] | None = None) -> None:
        super().__init__(name, base)
        if size is None:
            size = DEFAULT_SIZE if bus_range is None else (bus_range[1] - bus_range[0] + 1) << BUS_SHIFT
        if not 0 < size <= DEFAULT_SIZE or size % (1 << BUS_SHIFT):
            raise ConfigError(f"{name}: ECAM size {size:#x} is not a multiple of 1 MiB up to 256 MiB")
        buses = size >> BUS_SHIFT
        if bus_range is None:
            bus_range = (0, buses - 1)
        first, last = bus_range
        if not 0 <= first <= last < MAX_BUSES:
            raise ConfigError(f"{name}: bus range {first}-{last} is not an ascending range inside 0-255")
        if last - first + 1 > buses:
            raise ConfigError(
                f"{name}: bus range {first}-{last} needs {last - first + 1} MiB of ECAM, the window has {buses} MiB"
            )
        self.size = size
        self.bus_range = (first, last)
        self.host_bridge = ConfigSpace(HOST_BRIDGE_HEADER)

    # --- DeviceModel -----------------------------------------------------------------------

    def regions(self) -> list[RegionSpec]:
        return [RegionSpec("ecam", 0, self.size)]

    def lines(self) -> list[LineSpec]:
        """The host bridge's four INTx outputs (``virt`` wires INTA-INTD to SPI 3-6); no function drives them yet."""
        return [LineSpec(index, f"int{pin}") for index, pin in enumerate("abcd")]

    def reset(self) -> None:
        self.host_bridge.reset()

    def describe(self) -> dict[str, str]:
        return {"size": f"{self.size:#x}", "bus-range": f"{self.bus_range[0]}-{self.bus_range[1]}"}

    # --- configuration space ---------------------------------------------------------------

    def function_at(self, offset: int) -> tuple[int, int, int]:
        """The (bus, device, function) an ECAM offset addresses."""
        devfn = (offset >> DEVFN_SHIFT) & 0xFF
        return self.bus_range[0] + (offset >> BUS_SHIFT), devfn >> 3, devfn & 7

    def _target(self, offset: int) -> tuple[ConfigSpace, int] | None:
        """The function's configuration space and the register, when something answers there."""
        bus, device, function = self.function_at(offset)
        register = offset & REGISTER_MASK
        if (bus, device, function) != (self.bus_range[0], 0, 0) or register >= CONFIG_SPACE_SIZE:
            return None
        return self.host_bridge, register

    def _read(self, offset: int, size: int) -> int:
        target = self._target(offset)
        if target is None:
            return (1 << (8 * size)) - 1  # no device: all ones
        space, register = target
        return space.read(register, size)

    def _write(self, offset: int, size: int, value: int) -> None:
        target = self._target(offset)
        if target is not None:
            space, register = target
            space.write(register, size, value)

    def _check(self, offset: int, size: int, verb: str) -> AccessResult | None:
        error = check_span(offset, size, self.size, verb)
        if error is None and offset % size:
            error = AccessResult.failure(
                AccessError.UNALIGNED_ACCESS, f"{size}-byte {verb} at offset {offset:#x} is not aligned to its size"
            )
        return error
