"""The exit path of one vCPU, shaped like KVM_RUN: ``begin`` a trapped access, let the loop exchange it, then
``complete`` it.

``begin`` is KVM's ``io_mem_abort``: decode the faulting instruction (the 2013 hand decoder for writeback forms,
without its defects), try the in-process handlers (``handlers``: shadow registers, posted writes, the unmapped
policy, later the GIC), and return an action. It never blocks and never calls back into the loop.
``complete`` is ``kvm_handle_mmio_return``: apply a completion (Rt with its sign and width, base writeback, PC,
and everything the completion carries: interrupt levels, ROMD mirror changes, shadow values, failed posted
writes). It is the one place those side effects happen. What cannot be handled gets QEMU's answer by policy:
a precise synchronous external abort, or a stop. The arithmetic lives in the pure modules ``decode``, ``split``
and ``completion``.

Instructions with no syndrome that the architecture performs and KVM refuses (pairs, duals, multiples,
exclusives, SIMD&FP, loads to PC: ``split.decode_split``) become a ``Split`` unless the VM is strict: one
single access per part in QEMU's TCG order, all checked against their regions before the first is sent, then
``perform_split`` sends them one by one (each waiting for its completion, or answered by an in-process handler)
and writes registers, base and PC once, after the last. A failing part gets the single access's policy at the
instruction's PC with FAR = the part's address and no register written; the parts of a store already
performed stay performed, as under QEMU (the architecture does not make these accesses single-copy atomic).
Only ISV=0 instructions reach that code: the single-access path is unchanged.
"""

from __future__ import annotations

import array
import functools
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from hdrh.histogram import HdrHistogram
from unicorn import UC_HOOK_MEM_READ, Uc, UcError
from unicorn import arm64_const as a64_const

from mmiosplit.mmio import (
    Completion,
    CompletionStatus,
    DeadlineExceeded,
    DeviceRestarted,
    LineChange,
    MirrorChange,
    MmioExit,
    RemoteRegion,
    ServiceLost,
    TransportError,
)
from vcpu_service import exceptions
from vcpu_service.arch import EC_DABT_LOW, Arch, ArchError, FetchedInsn
from vcpu_service.completion import load_value, store_data
from vcpu_service.decode import Decoded, Isa, Refused, Syndrome, decode
from vcpu_service.domain import ErrorKind, EventKind, FaultPolicy, KvmReportEntry, LatencySummary, Policies
from vcpu_service.events import EventLog
from vcpu_service.handlers import (
    QUEUED,
    Abort,
    Access,
    Handler,
    HandlerRegistry,
    PostedWriteLost,
    PostedWrites,
    Slot,
    VcpuLink,
)
from vcpu_service.shadows import ShadowTable
from vcpu_service.split import Transfer, decode_split, offset_amount
from vcpu_service.tracelog import ExitRecord, TraceLog

# Exit latencies buffered before the vCPU folds them into its histogram itself (8 MiB).
LATENCY_BUFFER = 1 << 20
# What KVM would see at stage 2: a data abort from the guest (a lower EL), translation fault level 3.
DFSC_TRANSLATION_L3 = 0x07


@functools.lru_cache(maxsize=4096)
def decode_cached(isa: Isa, word: int) -> tuple[Decoded, int]:
    """The decode of an encoding and the ESR_EL2 KVM would see for it at stage 2; -1 when there is no access
    to forward (no syndrome, or cache maintenance). Decoding is a pure function of the encoding, so it is
    cached (the PC only locates the word)."""
    decoded = decode(isa, word)
    if isinstance(decoded, Refused) or decoded.cm:
        return decoded, -1
    return decoded, decoded.esr(EC_DABT_LOW, DFSC_TRANSLATION_L3)


#: The plan of an ISV=0 instruction (``split.decode_split``), cached like ``decode_cached``.
split_cached = functools.lru_cache(maxsize=1024)(decode_split)


def describe_access(pc: int, address: int, insn: FetchedInsn) -> str:
    """How every message names an access: the address, the instruction and the PC."""
    return f"0x{address:x} by the instruction 0x{insn.word:0{insn.length * 2}x} at pc 0x{pc:x}"


def release_histogram(hist: HdrHistogram) -> None:
    """Free a histogram made for one computation (a snapshot, a sum) now. An HdrHistogram and its encoder refer
    to each other, so a dropped one waits for the cycle collector with its 220 KB of counts: a service asked
    for statistics twice a second grew by tens of megabytes between collections (the soak's sawtooth)."""
    hist.encoder = None


def new_latency_histogram() -> HdrHistogram:
    """Exit latencies in nanoseconds, 1 ns to 60 s, 3 significant digits."""
    return HdrHistogram(1, 60_000_000_000, 3)


def summarize(hist: HdrHistogram, include_histogram: bool = False) -> LatencySummary:
    """Percentiles in microseconds from a histogram of nanoseconds (and the histogram itself if asked)."""
    count = hist.get_total_count()
    if count == 0:
        return LatencySummary()
    return LatencySummary(
        count=count,
        p50_us=hist.get_value_at_percentile(50) / 1000,
        p90_us=hist.get_value_at_percentile(90) / 1000,
        p99_us=hist.get_value_at_percentile(99) / 1000,
        p999_us=hist.get_value_at_percentile(99.9) / 1000,
        max_us=hist.get_max_value() / 1000,
        mean_us=hist.get_mean_value() / 1000,
        hdr=hist.encode().decode("ascii") if include_histogram else "",
    )


class VcpuFault(Exception):
    """Ends the run with an error event; carries the event fields."""

    def __init__(self, error_kind: ErrorKind, reason: str, **fields: object) -> None:
        super().__init__(reason)
        self.error_kind = error_kind
        self.reason = reason
        self.fields = fields


