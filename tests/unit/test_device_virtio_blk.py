"""virtio-blk behind virtio-mmio, driven as a guest driver would, with an in-memory fake DMA handle.

Register values are what Debian's ``qemu-system-aarch64`` 7.2 answered on ``-M virt`` with
``-drive if=none,id=hd0,file=disk.img,format=raw -device virtio-blk-device,drive=hd0`` (the transport at
0x0a003e00) to U-Boot's ``md``/``mw``, legacy by default and with
``-global virtio-mmio.force-legacy=false``; request handling follows QEMU 7.2's hw/block/virtio-blk.c.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from device_service.config import build_bus, parse_device_specs
from device_service.model import AccessError, ConfigError, NoDma, RegionKind, Trigger
from device_service.models import DEVICE_TYPES
from device_service.models.virtio_blk import MmioQueueRegs, VirtioBlkMmio, guess_geometry
from tests.unit.fake_dma import FakeDma
from vcpu_service.machines.virt import device_specs

RAM = 0x4000_0000
RAM_SIZE = 1 << 20
QUEUE = RAM + 0x1_0000  # rings
BUFFERS = RAM + 0x2_0000  # request headers and data
INDIRECT = RAM + 0x8_0000  # indirect tables
SECTORS = 64

# virtio-blk request types and statuses.
T_IN, T_OUT, T_SCSI, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 2, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
F_NOTIFY_ON_EMPTY, F_INDIRECT, F_EVENT_IDX, F_VERSION_1 = 1 << 24, 1 << 28, 1 << 29, 1 << 32
NEXT, WRITE, INDIRECT_FLAG = 1, 2, 4


def pattern(sector: int) -> bytes:
    """512 recognisable bytes for each sector of the test image."""
    return bytes((sector * 7 + i) & 0xFF for i in range(512))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(b"".join(pattern(s) for s in range(SECTORS)))
    return path


class Driver:
    """A minimal virtio driver: what U-Boot's virtio_mmio + virtio_blk do, one request at a time."""

    def __init__(self, dev: VirtioBlkMmio, num: int = 8) -> None:
        self.dev = dev
        self.ram = FakeDma(RAM, RAM_SIZE)
        dev.attach_dma(self.ram)
        self.num = num
        self.levels: list[bool] = []
        dev.irq_lines[0].connect(lambda _line, level: self.levels.append(level))
        self.legacy = dev.legacy
        self.next_desc = 0
        self.avail_idx = 0
        self.desc = QUEUE
        if self.legacy:
            self.avail = QUEUE + 16 * num
            self.used = (self.avail + 4 + 2 * num + 4095) & ~4095
        else:  # modern: three separate places, as the driver likes
            self.avail = QUEUE + 0x4000
            self.used = QUEUE + 0x8000

    # --- registers -------------------------------------------------------------------------

    def r(self, offset: int, size: int = 4) -> int:
        result = self.dev.read(offset, size)
        assert result.ok, result.message
        return result.value

    def w(self, offset: int, value: int, size: int = 4) -> None:
        result = self.dev.write(offset, size, value)
        assert result.ok, result.message

    def features(self) -> int:
        self.w(0x14, 0)
        low = self.r(0x10)
        self.w(0x14, 1)
        return self.r(0x10) << 32 | low

    def start(self, accept: int | None = None) -> None:
        """Reset, ACKNOWLEDGE, DRIVER, features, (FEATURES_OK), queue 0, DRIVER_OK."""
        self.w(0x70, 0)
        self.w(0x70, 1)
        self.w(0x70, 3)
        offered = self.features()
        accept = offered if accept is None else accept & offered
        if self.legacy:
            self.w(0x24, 0)
            self.w(0x20, accept & 0xFFFF_FFFF)
            self.w(0x28, 4096)
            self.w(0x30, 0)
            assert self.r(0x34) == 1024
            self.w(0x38, self.num)
            self.w(0x3C, 4096)
            self.w(0x40, QUEUE >> 12)
            self.w(0x70, 7)
        else:
            for page in (0, 1):
                self.w(0x24, page)
                self.w(0x20, (accept >> (32 * page)) & 0xFFFF_FFFF)
            self.w(0x70, 0xB)
            assert self.r(0x70) == 0xB
            self.w(0x30, 0)
            self.w(0x38, self.num)
            for offset, address in ((0x80, self.desc), (0x90, self.avail), (0xA0, self.used)):
                self.w(offset, address & 0xFFFF_FFFF)
                self.w(offset + 4, address >> 32)
            self.w(0x44, 1)
            self.w(0x70, 0xF)

    # --- rings ----------------------------------------------------------------------------

    def put_desc(self, table: int, index: int, address: int, length: int, flags: int, nxt: int) -> None:
        self.ram.put(table + 16 * index, address.to_bytes(8, "little") + length.to_bytes(4, "little")
                     + flags.to_bytes(2, "little") + nxt.to_bytes(2, "little"))

    def chain(self, buffers: list[tuple[int, int, bool]], indirect: bool = False) -> int:
        """Descriptors for (address, length, device-writable) buffers; returns the head index."""
        head = self.next_desc
        if indirect:
            for i, (address, length, writable) in enumerate(buffers):
                last = i == len(buffers) - 1
                self.put_desc(INDIRECT, i, address, length, (WRITE if writable else 0) | (0 if last else NEXT), i + 1)
            self.put_desc(self.desc, head, INDIRECT, 16 * len(buffers), INDIRECT_FLAG, 0)
            self.next_desc = (head + 1) % self.num
            return head
        for i, (address, length, writable) in enumerate(buffers):
            index = (head + i) % self.num
            last = i == len(buffers) - 1
            self.put_desc(self.desc, index, address, length, (WRITE if writable else 0) | (0 if last else NEXT),
                          (index + 1) % self.num)
        self.next_desc = (head + len(buffers)) % self.num
        return head

    def offer(self, head: int) -> None:
        self.ram.put(self.avail + 4 + 2 * (self.avail_idx % self.num), head.to_bytes(2, "little"))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.ram.put(self.avail + 2, self.avail_idx.to_bytes(2, "little"))

    def kick(self) -> None:
        self.w(0x50, 0)

    def used_idx(self) -> int:
        return int.from_bytes(self.ram.get(self.used + 2, 2), "little")

    def used_entry(self, n: int) -> tuple[int, int]:
        raw = self.ram.get(self.used + 4 + 8 * (n % self.num), 8)
        return int.from_bytes(raw[:4], "little"), int.from_bytes(raw[4:], "little")

    # --- requests --------------------------------------------------------------------------

    def request(self, kind: int, sector: int = 0, data: bytes | None = None, read_len: int = 0,
                indirect: bool = False) -> tuple[int, bytes, tuple[int, int]]:
        """One request: (status, bytes read, used entry)."""
        header, payload, status = BUFFERS, BUFFERS + 0x100, BUFFERS + 0xF000
        self.ram.put(header, kind.to_bytes(4, "little") + bytes(4) + sector.to_bytes(8, "little"))
        self.ram.put(status, b"\xee")
        buffers = [(header, 16, False)]
        if data is not None:
            self.ram.put(payload, data)
            buffers.append((payload, len(data), False))
        if read_len:
            self.ram.put(payload, b"\xcc" * read_len)
            buffers.append((payload, read_len, True))
        buffers.append((status, 1, True))
        before = self.used_idx()
        self.offer(self.chain(buffers, indirect))
        self.kick()
        assert self.used_idx() == (before + 1) & 0xFFFF, "the request was not completed"
        return self.ram.get(status, 1)[0], self.ram.get(payload, read_len), self.used_entry(before)


