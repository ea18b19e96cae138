"""One vCPU: a thread running Unicorn in a loop, taking device accesses as MMIO exits (KVM_RUN's role).

The loop is thin glue: ``exits.ExitPath`` handles each trapped access, PSCI is decided in ``psci``,
and this module owns the thread, the run states and Unicorn. Unicorn is only ever stopped on an
instruction or block boundary: device regions are unmapped, so an access ends ``emu_start`` with PC
exactly on the faulting instruction and nothing of it retired.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from unicorn import (
    UC_CTL_IO_WRITE,
    UC_CTL_TLB_FLUSH,
    UC_ERR_INSN_INVALID,
    UC_ERR_READ_PROT,
    UC_ERR_READ_UNMAPPED,
    UC_ERR_WRITE_PROT,
    UC_ERR_WRITE_UNMAPPED,
    UC_HOOK_BLOCK,
    UC_HOOK_CODE,
    UC_HOOK_INSN,
    UC_HOOK_INTR,
    UC_HOOK_MEM_FETCH_PROT,
    UC_HOOK_MEM_READ_PROT,
    UC_HOOK_MEM_UNMAPPED,
    UC_HOOK_MEM_WRITE_PROT,
    UC_MEM_FETCH_PROT,
    UC_MEM_FETCH_UNMAPPED,
    UC_MEM_WRITE_PROT,
    UC_MEM_WRITE_UNMAPPED,
    UC_PROT_ALL,
    UC_PROT_EXEC,
    UC_PROT_NONE,
    UC_PROT_READ,
    UC_PROT_WRITE,
    Uc,
    UcError,
    arm64_const,
)

from mmiosplit.mmio import (
    Completion,
    DeviceEndpoint,
    DeviceRestarted,
    ExitChannel,
    RemoteRegion,
    ServiceLost,
    TransportError,
)
from vcpu_service import exceptions, fastreg, gentimer, psci
from vcpu_service.arch import EXCEPTION_NAMES, EXCP_HVC, SCTLR_EE_E0E, AArch64, Arch, ArchError, close_uc
from vcpu_service.cp15trap import TimerTrap
from vcpu_service.domain import ErrorKind, EventKind
from vcpu_service.exceptions import irq_masked, take_irq
from vcpu_service.exits import ExitPath, Forward, PendingAccess, Split, VcpuFault, VmView
from vcpu_service.gentimer import GenericTimer
from vcpu_service.interrupts import Ticker, VcpuTimer
from vcpu_service.memory import Mirror, RamBlock

if TYPE_CHECKING:
    from hdrh.histogram import HdrHistogram
    from unicorn.unicorn_py3 import UcContext

    from vcpu_service.gic import Gic


_MPIDR_EL1 = (3, 0, 0, 0, 5)

#: Timer registers an EL1 MSR writes through the model; the rest (counters, CNTVOFF_EL2) UNDEF as in QEMU.
_TIMER_WRITABLE = frozenset(n for n, info in gentimer.REGISTERS.items() if info.writable and n != "CNTVOFF_EL2")
_TIMER_READABLE = frozenset(n for n in gentimer.REGISTERS if n != "CNTVOFF_EL2")


class VcpuState(enum.Enum):
    OFF = "off"
    STARTING = "starting"
    RUNNING = "running"
    EXIT_WAIT = "exit pending"
    PAUSED = "paused"
    HALTED = "halted (WFI)"
    SLEEPING = "waiting for an interrupt (WFI)"
    STOPPED = "stopped"


# States in which nothing touches the vCPU's Unicorn instance, so registers can be read.
QUIESCENT = frozenset({VcpuState.OFF, VcpuState.EXIT_WAIT, VcpuState.PAUSED, VcpuState.HALTED, VcpuState.SLEEPING,
                       VcpuState.STOPPED})


class VmLink(VmView, Protocol):
    """What a vCPU needs of its VM (``vm.Vm``): shared RAM and mirrors, the device services, run control."""

    @property
    def vm_id(self) -> str: ...
    @property
    def arch(self) -> Arch: ...
    @property
    def cpu_model(self) -> str: ...
    @property
    def lock(self) -> threading.RLock: ...
    @property
    def ram(self) -> list[RamBlock]: ...
    @property
    def endpoints(self) -> list[DeviceEndpoint]: ...
    @property
    def instruction_budget(self) -> int: ...
    @property
    def posted_windows(self) -> list[tuple[RemoteRegion, RamBlock]]: ...
    @property
    def has_posted(self) -> bool: ...
    @property
    def map_generation(self) -> int: ...
    @property
    def mirrors(self) -> dict[tuple[str, str, str], Mirror]: ...
    @property
    def gic(self) -> Gic | None: ...
    @property
    def vcpus(self) -> list[Vcpu]: ...
    @property
    def ticker(self) -> Ticker | None: ...

    def counter_ns(self) -> int:
        """The board's system counter clock (ns since the VM was made), for the generic timers."""
        ...

    def patched_since(self, generation: int) -> list[tuple[int, int]] | None: ...
    def psci_cpu_on(self, caller: int, target_mpidr: int, entry: int, context: int) -> int: ...
    def psci_affinity_info(self, target_mpidr: int) -> int: ...
    def request_reset(self, caller: int, pc: int) -> None: ...
    def check_idle(self) -> None: ...
    def device_restarted(self, service: str, restart: DeviceRestarted, vcpu_id: int) -> None: ...
    def fail(self, error_kind: ErrorKind, reason: str, **fields: object) -> None: ...
    def finish(self, kind: EventKind, **fields: object) -> None: ...