@dataclass(slots=True)
class ExitStats:
    exits: int = 0
    reads: int = 0
    writes: int = 0
    posted_writes: int = 0
    posted_batches: int = 0
    shadow_reads: int = 0
    aborts: int = 0
    nops: int = 0
    hand_decoded: int = 0
    guest_faults: int = 0  # accesses that took a fault in the guest instead of an exit (alignment)
    kvm_report: dict[tuple[int, int], KvmReportEntry] = field(default_factory=dict)
    # (device, region, kind) -> count, kind read/write/posted_write/shadow_read; read by the metrics at scrape time.
    by_region: Counter[tuple[str, str, str]] = field(default_factory=Counter)


class VmView(Protocol):
    """What the exit path needs of its VM."""

    @property
    def policies(self) -> Policies: ...
    @property
    def strict_kvm(self) -> bool: ...
    @property
    def trace(self) -> TraceLog | None: ...
    @property
    def events(self) -> EventLog: ...
    @property
    def handlers(self) -> HandlerRegistry: ...
    @property
    def shadows(self) -> ShadowTable: ...

    @property
    def ram_ends(self) -> frozenset[int]: ...

    def apply_mirror_changes(self, changes: Iterable[MirrorChange]) -> None: ...
    def apply_line_changes(self, changes: Iterable[LineChange]) -> None: ...


class VcpuView(VcpuLink, Protocol):
    """What the exit path needs of its vCPU: the CPU, its VM, its streams."""

    uc: Uc
    executed: int

    def big_endian_data(self) -> bool: ...
    def exception_entered(self, taken: exceptions.Taken) -> None: ...

    @property
    def arch(self) -> Arch: ...
    @property
    def vm(self) -> VmView: ...


# ----- what begin returns ---------------------------------------------------------------------------------------
@dataclass(slots=True)
class PendingAccess:
    """A decoded access between ``begin`` and ``complete`` (KVM's ``vcpu->mmio_needed`` and ``run->mmio``).

    Everything the completion needs is read at ``begin``: registers cannot change while the exit is pending.
    """

    pc: int
    insn: FetchedInsn
    syn: Syndrome
    address: int
    region: RemoteRegion | None
    data: bytes  # a store's bytes, in guest-memory order
    big_endian: bool
    new_base: int | None
    started_ns: int  # when begin took the fault, for traces of in-process completions
    exit: MmioExit | None = None  # what to forward (Forward only)
    sent_ns: int = 0  # when the loop sent the exit; exit latency runs from here

    @property
    def where(self) -> str:
        return describe_access(self.pc, self.address, self.insn)


class Skip(NamedTuple):
    """The instruction makes no access (cache maintenance by address, a failed A32 condition): PC moves on."""

    pc: int
    length: int


class Refuse(NamedTuple):
    """Apply a fault policy to the instruction at ``pc``: inject a precise external abort, or end the run."""

    policy: FaultPolicy
    error_kind: ErrorKind
    reason: str
    pc: int
    address: int
    is_write: bool
    insn: FetchedInsn
    device: str = ""
    syndrome: int = 0


class CompleteNow(NamedTuple):
    """An in-process handler answered: complete without an exit. ``kind`` names the handler."""

    pending: PendingAccess
    completion: Completion
    kind: str


class Forward(NamedTuple):
    """Send ``pending.exit`` to its device service; the loop does the exchange, then calls ``complete``."""

    pending: PendingAccess


class GuestFault(NamedTuple):
    """The access itself faults in the guest, as on hardware (an alignment fault): the guest's data abort vector."""

    pc: int
    address: int
    is_write: bool
    insn: FetchedInsn
    alignment: bool = True


class SplitPart(NamedTuple):
    """One single access of a split instruction: its pending access (physical address), the address the guest
    used (the FAR if it fails) and the in-process handlers of its slot."""

    pending: PendingAccess
    va: int
    handlers: tuple[Handler, ...]


class Split(NamedTuple):
    """An instruction with no syndrome emulated as a sequence of single accesses (``perform_split``): each part
    is its own exit, in order; registers, writeback and PC change only once every part has completed."""

    pc: int
    insn: FetchedInsn
    transfer: Transfer
    parts: tuple[SplitPart, ...]
    start: int  # the first address, as the guest computed it
    new_base: int | None
    big_endian: bool


Action = Skip | Refuse | CompleteNow | Forward | GuestFault | Split

_MASK32 = 0xFFFF_FFFF
_MASK64 = 0xFFFF_FFFF_FFFF_FFFF


