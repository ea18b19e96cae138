"""Base types for device models.

A device model is a plain object that answers ``read(offset, size)`` and
``write(offset, size, value)`` for the regions it declares, with a small typed
result (the OpenVMM ``IoResult`` idea). It never sees gRPC, the vCPU or the bus:
it only knows offsets inside its own regions (rust-vmm ``vm-device``). Extra
abilities, such as being a console, are opt-in capability interfaces.

This module also holds what every model needs to describe its ``--device``
options (``ConfigError``, ``Option`` and the value parsers), so that models,
the bus and the configuration loader can all depend on it without depending on
each other. ``device_service.config`` re-exports those names.
"""

from __future__ import annotations

import abc
import enum
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Protocol, Self, runtime_checkable

from mmiosplit.mmio import DmaError as DmaError  # models catch it from here; transports raise it from mmio
from mmiosplit.mmio import check_shadow_windows

#: Access sizes a bus transaction can have, in bytes (KVM's ``mmio.len``).
BUS_ACCESS_SIZES: tuple[int, ...] = (1, 2, 4, 8)


class ConfigError(ValueError):
    """A device description is wrong; the message names the spec, key, file or line."""


class AccessError(enum.Enum):
    """Why an access failed; the vCPU side turns any of these into an external abort by default."""

    INVALID_REGISTER = "invalid register"
    INVALID_ACCESS_SIZE = "invalid access size"
    UNALIGNED_ACCESS = "unaligned access"
    OUT_OF_RANGE = "out of range"
    DEVICE_FAULT = "device fault"


class AccessResult(NamedTuple):
    """The answer to one access: read data as a little-endian integer, or an error and why.

    A NamedTuple (immutable, and a quarter of a frozen dataclass's cost to build): every access makes one."""

    value: int = 0
    error: AccessError | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        """True when the access completed; a failed access must never complete a load silently."""
        return self.error is None

    @classmethod
    def success(cls, value: int = 0) -> AccessResult:
        """A completed access; ``value`` is the read data (0 for writes)."""
        return cls(value)

    @classmethod
    def failure(cls, error: AccessError, message: str) -> AccessResult:
        """A refused access; ``message`` names the register, offset and size for the user."""
        return cls(0, error, message)


class RegionKind(enum.Enum):
    """How the vCPU maps a region: every access traps (MMIO), or reads come from a mirror (ROMD)."""

    MMIO = "mmio"
    ROMD = "romd"


@dataclass(frozen=True, slots=True)
class RegionSpec:
    """One address range a device answers, relative to the device's base address."""

    name: str
    offset: int
    size: int
    kind: RegionKind = RegionKind.MMIO
    #: Writes may be queued by the vCPU and delivered in batches (like KVM's coalesced MMIO);
    #: reads never are, and queued writes always go before the next read to the device.
    posted: bool = False
    access_sizes: tuple[int, ...] = BUS_ACCESS_SIZES
    #: Shadow registers, as (offset inside this region, size): registers whose reads have no side
    #: effects, so the vCPU process may answer reads of exactly that offset and size from a copy the
    #: host keeps current with ``DeviceModel.peek`` (no exit). Other sizes and offsets exit as usual.
    shadows: tuple[tuple[int, int], ...] = ()
    #: How long an access here may take before the vCPU cancels it (0: the VM's deadline). Say so for a region
    #: that is slow on purpose (a flash erase) or must answer fast.
    deadline_ms: int = 0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a region needs a name")
        if self.offset < 0:
            raise ValueError(f"region {self.name!r}: offset {self.offset:#x} is negative")
        if self.size <= 0:
            raise ValueError(f"region {self.name!r}: size must be positive, got {self.size:#x}")
        if not self.access_sizes or any(s not in BUS_ACCESS_SIZES for s in self.access_sizes):
            raise ValueError(
                f"region {self.name!r}: access sizes must be a non-empty subset of {BUS_ACCESS_SIZES},"
                f" got {self.access_sizes}"
            )
        check_shadow_windows(f"region {self.name!r}", self.size, self.access_sizes, self.shadows)

    @property
    def end(self) -> int:
        """First offset past the region."""
        return self.offset + self.size


