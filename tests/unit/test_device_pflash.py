"""CFI flash (pflash_cfi01 as on QEMU virt): commands, status, query table, program/erase, file, mirror.

Expected values are what QEMU 7.2 (Debian 1:7.2+dfsg-7+deb12u18, ``qemu-system-aarch64 -M virt``)
answered to Debian's U-Boot 2023.01 doing the same ``mw``/``md`` sequences on flash bank 1
(0x04000000), not what this model computes. U-Boot sends commands as the bank does: one byte per
chip, replicated (``mw.l 0x04000000 0x00980098``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from device_service.model import (
    AccessError,
    ConfigError,
    MirrorUpdate,
    RegionKind,
    RomdDevice,
    supports_romd,
)
from device_service.models import DEVICE_TYPES
from device_service.models.pflash import PFlashCfi01

SECTOR = 256 * 1024
MiB = 1024 * 1024


def command(flash: PFlashCfi01, byte: int, offset: int = 0) -> None:
    """A command as U-Boot writes it to a 2 x16 bank: the byte on both chips' lanes."""
    assert flash.write(offset, 4, byte | byte << 16).ok


def write(flash: PFlashCfi01, offset: int, value: int, size: int = 4) -> None:
    result = flash.write(offset, size, value)
    assert result.ok, result.message


def read(flash: PFlashCfi01, offset: int, size: int = 4) -> int:
    result = flash.read(offset, size)
    assert result.ok, result.message
    return result.value


def words(flash: PFlashCfi01, offset: int, count: int) -> list[int]:
    return [read(flash, offset + 4 * i) for i in range(count)]


@pytest.fixture
def flash() -> PFlashCfi01:
    return PFlashCfi01("flash1", 0x0400_0000)


# `md.l 0x04000000 0x54` after `mw.l 0x04000000 0x00980098`, under QEMU.
QEMU_QUERY_DUMP = """
04000000: 00000000 00000000 00000000 00000000
04000010: 00000000 00000000 00000000 00000000
04000020: 00000000 00000000 00000000 00000000
04000030: 00000000 00000000 00000000 00000000
04000040: 00510051 00520052 00590059 00010001
04000050: 00000000 00310031 00000000 00000000
04000060: 00000000 00000000 00000000 00450045
04000070: 00550055 00000000 00000000 00070007
04000080: 00070007 000a000a 00000000 00040004
04000090: 00040004 00040004 00000000 00190019
040000a0: 00020002 00000000 000b000b 00000000
040000b0: 00010001 00ff00ff 00000000 00000000
040000c0: 00020002 00500050 00520052 00490049
040000d0: 00310031 00300030 00000000 00000000
040000e0: 00000000 00000000 00000000 00000000
040000f0: 00000000 00000000 00000000 00010001
04000100: 00000000 00000000 00000000 00000000
04000110: 00000000 00000000 00000000 00000000
04000120: 00000000 00000000 00000000 00000000
04000130: 00000000 00000000 00000000 00000000
04000140: 00000000 00000000 00000000 00000000
"""


def _dump_words(dump: str) -> list[int]:
    return [int(word, 16) for line in dump.strip().splitlines() for word in line.split()[1:]]


# --- identity and registration -----------------------------------------------------------------


def test_registered_as_a_romd_cfi_flash(flash: PFlashCfi01) -> None:
    assert DEVICE_TYPES["pflash"] is PFlashCfi01
    assert PFlashCfi01.compatible == ("cfi-flash",)
    [region] = flash.regions()
    assert (region.name, region.offset, region.size, region.kind) == ("flash", 0, 64 * MiB, RegionKind.ROMD)
    assert isinstance(flash, RomdDevice)
    assert supports_romd(flash) is flash