class ExitPath:
    """The data aborts of one vCPU: ``begin`` on the vCPU thread after Unicorn faults, ``complete`` after."""

    def __init__(self, vcpu: VcpuView) -> None:
        self.vcpu = vcpu
        self.arch = vcpu.arch
        self.vm = vcpu.vm
        self.stats = ExitStats()
        self._who = f"vCPU {vcpu.index}"
        self.latency = new_latency_histogram()
        # Exit latencies (ns) not yet in the histogram: recording into an HdrHistogram costs a dozen Python
        # calls, so the exit path appends here (under latency_lock) and another thread folds them in: whoever
        # reads the histogram, and _FOLDER once a second, so the buffer stays small in a long run nobody reads.
        # HdrHistogram is not thread-safe: recording and copying hold _hist_lock.
        self._latencies = array.array("q")
        self.latency_lock = threading.Lock()
        self._hist_lock = threading.Lock()
        _FOLDER.add(self)
        # The exclusive monitor of emulated LDXR/LDREX on device memory: (address, size), or None when open.
        self.monitor: tuple[int, int] | None = None

    # ----- begin --------------------------------------------------------------------------------------------
    def begin(self, pc: int, address: int, fault_is_write: bool, fault_size: int = 0) -> Action:
        """Decode the access Unicorn trapped at ``pc`` and decide what happens to it.

        ``address`` and ``fault_size`` are what Unicorn's unmapped-memory hook reported (0: unknown). This runs
        on every exit, so messages are only built for failures.
        """
        t0 = time.perf_counter_ns()
        uc = self.vcpu.uc
        arch = self.arch
        insn = arch.fetch(uc, pc)
        decoded, syndrome = decode_cached(insn.isa, insn.word)
        if syndrome < 0 or insn.isa is Isa.A32:
            action = self._not_forwardable(pc, address, fault_is_write, insn, decoded)
            if action is not None:
                return action
        syn: Syndrome = decoded  # type: ignore[assignment]
        if not syn.isv:
            reason = "load/store with base writeback (ISV=0)"
            self._kvm_note(pc, insn, reason, handled=not self.vm.strict_kvm)
            if self.vm.strict_kvm:
                return Refuse(self.vm.policies.nisv, ErrorKind.NISV,
                              f"{self._who}: NISV: access to {describe_access(pc, address, insn)}: {reason}, refused "
                              "in strict KVM mode", pc, address, syn.wnr, insn, syndrome=syndrome)
            self.stats.hand_decoded += 1
        size = 1 << syn.sas
        is_write = syn.wnr
        if address & (size - 1) and fault_size in (0, size) and not exceptions.mmu_enabled(arch, uc):
            # With the MMU off every data access is to Device-nGnRnE memory, where an unaligned access takes an
            # alignment fault (DFSC 0x21) before it reaches the bus: the device never sees it. (An access Unicorn
            # split at a page boundary, from RAM into the device, is left to the straddle check below: its start,
            # the FAR, is not the address the hook reported.)
            return GuestFault(pc, address, is_write, insn, alignment=True)
        new_base = None if syn.writeback is None else self._writeback_value(syn)
        slot = self.vm.handlers.lookup(address)
        # Unicorn splits an access that crosses from RAM into unmapped space at the page boundary: a store goes
        # on byte by byte (the hook last reports a 1-byte write past the boundary), a load faults on its second,
        # size-aligned half with the full size, right where a RAM block ends. Forwarding the hook's address would
        # give the device an access the guest never made.
        if fault_size and size > 1 and (
                fault_size != size or (not is_write and address in self.vm.ram_ends and self._load_starts_in_ram(
                    pc, address, size))):
            device = slot.region.device if slot is not None and slot.region is not None else ""
            return Refuse(self.vm.policies.device_error, ErrorKind.DEVICE_ERROR,
                          f"{self._who}: {size}-byte access to {describe_access(pc, address, insn)}: it starts in "
                          f"RAM and straddles into {device or 'unmapped space'}; a bus error, like an access that no "
                          "single device can answer", pc, address, is_write, insn, device, syndrome)
        region = None
        if slot is not None:
            region = slot.region
            if region is not None and (address + size > region.end or size not in region.access_sizes):
                return Refuse(self.vm.policies.device_error, ErrorKind.DEVICE_ERROR,
                              f"{self._who}: {size}-byte access to {describe_access(pc, address, insn)}: "
                              f"{region_problem(region, address, size)}", pc, address, is_write, insn,
                              region.device, syndrome)
        big_endian = size > 1 and self.vcpu.big_endian_data()
        data = store_data(arch.read_gpr(uc, syn.srt), syn, big_endian) if is_write else b""
        pending = PendingAccess(pc, insn, syn, address, region, data, big_endian, new_base, t0)
        handlers = slot.handlers if slot is not None else (self.vm.handlers.unmapped,)
        if handlers:
            action = self._try_handlers(handlers, pending, syndrome)
            if action is not None:
                return action
        if region is None:
            raise VcpuFault(ErrorKind.INTERNAL, f"{self._who}: no handler answered the access to "
                            f"{describe_access(pc, address, insn)}, which no device service owns", pc=pc)
        pending.exit = MmioExit(self.vcpu.index, address, size, is_write, data, region.device, region.name,
                                address - region.base, syndrome, pc, insn.word, region.deadline_ms)
        return Forward(pending)

    def _not_forwardable(self, pc: int, address: int, fault_is_write: bool, insn: FetchedInsn,
                         decoded: Decoded) -> Action | None:
        """The action for an instruction with no access to forward (cache maintenance, a failed A32 condition,
        no syndrome), or None when it has one."""
        if isinstance(decoded, Syndrome) and decoded.cm:
            # Cache maintenance by address on device memory is a NOP, as KVM does ("the guest is just being
            # cautious").
            return Skip(pc, decoded.insn_len)
        if insn.isa is Isa.A32 and not self.arch.condition_passed(self.vcpu.uc, insn.word):
            # A conditional instruction may trap although it would not execute: no access, PC moves on.
            return Skip(pc, 4)
        if isinstance(decoded, Syndrome):
            return None
        reason = decoded.reason
        if not self.vm.strict_kvm:
            transfer = split_cached(insn.isa, insn.word)
            if transfer is not None:
                self._kvm_note(pc, insn, reason, handled=True)
                self.stats.hand_decoded += 1
                return self._begin_split(pc, address, insn, transfer)
        self._kvm_note(pc, insn, reason, handled=False)
        return Refuse(self.vm.policies.nisv, ErrorKind.NISV,
                      f"{self._who}: NISV: access to {describe_access(pc, address, insn)} has no usable instruction "
                      f"syndrome ({reason})", pc, address, fault_is_write, insn,
                      syndrome=(EC_DABT_LOW << 26) | (1 << 25) | (int(fault_is_write) << 6) | DFSC_TRANSLATION_L3)

    def _try_handlers(self, handlers: tuple[Handler, ...], pending: PendingAccess, syndrome: int) -> Action | None:
        """KVM's kvm_io_bus: the in-process handlers of the slot, in order, before the access leaves the process."""
        region = pending.region
        access = Access(self.vcpu.index, pending.address, pending.syn.size, pending.syn.wnr, pending.data, region)
        for handler in handlers:
            try:
                answer = handler.handle(access, self.vcpu)
            except PostedWriteLost as exc:
                raise VcpuFault(ErrorKind.DEVICE_SERVICE, f"{self._who}: {exc}", pc=pending.pc,
                                fault_address=pending.address, instruction=pending.insn.word,
                                device=exc.device) from None
            if answer is None:
                continue
            if isinstance(answer, Abort):
                return Refuse(answer.policy, answer.error_kind,
                              f"{self._who}: access to {pending.where}: {answer.reason}", pending.pc, pending.address,
                              pending.syn.wnr, pending.insn, answer.device, syndrome)
            return CompleteNow(pending, answer, handler.kind)
        return None

    # ----- instructions with no syndrome, split into single accesses -----------------------------------------
    def _begin_split(self, pc: int, address: int, insn: FetchedInsn, t: Transfer) -> Action:
        """Plan an ISV=0 instruction as single accesses and check every part against its region before the
        first one is sent, so that a part no device can take refuses the whole instruction with no access.

        ``address`` is where Unicorn faulted (a physical address): the parts are laid out from the registers
        (virtual addresses) and moved by the same distance, which holds within the faulting page.
        """
        uc = self.vcpu.uc
        arch = self.arch
        mask = _MASK64 if t.a64 else _MASK32
        base = arch.read_base(uc, t.rn)
        amount = t.offset if t.offset_reg is None else offset_amount(t, arch.read_gpr(uc, t.offset_reg),
                                                                     arch.carry_flag(uc))
        start = (base + t.bias + (0 if t.post_index else amount)) & mask
        new_base = (base + (amount if t.wb_offset is None else t.wb_offset)) & mask if t.writeback else None
        nisv = (EC_DABT_LOW << 26) | (1 << 25) | (int(t.wnr) << 6) | DFSC_TRANSLATION_L3
        if t.status is not None and self.monitor != (start, t.size):
            # A store-exclusive with no monitor for this address fails: status 1, no access.
            return Split(pc, insn, t, (), start, None, False)
        mmu = exceptions.mmu_enabled(arch, uc)
        vas = [start + part.offset for part in t.parts]
        if not mmu:  # Device memory: every part aligned to its size, an exclusive to its whole size
            for part, va in zip(t.parts, vas, strict=True):
                if va % part.size or (t.exclusive and start % t.size):
                    return GuestFault(pc, va, t.wnr, insn, alignment=True)
        faulting = next((va for va in vas if va & 0xFFF == address & 0xFFF), None)
        if faulting is None and mmu:
            return Refuse(self.vm.policies.nisv, ErrorKind.NISV,
                          f"{self._who}: NISV: {t.name} at pc 0x{pc:x}: the fault at 0x{address:x} is none of its "
                          f"accesses (from 0x{start:x}), so they cannot be placed", pc, start, t.wnr, insn,
                          syndrome=nisv)
        delta = 0 if faulting is None else address - faulting
        big_endian = self.vcpu.big_endian_data()
        data = self._split_store_data(pc, t, big_endian) if t.wnr else b""
        parts = []
        first = self.vm.handlers.lookup(vas[0] + delta)
        for part, va in zip(t.parts, vas, strict=True):
            pa = va + delta
            problem = ""
            slot = self.vm.handlers.lookup(pa)
            region = slot.region if slot is not None else None
            if mmu and faulting is not None and va >> 12 != faulting >> 12:
                problem = "it crosses a page boundary with the MMU on, where the next page may map anywhere"
            elif slot is not first:
                # As a single access that straddles the end of a device: the instruction is one access to the
                # architecture, so it is refused whole rather than half-done.
                problem = (f"the instruction straddles the end of {self._slot_name(first)} into "
                           f"{self._slot_name(slot)}; a bus error, like an access that no single device can answer")
            elif region is not None:
                problem = region_problem(region, pa, part.size)
            elif slot is None and self._is_ram(pa):
                problem = "it straddles RAM and device space; a bus error, like an access no single device answers"
            if problem:
                return Refuse(self.vm.policies.device_error, ErrorKind.DEVICE_ERROR,
                              f"{self._who}: {t.name} at pc 0x{pc:x} ({t.kind}, {len(t.parts)} accesses from "
                              f"0x{start:x}): its {part.size}-byte access to 0x{va:x}: {problem}; refused before "
                              "any access", pc, va, t.wnr, insn, region.device if region is not None else "",
                              nisv)
            syn = Syndrome(isv=False, sas=part.size.bit_length() - 1, sse=False, srt=t.regs[part.element] & 31,
                           sf=t.sf, ar=False, wnr=t.wnr, il=t.il, rn=t.rn)
            chunk = data[part.offset:part.offset + part.size]
            pending = PendingAccess(pc, insn, syn, pa, region, chunk, big_endian, None, time.perf_counter_ns())
            handlers = slot.handlers if slot is not None else (self.vm.handlers.unmapped,)
            parts.append(SplitPart(pending, va, handlers))
        return Split(pc, insn, t, tuple(parts), start, new_base, big_endian)

    def _split_store_data(self, pc: int, t: Transfer, big_endian: bool) -> bytes:
        """The bytes a split store writes, in guest-memory order: each register in its own byte order."""
        uc = self.vcpu.uc
        out = bytearray()
        for reg in t.regs:
            if t.simd:
                value = int(uc.reg_read(a64_const.UC_ARM64_REG_Q0 + reg))
            elif reg == 15 and not t.a64:
                value = pc + 8  # STM with PC in the list (A32 only) stores the instruction's address + 8
            else:
                value = self.arch.read_gpr(uc, reg)
            value &= (1 << (8 * t.reg_size)) - 1
            out += value.to_bytes(t.reg_size, "big" if big_endian else "little")
        return bytes(out)

    @staticmethod
    def _slot_name(slot: Slot | None) -> str:
        if slot is None:
            return "unmapped space"
        return slot.region.device if slot.region is not None else f"the in-process device at 0x{slot.base:x}"

    def _is_ram(self, address: int) -> bool:
        try:
            self.vcpu.uc.mem_read(address, 1)
        except UcError:
            return False
        return True

    def perform_split(self, split: Split,
                      exchange: Callable[[PendingAccess], Completion | TransportError | None]) -> None:
        """Carry out a split instruction: each part in order, each its own exit waiting for its completion (or an
        in-process handler's answer). A failing part applies the policy the single access would get, at the
        instruction's PC with FAR = that part's address, and no register changes; stores already performed stay
        performed, as under QEMU. Registers, writeback and PC change once, after the last part."""
        loaded: list[bytes] = []
        insn = split.insn
        for pending, va, handlers in split.parts:
            result: Completion | TransportError | None = None
            kind = "exit"
            if handlers:
                action = self._try_handlers(handlers, pending, 0)
                if isinstance(action, Refuse):
                    self.refuse(action._replace(address=va, syndrome=self._split_esr(pending)))
                    return
                if isinstance(action, CompleteNow):
                    result, kind = action.completion, action.kind
            if result is None:
                region = pending.region
                if region is None:
                    raise VcpuFault(ErrorKind.INTERNAL, f"{self._who}: no handler answered the access to "
                                    f"{pending.where}, which no device service owns", pc=split.pc)
                pending.exit = MmioExit(self.vcpu.index, pending.address, pending.syn.size, pending.syn.wnr,
                                        pending.data, region.device, region.name, pending.address - region.base, 0,
                                        split.pc, insn.word, region.deadline_ms)
                result = exchange(pending)
                if result is None:
                    return  # the vCPU stops: the instruction has not retired
            data = self._settle_part(pending, va, result, kind)
            if data is None:
                return
            loaded.append(data)
        self._retire_split(split, b"".join(loaded))

    @staticmethod
    def _split_esr(pending: PendingAccess) -> int:
        return pending.syn.esr(EC_DABT_LOW, DFSC_TRANSLATION_L3)

    def _refuse_part(self, pending: PendingAccess, va: int, policy: FaultPolicy, kind: ErrorKind,
                     reason: str) -> None:
        region = pending.region
        self.refuse(Refuse(policy, kind, reason, pending.pc, va, pending.syn.wnr, pending.insn,
                           region.device if region is not None else "", self._split_esr(pending)))

    def _settle_part(self, pending: PendingAccess, va: int, result: Completion | TransportError,
                     kind: str) -> bytes | None:
        """Check and count one completed part (as ``complete`` does for a single access, without touching
        registers); its data (b"" for a store), or None when it failed and its policy was applied."""
        region = pending.region
        syn = pending.syn
        if isinstance(result, TransportError):
            self._refuse_part(pending, va, *self._transport_policy(result),
                              f"{self._who}: {self._access_name(pending)} (one part of a split access): {result}")
            return None
        if result.posted_errors or result.mirror_changes or result.shadows or result.lines:
            try:
                self.apply_effects(result, region.device if region is not None else "", pc=pending.pc)
            except TransportError as exc:
                self._refuse_part(pending, va, self.vm.policies.device_error, ErrorKind.DEVICE_SERVICE,
                                  f"{self._who}: {self._access_name(pending)}: {exc}")
                return None
        if result.status is not CompletionStatus.OK:
            self._refuse_part(pending, va, self.vm.policies.device_error, ErrorKind.DEVICE_ERROR,
                              f"{self._who}: {region.device if region is not None else ''} refused the "
                              f"{syn.size}-byte {'write' if syn.wnr else 'read'} of {pending.where} (one part of a "
                              f"split access): {result.status.value}: {result.error}")
            return None
        data = b"" if syn.wnr else result.data
        if len(data) != (0 if syn.wnr else syn.size):
            self._refuse_part(pending, va, self.vm.policies.device_error, ErrorKind.DEVICE_SERVICE,
                              f"{self._who}: completion for {pending.where}: {syn.size} data bytes expected, got "
                              f"{len(data)}")
            return None
        stats = self.stats
        now = time.perf_counter_ns()
        t0 = pending.started_ns
        if kind == "exit":
            assert region is not None
            t0 = pending.sent_ns
            with self.latency_lock:
                self._latencies.append(now - t0)
                if len(self._latencies) >= LATENCY_BUFFER:
                    self._fold_latencies()
            stats.exits += 1
            op = "write" if syn.wnr else "read"
            if syn.wnr:
                stats.writes += 1
            else:
                stats.reads += 1
            stats.by_region[region.device, region.name, op] += 1
            kind = "ok"
        elif kind == "posted" and region is not None:
            if result is not QUEUED:
                stats.posted_batches += 1
            stats.posted_writes += 1
            stats.by_region[region.device, region.name, "posted_write"] += 1
        elif kind == "shadow" and region is not None:
            stats.shadow_reads += 1
            stats.by_region[region.device, region.name, "shadow_read"] += 1
        if self.vm.trace is not None:
            self._trace(pending, int.from_bytes(data or pending.data, "little"), kind, t0, now)
        return data

    def _retire_split(self, split: Split, loaded: bytes) -> None:
        """Every part completed: write the loaded registers, the base and PC (or branch), once."""
        t = split.transfer
        uc = self.vcpu.uc
        arch = self.arch
        if t.status is not None:
            arch.write_gpr(uc, t.status, 0 if split.parts else 1)
            self.monitor = None
        elif t.exclusive:
            self.monitor = (split.start, t.size)
            if self._arm_unicorn_monitor(split, loaded):
                return  # Unicorn ran the load itself, from the device's bytes: registers and PC are done
        branch = None
        if not t.wnr:
            for i, reg in enumerate(t.regs):
                value = int.from_bytes(loaded[i * t.reg_size:(i + 1) * t.reg_size],
                                       "big" if split.big_endian else "little")
                if t.sse:
                    sign = 1 << (8 * t.reg_size - 1)
                    value = (value ^ sign) - sign
                if t.simd:
                    uc.reg_write(a64_const.UC_ARM64_REG_Q0 + reg, value)
                elif reg == 15 and not t.a64:
                    branch = value
                else:
                    arch.write_gpr(uc, reg, value & (_MASK64 if t.sf else _MASK32))
        if split.new_base is not None:
            arch.write_base(uc, t.rn, split.new_base)
        arch.advance(uc, split.pc, t.insn_len)
        if branch is not None:
            arch.load_write_pc(uc, branch)

    def _arm_unicorn_monitor(self, split: Split, loaded: bytes) -> bool:
        """Run a load-exclusive once more in Unicorn, over a scratch page holding the bytes the device returned,
        so that Unicorn's own exclusive monitor is set: only then does its store-exclusive to the same address
        trap (instead of failing at once) and come here to be checked against ``monitor``. False if the page
        cannot be mapped (the caller writes the registers; the store-exclusive will then fail)."""
        uc = self.vcpu.uc
        first = split.parts[0].pending.address
        page = first & ~0xFFF
        if (first + split.transfer.size - 1) & ~0xFFF != page:
            return False
        try:
            uc.mem_map(page, 0x1000)
        except UcError:
            return False
        executed = self.vcpu.executed
        try:
            uc.mem_write(first, loaded)
            # A block translated earlier would run on past the instruction: translate it afresh, alone.
            end = split.pc + split.transfer.insn_len
            uc.ctl_remove_cache(split.pc, end)
            uc.emu_start(self.arch.start_address(uc, split.pc), end, count=1)
            uc.ctl_remove_cache(split.pc, end)
            return self.arch.pc(uc) == end
        except UcError:
            return False
        finally:
            self.vcpu.executed = executed
            uc.mem_unmap(page, 0x1000)

    # ----- complete -----------------------------------------------------------------------------------------
    def settle(self, action: Skip | Refuse | CompleteNow | GuestFault) -> None:
        """Carry out an action that needs no device service (none of them waits)."""
        if isinstance(action, CompleteNow):
            self.complete(action.pending, action.completion, action.kind)
        elif isinstance(action, Skip):
            self.stats.nops += 1
            self.arch.advance(self.vcpu.uc, action.pc, action.length)
        elif isinstance(action, GuestFault):
            self.stats.guest_faults += 1
            self.vcpu.exception_entered(exceptions.data_abort(self.arch, self.vcpu.uc, action.pc, action.address,
                                                              action.is_write, action.insn.length,
                                                              alignment=action.alignment))
        else:
            self.refuse(action)

    def _transport_policy(self, failure: TransportError) -> tuple[FaultPolicy, ErrorKind]:
        """What an access whose exchange failed gets: a service gone (or back without its state) ends the run, since
        it cannot go on as if it were a bus error; a deadline gets the deadline policy; anything else the device
        error policy."""
        if isinstance(failure, (ServiceLost, DeviceRestarted)):
            return FaultPolicy.STOP, ErrorKind.DEVICE_SERVICE
        if isinstance(failure, DeadlineExceeded):
            return self.vm.policies.deadline, ErrorKind.DEADLINE
        return self.vm.policies.device_error, ErrorKind.DEVICE_SERVICE

    def complete(self, pending: PendingAccess, result: Completion | TransportError, kind: str = "exit") -> None:
        """Apply the answer to ``pending`` (from its device service, or from an in-process handler ``kind``).

        The one place completion side effects happen: ROMD mirrors, shadow values, failed posted writes, then Rt
        (sign, width, byte order), base writeback and PC, exactly once. A failure applies its fault policy.
        """
        syn = pending.syn
        if isinstance(result, TransportError):
            self._refuse_pending(pending, *self._transport_policy(result),
                                 f"{self._who}: {self._access_name(pending)}: {result}")
            return
        region = pending.region
        if result.posted_errors or result.mirror_changes or result.shadows or result.lines:
            try:
                self.apply_effects(result, region.device if region is not None else "", pc=pending.pc)
            except TransportError as exc:
                self._refuse_pending(pending, self.vm.policies.device_error, ErrorKind.DEVICE_SERVICE,
                                     f"{self._who}: {self._access_name(pending)}: {exc}")
                return
        if result.status is not CompletionStatus.OK:
            self._refuse_pending(pending, self.vm.policies.device_error, ErrorKind.DEVICE_ERROR,
                                 f"{self._who}: {region.device if region is not None else ''} refused the "
                                 f"{syn.size}-byte {'write' if syn.wnr else 'read'} of {pending.where}: "
                                 f"{result.status.value}: {result.error}")
            return
        uc = self.vcpu.uc
        arch = self.arch
        if syn.wnr:
            value = 0
        else:
            try:
                value = load_value(result.data, syn, pending.big_endian)
            except ValueError as exc:
                self._refuse_pending(pending, self.vm.policies.device_error, ErrorKind.DEVICE_SERVICE,
                                     f"{self._who}: completion for {pending.where}: {exc}")
                return
            arch.write_gpr(uc, syn.srt, value)
        if pending.new_base is not None and syn.writeback is not None:
            arch.write_base(uc, syn.writeback.rn, pending.new_base)
        arch.advance(uc, pending.pc, 4 if syn.il else 2)
        stats = self.stats
        if kind == "exit":
            now = time.perf_counter_ns()
            with self.latency_lock:
                self._latencies.append(now - pending.sent_ns)
                if len(self._latencies) >= LATENCY_BUFFER:
                    self._fold_latencies()
            stats.exits += 1
            assert region is not None
            if syn.wnr:
                stats.writes += 1
                stats.by_region[region.device, region.name, "write"] += 1
            else:
                stats.reads += 1
                stats.by_region[region.device, region.name, "read"] += 1
            if self.vm.trace is not None:
                self._trace(pending, value or int.from_bytes(pending.data, "little"), "ok", pending.sent_ns, now)
            return
        if kind == "posted":
            assert region is not None
            if result is not QUEUED:
                stats.posted_batches += 1  # the queue was full: a batch went out with this store
            stats.posted_writes += 1
            stats.by_region[region.device, region.name, "posted_write"] += 1
        elif kind == "shadow":
            assert region is not None
            stats.shadow_reads += 1
            stats.by_region[region.device, region.name, "shadow_read"] += 1
        if self.vm.trace is not None:
            self._trace(pending, value or int.from_bytes(pending.data, "little"), kind, pending.started_ns,
                        time.perf_counter_ns())

    def apply_effects(self, completion: Completion, device: str, pc: int = 0) -> None:
        """What a completion (of an exit, a posted batch or a flush) changed besides the access itself.

        Interrupt levels go to the GIC first (before the completion is applied, so the vCPU never runs on with
        stale interrupt state). Mirror changes and shadow values the VM cannot accept raise TransportError;
        failed posted writes end the run (they retired long ago, so they cannot be made precise).
        """
        if completion.lines:
            self.vm.apply_line_changes(completion.lines)
        if completion.mirror_changes:
            self.vm.apply_mirror_changes(completion.mirror_changes)
        for change in completion.shadows:
            self.vm.shadows.apply(change)
        if completion.posted_errors:
            fields: dict[str, object] = {"device": device}
            if pc:
                fields["pc"] = pc
            raise VcpuFault(ErrorKind.DEVICE_ERROR,
                            f"{self._who}: " + "; ".join(map(str, completion.posted_errors)), **fields)

    def absorb(self, completion: Completion, device: str, batch_sent: bool) -> None:
        """The completion of posted writes (a full batch, or a flush): count the batch and apply what it carried.
        Effects the VM cannot accept end the run, naming the device service."""
        if batch_sent:
            self.stats.posted_batches += 1
        if completion.has_effects:
            try:
                self.apply_effects(completion, device)
            except TransportError as exc:
                raise VcpuFault(ErrorKind.DEVICE_SERVICE, f"vCPU {self.vcpu.index}: {exc}", device=device) from None

    # ----- posted stores without an exit ----------------------------------------------------------------------
    def post_store(self, region: RemoteRegion, key: tuple[str, str, str], address: int, size: int,
                   value: int, big_endian: bool) -> None:
        """A store to an exit-free posted window, seen by Unicorn's write hook: queue it; the guest never stops.

        It runs once per guest store, so it is kept lean (``key`` is the region's counter key, built once). A
        posted write cannot be refused precisely (the store has retired, as on hardware where a bad posted write
        is an asynchronous SError), so a size the region does not take ends the run.
        """
        if size not in region.access_sizes or address + size > region.end:
            raise VcpuFault(
                ErrorKind.DEVICE_ERROR,
                f"vCPU {self.vcpu.index}: posted {size}-byte write to 0x{address:x} in {region.device}: "
                f"{region_problem(region, address, size)}; a posted write has already retired, so the run "
                "ends (real hardware raises an asynchronous SError)",
                fault_address=address, device=region.device)
        data = (value & ((1 << (size * 8)) - 1)).to_bytes(size, "big" if big_endian and size > 1 else "little")
        try:
            batch = PostedWrites.queue(self.vcpu, region, address, data)  # the queueing an exit's store uses too
        except PostedWriteLost as exc:
            raise VcpuFault(ErrorKind.DEVICE_SERVICE, f"{self._who}: {exc}", fault_address=address,
                            device=region.device) from None
        self.stats.by_region[key] += 1
        self.stats.posted_writes += 1
        if batch is not None:
            self.absorb(batch, region.device, batch_sent=True)

    # ----- failures -------------------------------------------------------------------------------------------
    def refuse(self, action: Refuse) -> None:
        """Apply a fault policy: inject a precise external abort, or end the run (VcpuFault)."""
        fields: dict[str, object] = {"pc": action.pc, "fault_address": action.address,
                                     "instruction": action.insn.word, "device": action.device,
                                     "syndrome": action.syndrome}
        if action.policy is FaultPolicy.ABORT:
            try:
                taken = exceptions.data_abort(self.arch, self.vcpu.uc, action.pc, action.address, action.is_write,
                                              action.insn.length)
            except ArchError as exc:
                raise VcpuFault(action.error_kind,
                                f"{action.reason}; and the external abort could not be injected: {exc}",
                                **fields) from None
            self.stats.aborts += 1
            self.vcpu.exception_entered(taken)
            self.vm.events.emit(EventKind.EXTERNAL_ABORT,
                                f"{action.reason}; synchronous external abort injected, vector 0x{taken.vector:x}",
                                vcpu_id=self.vcpu.index, error_kind=action.error_kind, pc=action.pc,
                                fault_address=action.address, instruction=action.insn.word, device=action.device,
                                syndrome=action.syndrome)
            return
        raise VcpuFault(action.error_kind, action.reason, **fields)

    @staticmethod
    def _access_name(pending: PendingAccess) -> str:
        """How an error names a device access: size, direction, device, address, instruction and PC."""
        device = pending.region.device if pending.region is not None else "no device"
        return (f"the {pending.syn.size}-byte {'write' if pending.syn.wnr else 'read'} of {device} at "
                f"{pending.where}")

    def _refuse_pending(self, pending: PendingAccess, policy: FaultPolicy, kind: ErrorKind, reason: str) -> None:
        region = pending.region
        self.refuse(Refuse(policy, kind, reason, pending.pc, pending.address, pending.syn.wnr, pending.insn,
                           region.device if region is not None else "",
                           pending.syn.esr(EC_DABT_LOW, DFSC_TRANSLATION_L3)))

    # ----- reporting ----------------------------------------------------------------------------------------
    def _kvm_note(self, pc: int, insn: FetchedInsn, reason: str, handled: bool) -> None:
        key = (pc, insn.word)
        entry = self.stats.kvm_report.get(key)
        if entry is None:
            entry = self.stats.kvm_report[key] = KvmReportEntry(pc, insn.isa.name, insn.word, reason, handled)
        entry.count += 1

    def _trace(self, pending: PendingAccess, value: int, outcome: str, t0: int, t1: int) -> None:
        trace = self.vm.trace
        if trace is None:
            return
        device = pending.region.device if pending.region is not None else ""
        syn = pending.syn
        insn = pending.insn
        wb = syn.writeback
        trace.append(ExitRecord(
            seq=0, vcpu=self.vcpu.index, pc=pending.pc, isa=insn.isa.name, instruction=insn.word,
            insn_len=insn.length, address=pending.address, size=syn.size, is_write=syn.wnr, srt=syn.srt,
            sign_extend=syn.sse, sixty_four=syn.sf,
            writeback="" if wb is None else ("post" if wb.post_index else "pre"), value=value, device=device,
            outcome=outcome, latency_ns=t1 - t0,
            syndrome=syn.esr(EC_DABT_LOW, DFSC_TRANSLATION_L3),
        ))

    def _fold_latencies(self) -> None:
        """Move the buffered exit latencies into the histogram (latency_lock held: a full buffer, on the vCPU)."""
        with self._hist_lock:
            record = self.latency.record_value
            for ns in self._latencies:
                record(ns if ns > 0 else 1)
        del self._latencies[:]

    def fold_pending(self) -> None:
        """Move the buffered latencies into the histogram (any thread): the buffer is swapped under latency_lock,
        so the vCPU waits for no recording."""
        with self.latency_lock:
            if not self._latencies:
                return
            samples, self._latencies = self._latencies, array.array("q")
        with self._hist_lock:
            record = self.latency.record_value
            for ns in samples:
                record(ns if ns > 0 else 1)

    def latency_snapshot(self) -> HdrHistogram:
        copy = new_latency_histogram()
        self.fold_pending()
        with self._hist_lock:
            copy.add(self.latency)
        return copy

    # ----- decoding helpers -----------------------------------------------------------------------------------
    def _writeback_value(self, syn: Syndrome) -> int | None:
        wb = syn.writeback
        if wb is None:
            return None
        uc = self.vcpu.uc
        rm = self.arch.read_gpr(uc, wb.offset_reg) if wb.offset_reg is not None else 0
        return self.arch.read_base(uc, wb.rn) + wb.amount(rm, self.arch.carry_flag(uc))

    def _load_starts_in_ram(self, pc: int, address: int, size: int) -> bool:
        """Whether the load at ``pc`` that faulted at ``address``, where a RAM block ends, started in that RAM."""
        # A load right where RAM ends: run it once more with a read hook on the bytes before the
        # boundary to see where it starts. It faults again at once, so nothing retires.
        uc = self.vcpu.uc
        starts: list[int] = []

        def on_read(_uc: Uc, _access: int, start: int, _size: int, _value: int, _user: object) -> None:
            starts.append(start)

        context = uc.context_save()
        executed = self.vcpu.executed
        hook = uc.hook_add(UC_HOOK_MEM_READ, on_read, begin=address - size + 1, end=address - 1)
        try:
            uc.emu_start(self.arch.start_address(uc, pc), self.arch.never_pc, count=1)
        except UcError:
            pass
        finally:
            uc.hook_del(hook)
            uc.context_restore(context)
            self.vcpu.executed = executed
        return bool(starts)


