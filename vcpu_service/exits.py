"""The exit path of one vCPU: decode the faulting instruction, forward the access, complete it.

This is KVM's io_mem_abort + kvm_handle_mmio_return, with the 2013 hand decoder for writeback forms
(without its defects) and QEMU's choice for what cannot be handled: a precise synchronous external
abort, or a stop, by policy. The arithmetic lives in the pure modules ``decode`` and ``completion``;
this module only reads and writes the vCPU's registers around them.
"""

from __future__ import annotations

import collections
import functools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from unicorn import UC_HOOK_MEM_READ, Uc, UcError

from mmiosplit.v1 import vcpu_pb2
from vcpu_service.arch import EC_DABT_LOW, ArchError, FetchedInsn
from vcpu_service.completion import load_value, store_data
from vcpu_service.decode import Decoded, Isa, Refused, Syndrome, decode
from vcpu_service.transport import (
    AccessReply,
    AccessStatus,
    DeadlineExceeded,
    MmioRequest,
    RemoteRegion,
    TransportError,
)

if TYPE_CHECKING:
    from vcpu_service.vcpu import Vcpu

# What KVM would see at stage 2: a data abort from the guest (a lower EL), translation fault level 3.
DFSC_TRANSLATION_L3 = 0x07


@functools.lru_cache(maxsize=4096)
def decode_cached(isa: Isa, word: int) -> Decoded:
    """Decoding is a pure function of the encoding, so cache it (the PC only locates the word)."""
    return decode(isa, word)


class VcpuFault(Exception):
    """Ends the run with an error event; carries the event fields."""

    def __init__(self, error_kind: int, reason: str, **fields: object) -> None:
        super().__init__(reason)
        self.error_kind = error_kind
        self.reason = reason
        self.fields = fields


@dataclass(slots=True)
class KvmReportEntry:
    """A PC whose device accesses upstream KVM/ARM could not handle (no instruction syndrome)."""

    pc: int
    isa: str
    instruction: int
    reason: str
    handled: bool  # True when mmiosplit hand-decoded it, False when it was refused
    count: int = 0


@dataclass(slots=True)
class ExitRecord:
    """One exit as the trace shows it."""

    seq: int
    vcpu: int
    pc: int
    isa: str
    instruction: int
    insn_len: int
    address: int
    size: int
    is_write: bool
    srt: int
    sign_extend: bool
    sixty_four: bool
    writeback: str
    value: int
    device: str
    outcome: str
    latency_ns: int
    syndrome: int


class TraceLog:
    """Every exit of a traced VM, kept so a reader that attaches late still gets the whole run."""

    def __init__(self) -> None:
        self._records: list[ExitRecord] = []
        self._cond = threading.Condition()
        self.closed = False

    def append(self, record: ExitRecord) -> None:
        with self._cond:
            record.seq = len(self._records) + 1
            self._records.append(record)
            if len(self._records) % 64 == 1:
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def follow(self, alive: Callable[[], bool], poll_s: float = 0.1) -> Iterator[list[ExitRecord]]:
        """Yield batches of records from the first until the log is closed and drained."""
        index = 0
        while True:
            with self._cond:
                if index >= len(self._records):
                    if self.closed or not alive():
                        return
                    self._cond.wait(poll_s)
                batch = self._records[index:]
                index += len(batch)
            if batch:
                yield batch


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
    by_region: collections.Counter[tuple[str, str, str]] = field(default_factory=collections.Counter)