@dataclass(frozen=True, slots=True)
class Option:
    """One ``--device`` option a model accepts: how to parse its text, and what it expects.

    ``parse`` raises ``ValueError`` on bad text; the message then becomes
    "<device>: option '<name>' must be <expects>, got '<text>'".
    """

    name: str
    parse: Callable[[str], object]
    expects: str


class Trigger(enum.Enum):
    """How an interrupt line signals: a level held until the device lowers it, or a rising edge."""

    LEVEL = "level"
    EDGE = "edge"


@dataclass(frozen=True, slots=True)
class LineSpec:
    """One interrupt output a device declares (Describe lists them); the VM maps it to a GIC interrupt."""

    index: int
    name: str
    trigger: Trigger = Trigger.LEVEL


LineSink = Callable[["IrqLine", bool], None]


class IrqLine:
    """One interrupt output of a device model, handed to it when it is built (OpenVMM's ``LineInterrupt``).

    The model calls ``set`` whenever its output changes, with its own lock held or not; the host connects a
    sink that carries the change to the vCPU side (on the access's Completion when an access caused it, on
    the device-initiated stream otherwise). The level is kept, so a sink connected late sees the state."""

    __slots__ = ("_level", "_sink", "device", "spec")

    def __init__(self, device: str, spec: LineSpec) -> None:
        self.device = device
        self.spec = spec
        self._level = False
        self._sink: LineSink | None = None

    @property
    def level(self) -> bool:
        return self._level

    def set(self, level: bool) -> None:
        """Drive the line; only a change reaches the sink."""
        level = bool(level)
        if level == self._level:
            return
        self._level = level
        sink = self._sink
        if sink is not None:
            sink(self, level)

    def connect(self, sink: LineSink | None) -> None:
        """Called by the host: where changes go (``None`` disconnects)."""
        self._sink = sink

    def __repr__(self) -> str:
        return f"<IrqLine {self.device}.{self.spec.name}#{self.spec.index} {'high' if self._level else 'low'}>"


@runtime_checkable
class Dma(Protocol):
    """Guest-physical memory as a device model may reach it: only inside the windows the VM granted it."""

    def read(self, address: int, length: int) -> bytes:
        """``length`` bytes at guest-physical ``address``, or ``DmaError``."""

    def write(self, address: int, data: bytes) -> None:
        """Store ``data`` at guest-physical ``address``, or ``DmaError`` (nothing is written then)."""


class NoDma:
    """The DMA handle of a device that no VM has granted a window: every access is refused, naming why."""

    def __init__(self, device: str) -> None:
        self.device = device

    def read(self, address: int, length: int) -> bytes:
        raise DmaError(f"{self.device}: DMA read of {length} bytes at {address:#x} refused: no DMA window is granted")

    def write(self, address: int, data: bytes) -> None:
        raise DmaError(f"{self.device}: DMA write of {len(data)} bytes at {address:#x} refused: "
                       "no DMA window is granted")


