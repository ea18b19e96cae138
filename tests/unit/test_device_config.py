"""--device specs, TOML config files, and building devices and the bus from them."""

from __future__ import annotations

from pathlib import Path

import pytest

from device_service import config
from device_service.config import (
    ConfigError,
    DeviceSpec,
    build_bus,
    create_device,
    load_config,
    parse_device_spec,
    parse_device_specs,
)
from device_service.model import AccessError
from device_service.models import Pl011, Scratch


def test_config_reexports_the_shared_error_and_parsers() -> None:
    from device_service import model

    assert config.ConfigError is model.ConfigError
    assert config.parse_address is model.parse_address
    assert config.parse_size is model.parse_size
    assert issubclass(ConfigError, ValueError)


# --- specs ---------------------------------------------------------------------------------


def test_minimal_spec() -> None:
    assert parse_device_spec("pl011@0x09000000") == DeviceSpec("pl011", 0x0900_0000, "pl011-0", {})


def test_spec_with_options_and_name() -> None:
    spec = parse_device_spec("scratch@0x0a000000,size=0x1000,posted=on,name=scratch0", index=3)
    assert spec == DeviceSpec("scratch", 0x0A00_0000, "scratch0", {"size": "0x1000", "posted": "on"})


def test_default_name_uses_index_and_spaces_are_tolerated() -> None:
    spec = parse_device_spec(" scratch @ 0x0a00_0000 , size = 4k ", index=2)
    assert (spec.name, spec.base, spec.options) == ("scratch-2", 0x0A00_0000, {"size": "4k"})