def test_options_from_a_device_spec(tmp_path: Path) -> None:
    image = tmp_path / "vars.img"
    image.write_bytes(b"\x12\x34")
    flash = PFlashCfi01.from_options(
        "f", 0, {"size": "32M", "sector": "128k", "file": str(image), "persist": "on", "readonly": "off"}
    )
    assert (flash.size, flash.sector, flash.persist, flash.readonly) == (32 * MiB, 128 * 1024, True, False)
    assert read(flash, 0, 2) == 0x3412
    assert flash.describe()["bank-width"] == "4"


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"sector": "100k"}, "option 'sector' must be a power of two"),
        ({"size": "0"}, "option 'size'"),
        ({"size": "1000k"}, "not a multiple of the sector size"),
        ({"persist": "on"}, "persist=on needs file=PATH"),
        ({"readonly": "maybe"}, "option 'readonly' must be on or off"),
        ({"colour": "red"}, "unknown option 'colour'"),
    ],
)
def test_bad_options_are_refused(options: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        PFlashCfi01.from_options("f", 0, options)


def test_persist_and_readonly_together_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="contradict"):
        PFlashCfi01("f", 0, file=str(tmp_path / "x"), persist=True, readonly=True)


# --- read array ----------------------------------------------------------------------------------


def test_unused_flash_reads_zero_as_qemu_virt(flash: PFlashCfi01) -> None:
    # QEMU: `md.l 0x04000000` on a bank with no drive reads 00000000 (its storage starts zeroed).
    assert words(flash, 0, 4) == [0, 0, 0, 0]
    assert read(flash, 64 * MiB - 8, 8) == 0


def test_array_reads_are_little_endian_at_every_size_and_alignment(tmp_path: Path) -> None:
    image = tmp_path / "img"
    image.write_bytes(bytes(range(16)))
    flash = PFlashCfi01("f", 0, file=str(image))
    assert read(flash, 0, 1) == 0x00
    assert read(flash, 1, 2) == 0x0201
    assert read(flash, 3, 4) == 0x06050403
    assert read(flash, 5, 8) == 0x0C0B0A0908070605
    assert read(flash, 16, 4) == 0  # past the file: padded with zeros


def test_accesses_past_the_bank_are_refused(flash: PFlashCfi01) -> None:
    assert flash.read(64 * MiB - 2, 4).error is AccessError.OUT_OF_RANGE
    assert flash.write(64 * MiB, 1, 0xFF).error is AccessError.OUT_OF_RANGE


# --- status register ---------------------------------------------------------------------------


def test_status_reads_ready_on_both_chips_at_every_size(flash: PFlashCfi01) -> None:
    command(flash, 0x70)
    # QEMU: md.l -> 00800080 00800080; md.w -> 0080 0080; md.b -> 80 80 80 80; md.q -> 0080008000800080
    assert words(flash, 0, 2) == [0x0080_0080, 0x0080_0080]
    assert [read(flash, o, 2) for o in (0, 2)] == [0x0080, 0x0080]
    assert [read(flash, o, 1) for o in range(4)] == [0x80] * 4
    assert read(flash, 0, 8) == 0x0080_0080_0080_0080


def test_clear_status_returns_to_read_array_with_status_zero(flash: PFlashCfi01) -> None:
    command(flash, 0x70)
    command(flash, 0x50)
    assert words(flash, 0, 2) == [0, 0]  # array contents again
    command(flash, 0x70)
    assert read(flash, 0) == 0  # QEMU: 00000000


# --- CFI query ---------------------------------------------------------------------------------


def test_query_table_is_qemus_word_for_word(flash: PFlashCfi01) -> None:
    command(flash, 0x98)
    assert words(flash, 0, 0x54) == _dump_words(QEMU_QUERY_DUMP)


def test_query_narrow_and_wide_reads(flash: PFlashCfi01) -> None:
    command(flash, 0x98)
    # QEMU: md.b 0x04000040 8 -> 51 51 51 51 52 52 52 52; md.w -> 0051 0051 0052 0052
    assert [read(flash, 0x40 + i, 1) for i in range(8)] == [0x51] * 4 + [0x52] * 4
    assert [read(flash, 0x40 + 2 * i, 2) for i in range(4)] == [0x51, 0x51, 0x52, 0x52]
    # md.q 0x04000040 2 -> 0052005200510051 0001000100590059
    assert read(flash, 0x40, 8) == 0x0052_0052_0051_0051
    assert read(flash, 0x48, 8) == 0x0001_0001_0059_0059


