"""PCIe ECAM window with QEMU's gpex host bridge at 00:00.0 and nothing else.

Expected values are what ``qemu-system-aarch64 -M virt`` answered to U-Boot's ``md``/``mw`` on the
ECAM window at 0x4010000000 and its ``pci header 00.00.00``.
"""

from __future__ import annotations

import pytest

from device_service.model import AccessError, ConfigError, RegionKind
from device_service.models import DEVICE_TYPES
from device_service.models.pcie import PcieHost

MiB = 1 << 20


def ecam(bus: int, device: int, function: int, register: int = 0) -> int:
    return bus << 20 | device << 15 | function << 12 | register


def read(host: PcieHost, offset: int, size: int = 4) -> int:
    result = host.read(offset, size)
    assert result.ok, result.message
    return result.value


def write(host: PcieHost, offset: int, value: int, size: int = 4) -> None:
    result = host.write(offset, size, value)
    assert result.ok, result.message


@pytest.fixture
def host() -> PcieHost:
    return PcieHost("pcie", 0x40_1000_0000)


def test_registered_as_generic_ecam(host: PcieHost) -> None:
    assert DEVICE_TYPES["pcie"] is PcieHost
    assert PcieHost.compatible == ("pci-host-ecam-generic",)
    [region] = host.regions()
    assert (region.name, region.offset, region.size, region.kind) == ("ecam", 0, 256 * MiB, RegionKind.MMIO)
    assert host.describe() == {"size": "0x10000000", "bus-range": "0-255"}


def test_host_bridge_header_at_reset(host: PcieHost) -> None:
    # `md.l 0x4010000000 0x10` under QEMU, except command and cache line, which U-Boot sets before
    # its prompt (QEMU's trace of U-Boot's first read of the command register says 0).
    header = [read(host, 4 * i) for i in range(16)]
    assert header == [0x0008_1B36, 0, 0x0600_0000, 0, 0, 0, 0, 0, 0, 0, 0, 0x1100_1AF4, 0, 0, 0, 0]


#: U-Boot 2023.01 enumerating the bus, as QEMU's ``-trace pci_cfg_*`` logged it (register, size,
#: value; ``None`` marks a write). Sizes are the ones U-Boot's dm_pci config accessors use.
UBOOT_ENUMERATION = [
    (0x00, 2, 0x1B36), (0x0E, 1, 0x00), (0x02, 2, 0x0008), (0x08, 4, 0x0600_0000), (0x2C, 4, 0x1100_1AF4),
    (0x0A, 2, 0x0600), (0x04, 2, 0x0000), (0x0E, 1, 0x00),
    *((bar, 4, write) for bar in range(0x10, 0x28, 4) for write in (None, 0)),
    (0x30, 4, None), (0x30, 4, 0), (0x0A, 2, 0x0600),
    (0x04, 2, None), (0x0C, 1, None), (0x0D, 1, None),
    (0x00, 2, 0x1B36), (0x02, 2, 0x0008), (0x0B, 1, 0x06), (0x0A, 1, 0x00),
]  # fmt: skip
UBOOT_WRITES = {0x10: 0xFFFF_FFFF, 0x14: 0xFFFF_FFFF, 0x18: 0xFFFF_FFFF, 0x1C: 0xFFFF_FFFF, 0x20: 0xFFFF_FFFF,
                0x24: 0xFFFF_FFFF, 0x30: 0xFFFF_FFFE, 0x04: 0x0004, 0x0C: 0x08, 0x0D: 0x80}  # fmt: skip


def test_uboot_enumeration_sees_what_qemu_answered(host: PcieHost) -> None:
    for register, size, value in UBOOT_ENUMERATION:
        if value is None:
            write(host, register, UBOOT_WRITES[register], size)
        else:
            assert read(host, register, size) == value, hex(register)
    # ... and `pci header 00.00.00` afterwards: command 0x0004, cache line 0x08, latency 0x00.
    assert (read(host, 0x04, 2), read(host, 0x0C, 1), read(host, 0x0D, 1)) == (0x0004, 0x08, 0x00)


def test_what_uboot_pci_reads(host: PcieHost) -> None:
    # U-Boot `pci`: 00.00.00 0x1b36 0x0008 Bridge device 0x00
    assert read(host, 0x00, 2) == 0x1B36
    assert read(host, 0x02, 2) == 0x0008
    assert read(host, 0x0B, 1) == 0x06  # class: bridge
    assert read(host, 0x0A, 1) == 0x00  # subclass: host bridge
    assert read(host, 0x0E, 1) == 0x00  # header type 0, single function
    assert read(host, 0x3D, 1) == 0x00  # no interrupt pin


def test_narrow_and_wide_reads(host: PcieHost) -> None:
    # QEMU: md.w 0x4010000002 -> 0008; md.b 0x4010000003 -> 00
    assert read(host, 2, 2) == 0x0008
    assert read(host, 3, 1) == 0x00
    assert read(host, 0, 8) == 0x0000_0000_0008_1B36


