"""The exit path of one vCPU, shaped like KVM_RUN: ``begin`` a trapped access, let the loop exchange it, then
``complete`` it.

``begin`` is KVM's ``io_mem_abort``: decode the faulting instruction (the 2013 hand decoder for writeback forms,
without its defects), try the in-process handlers (``handlers``: shadow registers, posted writes, the unmapped
policy, later the GIC), and return an action. It never blocks and never calls back into the loop.
``complete`` is ``kvm_handle_mmio_return``: apply a completion (Rt with its sign and width, base writeback, PC,
and everything the completion carries: ROMD mirror changes, shadow values, failed posted writes). It is the
one place those side effects happen. What cannot be handled gets QEMU's answer by policy: a precise
synchronous external abort, or a stop. The arithmetic lives in the pure modules ``decode`` and ``completion``.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from hdrh.histogram import HdrHistogram
from unicorn import UC_HOOK_MEM_READ, Uc, UcError

from mmiosplit.mmio import (
    Completion,
    CompletionStatus,
    DeadlineExceeded,
    MirrorChange,
    MmioExit,
    RemoteRegion,
    TransportError,
)
from vcpu_service.arch import EC_DABT_LOW, Arch, ArchError, FetchedInsn
from vcpu_service.completion import load_value, store_data
from vcpu_service.decode import Decoded, Isa, Refused, Syndrome, decode
from vcpu_service.domain import ErrorKind, EventKind, FaultPolicy, KvmReportEntry, LatencySummary, Policies
from vcpu_service.events import EventLog
from vcpu_service.handlers import QUEUED, Abort, Access, HandlerRegistry, PostedWriteLost, PostedWrites, VcpuLink
from vcpu_service.shadows import ShadowTable
from vcpu_service.tracelog import ExitRecord, TraceLog

# What KVM would see at stage 2: a data abort from the guest (a lower EL), translation fault level 3.
DFSC_TRANSLATION_L3 = 0x07


@functools.lru_cache(maxsize=4096)
def decode_cached(isa: Isa, word: int) -> Decoded:
    """Decoding is a pure function of the encoding, so cache it (the PC only locates the word)."""
    return decode(isa, word)


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

    def in_ram(self, address: int, length: int) -> bool: ...
    def apply_mirror_changes(self, changes: Iterable[MirrorChange]) -> None: ...


class VcpuView(VcpuLink, Protocol):
    """What the exit path needs of its vCPU: the CPU, its VM, its streams."""

    uc: Uc
    executed: int

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
    where: str
    exit: MmioExit | None = None  # what to forward (Forward only)
    sent_ns: int = 0  # when the loop sent the exit; exit latency runs from here


@dataclass(frozen=True, slots=True)
class Skip:
    """The instruction makes no access (cache maintenance by address, a failed A32 condition): PC moves on."""

    pc: int
    length: int


@dataclass(frozen=True, slots=True)
class Refuse:
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


@dataclass(frozen=True, slots=True)
class CompleteNow:
    """An in-process handler answered: complete without an exit. ``kind`` names the handler."""

    pending: PendingAccess
    completion: Completion
    kind: str


@dataclass(frozen=True, slots=True)
class Forward:
    """Send ``pending.exit`` to its device service; the loop does the exchange, then calls ``complete``."""

    pending: PendingAccess


Action = Skip | Refuse | CompleteNow | Forward


class ExitPath:
    """The data aborts of one vCPU: ``begin`` on the vCPU thread after Unicorn faults, ``complete`` after."""

    def __init__(self, vcpu: VcpuView) -> None:
        self.vcpu = vcpu
        self.arch = vcpu.arch
        self.vm = vcpu.vm
        self.stats = ExitStats()
        self.latency = new_latency_histogram()
        # HdrHistogram is not thread-safe: the vCPU records, GetStats copies, both under this lock.
        self.latency_lock = threading.Lock()

    # ----- begin --------------------------------------------------------------------------------------------
    def begin(self, pc: int, address: int, fault_is_write: bool, fault_size: int = 0) -> Action:
        """Decode the access Unicorn trapped at ``pc`` and decide what happens to it.

        ``address`` and ``fault_size`` are what Unicorn's unmapped-memory hook reported (0: unknown).
        """
        t0 = time.perf_counter_ns()
        uc = self.vcpu.uc
        arch = self.arch
        insn = arch.fetch(uc, pc)
        decoded = decode_cached(insn.isa, insn.word)
        if isinstance(decoded, Syndrome) and decoded.cm:
            # Cache maintenance by address on device memory is a NOP, as KVM does ("the guest is just
            # being cautious").
            return Skip(pc, decoded.insn_len)
        if insn.isa is Isa.A32 and not arch.condition_passed(uc, insn.word):
            # A conditional instruction may trap although it would not execute: no access, PC moves on.
            return Skip(pc, 4)
        where = f"0x{address:x} by the instruction 0x{insn.word:0{insn.length * 2}x} at pc 0x{pc:x}"
        who = f"vCPU {self.vcpu.index}"
        policies = self.vm.policies
        if isinstance(decoded, Refused):
            self._kvm_note(pc, insn, decoded.reason, handled=False)
            return Refuse(policies.nisv, ErrorKind.NISV,
                          f"{who}: NISV: access to {where} has no usable instruction syndrome ({decoded.reason})",
                          pc, address, fault_is_write, insn,
                          syndrome=(EC_DABT_LOW << 26) | (1 << 25) | (int(fault_is_write) << 6) | DFSC_TRANSLATION_L3)
        syn = decoded
        syndrome = syn.esr(EC_DABT_LOW, DFSC_TRANSLATION_L3)
        if not syn.isv:
            reason = "load/store with base writeback (ISV=0)"
            self._kvm_note(pc, insn, reason, handled=not self.vm.strict_kvm)
            if self.vm.strict_kvm:
                return Refuse(policies.nisv, ErrorKind.NISV,
                              f"{who}: NISV: access to {where}: {reason}, refused in strict KVM mode",
                              pc, address, syn.wnr, insn, syndrome=syndrome)
            self.stats.hand_decoded += 1
        size = syn.size
        new_base = self._writeback_value(syn)
        slot = self.vm.handlers.lookup(address)
        if self._split_from_ram(pc, address, syn, fault_size):
            device = slot.region.device if slot is not None and slot.region is not None else ""
            return Refuse(policies.device_error, ErrorKind.DEVICE_ERROR,
                          f"{who}: {size}-byte access to {where}: it starts in RAM and straddles into "
                          f"{device or 'unmapped space'}; a bus error, like an access that no single device can "
                          "answer", pc, address, syn.wnr, insn, device, syndrome)
        region = slot.region if slot is not None else None
        if region is not None:
            problem = region_problem(region, address, size)
            if problem:
                return Refuse(policies.device_error, ErrorKind.DEVICE_ERROR,
                              f"{who}: {size}-byte access to {where}: {problem}", pc, address, syn.wnr, insn,
                              region.device, syndrome)
        big_endian = size > 1 and arch.big_endian_data(uc)
        data = store_data(arch.read_gpr(uc, syn.srt), syn, big_endian) if syn.wnr else b""
        pending = PendingAccess(pc, insn, syn, address, region, data, big_endian, new_base, t0, where)
        access = Access(self.vcpu.index, address, size, syn.wnr, data, region)
        handlers = slot.handlers if slot is not None else (self.vm.handlers.unmapped,)
        for handler in handlers:
            try:
                answer = handler.handle(access, self.vcpu)
            except PostedWriteLost as exc:
                raise VcpuFault(ErrorKind.DEVICE_SERVICE, f"{who}: {exc}", pc=pc, fault_address=address,
                                instruction=insn.word, device=exc.device) from None
            if answer is None:
                continue
            if isinstance(answer, Abort):
                return Refuse(answer.policy, answer.error_kind, f"{who}: access to {where}: {answer.reason}", pc,
                              address, syn.wnr, insn, answer.device, syndrome)
            return CompleteNow(pending, answer, handler.kind)
        assert region is not None, "an in-process device's handler must answer every access"
        pending.exit = MmioExit(self.vcpu.index, address, size, syn.wnr, data, region.device, region.name,
                                address - region.base, syndrome, pc, insn.word)
        return Forward(pending)

    # ----- complete -----------------------------------------------------------------------------------------
    def settle(self, action: Skip | Refuse | CompleteNow) -> None:
        """Carry out an action that needs no device service (none of them waits)."""
        if isinstance(action, CompleteNow):
            self.complete(action.pending, action.completion, action.kind)
        elif isinstance(action, Skip):
            self.stats.nops += 1
            self.arch.advance(self.vcpu.uc, action.pc, action.length)
        else:
            self.refuse(action)

    def complete(self, pending: PendingAccess, result: Completion | TransportError, kind: str = "exit") -> None:
        """Apply the answer to ``pending`` (from its device service, or from an in-process handler ``kind``).

        The one place completion side effects happen: ROMD mirrors, shadow values, failed posted writes, then Rt
        (sign, width, byte order), base writeback and PC, exactly once. A failure applies its fault policy.
        """
        syn = pending.syn
        region = pending.region
        device = region.device if region is not None else ""
        who = f"vCPU {self.vcpu.index}"
        policies = self.vm.policies
        if isinstance(result, TransportError):
            deadline = isinstance(result, DeadlineExceeded)
            self._refuse_pending(pending, policies.deadline if deadline else policies.device_error,
                                 ErrorKind.DEADLINE if deadline else ErrorKind.DEVICE_SERVICE,
                                 f"{who}: access to {pending.where}: {result}")
            return
        if result.has_effects:
            try:
                self.apply_effects(result, device, pc=pending.pc)
            except TransportError as exc:
                self._refuse_pending(pending, policies.device_error, ErrorKind.DEVICE_SERVICE,
                                     f"{who}: access to {pending.where}: {exc}")
                return
        if result.status is not CompletionStatus.OK:
            direction = "write" if syn.wnr else "read"
            self._refuse_pending(pending, policies.device_error, ErrorKind.DEVICE_ERROR,
                                 f"{who}: {device} refused the {syn.size}-byte {direction} of {pending.where}: "
                                 f"{result.status.value}: {result.error}")
            return
        uc = self.vcpu.uc
        stats = self.stats
        if syn.wnr:
            value = int.from_bytes(pending.data, "little")
        else:
            try:
                value = load_value(result.data, syn, pending.big_endian)
            except ValueError as exc:
                self._refuse_pending(pending, policies.device_error, ErrorKind.DEVICE_SERVICE,
                                     f"{who}: completion for {pending.where}: {exc}")
                return
            self.arch.write_gpr(uc, syn.srt, value)
        if pending.new_base is not None and syn.writeback is not None:
            self.arch.write_base(uc, syn.writeback.rn, pending.new_base)
        self.arch.advance(uc, pending.pc, syn.insn_len)
        if kind == "exit":
            assert region is not None
            now = time.perf_counter_ns()
            stats.exits += 1
            if syn.wnr:
                stats.writes += 1
                stats.by_region[region.device, region.name, "write"] += 1
            else:
                stats.reads += 1
                stats.by_region[region.device, region.name, "read"] += 1
            with self.latency_lock:
                self.latency.record_value(max(1, now - pending.sent_ns))
            self._trace(pending, value, device, "ok", pending.sent_ns, now)
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
        self._trace(pending, value, device, kind, pending.started_ns, time.perf_counter_ns())

    def apply_effects(self, completion: Completion, device: str, pc: int = 0) -> None:
        """What a completion (of an exit, a posted batch or a flush) changed besides the access itself.

        Mirror changes and shadow values the VM cannot accept raise TransportError; failed posted writes end
        the run (they retired long ago, so they cannot be made precise).
        """
        if completion.mirror_changes:
            self.vm.apply_mirror_changes(completion.mirror_changes)
        for change in completion.shadows:
            self.vm.shadows.apply(change)
        if completion.posted_errors:
            fields: dict[str, object] = {"device": device}
            if pc:
                fields["pc"] = pc
            raise VcpuFault(ErrorKind.DEVICE_ERROR, f"vCPU {self.vcpu.index}: " + "; ".join(completion.posted_errors),
                            **fields)

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
            batch = PostedWrites.queue(self.vcpu, region, address, data)
        except PostedWriteLost as exc:
            raise VcpuFault(ErrorKind.DEVICE_SERVICE, f"vCPU {self.vcpu.index}: {exc}", fault_address=address,
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
                vector = self.arch.inject_data_abort(self.vcpu.uc, action.pc, action.address, action.is_write,
                                                     action.insn.length)
            except ArchError as exc:
                raise VcpuFault(action.error_kind,
                                f"{action.reason}; and the external abort could not be injected: {exc}",
                                **fields) from None
            self.stats.aborts += 1
            self.vm.events.emit(EventKind.EXTERNAL_ABORT,
                                f"{action.reason}; synchronous external abort injected, vector 0x{vector:x}",
                                vcpu_id=self.vcpu.index, error_kind=action.error_kind, pc=action.pc,
                                fault_address=action.address, instruction=action.insn.word, device=action.device,
                                syndrome=action.syndrome)
            return
        raise VcpuFault(action.error_kind, action.reason, **fields)

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

    def _trace(self, pending: PendingAccess, value: int, device: str, outcome: str, t0: int, t1: int) -> None:
        trace = self.vm.trace
        if trace is None:
            return
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

    def latency_snapshot(self) -> HdrHistogram:
        copy = new_latency_histogram()
        with self.latency_lock:
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

    def _split_from_ram(self, pc: int, address: int, syn: Syndrome, fault_size: int) -> bool:
        """Whether Unicorn faulted on the part past the end of RAM of an access that starts in RAM.

        Unicorn splits an access that crosses from mapped RAM into unmapped space at the page boundary: a
        store goes on byte by byte (the hook last reports a 1-byte write past the boundary), a load faults
        on its second, size-aligned half with the full size. The hook's address is then not where the
        access starts; forwarding it would give the device an access the guest never made and complete
        Rt with the device's bytes alone.
        """
        if syn.size == 1 or not fault_size:
            return False
        if fault_size != syn.size:
            return True  # a store split into bytes
        if syn.wnr or address & 0xFFF or not self.vm.in_ram(address - 1, 1):
            return False
        # A load right where RAM ends: run it once more with a read hook on the bytes before the
        # boundary to see where it starts. It faults again at once, so nothing retires.
        uc = self.vcpu.uc
        starts: list[int] = []

        def on_read(_uc: Uc, _access: int, start: int, _size: int, _value: int, _user: object) -> None:
            starts.append(start)

        context = uc.context_save()
        executed = self.vcpu.executed
        hook = uc.hook_add(UC_HOOK_MEM_READ, on_read, begin=address - syn.size + 1, end=address - 1)
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