def test_query_does_not_repeat_per_sector_and_only_0xff_leaves_it(flash: PFlashCfi01) -> None:
    command(flash, 0x98)
    assert words(flash, SECTOR + 0x40, 2) == [0, 0]  # QEMU: md.l 0x04040040 2 -> 0 0
    command(flash, 0xF0)
    assert read(flash, 0x44) == 0x0052_0052  # still in query mode
    command(flash, 0xFF)
    assert read(flash, 0x44) == 0


def test_query_table_follows_the_geometry() -> None:
    flash = PFlashCfi01("f", 0, size=32 * MiB, sector=128 * 1024)
    command(flash, 0x98)
    chip_size_log2, blocks_low, blocks_high, sector_low, sector_high = (
        read(flash, 4 * index) & 0xFF for index in (0x27, 0x2D, 0x2E, 0x2F, 0x30)
    )
    assert chip_size_log2 == 24  # each chip holds 16 MiB
    assert (blocks_high << 8 | blocks_low) + 1 == 256
    assert (sector_high << 16 | sector_low << 8) == 64 * 1024  # each chip holds half a sector


# --- identifiers -------------------------------------------------------------------------------


def test_read_identifier(flash: PFlashCfi01) -> None:
    command(flash, 0x90)
    # QEMU: md.l 0x04000000 4 -> 00890089 00180018 00000000 00000000 (the same at 0x04040000 and 0x04000400)
    for base in (0, SECTOR, 0x400):
        assert words(flash, base, 4) == [0x0089_0089, 0x0018_0018, 0, 0]
    assert [read(flash, i, 1) for i in range(8)] == [0x89] * 4 + [0x18] * 4
    assert [read(flash, 2 * i, 2) for i in range(4)] == [0x89, 0x89, 0x18, 0x18]
    assert read(flash, 0, 8) == 0x0018_0018_0089_0089


# --- program and erase -------------------------------------------------------------------------


def test_word_program_stores_the_value_as_written(flash: PFlashCfi01) -> None:
    command(flash, 0x50)
    command(flash, 0x40)
    assert read(flash, 0x10) == 0  # status, cleared just before
    write(flash, 0x10, 0x1234_5678)
    assert read(flash, 0x10) == 0x0080_0080
    command(flash, 0xFF)
    assert read(flash, 0x10) == 0x1234_5678
    command(flash, 0x10)  # the other program opcode, a half-word at +2
    write(flash, 0x12, 0xFFFF, size=2)
    command(flash, 0xFF)
    assert read(flash, 0x10) == 0xFFFF_5678  # QEMU does not AND into the old contents


def test_byte_program(flash: PFlashCfi01) -> None:
    command(flash, 0x20)
    command(flash, 0xD0)
    command(flash, 0x40)
    write(flash, 3, 0x5A, size=1)
    command(flash, 0xFF)
    assert read(flash, 0) == 0x5AFF_FFFF


def test_block_erase_happens_at_the_first_cycle(flash: PFlashCfi01) -> None:
    command(flash, 0x40)
    write(flash, 0x10, 0x1234_5678)
    command(flash, 0x50)
    command(flash, 0x20, offset=0x100)  # any address inside the sector
    assert read(flash, 0x100) == 0x0080_0080
    command(flash, 0xFF)  # no confirm: the sector is erased already
    assert words(flash, 0, 2) == [0xFFFF_FFFF, 0xFFFF_FFFF]
    assert words(flash, SECTOR - 4, 2) == [0xFFFF_FFFF, 0]  # only that sector


def test_block_erase_confirm_and_bad_second_cycle(flash: PFlashCfi01) -> None:
    command(flash, 0x50)
    command(flash, 0x20, offset=SECTOR)
    command(flash, 0xD0, offset=SECTOR)
    assert read(flash, SECTOR) == 0x0080_0080
    command(flash, 0xFF)
    command(flash, 0x20)
    command(flash, 0x42)  # not a confirm: QEMU goes back to read array
    assert read(flash, 0) == 0xFFFF_FFFF


