"""QEMU's firmware configuration device (fw_cfg), memory-mapped as on ``virt``.

Firmware selects an item by writing its 16-bit key, big-endian, to the selector at +8, then reads
the item's bytes in order from the data register at +0, 1, 2, 4 or 8 at a time ("string
preserving": the bytes land in guest memory in item order; past the end of the item they read as
zero). This is what U-Boot's ``qfw`` driver does to find the "QEMU" signature, and what its
``qfw load`` does before printing ``fatal: no kernel available`` when no kernel was given.

Behaviour follows QEMU 7.2's ``hw/nvram/fw_cfg.c`` (``fw_cfg_mem``, ``data_width=8``), checked
against ``qemu-system-aarch64 -M virt`` with U-Boot's ``md``/``mw``:

* the data register answers only at offset 0 (any other offset of it, and any read of the
  selector, is refused: QEMU's memory core refuses them and the CPU takes an external abort);
* writes to the data register are ignored (QEMU dropped write support in 2.4);
* a key is looked up without its write-channel bit (0x4000); keys at or past the end of the item
  table (0x20 well-known keys + 32 file slots) select nothing and read as zero; items QEMU has no
  data for read as zero too;
* reset selects the signature.

The items are those QEMU 7.2 gives ``virt`` when no kernel is loaded: the signature, the ID, a zero
UUID, NOGRAPHIC, the number of CPUs, BOOT_MENU and an empty file directory (no kernel, initrd or
command line, so their sizes read as zero). QEMU also lists some files (ACPI and SMBIOS tables,
``bootorder``...), which U-Boot's ``qfw list`` prints; this model has none.

QEMU 7.2 advertises the DMA interface (ID 3) and puts its address register at +16. DMA makes the
device read and write guest memory, which a device model here cannot do, so this model does not
advertise it: the ID reads 1 (as QEMU with ``dma_enabled=false``) and there is no register at +16.
U-Boot then reads items through the data register, and prints the same as under QEMU.
"""

from __future__ import annotations

from device_service.model import (
    AccessError,
    AccessResult,
    ConfigError,
    DeviceModel,
    Option,
    RegionSpec,
    int_in_range,
    parse_bool,
)

# Well-known item keys (QEMU include/standard-headers/linux/qemu_fw_cfg.h).
FW_CFG_SIGNATURE = 0x00
FW_CFG_ID = 0x01
FW_CFG_UUID = 0x02
FW_CFG_NOGRAPHIC = 0x04
FW_CFG_NB_CPUS = 0x05
FW_CFG_KERNEL_SIZE = 0x08
FW_CFG_BOOT_MENU = 0x0E
FW_CFG_SETUP_SIZE = 0x17
FW_CFG_FILE_DIR = 0x19
FW_CFG_FILE_FIRST = 0x20
FW_CFG_FILE_SLOTS = 0x20  # QEMU's default x-file-slots
FW_CFG_WRITE_CHANNEL = 0x4000
FW_CFG_ARCH_LOCAL = 0x8000
FW_CFG_ENTRY_MASK = 0x3FFF
#: First key past the item table; selecting at or past it selects nothing.
FW_CFG_MAX_ENTRY = FW_CFG_FILE_FIRST + FW_CFG_FILE_SLOTS

SIGNATURE = b"QEMU"
FW_CFG_VERSION = 0x01  # traditional interface
FW_CFG_VERSION_DMA = 0x02  # DMA interface (not offered, see the module docstring)

# Register layout of the memory-mapped interface.
DATA_OFFSET = 0x0
DATA_SIZE = 8  # data_width on virt
SELECTOR_OFFSET = 0x8
SELECTOR_SIZE = 2

MAX_CPUS = 0xFFFF


parse_cpus = int_in_range(1, MAX_CPUS)  # a CPU count for FW_CFG_NB_CPUS


def _u16(value: int) -> bytes:
    return value.to_bytes(2, "little")  # QEMU's fw_cfg_add_i16 stores little-endian