def test_decimal_address() -> None:
    assert parse_device_spec("zero@4096").base == 4096


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("pl011", "expected TYPE@ADDRESS"),
        ("@0x1000", "expected TYPE@ADDRESS"),
        ("pl011@", "expected TYPE@ADDRESS"),
        ("uart@0x09000000", "unknown device type 'uart'; known types: dma-probe, fw_cfg, irq-probe, ones, pcie, "
                            "pflash, pl011, pl031, pl061, scratch, virtio-blk-mmio, virtio-mmio, zero"),
        ("pl011@0x0900zz00", "not an address: '0x0900zz00'"),
        ("pl011@09000000", "leading zero"),
        ("scratch@0x0,size", "option 'size' is not KEY=VALUE"),
        ("scratch@0x0,size=", "option 'size=' is not KEY=VALUE"),
        ("scratch@0x0,=4k", "not KEY=VALUE"),
        ("scratch@0x0,size=4k,size=8k", "option 'size' is given twice"),
        ("scratch@0x0,name=a,name=b", "option 'name' is given twice"),
        ("scratch@0x0,size=abc", "scratch-0: option 'size' must be a size between 1 byte and 64 MiB"),
        ("scratch@0x0,colour=red", "unknown option 'colour' for scratch; valid options: 'size', 'posted'"),
        ("pl011@0x0,name=bad name", "device name 'bad name'"),
        ("pl011@0x0,name=-x", "device name '-x'"),
    ],
)
def test_bad_specs_name_the_spec_and_the_problem(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_device_spec(text)
    message = str(caught.value)
    assert message.startswith(f"device spec {text!r}: ")
    assert fragment in message


def test_several_specs_are_numbered_per_type() -> None:
    texts = ["pl011@0x09000000", "scratch@0x0a000000", "scratch@0x0a001000", "pl031@0x09010000"]
    specs = parse_device_specs(texts)
    assert [s.name for s in specs] == ["pl011-0", "scratch-0", "scratch-1", "pl031-0"]


def test_several_specs_refuse_duplicate_names() -> None:
    with pytest.raises(ConfigError, match="'x' is already used by device spec 'zero@0x0,name=x'"):
        parse_device_specs(["zero@0x0,name=x", "ones@0x1000,name=x"])


# --- create and build ----------------------------------------------------------------------


def test_create_device_passes_parsed_options() -> None:
    device = create_device(DeviceSpec("scratch", 0x0A00_0000, "s0", {"size": "8k", "posted": "yes"}))
    assert isinstance(device, Scratch)
    assert (device.name, device.base, device.size, device.posted) == ("s0", 0x0A00_0000, 0x2000, True)


def test_create_device_refuses_unknown_type_and_bad_option() -> None:
    with pytest.raises(ConfigError,
                       match="device 'x': unknown device type 'nope'; known types: dma-probe, fw_cfg, irq-probe, "
                             "ones, pcie"):
        create_device(DeviceSpec("nope", 0, "x"))
    with pytest.raises(ConfigError, match="s0: option 'posted' must be on or off, got 'sometimes'"):
        create_device(DeviceSpec("scratch", 0, "s0", {"posted": "sometimes"}))


def test_build_bus_from_specs() -> None:
    bus = build_bus(parse_device_specs(["pl011@0x09000000,name=uart0", "scratch@0x0a000000,size=0x100"]))
    assert isinstance(bus.device("uart0"), Pl011)
    assert bus.write(0x0A00_0000, 8, 0x55).ok
    assert bus.read(0x0A00_0100, 1).error is AccessError.OUT_OF_RANGE


def test_build_bus_refuses_overlap_naming_both() -> None:
    specs = parse_device_specs(["pl011@0x09000000,name=uart0", "scratch@0x09000800,name=s0"])
    with pytest.raises(ConfigError, match=r"uart0.*s0"):
        build_bus(specs)


# --- TOML ----------------------------------------------------------------------------------


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "machine.toml"
    path.write_text(text)
    return path


def test_load_config(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        """
# the QEMU virt devices we need
[[device]]
type = "pl011"
base = 0x09000000
name = "uart0"

[[device]]
type = "scratch"
base = "0x0a00_0000"
size = 4096
posted = true

[[device]]
type = "scratch"
base = 167776256
size = "4k"

[[device]]
type = "ones"
base = 0x4010000000
size = "256M"
""",
    )
    specs = load_config(path)
    assert specs == [
        DeviceSpec("pl011", 0x0900_0000, "uart0", {}),
        DeviceSpec("scratch", 0x0A00_0000, "scratch-0", {"size": "4096", "posted": "on"}),
        DeviceSpec("scratch", 167776256, "scratch-1", {"size": "4k"}),
        DeviceSpec("ones", 0x40_1000_0000, "ones-0", {"size": "256M"}),
    ]
    bus = build_bus(specs)
    assert bus.regions[1].spec.posted  # scratch0 right after the uart


def test_load_config_accepts_str_path_and_empty_file(tmp_path: Path) -> None:
    assert load_config(str(write_toml(tmp_path, "# nothing yet\n"))) == []


def test_malformed_toml_names_the_file_and_line(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[[device]]\ntype = "pl011"\nbase = 0x0900_00zz\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: not valid TOML")
    assert "line 3" in message


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.toml: cannot read config file"):
        load_config(tmp_path / "missing.toml")


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match=r"bad\.toml: not UTF-8"):
        load_config(path)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ('type = "uart"\nbase = 0', "unknown device type 'uart'"),
        ("base = 0", "key 'type' is required"),
        ('type = "zero"', "key 'base' is required"),
        ('type = "zero"\nbase = true', "key 'base' is required"),
        ('type = "zero"\nbase = "0xnope"', "key 'base': not an address"),
        ('type = "zero"\nbase = -1', "outside the 64-bit address space"),
        ('type = "zero"\nbase = 0x2000\nname = 7', "key 'name' must be a string"),
        ('type = "zero"\nbase = 0x2000\nsize = 1.5', "key 'size' must be a string, integer or boolean"),
        ('type = "scratch"\nbase = 0x2000\nsize = "abc"', "scratch-0: option 'size' must be a size"),
        ('type = "scratch"\nbase = 0x2000\ncolour = "red"', "unknown option 'colour'"),
        ('type = "zero"\nbase = 0x2000\nname = "uart0"', "name 'uart0' is already used by"),
    ],
)
def test_bad_device_tables_name_file_line_and_device(tmp_path: Path, body: str, fragment: str) -> None:
    first = '[[device]]\ntype = "pl011"\nbase = 0x09000000\nname = "uart0"\n'
    path = write_toml(tmp_path, f"{first}\n[[device]]\n{body}\n")  # the second table starts on line 6
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:6: device #2"), message
    assert fragment in message


def test_unknown_top_level_key_is_refused(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[[devices]]\ntype = "pl011"\nbase = 0\n')
    with pytest.raises(ConfigError, match=r"unknown top-level key 'devices'.*\[\[device\]\]"):
        load_config(path)


def test_device_must_be_an_array_of_tables(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'device' must be an array of tables"):
        load_config(write_toml(tmp_path, 'device = "pl011"\n'))


def test_inline_tables_work_without_line_numbers(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'device = [{type = "zero", base = 0}, {type = "bogus", base = 0x1000}]\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: device #2: unknown device type 'bogus'")
