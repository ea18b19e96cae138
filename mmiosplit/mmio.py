"""The MMIO exchange between a vCPU and a device host, in Python terms: no gRPC in this module.

Both services and every transport speak these types. The gRPC adapters (``vcpu_service.transport`` on the
vCPU side, ``device_service.server`` on the device side) convert them to and from ``mmiosplit.v1`` once,
at the edge; the in-process transport (``device_service.local``) passes them through untouched.

One name per concept, the same as on the wire: a trapped access is an ``MmioExit``, the answer is a
``Completion`` whose outcome is a ``CompletionStatus``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

#: Writes a posted batch holds at most; a full batch is sent without waiting for the next exit.
POSTED_BATCH_MAX = 1024
#: Full batches a vCPU may have sent without reading their completions (backpressure beyond that).
POSTED_INFLIGHT = 2


class TransportError(Exception):
    """A device service cannot be reached or broke the protocol; the message names the service."""


class DeadlineExceeded(TransportError):
    """No completion arrived before the exit deadline. ``performed``: False when the service said it never started
    the access (it was cancelled), True when it performed it after the deadline, None when nobody knows."""

    def __init__(self, message: str, performed: bool | None = None) -> None:
        super().__init__(message)
        self.performed = performed


class ServiceLost(TransportError):
    """A device service's exit stream broke and could not be resumed within the exit deadline: the access in flight
    may or may not have been performed, and nothing more can be sent."""


class DeviceRestarted(TransportError):
    """The device service answering now is another instance than the one this session began with: it restarted,
    its devices' state and the session are gone, so whether the access in flight was performed is unknown."""

    def __init__(self, message: str, service: str, old_instance: str, new_instance: str) -> None:
        super().__init__(message)
        self.service = service
        self.old_instance = old_instance
        self.new_instance = new_instance


class DmaError(Exception):
    """A DMA the VM refused or could not carry out; the message names the device, the address and the window(s).

    Device models see it as ``device_service.model.DmaError`` (the same class)."""


class CompletionStatus(enum.Enum):
    """How an access ended (the wire's ``CompletionStatus``). Anything but OK never completes a load."""

    OK = "ok"
    DEVICE_ERROR = "device error"
    NO_DEVICE = "no device"
    BAD_REQUEST = "bad request"
    #: The client cancelled it (its deadline passed) before the service started it: never performed.
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class RemoteRegion:
    """A region a device service owns, as its Describe reported it to a vCPU service."""

    service: str
    device: str
    device_type: str
    name: str
    base: int
    size: int
    romd: bool
    posted: bool
    access_sizes: tuple[int, ...]
    has_console: bool
    compatible: tuple[str, ...] = ()
    #: Shadow registers, as (offset inside the region, size): reads of exactly these are answered from the
    #: VM's shadow table when it holds a value, without an exit.
    shadows: frozenset[tuple[int, int]] = frozenset()
    #: How long an access may take before the vCPU cancels it (0: the VM's default); the VM may override it.
    deadline_ms: int = 0

    @property
    def end(self) -> int:
        return self.base + self.size


def check_shadow_windows(where: str, size: int, access_sizes: Iterable[int],
                         windows: Iterable[tuple[int, int]]) -> frozenset[tuple[int, int]]:
    """Check declared shadow registers: each inside its region, of a size the region takes, none overlapping
    another. Raises ValueError naming the register (``where`` names the region); the one check both the
    device models' region specs and a vCPU service reading a Describe apply."""
    sizes = tuple(access_sizes)
    out: set[tuple[int, int]] = set()
    taken_until = 0
    for offset, length in sorted(windows):
        what = f"{where}: shadow register at +0x{offset:x} ({length} bytes)"
        if length not in sizes:
            raise ValueError(f"{what}: the region takes {'/'.join(map(str, sizes))}-byte accesses")
        if offset < 0 or offset + length > size:
            raise ValueError(f"{what} is outside the region's 0x{size:x} bytes")
        if offset < taken_until:
            raise ValueError(f"{what} overlaps another shadow register")
        taken_until = offset + length
        out.add((offset, length))
    return frozenset(out)


@dataclass(slots=True)
class MmioExit:
    """One trapped access, as a vCPU forwards it (KVM's ``kvm_run.mmio``).

    ``data`` is in guest-memory order (the ``kvm_run.mmio.data`` rule): the bytes a store wrote, empty for a
    load. ``syndrome``, ``pc`` and ``instruction`` are for observability; a device never needs them.
    """

    vcpu_id: int
    address: int
    length: int
    is_write: bool
    data: bytes = b""
    device: str = ""
    region: str = ""
    region_offset: int = 0
    syndrome: int = 0
    pc: int = 0
    instruction: int = 0
    #: How long the vCPU waits for the completion before it cancels the access (0: the transport's default).
    deadline_ms: int = 0