def test_every_other_function_and_register_reads_all_ones(host: PcieHost) -> None:
    # QEMU: md.l at 0x4010008000 (00:01.0), 0x4010100000 (01:00.0), 0x4010001000 (00:00.1),
    # 0x4010000100 (past the 256-byte space), 0x401ffffffc (last word) -> ffffffff
    for offset in (ecam(0, 1, 0), ecam(1, 0, 0), ecam(0, 0, 1), ecam(0, 0, 0, 0x100), 256 * MiB - 4):
        assert read(host, offset) == 0xFFFF_FFFF, hex(offset)
    assert read(host, ecam(0, 31, 7, 0x2), 2) == 0xFFFF
    assert read(host, ecam(3, 0, 0), 1) == 0xFF
    assert read(host, ecam(0, 1, 0), 8) == 0xFFFF_FFFF_FFFF_FFFF


def test_scan_of_bus_zero_finds_only_the_host_bridge(host: PcieHost) -> None:
    found = [device for device in range(32) if read(host, ecam(0, device, 0), 2) != 0xFFFF]
    assert found == [0]


def test_write_masks_are_qemus(host: PcieHost) -> None:
    # Under QEMU, after writing all ones to every header word and 0x40, then 0x12345678 to 0xfc:
    for register in (0x00, 0x04, 0x08, 0x0C, 0x10, 0x2C, 0x30, 0x3C, 0x40):
        write(host, register, 0xFFFF_FFFF)
    write(host, 0xFC, 0x1234_5678)
    header = [read(host, 4 * i) for i in range(17)]
    assert header == [
        0x0008_1B36,  # IDs read-only
        0x0000_0507,  # command: IO, memory, master, SERR, INTx disable; status unchanged
        0x0600_0000,  # revision and class read-only
        0x0000_00FF,  # cache line size only (latency timer read-only)
        0, 0, 0, 0, 0, 0, 0,  # no BARs, no CIS
        0x1100_1AF4,  # subsystem read-only
        0,  # expansion ROM: none
        0, 0,
        0x0000_00FF,  # interrupt line only
        0xFFFF_FFFF,  # device-specific bytes are writable
    ]  # fmt: skip
    assert read(host, 0xFC) == 0x1234_5678


def test_writes_elsewhere_are_ignored(host: PcieHost) -> None:
    write(host, ecam(0, 1, 0, 4), 0xFFFF_FFFF)
    write(host, ecam(0, 0, 0, 0x100), 0)
    assert read(host, ecam(0, 1, 0, 4)) == 0xFFFF_FFFF
    assert read(host, 4) == 0


def test_byte_writes_and_eight_byte_writes(host: PcieHost) -> None:
    write(host, 0x04, 0x06, size=1)  # memory | master
    assert read(host, 0x04, 2) == 0x0006
    write(host, 0x08, 0x0000_0010 << 32, size=8)  # revision/class word untouched, cache line 0x10
    assert read(host, 0x0C) == 0x10


def test_reset_restores_the_header_but_not_device_specific_bytes(host: PcieHost) -> None:
    write(host, 0x04, 0x0507)
    write(host, 0x3C, 0x2A, size=1)
    write(host, 0x80, 0xDEAD_BEEF)
    host.reset()
    assert read(host, 0x04) == 0 and read(host, 0x3C) == 0
    assert read(host, 0x80) == 0xDEAD_BEEF  # as QEMU's pci_do_device_reset


def test_small_window_and_bus_range() -> None:
    host = PcieHost.from_options("pcie", 0x3F00_0000, {"size": "16M"})  # virt,highmem=off
    assert host.describe()["bus-range"] == "0-15"
    assert host.regions()[0].size == 16 * MiB
    assert read(host, 0) == 0x0008_1B36
    assert read(host, 16 * MiB - 4) == 0xFFFF_FFFF

    ranged = PcieHost.from_options("pcie", 0, {"bus_range": "0-3"})
    assert ranged.regions()[0].size == 4 * MiB

    offset_range = PcieHost.from_options("pcie", 0, {"size": "2M", "bus_range": "4-5"})
    assert offset_range.function_at(MiB + (1 << 15)) == (5, 1, 0)
    assert read(offset_range, 0) == 0x0008_1B36  # the host bridge sits on the root bus, 04:00.0


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"size": "3k"}, "option 'size'"),
        ({"size": "512M"}, "option 'size'"),
        ({"bus_range": "5-4"}, "option 'bus_range'"),
        ({"bus_range": "0-256"}, "option 'bus_range'"),
        ({"bus_range": "zero"}, "option 'bus_range'"),
        ({"size": "2M", "bus_range": "0-3"}, "needs 4 MiB of ECAM"),
    ],
)
def test_bad_options_are_refused(options: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        PcieHost.from_options("pcie", 0, options)


def test_unaligned_and_out_of_range_accesses_are_refused(host: PcieHost) -> None:
    assert host.read(1, 2).error is AccessError.UNALIGNED_ACCESS
    assert host.write(2, 4, 0).error is AccessError.UNALIGNED_ACCESS
    assert host.read(256 * MiB, 4).error is AccessError.OUT_OF_RANGE
