"""RegisterBank: dispatch by offset, access rules, hooks, reset, and refusing bad tables."""

from __future__ import annotations

import pytest

from device_service.model import AccessError
from device_service.registers import (
    PRIMECELL_ID_NAMES,
    Register,
    RegisterBank,
    primecell_id_registers,
)


class Recorder:
    """Collects hook calls so tests can see what the bank did."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, int]] = []
        self.reads = 0

    def on_write(self, old: int, new: int) -> None:
        self.writes.append((old, new))

    def on_read(self) -> int:
        self.reads += 1
        return 0xCAFE_F00D


def make_bank(recorder: Recorder | None = None) -> RegisterBank:
    recorder = recorder or Recorder()
    return RegisterBank(
        [
            Register("CTRL", 0x00, reset=0x0300, mask=0xFFFF),
            Register("STATUS", 0x04, reset=0x90, access="ro"),
            Register("CLEAR", 0x08, access="wo", on_write=recorder.on_write),
            Register("DATA", 0x0C, on_read=recorder.on_read, side_effect_free_read=False),
            Register("WIDE", 0x10, width_bits=64, reset=0x1122_3344_5566_7788),
            Register("WORDONLY", 0x18, sizes=(4,)),
            Register("HOOKED", 0x1C, mask=0xF0, on_write=recorder.on_write),
        ]
    )


def test_reset_values_are_read_back() -> None:
    bank = make_bank()
    assert bank.read(0x00, 4).value == 0x0300
    assert bank.read(0x04, 4).value == 0x90
    assert bank.read(0x10, 8).value == 0x1122_3344_5566_7788


def test_narrow_reads_return_low_bits_and_narrow_writes_zero_extend() -> None:
    bank = make_bank()
    assert bank.read(0x10, 1).value == 0x88
    assert bank.read(0x10, 2).value == 0x7788
    assert bank.read(0x10, 4).value == 0x5566_7788
    assert bank.write(0x00, 1, 0x1FF).ok  # only the low byte travels
    assert bank.read(0x00, 4).value == 0x00FF


def test_mask_keeps_bits_software_cannot_write() -> None:
    bank = make_bank()
    bank.write(0x00, 4, 0xFFFF_FFFF)
    assert bank.read(0x00, 4).value == 0xFFFF
    bank.write(0x1C, 4, 0xFF)
    assert bank.read(0x1C, 4).value == 0xF0


def test_read_only_ignores_writes_and_write_only_reads_zero() -> None:
    recorder = Recorder()
    bank = make_bank(recorder)
    assert bank.write(0x04, 4, 0x1234).ok
    assert bank.read(0x04, 4).value == 0x90
    assert bank.write(0x08, 4, 0x55).ok
    assert recorder.writes == [(0, 0x55)]
    assert bank.read(0x08, 4).value == 0


def test_hooks_see_old_and_new_value_and_read_hook_replaces_storage() -> None:
    recorder = Recorder()
    bank = make_bank(recorder)
    bank.write(0x1C, 4, 0x30)
    bank.write(0x1C, 4, 0x50)
    assert recorder.writes == [(0, 0x30), (0x30, 0x50)]
    assert bank.read(0x0C, 4).value == 0xCAFE_F00D
    assert bank.read(0x0C, 2).value == 0xF00D
    assert recorder.reads == 2


def test_unknown_offset_is_invalid_register() -> None:
    result = make_bank().read(0x40, 4)
    assert result.error is AccessError.INVALID_REGISTER
    assert "0x040" in result.message and "4-byte read" in result.message


def test_offset_inside_a_register_is_unaligned() -> None:
    result = make_bank().write(0x05, 1, 0)
    assert result.error is AccessError.UNALIGNED_ACCESS
    assert "STATUS" in result.message


@pytest.mark.parametrize(("offset", "size"), [(0x00, 8), (0x18, 1), (0x18, 2), (0x04, 3)])
def test_sizes_the_register_does_not_take_are_refused(offset: int, size: int) -> None:
    bank = make_bank()
    for result in (bank.read(offset, size), bank.write(offset, size, 0)):
        assert result.error is AccessError.INVALID_ACCESS_SIZE
        assert f"{size}-byte" in result.message


def test_reset_restores_the_record() -> None:
    bank = make_bank()
    bank.write(0x00, 4, 0xABCD)
    bank["STATUS"] = 0x1FF
    assert bank.values["CTRL"] == 0xABCD
    bank.reset()
    assert bank.values["CTRL"] == 0x0300
    assert bank["STATUS"] == 0x90


def test_setitem_truncates_to_register_width() -> None:
    bank = make_bank()
    bank["STATUS"] = 1 << 40
    assert bank["STATUS"] == 0


def test_side_effect_free_reads_exclude_data() -> None:
    names = {r.name for r in make_bank().side_effect_free_reads}
    assert "DATA" not in names
    assert {"CTRL", "STATUS", "WIDE"} <= names


def test_register_at_finds_containing_register() -> None:
    bank = make_bank()
    assert bank.register_at(0x13) is bank.register("WIDE")
    assert bank.register_at(0x17) is bank.register("WIDE")
    assert bank.register_at(0x20) is None


def test_overlapping_registers_are_refused() -> None:
    with pytest.raises(ValueError, match=r"A .*B .*overlap"):
        RegisterBank([Register("A", 0x0, width_bits=64), Register("B", 0x4)])


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(ValueError, match="twice"):
        RegisterBank([Register("A", 0x0), Register("A", 0x4)])


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"name": "X", "offset": 2}, "multiple of 4"),
        ({"name": "X", "offset": 0, "width_bits": 12}, "width"),
        ({"name": "X", "offset": 0, "reset": 1 << 32}, "reset"),
        ({"name": "X", "offset": 0, "mask": 1 << 32}, "mask"),
        ({"name": "X", "offset": 0, "sizes": (8,)}, "sizes"),
        ({"name": "X", "offset": 0, "access": "wo", "on_read": lambda: 0}, "write-only"),
        ({"name": "X", "offset": 0, "access": "ro", "on_write": lambda o, n: None}, "read-only"),
        ({"name": "X", "offset": 0, "access": "rx"}, "access"),
        ({"name": "", "offset": 0}, "name"),
    ],
)
def test_bad_register_declarations_are_refused(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        Register(**kwargs)  # type: ignore[arg-type]


def test_primecell_id_registers() -> None:
    bank = RegisterBank(primecell_id_registers((1, 2, 3, 4, 5, 6, 7, 8)))
    assert [bank.read(0xFE0 + 4 * i, 4).value for i in range(8)] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [r.name for r in bank.registers] == list(PRIMECELL_ID_NAMES)
    with pytest.raises(ValueError, match="8 bytes"):
        primecell_id_registers((1, 2))
