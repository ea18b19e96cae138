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
from tests.unit.fake_dma import FakeDma

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
        ("dma", 0x10, 8, RegionKind.MMIO, (1, 2, 4, 8)),  # QEMU virt: reg = <0x09020000 0x18>
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


def test_id_has_the_dma_bit_as_qemu_virt(fw: FwCfg) -> None:
    select(fw, 0x0001)  # QEMU 7.2 virt: 3 (traditional interface + DMA)
    assert int.from_bytes(data(fw, 4), "little") == 3


def test_dma_off_is_the_traditional_interface_only() -> None:
    fw = FwCfg.from_options("fw_cfg", 0, {"dma": "off"})
    select(fw, 0x0001)  # as QEMU with dma_enabled=false
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


def test_no_dma_register_with_dma_off() -> None:
    fw = FwCfg.from_options("fw_cfg", 0, {"dma": "off"})
    assert all(region.offset + region.size <= 0x10 for region in fw.regions())
    assert fw.describe()["dma"] == "off"
    assert fw.read(0x10, 4).error is AccessError.INVALID_REGISTER
    assert fw.write(0x14, 4, 0).error is AccessError.INVALID_REGISTER


# --- the DMA interface ---------------------------------------------------------------------------

RAM = 0x4000_0000
ACCESS = RAM + 0x1000  # where the guest puts its FWCfgDmaAccess
BUFFER = RAM + 0x2000  # where the data goes


@pytest.fixture
def dma_fw() -> tuple[FwCfg, FakeDma]:
    fw = FwCfg("fw_cfg", 0x0902_0000, cpus=2)
    ram = FakeDma(RAM, 0x10000)
    fw.attach_dma(ram)
    return fw, ram


def put_access(ram: FakeDma, control: int, length: int, address: int, at: int = ACCESS) -> None:
    """The guest's FWCfgDmaAccess: big-endian control, length and address."""
    ram.put(at, control.to_bytes(4, "big") + length.to_bytes(4, "big") + address.to_bytes(8, "big"))


def kick_8(fw: FwCfg, at: int = ACCESS) -> None:
    """U-Boot's qfw_mmio_read_entry_dma: writeq(cpu_to_be64(address)) at +16."""
    assert fw.write(0x10, 8, int.from_bytes(at.to_bytes(8, "big"), "little")).ok


def kick_halves(fw: FwCfg, at: int = ACCESS) -> None:
    """EDK2's QemuFwCfgDmaTransfer: the high half at +16, then the low half at +20, each big-endian."""
    assert fw.write(0x10, 4, int.from_bytes((at >> 32).to_bytes(4, "big"), "little")).ok
    assert fw.write(0x14, 4, int.from_bytes((at & 0xFFFF_FFFF).to_bytes(4, "big"), "little")).ok


def control(ram: FakeDma) -> int:
    return int.from_bytes(ram.get(ACCESS, 4), "big")


def test_dma_register_reads_the_signature(fw: FwCfg) -> None:
    # The register is big-endian: the bytes in guest memory spell "QEMU CFG" at any size.
    assert fw.read(0x10, 8).value.to_bytes(8, "little") == b"QEMU CFG"
    assert fw.read(0x10, 4).value.to_bytes(4, "little") == b"QEMU"
    assert fw.read(0x14, 4).value.to_bytes(4, "little") == b" CFG"
    assert fw.read(0x16, 2).value.to_bytes(2, "little") == b"FG"
    assert fw.read(0x13, 1).value == ord("U")
    # U-Boot and Linux compare be64_to_cpu(readq) with 0x51454d5520434647.
    assert int.from_bytes(fw.read(0x10, 8).value.to_bytes(8, "little"), "big") == 0x5145_4D55_2043_4647
    assert fw.read(0x12, 4).error is AccessError.UNALIGNED_ACCESS


def test_dma_register_takes_only_qemus_write_shapes(fw: FwCfg) -> None:
    for offset, size in ((0x10, 2), (0x12, 2), (0x11, 1), (0x14, 8)):
        result = fw.write(offset, size, 0)
        assert not result.ok, (offset, size)


