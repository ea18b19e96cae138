"""Empty virtio-mmio transports, as QEMU 7.2's virt slots with no backend.

Expected values are what ``qemu-system-aarch64 -M virt`` answered to U-Boot's ``md`` on
0x0a000000: ``74726976 00000001 00000000 554d4551`` then zeros.
"""

from __future__ import annotations

import pytest

from device_service.model import AccessError, ConfigError, RegionKind
from device_service.models import DEVICE_TYPES
from device_service.models.virtio_mmio import VirtioMmio


def read(dev: VirtioMmio, offset: int, size: int = 4) -> int:
    result = dev.read(offset, size)
    assert result.ok, result.message
    return result.value


def test_registered_with_the_virtio_compatible() -> None:
    assert DEVICE_TYPES["virtio-mmio"] is VirtioMmio
    assert VirtioMmio.compatible == ("virtio,mmio",)


def test_identification_registers_as_qemu_virt() -> None:
    dev = VirtioMmio("virtio", 0x0A00_0000)
    assert [read(dev, 4 * i) for i in range(4)] == [0x7472_6976, 1, 0, 0x554D_4551]
    assert read(dev, 0, 4).to_bytes(4, "little") == b"virt"
    assert read(dev, 0xC, 4).to_bytes(4, "little") == b"QEMU"


def test_everything_else_reads_zero_including_config_space() -> None:
    dev = VirtioMmio("virtio", 0)
    assert all(read(dev, offset) == 0 for offset in range(0x10, 0x200, 4))


def test_reads_see_a_value_only_at_its_register_offset() -> None:
    dev = VirtioMmio("virtio", 0)
    # QEMU: md.b 0x0a000001 4 -> 00 00 00 01; md.w 0x0a00000c 2 -> 4551 0000
    assert [read(dev, offset, 1) for offset in range(1, 5)] == [0, 0, 0, 1]
    assert [read(dev, 0xC, 2), read(dev, 0xE, 2)] == [0x4551, 0]
    # md.q 0x0a000000 2 -> 0000000174726976 554d455100000000
    assert [read(dev, 0, 8), read(dev, 8, 8)] == [0x0000_0001_7472_6976, 0x554D_4551_0000_0000]


def test_writes_are_ignored() -> None:
    dev = VirtioMmio("virtio", 0)
    for offset in (0x000, 0x004, 0x070, 0x100):
        assert dev.write(offset, 4, 0xFFFF_FFFF).ok
    assert [read(dev, 4 * i) for i in range(4)] + [read(dev, 0x70)] == [0x7472_6976, 1, 0, 0x554D_4551, 0]


def test_legacy_off_gives_version_2() -> None:
    dev = VirtioMmio.from_options("virtio", 0, {"legacy": "off"})
    assert read(dev, 4) == 2


def test_slots_make_consecutive_transports() -> None:
    dev = VirtioMmio.from_options("virtio", 0x0A00_0000, {"slots": "32"})
    regions = dev.regions()
    assert [(r.name, r.offset, r.size, r.kind) for r in regions[:2]] == [
        ("slot0", 0x000, 0x200, RegionKind.MMIO),
        ("slot1", 0x200, 0x200, RegionKind.MMIO),
    ]
    assert len(regions) == 32 and regions[-1].offset == 0x3E00
    assert [read(dev, 0x3E00 + 4 * i) for i in range(4)] == [0x7472_6976, 1, 0, 0x554D_4551]
    assert dev.read(0x4000, 4).error is AccessError.OUT_OF_RANGE


def test_unaligned_accesses_and_bad_options_are_refused() -> None:
    dev = VirtioMmio("virtio", 0)
    assert dev.read(1, 2).error is AccessError.UNALIGNED_ACCESS
    assert dev.write(2, 4, 0).error is AccessError.UNALIGNED_ACCESS
    with pytest.raises(ConfigError, match="option 'slots'"):
        VirtioMmio.from_options("virtio", 0, {"slots": "0"})