class FwCfg(DeviceModel):
    """fw_cfg with the items QEMU gives a kernel-less ``virt`` machine, read through the data register."""

    type_name = "fw_cfg"
    compatible = ("qemu,fw-cfg-mmio",)
    options = (
        Option("cpus", parse_cpus, "a number of CPUs from 1 to 65535"),
        Option("nographic", parse_bool, "on or off"),
    )

    def __init__(self, name: str, base: int, cpus: int = 1, nographic: bool = True) -> None:
        super().__init__(name, base)
        if not 1 <= cpus <= MAX_CPUS:
            raise ConfigError(f"{name}: cpus must be between 1 and {MAX_CPUS}, got {cpus}")
        self.cpus = cpus
        self.nographic = nographic
        #: Item data by key (arch-local items would have bit 15 set; virt has none).
        self.items: dict[int, bytes] = {
            FW_CFG_SIGNATURE: SIGNATURE,
            FW_CFG_ID: FW_CFG_VERSION.to_bytes(4, "little"),
            FW_CFG_UUID: bytes(16),
            FW_CFG_NOGRAPHIC: _u16(int(nographic)),
            FW_CFG_NB_CPUS: _u16(cpus),
            FW_CFG_BOOT_MENU: _u16(0),
            FW_CFG_FILE_DIR: (0).to_bytes(4, "big"),  # the file count, big-endian; no files follow
        }
        self.selected: int | None = FW_CFG_SIGNATURE
        self.position = 0

    # --- DeviceModel -----------------------------------------------------------------------

    def regions(self) -> list[RegionSpec]:
        return [
            RegionSpec("data", DATA_OFFSET, DATA_SIZE),
            RegionSpec("selector", SELECTOR_OFFSET, SELECTOR_SIZE, access_sizes=(SELECTOR_SIZE,)),
        ]

    def read(self, offset: int, size: int) -> AccessResult:
        if offset != DATA_OFFSET:
            return self._refuse(offset, size, "read")
        if size not in (1, 2, 4, 8):
            return AccessResult.failure(AccessError.INVALID_ACCESS_SIZE, f"{size}-byte read of the data register")
        return AccessResult.success(int.from_bytes(self._take(size), "little"))

    def write(self, offset: int, size: int, value: int) -> AccessResult:
        if offset == DATA_OFFSET and size in (1, 2, 4, 8):
            return AccessResult.success()  # data writes are ignored, as in QEMU since 2.4
        if offset == SELECTOR_OFFSET and size == SELECTOR_SIZE:
            self.select(int.from_bytes(value.to_bytes(2, "little"), "big"))  # the selector is big-endian
            return AccessResult.success()
        return self._refuse(offset, size, "write")

    def reset(self) -> None:
        """Select the signature, as QEMU's reset does."""
        self.select(FW_CFG_SIGNATURE)

    def describe(self) -> dict[str, str]:
        return {"cpus": str(self.cpus), "dma": "off"}

    # --- behaviour -------------------------------------------------------------------------

    def select(self, key: int) -> None:
        """Select an item and start reading it from its first byte."""
        self.position = 0
        self.selected = key if (key & FW_CFG_ENTRY_MASK) < FW_CFG_MAX_ENTRY else None

    def _item(self) -> bytes:
        if self.selected is None:
            return b""
        key = self.selected & (FW_CFG_ENTRY_MASK | FW_CFG_ARCH_LOCAL)  # the write-channel bit is not part of it
        return self.items.get(key, b"")

    def _take(self, size: int) -> bytes:
        """The next ``size`` bytes of the item, zero-padded past its end."""
        data = self._item()[self.position : self.position + size]
        self.position += len(data)
        return data + bytes(size - len(data))

    @staticmethod
    def _refuse(offset: int, size: int, verb: str) -> AccessResult:
        if offset == SELECTOR_OFFSET:
            return AccessResult.failure(
                AccessError.INVALID_ACCESS_SIZE,
                f"{size}-byte {verb} at offset {offset:#x}: the selector only takes 2-byte writes",
            )
        return AccessResult.failure(
            AccessError.INVALID_REGISTER,
            f"{size}-byte {verb} at offset {offset:#x}: fw_cfg answers only at 0x0 (data) and 0x8 (selector)",
        )
