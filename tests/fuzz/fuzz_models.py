"""Target ``models``: every device model of ``DEVICE_TYPES`` over random option text and random accesses.

Each input builds one model (its ``--device`` options drawn from valid values, or random text, which must give
a ``ConfigError``), then runs a sequence of operations on it: reads and writes at random offsets of its regions
with the sizes and alignment the bus lets through (``DeviceBus._route``: a size the region takes, inside the
region, a value that fits), resets, console input, shadow peeks, ROMD mirror reads, and DMA through a handle
that serves a small RAM window, refuses everything, or is ``NoDma``. The models are called directly, as the bus
calls them (with ``lock`` held), so an exception is seen here instead of becoming the bus's "raised" device
fault. Checked: nothing but ``ConfigError`` escapes construction; ``read``/``write`` return an ``AccessResult``
(a failure carries an ``AccessError`` and a message, a read's value fits the access size); console ``receive``
takes 0..len bytes and ``rx_space`` is never negative; a shadow peek gives exactly its size in bytes; mirror
updates patch inside their region; line levels are booleans.

Models that are slow to build (pflash, fw_cfg, virtio-blk, whose disk image is a temporary file) or that keep a
thread (irq-probe) are built once per option set and reset at the start of each input instead.
"""

from __future__ import annotations

import atexit
import os
import tempfile
from collections.abc import Callable

import atheris

from device_service.model import (
    AccessError,
    AccessResult,
    ConfigError,
    DeviceModel,
    DmaError,
    NoDma,
    RegionKind,
    supports_console,
    supports_romd,
)
from device_service.models import DEVICE_TYPES
from tests.fuzz.common import Finding, check, quiet_logs

BASE = 0x1000_0000
TYPES = sorted(DEVICE_TYPES)
#: Per type, option values to draw from (all valid); random text is tried as well.
OPTION_VALUES: dict[str, dict[str, list[str]]] = {
    "scratch": {"size": ["1", "3", "0x10", "4k", "0x1000", "0x1001"], "posted": ["on", "off"]},
    "zero": {"size": ["1", "0x10", "4k"]},
    "ones": {"size": ["1", "0x10", "4k"]},
    "pflash": {"size": ["64k", "128k", "256k"], "sector": ["512", "4k", "64k"], "readonly": ["on", "off"],
               "write_buffer": ["staged", "direct"]},
    "fw_cfg": {"cpus": ["1", "2", "8", "65535"], "nographic": ["on", "off"], "dma": ["on", "off"]},
    "virtio-mmio": {"slots": ["1", "2", "32"], "legacy": ["on", "off"]},
    "virtio-blk-mmio": {"readonly": ["on", "off"], "legacy": ["on", "off"], "serial": ["", "abc", "x" * 25]},
    "pcie": {"size": ["1M", "16M", "256M"], "bus_range": ["0-0", "0-15", "3-7", "0-255"]},
}
CACHED_TYPES = frozenset({"pflash", "fw_cfg", "virtio-blk-mmio", "irq-probe"})
_cache: dict[tuple[str, tuple[tuple[str, str], ...]], DeviceModel | ConfigError] = {}
_disk: str | None = None


def _disk_image() -> str:
    """A 16 KiB raw disk image in a temporary file, made once per process, removed at exit."""
    global _disk
    if _disk is None:
        fd, path = tempfile.mkstemp(prefix="fuzz-disk-", suffix=".img")
        os.write(fd, bytes(range(256)) * 64)
        os.close(fd)
        atexit.register(os.unlink, path)
        _disk = path
    return _disk


class FuzzDma:
    """A DMA handle over 4 KiB of RAM at 0x4000_0000 that serves accesses inside it (or refuses them all)."""

    def __init__(self, refuse: bool) -> None:
        self.base = 0x4000_0000
        self.ram = bytearray(range(256)) * 16
        self.refuse = refuse

    def _offset(self, address: int, length: int) -> int:
        offset = address - self.base
        if self.refuse or length < 0 or offset < 0 or offset + length > len(self.ram):
            raise DmaError(f"fuzz: DMA of {length} bytes at {address:#x} refused")
        return offset

    def read(self, address: int, length: int) -> bytes:
        offset = self._offset(address, length)
        return bytes(self.ram[offset:offset + length])

    def write(self, address: int, data: bytes) -> None:
        offset = self._offset(address, len(data))
        self.ram[offset:offset + len(data)] = data


def _options(fdp: atheris.FuzzedDataProvider, type_name: str) -> dict[str, str]:
    known = OPTION_VALUES.get(type_name, {})
    options: dict[str, str] = {}
    for key, values in known.items():
        if fdp.ConsumeBool():
            options[key] = fdp.PickValueInList(values)
    if type_name == "virtio-blk-mmio":
        options["file"] = _disk_image()
    if fdp.ConsumeIntInRange(0, 15) == 15:  # random text: a ConfigError, or a value that happens to parse
        key = fdp.PickValueInList([*known, "bogus"]) if known else "bogus"
        options[key] = fdp.ConsumeUnicodeNoSurrogates(12)
    return options


def build(type_name: str, options: dict[str, str]) -> DeviceModel | ConfigError:
    """The model, or the ConfigError its options give; anything else raised is a finding."""
    key = (type_name, tuple(sorted(options.items())))
    if key in _cache:
        cached = _cache[key]
        if isinstance(cached, DeviceModel):
            with cached.lock:
                cached.reset()
            cached.attach_dma(NoDma(cached.name))
        return cached
    try:
        model: DeviceModel | ConfigError = DEVICE_TYPES[type_name].from_options("dev", BASE, options)
    except ConfigError as exc:
        model = exc
    except Exception as exc:
        raise Finding(f"{type_name} with options {options!r}: {type(exc).__name__}: {exc}") from exc
    if type_name in CACHED_TYPES:
        _cache[key] = model
    return model


