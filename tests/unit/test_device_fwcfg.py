"""fw_cfg over MMIO (virt layout): selector, string-preserving data reads, the items of a kernel-less VM.

Expected values are what QEMU 7.2 (``qemu-system-aarch64 -M virt -nographic``) answered to U-Boot's
``mw.w 0x09020008 KEY`` / ``md 0x09020000``, and what U-Boot's ``qfw`` driver needs
(drivers/misc/qfw.c, qfw_mmio.c in U-Boot 2023.01).
"""

from __future__ import annotations

import pytest

from device_service.model import AccessError, ConfigError, RegionKind
from device_service.models import DEVICE_TYPES
from device_service.models.fw_cfg import FwCfg

DATA, SELECTOR = 0x0, 0x8


def select(fw: FwCfg, key: int) -> None:
    """What U-Boot does: ``writew(cpu_to_be16(key), selector)`` on a little-endian CPU."""
    be16 = key.to_bytes(2, "big")
    assert fw.write(SELECTOR, 2, int.from_bytes(be16, "little")).ok


def data(fw: FwCfg, size: int) -> bytes:
    """A data register read, as the bytes land in guest memory."""
    result = fw.read(DATA, size)
    assert result.ok, result.message
    return result.value.to_bytes(size, "little")


def item(fw: FwCfg, length: int) -> bytes:
    """``length`` bytes read as U-Boot's qfw_mmio_read_entry_io does: 8, then 4, 2 and 1 at a time."""
    out = b""
    for size in (8, 4, 2, 1):
        while length - len(out) >= size:
            out += data(fw, size)
    return out


@pytest.fixture
def fw() -> FwCfg:
    return FwCfg("fw_cfg", 0x0902_0000)


def test_registered_with_qemus_compatible_and_layout(fw: FwCfg) -> None:
    assert DEVICE_TYPES["fw_cfg"] is FwCfg
    assert FwCfg.compatible == ("qemu,fw-cfg-mmio",)
    layout = [(r.name, r.offset, r.size, r.kind, r.access_sizes) for r in fw.regions()]
    assert layout == [
        ("data", 0x0, 8, RegionKind.MMIO, (1, 2, 4, 8)),
        ("selector", 0x8, 2, RegionKind.MMIO, (2,)),
    ]


def test_signature_through_the_selector(fw: FwCfg) -> None:
    select(fw, 0x0000)
    assert data(fw, 4) == b"QEMU"  # QEMU: md.l 0x09020000 -> 554d4551
    # U-Boot's qfw_register: be32_to_cpu of the 4 bytes read must be 'QEMU'.
    select(fw, 0x0000)
    assert int.from_bytes(data(fw, 4), "big") == 0x5145_4D55


def test_reads_walk_the_item_and_pad_with_zeros(fw: FwCfg) -> None:
    select(fw, 0)
    assert data(fw, 8) == b"QEMU\0\0\0\0"  # QEMU: md.q -> 00000000554d4551
    select(fw, 0)
    assert [data(fw, 1) for _ in range(5)] == [b"Q", b"E", b"M", b"U", b"\0"]
    select(fw, 0)
    assert data(fw, 2) + data(fw, 2) + data(fw, 2) == b"QEMU\0\0"


def test_reset_selects_the_signature(fw: FwCfg) -> None:
    assert data(fw, 4) == b"QEMU"  # selected from power-on
    select(fw, 0x0005)
    fw.reset()
    assert data(fw, 4) == b"QEMU"


def test_id_has_no_dma_bit(fw: FwCfg) -> None:
    # QEMU 7.2 says 3 (traditional + DMA); DMA needs guest memory, so this model says 1, as QEMU
    # does with dma_enabled=false (and U-Boot then reads items through the data register).
    select(fw, 0x0001)
    assert int.from_bytes(data(fw, 4), "little") == 1


def test_items_of_a_vm_without_a_kernel(fw: FwCfg) -> None:
    expected = {
        0x0002: bytes(16),  # UUID
        0x0004: (1).to_bytes(2, "little"),  # NOGRAPHIC (QEMU: 1 with -nographic)
        0x0005: (1).to_bytes(2, "little"),  # NB_CPUS (QEMU: 1; U-Boot's `qfw cpus`: "1 cpu(s) online")
        0x0008: bytes(4),  # KERNEL_SIZE: "fatal: no kernel available"
        0x0017: bytes(4),  # SETUP_SIZE
        0x000E: bytes(2),  # BOOT_MENU
        0x0019: bytes(4),  # FILE_DIR: count 0, big-endian
    }
    for key, value in expected.items():
        select(fw, key)
        assert item(fw, len(value)) == value, hex(key)


def test_options_set_cpus_and_nographic() -> None:
    fw = FwCfg.from_options("fw", 0, {"cpus": "4", "nographic": "off"})
    select(fw, 0x0005)
    assert data(fw, 2) == b"\x04\x00"
    select(fw, 0x0004)
    assert data(fw, 2) == b"\x00\x00"
    with pytest.raises(ConfigError, match="option 'cpus'"):
        FwCfg.from_options("fw", 0, {"cpus": "0"})


def test_keys_past_the_table_and_unknown_items_read_zero(fw: FwCfg) -> None:
    for key in (0x00FF, 0x0040, 0x8000, 0x0021):  # QEMU: md.l after selecting 0x00ff -> 00000000
        select(fw, key)
        assert data(fw, 8) == bytes(8), hex(key)


def test_the_write_channel_bit_is_not_part_of_the_key(fw: FwCfg) -> None:
    select(fw, 0x4000)
    assert data(fw, 4) == b"QEMU"


def test_data_writes_are_ignored(fw: FwCfg) -> None:
    select(fw, 0)
    assert fw.write(DATA, 4, 0xFFFF_FFFF).ok
    assert data(fw, 4) == b"QEMU"


@pytest.mark.parametrize(("offset", "size"), [(1, 1), (4, 4), (2, 2)])
def test_data_register_answers_only_at_offset_zero(fw: FwCfg, offset: int, size: int) -> None:
    # QEMU: `md.b 0x09020000 6` takes a synchronous external abort at 0x09020001.
    assert fw.read(offset, size).error is AccessError.INVALID_REGISTER
    assert fw.write(offset, size, 0).error is AccessError.INVALID_REGISTER


def test_selector_is_write_only_and_two_bytes(fw: FwCfg) -> None:
    assert fw.read(SELECTOR, 2).error is AccessError.INVALID_ACCESS_SIZE
    assert fw.write(SELECTOR, 1, 0).error is AccessError.INVALID_ACCESS_SIZE


def test_no_dma_register(fw: FwCfg) -> None:
    assert all(region.offset + region.size <= 0x10 for region in fw.regions())
    assert fw.describe()["dma"] == "off"
