"""virtio-mmio transports with nothing plugged in, as the 32 empty slots of QEMU's ``virt``.

A transport without a backend identifies itself (MagicValue "virt", Version, VendorID "QEMU") and
says DeviceID 0, so drivers (U-Boot's ``virtio_mmio``, Linux) see a valid transport with no device
behind it and move on. Behaviour follows QEMU 7.2's ``hw/virtio/virtio-mmio.c`` with no backend,
checked against ``qemu-system-aarch64 -M virt`` with U-Boot's ``md``:

* every other register, including the device config space at 0x100, reads as zero;
* only a read exactly at a register's offset sees its value (a 1-byte read at 0x001 is 0), at any
  size, truncated to it;
* writes are ignored;
* 8-byte accesses are two 4-byte accesses, low word first.

``virt`` in QEMU 7.2 sets ``force-legacy=on``, so Version reads 1 (the legacy interface); option
``legacy=off`` gives Version 2. Each transport is 0x200 bytes; ``slots=N`` makes one device of N
consecutive transports (one region each), like the 32 at 0x0a000000 on ``virt``.

Each transport has an interrupt output (line N, "slotN", level, as QEMU's ``virtio_mmio`` drives it from its
interrupt status): ``virt`` wires slot N to SPI 16 + N. With no backend nothing raises it; a backend does,
and may DMA inside a QueueNotify write, so the model says ``does_dma``.

Accesses not aligned to their size are refused: a CPU faults on them for Device memory, and QEMU's
memory core refuses them (only its TCG slow path splits them into aligned pieces first).
"""

from __future__ import annotations

from device_service.model import (
    AccessError,
    AccessResult,
    ConfigError,
    DeviceModel,
    LineSpec,
    Option,
    RegionSpec,
    check_span,
    int_in_range,
    parse_bool,
)

SLOT_SIZE = 0x200
MAX_SLOTS = 1024

# Identification registers (virtio 1.2, section 4.2.2); the rest of the map reads as zero here.
MAGIC_VALUE = 0x000
VERSION = 0x004
DEVICE_ID = 0x008
VENDOR_ID = 0x00C

MAGIC = 0x7472_6976  # "virt", little-endian
VENDOR_QEMU = 0x554D_4551  # "QEMU", little-endian
VERSION_LEGACY = 1
VERSION_MODERN = 2


parse_slots = int_in_range(1, MAX_SLOTS)  # a number of transports


class VirtioMmio(DeviceModel):
    """One or more empty virtio-mmio transports (DeviceID 0)."""

    type_name = "virtio-mmio"
    compatible = ("virtio,mmio",)
    options = (
        Option("slots", parse_slots, f"a number of transports from 1 to {MAX_SLOTS}"),
        Option("legacy", parse_bool, "on (Version 1, QEMU 7.2 virt's default) or off (Version 2)"),
    )
    does_dma = True

    def __init__(self, name: str, base: int, slots: int = 1, legacy: bool = True) -> None:
        super().__init__(name, base)
        if not 1 <= slots <= MAX_SLOTS:
            raise ConfigError(f"{name}: slots must be between 1 and {MAX_SLOTS}, got {slots}")
        self.slots = slots
        self.legacy = legacy
        #: What each identification register reads, by offset inside a transport.
        self.identity = {
            MAGIC_VALUE: MAGIC,
            VERSION: VERSION_LEGACY if legacy else VERSION_MODERN,
            DEVICE_ID: 0,
            VENDOR_ID: VENDOR_QEMU,
        }

    def regions(self) -> list[RegionSpec]:
        return [RegionSpec(f"slot{index}", index * SLOT_SIZE, SLOT_SIZE) for index in range(self.slots)]

    def lines(self) -> list[LineSpec]:
        return [LineSpec(index, f"slot{index}") for index in range(self.slots)]

    def read(self, offset: int, size: int) -> AccessResult:
        error = self._check(offset, size, "read")
        if error is not None:
            return error
        if size == 8:
            return AccessResult.success(self._register(offset) | self._register(offset + 4) << 32)
        return AccessResult.success(self._register(offset) & ((1 << (8 * size)) - 1))

    def write(self, offset: int, size: int, value: int) -> AccessResult:
        return self._check(offset, size, "write") or AccessResult.success()

    def reset(self) -> None:
        """Nothing to reset: with no backend a transport has no state."""

    def describe(self) -> dict[str, str]:
        return {"slots": str(self.slots), "version": str(self.identity[VERSION])}

    def _register(self, offset: int) -> int:
        return self.identity.get(offset % SLOT_SIZE, 0)

    def _check(self, offset: int, size: int, verb: str) -> AccessResult | None:
        error = check_span(offset, size, self.slots * SLOT_SIZE, verb)
        if error is None and offset % size:
            error = AccessResult.failure(
                AccessError.UNALIGNED_ACCESS, f"{size}-byte {verb} at offset {offset:#x} is not aligned to its size"
            )
        return error