class _PostedWatch:
    """One thread that makes vCPUs send posted writes that have waited: once the guest has run 2 ms of
    CPU without posting, or every 20-25 ms while it posts without filling a batch. A kicked vCPU ends its slice, which
    sends what is queued (without waiting for the completion)."""

    PERIOD_S = 0.005
    QUIET_CPU_S = 0.002
    FLUSH_PERIODS = 4

    def __init__(self) -> None:
        self._vcpus: set[Vcpu] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, vcpu: Vcpu) -> None:
        if vcpu in self._vcpus:
            return
        with self._lock:
            self._vcpus.add(vcpu)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="posted-write-watchdog", daemon=True)
                self._thread.start()

    def remove(self, vcpu: Vcpu) -> None:
        with self._lock:
            self._vcpus.discard(vcpu)

    def _run(self) -> None:
        # vCPU -> (posted stores seen, its thread's CPU time when that count last changed, periods waiting)
        seen: dict[Vcpu, tuple[int, float, int]] = {}
        while True:
            time.sleep(self.PERIOD_S)
            with self._lock:
                vcpus = list(self._vcpus)
            running = [v for v in vcpus if v.state is VcpuState.RUNNING and v.cpu_clock is not None]
            for v in running:
                count = v.posted_hooks_done
                cpu = time.clock_gettime(v.cpu_clock)  # type: ignore[arg-type]
                last, since, waiting = seen.get(v, (-1, cpu, 0))
                if count != last or v.in_posted_hook:
                    since = cpu
                # Quiet: the vCPU's own thread ran QUIET_CPU_S of CPU, outside the write hook, since a posted
                # store last completed its hook. Wall time would not do: a thread descheduled right after a
                # hook, before Unicorn's check after that store, must not count as quiet (see kick).
                quiet = cpu - since >= self.QUIET_CPU_S
                waiting = waiting + 1 if v.has_pending_posted() else 0
                # Queued writes go out when the guest stops posting, or every FLUSH_PERIODS while it
                # keeps posting without filling a batch; a kick ends the slice, which sends them.
                if waiting and (quiet or waiting >= self.FLUSH_PERIODS):
                    v.kick()
                    waiting = 0
                seen[v] = (count, since, waiting)
                # A kick the write hook has not honoured (the guest stopped posting) is delivered from outside.
                if v.kick_requested and quiet:
                    v.kick()
            for v in set(seen) - set(running):
                del seen[v]


_POSTED_WATCH = _PostedWatch()


@dataclass(slots=True)
class _StopCause:
    kind: str
    detail: str = ""
    intno: int = 0
    pc: int = 0
    raised: exceptions.Raised | None = None  # a guest exception's syndrome, read in the hook (exceptions.raised)