def test_buffered_program(flash: PFlashCfi01) -> None:
    command(flash, 0x50)
    command(flash, 0xE8, offset=0x100)
    assert read(flash, 0x100) == 0x0080_0080
    write(flash, 0x100, 0x0001_0001)  # two words: count - 1 on each chip
    assert read(flash, 0x100) == 0x0080_0080
    write(flash, 0x100, 0xAABB_CCDD)
    assert read(flash, 0x100) == 0x0080_0080  # status while the buffer fills
    write(flash, 0x104, 0x1122_3344)
    command(flash, 0xD0, offset=0x100)
    assert read(flash, 0x100) == 0x0080_0080
    command(flash, 0xFF)
    assert words(flash, 0x100, 2) == [0xAABB_CCDD, 0x1122_3344]


def test_buffered_program_half_words_keep_the_other_bytes(flash: PFlashCfi01) -> None:
    command(flash, 0x50)
    command(flash, 0xE8, offset=0x300)
    write(flash, 0x300, 0x0001_0001)
    write(flash, 0x300, 0x1111, size=2)
    write(flash, 0x306, 0x2222, size=2)
    command(flash, 0xD0, offset=0x300)
    command(flash, 0xFF)
    assert words(flash, 0x300, 2) == [0x0000_1111, 0x2222_0000]  # QEMU: 00001111 22220000


def test_buffered_data_outside_the_buffer_aborts_everything(flash: PFlashCfi01) -> None:
    command(flash, 0x50)
    command(flash, 0xE8, offset=0xFFC)
    write(flash, 0xFFC, 0x0001_0001)
    write(flash, 0xFFC, 0xBBBB_BBBB)  # inside the 4 KiB buffer at 0x000
    write(flash, 0x1000, 0xCCCC_CCCC)  # outside it
    assert read(flash, 0) == 0x0090_0090  # program error
    command(flash, 0xD0)
    assert words(flash, 0xFFC, 2) == [0, 0]  # nothing written, back in read array


def test_buffered_program_without_confirm_is_dropped(flash: PFlashCfi01) -> None:
    command(flash, 0x50)
    command(flash, 0xE8, offset=0x200)
    write(flash, 0x200, 0)
    write(flash, 0x200, 0xDDDD_DDDD)
    command(flash, 0xFF, offset=0x200)
    assert read(flash, 0x200) == 0
    command(flash, 0x70)
    assert read(flash, 0) == 0x0080_0080


def test_status_error_bits_stick_until_cleared_and_block_a_confirm(flash: PFlashCfi01) -> None:
    command(flash, 0xE8)
    write(flash, 0, 0)
    write(flash, 0x2000, 0xAAAA_AAAA)  # out of the buffer window: program error
    command(flash, 0xD0)
    command(flash, 0xE8)  # a fresh buffered program, status not cleared
    write(flash, 0, 0)
    write(flash, 0, 0x1234_5678)
    command(flash, 0xD0)
    assert read(flash, 0) == 0  # refused: SR.4 still set, back to read array
    command(flash, 0x50)
    command(flash, 0x70)
    assert read(flash, 0) == 0


# --- block locking and unknown commands --------------------------------------------------------


def test_block_lock_commands(flash: PFlashCfi01) -> None:
    command(flash, 0x50)
    command(flash, 0x60)
    assert read(flash, 0) == 0  # status (cleared)
    command(flash, 0x01)  # lock block
    assert read(flash, 0) == 0x0080_0080
    command(flash, 0x60)
    command(flash, 0x2F)  # lock-down: QEMU goes back to read array
    assert read(flash, 0) == 0
    command(flash, 0x60)
    command(flash, 0xD0)  # unlock
    assert read(flash, 0) == 0x0080_0080
    command(flash, 0x90)
    assert read(flash, 8) == 0  # block lock status: never locked


def test_unknown_commands_return_to_read_array_and_keep_the_status(flash: PFlashCfi01) -> None:
    command(flash, 0x20)
    command(flash, 0xD0)
    command(flash, 0x42)
    assert read(flash, 0) == 0xFFFF_FFFF
    command(flash, 0x42)
    assert read(flash, 0) == 0xFFFF_FFFF
    command(flash, 0x70)
    assert read(flash, 0) == 0x0080_0080
    command(flash, 0x00)  # QEMU's own read-array encoding
    assert read(flash, 0) == 0xFFFF_FFFF
    command(flash, 0x70)
    command(flash, 0x20)  # a read mode (status) takes a new command at once
    command(flash, 0xFF)
    assert read(flash, 0) == 0xFFFF_FFFF


