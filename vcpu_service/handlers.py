"""In-process handlers: what answers an access before it becomes an exit, as KVM's ``kvm_io_bus`` tries the
in-kernel devices (the vGIC, ioeventfds) before ``io_mem_abort`` fills ``run->mmio`` and returns to userspace.

The VM builds one ``HandlerRegistry``: an address map of slots, each a range with the remote region that owns
it (if any) and the in-process handlers tried first, in order. ``ExitPath.begin`` makes one lookup per trapped
access. A handler is a small class with ``handle(access, vcpu)``; it answers with a ``Completion`` (complete now:
read data for a load), an ``Abort`` (a fault policy), or None (not mine: try the next one, and in the end
forward the access to the region's device service). Handlers never wait for an answer to the access they handle
and never touch the vCPU's registers: ``ExitPath.complete`` applies what they answer, exactly as it applies a
remote one. (The one wait: a posted store that fills a batch sends it, and when two full batches are already
unanswered the transport waits for the older one first; that is flow control, as a full coalesced-MMIO ring.)

Today: shadow-register reads, posted-write queuing, and the unmapped-access policy. An in-process device (the
GIC, the generic timer's registers) registers its own range with ``add_device`` and no remote region.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from mmiosplit.mmio import Completion, ExitChannel, RemoteRegion, TransportError
from vcpu_service.domain import ErrorKind, FaultPolicy, UnmappedPolicy
from vcpu_service.gic import Gic, GicAccessError
from vcpu_service.shadows import ShadowTable


@dataclass(slots=True)
class Access:
    """A decoded access as a handler sees it: where, how big, which way, and a store's bytes (guest order)."""

    vcpu_id: int
    address: int
    size: int
    is_write: bool
    data: bytes
    region: RemoteRegion | None


class Abort(NamedTuple):
    """Apply ``policy``: a precise external abort, or the end of the run; ``reason`` names the access."""

    policy: FaultPolicy
    error_kind: ErrorKind
    reason: str
    device: str = ""


class VcpuLink(Protocol):
    """What a handler may ask of the vCPU whose access it handles: its streams to device services."""

    index: int

    def channel(self, service: str) -> ExitChannel: ...


class Handler(Protocol):
    """An in-process answer to accesses in a range; see the module docstring."""

    #: How the exit trace and the counters name what this handler did ("shadow", "posted", ...).
    kind: str

    def handle(self, access: Access, vcpu: VcpuLink) -> Completion | Abort | None: ...


@dataclass(frozen=True, slots=True)
class Slot:
    """One range of the address map: the remote region that owns it (None for an in-process device) and the
    handlers tried before forwarding."""

    base: int
    end: int
    region: RemoteRegion | None
    handlers: tuple[Handler, ...]


class HandlerRegistry:
    """The VM's address map of device ranges; ``lookup`` is one bisect on every trapped access."""

    def __init__(self, regions: Iterable[RemoteRegion], unmapped: Handler) -> None:
        self._slots: dict[int, Slot] = {r.base: Slot(r.base, r.end, r, ()) for r in regions}
        #: Tried for an address no slot covers (the unmapped-access policy).
        self.unmapped = unmapped
        self._index()

    def _index(self) -> None:
        self._ordered = sorted(self._slots.values(), key=lambda s: s.base)
        self._bases = [s.base for s in self._ordered]

    def attach(self, region: RemoteRegion, handler: Handler) -> None:
        """Try ``handler`` before forwarding accesses to ``region`` (after the handlers attached earlier)."""
        slot = self._slots[region.base]
        self._slots[region.base] = Slot(slot.base, slot.end, slot.region, (*slot.handlers, handler))
        self._index()

    def add_device(self, base: int, size: int, handler: Handler) -> None:
        """An in-process device owning [base, base+size): its accesses never leave the vcpu service."""
        for slot in self._ordered:
            if base < slot.end and slot.base < base + size:
                owner = f"{slot.region.device}/{slot.region.name}" if slot.region else "an in-process device"
                raise ValueError(f"in-process device at 0x{base:x}-0x{base + size - 1:x} overlaps {owner} "
                                 f"at 0x{slot.base:x}-0x{slot.end - 1:x}")
        self._slots[base] = Slot(base, base + size, None, (handler,))
        self._index()

    def lookup(self, address: int) -> Slot | None:
        i = bisect.bisect_right(self._bases, address) - 1
        if i >= 0:
            slot = self._ordered[i]
            if address < slot.end:
                return slot
        return None