def region_problem(region: RemoteRegion, address: int, size: int) -> str:
    """Why ``region`` cannot take this access as one bus transaction ("" when it can)."""
    if address + size > region.end:
        return (f"it straddles the end of {region.device} (0x{region.base:x}-0x{region.end - 1:x}); a bus "
                "error, like an access that no single device can answer")
    if size not in region.access_sizes:
        return f"{region.device} accepts accesses of {'/'.join(map(str, region.access_sizes))} bytes"
    return ""


class Foldable(Protocol):
    """Keeps latency samples in a buffer and folds them into histograms when asked (any thread)."""

    def fold_pending(self) -> None: ...


class _LatencyFolder:
    """One thread that folds buffered latencies (every exit path's, every VM's interrupts) into their histograms
    once a second, so a buffer stays small in a long run whose statistics nobody reads."""

    def __init__(self) -> None:
        self._paths: weakref.WeakSet[Foldable] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, path: Foldable) -> None:
        with self._lock:
            self._paths.add(path)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="latency-folder", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(1.0)
            with self._lock:
                paths = list(self._paths)
            for path in paths:
                path.fold_pending()


_FOLDER = _LatencyFolder()


def fold_every_second(owner: Foldable) -> None:
    """Have ``owner.fold_pending()`` called once a second for as long as ``owner`` lives."""
    _FOLDER.add(owner)
