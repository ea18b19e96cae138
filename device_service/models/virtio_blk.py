"""A virtio block device behind one virtio-mmio transport, backed by a raw image file.

This is what QEMU 7.2 builds for ``-device virtio-blk-device,drive=...`` on ``virt``: the transport of
``hw/virtio/virtio-mmio.c``, the split virtqueue of ``hw/virtio/virtio.c`` and the request handling of
``hw/block/virtio-blk.c``, so that U-Boot's and EDK2's drivers see the same registers, the same
features and the same config space as under QEMU, and a person can put a FAT image behind it.

Checked against ``qemu-system-aarch64 -M virt`` (Debian's 7.2) with U-Boot's ``md``/``mw`` on the
transport at 0x0a003e00 and ``virtio scan``/``ls virtio 0``:

* Version 1 (legacy: GuestPageSize, QueueAlign, QueuePFN) by default, because QEMU's virtio-mmio has
  ``force-legacy=on`` and ``virt`` does not change it; ``legacy=off`` gives Version 2 (QueueDesc/
  Driver/Device Low/High, QueueReady, two feature pages, ConfigGeneration), as
  ``-global virtio-mmio.force-legacy=false`` does.
* DeviceFeatures: legacy 0x31006ed4 (SEG_MAX, GEOMETRY, BLK_SIZE, SCSI, FLUSH, TOPOLOGY, CONFIG_WCE,
  DISCARD, WRITE_ZEROES, NOTIFY_ON_EMPTY, INDIRECT_DESC, EVENT_IDX; RO with ``readonly=on``);
  modern page 0 0x30006e54 and page 1 0x101 (VERSION_1, RING_RESET). QEMU offers neither SIZE_MAX nor MQ.
* QueueNumMax reads 1024 for queue 0 and 0 for the others; the ring starts with 256 entries.
* the config space is 0x39 bytes (up to ``write_zeroes_may_unmap``); reads past it give all ones:
  capacity in 512-byte sectors, seg_max 254, the geometry QEMU guesses, blk_size 512, writeback 1,
  num_queues 1, max discard/write-zeroes sectors 0x3fffff, one segment each, alignment 1.
* SHM length registers read all ones; registers other than config take only 4-byte accesses (other
  sizes read zero and write nothing); 8-byte accesses are two 4-byte ones, low word first.

With a DMA handle over the guest's RAM, U-Boot's ``virtio scan``, ``ls virtio 0`` and ``load virtio 0``
make the same transport accesses, with the same values, as under QEMU's
``-trace memory_region_ops_read,memory_region_ops_write`` (43 legacy, 41 modern).

Requests follow ``virtio_blk_handle_request``: IN/OUT with range checks (``VIRTIO_BLK_S_IOERR`` past the
end or for a length that is not whole sectors), FLUSH (``fsync``), GET_ID (the ``serial`` option,
NUL-terminated only when shorter than 20 bytes), DISCARD (accepted and ignored, as QEMU's default
``discard=ignore``), WRITE_ZEROES, the legacy SCSI command (unsupported), anything else
``VIRTIO_BLK_S_UNSUPP``; a write to a ``readonly=on`` disk fails with IOERR as QEMU's read-only backend
does. The used length is the whole writable part of the chain, as QEMU writes it.

Guest mistakes in the ring (a head or ``next`` out of range, a loop, a zero-length buffer, a writable
buffer before a readable one, a bad indirect table, headers too short, a buffer the DMA handle refuses)
are QEMU's ``virtio_error``: the device is marked broken and processes nothing until a reset, and when
VERSION_1 was negotiated it sets DEVICE_NEEDS_RESET and sends a configuration-change interrupt. They
never raise out of an access. One difference: QEMU maps every buffer of a chain before it acts, this
model reaches buffers as it needs them, so a refused buffer can come after some bytes moved.

Interrupts: the transport's one line is high while InterruptStatus is not zero (bit 0 used buffer,
bit 1 configuration change) and drops when the guest acknowledges the bits; as in QEMU, a broken
device does not change the line until it is reset. Everything happens inside the access that
notifies the queue: the request is complete, and the line raised, before that access completes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from device_service.model import (
    AccessError,
    AccessResult,
    ConfigError,
    Dma,
    DmaError,
    LineSpec,
    Option,
    RegionSpec,
    Trigger,
    WordDevice,
    check_span,
    parse_bool,
)

log = logging.getLogger(__name__)

TRANSPORT_SIZE = 0x200
SECTOR = 512

# --- the virtio-mmio register map (virtio 1.2 section 4.2.2; QEMU's virtio_mmio.h) ----------------
MAGIC_VALUE = 0x000
VERSION = 0x004
DEVICE_ID = 0x008
VENDOR_ID = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
GUEST_PAGE_SIZE = 0x028  # legacy
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_ALIGN = 0x03C  # legacy
QUEUE_PFN = 0x040  # legacy
QUEUE_READY = 0x044  # modern
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_AVAIL_LOW = 0x090
QUEUE_AVAIL_HIGH = 0x094
QUEUE_USED_LOW = 0x0A0
QUEUE_USED_HIGH = 0x0A4
SHM_LEN_LOW = 0x0B0
SHM_LEN_HIGH = 0x0B4
CONFIG_GENERATION = 0x0FC  # modern
CONFIG = 0x100

MAGIC = 0x7472_6976  # "virt"
VENDOR_QEMU = 0x554D_4551  # "QEMU"
VIRTIO_ID_BLOCK = 2

# Device status bits.
STATUS_ACKNOWLEDGE = 0x01
STATUS_DRIVER = 0x02
STATUS_DRIVER_OK = 0x04
STATUS_FEATURES_OK = 0x08
STATUS_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

# InterruptStatus bits.
ISR_USED_BUFFER = 0x1
ISR_CONFIG = 0x2

# Feature bits.
F_BLK_SIZE_MAX = 1
F_BLK_SEG_MAX = 2
F_BLK_GEOMETRY = 4
F_BLK_RO = 5
F_BLK_BLK_SIZE = 6
F_BLK_SCSI = 7
F_BLK_FLUSH = 9
F_BLK_TOPOLOGY = 10
F_BLK_CONFIG_WCE = 11
F_BLK_MQ = 12
F_BLK_DISCARD = 13
F_BLK_WRITE_ZEROES = 14
F_NOTIFY_ON_EMPTY = 24
F_ANY_LAYOUT = 27
F_RING_INDIRECT_DESC = 28
F_RING_EVENT_IDX = 29
F_VERSION_1 = 32
F_RING_RESET = 40


def _bits(*bits: int) -> int:
    value = 0
    for bit in bits:
        value |= 1 << bit
    return value


_BLK_COMMON = _bits(F_BLK_SEG_MAX, F_BLK_GEOMETRY, F_BLK_BLK_SIZE, F_BLK_FLUSH, F_BLK_TOPOLOGY, F_BLK_CONFIG_WCE,
                    F_BLK_DISCARD, F_BLK_WRITE_ZEROES)
#: What QEMU 7.2 offers a legacy driver (read 0x31006ed4 from DeviceFeatures on virt, no readonly).
LEGACY_FEATURES = _BLK_COMMON | _bits(F_BLK_SCSI, F_NOTIFY_ON_EMPTY, F_RING_INDIRECT_DESC, F_RING_EVENT_IDX)
#: What QEMU 7.2 offers a modern driver (pages 0x30006e54 and 0x101 with force-legacy=false).
MODERN_FEATURES = _BLK_COMMON | _bits(F_RING_INDIRECT_DESC, F_RING_EVENT_IDX, F_VERSION_1, F_RING_RESET)
#: Bits QEMU keeps in a modern device's host features but hides from the feature registers
#: (``legacy_features``): a driver may still set them, so they are not masked from what it accepts.
MODERN_HIDDEN = _bits(F_NOTIFY_ON_EMPTY, F_ANY_LAYOUT)

# --- virtqueues ---------------------------------------------------------------------------------
QUEUE_MAX = 1024  # VIRTIO_QUEUE_MAX: QueueSel and QueueNotify values at or past it are ignored
QUEUE_SIZE_MAX = 1024  # VIRTQUEUE_MAX_SIZE, what QueueNumMax reads
QUEUE_SIZE = 256  # virtio-blk's default queue-size
LEGACY_ALIGN = 4096  # VIRTIO_PCI_VRING_ALIGN, the ring alignment before the driver writes QueueAlign

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
DESC_SIZE = 16
AVAIL_F_NO_INTERRUPT = 1

# --- virtio-blk ---------------------------------------------------------------------------------
T_IN = 0
T_OUT = 1
T_SCSI_CMD = 2
T_FLUSH = 4
T_GET_ID = 8
T_DISCARD = 11
T_WRITE_ZEROES = 13
T_BARRIER = 0x8000_0000
S_OK = 0
S_IOERR = 1
S_UNSUPP = 2
ID_BYTES = 20
OUTHDR_SIZE = 16  # type, ioprio, sector
DWZ_SIZE = 16  # sector, num_sectors, flags
WRITE_ZEROES_FLAG_UNMAP = 1
REQUEST_MAX_SECTORS = 0x3F_FFFF  # BDRV_REQUEST_MAX_SECTORS on a 64-bit host
MAX_DISCARD_SECTORS = 0x3F_FFFF
MAX_WRITE_ZEROES_SECTORS = 0x3F_FFFF
CONFIG_SIZE = 0x39  # endof(virtio_blk_config, write_zeroes_may_unmap) with WRITE_ZEROES offered
CONFIG_WCE = 0x20  # offset of the writeback byte, the only config field a driver may change
_ZERO_CHUNK = 1 << 20


class GuestError(Exception):
    """Something the guest put in a ring or request that QEMU answers with ``virtio_error``."""


Segment = tuple[int, int]  # (guest-physical address, length)


@dataclass
class Element:
    """One popped descriptor chain: its head index, readable (out) and writable (in) buffers."""

    head: int
    out: list[Segment] = field(default_factory=list)
    inp: list[Segment] = field(default_factory=list)


def _u16(data: bytes, offset: int = 0) -> int:
    return int.from_bytes(data[offset : offset + 2], "little")


def _u32(data: bytes, offset: int = 0) -> int:
    return int.from_bytes(data[offset : offset + 4], "little")


def _u64(data: bytes, offset: int = 0) -> int:
    return int.from_bytes(data[offset : offset + 8], "little")


def _size(segments: list[Segment]) -> int:
    return sum(length for _, length in segments)


def _discard_front(segments: list[Segment], count: int) -> list[Segment]:
    """The buffers without their first ``count`` bytes (QEMU's ``iov_discard_front``)."""
    out: list[Segment] = []
    for address, length in segments:
        if count >= length:
            count -= length
            continue
        out.append((address + count, length - count))
        count = 0
    return out


def _discard_back(segments: list[Segment], count: int) -> list[Segment]:
    """The buffers without their last ``count`` bytes (QEMU's ``iov_discard_back``)."""
    out = list(segments)
    while out and count:
        address, length = out.pop()
        if length > count:
            out.append((address, length - count))
            count = 0
        else:
            count -= length
    return out


class SplitQueue:
    """One split virtqueue as QEMU's ``VirtQueue`` keeps it: sizes, ring addresses and indexes.

    It reads and writes the rings only through the DMA handle it is given, and raises ``GuestError``
    for anything QEMU's ``virtqueue_split_pop`` reports with ``virtio_error``."""

    def __init__(self, num_default: int) -> None:
        self.num_default = num_default
        self.align = LEGACY_ALIGN
        self.reset()

    def reset(self) -> None:
        """QEMU's ``__virtio_queue_reset``: no rings, indexes at zero, the default size back."""
        self.num = self.num_default
        self.desc = 0
        self.avail = 0
        self.used = 0
        self.last_avail_idx = 0
        self.used_idx = 0
        self.inuse = 0
        self.signalled_used = 0
        self.signalled_used_valid = False

    def set_num(self, num: int) -> None:
        """QEMU's ``virtio_queue_set_num``: a queue cannot appear or vanish, nor grow past 1024."""
        if bool(num) != bool(self.num) or num > QUEUE_SIZE_MAX:
            return
        self.num = num

    def update_legacy_rings(self) -> None:
        """QEMU's ``virtio_queue_update_rings``: the legacy layout, avail after desc, used aligned."""
        if not self.num or not self.desc or not self.align:
            return
        self.avail = self.desc + self.num * DESC_SIZE
        end = self.avail + 4 + 2 * self.num
        self.used = (end + self.align - 1) & ~(self.align - 1)

    # --- ring access -----------------------------------------------------------------------

    @staticmethod
    def _read(dma: Dma, address: int, length: int, what: str) -> bytes:
        try:
            return dma.read(address, length)
        except DmaError as err:
            raise GuestError(f"cannot read {what} at {address:#x}: {err}") from None

    @staticmethod
    def _write(dma: Dma, address: int, data: bytes, what: str) -> None:
        try:
            dma.write(address, data)
        except DmaError as err:
            raise GuestError(f"cannot write {what} at {address:#x}: {err}") from None

    def avail_idx(self, dma: Dma) -> int:
        return _u16(self._read(dma, self.avail + 2, 2, "the available ring's index"))

    def empty(self, dma: Dma) -> bool:
        """QEMU's ``virtio_queue_split_empty``: no rings counts as empty."""
        if not self.avail:
            return True
        return self.avail_idx(dma) == self.last_avail_idx

    def set_avail_event(self, dma: Dma, value: int) -> None:
        """The used ring's trailing ``avail_event``: where the driver must next notify (EVENT_IDX)."""
        self._write(dma, self.used + 4 + 8 * self.num, (value & 0xFFFF).to_bytes(2, "little"), "avail_event")

    def pop(self, dma: Dma, event_idx: bool) -> Element | None:
        """The next available chain, or None when there is none (QEMU's ``virtqueue_split_pop``)."""
        if self.empty(dma):
            return None
        if self.inuse >= self.num:
            raise GuestError("Virtqueue size exceeded")
        index = self.last_avail_idx
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        head = _u16(self._read(dma, self.avail + 4 + 2 * (index % self.num), 2, "the available ring"))
        if head >= self.num:
            raise GuestError(f"Guest says index {head} is available")
        if event_idx:
            self.set_avail_event(dma, self.last_avail_idx)

        table, limit = self.desc, self.num
        addr, length, flags, nxt = self._desc(dma, table, head)
        if flags & DESC_F_INDIRECT:
            if not length or length % DESC_SIZE:
                raise GuestError("Invalid size for indirect buffer table")
            table, limit = addr, length // DESC_SIZE
            addr, length, flags, nxt = self._desc(dma, table, 0)

        element = Element(head)
        entries = 0
        while True:
            if flags & DESC_F_WRITE:
                element.inp.append(self._segment(addr, length, len(element.out) + len(element.inp)))
            else:
                if element.inp:
                    raise GuestError("Incorrect order for descriptors")
                element.out.append(self._segment(addr, length, len(element.out)))
            entries += 1
            if entries > limit:
                raise GuestError("Looped descriptor")
            if not flags & DESC_F_NEXT:
                break
            if nxt >= limit:
                raise GuestError(f"Desc next is {nxt}")
            addr, length, flags, nxt = self._desc(dma, table, nxt)
        self.inuse += 1
        return element

    def _desc(self, dma: Dma, table: int, index: int) -> tuple[int, int, int, int]:
        raw = self._read(dma, table + DESC_SIZE * index, DESC_SIZE, f"descriptor {index}")
        return _u64(raw, 0), _u32(raw, 8), _u16(raw, 12), _u16(raw, 14)

    @staticmethod
    def _segment(address: int, length: int, count: int) -> Segment:
        if not length:
            raise GuestError("virtio: zero sized buffers are not allowed")
        if count >= QUEUE_SIZE_MAX:
            raise GuestError("virtio: too many descriptors in a chain")
        return address, length

    def push(self, dma: Dma, element: Element, length: int) -> None:
        """Return a chain in the used ring with ``length`` bytes written (``virtqueue_push``)."""
        slot = self.used + 4 + 8 * (self.used_idx % self.num)
        self._write(dma, slot, element.head.to_bytes(4, "little") + length.to_bytes(4, "little"), "the used ring")
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self._write(dma, self.used + 2, self.used_idx.to_bytes(2, "little"), "the used ring's index")
        self.inuse -= 1

    def detach(self) -> None:
        """Give up a popped chain without a used entry (``virtqueue_detach_element``)."""
        self.inuse -= 1

    def should_notify(self, dma: Dma, features: int) -> bool:
        """QEMU's ``virtio_split_should_notify``: NOTIFY_ON_EMPTY, then the avail flag or used_event."""
        if features & (1 << F_NOTIFY_ON_EMPTY) and not self.inuse and self.empty(dma):
            return True
        if not features & (1 << F_RING_EVENT_IDX):
            flags = _u16(self._read(dma, self.avail, 2, "the available ring's flags"))
            return not flags & AVAIL_F_NO_INTERRUPT
        valid, old = self.signalled_used_valid, self.signalled_used
        self.signalled_used_valid = True
        new = self.signalled_used = self.used_idx
        if not valid:
            return True
        used_event = _u16(self._read(dma, self.avail + 4 + 2 * self.num, 2, "used_event"))
        return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)  # vring_need_event