class ShadowReads:
    """Loads of shadow registers, answered from the VM's copy (kept current by completions and a watch stream).

    Only for the exact register and size the copy holds, and only when no posted write to that service waits:
    those must reach the device first, with a real exit, so the read sees what they did.
    """

    kind = "shadow"

    def __init__(self, table: ShadowTable) -> None:
        self.table = table

    def handle(self, access: Access, vcpu: VcpuLink) -> Completion | Abort | None:
        if access.is_write:
            return None
        value = self.table.lookup(access.address, access.size)
        if value is None or access.region is None or vcpu.channel(access.region.service).pending_posted():
            return None
        return Completion(data=value)


#: The answer to a posted store that waits in its queue (no batch went out with it).
QUEUED = Completion()


class PostedWrites:
    """Stores to a posted region: queued on the vCPU's stream to the device service, completed at once (KVM's
    coalesced MMIO). A full batch goes out from here; what answered batches reported rides on the completion."""

    kind = "posted"

    def handle(self, access: Access, vcpu: VcpuLink) -> Completion | Abort | None:
        if not access.is_write or access.region is None:
            return None
        batch = self.queue(vcpu, access.region, access.address, access.data)
        return QUEUED if batch is None else batch

    @staticmethod
    def queue(vcpu: VcpuLink, region: RemoteRegion, address: int, data: bytes) -> Completion | None:
        """Queue one posted write (from an exit or from the write hook of an exit-free posted window). Returns
        the completion of a batch that went out because the queue was full, else None."""
        try:
            return vcpu.channel(region.service).post(address, data)
        except TransportError as exc:
            raise PostedWriteLost(f"posted write to 0x{address:x} in {region.device}: {exc}",
                                  region.device) from None


class PostedWhileTrapped:
    """Stores to a posted ROMD region (flash): queued only while its mirror is off, else left to exit.

    The store that takes a bank out of array mode (a program or erase command) must exit, so that the mirror is
    unmapped before the next load; after it, loads of the bank exit too and deliver the queue before they are
    answered, so every status read sees the writes before it. A store that returns the bank to array mode may
    wait in the queue: the mirror stays off until the device says otherwise. Only in a VM of one vCPU: another
    vCPU's load would not deliver this vCPU's queue first (docs/protocol.md, "Posted writes").
    """

    kind = "posted"

    def __init__(self, posted: PostedWrites, mirror_on: Callable[[], bool]) -> None:
        self._posted = posted
        self._mirror_on = mirror_on

    def handle(self, access: Access, vcpu: VcpuLink) -> Completion | Abort | None:
        if not access.is_write or self._mirror_on():
            return None
        return self._posted.handle(access, vcpu)


class PostedWriteLost(Exception):
    """A posted write could not be queued or sent (its stream broke); it has retired, so the run ends."""

    def __init__(self, reason: str, device: str) -> None:
        super().__init__(reason)
        self.device = device


class GicRegisters:
    """One of the GIC's two register frames (distributor or CPU interface), answered in process: GIC accesses never
    leave the vcpu service, as KVM keeps its vGIC in the kernel. The accessing vCPU picks the banked registers."""

    kind = "gic"

    def __init__(self, gic: Gic, base: int, cpu_interface: bool, policy: FaultPolicy) -> None:
        self.gic = gic
        self.base = base
        self.policy = policy
        self._read = gic.cpu_read if cpu_interface else gic.dist_read
        self._write = gic.cpu_write if cpu_interface else gic.dist_write
        self._name = "GIC CPU interface" if cpu_interface else "GIC distributor"

    def handle(self, access: Access, vcpu: VcpuLink) -> Completion | Abort | None:
        offset = access.address - self.base
        try:
            if access.is_write:
                self._write(access.vcpu_id, offset, access.size, int.from_bytes(access.data, "little"))
                return Completion()
            return Completion(data=self._read(access.vcpu_id, offset, access.size).to_bytes(access.size, "little"))
        except GicAccessError as exc:
            return Abort(self.policy, ErrorKind.DEVICE_ERROR, f"the {self._name} refused it: {exc}", "gic")


class Unmapped:
    """An address no device or RAM owns: read as zero and ignore writes (QEMU+KVM), or apply a fault policy."""

    def __init__(self, policy: UnmappedPolicy) -> None:
        self.policy = policy
        self.kind = "unmapped (RAZ/WI)" if policy is UnmappedPolicy.RAZ_WI else "unmapped"

    def handle(self, access: Access, vcpu: VcpuLink) -> Completion | Abort | None:
        if self.policy is UnmappedPolicy.RAZ_WI:
            return Completion(data=b"" if access.is_write else bytes(access.size))
        policy = FaultPolicy.ABORT if self.policy is UnmappedPolicy.ABORT else FaultPolicy.STOP
        return Abort(policy, ErrorKind.UNMAPPED_ACCESS, "no device or RAM at that address")