def test_dma_select_and_read(dma_fw: tuple[FwCfg, FakeDma]) -> None:
    fw, ram = dma_fw
    put_access(ram, (0x0005 << 16) | 0x08 | 0x02, 2, BUFFER)  # SELECT NB_CPUS | READ
    kick_8(fw)
    assert control(ram) == 0  # done, no error
    assert ram.get(BUFFER, 2) == b"\x02\x00"
    assert fw.dma_address == 0  # QEMU clears the register when a transfer starts


def test_dma_reads_continue_where_the_last_stopped_and_pad_with_zeros(dma_fw: tuple[FwCfg, FakeDma]) -> None:
    fw, ram = dma_fw
    put_access(ram, 0x08 | 0x02, 2, BUFFER)  # SELECT key 0 (signature) | READ 2
    kick_halves(fw)
    put_access(ram, 0x02, 6, BUFFER + 2)  # READ 6 more: "MU" then four zeros past the end
    ram.put(BUFFER + 2, b"\xff" * 8)
    kick_halves(fw)
    assert control(ram) == 0
    assert ram.get(BUFFER, 10) == b"QEMU\0\0\0\0\xff\xff"
    # The data register sees the same position: the item is used up.
    assert data(fw, 1) == b"\0"


def test_dma_skip_moves_the_position_without_writing(dma_fw: tuple[FwCfg, FakeDma]) -> None:
    fw, ram = dma_fw
    put_access(ram, 0x08 | 0x04, 2, BUFFER)  # SELECT signature | SKIP 2
    ram.put(BUFFER, b"\xaa\xaa")
    kick_8(fw)
    assert control(ram) == 0
    assert ram.get(BUFFER, 2) == b"\xaa\xaa"
    assert data(fw, 2) == b"MU"


def test_dma_write_is_an_error_as_no_item_takes_writes(dma_fw: tuple[FwCfg, FakeDma]) -> None:
    fw, ram = dma_fw
    put_access(ram, (0x0005 << 16) | 0x08 | 0x10, 2, BUFFER)  # SELECT NB_CPUS | WRITE
    kick_8(fw)
    assert control(ram) == 0x01  # ERROR
    select(fw, 0x0005)
    assert data(fw, 2) == b"\x02\x00"  # unchanged


def test_dma_select_only_and_no_operation(dma_fw: tuple[FwCfg, FakeDma]) -> None:
    fw, ram = dma_fw
    put_access(ram, (0x0001 << 16) | 0x08, 100, BUFFER)  # SELECT ID, no operation: length is ignored
    kick_8(fw)
    assert control(ram) == 0
    assert data(fw, 4) == b"\x03\x00\x00\x00"


def test_dma_read_of_a_key_that_selects_nothing_gives_zeros(dma_fw: tuple[FwCfg, FakeDma]) -> None:
    fw, ram = dma_fw
    ram.put(BUFFER, b"\xff" * 4)
    put_access(ram, (0x00FF << 16) | 0x08 | 0x02, 4, BUFFER)
    kick_8(fw)
    assert control(ram) == 0
    assert ram.get(BUFFER, 4) == bytes(4)


def test_dma_to_an_address_outside_the_window_sets_error(dma_fw: tuple[FwCfg, FakeDma]) -> None:
    fw, ram = dma_fw
    put_access(ram, 0x08 | 0x02, 4, 0x1_0000_0000)  # data buffer outside guest RAM
    kick_8(fw)
    assert control(ram) == 0x01


def test_dma_access_structure_outside_the_window_is_not_a_crash(dma_fw: tuple[FwCfg, FakeDma]) -> None:
    fw, _ = dma_fw
    assert fw.write(0x10, 8, int.from_bytes((0x10).to_bytes(8, "big"), "little")).ok  # nothing there
    assert fw.dma_address == 0


def test_dma_without_a_granted_window_sets_error_not_a_crash() -> None:
    fw = FwCfg("fw_cfg", 0)  # the host has not attached a DMA handle: NoDma refuses everything
    kick_8(fw)
    assert data(fw, 4) == b"QEMU"