class Vcpu:
    """A vCPU thread and its Unicorn instance. All state changes happen under the VM's lock."""

    def __init__(self, vm: VmLink, index: int) -> None:
        self.vm = vm
        self.index = index
        self.arch = vm.arch
        self.cond = threading.Condition(vm.lock)
        self.state = VcpuState.OFF
        self.pause_req = False
        self.stop_req = False
        # Set while a system reset gathers every vCPU back to OFF.
        self.off_req = False
        self._power_on: tuple[int, int] | None = None
        # Set by kick() on a vCPU with posted windows; cleared when a slice starts.
        self.kick_requested = False
        self.cpu_clock: int | None = None  # the vCPU thread's CPU-time clock, for the posted-write watchdog
        self.in_posted_hook = False
        self.posted_hooks_done = 0
        self._thread: threading.Thread | None = None
        self._channels: dict[str, ExitChannel] = {}
        # Device services going away whose exit streams this vCPU must close (``release_channel``).
        self._release: set[str] = set()
        self._stop_cause: _StopCause | None = None
        self._fault: tuple[int, int, int, int] | None = None
        self._fault_context: UcContext | None = None
        self.executed = 0
        self.psci_calls = 0
        self.exceptions_taken = 0
        self._last_taken: exceptions.Taken | None = None  # the last synchronous exception entered
        self._loop_origin: exceptions.Taken | None = None  # what started a run of exceptions at their own vector
        self._exception_loop = 0
        self._refault: tuple[int, str, int, int | None] | None = None  # the last exception's origin and cause
        self._refaults = 0
        self._hint_pc: int | None = None  # where an AArch32 YIELD/WFE last ended emu_start (see _on_invalid_a32)
        self.exits = ExitPath(self)
        #: MPIDR as QEMU's virt gives CPU n (bit 31 RES1, affinity as ``psci.mpidr_to_vcpu`` reads it back).
        self.mpidr = 0x8000_0000 | psci.vcpu_affinity(index)
        # The GIC's IRQ and FIQ outputs to this CPU (``irq_signal``), and its generic timer (virt only).
        self.irq_line = False
        self.fiq_line = False
        self.irqs_taken = 0
        gic, ticker = vm.gic, vm.ticker
        self.timer: VcpuTimer | None = None
        if gic is not None and ticker is not None:
            self.timer = VcpuTimer(index, gic, vm.counter_ns, ticker.reschedule)
        self.uc = self._new_uc()

    # ----- setup -------------------------------------------------------------------------------------
    def _new_uc(self) -> Uc:
        uc = self.arch.new_uc(self.vm.cpu_model)
        for block in self.vm.ram:
            uc.mem_map_ptr(block.base, block.size, UC_PROT_ALL, block.address)
        self._raw_hooks: list[object] = []  # ctypes callbacks libunicorn holds: keep them alive
        self._stopper = fastreg.SafeStop(uc)  # how other threads stop this vCPU (see kick)
        self._hook_error: BaseException | None = None
        self._unmask_hook: int | None = None  # the block hook watching for PSTATE to unmask a signalled IRQ
        self._unmask_blocks = 0
        self._unmask_exhausted = False
        self._cp15: TimerTrap | None = None  # AArch32's timer accesses (AArch64 has MRS/MSR hooks)
        # Device regions are unmapped. ROMD mirrors: a write always exits like MMIO; a read exits while the
        # device traps everything.
        self._raw_hooks.append(fastreg.hook_mem_invalid(
            uc, UC_HOOK_MEM_UNMAPPED | UC_HOOK_MEM_WRITE_PROT | UC_HOOK_MEM_READ_PROT | UC_HOOK_MEM_FETCH_PROT,
            self._on_unmapped, self._on_hook_error))
        uc.hook_add(UC_HOOK_INTR, self._on_interrupt)
        self._mapped_mirrors: set[tuple[str, str, str]] = set()
        self._mirror_prot: dict[tuple[str, str, str], bool] = {}
        self._trapping = False
        self._map_generation = -1
        if self.vm.instruction_budget:
            uc.hook_add(UC_HOOK_CODE, self._on_instruction)
        self._sctlr: int | None = None  # SCTLR_EL1 as an access last read it; any MSR drops it
        self._data_big_endian: bool | None = None  # the endianness it gives when EE and E0E agree
        self._a64 = isinstance(self.arch, AArch64)
        if self._a64:
            # Every access of more than a byte needs the data endianness (SCTLR_EL1.EE/E0E), which changes only by
            # MSR: it is cached and any MSR drops the cache (a Python call per MSR, which guests execute rarely,
            # against a CP-register read on every exit and every posted store).
            uc.hook_add(UC_HOOK_INSN, self._on_msr, None, 1, 0, arm64_const.UC_ARM64_INS_MSR)
            if self.timer is not None or self.index:
                # The generic timer's registers are answered by the model (Unicorn 2.1.4 drops CTL and CVAL
                # writes), and MPIDR_EL1 by the vCPU (Unicorn's one CPU is always CPU 0); every MRS reaches this
                # hook, so a Python call per MRS on a board with a timer.
                uc.hook_add(UC_HOOK_INSN, self._on_mrs, None, 1, 0, arm64_const.UC_ARM64_INS_MRS)
        else:
            self._cp15 = None if self.timer is None else TimerTrap(
                uc, self.arch, self.timer.read, self.timer.write, _TIMER_READABLE, _TIMER_WRITABLE)
        if not self._a64 and self.index:
            # AArch32 has no MRS hook, but with EL2 present an MRC of MPIDR at PL1 reads VMPIDR (QEMU's mpidr_read).
            exceptions.cp15_write(uc, 0, 0, 5, self.mpidr, opc1=4)
        for region, sink in self.vm.posted_windows:
            # Stores land in a sink nobody reads and are queued by the hook; loads fault on the missing
            # read permission and exit. Any write hook sends all loads and stores through Unicorn's slow
            # path, where permissions are always checked, so a stale TLB entry cannot serve a load.
            uc.mem_map_ptr(region.base, region.size, UC_PROT_WRITE, sink.address)
            store = functools.partial(self._posted_store, region, (region.device, region.name, "posted_write"))
            self._raw_hooks.append(fastreg.hook_mem_write(uc, store, self._on_hook_error, region.base, region.end - 1))
        return uc

    def reinit(self) -> None:
        """Back to the architectural reset state (PSCI SYSTEM_RESET): a fresh CPU on the same RAM."""
        old = self.uc
        self.uc = self._new_uc()
        close_uc(old)
        self._last_taken = self._loop_origin = self._hint_pc = None  # exceptions taken before the reset
        self._exception_loop = 0
        self._refault, self._refaults = None, 0

    def start_thread(self) -> None:
        self._thread = threading.Thread(target=self._thread_main, name=f"vcpu{self.index}", daemon=True)
        self._thread.start()

    def thread_alive_elsewhere(self) -> bool:
        """The vCPU thread still runs and is not the caller (a vCPU may end the VM itself)."""
        t = self._thread
        return t is not None and t.is_alive() and t is not threading.current_thread()

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def power_on(self, entry: int, context: int) -> None:
        """Called with the VM lock held: start this vCPU at entry with x0/r0 = context."""
        self._power_on = (entry, context)
        self.state = VcpuState.STARTING
        self.cond.notify_all()

    def kick(self) -> None:
        """Ask Unicorn to return soon, with every instruction either done once or not started (any thread).

        ``uc_emu_stop`` alone is not safe from outside: Unicorn checks for a stop after every load and store and
        resumes *at* that instruction, so a load into its own base register or a store-exclusive would run twice.
        ``fastreg.SafeStop`` stops at the next translation-block boundary instead. A vCPU with posted windows is
        also stopped by its own write hook before it queues the next posted store (``_posted_store``).
        """
        if self.vm.posted_windows:
            self.kick_requested = True  # the write hook also stops at the next posted store, before queueing it
        self._stopper.request()

    # ----- hooks (run on this vCPU's thread, inside emu_start) -----------------------------------------
    def _posted_store(self, region: RemoteRegion, key: tuple[str, str, str], address: int, size: int,
                      value: int) -> None:
        """Unicorn's write hook on an exit-free posted window: the exit path queues the store.

        A kick is taken here, before the write is queued (see ``kick``): stopped before this store retires,
        it runs again, and is queued, on resume.
        """
        if self.kick_requested:
            self.uc.emu_stop()
            return
        self.in_posted_hook = True  # the posted-write watchdog never stops a vCPU from outside meanwhile
        try:
            self.exits.post_store(region, key, address, size, value, self.big_endian_data())
        finally:
            self.in_posted_hook = False
            self.posted_hooks_done += 1

    def _on_unmapped(self, access: int, address: int, size: int, value: int) -> bool:
        if self._fault_context is None:  # after a deferred store fault, later faults are past it: ignore them
            self._fault = (access, address, size, value)
            if access == UC_MEM_WRITE_UNMAPPED and self.arch.store_fault_is_deferred(self.uc):
                # The state is exact here but Unicorn will run on past the store: keep it to go back to.
                self._fault_context = self.uc.context_save()
        return False

    def _on_msr(self, uc: Uc, reg: int, cp_reg: object, _user: object) -> bool:
        """Every MSR: a timer register goes to the model (skipping the instruction); anything else may change
        SCTLR_EL1, so the cached endianness is dropped and the MSR executes as usual. (Unicorn honours one MSR
        hook per instruction, so both jobs share this one.)"""
        timer = self.timer
        if timer is not None:
            name = GenericTimer.name_aa64(cp_reg.op0, cp_reg.op1, cp_reg.crn, cp_reg.crm, cp_reg.op2)  # type: ignore[attr-defined]
            if name is not None and name in _TIMER_WRITABLE:
                timer.write(name, cp_reg.val)  # type: ignore[attr-defined]
                return True
            # A counter (read-only) or CNTVOFF_EL2 (no EL2 here): Unicorn's own handling raises the UNDEF.
        self._sctlr = self._data_big_endian = None
        return False

    def _on_mrs(self, uc: Uc, reg: int, cp_reg: object, _user: object) -> bool:
        """Every MRS: a timer register is read from the model, MPIDR_EL1 gives this vCPU's affinity; anything
        else executes as usual."""
        key = (cp_reg.op0, cp_reg.op1, cp_reg.crn, cp_reg.crm, cp_reg.op2)  # type: ignore[attr-defined]
        if key == _MPIDR_EL1:
            if reg != arm64_const.UC_ARM64_REG_XZR:
                uc.reg_write(reg, self.mpidr)
            return True
        timer = self.timer
        name = None if timer is None else GenericTimer.name_aa64(*key)
        if timer is None or name is None or name == "CNTVOFF_EL2":
            return False
        if reg != arm64_const.UC_ARM64_REG_XZR:
            uc.reg_write(reg, timer.read(name))
        return True

    # ----- interrupts ---------------------------------------------------------------------------------------
    def irq_signal(self, level: bool, fiq: bool = False) -> None:
        """The GIC's output to this CPU changed (any thread, no GIC lock held). A rising IRQ stops a running
        vCPU at its next block boundary, or wakes it from WFI; the loop takes it there if PSTATE allows."""
        if fiq:
            self.fiq_line = level
        else:
            self.irq_line = level
        if not level:
            return
        with self.cond:
            state = self.state
            if state is VcpuState.SLEEPING:
                self.cond.notify_all()
        if state is VcpuState.RUNNING:
            self.kick()  # from this vCPU's own hook too (a timer MSR): the next block boundary
        ticker = self.vm.ticker
        if ticker is not None:
            ticker.reschedule()  # if masked, the ticker brings the vCPU back now and then to look again

    def needs_irq_poll(self) -> bool:
        """Running with an interrupt signalled: the ticker kicks it until the loop has taken it."""
        return (self.irq_line or self.fiq_line) and self.state is VcpuState.RUNNING

    #: Blocks the unmask watch looks at before leaving a guest that keeps its IRQs masked to the ticker's polls
    #: (a Python call per block: with 100k, EDK2 spent a fifth of its time here; 2000 took it from 37 s to 21 s).
    UNMASK_WATCH_BLOCKS = 2_000

    def _take_interrupt(self) -> None:
        """At an instruction boundary: take a signalled FIQ or IRQ that PSTATE does not mask; if every signalled
        one is masked, watch for the guest to unmask it."""
        uc = self.uc
        masked = False
        for fiq, line in ((True, self.fiq_line), (False, self.irq_line)):
            if not line:
                continue
            if irq_masked(self.arch, uc, fiq):
                masked = True
                continue
            take_irq(self.arch, uc, fiq)
            self.irqs_taken += 1
            self._sctlr = self._data_big_endian = None  # the exception level changed
            self._unwatch_unmask()
            self._unmask_exhausted = False
            return
        if masked and self._unmask_exhausted:
            self._unwatch_unmask()  # the ticker's polls look from now on
        elif masked and self._unmask_hook is None:
            self._watch_unmask()
        elif not masked:
            self._unwatch_unmask()

    def _watch_unmask(self) -> None:
        """A signalled interrupt is masked. The instructions that unmask it (MSR DAIFClr/DAIF, CPSIE, MSR CPSR,
        an exception return) end Unicorn's translation block, as in QEMU, so a block hook sees the first
        boundary after one: it stops the vCPU there and the loop takes the interrupt. No translation needs
        flushing: ``SafeStop``'s block hook already makes every block call the hook helper. The watch goes when the
        interrupt is taken, or after UNMASK_WATCH_BLOCKS blocks (the ticker's polls look after that)."""
        self._unmask_blocks = 0
        self._unmask_hook = self.uc.hook_add(UC_HOOK_BLOCK, self._on_block_unmask)

    def _unwatch_unmask(self) -> None:
        hook, self._unmask_hook = self._unmask_hook, None
        if hook is not None:
            self.uc.hook_del(hook)

    def _on_block_unmask(self, uc: Uc, _address: int, _size: int, _user: object) -> None:
        self._unmask_blocks += 1
        arch = self.arch
        if not ((self.irq_line and not irq_masked(arch, uc)) or (self.fiq_line and not irq_masked(arch, uc, True))):
            if self._unmask_blocks == self.UNMASK_WATCH_BLOCKS:
                # A guest that keeps them masked this long is left to the ticker's polls (see interrupts.py).
                self._unmask_exhausted = True
                uc.emu_stop()
            return
        uc.emu_stop()

    def big_endian_data(self) -> bool:
        """The data endianness now, for an access (once per exit and per posted store).

        On AArch64 it follows SCTLR_EL1, cached until an MSR: when EE and E0E agree the answer is the same at
        every exception level and is cached too; otherwise PSTATE decides on each access. AArch32 reads CPSR.E
        every time (SETEND changes it without an MSR)."""
        cached = self._data_big_endian
        if cached is not None:
            return cached
        if not self._a64:
            return self.arch.big_endian_data(self.uc)
        if self._sctlr is None:
            self._sctlr = fastreg.sctlr_el1(self.uc)
        both = self._sctlr & SCTLR_EE_E0E
        if both == 0 or both == SCTLR_EE_E0E:
            self._data_big_endian = bool(both)
            return self._data_big_endian
        arch = self.arch
        assert isinstance(arch, AArch64)
        return arch.big_endian_data(self.uc, self._sctlr)

    def _on_hook_error(self, exc: BaseException) -> None:
        """A raw hook failed (a bad posted write): stop here and raise it once emu_start returns."""
        if self._hook_error is None:
            self._hook_error = exc
        self.uc.emu_stop()

    def _on_instruction(self, uc: Uc, address: int, size: int, _user: object) -> None:
        self.executed += 1
        if self.executed > self.vm.instruction_budget:
            self.executed -= 1
            self._stop_cause = _StopCause("budget")
            uc.emu_stop()

    def _on_interrupt(self, uc: Uc, intno: int, _user: object) -> None:
        pc = self.arch.pc(uc)
        if intno != EXCP_HVC:  # PSCI is on HVC only (virt's device tree says so); SMC is UNDEFINED there
            try:
                info = exceptions.raised(self.arch, uc)
            except ArchError:
                info = None  # take_reported is not reached: the cause says why
            self._stop_cause = _StopCause("exception", EXCEPTION_NAMES.get(intno, f"exception {intno}"),
                                          intno, pc, info)
            uc.emu_stop()
            return
        self.psci_calls += 1
        call = psci.decode_call(*self.arch.psci_args(uc), is_64bit=isinstance(self.arch, AArch64))
        action = call.action
        if action is psci.PsciAction.NONE:
            self.arch.set_psci_result(uc, call.result)
        elif action is psci.PsciAction.CPU_ON:
            self.arch.set_psci_result(uc, self.vm.psci_cpu_on(self.index, call.target, call.entry, call.context))
        elif action is psci.PsciAction.AFFINITY_INFO:
            self.arch.set_psci_result(uc, self.vm.psci_affinity_info(call.target))
        else:
            self._stop_cause = _StopCause(action.value, call.name, intno, pc)
            uc.emu_stop()

    # ----- the thread ----------------------------------------------------------------------------------
    def _thread_main(self) -> None:
        self.cpu_clock = time.pthread_getcpuclockid(threading.get_ident())
        try:
            self._open_channels()
            while True:
                with self.cond:
                    if self.state is not VcpuState.OFF:
                        self.state = VcpuState.OFF
                        self.cond.notify_all()
                    while self._power_on is None and not self.stop_req:
                        self.cond.wait()
                    if self.stop_req or self._power_on is None:
                        break
                    entry, context = self._power_on
                    self._power_on = None
                self.vm.events.emit(EventKind.VCPU_STARTED, vcpu_id=self.index, pc=entry,
                                    reason=f"vCPU {self.index} started at 0x{entry:x}")
                if self.timer is not None:
                    self.timer.reset()  # PSCI CPU_ON and a system reset reset the CPU, its timers with it
                begin = self.arch.set_entry(self.uc, entry, context)
                self._run(begin)
        except VcpuFault as fault:
            # Posted writes the guest already retired still reach their devices when the run ends on a fault.
            with contextlib.suppress(VcpuFault):
                self.flush_posted()
            self.vm.fail(fault.error_kind, fault.reason, vcpu_id=self.index, **fault.fields)
        except Exception as exc:  # a bug here must end the run with a reason, not kill the thread silently
            self.vm.fail(ErrorKind.INTERNAL, f"vCPU {self.index}: internal error: {exc!r}",
                         vcpu_id=self.index)
        finally:
            _POSTED_WATCH.remove(self)
            self._close_channels()
            with self.cond:
                self.state = VcpuState.STOPPED
                self.cond.notify_all()

    def _open_channels(self) -> None:
        for endpoint in self.vm.endpoints:
            self.channel(endpoint.name)

    def _close_channels(self) -> None:
        for channel in self._channels.values():
            with contextlib.suppress(Exception):
                channel.close()
        self._channels.clear()

    def flush_posted(self, wait: bool = True) -> None:
        """Deliver queued posted writes. With ``wait`` (halt, pause, stop, reset) every write has reached
        its device on return and failures are known; without (a slice ended) they are only sent."""
        for name, channel in self._channels.items():
            if wait or channel.pending_posted():
                self._flush_channel(name, channel, wait)

    def _flush_channel(self, name: str, channel: ExitChannel, wait: bool) -> None:
        """Send one stream's queued posted writes (and with ``wait`` read every answer) and apply what came back."""
        queued = channel.pending_posted()
        try:
            completion = channel.flush(wait)
        except TransportError as exc:
            raise VcpuFault(ErrorKind.DEVICE_SERVICE, str(exc), device=name) from None
        self.exits.absorb(completion, name, batch_sent=bool(queued))

    def release_channel(self, service: str) -> None:
        """A device service is going away: at its next boundary this vCPU delivers what it queued for it and
        closes its exit stream, so the service need not wait out its grace period for this vCPU (any thread)."""
        with self.cond:
            self._release.add(service)
            running = self.state is VcpuState.RUNNING
        if running:
            self.kick()

    def _release_channels(self) -> None:
        """Close the exit streams of the services in ``_release`` (this vCPU's thread). The closed channel stays, so
        a later access is refused by it with the reason, and no new stream is opened to a service leaving."""
        with self.cond:
            services, self._release = self._release, set()
        for name in services:
            channel = self._channels.get(name)
            if channel is None or channel.broken():
                continue
            self._flush_channel(name, channel, True)
            with contextlib.suppress(Exception):
                channel.close()

    def has_pending_posted(self) -> bool:
        """Whether posted writes wait in any queue (read by the posted-write watchdog's thread)."""
        return any(ch.pending_posted() for ch in list(self._channels.values()))

    def _park(self, parked: VcpuState = VcpuState.PAUSED) -> bool:
        """Honour pause and stop requests (VM lock held). Returns False when the vCPU must stop.

        ``parked`` is the state shown while paused: EXIT_WAIT when a completion is held back, so that
        GetRegisters reports the exit as pending and SetRegisters cannot be overwritten by the completion.
        """
        if self.pause_req and not (self.stop_req or self.off_req):
            previous = self.state
            self.state = parked
            self.cond.notify_all()
            while self.pause_req and not (self.stop_req or self.off_req):
                self.cond.wait()
            self.state = previous
        return not (self.stop_req or self.off_req)

    def _run(self, begin: int) -> None:
        """Run until this vCPU is switched off, halts, or the VM stops."""
        uc = self.uc
        never = self.arch.never_pc
        while True:
            if self._release:
                self._release_channels()
            # After an exit the vCPU is RUNNING and exchange() has honoured any request: go straight back in.
            if self.state is not VcpuState.RUNNING or self.pause_req or self.stop_req or self.off_req:
                if self.pause_req and self.has_pending_posted():
                    self.flush_posted()
                with self.cond:
                    if not self._park():
                        self.flush_posted()
                        return
                    self.state = VcpuState.RUNNING
            if self._map_generation != self.vm.map_generation:
                self._sync_mirrors()
            if self._trapping:
                uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
            self._fault = None
            self._fault_context = None
            self._stop_cause = None
            # Posted writes must not wait forever behind a guest that never exits again: the posted-write
            # watchdog kicks a vCPU whose queue stays non-empty (emu_start's own timeout starts a thread
            # per call, which costs more than an exit).
            if self.vm.has_posted:
                _POSTED_WATCH.add(self)
            self.kick_requested = self.pause_req or self.stop_req or self.off_req
            if self.irq_line or self.fiq_line:
                self._take_interrupt()
                begin = self.arch.start_address(uc, self.arch.pc(uc))
            elif self._unmask_hook is not None:
                self._unwatch_unmask()
                self._unmask_exhausted = False
            status = fastreg.emu_start(uc, begin, never)
            self._stopper.clear()
            if self._hook_error is not None:
                hook_error, self._hook_error = self._hook_error, None
                raise hook_error
            pc = self.arch.pc(uc)
            if status:
                self._on_emu_error(status, pc)
            elif self._stop_cause is not None:
                if not self._on_stop_cause(self._stop_cause):
                    return
            elif self._cp15 is not None and self._cp15.instrument_pending():
                pass  # code never run before stopped at its first block to have its timer accesses hooked
            elif not (self.pause_req or self.stop_req):
                self.flush_posted(wait=False)  # a slice ended (a kick or WFI): nothing queued may wait longer
                if self.arch.is_wfi_before(uc, pc):
                    self.flush_posted()
                    if not self._wait_for_interrupt(pc):
                        return
            begin = self.arch.start_address(uc, self.arch.pc(uc))

    def _can_be_woken(self) -> bool:
        """Whether anything may ever signal this vCPU an interrupt: its GIC CPU interface can signal it, or
        another vCPU still runs (and may enable it, or send an SGI)."""
        gic = self.vm.gic
        if gic is None:
            return False
        if gic.can_signal(self.index):
            return True
        return any(v is not self and v.state not in (VcpuState.OFF, VcpuState.STOPPED, VcpuState.HALTED)
                   for v in self.vm.vcpus)

    def _wait_for_interrupt(self, pc: int) -> bool:
        """WFI: sleep until an interrupt is signalled (masked or not, as on hardware), a pause, a stop or a
        reset. Returns False when the vCPU must stop. With nothing that can ever wake it, it halts."""
        with self.cond:
            while not (self.irq_line or self.fiq_line or self.pause_req or self.stop_req or self.off_req):
                if not self._can_be_woken():
                    break
                self.state = VcpuState.SLEEPING
                self.cond.notify_all()
                self.cond.wait(0.1)  # looks again at whether anything can wake it
            else:
                self.state = VcpuState.RUNNING
                return True
        return self._halt(pc)

    def _halt(self, pc: int) -> bool:
        """WFI with nothing that can wake the vCPU (no interrupts yet): it stays halted until the VM stops."""
        with self.cond:
            self.state = VcpuState.HALTED
            self.cond.notify_all()
        self.vm.events.emit(EventKind.VCPU_STOPPED, vcpu_id=self.index, pc=pc,
                            reason=f"vCPU {self.index} halted in WFI at 0x{pc - 4:x}; nothing can wake it"
                                   + (" (its GIC CPU interface cannot signal it and no other vCPU runs)"
                                      if self.vm.gic is not None else ""))
        self.vm.check_idle()
        with self.cond:
            while not (self.stop_req or self.off_req) and self._power_on is None:
                self.cond.wait()
        return False

    def _on_stop_cause(self, cause: _StopCause) -> bool:
        if cause.kind == "budget":
            self.vm.finish(EventKind.BUDGET_EXHAUSTED, vcpu_id=self.index, pc=self.arch.pc(self.uc),
                           reason=f"instruction budget of {self.vm.instruction_budget} exhausted on vCPU {self.index}")
            return False
        if cause.kind == "exception":
            self._take_exception(cause)
            return True
        self.flush_posted()
        if cause.kind == psci.PsciAction.CPU_OFF.value:
            with self.cond:
                self.state = VcpuState.OFF
                self.cond.notify_all()
            self.vm.events.emit(EventKind.VCPU_STOPPED, vcpu_id=self.index, pc=cause.pc,
                                reason=f"vCPU {self.index} called PSCI CPU_OFF")
            self.vm.check_idle()
            return False
        if cause.kind == psci.PsciAction.SYSTEM_OFF.value:
            self.vm.finish(EventKind.POWERED_OFF, vcpu_id=self.index, pc=cause.pc,
                           reason=f"PSCI SYSTEM_OFF from vCPU {self.index}")
            return False
        if cause.kind == psci.PsciAction.SYSTEM_RESET.value:
            self.vm.request_reset(self.index, cause.pc)
            return False
        raise VcpuFault(ErrorKind.INTERNAL, f"unknown stop cause {cause.kind}")

    def _on_emu_error(self, status: int, pc: int) -> None:
        fault = self._fault
        if self._fault_context is not None:
            self.uc.context_restore(self._fault_context)  # undo what ran past a store in an IT block
            pc = self.arch.pc(self.uc)
        if status == UC_ERR_INSN_INVALID and fault is None and not self._a64:
            self._on_invalid_a32(pc)
            return
        if fault is None or status not in (UC_ERR_READ_UNMAPPED, UC_ERR_WRITE_UNMAPPED, UC_ERR_WRITE_PROT,
                                           UC_ERR_READ_PROT):
            if fault is not None and fault[0] in (UC_MEM_FETCH_UNMAPPED, UC_MEM_FETCH_PROT):
                last = self._last_taken
                if last is not None and fault[1] == last.vector:  # the vector of the exception just taken
                    raise VcpuFault(ErrorKind.GUEST_EXCEPTION,
                                    f"vCPU {self.index}: instruction fetch from 0x{fault[1]:x}, which is not RAM: it "
                                    f"is the vector of the {last.describe()}, and nothing is there to handle it",
                                    pc=last.pc, fault_address=fault[1], syndrome=last.syndrome)
                raise VcpuFault(ErrorKind.GUEST_EXCEPTION,
                                f"vCPU {self.index}: instruction fetch from 0x{fault[1]:x}, which is not RAM",
                                pc=pc, fault_address=fault[1])
            raise VcpuFault(ErrorKind.GUEST_EXCEPTION,
                            f"vCPU {self.index}: emulation stopped at 0x{pc:x}: {UcError(status)}", pc=pc)
        if status == UC_ERR_READ_PROT and self._trapping:
            # With the guest's MMU on, Unicorn fills the softmmu TLB even for a read it refuses, and the
            # next read of that page would be served from the mirror: drop the entry.
            self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
        self._take_exit(pc, fault[1], fault[0] in (UC_MEM_WRITE_UNMAPPED, UC_MEM_WRITE_PROT), fault[2])

    # ----- guest exceptions (exceptions.py enters the vectors) ----------------------------------------------
    def _take_exception(self, cause: _StopCause) -> None:
        """Deliver the synchronous exception Unicorn reported through UC_HOOK_INTR to the guest's vector."""
        try:
            if cause.raised is None:
                raise ArchError("its syndrome cannot be read from this libunicorn (exceptions.raised)")
            taken = exceptions.take_reported(self.arch, self.uc, cause.intno, cause.raised)
        except ArchError as exc:
            raise VcpuFault(ErrorKind.GUEST_EXCEPTION,
                            f"vCPU {self.index}: guest took a {cause.detail} at 0x{cause.pc:x}: {exc}",
                            pc=cause.pc) from None
        self.exception_entered(taken)

    def _on_invalid_a32(self, pc: int) -> None:
        """UC_ERR_INSN_INVALID on AArch32: an undefined instruction at ``pc`` (UNDEF), or a YIELD/WFE just before it,
        which Unicorn reports the same way with PC past the hint. Resuming after a hint at the same ``pc`` twice in
        a row means either a loop around the hint or an undefined instruction right after it; only UDF is told apart
        (an unallocated encoding right after a YIELD/WFE would be resumed forever)."""
        uc = self.uc
        if exceptions.a32_after_hint(uc, pc) and not (pc == self._hint_pc
                                                      and exceptions.a32_permanently_undefined(uc, pc)):
            self._hint_pc = pc
            return
        self._hint_pc = None
        try:
            taken = exceptions.take_undefined_a32(self.arch, uc)
        except ArchError as exc:
            raise VcpuFault(ErrorKind.GUEST_EXCEPTION,
                            f"vCPU {self.index}: undefined instruction at 0x{pc:x}: {exc}", pc=pc) from None
        self.exception_entered(taken)

    # A synchronous exception raised by the first instruction of the vector the previous one entered, this many
    # times in a row, ends the run: the guest has no handler there (an empty vector table loops for ever).
    EXCEPTION_LOOP_LIMIT = 16
    # The same abort (instruction, kind, syndrome, fault address) this many times in a row, with no other
    # exception between, ends the run too: the guest's handler returns to the faulting instruction, which faults
    # again, for ever (a retry with nothing changed). Interrupts and any other exception start the count again.
    REFAULT_LIMIT = 1000

    def exception_entered(self, taken: exceptions.Taken) -> None:
        """Note an exception the guest was just given (here or by the exit path): for the loop check and so that a
        fetch fault at its vector can name it."""
        self.exceptions_taken += 1
        last = self._last_taken
        if last is not None and taken.pc == last.vector:
            if self._exception_loop == 0:
                self._loop_origin = last
            self._exception_loop += 1
            if self._exception_loop >= self.EXCEPTION_LOOP_LIMIT:
                origin = self._loop_origin or last
                raise VcpuFault(ErrorKind.GUEST_EXCEPTION,
                                f"vCPU {self.index}: exception loop: the guest took a {origin.describe()}, and the "
                                f"instruction there raises a {taken.name} again and again (syndrome "
                                f"0x{taken.syndrome:x}): no handler at the vector", pc=origin.pc,
                                fault_address=taken.pc, syndrome=taken.syndrome)
        else:
            self._exception_loop = 0
        self._last_taken = taken
        if taken.address is None:  # not a fault (an SVC's, an undefined instruction's handler goes on past it)
            self._refault = None
            return
        key = (taken.pc, taken.name, taken.syndrome, taken.address)
        if key != self._refault:
            self._refault, self._refaults = key, 1
            return
        self._refaults += 1
        if self._refaults >= self.REFAULT_LIMIT:
            raise VcpuFault(ErrorKind.GUEST_EXCEPTION,
                            f"vCPU {self.index}: re-fault loop: the guest took the same {taken.describe()} "
                            f"{self._refaults} times in a row with nothing else between: its handler returns to the "
                            "faulting instruction, which faults again", pc=taken.pc,
                            fault_address=taken.address or 0, syndrome=taken.syndrome)

    def _take_exit(self, pc: int, address: int, is_write: bool, size: int) -> None:
        """KVM_RUN's exit path: begin, exchange with the device service if the access must leave the process,
        complete. On return the vCPU resumes at its (possibly new) PC."""
        action = self.exits.begin(pc, address, is_write, size)
        if isinstance(action, Forward):
            result = self.exchange(action.pending)
            if result is not None:
                self.exits.complete(action.pending, result)
        elif isinstance(action, Split):
            self.exits.perform_split(action, self.exchange)
        else:
            self.exits.settle(action)

    def _sync_mirrors(self) -> None:
        """Follow the ROMD mirrors: readable while enabled, no access at all while the device traps
        everything; drop code translated from bytes a device has since changed.

        The mirror stays mapped and only its protection changes: remapping 64 MiB costs about 7 ms,
        a protection change microseconds, and U-Boot's flash probe switches modes about a thousand times.
        """
        if self._map_generation == self.vm.map_generation:
            return
        uc = self.uc
        with self.vm.lock:
            for key, mirror in self.vm.mirrors.items():
                if key not in self._mapped_mirrors:
                    uc.mem_map_ptr(mirror.block.base, mirror.block.size, UC_PROT_READ | UC_PROT_EXEC,
                                   mirror.block.address)
                    self._mapped_mirrors.add(key)
                    self._mirror_prot[key] = True
                if self._mirror_prot.get(key) != mirror.enabled:
                    uc.mem_protect(mirror.block.base, mirror.block.size,
                                   UC_PROT_READ | UC_PROT_EXEC if mirror.enabled else UC_PROT_NONE)
                    self._mirror_prot[key] = mirror.enabled
                    # The softmmu TLB may still hold a translation with the old permissions (with the
                    # guest's MMU on it is keyed by virtual address), so drop it.
                    uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
            self._trapping = not all(self._mirror_prot.values())
            stale = self.vm.patched_since(self._map_generation)
            self._map_generation = self.vm.map_generation
        if stale is None:
            uc.ctl_flush_tb()  # type: ignore[attr-defined]
        else:
            for start, end in stale:
                uc.ctl_remove_cache(start, end)

    # ----- what the exit path needs from the vCPU ---------------------------------------------------------
    def channel(self, service: str) -> ExitChannel:
        """The exit stream to a device service, reopened (with a new handshake) if an earlier one broke."""
        channel = self._channels.get(service)
        if channel is None or channel.broken():
            endpoint = next(e for e in self.vm.endpoints if e.name == service)
            if channel is not None and endpoint.leaving is not None:
                return channel  # its access() refuses, naming why: no new stream to a service that is leaving
            if channel is not None:
                with contextlib.suppress(Exception):
                    channel.close()
            try:
                channel = endpoint.open_exit_channel(self.vm.vm_id, self.index, self.arch.name)
            except TransportError as exc:
                raise VcpuFault(ErrorKind.DEVICE_SERVICE, f"vCPU {self.index}: {exc}") from None
            self._channels[service] = channel
        return channel

    def exchange(self, pending: PendingAccess) -> Completion | TransportError | None:
        """Send an exit and wait for its completion (or the transport's failure); None when the vCPU must stop
        without completing it.

        While waiting the vCPU is quiescent (its registers show the state before the instruction). A pause that
        arrives meanwhile holds the completion until resume, so it is applied exactly once.
        """
        assert pending.exit is not None and pending.region is not None
        channel = self.channel(pending.region.service)
        if channel.pending_posted():
            self.exits.stats.posted_batches += 1  # they ride on this exit
        lock = self.vm.lock  # the lock itself, not the condition: entering it costs no Python frame
        with lock:
            self.state = VcpuState.EXIT_WAIT
            if self.pause_req:  # somebody may be waiting for this vCPU to be quiescent
                self.cond.notify_all()
        result: Completion | TransportError | None = None
        try:
            pending.sent_ns = time.perf_counter_ns()
            try:
                result = channel.access(pending.exit)
            except DeviceRestarted as restart:
                if not self.vm.policies.continue_on_device_restart:
                    raise
                result = self._after_restart(pending, restart)
        except TransportError as exc:
            result = exc
        finally:
            with lock:
                if (self.pause_req or self.stop_req or self.off_req) and not self._park(VcpuState.EXIT_WAIT):
                    result = None
                self.state = VcpuState.RUNNING
        return result

    def _after_restart(self, pending: PendingAccess, restart: DeviceRestarted) -> Completion:
        """Policy continue: the VM takes the new instance on, then the access goes to it on a new session."""
        assert pending.exit is not None and pending.region is not None
        try:
            self.vm.device_restarted(restart.service, restart, self.index)
            return self.channel(pending.region.service).access(pending.exit)
        except DeviceRestarted:
            raise
        except (TransportError, VcpuFault) as exc:
            raise ServiceLost(f"{restart}, and the new instance could not be used: {exc}") from None

    def latency_snapshot(self) -> HdrHistogram:
        return self.exits.latency_snapshot()

    # ----- inspection (VM lock held by the caller, vCPU quiescent) -----------------------------------
    def read_registers(self, names: list[str]) -> list[tuple[str, int]]:
        return [(n, self.arch.read_named(self.uc, n)) for n in (names or self.arch.register_names())]

    def write_registers(self, values: list[tuple[str, int]]) -> None:
        for name, value in values:
            self.arch.write_named(self.uc, name, value)
        self._sctlr = self._data_big_endian = None  # a client may have written SCTLR_EL1 or CPSR