@dataclass
class MmioQueueRegs:
    """What the modern transport keeps per queue until QueueReady (QEMU's ``VirtIOMMIOQueue``)."""

    num: int = 0
    enabled: bool = False
    desc: list[int] = field(default_factory=lambda: [0, 0])
    avail: list[int] = field(default_factory=lambda: [0, 0])
    used: list[int] = field(default_factory=lambda: [0, 0])


def guess_geometry(first_sector: bytes, sectors: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track) as QEMU's ``hd_geometry_guess`` finds them for a file.

    An MBR partition ending on a cylinder boundary gives the logical geometry; otherwise (or if that
    says more than 16 heads) the standard one: 16 heads, 63 sectors, cylinders from the size."""

    def standard() -> tuple[int, int, int]:
        return min(max(sectors // (16 * 63), 2), 16383), 16, 63

    if len(first_sector) < SECTOR or first_sector[510:512] != b"\x55\xaa":
        return standard()
    for index in range(4):
        entry = first_sector[0x1BE + 16 * index : 0x1BE + 16 * (index + 1)]
        end_head, end_sector, nr_sects = entry[5], entry[6], _u32(entry, 12)
        if not nr_sects or not end_head:
            continue
        heads, per_track = end_head + 1, end_sector & 63
        if per_track == 0:
            continue
        cylinders = sectors // (heads * per_track)
        if not 1 <= cylinders <= 16383:
            continue
        return standard() if heads > 16 else (cylinders, heads, per_track)
    return standard()


def parse_path(text: str) -> str:
    """A file name; the file itself is opened when the device is built."""
    if not text.strip():
        raise ValueError("empty")
    return text


def parse_serial(text: str) -> str:
    """The drive's serial number, as ``-drive serial=``; GET_ID returns at most 20 bytes of it."""
    text.encode("ascii")  # UnicodeEncodeError is a ValueError
    return text