def make(image: Path, **options: str) -> VirtioBlkMmio:
    return VirtioBlkMmio.from_options("vblk", 0x0A00_3E00, {"file": str(image), **options})


@pytest.fixture(params=["legacy", "modern"])
def driver(request: pytest.FixtureRequest, image: Path) -> Iterator[Driver]:
    dev = make(image, legacy="on" if request.param == "legacy" else "off")
    drv = Driver(dev)
    drv.start()
    yield drv
    dev.close()


# --- identity, features, config -----------------------------------------------------------------


def test_registered_as_a_virtio_mmio_transport(image: Path) -> None:
    assert DEVICE_TYPES["virtio-blk-mmio"] is VirtioBlkMmio
    dev = make(image)
    assert VirtioBlkMmio.compatible == ("virtio,mmio",)
    assert [(r.name, r.offset, r.size, r.kind) for r in dev.regions()] == [("transport", 0, 0x200, RegionKind.MMIO)]
    assert [(s.index, s.trigger) for s in dev.lines()] == [(0, Trigger.LEVEL)]


def test_legacy_identity_and_features_as_qemu_virt(image: Path) -> None:
    drv = Driver(make(image))
    # QEMU: md.l 0a003e00 -> 74726976 00000001 00000002 554d4551 31006ed4
    assert [drv.r(4 * i) for i in range(5)] == [0x7472_6976, 1, 2, 0x554D_4551, 0x3100_6ED4]
    drv.w(0x14, 1)
    assert drv.r(0x10) == 0  # legacy: no second page
    assert drv.r(0x34) == 1024  # QueueNumMax of queue 0
    drv.w(0x30, 1)
    assert drv.r(0x34) == 0  # no queue 1
    assert [drv.r(0xB0), drv.r(0xB4)] == [0xFFFF_FFFF, 0xFFFF_FFFF]  # SHM lengths
    assert drv.r(0x0, 2) == 0 and drv.r(0x4, 1) == 0  # registers answer only 4-byte reads
    assert drv.r(0x0, 8) == 0x0000_0001_7472_6976  # 8 bytes: two 4-byte reads


