"""Which devices a device service hosts: ``--device`` specs and TOML config files.

A spec is ``TYPE@ADDRESS[,KEY=VALUE...]``, e.g. ``pl011@0x09000000`` or
``scratch@0x0a000000,size=0x1000,posted=on,name=scratch0``. A config file is
TOML with one ``[[device]]`` table per device::

    [[device]]
    type = "pl011"
    base = 0x09000000
    name = "uart0"

Every other key of a spec or table is an option of the model, checked by the
model itself. Errors are ``ConfigError`` naming the spec, or the file, line and
key.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from device_service.bus import DeviceBus
from device_service.model import ConfigError, DeviceModel, parse_address, parse_bool, parse_size
from device_service.models import DEVICE_TYPES

__all__ = [
    "ConfigError",
    "DeviceSpec",
    "build_bus",
    "create_device",
    "load_config",
    "parse_address",
    "parse_bool",
    "parse_device_spec",
    "parse_device_specs",
    "parse_size",
]

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")
_DEVICE_HEADER_RE = re.compile(r"^[ \t]*\[\[[ \t]*device[ \t]*\]\]", re.MULTILINE)
SPEC_SYNTAX = "TYPE@ADDRESS[,KEY=VALUE...], e.g. pl011@0x09000000"


@dataclass(frozen=True)
class DeviceSpec:
    """One device to create: its type, base address, unique name, and model options as text."""

    type: str
    base: int
    name: str
    options: dict[str, str] = field(default_factory=dict)


def _device_class(type_name: str, where: str) -> type[DeviceModel]:
    cls = DEVICE_TYPES.get(type_name)
    if cls is None:
        known = ", ".join(sorted(DEVICE_TYPES))
        raise ConfigError(f"{where}: unknown device type {type_name!r}; known types: {known}")
    return cls


def _check_name(name: str, where: str) -> None:
    if not _NAME_RE.match(name):
        raise ConfigError(
            f"{where}: device name {name!r} must be letters, digits, '_', '.' or '-',"
            " and not start with '.' or '-'"
        )


def parse_device_spec(text: str, index: int = 0) -> DeviceSpec:
    """Parse one ``--device`` spec; without ``name=``, the device is called ``f"{type}-{index}"``."""
    where = f"device spec {text!r}"
    head, *items = text.strip().split(",")
    type_name, at, address = head.partition("@")
    type_name, address = type_name.strip(), address.strip()
    if not at or not type_name or not address:
        raise ConfigError(f"{where}: expected {SPEC_SYNTAX}")
    cls = _device_class(type_name, where)
    try:
        base = parse_address(address)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None

    name: str | None = None
    options: dict[str, str] = {}
    for item in items:
        key, equals, value = (part.strip() for part in item.partition("="))
        if not equals or not key or not value:
            raise ConfigError(f"{where}: option {item.strip()!r} is not KEY=VALUE")
        if key in options or (key == "name" and name is not None):
            raise ConfigError(f"{where}: option {key!r} is given twice")
        if key == "name":
            name = value
        else:
            options[key] = value
    if name is None:
        name = f"{type_name}-{index}"
    _check_name(name, where)
    try:
        cls.parse_options(name, options)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    return DeviceSpec(type_name, base, name, options)


def parse_device_specs(texts: Sequence[str]) -> list[DeviceSpec]:
    """Parse several specs, numbering unnamed devices per type (pl011-0, scratch-0, scratch-1, ...)."""
    specs: list[DeviceSpec] = []
    for text in texts:
        index = sum(1 for spec in specs if spec.type == text.strip().partition("@")[0].strip())
        specs.append(parse_device_spec(text, index))
    _check_unique_names(specs, [f"device spec {t!r}" for t in texts])
    return specs


def _check_unique_names(specs: Sequence[DeviceSpec], wheres: Sequence[str]) -> None:
    seen: dict[str, str] = {}
    for spec, where in zip(specs, wheres, strict=True):
        if spec.name in seen:
            raise ConfigError(f"{where}: device name {spec.name!r} is already used by {seen[spec.name]}")
        seen[spec.name] = where


def _option_text(value: object, where: str, key: str) -> str:
    """TOML values become the same text a ``--device`` spec would carry."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | str):
        return str(value)
    kind = type(value).__name__
    raise ConfigError(f"{where}: key {key!r} must be a string, integer or boolean, got {kind}")


def load_config(path: str | os.PathLike[str]) -> list[DeviceSpec]:
    """Read the ``[[device]]`` tables of a TOML file; unnamed devices are numbered per type."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config file: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text: {err}") from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None

    unknown = sorted(set(document) - {"device"})
    if unknown:
        keys = ", ".join(repr(k) for k in unknown)
        raise ConfigError(f"{path}: unknown top-level key {keys}; declare devices as [[device]] tables")
    tables = document.get("device", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{path}: 'device' must be an array of tables ([[device]])")

    # tomllib gives no positions, so find each [[device]] header ourselves; trust them only
    # when they account for every table (not when devices were written as inline tables).
    lines = [text.count("\n", 0, m.start()) + 1 for m in _DEVICE_HEADER_RE.finditer(text)]
    if len(lines) != len(tables):
        lines = []

    specs: list[DeviceSpec] = []
    wheres: list[str] = []
    for number, table in enumerate(tables, start=1):
        place = f"{path}:{lines[number - 1]}" if lines else str(path)
        where = f"{place}: device #{number}"
        specs.append(_spec_from_table(table, where, specs))
        wheres.append(where)
    _check_unique_names(specs, wheres)
    return specs


def _spec_from_table(table: dict[str, object], where: str, earlier: Sequence[DeviceSpec]) -> DeviceSpec:
    type_name = table.get("type")
    if not isinstance(type_name, str):
        raise ConfigError(f"{where}: key 'type' is required and must be a string, e.g. type = \"pl011\"")
    cls = _device_class(type_name, where)

    raw_base = table.get("base")
    if isinstance(raw_base, bool) or not isinstance(raw_base, int | str):
        raise ConfigError(f"{where}: key 'base' is required, e.g. base = 0x09000000")
    if isinstance(raw_base, int):
        if not 0 <= raw_base < 1 << 64:
            raise ConfigError(f"{where}: key 'base' = {raw_base:#x} is outside the 64-bit address space")
        base = raw_base
    else:
        try:
            base = parse_address(raw_base)
        except ConfigError as err:
            raise ConfigError(f"{where}: key 'base': {err}") from None

    raw_name = table.get("name")
    if raw_name is None:
        name = f"{type_name}-{sum(1 for spec in earlier if spec.type == type_name)}"
    elif isinstance(raw_name, str):
        name = raw_name
    else:
        raise ConfigError(f"{where}: key 'name' must be a string")
    _check_name(name, where)

    options = {
        key: _option_text(value, where, key)
        for key, value in table.items()
        if key not in ("type", "base", "name")
    }
    try:
        cls.parse_options(name, options)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    return DeviceSpec(type_name, base, name, options)


def create_device(spec: DeviceSpec) -> DeviceModel:
    """Build the model a spec describes; an unknown type or a bad option is a ``ConfigError``."""
    cls = _device_class(spec.type, f"device {spec.name!r}")
    return cls.from_options(spec.name, spec.base, spec.options)


def build_bus(specs: Sequence[DeviceSpec]) -> DeviceBus:
    """Build every device and place them on a bus (which refuses overlaps and duplicate names)."""
    return DeviceBus([create_device(spec) for spec in specs])
