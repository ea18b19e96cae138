"""Base types: results, regions, option parsing and the console capability."""

from __future__ import annotations

import pytest

from device_service.model import (
    AccessError,
    AccessResult,
    ConfigError,
    RegionSpec,
    check_span,
    parse_address,
    parse_bool,
    parse_size,
    supports_console,
)
from device_service.models import (
    DEVICE_TYPES,
    DmaProbe,
    FwCfg,
    IrqProbe,
    PcieHost,
    PFlashCfi01,
    Pl011,
    Pl031,
    Pl061,
    ReadAsOnes,
    ReadAsZero,
    Scratch,
    VirtioBlkMmio,
    VirtioMmio,
)


def test_success_and_failure_results() -> None:
    ok = AccessResult.success(0x41)
    assert ok.ok and ok.value == 0x41 and ok.error is None
    assert AccessResult.success().value == 0
    failed = AccessResult.failure(AccessError.INVALID_REGISTER, "no register at 0x8")
    assert not failed.ok
    assert failed.error is AccessError.INVALID_REGISTER
    assert failed.message == "no register at 0x8"
    assert failed.value == 0


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"name": "", "offset": 0, "size": 1}, "name"),
        ({"name": "r", "offset": -1, "size": 1}, "negative"),
        ({"name": "r", "offset": 0, "size": 0}, "positive"),
        ({"name": "r", "offset": 0, "size": 4, "access_sizes": (3,)}, "access sizes"),
        ({"name": "r", "offset": 0, "size": 4, "access_sizes": ()}, "access sizes"),
    ],
)
def test_region_spec_refuses_nonsense(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        RegionSpec(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "value"),
    [("0x09000000", 0x0900_0000), ("0x0900_0000", 0x0900_0000), ("150994944", 150994944), ("0", 0),
     (" 0X1f ", 0x1F), ("0xffffffffffffffff", (1 << 64) - 1)],
)  # fmt: skip
def test_parse_address_accepts(text: str, value: int) -> None:
    assert parse_address(text) == value


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("", "not an address"), ("0xZZ", "not an address"), ("-1", "not an address"), ("1k", "not an address"),
     ("09000000", "leading zero"), ("0x1_0000_0000_0000_0000", "64 bits"), ("0x", "not an address")],
)  # fmt: skip
def test_parse_address_refuses(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        parse_address(text)


@pytest.mark.parametrize(
    ("text", "value"),
    [("0x1000", 0x1000), ("4096", 4096), ("4k", 4096), ("4K", 4096), ("4KiB", 4096), ("4 kb", 4096),
     ("128M", 128 << 20), ("1G", 1 << 30), ("0x10k", 16 << 10), ("1_000", 1000), ("0", 0)],
)  # fmt: skip
def test_parse_size_accepts(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["abc", "", "4q", "k", "-4k", "1.5M", "4 k b"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ConfigError, match="size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "value"),
    [("on", True), ("ON", True), ("true", True), ("yes", True), ("1", True),
     ("off", False), ("false", False), ("No", False), ("0", False)],
)  # fmt: skip
def test_parse_bool(text: str, value: bool) -> None:
    assert parse_bool(text) is value


def test_parse_bool_refuses() -> None:
    with pytest.raises(ConfigError, match="'maybe'"):
        parse_bool("maybe")


def test_check_span() -> None:
    assert check_span(0, 8, 8, "read") is None
    assert check_span(7, 1, 8, "read") is None
    past = check_span(7, 2, 8, "write")
    assert past is not None and past.error is AccessError.OUT_OF_RANGE
    assert "0x7" in past.message and "2-byte write" in past.message
    odd = check_span(0, 3, 8, "read")
    assert odd is not None and odd.error is AccessError.INVALID_ACCESS_SIZE


def test_registry_holds_every_builtin_under_its_type_name() -> None:
    expected = {"pl011": Pl011, "pl031": Pl031, "pl061": Pl061, "scratch": Scratch, "zero": ReadAsZero,
                "ones": ReadAsOnes, "pflash": PFlashCfi01, "fw_cfg": FwCfg, "virtio-mmio": VirtioMmio, "pcie": PcieHost,
                "virtio-blk-mmio": VirtioBlkMmio, "dma-probe": DmaProbe, "irq-probe": IrqProbe}
    assert dict(DEVICE_TYPES) == expected
    for type_name, cls in DEVICE_TYPES.items():
        assert cls.type_name == type_name
        assert cls.compatible, type_name


def test_only_the_uart_is_a_console() -> None:
    uart = Pl011("uart0", 0x0900_0000)
    assert supports_console(uart) is uart
    assert supports_console(Pl031("rtc0", 0x0901_0000)) is None
    assert supports_console(Scratch("s", 0)) is None


def test_unknown_option_lists_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"scratch0: unknown option 'colour'.*'size', 'posted'"):
        Scratch.from_options("scratch0", 0, {"colour": "red"})
    with pytest.raises(ConfigError, match=r"uart0: unknown option 'size' for pl011; valid options: none"):
        Pl011.from_options("uart0", 0, {"size": "4k"})


def test_bad_option_value_names_device_option_and_text() -> None:
    with pytest.raises(ConfigError) as caught:
        Scratch.from_options("scratch0", 0, {"size": "abc"})
    message = str(caught.value)
    assert message.startswith("scratch0: option 'size' must be a size")
    assert "0x1000 or 4k" in message and "got 'abc'" in message


def test_device_refuses_bad_base_and_name() -> None:
    with pytest.raises(ConfigError, match="64-bit"):
        Scratch("s", 1 << 64)
    with pytest.raises(ConfigError, match="name"):
        Scratch("", 0)