class ExitPath:
    """Handles the data aborts of one vCPU; the vCPU thread calls ``handle`` after Unicorn faults."""

    def __init__(self, vcpu: Vcpu) -> None:
        self.vcpu = vcpu
        self.arch = vcpu.arch
        self.vm = vcpu.vm
        self.stats = ExitStats()

    # ----- posted stores without an exit -------------------------------------------------------------------
    def posted_store(self, region: RemoteRegion, key: tuple[str, str, str], address: int, size: int,
                     value: int) -> None:
        """Unicorn's write hook on a posted window: queue the store; the guest never stops for it.

        It runs once per guest store, so it is kept lean (``key`` is the region's counter key, built once).
        A posted write cannot be refused precisely (the store has retired, as on hardware where a bad
        posted write is an asynchronous SError), so a size the region does not take ends the run.
        """
        vcpu = self.vcpu
        if vcpu.kick_requested:
            vcpu.uc.emu_stop()  # stopped before this store retires: it runs again, and is queued, on resume
            return
        vcpu.in_posted_hook = True  # the posted-write watchdog never stops a vCPU from outside meanwhile
        try:
            self._post(region, key, address, size, value)
        finally:
            vcpu.in_posted_hook = False
            vcpu.posted_hooks_done += 1

    def _post(self, region: RemoteRegion, key: tuple[str, str, str], address: int, size: int, value: int) -> None:
        vcpu = self.vcpu
        if size not in region.access_sizes or address + size > region.end:
            raise VcpuFault(
                vcpu_pb2.VM_ERROR_KIND_DEVICE_ERROR,
                f"vCPU {vcpu.index}: posted {size}-byte write to 0x{address:x} in {region.device}: "
                f"{self._region_problem(region, address, size)}; a posted write has already retired, so the run "
                "ends (real hardware raises an asynchronous SError)",
                fault_address=address, device=region.device)
        # The hook sees the register value; the byte order is the data endianness now (a guest may switch it
        # with SETEND or SCTLR.EE/E0E between two stores without any exit in between).
        data = (value & ((1 << (size * 8)) - 1)).to_bytes(
            size, "big" if size > 1 and vcpu.posted_big_endian() else "little")
        self._queue_posted(region, key, address, data)

    def _queue_posted(self, region: RemoteRegion, key: tuple[str, str, str], address: int, data: bytes,
                      where: str = "", **fields: object) -> None:
        """Queue one posted write on the stream to its service (from the write hook or an exit) and count it.

        ``where`` and ``fields`` describe the access for an error: an exit knows its PC and instruction."""
        try:
            batch = self.vcpu.channel(region.service).post(address, data)
        except TransportError as exc:
            raise VcpuFault(vcpu_pb2.VM_ERROR_KIND_DEVICE_SERVICE,
                            f"vCPU {self.vcpu.index}: posted write to {where or f'0x{address:x}'}: {exc}",
                            fault_address=address, device=region.device, **fields) from None
        self.stats.by_region[key] += 1
        self.stats.posted_writes += 1
        if batch is not None:
            self._posted_batch_done(batch, region.device)

    def _posted_batch_done(self, batch: AccessReply, device: str) -> None:
        """A full batch went out: apply what it changed, and end the run if any write in it failed."""
        self.stats.posted_batches += 1
        self.vm.apply_mirror_changes(batch.mirror_changes)
        if batch.posted_errors:
            raise VcpuFault(vcpu_pb2.VM_ERROR_KIND_DEVICE_ERROR,
                            f"vCPU {self.vcpu.index}: " + "; ".join(batch.posted_errors), device=device)

    # ----- reporting ------------------------------------------------------------------------------------
    def _kvm_note(self, pc: int, insn: FetchedInsn, reason: str, handled: bool) -> None:
        key = (pc, insn.word)
        entry = self.stats.kvm_report.get(key)
        if entry is None:
            entry = self.stats.kvm_report[key] = KvmReportEntry(pc, insn.isa.name, insn.word, reason, handled)
        entry.count += 1

    def _trace(self, pc: int, insn: FetchedInsn, syn: Syndrome, address: int, value: int, device: str,
               outcome: str, t0: int) -> None:
        trace = self.vm.trace
        if trace is None:
            return
        wb = syn.writeback
        trace.append(ExitRecord(
            seq=0, vcpu=self.vcpu.index, pc=pc, isa=insn.isa.name, instruction=insn.word, insn_len=insn.length,
            address=address, size=syn.size, is_write=syn.wnr, srt=syn.srt, sign_extend=syn.sse, sixty_four=syn.sf,
            writeback="" if wb is None else ("post" if wb.post_index else "pre"), value=value, device=device,
            outcome=outcome, latency_ns=time.perf_counter_ns() - t0,
            syndrome=syn.esr(EC_DABT_LOW, DFSC_TRANSLATION_L3),
        ))

    # ----- failure handling ------------------------------------------------------------------------------
    def _fail(self, policy: int, error_kind: int, reason: str, pc: int, address: int, is_write: bool,
              insn: FetchedInsn, device: str = "", syndrome: int = 0) -> None:
        """Apply a fault policy: inject a precise external abort, or end the run."""
        fields = {"pc": pc, "fault_address": address, "instruction": insn.word, "device": device,
                  "syndrome": syndrome}
        if policy == vcpu_pb2.FAULT_POLICY_ABORT:
            try:
                vector = self.arch.inject_data_abort(self.vcpu.uc, pc, address, is_write, insn.length)
            except ArchError as exc:
                raise VcpuFault(error_kind, f"{reason}; and the external abort could not be injected: {exc}",
                                **fields) from None
            self.stats.aborts += 1
            self.vm.events.emit(vcpu_pb2.VM_EVENT_KIND_EXTERNAL_ABORT, vcpu_id=self.vcpu.index, error_kind=error_kind,
                                reason=f"{reason}; synchronous external abort injected, vector 0x{vector:x}",
                                **fields)
            return
        raise VcpuFault(error_kind, reason, **fields)

    # ----- the exit --------------------------------------------------------------------------------------
    def handle(self, pc: int, address: int, fault_is_write: bool, fault_size: int = 0) -> None:
        """One trapped access at pc; on return the vCPU may resume at its (possibly new) PC.

        ``address`` and ``fault_size`` are what Unicorn's unmapped-memory hook reported (0: unknown).
        """
        uc = self.vcpu.uc
        arch = self.arch
        policies = self.vm.policies
        t0 = time.perf_counter_ns()
        insn = arch.fetch(uc, pc)
        decoded = decode_cached(insn.isa, insn.word)
        where = f"0x{address:x} by the instruction 0x{insn.word:0{insn.length * 2}x} at pc 0x{pc:x}"
        who = f"vCPU {self.vcpu.index}"
        if isinstance(decoded, Syndrome) and decoded.cm:
            # Cache maintenance by address on device memory is a NOP, as KVM does ("the guest is just
            # being cautious").
            self.stats.nops += 1
            arch.advance(uc, pc, decoded.insn_len)
            return
        if insn.isa is Isa.A32 and not arch.condition_passed(uc, insn.word):
            # A conditional instruction may trap although it would not execute: no access, PC moves on.
            self.stats.nops += 1
            arch.advance(uc, pc, 4)
            return
        if isinstance(decoded, Refused):
            self._kvm_note(pc, insn, decoded.reason, handled=False)
            self._fail(policies.nisv, vcpu_pb2.VM_ERROR_KIND_NISV,
                       f"{who}: NISV: access to {where} has no usable instruction syndrome ({decoded.reason})",
                       pc, address, fault_is_write, insn,
                       syndrome=(EC_DABT_LOW << 26) | (1 << 25) | (int(fault_is_write) << 6) | DFSC_TRANSLATION_L3)
            return
        syn = decoded
        if not syn.isv:
            reason = "load/store with base writeback (ISV=0)"
            self._kvm_note(pc, insn, reason, handled=not self.vm.strict_kvm)
            if self.vm.strict_kvm:
                self._fail(policies.nisv, vcpu_pb2.VM_ERROR_KIND_NISV,
                           f"{who}: NISV: access to {where}: {reason}, refused in strict KVM mode",
                           pc, address, syn.wnr, insn, syndrome=syn.esr(EC_DABT_LOW, DFSC_TRANSLATION_L3))
                return
            self.stats.hand_decoded += 1
        size = syn.size
        syndrome = syn.esr(EC_DABT_LOW, DFSC_TRANSLATION_L3)
        # Everything the completion needs is read now, before the exit: registers cannot change meanwhile.
        new_base = self._writeback_value(syn)
        if self._split_from_ram(pc, address, syn, fault_size):
            ram_region = self.vm.find_region(address)
            device = ram_region.device if ram_region is not None else ""
            self._fail(policies.device_error, vcpu_pb2.VM_ERROR_KIND_DEVICE_ERROR,
                       f"{who}: {size}-byte access to {where}: it starts in RAM and straddles into "
                       f"{device or 'unmapped space'}; a bus error, like an access that no single device can answer",
                       pc, address, syn.wnr, insn, device, syndrome)
            return
        region = self.vm.find_region(address)
        if region is None:
            self._unmapped(pc, address, syn, insn, where, new_base, t0)
            return
        problem = self._region_problem(region, address, size)
        if problem:
            self._fail(policies.device_error, vcpu_pb2.VM_ERROR_KIND_DEVICE_ERROR, f"{who}: {size}-byte access to "
                       f"{where}: {problem}", pc, address, syn.wnr, insn, region.device, syndrome)
            return
        if not syn.wnr and self._shadow_read(pc, insn, syn, address, region, new_base, t0):
            return
        big_endian = size > 1 and arch.big_endian_data(uc)
        data = store_data(arch.read_gpr(uc, syn.srt), syn, big_endian) if syn.wnr else b""
        if syn.wnr and region.posted:
            self._queue_posted(region, (region.device, region.name, "posted_write"), address, data, where, pc=pc)
            self._retire(pc, syn, new_base)
            self._trace(pc, insn, syn, address, int.from_bytes(data, "little"), region.device, "posted", t0)
            return
        request = MmioRequest(self.vcpu.index, address, region, size, syn.wnr, data, syndrome, pc, insn.word)
        # Latency is measured from sending the exit to completing it (decoding before it is not part of it).
        sent = time.perf_counter_ns()
        try:
            reply = self.vcpu.exchange(region.service, request)
        except DeadlineExceeded as exc:
            self._fail(policies.deadline, vcpu_pb2.VM_ERROR_KIND_DEADLINE, f"{who}: access to {where}: {exc}",
                       pc, address, syn.wnr, insn, region.device, syndrome)
            return
        except TransportError as exc:
            self._fail(policies.device_error, vcpu_pb2.VM_ERROR_KIND_DEVICE_SERVICE,
                       f"{who}: access to {where}: {exc}", pc, address, syn.wnr, insn, region.device, syndrome)
            return
        if reply is None:
            return  # the run is ending: the completion is never applied
        self.vm.apply_mirror_changes(reply.mirror_changes)
        if reply.posted_errors:
            # Earlier posted writes cannot be made precise: the run ends and says which ones failed.
            raise VcpuFault(vcpu_pb2.VM_ERROR_KIND_DEVICE_ERROR, f"{who}: " + "; ".join(reply.posted_errors),
                            pc=pc, device=region.device)
        if reply.status is not AccessStatus.OK:
            kind = "write" if syn.wnr else "read"
            self._fail(policies.device_error, vcpu_pb2.VM_ERROR_KIND_DEVICE_ERROR,
                       f"{who}: {region.device} refused the {size}-byte {kind} of {where}: "
                       f"{reply.status.value}: {reply.error}", pc, address, syn.wnr, insn, region.device, syndrome)
            return
        value = int.from_bytes(data, "little")
        if not syn.wnr:
            try:
                value = load_value(reply.data, syn, big_endian)
            except ValueError as exc:
                self._fail(policies.device_error, vcpu_pb2.VM_ERROR_KIND_DEVICE_SERVICE,
                           f"{who}: completion for {where}: {exc}", pc, address, False, insn, region.device, syndrome)
                return
            arch.write_gpr(uc, syn.srt, value)
            self.stats.reads += 1
        else:
            self.stats.writes += 1
        self._retire(pc, syn, new_base)
        self.stats.exits += 1
        self.stats.by_region[region.device, region.name, "write" if syn.wnr else "read"] += 1
        self.vcpu.record_latency(time.perf_counter_ns() - sent)
        self._trace(pc, insn, syn, address, value, region.device, "ok", sent)

    def _shadow_read(self, pc: int, insn: FetchedInsn, syn: Syndrome, address: int, region: RemoteRegion,
                     new_base: int | None, t0: int) -> bool:
        """Complete a load of a shadow register from the VM's copy, as a completion would, without an exit.

        Only when the copy holds that exact register and size, and no posted write to the service waits:
        those go first, with a real exit, so the read sees what they did.
        """
        shadow = self.vm.shadows.lookup(address, syn.size)
        if shadow is None or self.vcpu.channel(region.service).pending_posted():
            return False
        uc = self.vcpu.uc
        value = load_value(shadow, syn, syn.size > 1 and self.arch.big_endian_data(uc))
        self.arch.write_gpr(uc, syn.srt, value)
        self._retire(pc, syn, new_base)
        self.stats.by_region[region.device, region.name, "shadow_read"] += 1
        self.stats.shadow_reads += 1
        self._trace(pc, insn, syn, address, value, region.device, "shadow", t0)
        return True

    def _writeback_value(self, syn: Syndrome) -> int | None:
        wb = syn.writeback
        if wb is None:
            return None
        uc = self.vcpu.uc
        rm = self.arch.read_gpr(uc, wb.offset_reg) if wb.offset_reg is not None else 0
        return self.arch.read_base(uc, wb.rn) + wb.amount(rm, self.arch.carry_flag(uc))

    def _retire(self, pc: int, syn: Syndrome, new_base: int | None) -> None:
        """The rest of the completion: base writeback (once, here), then PC past the instruction."""
        if new_base is not None and syn.writeback is not None:
            self.arch.write_base(self.vcpu.uc, syn.writeback.rn, new_base)
        self.arch.advance(self.vcpu.uc, pc, syn.insn_len)

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
        if syn.wnr or address & 0xFFF or self.vm._ram_block(address - 1, 1) is None:
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

    @staticmethod
    def _region_problem(region: RemoteRegion, address: int, size: int) -> str:
        if address + size > region.end:
            return (f"it straddles the end of {region.device} (0x{region.base:x}-0x{region.end - 1:x}); a bus "
                    "error, like an access that no single device can answer")
        if size not in region.access_sizes:
            return f"{region.device} accepts accesses of {'/'.join(map(str, region.access_sizes))} bytes"
        return ""

    def _unmapped(self, pc: int, address: int, syn: Syndrome, insn: FetchedInsn, where: str, new_base: int | None,
                  t0: int) -> None:
        policy = self.vm.policies.unmapped_access
        reason = f"vCPU {self.vcpu.index}: access to {where}: no device or RAM at that address"
        if policy == vcpu_pb2.UNMAPPED_ACCESS_POLICY_RAZ_WI:
            if not syn.wnr:
                self.arch.write_gpr(self.vcpu.uc, syn.srt, 0)
            self._retire(pc, syn, new_base)
            self._trace(pc, insn, syn, address, 0, "", "unmapped (RAZ/WI)", t0)
            return
        fault = (vcpu_pb2.FAULT_POLICY_ABORT if policy == vcpu_pb2.UNMAPPED_ACCESS_POLICY_ABORT
                 else vcpu_pb2.FAULT_POLICY_STOP)
        self._fail(fault, vcpu_pb2.VM_ERROR_KIND_UNMAPPED_ACCESS, reason, pc, address, syn.wnr, insn,
                   syndrome=syn.esr(EC_DABT_LOW, DFSC_TRANSLATION_L3))