class DeviceModel(abc.ABC):
    """A device that answers accesses at offsets inside its own regions.

    Subclasses set ``type_name`` (used in ``--device`` specs), ``compatible``
    (device-tree strings) and ``options`` (their ``--device`` options, passed to
    ``__init__`` as keyword arguments with the same names).

    Models are not thread-safe by themselves: whoever calls ``read``/``write``/
    ``reset`` holds ``lock`` (the bus does), and capability methods called from
    other threads (a console's ``receive``) take it themselves.
    """

    type_name: ClassVar[str]
    compatible: ClassVar[tuple[str, ...]]
    options: ClassVar[tuple[Option, ...]] = ()
    #: True for a model that may DMA inside ``read``/``write`` (a doorbell that walks a ring): the gRPC device
    #: service then serves its accesses off its event loop, which must stay free to carry the DMA's answer. A
    #: model that DMAs only from its own threads need not say so.
    does_dma: ClassVar[bool] = False

    def __init__(self, name: str, base: int) -> None:
        if not name:
            raise ConfigError(f"a {self.type_name} device needs a name")
        if not 0 <= base < 1 << 64:
            raise ConfigError(f"{name}: base address {base:#x} is outside the 64-bit address space")
        self.name = name
        self.base = base
        self.lock = threading.RLock()
        #: Its accesses may take long (a model that sleeps or waits on something): the gRPC device service serves
        #: them off its event loop, which then stays free for other vCPUs' exits and for cancels.
        self.slow = False
        self._shadow_listener: Callable[[DeviceModel], None] | None = None
        self._irq_lines: tuple[IrqLine, ...] | None = None
        #: Guest memory as this device may reach it; the host replaces it once a VM grants windows.
        self.dma: Dma = NoDma(name)

    @abc.abstractmethod
    def regions(self) -> list[RegionSpec]:
        """The ranges this device answers; fixed for the device's lifetime."""

    @abc.abstractmethod
    def read(self, offset: int, size: int) -> AccessResult:
        """Read ``size`` bytes at ``offset`` (relative to ``base``)."""

    @abc.abstractmethod
    def write(self, offset: int, size: int, value: int) -> AccessResult:
        """Write the low ``size`` bytes of ``value`` at ``offset`` (relative to ``base``)."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Return to the power-on state, as a machine reset does."""

    def describe(self) -> dict[str, str]:
        """Extra properties for users and device trees (e.g. a size); empty by default."""
        return {}

    # --- interrupt lines and DMA -------------------------------------------------------------

    def lines(self) -> list[LineSpec]:
        """The interrupt outputs this device has, fixed for its lifetime; none by default."""
        return []

    @property
    def irq_lines(self) -> tuple[IrqLine, ...]:
        """One ``IrqLine`` per ``lines()`` entry, in index order, made on first use and kept."""
        if self._irq_lines is None:
            self._irq_lines = tuple(IrqLine(self.name, spec) for spec in sorted(self.lines(), key=lambda s: s.index))
        return self._irq_lines

    def attach_dma(self, dma: Dma) -> None:
        """Called by the host: the handle for the windows a VM granted this device."""
        self.dma = dma

    # --- shadow registers (``RegionSpec.shadows``) -------------------------------------------

    def peek(self, region: str, offset: int, size: int) -> bytes:
        """The ``size`` bytes (little-endian, as a read returns them) a read of the shadow register at
        ``offset`` in ``region`` would give now, changing nothing: no FIFO pops, no clear-on-read.

        The host calls it only for windows the device declared in ``RegionSpec.shadows``, with ``lock``
        held, after every access to the device, after a reset and when ``shadows_changed`` is called,
        and sends what changed to the vCPU process. A model that declares shadows must override it;
        raising (a model bug) stops the host's shadow copies rather than leave them wrong.
        """
        raise NotImplementedError(
            f"{self.name}: {self.type_name} declares shadow registers but does not implement peek() "
            f"(asked for {size} bytes at {region}+{offset:#x})"
        )

    def set_shadow_listener(self, listener: Callable[[DeviceModel], None] | None) -> None:
        """Called by the host: ``listener(self)`` runs whenever the model reports ``shadows_changed``."""
        self._shadow_listener = listener

    def shadows_changed(self) -> None:
        """Say that state behind a shadow register changed without a guest access (input arrived).

        Changes made by a guest access or a reset need no call: the host re-peeks after those. Call it
        without holding ``lock``, since the host takes its own lock and then the model's.
        """
        listener = self._shadow_listener
        if listener is not None:
            listener(self)

    @classmethod
    def parse_options(cls, name: str, options: Mapping[str, str]) -> dict[str, Any]:
        """Turn ``--device`` option text into keyword arguments, or raise ``ConfigError``.

        Kept separate from construction so a spec can be checked before any device exists.
        """
        known = {option.name: option for option in cls.options}
        parsed: dict[str, Any] = {}
        for key, text in options.items():
            option = known.get(key)
            if option is None:
                valid = ", ".join(repr(k) for k in known) if known else "none"
                raise ConfigError(
                    f"{name}: unknown option {key!r} for {cls.type_name}; valid options: {valid}"
                )
            try:
                parsed[key] = option.parse(text)
            except ValueError as err:
                raise ConfigError(f"{name}: option {key!r} must be {option.expects}, got {text!r}") from err
        return parsed

    @classmethod
    def from_options(cls, name: str, base: int, options: Mapping[str, str]) -> Self:
        """Build the device from a name, a base address and ``--device`` option text."""
        return cls(name, base, **cls.parse_options(name, options))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} @ {self.base:#x}>"


class WordDevice(DeviceModel):
    """A device whose registers take at most 4 bytes: an 8-byte access is two 4-byte ones, low word first, as
    QEMU's memory core splits it for a region whose ``max_access_size`` is 4. Subclasses check an access
    (``_check``, None when allowed) and answer 4-byte or narrower ones (``_read``, ``_write``)."""

    def read(self, offset: int, size: int) -> AccessResult:
        error = self._check(offset, size, "read")
        if error is not None:
            return error
        if size == 8:
            return AccessResult.success(self._read(offset, 4) | self._read(offset + 4, 4) << 32)
        return AccessResult.success(self._read(offset, size))

    def write(self, offset: int, size: int, value: int) -> AccessResult:
        error = self._check(offset, size, "write")
        if error is not None:
            return error
        if size == 8:
            self._write(offset, 4, value & 0xFFFF_FFFF)
            self._write(offset + 4, 4, value >> 32)
        else:
            self._write(offset, size, value)
        return AccessResult.success()

    @abc.abstractmethod
    def _check(self, offset: int, size: int, verb: str) -> AccessResult | None:
        """Why this access is refused, or None."""

    @abc.abstractmethod
    def _read(self, offset: int, size: int) -> int:
        """A read of at most 4 bytes."""

    @abc.abstractmethod
    def _write(self, offset: int, size: int, value: int) -> None:
        """A write of at most 4 bytes."""


@runtime_checkable
class ConsoleDevice(Protocol):
    """A device with a byte stream to the user, e.g. a UART (an OpenVMM-style capability)."""

    def set_output(self, sink: Callable[[bytes], None] | None) -> None:
        """Send transmitted bytes to ``sink``, in order; ``None`` keeps them in a backlog."""

    def receive(self, data: bytes) -> int:
        """Offer input bytes; returns how many were accepted (the caller retries the rest)."""

    def rx_space(self) -> int:
        """How many input bytes ``receive`` would accept now."""


@dataclass(frozen=True, slots=True)
class MirrorUpdate:
    """A change to the copy of a ROMD region that the vCPU process serves reads from.

    It is QEMU's ``memory_region_rom_device_set_romd`` plus the bytes that changed: the vCPU side
    applies the patches to its mirror first, then maps the region for mirrored reads
    (``mirror_enabled``) or makes every access exit. Patches may arrive while the mirror is
    disabled (a flash programs in command mode), so the mirror is current when reads return to it.
    """

    region: str  # RegionSpec.name
    mirror_enabled: bool  # True: reads may be served from the mirror (array mode); False: every access must exit
    patches: tuple[tuple[int, bytes], ...] = ()  # (offset within region, new bytes) changed since the last update


@runtime_checkable
class RomdDevice(Protocol):
    """A device with ROMD regions (flash): reads come from a mirror in the vCPU process until the device
    says otherwise, and only writes exit, as QEMU's romd memory regions under KVM.

    A ROMD region starts with its mirror enabled, holding ``mirror_contents``; a device that is not in
    that state when the mirror is built says so in its next ``take_mirror_updates``.
    """

    def mirror_contents(self, region: str, offset: int, length: int) -> bytes:
        """Current bytes of ``region`` at ``offset``, to build the initial mirror."""

    def take_mirror_updates(self) -> list[MirrorUpdate]:
        """What changed since the last call (mode switches, programmed or erased bytes), oldest first;
        empty when nothing did. Called after every access the device answers."""


def check_span(offset: int, size: int, limit: int, verb: str) -> AccessResult | None:
    """Why a ``size``-byte access at ``offset`` does not fit in ``limit`` bytes, or None if it does.

    For RAM-like models that take any bus size at any offset.
    """
    if size not in BUS_ACCESS_SIZES:
        return AccessResult.failure(AccessError.INVALID_ACCESS_SIZE, f"{size}-byte {verb} is not a bus size")
    if offset < 0 or offset + size > limit:
        return AccessResult.failure(
            AccessError.OUT_OF_RANGE,
            f"{size}-byte {verb} at offset {offset:#x} is past the end of {limit:#x} bytes",
        )
    return None


def supports_console(model: DeviceModel) -> ConsoleDevice | None:
    """The model as a console, or ``None`` if it has no console."""
    return model if isinstance(model, ConsoleDevice) else None


def supports_romd(model: DeviceModel) -> RomdDevice | None:
    """The model as a device with mirrored ROMD regions, or ``None`` if it has none."""
    return model if isinstance(model, RomdDevice) else None


# --- option values -----------------------------------------------------------------------------

_NUMBER = r"0[xX](?:_?[0-9a-fA-F])+|[0-9](?:_?[0-9])*"
_ADDRESS_RE = re.compile(rf"(?:{_NUMBER})\Z")
_SIZE_RE = re.compile(rf"(?P<number>{_NUMBER})\s*(?P<unit>[A-Za-z]*)\Z")
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    **{unit: 1 << 10 for unit in ("k", "kb", "kib")},
    **{unit: 1 << 20 for unit in ("m", "mb", "mib")},
    **{unit: 1 << 30 for unit in ("g", "gb", "gib")},
    **{unit: 1 << 40 for unit in ("t", "tb", "tib")},
}
_TRUE = frozenset({"on", "true", "yes", "1"})
_FALSE = frozenset({"off", "false", "no", "0"})