@dataclass(frozen=True, slots=True)
class MirrorChange:
    """A ROMD region switching mode and/or changing bytes, as a device service reported it."""

    service: str
    device: str
    region: str
    enabled: bool
    patches: tuple[tuple[int, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class ShadowChange:
    """New values of shadow registers from one device service, all current as of ``generation``; values are
    (device, region, offset inside the region, bytes as a read returns them)."""

    service: str
    generation: int
    values: tuple[tuple[str, str, int, bytes], ...]


@dataclass(frozen=True, slots=True)
class LineChange:
    """New levels of interrupt lines from one device service, as of ``generation`` (one counter per service, so
    the VM keeps per line the level of the highest generation it saw); levels are (device, line index, level)."""

    service: str
    generation: int
    levels: tuple[tuple[str, int, bool], ...]
    #: CLOCK_MONOTONIC ns when the newest of these levels changed, on the clock of whoever reads it (the
    #: transport converts); 0 when unknown. Only interrupt latency is measured with it.
    time_ns: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class RemoteLine:
    """An interrupt output of a device, as its service's Describe reported it. ``trigger`` is ``level`` or
    ``edge``; ``compatible`` and ``device_type`` are the device's, for the machine profile's wiring."""

    service: str
    device: str
    index: int
    name: str
    trigger: str = "level"
    device_type: str = ""
    compatible: tuple[str, ...] = ()


class DmaWindow(NamedTuple):
    """A named range of guest-physical memory a VM grants a device service's devices."""

    name: str
    base: int
    size: int

    @property
    def end(self) -> int:
        return self.base + self.size

    def __str__(self) -> str:
        return f"{self.name} 0x{self.base:x}-0x{self.end - 1:x}"


class DmaTarget(Protocol):
    """Guest memory as one VM lets one device service reach it: the vcpu side implements it
    (``vcpu_service.dma.GuestDma``); transports carry its calls. Both calls raise ``DmaError`` naming the
    device, the address and the windows when the range is not inside one window (nothing is written then)."""

    @property
    def windows(self) -> tuple[DmaWindow, ...]: ...

    def dma_read(self, device: str, address: int, length: int) -> bytes: ...

    def dma_write(self, device: str, address: int, data: bytes) -> None: ...


@dataclass(frozen=True, slots=True)
class PostedError:
    """A posted write that failed: its place in its batch, its address and why (the wire's
    ``PostedWriteError``). ``str()`` gives the sentence a user sees."""

    index: int
    address: int
    error: str

    def __str__(self) -> str:
        return f"posted write to 0x{self.address:x}: {self.error}"


class Completion(NamedTuple):
    """The answer to an exit, a posted batch or a flush, with everything it changed besides the access.

    A NamedTuple, not a frozen dataclass: one is built for every exit on both sides, and a frozen dataclass
    costs four times as much to build.

    ``posted_errors`` name posted writes that failed (they retired long ago, so they cannot be made precise);
    ``mirror_changes``, ``shadows`` and ``lines`` (interrupt levels the request changed) must reach the VM
    before the vCPU runs on.
    """

    status: CompletionStatus = CompletionStatus.OK
    data: bytes = b""
    error: str = ""
    posted_errors: tuple[PostedError, ...] = ()
    mirror_changes: tuple[MirrorChange, ...] = ()
    shadows: tuple[ShadowChange, ...] = ()
    lines: tuple[LineChange, ...] = ()

    @property
    def has_effects(self) -> bool:
        """Whether anything besides the access itself needs applying."""
        return bool(self.posted_errors or self.mirror_changes or self.shadows or self.lines)

    def merged_after(self, earlier: Iterable[Completion]) -> Completion:
        """This completion carrying the side effects of earlier ones (posted batches answered meanwhile)."""
        errors: list[PostedError] = []
        changes: list[MirrorChange] = []
        shadows: list[ShadowChange] = []
        lines: list[LineChange] = []
        for c in earlier:
            errors += c.posted_errors
            changes += c.mirror_changes
            shadows += c.shadows
            lines += c.lines
        if not (errors or changes or shadows or lines):
            return self
        return Completion(self.status, self.data, self.error, (*errors, *self.posted_errors),
                          (*changes, *self.mirror_changes), (*shadows, *self.shadows), (*lines, *self.lines))


@dataclass(slots=True)
class PostedQueue:
    """Posted writes queued by one vCPU for one device service, in order, packed as the wire packs them."""

    addresses: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)

    def __len__(self) -> int:
        return len(self.addresses)

    def add(self, address: int, data: bytes) -> bool:
        """Queue one write; True when the batch is full and must be sent."""
        self.addresses.append(address)
        self.lengths.append(len(data))
        self.data += data
        return len(self.addresses) >= POSTED_BATCH_MAX

    def take(self) -> tuple[list[int], list[int], bytes]:
        """Empty the queue: (addresses, lengths, packed data)."""
        out = (self.addresses, self.lengths, bytes(self.data))
        self.addresses, self.lengths, self.data = [], [], bytearray()
        return out


def clock_id() -> str:
    """The name of this host's CLOCK_MONOTONIC (the kernel's boot id): processes that report the same one, in
    containers too, read the same clock, so one's timestamps mean something to the other."""
    global _CLOCK_ID
    if _CLOCK_ID is None:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                _CLOCK_ID = f.read().strip()
        except OSError:
            _CLOCK_ID = ""
    return _CLOCK_ID


_CLOCK_ID: str | None = None


def unpack_posted(addresses: Iterable[int], lengths: Iterable[int], data: bytes) -> list[tuple[int, bytes]]:
    """(address, bytes) pairs of a packed posted batch; ValueError if the columns disagree."""
    addresses = list(addresses)
    lengths = list(lengths)
    if len(addresses) != len(lengths):
        raise ValueError(f"posted batch has {len(addresses)} addresses but {len(lengths)} lengths")
    if sum(lengths) != len(data):
        raise ValueError(f"posted batch lengths add up to {sum(lengths)} bytes but carry {len(data)}")
    out = []
    offset = 0
    for address, length in zip(addresses, lengths, strict=True):
        out.append((address, data[offset:offset + length]))
        offset += length
    return out


class ExitChannel(Protocol):
    """One vCPU's path to one device service: exits, posted writes and flushes, in order."""

    def access(self, exit: MmioExit) -> Completion:
        """Send the queued posted writes, then the exit, and wait for its completion."""
        ...

    def post(self, address: int, data: bytes) -> Completion | None:
        """Queue a posted write; a full batch is sent at once. Returns what answered batches reported, if any."""
        ...

    def flush(self, wait: bool = True) -> Completion:
        """Send the queued posted writes; with ``wait``, also wait until every one has reached its device."""
        ...

    def pending_posted(self) -> int: ...
    def broken(self) -> bool: ...
    def close(self) -> None: ...


class GoingAway(NamedTuple):
    """A device service is draining: it completes what it has received and takes no new exits."""

    service: str
    reason: str
    grace_seconds: float = 0.0


WatchEvent = ShadowChange | LineChange | GoingAway


class ServiceWatch(Protocol):
    """What a device service says to one VM without being asked: shadow-register values and interrupt-line
    levels (every current value first, then changes) and, last, that it is going away. The DMA requests its
    devices make travel on the same stream and are served inside ``next`` (by the ``DmaTarget`` given to
    ``DeviceEndpoint.watch``), on the thread that reads the watch, never a vCPU's."""

    def next(self, timeout: float | None = None) -> WatchEvent | None:
        """The next event; None once cancelled or after the service went away. Raises TransportError when the
        stream breaks or, with ``timeout``, when nothing arrives in time."""
        ...

    def cancel(self) -> None: ...


class DeviceEndpoint(Protocol):
    """One device service, over gRPC or in this process: what a VM needs of it."""

    name: str
    #: Set by the VM when the service said it is going away: no new exit is sent to it after that.
    leaving: GoingAway | None
    #: The service reads this process's CLOCK_MONOTONIC (known after ``describe``), so its line changes carry
    #: the device's own raise time; otherwise they are stamped on arrival.
    same_clock: bool
    #: The service's instance ("" when it does not say): another one later means it restarted.
    instance_id: str
    #: The optional parts of the protocol it implements (``mmiosplit.wire.FEATURE_*``; known after ``describe``).
    features: frozenset[str]

    def describe(self) -> list[RemoteRegion]: ...

    def interrupt_lines(self) -> list[RemoteLine]:
        """The interrupt outputs of the service's devices, as its Describe reported them."""
        ...

    def watch(self, vm_id: str, dma: DmaTarget | None = None) -> ServiceWatch:
        """Open the service's watch stream for ``vm_id``; ``dma`` serves its devices' DMA (None: no window)."""
        ...

    def open_exit_channel(self, vm_id: str, vcpu_id: int, architecture: str) -> ExitChannel:
        """A channel for one vCPU; ``architecture`` is ``aarch64`` or ``arm``."""
        ...

    def read_mirror(self, vm_id: str, device: str, region: str) -> tuple[list[tuple[int, bytes]], bool]:
        """The non-zero chunks of a ROMD region as (offset, bytes), and whether reads may be served now; for VM
        ``vm_id`` (a service shared with another VM refuses)."""
        ...

    def reset(self, vm_id: str) -> tuple[MirrorChange, ...]:
        """Reset the service's devices for VM ``vm_id`` (a service shared with another VM refuses)."""
        ...

    def close(self) -> None: ...