def test_eight_byte_writes_are_two_four_byte_writes(flash: PFlashCfi01) -> None:
    write(flash, 0, 0x0040_0040 | 0x1234_5678 << 32, size=8)  # program command, then its data at +4
    command(flash, 0xFF)
    assert read(flash, 4) == 0x1234_5678


def test_unaligned_accesses_in_command_mode_are_refused(flash: PFlashCfi01) -> None:
    command(flash, 0x98)
    assert flash.read(0x41, 4).error is AccessError.UNALIGNED_ACCESS
    assert flash.write(0x2, 4, 0xFF).error is AccessError.UNALIGNED_ACCESS


def test_reset_returns_to_read_array_with_ready_status(flash: PFlashCfi01) -> None:
    command(flash, 0x40)
    write(flash, 0, 0x1234_5678)
    command(flash, 0x50)
    command(flash, 0x98)
    flash.reset()
    assert read(flash, 0) == 0x1234_5678  # contents kept
    command(flash, 0x70)
    assert read(flash, 0) == 0x0080_0080


# --- readonly ------------------------------------------------------------------------------------


def test_readonly_flash_reports_errors_and_changes_nothing(tmp_path: Path) -> None:
    image = tmp_path / "ro.img"
    image.write_bytes(bytes(4096))
    flash = PFlashCfi01("f", 0, file=str(image), readonly=True)
    # QEMU with -drive if=pflash,readonly=on:
    command(flash, 0x50)
    command(flash, 0x20)
    assert read(flash, 0) == 0x00A0_00A0
    command(flash, 0xD0)
    assert read(flash, 0) == 0x00A0_00A0
    command(flash, 0x50)
    command(flash, 0x40)
    write(flash, 0, 0x1234_5678)
    assert read(flash, 0) == 0x0090_0090
    command(flash, 0x50)
    command(flash, 0xE8)
    write(flash, 0, 0)
    assert read(flash, 0) == 0x0080_0080
    write(flash, 0, 0x1111_1111)
    assert read(flash, 0) == 0x0090_0090
    command(flash, 0xD0)
    assert read(flash, 0) == 0  # confirm refused: read array, nothing written
    command(flash, 0x70)
    assert read(flash, 0) == 0x0090_0090
    assert image.read_bytes() == bytes(4096)


# --- file and persistence ------------------------------------------------------------------------


def test_persist_round_trip(tmp_path: Path) -> None:
    image = tmp_path / "vars.img"
    image.write_bytes(b"\x11" * 4096)
    flash = PFlashCfi01("f", 0, file=str(image), persist=True)
    assert read(flash, 0) == 0x1111_1111 and read(flash, 4096) == 0
    command(flash, 0x20, offset=SECTOR)  # erase sector 1: written through, extending the file
    command(flash, 0xD0, offset=SECTOR)
    command(flash, 0xE8, offset=SECTOR)
    write(flash, SECTOR, 0x0001_0001)
    write(flash, SECTOR, 0x6F6F_6662)
    write(flash, SECTOR + 4, 0x0072_6162)
    command(flash, 0xD0, offset=SECTOR)
    command(flash, 0x40)
    write(flash, 0, 0x5A5A_5A5A)
    command(flash, 0xFF)

    data = image.read_bytes()
    assert len(data) == 2 * SECTOR
    assert data[:8] == b"\x5a\x5a\x5a\x5a\x11\x11\x11\x11"
    assert data[4096:SECTOR] == bytes(SECTOR - 4096)  # the gap reads as the padding did
    assert data[SECTOR : SECTOR + 8] == b"bfoobar\x00"
    assert data[SECTOR + 8 : 2 * SECTOR] == b"\xff" * (SECTOR - 8)

    again = PFlashCfi01("f", 0, file=str(image), persist=True)  # a restart of the whole stack
    assert again.mirror_contents("flash", 0, 2 * SECTOR + 4) == flash.mirror_contents("flash", 0, 2 * SECTOR + 4)