def test_modern_identity_and_feature_pages(image: Path) -> None:
    drv = Driver(make(image, legacy="off"))
    assert drv.r(0x4) == 2
    # QEMU with force-legacy=false: page 0 30006e54, page 1 00000101 (VERSION_1, RING_RESET)
    assert drv.features() == 0x0000_0101_3000_6E54
    drv.w(0x14, 2)  # any non-zero selects page 1
    assert drv.r(0x10) == 0x101


def test_readonly_offers_ro(image: Path) -> None:
    drv = Driver(make(image, readonly="on"))
    assert drv.r(0x10) == 0x3100_6ED4 | 1 << 5


def test_config_space_as_qemu(tmp_path: Path) -> None:
    path = tmp_path / "blank.img"
    with path.open("wb") as f:
        f.truncate(8 << 20)  # 16384 sectors, no MBR signature: QEMU's standard geometry 16/16/63
    drv = Driver(make(path))
    # QEMU: md.b 0a003f00 0x40 for an 8 MiB image
    expected = bytes.fromhex(
        "00 40 00 00 00 00 00 00 00 00 00 00 fe 00 00 00"
        "10 00 10 3f 00 02 00 00 00 00 00 00 00 00 00 00"
        "01 00 01 00 ff ff 3f 00 01 00 00 00 01 00 00 00"
        "ff ff 3f 00 01 00 00 00 01 ff ff ff ff ff ff ff"
    )
    assert bytes(drv.r(0x100 + i, 1) for i in range(0x40)) == expected
    # md.l 0a003f00: the same, 4 bytes at a time; past the end (0x39) all ones
    assert [drv.r(0x100 + 4 * i) for i in range(0x10)] == [
        0x4000, 0, 0, 0xFE, 0x3F10_0010, 0x200, 0, 0, 0x0001_0001, 0x3F_FFFF, 1, 1, 0x3F_FFFF, 1,
        0xFFFF_FFFF, 0xFFFF_FFFF,
    ]
    assert drv.r(0x100, 8) == 0x4000  # capacity as one 8-byte read
    assert drv.r(0x110, 2) == 16 and drv.r(0x112, 1) == 16 and drv.r(0x113, 1) == 63


def test_geometry_guess_from_an_mbr_partition() -> None:
    mbr = bytearray(512)
    mbr[510:512] = b"\x55\xaa"
    entry = 0x1BE
    mbr[entry + 5] = 3  # end head: 4 heads
    mbr[entry + 6] = 32  # end sector 32
    mbr[entry + 12 : entry + 16] = (1000).to_bytes(4, "little")
    assert guess_geometry(bytes(mbr), 4 * 32 * 100) == (100, 4, 32)
    mbr[entry + 5] = 63  # 64 heads: a BIOS translation, so the standard geometry
    assert guess_geometry(bytes(mbr), 100_000) == (99, 16, 63)
    assert guess_geometry(bytes(512), 100) == (2, 16, 63)


def test_writeback_is_the_one_writable_config_field(image: Path) -> None:
    drv = Driver(make(image))
    assert drv.r(0x120, 1) == 1
    drv.w(0x120, 0, 1)
    assert drv.r(0x120, 1) == 0
    drv.w(0x100, 0xFFFF_FFFF)  # capacity is not writable
    assert drv.r(0x100) == SECTORS
    drv.dev.reset()
    assert drv.r(0x120, 1) == 1


