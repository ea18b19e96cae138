"""The scratch device behaves like RAM; the zero/ones stubs read as constants."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_service.model import AccessError, ConfigError, RegionKind
from device_service.models.scratch import MAX_SIZE, Scratch
from device_service.models.stub import ReadAsOnes, ReadAsZero

SIZES = (1, 2, 4, 8)


def test_zero_at_reset_for_every_size() -> None:
    scratch = Scratch("s", 0, size=64)
    for size in SIZES:
        for offset in range(64 - size + 1):
            assert scratch.read(offset, size).value == 0


def test_read_after_write_every_size_every_alignment() -> None:
    scratch = Scratch("s", 0, size=32)
    for size in SIZES:
        for offset in range(16):  # every alignment, unaligned too
            value = int.from_bytes(bytes((offset * 16 + size + i) & 0xFF for i in range(size)), "little")
            assert scratch.write(offset, size, value).ok
            assert scratch.read(offset, size).value == value


def test_little_endian_layout() -> None:
    scratch = Scratch("s", 0, size=16)
    scratch.write(0, 8, 0x0807_0605_0403_0201)
    assert [scratch.read(i, 1).value for i in range(8)] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert scratch.read(1, 2).value == 0x0302
    assert scratch.read(3, 4).value == 0x0706_0504
    scratch.write(5, 1, 0xAA)
    assert scratch.read(0, 8).value == 0x0807_AA05_0403_0201


@settings(max_examples=75, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(SIZES), st.integers(0, 63), st.integers(0, (1 << 64) - 1)),
        min_size=1,
        max_size=20,
    )
)
def test_behaves_like_a_bytearray(ops: list[tuple[int, int, int]]) -> None:
    """Any sequence of writes agrees with a plain little-endian byte array, read back any way."""
    scratch = Scratch("s", 0, size=64)
    model = bytearray(64)
    for size, offset, raw in ops:
        offset = min(offset, 64 - size)
        value = raw & ((1 << (8 * size)) - 1)
        assert scratch.write(offset, size, value).ok
        model[offset : offset + size] = value.to_bytes(size, "little")
        assert scratch.read(offset, size).value == value
    for read_size in SIZES:
        for read_offset in range(64 - read_size + 1):
            expected = int.from_bytes(model[read_offset : read_offset + read_size], "little")
            assert scratch.read(read_offset, read_size).value == expected


def test_reset_zeroes() -> None:
    scratch = Scratch("s", 0, size=16)
    scratch.write(3, 8, (1 << 64) - 1)
    scratch.reset()
    assert scratch.read(3, 8).value == 0
    assert len(scratch.memory) == 16


@pytest.mark.parametrize(("offset", "size"), [(0x1000, 1), (0xFFF, 2), (0xFF9, 8), (-1, 1)])
def test_past_the_end_is_out_of_range(offset: int, size: int) -> None:
    scratch = Scratch("s", 0)
    for result in (scratch.read(offset, size), scratch.write(offset, size, 0)):
        assert result.error is AccessError.OUT_OF_RANGE
        assert f"{offset:#x}" in result.message and f"{size}-byte" in result.message


def test_odd_size_is_refused() -> None:
    assert Scratch("s", 0).read(0, 3).error is AccessError.INVALID_ACCESS_SIZE


def test_options_size_and_posted() -> None:
    scratch = Scratch.from_options("scratch0", 0x0A00_0000, {"size": "4k", "posted": "on"})
    (region,) = scratch.regions()
    assert (region.offset, region.size, region.posted, region.kind) == (0, 4096, True, RegionKind.MMIO)
    assert region.access_sizes == SIZES
    assert scratch.describe() == {"size": "0x1000", "posted": "on"}
    default = Scratch.from_options("scratch1", 0, {})
    assert default.size == 0x1000 and not default.regions()[0].posted


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"size": "0"}, "option 'size' must be a size between 1 byte and 64 MiB"),
        ({"size": "65M"}, "got '65M'"),
        ({"size": "abc"}, "got 'abc'"),
        ({"posted": "maybe"}, "option 'posted' must be on or off, got 'maybe'"),
    ],
)
def test_bad_options(options: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        Scratch.from_options("scratch0", 0, options)


def test_constructor_checks_size() -> None:
    with pytest.raises(ConfigError, match="s: size"):
        Scratch("s", 0, size=MAX_SIZE + 1)
    assert Scratch("s", 0, size=MAX_SIZE).size == MAX_SIZE


# --- stubs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_zero_stub_reads_zero_and_ignores_writes(size: int) -> None:
    stub = ReadAsZero("virtio", 0x0A00_0000, size=0x4000)
    assert stub.write(0, size, (1 << (8 * size)) - 1).ok
    assert stub.read(0, size).value == 0
    assert stub.read(0x3FFF - size + 1, size).ok


@pytest.mark.parametrize(("size", "value"), [(1, 0xFF), (2, 0xFFFF), (4, 0xFFFF_FFFF), (8, (1 << 64) - 1)])
def test_ones_stub_reads_all_ones_of_the_access_size(size: int, value: int) -> None:
    stub = ReadAsOnes("ecam", 0x40_1000_0000)
    assert stub.write(0, size, 0).ok
    assert stub.read(2, size).value == value


def test_stub_bounds_and_options() -> None:
    stub = ReadAsOnes.from_options("ecam", 0, {"size": "256M"})
    assert stub.regions()[0].size == 256 << 20  # no 64 MiB cap: stubs keep no memory
    assert stub.read(256 << 20, 4).error is AccessError.OUT_OF_RANGE
    assert ReadAsZero("z", 0).regions()[0].size == 0x1000
    with pytest.raises(ConfigError, match="zero0: option 'size' must be a positive size"):
        ReadAsZero.from_options("zero0", 0, {"size": "0"})
    with pytest.raises(ConfigError, match="unknown option 'posted'"):
        ReadAsZero.from_options("zero0", 0, {"posted": "on"})
    assert ReadAsZero.compatible == ("mmiosplit,zero",)
    assert ReadAsOnes.compatible == ("mmiosplit,ones",)
