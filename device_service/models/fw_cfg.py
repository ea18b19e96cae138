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

With ``dma=on`` (the default, as QEMU 7.2's ``virt``) the device also offers the DMA interface, as
QEMU's ``fw_cfg_dma_transfer``: the ID reads 3, and an 8-byte big-endian register at +16 takes the
guest-physical address of an ``FWCfgDmaAccess`` (control, length, address; all big-endian). Writing
the whole register, or its low half at +20 after the high half at +16, starts the transfer at once:
the device reads the structure through its DMA handle, optionally selects the key in control's top
16 bits, then reads (copies item bytes to guest memory, zeros past the item's end), skips or writes
``length`` bytes, and writes control back as 0, or with the ERROR bit when a guest address cannot
be reached or a write hits an item that takes none (no item here does). Reads of the register give
the signature "QEMU CFG" (0x51454d5520434647, big-endian) at any size. U-Boot's ``qfw`` then loads
items by DMA, as it does under QEMU (QEMU 7.2 virt answered ``md.b 0x09020010 8`` with "QEMU CFG" and
the ID with 3). A device the VM has granted no DMA window ends every transfer with ERROR, so a VM must
grant fw_cfg its RAM, or use ``dma=off``. ``dma=off`` gives QEMU's ``dma_enabled=false``: ID 1 and no
register at +16.
"""

from __future__ import annotations

import contextlib

from device_service.model import (
    AccessError,
    AccessResult,
    ConfigError,
    DeviceModel,
    DmaError,
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
FW_CFG_VERSION_DMA = 0x02  # DMA interface (option dma)

# Register layout of the memory-mapped interface.
DATA_OFFSET = 0x0
DATA_SIZE = 8  # data_width on virt
SELECTOR_OFFSET = 0x8
SELECTOR_SIZE = 2
DMA_OFFSET = 0x10
DMA_SIZE = 8

#: What a read of the DMA address register gives: "QEMU CFG", big-endian.
DMA_SIGNATURE = 0x5145_4D55_2043_4647

# FWCfgDmaAccess.control bits (QEMU include/hw/nvram/fw_cfg.h).
DMA_CTL_ERROR = 0x01
DMA_CTL_READ = 0x02
DMA_CTL_SKIP = 0x04
DMA_CTL_SELECT = 0x08
DMA_CTL_WRITE = 0x10
DMA_ACCESS_SIZE = 16  # be32 control, be32 length, be64 address

MAX_CPUS = 0xFFFF


parse_cpus = int_in_range(1, MAX_CPUS)  # a CPU count for FW_CFG_NB_CPUS


def _u16(value: int) -> bytes:
    return value.to_bytes(2, "little")  # QEMU's fw_cfg_add_i16 stores little-endian


class FwCfg(DeviceModel):
    """fw_cfg with the items QEMU gives a kernel-less ``virt`` machine, through the data register or DMA."""

    type_name = "fw_cfg"
    does_dma = True  # a transfer runs inside the write of the DMA address register
    compatible = ("qemu,fw-cfg-mmio",)
    options = (
        Option("cpus", parse_cpus, "a number of CPUs from 1 to 65535"),
        Option("nographic", parse_bool, "on or off"),
        Option("dma", parse_bool, "on (the DMA interface, QEMU virt's default) or off"),
    )

    def __init__(self, name: str, base: int, cpus: int = 1, nographic: bool = True, dma: bool = True) -> None:
        super().__init__(name, base)
        if not 1 <= cpus <= MAX_CPUS:
            raise ConfigError(f"{name}: cpus must be between 1 and {MAX_CPUS}, got {cpus}")
        self.cpus = cpus
        self.nographic = nographic
        self.dma_enabled = dma
        version = FW_CFG_VERSION | (FW_CFG_VERSION_DMA if dma else 0)
        #: Item data by key (arch-local items would have bit 15 set; virt has none).
        self.items: dict[int, bytes] = {
            FW_CFG_SIGNATURE: SIGNATURE,
            FW_CFG_ID: version.to_bytes(4, "little"),
            FW_CFG_UUID: bytes(16),
            FW_CFG_NOGRAPHIC: _u16(int(nographic)),
            FW_CFG_NB_CPUS: _u16(cpus),
            FW_CFG_BOOT_MENU: _u16(0),
            FW_CFG_FILE_DIR: (0).to_bytes(4, "big"),  # the file count, big-endian; no files follow
        }
        self.selected: int | None = FW_CFG_SIGNATURE
        self.position = 0
        #: The DMA address register; QEMU keeps it across a reset and clears it when a transfer starts.
        self.dma_address = 0

    # --- DeviceModel -----------------------------------------------------------------------

    def regions(self) -> list[RegionSpec]:
        regions = [
            RegionSpec("data", DATA_OFFSET, DATA_SIZE),
            RegionSpec("selector", SELECTOR_OFFSET, SELECTOR_SIZE, access_sizes=(SELECTOR_SIZE,)),
        ]
        if self.dma_enabled:
            regions.append(RegionSpec("dma", DMA_OFFSET, DMA_SIZE))
        return regions

    def read(self, offset: int, size: int) -> AccessResult:
        if self._is_dma_register(offset, size):
            return self._read_dma_register(offset - DMA_OFFSET, size)
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
        if self._is_dma_register(offset, size):
            return self._write_dma_register(offset - DMA_OFFSET, size, value)
        return self._refuse(offset, size, "write")

    def reset(self) -> None:
        """Select the signature, as QEMU's reset does (the DMA address register keeps its value there too)."""
        self.select(FW_CFG_SIGNATURE)

    def describe(self) -> dict[str, str]:
        return {"cpus": str(self.cpus), "dma": "on" if self.dma_enabled else "off"}

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

    # --- the DMA interface -------------------------------------------------------------------

    def _is_dma_register(self, offset: int, size: int) -> bool:
        return self.dma_enabled and offset >= DMA_OFFSET and offset + size <= DMA_OFFSET + DMA_SIZE

    @staticmethod
    def _read_dma_register(offset: int, size: int) -> AccessResult:
        """The signature bytes at ``offset``, big-endian as the register is (QEMU's ``fw_cfg_dma_mem_read``)."""
        if offset % size:
            return AccessResult.failure(
                AccessError.UNALIGNED_ACCESS,
                f"{size}-byte read at offset {DMA_OFFSET + offset:#x} is not aligned to its size",
            )
        window = DMA_SIGNATURE.to_bytes(DMA_SIZE, "big")[offset : offset + size]
        return AccessResult.success(int.from_bytes(window, "little"))

    def _write_dma_register(self, offset: int, size: int, value: int) -> AccessResult:
        """QEMU's ``fw_cfg_dma_mem_write``: the high half, then the low half (which starts), or all 8 bytes."""
        word = int.from_bytes(value.to_bytes(size, "little"), "big")  # the register is big-endian
        if size == 4 and offset == 0:
            self.dma_address = word << 32
        elif size == 4 and offset == 4:
            self.dma_address |= word
            self.dma_transfer()
        elif size == 8 and offset == 0:
            self.dma_address = word
            self.dma_transfer()
        else:
            return AccessResult.failure(
                AccessError.INVALID_ACCESS_SIZE,
                f"{size}-byte write at offset {DMA_OFFSET + offset:#x}: the DMA address register takes 4-byte "
                f"writes at 0x10 and 0x14 or an 8-byte write at 0x10",
            )
        return AccessResult.success()

    def dma_transfer(self) -> None:
        """Carry out the ``FWCfgDmaAccess`` at the address register, as QEMU's ``fw_cfg_dma_transfer``.

        A guest address the DMA handle refuses is the guest's mistake, not the device's: it becomes the
        ERROR bit in the control word (when that can be written back at all), never an exception."""
        address, self.dma_address = self.dma_address, 0
        try:
            access = self.dma.read(address, DMA_ACCESS_SIZE)
        except DmaError:
            self._write_control(address, DMA_CTL_ERROR)
            return
        control = int.from_bytes(access[0:4], "big")
        length = int.from_bytes(access[4:8], "big")
        target = int.from_bytes(access[8:16], "big")
        if control & DMA_CTL_SELECT:
            self.select(control >> 16)
        # QEMU's precedence: READ, then WRITE, then SKIP; none of them transfers nothing.
        reading = bool(control & DMA_CTL_READ)
        writing = not reading and bool(control & DMA_CTL_WRITE)
        if not (reading or writing or control & DMA_CTL_SKIP):
            length = 0
        status = 0
        item = self._item()
        while length > 0 and not status & DMA_CTL_ERROR:
            if self.position >= len(item):  # no item, no data, or past its end
                chunk = length
                if reading:
                    status |= self._dma_store(target, bytes(chunk))
                if writing:
                    status |= DMA_CTL_ERROR
            else:
                chunk = min(length, len(item) - self.position)
                if reading:
                    status |= self._dma_store(target, item[self.position : self.position + chunk])
                if writing:
                    status |= DMA_CTL_ERROR  # no item here takes writes (QEMU: only allow_write files)
                self.position += chunk
            target = (target + chunk) & ((1 << 64) - 1)
            length -= chunk
        self._write_control(address, status)

    def _dma_store(self, address: int, data: bytes) -> int:
        """Store item bytes in guest memory; the ERROR bit if the handle refuses, else 0."""
        try:
            self.dma.write(address, data)
        except DmaError:
            return DMA_CTL_ERROR
        return 0

    def _write_control(self, address: int, control: int) -> None:
        """Write the control word back (big-endian); if even that is refused, the guest gets nothing, as in QEMU."""
        with contextlib.suppress(DmaError):
            self.dma.write(address, control.to_bytes(4, "big"))

    def _refuse(self, offset: int, size: int, verb: str) -> AccessResult:
        if offset == SELECTOR_OFFSET:
            return AccessResult.failure(
                AccessError.INVALID_ACCESS_SIZE,
                f"{size}-byte {verb} at offset {offset:#x}: the selector only takes 2-byte writes",
            )
        where = "0x0 (data), 0x8 (selector) and 0x10 (DMA)" if self.dma_enabled else "0x0 (data) and 0x8 (selector)"
        return AccessResult.failure(
            AccessError.INVALID_REGISTER,
            f"{size}-byte {verb} at offset {offset:#x}: fw_cfg answers only at {where}",
        )