def test_missing_file_and_bad_options(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        make(tmp_path / "nope.img")
    with pytest.raises(ConfigError, match="needs file=PATH"):
        VirtioBlkMmio.from_options("vblk", 0, {})
    with pytest.raises(ConfigError, match="option 'legacy'"):
        make(tmp_path / "x", legacy="maybe")


# --- requests ------------------------------------------------------------------------------------


def test_read_sectors(driver: Driver) -> None:
    status, data, used = driver.request(T_IN, sector=3, read_len=1024)
    assert status == S_OK
    assert data == pattern(3) + pattern(4)
    assert used == (0, 1025)  # the used length is the whole writable part, status byte included


def test_read_through_an_indirect_table(driver: Driver) -> None:
    status, data, used = driver.request(T_IN, sector=SECTORS - 1, read_len=512, indirect=True)
    assert (status, data, used) == (S_OK, pattern(SECTORS - 1), (0, 513))


def test_write_sectors_reaches_the_file(driver: Driver, image: Path) -> None:
    status, _, used = driver.request(T_OUT, sector=5, data=b"\x5a" * 1024)
    assert status == S_OK and used[1] == 1
    contents = image.read_bytes()
    assert contents[5 * 512 : 7 * 512] == b"\x5a" * 1024
    assert contents[7 * 512 : 8 * 512] == pattern(7)
    status, data, _ = driver.request(T_IN, sector=5, read_len=512)
    assert data == b"\x5a" * 512


def test_flush(driver: Driver) -> None:
    assert driver.request(T_FLUSH)[0] == S_OK


def test_out_of_range_and_partial_sectors_are_ioerr(driver: Driver) -> None:
    assert driver.request(T_IN, sector=SECTORS, read_len=512)[0] == S_IOERR
    assert driver.request(T_IN, sector=SECTORS - 1, read_len=1024)[0] == S_IOERR
    assert driver.request(T_OUT, sector=SECTORS - 1, data=bytes(1024))[0] == S_IOERR
    assert driver.request(T_IN, sector=0, read_len=100)[0] == S_IOERR
    assert driver.request(T_IN, sector=1 << 63, read_len=512)[0] == S_IOERR
    # ... and the device goes on working
    assert driver.request(T_IN, sector=1, read_len=512)[:2] == (S_OK, pattern(1))
    assert not driver.dev.broken


def test_get_id_and_unsupported_requests(image: Path) -> None:
    drv = Driver(make(image, serial="MMIOSPLIT-0001"))
    drv.start()
    status, data, _ = drv.request(T_GET_ID, read_len=20)
    assert status == S_OK and data == b"MMIOSPLIT-0001\0" + b"\xcc" * 5
    assert drv.request(99, read_len=512)[0] == S_UNSUPP
    assert drv.request(T_SCSI, data=bytes(16), read_len=96)[0] == S_IOERR  # no room for the SCSI headers


def test_get_id_without_serial_is_an_empty_string(driver: Driver) -> None:
    status, data, _ = driver.request(T_GET_ID, read_len=20)
    assert status == S_OK and data[:2] == b"\0\xcc"


def test_readonly_refuses_writes_but_reads(image: Path) -> None:
    drv = Driver(make(image, readonly="on"))
    drv.start()
    assert drv.request(T_OUT, sector=0, data=b"\xff" * 512)[0] == S_IOERR
    assert image.read_bytes()[:512] == pattern(0)
    assert drv.request(T_IN, sector=0, read_len=512)[:2] == (S_OK, pattern(0))
    assert drv.request(T_FLUSH)[0] == S_OK


def test_write_zeroes_and_discard(driver: Driver, image: Path) -> None:
    def dwz(sector: int, count: int, flags: int = 0) -> bytes:
        return sector.to_bytes(8, "little") + count.to_bytes(4, "little") + flags.to_bytes(4, "little")

    assert driver.request(T_WRITE_ZEROES, data=dwz(2, 2, 1))[0] == S_OK
    assert image.read_bytes()[1024:2048] == bytes(1024)
    assert driver.request(T_DISCARD, data=dwz(10, 1))[0] == S_OK  # discard=ignore: accepted, nothing changes
    assert image.read_bytes()[10 * 512 : 11 * 512] == pattern(10)
    assert driver.request(T_DISCARD, data=dwz(10, 1, 1))[0] == S_UNSUPP  # UNMAP on a discard
    assert driver.request(T_WRITE_ZEROES, data=dwz(0, 1, 2))[0] == S_UNSUPP  # unknown flag
    assert driver.request(T_WRITE_ZEROES, data=dwz(SECTORS, 1))[0] == S_IOERR
    assert driver.request(T_WRITE_ZEROES, data=dwz(0, 1) + bytes(16))[0] == S_UNSUPP  # two segments


# --- interrupts ------------------------------------------------------------------------------------


def test_interrupt_raised_on_used_buffer_and_lowered_on_ack(driver: Driver) -> None:
    assert driver.levels == [] and driver.r(0x60) == 0
    driver.request(T_IN, sector=0, read_len=512)
    assert driver.r(0x60) == 1 and driver.levels == [True]
    driver.request(T_IN, sector=0, read_len=512)  # still high: no second edge
    assert driver.levels == [True]
    driver.w(0x64, 1)
    assert driver.r(0x60) == 0 and driver.levels == [True, False]


def test_no_interrupt_flag_is_honoured_without_event_idx(image: Path) -> None:
    drv = Driver(make(image))
    drv.start(accept=0x3100_6ED4 & ~F_EVENT_IDX & ~F_NOTIFY_ON_EMPTY)
    drv.ram.put(drv.avail, (1).to_bytes(2, "little"))  # VRING_AVAIL_F_NO_INTERRUPT
    drv.request(T_IN, sector=0, read_len=512)
    assert drv.r(0x60) == 0 and drv.levels == []


def test_notify_on_empty_overrides_no_interrupt(image: Path) -> None:
    drv = Driver(make(image))
    drv.start(accept=0x3100_6ED4 & ~F_EVENT_IDX)
    drv.ram.put(drv.avail, (1).to_bytes(2, "little"))
    drv.request(T_IN, sector=0, read_len=512)  # the queue is empty afterwards: interrupt anyway
    assert drv.levels == [True]


def test_event_idx_writes_avail_event_and_reads_used_event(driver: Driver) -> None:
    used_event = driver.avail + 4 + 2 * driver.num
    avail_event = driver.used + 4 + 8 * driver.num
    driver.start(accept=((1 << 64) - 1) & ~F_NOTIFY_ON_EMPTY)  # (which would interrupt whenever the queue empties)
    driver.ram.put(used_event, (5).to_bytes(2, "little"))  # interrupt me when used idx passes 5
    driver.request(T_IN, sector=0, read_len=512)  # the first notification always goes
    assert driver.levels == [True]
    assert int.from_bytes(driver.ram.get(avail_event, 2), "little") == 1
    driver.w(0x64, 1)
    for _ in range(4):  # used idx 2..5: not past 5 yet
        driver.request(T_IN, sector=0, read_len=512)
    assert driver.levels == [True, False]
    driver.request(T_IN, sector=0, read_len=512)  # used idx 6 crosses used_event + 1
    assert driver.levels == [True, False, True]
    assert int.from_bytes(driver.ram.get(avail_event, 2), "little") == 6


# --- bad guest input ------------------------------------------------------------------------------


def broken_by(driver: Driver, buffers: list[tuple[int, int, bool]] | None = None, head: int | None = None) -> None:
    before = driver.used_idx()
    driver.offer(driver.chain(buffers or []) if head is None else head)
    driver.kick()
    assert driver.dev.broken
    assert driver.used_idx() == before  # the chain is dropped, not returned
    if driver.legacy:
        assert driver.r(0x70) & 0x40 == 0 and driver.levels == []
    else:  # VERSION_1: DEVICE_NEEDS_RESET and a configuration-change interrupt
        assert driver.r(0x70) & 0x40 and driver.r(0x60) == 3 and driver.levels == [True]
        assert driver.r(0xFC) == 1  # ConfigGeneration moved


def test_head_out_of_range_breaks_the_device(driver: Driver) -> None:
    broken_by(driver, head=driver.num)


def test_next_out_of_range(driver: Driver) -> None:
    driver.put_desc(driver.desc, 0, BUFFERS, 16, NEXT, driver.num + 3)
    broken_by(driver, head=0)


def test_descriptor_loop(driver: Driver) -> None:
    driver.put_desc(driver.desc, 0, BUFFERS, 16, NEXT, 1)
    driver.put_desc(driver.desc, 1, BUFFERS, 16, NEXT, 0)
    broken_by(driver, head=0)


def test_zero_length_buffer(driver: Driver) -> None:
    broken_by(driver, [(BUFFERS, 16, False), (BUFFERS + 0x100, 0, True), (BUFFERS + 0x200, 1, True)])


def test_readable_after_writable(driver: Driver) -> None:
    broken_by(driver, [(BUFFERS, 16, False), (BUFFERS + 0x200, 1, True), (BUFFERS + 0x100, 512, False)])


def test_missing_headers(driver: Driver) -> None:
    broken_by(driver, [(BUFFERS, 16, False)])


def test_outhdr_too_short(driver: Driver) -> None:
    broken_by(driver, [(BUFFERS, 8, False), (BUFFERS + 0x200, 1, True)])


def test_bad_indirect_table_size(driver: Driver) -> None:
    driver.put_desc(driver.desc, 0, INDIRECT, 24, INDIRECT_FLAG, 0)
    broken_by(driver, head=0)


def test_buffer_outside_guest_memory(driver: Driver) -> None:
    driver.ram.put(BUFFERS, bytes(16))
    broken_by(driver, [(BUFFERS, 16, False), (0x1000, 512, True), (BUFFERS + 0x200, 1, True)])


def test_a_broken_device_does_nothing_until_reset(driver: Driver) -> None:
    broken_by(driver, head=driver.num)
    driver.offer(driver.chain([(BUFFERS, 16, False), (BUFFERS + 0x200, 1, True)]))
    driver.kick()
    assert driver.used_idx() == 0
    levels = list(driver.levels)
    driver.w(0x64, 3)  # as in QEMU, a broken device does not move its line
    assert driver.levels == levels
    driver.w(0x70, 0)  # reset
    assert not driver.dev.broken and driver.r(0x70) == 0 and driver.r(0x60) == 0
    assert not driver.dev.irq_lines[0].level
    fresh = Driver(driver.dev)
    fresh.start()
    assert fresh.request(T_IN, sector=2, read_len=512)[:2] == (S_OK, pattern(2))


def test_no_dma_window_is_not_a_crash(image: Path) -> None:
    dev = make(image)
    drv = Driver(dev)
    dev.attach_dma(NoDma("vblk"))  # no window granted: every ring access is refused
    drv.w(0x28, 4096)
    drv.w(0x38, 8)
    drv.w(0x40, QUEUE >> 12)
    drv.w(0x50, 0)
    assert dev.broken


# --- reset ----------------------------------------------------------------------------------------


def test_status_zero_resets_queue_features_and_interrupt(driver: Driver) -> None:
    driver.request(T_IN, sector=0, read_len=512)
    assert driver.r(0x60) == 1
    driver.w(0x70, 0)
    assert driver.r(0x70) == 0 and driver.r(0x60) == 0 and driver.levels == [True, False]
    assert driver.dev.guest_features == 0
    queue = driver.dev.queues[0]
    assert (queue.desc, queue.num, queue.last_avail_idx, queue.used_idx) == (0, 256, 0, 0)
    if driver.legacy:
        assert driver.r(0x40) == 0
    else:
        assert driver.r(0x44) == 0  # QueueReady cleared
    driver.kick()  # no rings: nothing happens
    assert not driver.dev.broken


def test_legacy_queue_pfn_zero_resets(image: Path) -> None:
    drv = Driver(make(image))
    drv.start()
    drv.request(T_IN, sector=0, read_len=512)
    assert drv.r(0x40) == QUEUE >> 12
    drv.w(0x40, 0)
    assert drv.r(0x40) == 0 and drv.r(0x70) == 0 and drv.r(0x60) == 0


def test_legacy_queue_align_moves_the_used_ring(image: Path) -> None:
    dev = make(image)
    drv = Driver(dev)
    drv.start()
    drv.w(0x3C, 64)  # the used ring now follows the avail ring at 64-byte alignment
    drv.used = (drv.avail + 4 + 2 * drv.num + 63) & ~63
    assert dev.queues[0].used == drv.used
    assert drv.request(T_IN, sector=1, read_len=512)[:2] == (S_OK, pattern(1))


def test_machine_reset_clears_transport_registers(image: Path) -> None:
    drv = Driver(make(image, legacy="off"))
    drv.start()
    drv.w(0x14, 1)
    drv.dev.reset()
    assert drv.r(0x10) == 0x3000_6E54  # page 0 again
    assert drv.r(0x44) == 0 and drv.r(0x70) == 0
    assert all(regs == MmioQueueRegs() for regs in drv.dev.queue_regs.values())


def test_unaligned_and_out_of_range_accesses_are_refused(image: Path) -> None:
    dev = make(image)
    assert dev.read(2, 4).error is AccessError.UNALIGNED_ACCESS
    assert dev.write(0x1FE, 4, 0).error is AccessError.OUT_OF_RANGE


# --- a real FAT image ----------------------------------------------------------------------------


def _fat_tools() -> tuple[str, str]:
    mkfs, mcopy = shutil.which("mkfs.fat") or "/usr/sbin/mkfs.fat", shutil.which("mcopy")
    if not os.path.exists(mkfs) or mcopy is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install dosfstools and mtools")
        pytest.skip("mkfs.fat (dosfstools) or mcopy (mtools) is not installed")
    return mkfs, mcopy


def test_fat_image_boot_sector_and_a_files_cluster_through_the_virtqueue(tmp_path: Path) -> None:
    mkfs, mcopy = _fat_tools()
    disk = tmp_path / "fat.img"
    subprocess.run([mkfs, "-C", "-n", "MMIOSPLIT", str(disk), "8192"], check=True, capture_output=True)
    content = bytes((i * 31 + 7) & 0xFF for i in range(6000))  # more than one cluster
    (tmp_path / "DATA.BIN").write_bytes(content)
    subprocess.run([mcopy, "-i", str(disk), str(tmp_path / "DATA.BIN"), "::DATA.BIN"], check=True,
                   capture_output=True)
    image = disk.read_bytes()

    for legacy in ("on", "off"):
        drv = Driver(make(disk, legacy=legacy), num=16)
        drv.start()
        assert drv.r(0x100, 8) == len(image) // 512  # capacity

        def read(sector: int, count: int, drv: Driver = drv) -> bytes:
            status, data, _ = drv.request(T_IN, sector=sector, read_len=512 * count)
            assert status == S_OK
            return data

        boot = read(0, 1)
        assert boot == image[:512] and boot[510:] == b"\x55\xaa"
        per_sector = int.from_bytes(boot[11:13], "little")
        per_cluster = boot[13]
        reserved = int.from_bytes(boot[14:16], "little")
        fats = boot[16]
        root_entries = int.from_bytes(boot[17:19], "little")
        fat_sectors = int.from_bytes(boot[22:24], "little")
        assert per_sector == 512 and fat_sectors  # FAT12/16 at this size
        root = reserved + fats * fat_sectors
        root_sectors = (root_entries * 32 + 511) // 512
        directory = read(root, root_sectors)
        entries = [directory[i : i + 32] for i in range(0, len(directory), 32)]
        entry = next(e for e in entries if e[:11] == b"DATA    BIN")
        cluster = int.from_bytes(entry[26:28], "little")
        assert int.from_bytes(entry[28:32], "little") == len(content)
        first_data = root + root_sectors
        data = read(first_data + (cluster - 2) * per_cluster, per_cluster)
        assert data == content[: per_cluster * 512]
        drv.dev.close()


# --- the virt board ------------------------------------------------------------------------------


def test_virt_drive_takes_the_last_slot_and_leaves_31_empty(image: Path) -> None:
    specs = device_specs("aarch64", drive=str(image), drive_readonly=True)
    bus = build_bus(parse_device_specs(specs))
    empty, disk = bus.device("virtio"), bus.device("virtio-blk")
    assert isinstance(disk, VirtioBlkMmio) and disk.base == 0x0A00_3E00 and disk.readonly and disk.legacy
    assert [r.offset for r in empty.regions()][-1] == 0x3C00 and len(empty.regions()) == 31
    # As QEMU with -device virtio-blk-device: 0x0a003c00 is an empty slot, 0x0a003e00 a block device.
    assert bus.read(0x0A00_3C08, 4).value == 0
    assert bus.read(0x0A00_3E08, 4).value == 2
    assert bus.read(0x0A00_3E04, 4).value == 1
    modern = build_bus(parse_device_specs(device_specs("aarch64", drive=str(image), drive_modern=True)))
    assert modern.read(0x0A00_3E04, 4).value == 2
    assert "virtio-blk" not in " ".join(device_specs("aarch64"))
