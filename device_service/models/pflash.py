"""CFI parallel NOR flash with the Intel/Sharp command set, as QEMU's ``pflash_cfi01`` on ``virt``.

One device is one bank: two x16 chips side by side on a 32-bit bus (QEMU's ``width=4``,
``device-width=2``), manufacturer 0x89 and device 0x18 (Intel), 256 KiB sectors. The behaviour
follows QEMU 7.2 as Debian builds it, which carries the stable backport "hw/pflash: implement
update buffer for block writes"; every rule below was checked against that binary by running
Debian's U-Boot under ``qemu-system-aarch64 -M virt`` and reading the flash with ``md``:

* Command writes take the low byte of the value; unknown commands return to read-array mode and
  leave the status alone. 0x00 and 0xF0 read array like 0xFF.
* While a command is active, every read answers for it at any address: the status register
  (replicated into both chips' lanes), the CFI query table, or the identifiers. Query and
  identifier addresses are in units of the bank width (offset >> 2); the query does not wrap per
  sector, the identifier does (offset >> 2 & 0xFF, which also answers 0 = unlocked for the
  block-lock words).
* Query mode only ends with 0xFF; any other write keeps it.
* Block erase (0x20) erases at the first cycle; the confirm only sets "ready". Programming stores
  the value as written (QEMU does not AND it into the old contents).
* Buffered program (0xE8, count-1, data..., 0xD0) stages the data in a 4 KiB buffer (2 KiB per
  chip) aligned on the address of the count write; data outside it sets the program error. The
  confirm commits the buffer unless the status has a program error, in which case the buffer is
  dropped and the flash returns to read array. U-Boot 2023.01 writes the count at its sector's
  start and the data up to 128 KiB further, so under that QEMU its ``saveenv`` fails with "Flash
  buffer write timeout", and so does it here. ``write_buffer=direct`` gives upstream QEMU 7.2.0's
  behaviour instead (data written to the flash as it arrives, no window, a confirm always
  accepted), under which ``saveenv`` works.
* Read-only flash sets 0x20 (erase) or 0x10 (program) in the status and changes nothing.
* Accesses wider than 4 bytes are two 4-byte accesses, low word first (QEMU's default
  ``impl.max_access_size``).

Contents not supplied by ``file`` read as 0x00: QEMU's ``-bios`` image is loaded into flash
memory that starts zeroed, and a bank with no drive is all zeros.

In read-array mode the region is a mirror in the vCPU process (``RegionKind.ROMD``, QEMU's romd
mode): only writes reach the model, and ``take_mirror_updates`` tells the vCPU side when to trap
everything (the first command write) and when to serve reads again (back in read-array mode),
and which bytes each program or erase changed. Reads that do reach the model in read-array mode
are answered from the contents at any size and alignment, as the mirror would. In command mode an
access not aligned to its size is refused: a CPU faults on such an access to Device memory, and
QEMU's memory core refuses it (only its TCG slow path splits it into aligned pieces first).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from device_service.model import (
    AccessError,
    AccessResult,
    ConfigError,
    DeviceModel,
    MirrorUpdate,
    Option,
    RegionKind,
    RegionSpec,
    check_span,
    parse_bool,
    parse_size,
)

log = logging.getLogger("mmiosplit.devices.pflash")

# --- commands (Intel/Sharp command set, first byte of each sequence) -----------------------------
CMD_READ_ARRAY = 0xFF
CMD_AMD_RESET = 0xF0  # AMD's reset; U-Boot sends it while probing, QEMU reads array on it
CMD_READ_ARRAY_QEMU = 0x00  # QEMU's own encoding of read array, also accepted as a command
CMD_PROGRAM = 0x40
CMD_PROGRAM_ALT = 0x10
CMD_BLOCK_ERASE = 0x20
CMD_CLEAR_STATUS = 0x50
CMD_BLOCK_LOCK_SETUP = 0x60
CMD_READ_STATUS = 0x70
CMD_READ_ID = 0x90
CMD_CFI_QUERY = 0x98
CMD_BUFFERED_PROGRAM = 0xE8
# second-cycle bytes
CMD_CONFIRM = 0xD0  # erase confirm, buffered-program confirm, block unlock
CMD_LOCK_BLOCK = 0x01

#: ``self.command`` in read-array mode (QEMU's ``cmd == 0``).
READ_ARRAY = 0x00
#: Commands whose reads return the status register.
STATUS_READ_COMMANDS = frozenset(
    {CMD_PROGRAM, CMD_PROGRAM_ALT, CMD_BLOCK_ERASE, CMD_BLOCK_LOCK_SETUP, CMD_READ_STATUS, CMD_BUFFERED_PROGRAM}
)

# --- status register ----------------------------------------------------------------------------
SR_READY = 0x80  # SR.7: write state machine ready
SR_ERASE_ERROR = 0x20  # SR.5
SR_PROGRAM_ERROR = 0x10  # SR.4

# --- geometry and identity of QEMU virt's flash -------------------------------------------------
BANK_WIDTH = 4  # bytes on the bus
CHIP_WIDTH = 2  # bytes per chip (x16)
CHIPS = BANK_WIDTH // CHIP_WIDTH
#: Query and identifier addresses count in bank-width units (QEMU: ctz(width) + ctz(max) - ctz(device)).
ADDRESS_SHIFT = 2
MANUFACTURER_ID = 0x89  # Intel (virt's ``id0``)
DEVICE_ID = 0x18  # virt's ``id1``
#: log2 of the write buffer per chip (CFI 0x2A); the bank's buffer is CHIPS times that.
WRITE_BUFFER_SHIFT = 11
WRITE_BUFFER_BYTES = CHIPS << WRITE_BUFFER_SHIFT

DEFAULT_SIZE = 64 * 1024 * 1024
DEFAULT_SECTOR = 256 * 1024
MIN_SECTOR = 512  # the CFI table gives the per-chip sector in 256-byte units
MAX_SECTOR = 16 * 1024 * 1024
MAX_SECTORS = 0x10000  # the CFI table gives sectors - 1 in 16 bits
MAX_SIZE = 1024 * 1024 * 1024

REGION = "flash"
#: Changed ranges kept before merging them (they are merged at each mirror update anyway).
MAX_DIRTY_RANGES = 1024

#: ``write_buffer`` values: how a buffered program reaches the flash.
STAGED = "staged"  # QEMU 7.2 as Debian ships it (and upstream QEMU from 9.0): committed by the confirm
DIRECT = "direct"  # upstream QEMU 7.2.0: each data write goes straight into the flash
CFI_TABLE_LENGTH = 0x52


def _ctz(value: int) -> int:
    """Count trailing zero bits (QEMU's ``ctz32``); 32 for zero."""
    return (value & -value).bit_length() - 1 if value else 32


def cfi_table(size: int, sector: int) -> bytes:
    """The CFI query table one chip answers, byte for byte as QEMU builds it for these parameters.

    Each chip holds half of every sector (QEMU's default, not ``old-multiple-chip-handling``).
    """
    blocks = size // sector
    chip_sector = sector // CHIPS
    table = bytearray(CFI_TABLE_LENGTH)
    table[0x10:0x13] = b"QRY"
    table[0x13] = 0x01  # primary command set: Intel/Sharp extended
    table[0x15] = 0x31  # primary extended table at 0x31
    table[0x1B] = 0x45  # Vcc min 4.5 V
    table[0x1C] = 0x55  # Vcc max 5.5 V
    table[0x1F] = 0x07  # typical single-word program time 2^7 us
    table[0x20] = 0x07  # typical buffer write time 2^7 us
    table[0x21] = 0x0A  # typical block erase time 2^10 ms
    table[0x23] = 0x04  # maximum word program time (x typical)
    table[0x24] = 0x04  # maximum buffer write time
    table[0x25] = 0x04  # maximum block erase time
    table[0x27] = _ctz(chip_sector * blocks)  # chip size 2^n bytes
    table[0x28] = 0x02  # interface: x8/x16
    table[0x2A] = WRITE_BUFFER_SHIFT  # write buffer 2^n bytes
    table[0x2C] = 0x01  # one erase block region
    table[0x2D] = (blocks - 1) & 0xFF
    table[0x2E] = ((blocks - 1) >> 8) & 0xFF
    table[0x2F] = (chip_sector >> 8) & 0xFF
    table[0x30] = (chip_sector >> 16) & 0xFF
    table[0x31:0x36] = b"PRI10"  # primary extended table, version 1.0
    table[0x3F] = 0x01  # one protection field
    return bytes(table)


def _replicate(chip_value: int) -> int:
    """One chip's 16-bit answer on both chips' lanes of the 32-bit bus."""
    return chip_value | chip_value << 16


def parse_sector_size(text: str) -> int:
    """A sector size: a power of two from 512 bytes to 16 MiB."""
    sector = parse_size(text)
    if not MIN_SECTOR <= sector <= MAX_SECTOR or sector & (sector - 1):
        raise ValueError("not a power of two between 512 bytes and 16 MiB")
    return sector


def parse_flash_size(text: str) -> int:
    """A bank size, up to 1 GiB (checked against the sector size when the device is built)."""
    size = parse_size(text)
    if not 0 < size <= MAX_SIZE:
        raise ValueError("not between 1 byte and 1 GiB")
    return size


def parse_path(text: str) -> str:
    """A file name; only emptiness is refused here, the file itself is checked when the device is built."""
    if not text.strip():
        raise ValueError("empty")
    return text


def parse_write_buffer(text: str) -> str:
    """``staged`` or ``direct``."""
    word = text.strip().lower()
    if word not in (STAGED, DIRECT):
        raise ValueError("unknown mode")
    return word


def _on_off(flag: bool) -> str:
    return "on" if flag else "off"


class PFlashCfi01(DeviceModel):
    """One bank of CFI flash (two interleaved x16 chips), with its contents, command state and mirror."""

    type_name = "pflash"
    compatible = ("cfi-flash",)
    options = (
        Option("size", parse_flash_size, "a bank size that is a multiple of the sector size, like 64M"),
        Option("sector", parse_sector_size, "a power of two between 512 bytes and 16 MiB, like 256k"),
        Option("file", parse_path, "a file name"),
        Option("persist", parse_bool, "on or off"),
        Option("readonly", parse_bool, "on or off"),
        Option("write_buffer", parse_write_buffer, "staged (Debian's QEMU 7.2) or direct (upstream QEMU 7.2.0)"),
        Option("posted", parse_bool, "on or off"),
    )

    def __init__(
        self,
        name: str,
        base: int,
        size: int = DEFAULT_SIZE,
        sector: int = DEFAULT_SECTOR,
        file: str | None = None,
        persist: bool = False,
        readonly: bool = False,
        write_buffer: str = STAGED,
        posted: bool = True,
    ) -> None:
        super().__init__(name, base)
        if not MIN_SECTOR <= sector <= MAX_SECTOR or sector & (sector - 1):
            raise ConfigError(f"{name}: sector size {sector:#x} is not a power of two between 512 bytes and 16 MiB")
        if not 0 < size <= MAX_SIZE or size % sector:
            raise ConfigError(f"{name}: size {size:#x} is not a multiple of the sector size {sector:#x} up to 1 GiB")
        if size // sector > MAX_SECTORS:
            raise ConfigError(f"{name}: {size // sector} sectors; CFI describes at most {MAX_SECTORS}")
        if persist and file is None:
            raise ConfigError(f"{name}: persist=on needs file=PATH to write the contents back to")
        if persist and readonly:
            raise ConfigError(f"{name}: persist=on and readonly=on contradict each other")
        if write_buffer not in (STAGED, DIRECT):
            raise ConfigError(f"{name}: write_buffer must be {STAGED!r} or {DIRECT!r}, got {write_buffer!r}")
        self.size = size
        self.sector = sector
        self.file = Path(file) if file is not None else None
        self.persist = persist
        self.readonly = readonly
        self.write_buffer = write_buffer
        #: Writes may be queued while the bank is out of array mode (see ``regions``).
        self.posted = posted
        self.cfi = cfi_table(size, sector)
        #: The flash contents (QEMU's ``storage``); survives ``reset``, as flash does.
        self.storage = self._load(name)

        # Command state (QEMU's cmd/wcycle/status/counter and the write buffer).
        self.command = READ_ARRAY
        self.cycle = 0
        self.status = SR_READY
        self.counter = 0
        self.buffer: bytearray | None = None
        self.buffer_offset = 0
        self.buffer_written: tuple[int, int] | None = None  # span the guest wrote into the buffer

        # Mirror bookkeeping: the mode the vCPU side was last told, and byte ranges changed since.
        self._reported_mirror = True
        self._dirty: list[tuple[int, int]] = []

    def _load(self, name: str) -> bytearray:
        storage = bytearray(self.size)
        if self.file is None:
            return storage
        try:
            data = self.file.read_bytes()
        except FileNotFoundError:
            if self.persist:
                return storage  # created at the first program or erase
            raise ConfigError(f"{name}: flash file {str(self.file)!r} does not exist") from None
        except OSError as err:
            raise ConfigError(f"{name}: cannot read flash file {str(self.file)!r}: {err.strerror or err}") from None
        if len(data) > self.size:
            raise ConfigError(
                f"{name}: flash file {str(self.file)!r} has {len(data):#x} bytes, more than the bank's {self.size:#x}"
            )
        storage[: len(data)] = data
        return storage

    # --- DeviceModel -----------------------------------------------------------------------

    def regions(self) -> list[RegionSpec]:
        # Posted: a program or an erase is a run of writes whose outcome the guest only learns from a status
        # read, which is an exit that delivers the queue first. Clients post a ROMD region's writes only while
        # its mirror is off (docs/protocol.md), so the write that leaves array mode still exits at once.
        return [RegionSpec(REGION, 0, self.size, kind=RegionKind.ROMD, posted=self.posted)]

    def read(self, offset: int, size: int) -> AccessResult:
        error = check_span(offset, size, self.size, "read")
        if error is not None:
            return error
        if self.command == READ_ARRAY:
            return AccessResult.success(int.from_bytes(self.storage[offset : offset + size], "little"))
        if offset % size:
            return _unaligned(offset, size, "read", self.command)
        if size == 8:
            return AccessResult.success(self._command_read(offset) | self._command_read(offset + 4) << 32)
        return AccessResult.success(self._command_read(offset) & ((1 << (8 * size)) - 1))

    def write(self, offset: int, size: int, value: int) -> AccessResult:
        error = check_span(offset, size, self.size, "write")
        if error is not None:
            return error
        if offset % size:
            return _unaligned(offset, size, "write", self.command)
        if size == 8:
            self._write(offset, 4, value & 0xFFFF_FFFF)
            self._write(offset + 4, 4, value >> 32)
        else:
            self._write(offset, size, value)
        return AccessResult.success()

    def reset(self) -> None:
        """Back to read array with the status ready and any staged buffer dropped; contents are kept."""
        with self.lock:
            self.command = READ_ARRAY
            self.cycle = 0
            self.status = SR_READY
            self.counter = 0
            self._drop_buffer()

    def describe(self) -> dict[str, str]:
        return {
            "size": f"{self.size:#x}",
            "sector": f"{self.sector:#x}",
            "bank-width": str(BANK_WIDTH),
            "file": str(self.file) if self.file is not None else "",
            "persist": _on_off(self.persist),
            "readonly": _on_off(self.readonly),
            "write-buffer": self.write_buffer,
            "posted": _on_off(self.posted),
        }

    # --- RomdDevice ------------------------------------------------------------------------

    def mirror_contents(self, region: str, offset: int, length: int) -> bytes:
        """The current contents, for the mirror the vCPU side serves array-mode reads from."""
        if region != REGION:
            raise KeyError(f"{self.name} has no ROMD region {region!r}; it has {REGION!r}")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"{self.name}: {length:#x} bytes at {offset:#x} are outside {self.size:#x} bytes")
        with self.lock:
            return bytes(self.storage[offset : offset + length])

    def take_mirror_updates(self) -> list[MirrorUpdate]:
        """The mode switch and the changed bytes since the last call, as at most one update."""
        with self.lock:
            enabled = self.mirror_enabled
            if enabled == self._reported_mirror and not self._dirty:
                return []
            patches = tuple((start, bytes(self.storage[start:end])) for start, end in _coalesce(self._dirty))
            self._dirty.clear()
            self._reported_mirror = enabled
            return [MirrorUpdate(REGION, enabled, patches)]

    @property
    def mirror_enabled(self) -> bool:
        """True in read-array mode, where reads may come from the mirror (QEMU's romd flag)."""
        return self.command == READ_ARRAY

    # --- reads in command mode -------------------------------------------------------------

    def _command_read(self, offset: int) -> int:
        """What a read of up to 4 bytes at ``offset`` returns while a command is active."""
        if self.command in STATUS_READ_COMMANDS:
            return _replicate(self.status)
        if self.command == CMD_READ_ID:
            index = (offset >> ADDRESS_SHIFT) & 0xFF
            if index == 0:
                return _replicate(MANUFACTURER_ID)
            if index == 1:
                return _replicate(DEVICE_ID)
            return 0  # block lock status and the rest: unlocked, as QEMU
        if self.command == CMD_CFI_QUERY:
            index = offset >> ADDRESS_SHIFT
            return _replicate(self.cfi[index]) if index < CFI_TABLE_LENGTH else 0
        raise AssertionError(f"no read behaviour for command {self.command:#04x}")  # pragma: no cover

    # --- the command state machine ---------------------------------------------------------

    def _write(self, offset: int, size: int, value: int) -> None:
        """One bus write of up to 4 bytes: the next cycle of the current command, or a new command."""
        byte = value & 0xFF
        if self.cycle == 0:
            self._first_cycle(offset, byte)
        elif self.cycle == 1:
            self._second_cycle(offset, size, value)
        elif self.cycle == 2:
            self._buffer_data(offset, size, value)
        else:
            self._buffer_confirm(byte)

    def _first_cycle(self, offset: int, byte: int) -> None:
        if byte in (CMD_READ_ARRAY, CMD_AMD_RESET, CMD_READ_ARRAY_QEMU):
            self._read_array()
        elif byte in (CMD_PROGRAM, CMD_PROGRAM_ALT, CMD_BLOCK_LOCK_SETUP, CMD_CFI_QUERY):
            self._start(byte)
        elif byte == CMD_BLOCK_ERASE:
            self._erase(offset)
            self._start(byte)
        elif byte == CMD_BUFFERED_PROGRAM:
            self.status |= SR_READY
            self._start(byte)
        elif byte in (CMD_READ_STATUS, CMD_READ_ID):
            self.command = byte  # a read mode: the next write is a new command
        elif byte == CMD_CLEAR_STATUS:
            self.status = 0
            self._read_array()
        else:
            log.debug("%s: unknown command %#04x at %#x; back to read array", self.name, byte, offset)
            self._read_array()

    def _second_cycle(self, offset: int, size: int, value: int) -> None:
        byte = value & 0xFF
        if self.command in (CMD_PROGRAM, CMD_PROGRAM_ALT):
            if self.readonly:
                self.status |= SR_PROGRAM_ERROR
            else:
                self._store(offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
            self.status |= SR_READY
            self.cycle = 0
        elif self.command == CMD_BLOCK_ERASE:
            if byte == CMD_CONFIRM:
                self.cycle = 0
                self.status |= SR_READY
            else:
                self._read_array()  # 0xFF, or a sequence QEMU does not implement
        elif self.command == CMD_BLOCK_LOCK_SETUP:
            if byte in (CMD_CONFIRM, CMD_LOCK_BLOCK):
                self.cycle = 0
                self.status |= SR_READY  # locks are not emulated: every block stays unlocked
            else:
                self._read_array()  # 0xFF, lock-down (0x2F) and the rest
        elif self.command == CMD_CFI_QUERY:
            if byte == CMD_READ_ARRAY:
                self._read_array()
        else:  # CMD_BUFFERED_PROGRAM: the word count - 1, one chip's lane
            self.counter = value & ((1 << (8 * CHIP_WIDTH)) - 1)
            self.cycle = 2
            self.buffer_written = None
            if self.write_buffer == STAGED:
                self.buffer_offset = offset & ~(WRITE_BUFFER_BYTES - 1)
                self.buffer = self.storage[self.buffer_offset : self.buffer_offset + WRITE_BUFFER_BYTES]

    def _buffer_data(self, offset: int, size: int, value: int) -> None:
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        buffer = self.buffer
        if self.readonly:
            self.status |= SR_PROGRAM_ERROR
        elif self.write_buffer == DIRECT:
            self.storage[offset : offset + size] = data  # straight into the flash, as QEMU before 2024
            self._mark_dirty(offset, offset + size)
            self._note_written(offset, size)
        elif buffer is None or offset < self.buffer_offset or offset + size > self.buffer_offset + WRITE_BUFFER_BYTES:
            self.status |= SR_PROGRAM_ERROR  # outside the buffer's window
        else:
            start = offset - self.buffer_offset
            buffer[start : start + size] = data
            self._note_written(offset, size)
        self.status |= SR_READY
        if self.counter == 0:
            self.cycle = 3
            if self.write_buffer == DIRECT and self.persist and self.buffer_written is not None:
                low, high = self.buffer_written
                self._write_back(low, bytes(self.storage[low:high]))
        self.counter = (self.counter - 1) & 0xFFFF_FFFF_FFFF_FFFF

    def _note_written(self, offset: int, size: int) -> None:
        low, high = self.buffer_written or (offset, offset + size)
        self.buffer_written = (min(low, offset), max(high, offset + size))

    def _buffer_confirm(self, byte: int) -> None:
        if self.write_buffer == DIRECT:
            self.buffer_written = None
            if byte == CMD_CONFIRM:
                self.cycle = 0
                self.status |= SR_READY
            else:
                self._read_array()  # the data is in the flash already
        elif byte == CMD_CONFIRM and not self.status & SR_PROGRAM_ERROR:
            if self.buffer is not None and self.buffer_written is not None:
                low, high = self.buffer_written
                start = low - self.buffer_offset
                self._store(low, bytes(self.buffer[start : start + high - low]))
            self._drop_buffer()
            self.cycle = 0
            self.status |= SR_READY
        else:
            self._drop_buffer()
            self._read_array()

    # --- helpers ---------------------------------------------------------------------------

    def _start(self, command: int) -> None:
        self.command = command
        self.cycle = 1

    def _read_array(self) -> None:
        self.command = READ_ARRAY
        self.cycle = 0

    def _drop_buffer(self) -> None:
        self.buffer = None
        self.buffer_written = None

    def _erase(self, offset: int) -> None:
        if self.readonly:
            self.status |= SR_ERASE_ERROR
        else:
            start = offset & ~(self.sector - 1)
            self._store(start, b"\xff" * self.sector)
        self.status |= SR_READY

    def _store(self, offset: int, data: bytes) -> None:
        """Change the contents: remember the range for the mirror, and write it back to the file."""
        self.storage[offset : offset + len(data)] = data
        self._mark_dirty(offset, offset + len(data))
        if self.persist:
            self._write_back(offset, data)

    def _mark_dirty(self, start: int, end: int) -> None:
        """Remember a changed range for the next mirror update, merging as it goes so that the list
        stays short even when nobody takes the updates (a transport without a mirror)."""
        dirty = self._dirty
        if dirty and dirty[-1][0] <= start <= dirty[-1][1]:
            dirty[-1] = (dirty[-1][0], max(dirty[-1][1], end))
        else:
            dirty.append((start, end))
            if len(dirty) > MAX_DIRTY_RANGES:
                merged = _coalesce(dirty)
                if len(merged) > MAX_DIRTY_RANGES // 2:  # scattered: one span (unchanged bytes are harmless)
                    merged = [(merged[0][0], merged[-1][1])]
                self._dirty = merged

    def _write_back(self, offset: int, data: bytes) -> None:
        """Write changed bytes to ``file`` at once, so a later run of the whole stack sees them."""
        assert self.file is not None
        try:
            fd = os.open(self.file, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.pwrite(fd, data, offset)
            finally:
                os.close(fd)
        except OSError as err:
            # QEMU reports a failed flash update and carries on; so do we.
            log.error("%s: could not update %s: %s", self.name, self.file, err.strerror or err)


def _unaligned(offset: int, size: int, verb: str, command: int) -> AccessResult:
    return AccessResult.failure(
        AccessError.UNALIGNED_ACCESS,
        f"{size}-byte {verb} at offset {offset:#x} is not aligned to its size (flash command {command:#04x} active)",
    )


def _coalesce(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sort ranges and merge those that overlap or touch."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged
