"""Declarative register tables (Renode register collections, QEMU ``registerfields.h``).

A model lists its registers once, as data, and a ``RegisterBank`` does the
dispatch: stored values for plain registers, hooks for registers with
behaviour. The stored values are a plain record (``RegisterBank.values``,
register name to integer) kept apart from the behaviour, so reset and snapshot
are obvious.

Access rules, the same for every bank:

* An access must start at a register's offset. Inside a register but not at its
  start is ``UNALIGNED_ACCESS``; outside every register is ``INVALID_REGISTER``.
* The access size must be one the register accepts (by default every bus size
  up to its width, so byte access to a 32-bit register works, as on QEMU's
  PL011). A narrow read returns the low bits; a narrow write is zero-extended
  to the register width, as QEMU does.
* Writes to read-only registers are ignored (QEMU's behaviour for e.g. UARTFR);
  reads of write-only registers return 0.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from device_service.model import BUS_ACCESS_SIZES, AccessError, AccessResult

#: Computes a register's value when it is read (replaces the stored value).
ReadHook = Callable[[], int]
#: Called after a write was stored, with the old and the new stored value.
WriteHook = Callable[[int, int], None]

Access = Literal["rw", "ro", "wo"]


@dataclass(frozen=True, slots=True)
class Register:
    """One register: where it is, what it resets to, which bits software may change.

    ``width_bits`` is the register's slot on the bus (32 for an APB peripheral);
    ``mask`` says which bits a write changes (default: all of them), so a
    register the manual gives as 6 bits wide is ``width_bits=32, mask=0x3F``.
    ``side_effect_free_read`` is False when reading changes state (popping a
    FIFO); such registers can never be answered from a shadow copy.
    ``volatile`` marks values that change without a guest write (FIFO levels,
    time), so a shadow copy of them would need refreshing by the device.
    """

    name: str
    offset: int
    width_bits: int = 32
    reset: int = 0
    access: Access = "rw"
    mask: int | None = None
    side_effect_free_read: bool = True
    on_read: ReadHook | None = None
    on_write: WriteHook | None = None
    sizes: tuple[int, ...] | None = None
    volatile: bool = False

    def __post_init__(self) -> None:
        where = f"register {self.name or '?'} at {self.offset:#x}"
        if not self.name:
            raise ValueError(f"{where}: a register needs a name")
        if self.width_bits not in (8, 16, 32, 64):
            raise ValueError(f"{where}: width must be 8, 16, 32 or 64 bits, got {self.width_bits}")
        if self.offset < 0 or self.offset % self.width_bytes:
            raise ValueError(f"{where}: offset must be a non-negative multiple of {self.width_bytes}")
        if self.access not in ("rw", "ro", "wo"):
            raise ValueError(f"{where}: access must be 'rw', 'ro' or 'wo', got {self.access!r}")
        full = (1 << self.width_bits) - 1
        if not 0 <= self.reset <= full:
            raise ValueError(f"{where}: reset value {self.reset:#x} does not fit in {self.width_bits} bits")
        if self.mask is not None and not 0 <= self.mask <= full:
            raise ValueError(f"{where}: mask {self.mask:#x} does not fit in {self.width_bits} bits")
        if self.sizes is not None and (
            not self.sizes or any(s not in BUS_ACCESS_SIZES or s > self.width_bytes for s in self.sizes)
        ):
            raise ValueError(f"{where}: sizes {self.sizes} must be bus sizes up to {self.width_bytes} bytes")
        if self.access == "wo" and self.on_read is not None:
            raise ValueError(f"{where}: a write-only register cannot have a read hook")
        if self.access == "ro" and self.on_write is not None:
            raise ValueError(f"{where}: a read-only register cannot have a write hook")

    @property
    def width_bytes(self) -> int:
        return self.width_bits // 8

    @property
    def end(self) -> int:
        """First offset past the register."""
        return self.offset + self.width_bytes

    @property
    def write_mask(self) -> int:
        """The bits a write changes."""
        return (1 << self.width_bits) - 1 if self.mask is None else self.mask

    @property
    def access_sizes(self) -> tuple[int, ...]:
        """The access sizes this register accepts, in bytes."""
        if self.sizes is not None:
            return self.sizes
        return tuple(s for s in BUS_ACCESS_SIZES if s <= self.width_bytes)


#: Names of the AMBA PrimeCell identification registers at 0xFE0-0xFFC, from the TRMs.
PRIMECELL_ID_NAMES = (
    "PeriphID0", "PeriphID1", "PeriphID2", "PeriphID3", "PCellID0", "PCellID1", "PCellID2", "PCellID3",
)  # fmt: skip
PRIMECELL_ID_OFFSET = 0xFE0


def primecell_id_registers(id_bytes: Sequence[int]) -> list[Register]:
    """The eight read-only PrimeCell ID registers (one byte each, in 32-bit slots) every AMBA part has."""
    if len(id_bytes) != len(PRIMECELL_ID_NAMES):
        raise ValueError(f"a PrimeCell ID has {len(PRIMECELL_ID_NAMES)} bytes, got {len(id_bytes)}")
    return [
        Register(name, PRIMECELL_ID_OFFSET + 4 * index, reset=value, access="ro")
        for index, (name, value) in enumerate(zip(PRIMECELL_ID_NAMES, id_bytes, strict=True))
    ]


def _size_mask(size: int) -> int:
    return (1 << (8 * size)) - 1


class RegisterBank:
    """A model's registers, built once from a table; dispatches reads and writes by offset."""

    def __init__(self, registers: Iterable[Register]) -> None:
        ordered = sorted(registers, key=lambda r: r.offset)
        names: set[str] = set()
        for register in ordered:
            if register.name in names:
                raise ValueError(f"register name {register.name!r} is declared twice")
            names.add(register.name)
        for before, after in itertools.pairwise(ordered):
            if after.offset < before.end:
                raise ValueError(
                    f"registers {before.name} ({before.offset:#x}-{before.end - 1:#x}) and "
                    f"{after.name} ({after.offset:#x}-{after.end - 1:#x}) overlap"
                )
        self.registers: tuple[Register, ...] = tuple(ordered)
        self._by_offset = {r.offset: r for r in ordered}
        self._by_name = {r.name: r for r in ordered}
        self._starts = [r.offset for r in ordered]
        #: The state: stored value of every register, by name.
        self.values: dict[str, int] = {}
        self.reset()

    def reset(self) -> None:
        """Put every register back to its reset value."""
        self.values = {r.name: r.reset for r in self.registers}

    def __getitem__(self, name: str) -> int:
        return self.values[name]

    def __setitem__(self, name: str, value: int) -> None:
        """Set a stored value directly (device-side state changes; no hooks, no masks but width)."""
        self.values[name] = value & ((1 << self._by_name[name].width_bits) - 1)

    def register(self, name: str) -> Register:
        """The register called ``name``."""
        return self._by_name[name]

    def register_at(self, offset: int) -> Register | None:
        """The register whose bytes include ``offset``, if any."""
        index = bisect.bisect_right(self._starts, offset) - 1
        if index >= 0 and offset < self.registers[index].end:
            return self.registers[index]
        return None

    @property
    def side_effect_free_reads(self) -> tuple[Register, ...]:
        """Registers whose reads change nothing: candidates for a shadow copy in the vCPU process."""
        return tuple(r for r in self.registers if r.side_effect_free_read)

    def read(self, offset: int, size: int) -> AccessResult:
        """Read a register: its hook's value, 0 if write-only, else its stored value."""
        register = self._by_offset.get(offset)
        if register is None:
            return self._miss(offset, size, "read")
        if size not in register.access_sizes:
            return self._bad_size(register, size, "read")
        if register.access == "wo":
            return AccessResult.success(0)
        value = register.on_read() if register.on_read is not None else self.values[register.name]
        return AccessResult.success(value & _size_mask(size))

    def write(self, offset: int, size: int, value: int) -> AccessResult:
        """Write a register: store the writable bits, then run its hook; ignored if read-only."""
        register = self._by_offset.get(offset)
        if register is None:
            return self._miss(offset, size, "write")
        if size not in register.access_sizes:
            return self._bad_size(register, size, "write")
        if register.access == "ro":
            return AccessResult.success()
        mask = register.write_mask
        old = self.values[register.name]
        new = (old & ~mask) | (value & _size_mask(size) & mask)
        self.values[register.name] = new
        if register.on_write is not None:
            register.on_write(old, new)
        return AccessResult.success()

    def _miss(self, offset: int, size: int, verb: str) -> AccessResult:
        inside = self.register_at(offset)
        if inside is not None:
            return AccessResult.failure(
                AccessError.UNALIGNED_ACCESS,
                f"{size}-byte {verb} at offset {offset:#05x} is inside {inside.name} "
                f"({inside.offset:#05x}); access it at its own offset",
            )
        return AccessResult.failure(
            AccessError.INVALID_REGISTER, f"{size}-byte {verb} at offset {offset:#05x}: no register there"
        )

    @staticmethod
    def _bad_size(register: Register, size: int, verb: str) -> AccessResult:
        accepted = ", ".join(str(s) for s in register.access_sizes)
        return AccessResult.failure(
            AccessError.INVALID_ACCESS_SIZE,
            f"{register.name} ({register.offset:#05x}) does not accept {size}-byte {verb}s; "
            f"it accepts {accepted}-byte accesses",
        )