def test_persist_creates_a_missing_file(tmp_path: Path) -> None:
    image = tmp_path / "new.img"
    flash = PFlashCfi01("f", 0, file=str(image), persist=True)
    assert read(flash, 0) == 0
    command(flash, 0x40, offset=8)
    write(flash, 8, 0xCAFE_F00D)
    assert image.read_bytes() == bytes(8) + bytes.fromhex("0df0feca")


def test_without_persist_the_file_is_never_written(tmp_path: Path) -> None:
    image = tmp_path / "bios.bin"
    image.write_bytes(b"\x01\x02")
    flash = PFlashCfi01("f", 0, file=str(image))
    command(flash, 0x20)
    command(flash, 0xD0)
    assert image.read_bytes() == b"\x01\x02"


def test_bad_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        PFlashCfi01("f", 0, file=str(tmp_path / "missing"))
    big = tmp_path / "big"
    big.write_bytes(bytes(SECTOR * 2 + 1))
    with pytest.raises(ConfigError, match="more than the bank"):
        PFlashCfi01("f", 0, size=2 * SECTOR, file=str(big))


# --- mirror updates ------------------------------------------------------------------------------


def test_mirror_contents_and_range_checks(tmp_path: Path) -> None:
    image = tmp_path / "img"
    image.write_bytes(b"abcdef")
    flash = PFlashCfi01("f", 0, file=str(image))
    assert flash.mirror_contents("flash", 1, 4) == b"bcde"
    with pytest.raises(KeyError):
        flash.mirror_contents("other", 0, 1)
    with pytest.raises(ValueError):
        flash.mirror_contents("flash", 64 * MiB - 1, 2)


def test_mirror_goes_off_on_the_first_command_and_back_on_in_read_array(flash: PFlashCfi01) -> None:
    assert flash.take_mirror_updates() == []
    command(flash, 0xFF)  # read array while in read array: nothing changes
    assert flash.take_mirror_updates() == []
    command(flash, 0x98)
    assert flash.take_mirror_updates() == [MirrorUpdate("flash", False)]
    assert read(flash, 0x40) == 0x0051_0051
    assert flash.take_mirror_updates() == []
    command(flash, 0xF0)  # stays in query mode
    assert flash.take_mirror_updates() == []
    command(flash, 0xFF)
    assert flash.take_mirror_updates() == [MirrorUpdate("flash", True)]


def test_mirror_patches_carry_erased_and_programmed_bytes(flash: PFlashCfi01) -> None:
    command(flash, 0x20, offset=SECTOR + 0x10)
    [update] = flash.take_mirror_updates()
    assert update.mirror_enabled is False
    assert update.patches == ((SECTOR, b"\xff" * SECTOR),)
    command(flash, 0xD0)
    assert flash.take_mirror_updates() == []
    command(flash, 0x40)
    write(flash, 6, 0xBEEF, size=2)
    assert flash.take_mirror_updates() == [MirrorUpdate("flash", False, ((6, b"\xef\xbe"),))]
    command(flash, 0xFF)
    assert flash.take_mirror_updates() == [MirrorUpdate("flash", True)]


def test_buffered_program_patches_only_at_the_confirm_and_coalesced(flash: PFlashCfi01) -> None:
    command(flash, 0xE8, offset=0x100)
    write(flash, 0x100, 0x0003_0003)
    for index in range(4):
        write(flash, 0x100 + 4 * index, 0x0101_0101 * (index + 1))
    assert flash.take_mirror_updates() == [MirrorUpdate("flash", False)]  # staged, not in the flash yet
    command(flash, 0xD0)
    command(flash, 0xE8, offset=0x110)  # a second buffer right after the first
    write(flash, 0x110, 0)
    write(flash, 0x110, 0x0505_0505)
    command(flash, 0xD0)
    command(flash, 0xFF)
    expected = b"".join(bytes([n]) * 4 for n in range(1, 6))
    assert flash.take_mirror_updates() == [MirrorUpdate("flash", True, ((0x100, expected),))]