class VirtioBlkMmio(WordDevice):
    """A virtio-blk device on its own virtio-mmio transport (0x200 bytes), as QEMU's virtio-blk-device."""

    type_name = "virtio-blk-mmio"
    does_dma = True  # the rings and buffers are read and written inside the QueueNotify write
    compatible = ("virtio,mmio",)
    options = (
        Option("file", parse_path, "a raw disk image file"),
        Option("readonly", parse_bool, "on or off"),
        Option("legacy", parse_bool, "on (Version 1, QEMU 7.2 virt's default) or off (Version 2)"),
        Option("serial", parse_serial, "an ASCII serial number (GET_ID returns up to 20 bytes)"),
    )

    _IDENTITY = {MAGIC_VALUE: MAGIC, VERSION: 1, DEVICE_ID: VIRTIO_ID_BLOCK, VENDOR_ID: VENDOR_QEMU}
    _RING_REGISTERS = frozenset(
        {QUEUE_DESC_LOW, QUEUE_DESC_HIGH, QUEUE_AVAIL_LOW, QUEUE_AVAIL_HIGH, QUEUE_USED_LOW, QUEUE_USED_HIGH}
    )

    def __init__(self, name: str, base: int, file: str = "", readonly: bool = False, legacy: bool = True,
                 serial: str = "") -> None:
        super().__init__(name, base)
        if not file:
            raise ConfigError(f"{name}: {self.type_name} needs file=PATH, a raw disk image")
        self.path = file
        self.readonly = readonly
        self.legacy = legacy
        self.serial = serial.encode("ascii")
        try:
            self.fd = os.open(file, os.O_RDONLY if readonly else os.O_RDWR)
        except FileNotFoundError:
            raise ConfigError(f"{name}: disk image {file!r} does not exist") from None
        except OSError as err:
            hint = " (readonly=on opens it read-only)" if not readonly else ""
            raise ConfigError(f"{name}: cannot open disk image {file!r}: {err.strerror or err}{hint}") from None
        size = os.fstat(self.fd).st_size
        #: Capacity in 512-byte sectors; a partial last sector counts and reads as zeros past the end.
        self.sectors = (size + SECTOR - 1) // SECTOR
        self.geometry = guess_geometry(os.pread(self.fd, SECTOR, 0), self.sectors)
        features = MODERN_FEATURES if not legacy else LEGACY_FEATURES
        self.host_features = features | (1 << F_BLK_RO if readonly else 0)
        self.accepted_features = self.host_features | (MODERN_HIDDEN if not legacy else 0)
        self.queues = [SplitQueue(QUEUE_SIZE)]
        self.generation = 0
        self._power_on()

    def close(self) -> None:
        """Close the image file (the device is unusable afterwards)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # --- state -------------------------------------------------------------------------------

    def _power_on(self) -> None:
        """The transport's reset (QEMU's ``virtio_mmio_reset``): the device, then the proxy's registers."""
        self.host_features_sel = 0
        self.guest_features_sel = 0
        self.guest_page_shift = 0
        self.guest_features_regs = [0, 0]
        self.queue_regs: dict[int, MmioQueueRegs] = {}
        self._virtio_reset()

    def _virtio_reset(self) -> None:
        """QEMU's ``virtio_reset``: the block device's write cache back to its default, status and queues cleared."""
        self.wce = True  # cache=writeback, QEMU's default
        self.broken = False
        self.guest_features = 0
        self.queue_sel = 0
        self.status = 0
        self.isr = 0
        self._update_irq()
        for queue in self.queues:
            queue.reset()

    def _queue(self) -> SplitQueue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _regs(self) -> MmioQueueRegs:
        return self.queue_regs.setdefault(self.queue_sel, MmioQueueRegs())

    def _has(self, bit: int) -> bool:
        return bool(self.guest_features & (1 << bit))

    # --- DeviceModel -------------------------------------------------------------------------

    def regions(self) -> list[RegionSpec]:
        return [RegionSpec("transport", 0, TRANSPORT_SIZE)]

    def lines(self) -> list[LineSpec]:
        # The output is a level: high while InterruptStatus has a bit set (QEMU's virtio_mmio_update_irq).
        # Named like its region: the virt board finds a transport's SPI from the region's address (line_routes).
        return [LineSpec(0, "transport", Trigger.LEVEL)]

    def reset(self) -> None:
        self._power_on()

    def describe(self) -> dict[str, str]:
        return {
            "file": self.path,
            "sectors": str(self.sectors),
            "readonly": "on" if self.readonly else "off",
            "version": "1" if self.legacy else "2",
        }

    @staticmethod
    def _check(offset: int, size: int, verb: str) -> AccessResult | None:
        error = check_span(offset, size, TRANSPORT_SIZE, verb)
        if error is None and offset % size:
            error = AccessResult.failure(
                AccessError.UNALIGNED_ACCESS, f"{size}-byte {verb} at offset {offset:#x} is not aligned to its size"
            )
        return error

    # --- registers ---------------------------------------------------------------------------

    def _read(self, offset: int, size: int) -> int:
        if offset >= CONFIG:
            return self._config_read(offset - CONFIG, size)
        if size != 4:
            return 0  # QEMU: "wrong size access to register"
        queue = self._queue()
        if offset in self._IDENTITY:
            return self._IDENTITY[offset] if offset != VERSION else (1 if self.legacy else 2)
        if offset == DEVICE_FEATURES:
            if self.legacy:
                return 0 if self.host_features_sel else self.host_features & 0xFFFF_FFFF
            return (self.host_features >> (32 * self.host_features_sel)) & 0xFFFF_FFFF
        if offset == QUEUE_NUM_MAX:
            return QUEUE_SIZE_MAX if queue is not None and queue.num else 0
        if offset == QUEUE_PFN:
            return (queue.desc >> self.guest_page_shift) & 0xFFFF_FFFF if self.legacy and queue is not None else 0
        if offset == QUEUE_READY:
            regs = self.queue_regs.get(self.queue_sel)
            return int(regs is not None and regs.enabled) if not self.legacy else 0
        if offset == INTERRUPT_STATUS:
            return self.isr
        if offset == STATUS:
            return self.status
        if offset == CONFIG_GENERATION:
            return 0 if self.legacy else self.generation
        if offset in (SHM_LEN_LOW, SHM_LEN_HIGH):
            return 0xFFFF_FFFF  # no shared memory regions: length -1
        return 0  # write-only and unknown registers

    def _write(self, offset: int, size: int, value: int) -> None:
        if offset >= CONFIG:
            self._config_write(offset - CONFIG, size, value)
            return
        if size != 4:
            return
        value &= 0xFFFF_FFFF
        queue = self._queue()
        regs = self._regs()
        if offset == DEVICE_FEATURES_SEL:
            self.host_features_sel = 1 if value else 0
        elif offset == DRIVER_FEATURES:
            if not self.legacy:
                self.guest_features_regs[self.guest_features_sel] = value
            elif not self.guest_features_sel:
                self._set_features(value)
        elif offset == DRIVER_FEATURES_SEL:
            self.guest_features_sel = 1 if value else 0
        elif offset == GUEST_PAGE_SIZE and self.legacy:
            shift = (value & -value).bit_length() - 1 if value else 32  # ctz32
            self.guest_page_shift = shift if shift <= 31 else 0
        elif offset == QUEUE_SEL:
            if value < QUEUE_MAX:
                self.queue_sel = value
        elif offset == QUEUE_NUM:
            if queue is not None:
                queue.set_num(value)
                if self.legacy:
                    queue.update_legacy_rings()
            if not self.legacy:
                regs.num = value & 0xFFFF
        elif offset == QUEUE_ALIGN and self.legacy:
            if queue is not None and not self._has(F_VERSION_1):
                if value:
                    queue.align = value
                queue.update_legacy_rings()
        elif offset == QUEUE_PFN and self.legacy:
            if value == 0:
                self._virtio_reset()
            elif queue is not None and queue.num:
                queue.desc = value << self.guest_page_shift
                queue.update_legacy_rings()
        elif offset == QUEUE_READY and not self.legacy:
            self._queue_ready(queue, regs, bool(value))
        elif offset == QUEUE_NOTIFY:
            if value < QUEUE_MAX:
                self._notify(value)
        elif offset == INTERRUPT_ACK:
            self.isr &= ~value
            self._update_irq()
        elif offset == STATUS:
            self._set_status(value)
        elif offset in self._RING_REGISTERS and not self.legacy:
            ring = {QUEUE_DESC_LOW: regs.desc, QUEUE_AVAIL_LOW: regs.avail, QUEUE_USED_LOW: regs.used}[offset & ~7]
            ring[(offset >> 2) & 1] = value
        # read-only, legacy-only in modern mode (and the reverse), and unknown registers ignore writes

    def _queue_ready(self, queue: SplitQueue | None, regs: MmioQueueRegs, ready: bool) -> None:
        """Modern QueueReady: 1 takes the size and the three ring addresses written before it."""
        if not ready:
            regs.enabled = False
            return
        if queue is not None:
            queue.set_num(regs.num)
            if queue.num:
                queue.desc = regs.desc[1] << 32 | regs.desc[0]
                queue.avail = regs.avail[1] << 32 | regs.avail[0]
                queue.used = regs.used[1] << 32 | regs.used[0]
        regs.enabled = True

    def _set_features(self, value: int) -> None:
        """QEMU's ``virtio_set_features``: fixed once FEATURES_OK is set; bits not offered are dropped."""
        if self.status & STATUS_FEATURES_OK:
            return
        self.guest_features = value & self.accepted_features
        for queue in self.queues:
            queue.signalled_used_valid = False

    def _set_status(self, value: int) -> None:
        """Status as QEMU's transport and ``virtio_set_status`` take it; 0 resets the device."""
        value &= 0xFF
        if not self.legacy and value & STATUS_FEATURES_OK:
            self._set_features(self.guest_features_regs[1] << 32 | self.guest_features_regs[0])
        if value & STATUS_DRIVER_OK and not self._has(F_BLK_CONFIG_WCE):
            # virtio_blk_set_status: a driver that cannot toggle the cache gets one only if it can flush.
            self.wce = self._has(F_BLK_FLUSH)
        self.status = value
        if self.status == 0:
            self._virtio_reset()
            if not self.legacy:
                for regs in self.queue_regs.values():
                    regs.enabled = False

    def _update_irq(self) -> None:
        """The line follows InterruptStatus; QEMU's ``virtio_notify_vector`` does nothing on a broken device."""
        if not self.broken:
            self.irq_lines[0].set(self.isr != 0)

    # --- config space ------------------------------------------------------------------------

    def config_bytes(self) -> bytes:
        """The virtio_blk_config QEMU's ``virtio_blk_update_config`` builds, little-endian."""
        cylinders, heads, per_track = self.geometry
        parts = [
            self.sectors.to_bytes(8, "little"),  # capacity
            (0).to_bytes(4, "little"),  # size_max (not offered)
            (QUEUE_SIZE - 2).to_bytes(4, "little"),  # seg_max
            cylinders.to_bytes(2, "little"), bytes([heads, per_track]),
            SECTOR.to_bytes(4, "little"),  # blk_size
            bytes([0, 0]), (0).to_bytes(2, "little"), (0).to_bytes(4, "little"),  # topology
            bytes([int(self.wce), 0]), (1).to_bytes(2, "little"),  # writeback, num_queues
            MAX_DISCARD_SECTORS.to_bytes(4, "little"), (1).to_bytes(4, "little"), (1).to_bytes(4, "little"),
            MAX_WRITE_ZEROES_SECTORS.to_bytes(4, "little"), (1).to_bytes(4, "little"), bytes([1]),
        ]
        config = b"".join(parts)
        assert len(config) == CONFIG_SIZE
        return config

    def _config_read(self, offset: int, size: int) -> int:
        if offset + size > CONFIG_SIZE:
            return (1 << (8 * size)) - 1  # virtio_config_read*: (uint32_t)-1, truncated to the access
        return int.from_bytes(self.config_bytes()[offset : offset + size], "little")

    def _config_write(self, offset: int, size: int, value: int) -> None:
        """Only ``writeback`` sticks (virtio_blk_set_config); the rest is rebuilt on the next read."""
        if offset + size > CONFIG_SIZE:
            return
        if offset <= CONFIG_WCE < offset + size:
            self.wce = bool((value >> (8 * (CONFIG_WCE - offset))) & 0xFF)

    # --- interrupts and errors ---------------------------------------------------------------

    def _virtio_error(self, message: str) -> None:
        """QEMU's ``virtio_error``: a modern device asks for a reset; any device stops until it gets one."""
        log.warning("%s: virtio-blk: %s; the device stops until the driver resets it", self.name, message)
        if self._has(F_VERSION_1):
            self.status |= STATUS_NEEDS_RESET
            if self.status & STATUS_DRIVER_OK:
                self.isr |= ISR_USED_BUFFER | ISR_CONFIG  # virtio_notify_config sets 0x3
                self.generation = (self.generation + 1) & 0xFFFF_FFFF
                self._update_irq()
        self.broken = True

    def _notify(self, index: int) -> None:
        """QueueNotify: handle every available request of the queue now (``virtio_blk_handle_vq``)."""
        if index >= len(self.queues):
            return
        queue = self.queues[index]
        if not queue.desc or self.broken:
            return
        event_idx = self._has(F_RING_EVENT_IDX)
        try:
            while not self.broken:
                element = queue.pop(self.dma, event_idx)
                if element is None:
                    break
                try:
                    status = self._handle(element)
                except GuestError:
                    queue.detach()
                    raise
                in_len = _size(element.inp)
                self._complete(queue, element, status, in_len)
            if not self.broken and event_idx:
                queue.set_avail_event(self.dma, queue.avail_idx(self.dma))
        except GuestError as err:
            self._virtio_error(str(err))

    def _complete(self, queue: SplitQueue, element: Element, status: int, in_len: int) -> None:
        """Store the status byte, return the chain, and interrupt if the driver wants it (``virtio_notify``)."""
        address, length = element.inp[-1]
        SplitQueue._write(self.dma, address + length - 1, bytes([status]), "the status byte")
        queue.push(self.dma, element, in_len)
        if queue.should_notify(self.dma, self.guest_features):
            self.isr |= ISR_USED_BUFFER
            self._update_irq()

    # --- requests ----------------------------------------------------------------------------

    def _gather(self, segments: list[Segment], limit: int | None = None) -> bytes:
        out = bytearray()
        for address, length in segments:
            if limit is not None:
                length = min(length, limit - len(out))
                if length <= 0:
                    break
            out += SplitQueue._read(self.dma, address, length, "a request buffer")
        return bytes(out)

    def _scatter(self, segments: list[Segment], data: bytes) -> None:
        position = 0
        for address, length in segments:
            if position >= len(data):
                break
            chunk = data[position : position + length]
            SplitQueue._write(self.dma, address, chunk, "a request buffer")
            position += len(chunk)

    def _handle(self, element: Element) -> int:
        """One request; its status, or ``GuestError`` for what QEMU treats as a broken driver."""
        if not element.out or not element.inp:
            raise GuestError("virtio-blk missing headers")
        header = self._gather(element.out, OUTHDR_SIZE)
        if len(header) < OUTHDR_SIZE:
            raise GuestError("virtio-blk request outhdr too short")
        out = _discard_front(element.out, OUTHDR_SIZE)
        if element.inp[-1][1] < 1:
            raise GuestError("virtio-blk request inhdr too short")
        inp = _discard_back(element.inp, 1)
        kind, sector = _u32(header, 0), _u64(header, 8)
        command = kind & ~(T_OUT | T_BARRIER)  # the direction bit and the legacy barrier flag aside
        if command == T_IN:  # T_IN, or T_OUT with the direction bit
            return self._read_write(sector, out if kind & T_OUT else inp, bool(kind & T_OUT))
        if command == T_FLUSH:
            return self._flush()
        if command == T_SCSI_CMD:  # only a legacy driver can send it; QEMU's scsi=off answers UNSUPP
            return self._scsi(element)
        if command == T_GET_ID:
            size = min(len(self.serial) + 1, _size(inp), ID_BYTES)
            self._scatter(inp, (self.serial + b"\0")[:size])
            return S_OK
        if command in (T_DISCARD & ~T_OUT, T_WRITE_ZEROES & ~T_OUT):  # both defined with T_OUT set
            return self._discard_write_zeroes(kind, out)
        return S_UNSUPP

    def _range_ok(self, sector: int, size: int) -> bool:
        """QEMU's ``virtio_blk_sect_range_ok``: whole sectors, inside the disk, not absurdly long."""
        count = size // SECTOR
        if count > REQUEST_MAX_SECTORS or size % SECTOR:
            return False
        return sector <= self.sectors and count <= self.sectors - sector

    def _read_write(self, sector: int, buffers: list[Segment], is_write: bool) -> int:
        size = _size(buffers)
        if not self._range_ok(sector, size):
            return S_IOERR
        if is_write:
            data = self._gather(buffers)
            if self.readonly:
                return S_IOERR  # QEMU's read-only BlockBackend refuses the write: -EACCES, reported
            try:
                os.pwrite(self.fd, data, sector * SECTOR)
                if not self.wce:
                    os.fsync(self.fd)  # writethrough
            except OSError as err:
                log.warning("%s: writing %d bytes at sector %d of %s: %s", self.name, size, sector, self.path, err)
                return S_IOERR
            return S_OK
        try:
            data = os.pread(self.fd, size, sector * SECTOR)
        except OSError as err:
            log.warning("%s: reading %d bytes at sector %d of %s: %s", self.name, size, sector, self.path, err)
            return S_IOERR
        self._scatter(buffers, data + bytes(size - len(data)))  # past the end of a partial last sector: zeros
        return S_OK

    def _flush(self) -> int:
        if self.readonly:
            return S_OK
        try:
            os.fsync(self.fd)
        except OSError as err:
            log.warning("%s: flushing %s: %s", self.name, self.path, err)
            return S_IOERR
        return S_OK

    def _scsi(self, element: Element) -> int:
        """QEMU's ``virtio_blk_handle_scsi_req`` with scsi=off: IOERR without room for the headers,
        else ``errors`` = 255 in the virtio_scsi_inhdr and UNSUPP."""
        if len(element.out) < 2 or len(element.inp) < 3:
            return S_IOERR
        address, length = element.inp[-2]
        if length >= 4:
            SplitQueue._write(self.dma, address, (255).to_bytes(4, "little"), "the SCSI header")
        return S_UNSUPP

    def _discard_write_zeroes(self, kind: int, out: list[Segment]) -> int:
        """One segment of (sector, num_sectors, flags), as QEMU's ``virtio_blk_handle_discard_write_zeroes``."""
        if not kind & T_OUT or _size(out) > DWZ_SIZE:
            return S_UNSUPP
        header = self._gather(out, DWZ_SIZE)
        if len(header) < DWZ_SIZE:
            raise GuestError("virtio-blk discard/write_zeroes header too short")
        write_zeroes = (kind & ~T_BARRIER) == T_WRITE_ZEROES
        sector, count, flags = _u64(header, 0), _u32(header, 8), _u32(header, 12)
        if count > (MAX_WRITE_ZEROES_SECTORS if write_zeroes else MAX_DISCARD_SECTORS):
            return S_IOERR
        if not self._range_ok(sector, count * SECTOR):
            return S_IOERR
        if flags & ~WRITE_ZEROES_FLAG_UNMAP:
            return S_UNSUPP
        if not write_zeroes:
            # QEMU refuses UNMAP on discard; otherwise its default discard=ignore does nothing.
            return S_UNSUPP if flags & WRITE_ZEROES_FLAG_UNMAP else S_OK
        if self.readonly:
            return S_IOERR
        try:
            position, remaining = sector * SECTOR, count * SECTOR
            while remaining:
                chunk = min(remaining, _ZERO_CHUNK)
                os.pwrite(self.fd, bytes(chunk), position)
                position += chunk
                remaining -= chunk
            if not self.wce:
                os.fsync(self.fd)
        except OSError as err:
            log.warning("%s: zeroing %d sectors at %d of %s: %s", self.name, count, sector, self.path, err)
            return S_IOERR
        return S_OK