def _check_result(model: DeviceModel, what: str, result: object, size: int, is_read: bool) -> None:
    check(isinstance(result, AccessResult), f"{what} returned {result!r}")
    assert isinstance(result, AccessResult)
    if result.error is None:
        if is_read:
            check(isinstance(result.value, int) and 0 <= result.value < 1 << (8 * size),
                  f"{what} read {result.value!r}, which does not fit in {size} bytes")
    else:
        check(isinstance(result.error, AccessError), f"{what}: error {result.error!r}")
        check(isinstance(result.message, str) and bool(result.message), f"{what}: failure without a message")


def _access(fdp: atheris.FuzzedDataProvider, model: DeviceModel) -> None:
    regions = model.regions()
    spec = regions[fdp.ConsumeIntInRange(0, len(regions) - 1)]
    size = fdp.PickValueInList(list(spec.access_sizes))
    if size > spec.size:
        return  # the bus refuses it: no access reaches the model
    within = spec.size - size
    pick = fdp.ConsumeIntInRange(0, 3)
    if pick == 0:
        rel = fdp.ConsumeIntInRange(0, min(within, 0x40))  # the low registers, where most are
    elif pick == 1:
        rel = fdp.ConsumeIntInRange(0, within) & ~(size - 1)  # aligned
    elif pick == 2:
        rel = within - fdp.ConsumeIntInRange(0, min(within, 0x40))  # the top (ID registers, ends)
    else:
        rel = fdp.ConsumeIntInRange(0, within)
    offset = spec.offset + rel
    is_write = fdp.ConsumeBool()
    what = f"{model.type_name} {size}-byte {'write' if is_write else 'read'} at {spec.name}+{rel:#x}"
    with model.lock:
        if is_write:
            value = fdp.ConsumeIntInRange(0, (1 << (8 * size)) - 1)
            what += f" of {value:#x}"
            result = model.write(offset, size, value)
        else:
            result = model.read(offset, size)
    _check_result(model, what, result, size, not is_write)


def _side(fdp: atheris.FuzzedDataProvider, model: DeviceModel) -> None:
    """One operation besides an access."""
    op = fdp.ConsumeIntInRange(0, 5)
    console = supports_console(model)
    if op == 0:
        with model.lock:
            model.reset()
    elif op == 1 and console is not None:
        data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40))
        space = console.rx_space()
        taken = console.receive(data)
        check(isinstance(space, int) and space >= 0, f"{model.type_name}: rx_space {space!r}")
        check(isinstance(taken, int) and 0 <= taken <= len(data), f"{model.type_name}: receive took {taken!r}"
              f" of {len(data)}")
    elif op == 2:
        for spec in model.regions():
            for offset, size in spec.shadows:
                with model.lock:
                    value = model.peek(spec.name, offset, size)
                check(isinstance(value, bytes) and len(value) == size,
                      f"{model.type_name}: peek {spec.name}+{offset:#x} gave {value!r}")
    elif op == 3:
        romd = supports_romd(model)
        if romd is not None:
            sizes = {s.name: s.size for s in model.regions() if s.kind is RegionKind.ROMD}
            with model.lock:
                updates = romd.take_mirror_updates()
                for name, size in sizes.items():
                    offset = fdp.ConsumeIntInRange(0, size - 1)
                    length = fdp.ConsumeIntInRange(0, min(4096, size - offset))
                    got = romd.mirror_contents(name, offset, length)
                    check(len(got) == length, f"{model.type_name}: mirror_contents gave {len(got)} of {length}")
            for u in updates:
                check(u.region in sizes, f"{model.type_name}: mirror update for region {u.region!r}")
                for offset, data in u.patches:
                    check(offset >= 0 and offset + len(data) <= sizes[u.region],
                          f"{model.type_name}: patch {offset:#x}+{len(data):#x} outside {u.region}")
    elif op == 4:
        choice = fdp.ConsumeIntInRange(0, 2)
        model.attach_dma(NoDma(model.name) if choice == 0 else FuzzDma(refuse=choice == 1))
    else:
        for line in model.irq_lines:
            check(isinstance(line.level, bool), f"{model.type_name}: line {line} level {line.level!r}")
        check(len(model.irq_lines) == len(model.lines()), f"{model.type_name}: lines and irq_lines disagree")


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    quiet_logs()  # models log refused DMA: thousands of lines here
    type_name = fdp.PickValueInList(TYPES)
    model = build(type_name, _options(fdp, type_name))
    if isinstance(model, ConfigError):
        check(bool(str(model)), f"{type_name}: ConfigError without a message")
        return
    output: list[bytes] = []
    console = supports_console(model)
    if console is not None:
        console.set_output(output.append)
    if fdp.ConsumeBool():
        model.attach_dma(FuzzDma(refuse=fdp.ConsumeBool()))
    model.describe()
    ops: list[Callable[[], None]] = [lambda: _access(fdp, model)] * 6 + [lambda: _side(fdp, model)]
    for _ in range(fdp.ConsumeIntInRange(1, 64)):
        if fdp.remaining_bytes() == 0:
            break
        fdp.PickValueInList(ops)()
    for chunk in output:
        check(isinstance(chunk, bytes | bytearray), f"{type_name}: console output {chunk!r}")