def test_readonly_flash_sends_no_patches(tmp_path: Path) -> None:
    image = tmp_path / "ro"
    image.write_bytes(b"")
    flash = PFlashCfi01("f", 0, file=str(image), readonly=True)
    command(flash, 0x20)
    command(flash, 0xD0)
    command(flash, 0xFF)
    assert flash.take_mirror_updates() == []  # off and on again between two calls: no net change


def test_reset_turns_the_mirror_back_on(flash: PFlashCfi01) -> None:
    command(flash, 0x70)
    flash.take_mirror_updates()
    flash.reset()
    assert flash.take_mirror_updates() == [MirrorUpdate("flash", True)]


# --- U-Boot's buffered writes, and the write_buffer option ----------------------------------------


def _uboot_buffer_write(flash: PFlashCfi01, sector_start: int, dest: int, half_words: list[int]) -> int:
    """What U-Boot 2023.01's ``flash_write_cfibuffer`` sends (16-bit port, as QEMU's trace shows):
    clear status, read status, 0xE8 and the count at the sector's start, the data at ``dest``,
    the confirm at the sector's start; returns what its status poll then reads."""
    for byte in (0x50, 0x70, 0xE8):
        write(flash, sector_start, byte, size=2)
    write(flash, sector_start, len(half_words) - 1, size=2)
    for index, half_word in enumerate(half_words):
        write(flash, dest + 2 * index, half_word, size=2)
    write(flash, sector_start, 0xD0, size=2)
    return read(flash, sector_start, 2)


def test_uboot_saveenv_buffer_past_the_window_fails_as_under_debian_qemu(flash: PFlashCfi01) -> None:
    # QEMU 7.2 (Debian): "Flash buffer write timeout at address 4020000 data 0" on `saveenv`.
    assert _uboot_buffer_write(flash, 0x20000, 0x20000, [0x1111] * 4) == 0x0080  # first buffer: fine
    # Data past the 4 KiB window: the confirm is refused and the poll reads array data (U-Boot's "data").
    assert _uboot_buffer_write(flash, 0x20000, 0x21000, [0x2222] * 4) == 0x1111
    command(flash, 0xFF)
    assert read(flash, 0x20000, 8) == 0x1111_1111_1111_1111
    assert read(flash, 0x21000, 8) == 0


def test_direct_write_buffer_takes_the_data_anywhere(tmp_path: Path) -> None:
    image = tmp_path / "env.img"
    flash = PFlashCfi01.from_options("f", 0, {"file": str(image), "persist": "on", "write_buffer": "direct"})
    assert _uboot_buffer_write(flash, 0x20000, 0x21000, [0x6F66, 0x3D6F, 0x6162, 0x0072]) == 0x0080
    command(flash, 0xFF)
    assert flash.mirror_contents("flash", 0x21000, 8) == b"foo=bar\x00"
    assert image.read_bytes()[0x21000:] == b"foo=bar\x00"
    assert flash.describe()["write-buffer"] == "direct"


def test_direct_write_buffer_keeps_the_data_when_not_confirmed() -> None:
    flash = PFlashCfi01("f", 0, write_buffer="direct")
    command(flash, 0xE8)
    write(flash, 0, 0)
    write(flash, 0x40, 0x1234_5678)
    assert flash.take_mirror_updates() == [MirrorUpdate("flash", False, ((0x40, bytes.fromhex("78563412")),))]
    command(flash, 0xFF)  # not a confirm: read array, but the data went in already
    assert read(flash, 0x40) == 0x1234_5678


def test_write_buffer_option_is_checked() -> None:
    with pytest.raises(ConfigError, match="option 'write_buffer' must be staged"):
        PFlashCfi01.from_options("f", 0, {"write_buffer": "lazy"})


def test_changed_ranges_stay_bounded_when_nobody_takes_updates(flash: PFlashCfi01) -> None:
    for index in range(3000):  # scattered single-byte programs, never taken
        command(flash, 0x40)
        write(flash, 16 * index, 0xA5, size=1)
    command(flash, 0xFF)
    assert len(flash._dirty) <= 1024
    [update] = flash.take_mirror_updates()
    mirror = bytearray(flash.size)
    for offset, data in update.patches:
        mirror[offset : offset + len(data)] = data
    assert mirror == flash.storage