def _parse_number(text: str) -> int:
    """Hex with ``0x`` or plain decimal; a decimal with a leading zero is refused as ambiguous."""
    if len(text) > 1 and text[0] == "0" and text[1] not in "xX":
        raise ConfigError(f"{text!r} has a leading zero; write hex as 0x{text.lstrip('0_') or '0'}")
    return int(text, 0)


def parse_address(text: str) -> int:
    """Parse an address like ``0x09000000``, ``0x0900_0000`` or ``150994944``."""
    stripped = text.strip()
    if not _ADDRESS_RE.match(stripped):
        raise ConfigError(f"not an address: {text!r} (expected hex like 0x09000000 or decimal)")
    value = _parse_number(stripped)
    if value >= 1 << 64:
        raise ConfigError(f"address {text!r} does not fit in 64 bits")
    return value


def parse_size(text: str) -> int:
    """Parse a size like ``0x1000``, ``4096``, ``4k``, ``4KiB``, ``128M`` or ``1G`` (binary units)."""
    match = _SIZE_RE.match(text.strip())
    unit = match["unit"].lower() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        raise ConfigError(f"not a size: {text!r} (expected something like 0x1000, 4096, 4k or 128M)")
    return _parse_number(match["number"]) * _SIZE_UNITS[unit]


def parse_bool(text: str) -> bool:
    """Parse on/off, true/false, yes/no or 1/0 (any case)."""
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ConfigError(f"not a boolean: {text!r} (expected on/off, true/false, yes/no or 1/0)")


def int_in_range(low: int, high: int) -> Callable[[str], int]:
    """A parser for a decimal count between low and high, for options like ``slots`` or ``cpus``."""

    def parse(text: str) -> int:
        count = int(text.strip(), 10)
        if not low <= count <= high:
            raise ValueError("out of range")
        return count

    return parse
