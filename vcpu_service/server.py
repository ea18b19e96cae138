"""The VcpuService gRPC server: a thin adapter from RPCs to ``Vm`` objects.

A synchronous server on purpose: this is the control plane; the hot path (exits) runs on the vCPU
threads as a gRPC *client* of the device services.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mmiosplit import security
from mmiosplit.address import parse_address
from mmiosplit.health import DrainingHealth
from mmiosplit.mmio import DeviceEndpoint, DmaWindow, TransportError
from mmiosplit.v1 import common_pb2, vcpu_pb2, vcpu_pb2_grpc
from vcpu_service.arch import ArchError
from vcpu_service.domain import (
    ErrorKind,
    EventKind,
    FaultPolicy,
    LatencySummary,
    Policies,
    UnmappedPolicy,
    VmEvent,
    VmStats,
)
from vcpu_service.leases import DEFAULT_LEASE_S, VmLeases
from vcpu_service.totals import MetricsSnapshot, VmTotals, vcpu_state_name, vm_totals
from vcpu_service.tracelog import ExitRecord
from vcpu_service.transport import POSTED_BATCH_SIZES, GrpcEndpoint
from vcpu_service.vm import ImageSpec, IrqRouteSpec, RegionDeadlineSpec, Vm, VmConfigError, VmSpec, VmStateError

log = logging.getLogger("mmiosplit.vcpu")

DEFAULT_RAM_CAP = 8 * 2**30
SERVICE_NAME = "mmiosplit.v1.VcpuService"
T = TypeVar("T")

_ARCH = {common_pb2.ARCHITECTURE_AARCH64: "aarch64", common_pb2.ARCHITECTURE_ARM: "arm"}
# Unset policies get the architecture doc's defaults: what real hardware (and QEMU for NISV) would do.
_UNMAPPED = {
    vcpu_pb2.UNMAPPED_ACCESS_POLICY_UNSPECIFIED: UnmappedPolicy.RAZ_WI,
    vcpu_pb2.UNMAPPED_ACCESS_POLICY_RAZ_WI: UnmappedPolicy.RAZ_WI,
    vcpu_pb2.UNMAPPED_ACCESS_POLICY_ABORT: UnmappedPolicy.ABORT,
    vcpu_pb2.UNMAPPED_ACCESS_POLICY_STOP: UnmappedPolicy.STOP,
}
_FAULT = {
    vcpu_pb2.FAULT_POLICY_UNSPECIFIED: FaultPolicy.ABORT,
    vcpu_pb2.FAULT_POLICY_ABORT: FaultPolicy.ABORT,
    vcpu_pb2.FAULT_POLICY_STOP: FaultPolicy.STOP,
}
_EVENT_KIND = {kind: vcpu_pb2.VmEventKind.Value(f"VM_EVENT_KIND_{kind.name}") for kind in EventKind}
_ERROR_KIND = {kind: vcpu_pb2.VmErrorKind.Value(f"VM_ERROR_KIND_{kind.name}") for kind in ErrorKind}


def spec_from_proto(cfg: vcpu_pb2.VmConfig) -> VmSpec:
    """Parse and check a VmConfig; VmConfigError names the first field that is wrong."""
    arch = _ARCH.get(cfg.architecture)
    if arch is None:
        raise VmConfigError("architecture is unset or unknown: use ARCHITECTURE_AARCH64 or ARCHITECTURE_ARM")
    pol = cfg.policies
    unmapped = _UNMAPPED.get(pol.unmapped_access)
    if unmapped is None:
        raise VmConfigError(f"policy unmapped_access={pol.unmapped_access} is not a known UnmappedAccessPolicy")
    faults = {}
    for name in ("device_error", "deadline", "nisv"):
        value = getattr(pol, name)
        fault = _FAULT.get(value)
        if fault is None:
            raise VmConfigError(f"policy {name}={value} is not a known FaultPolicy")
        faults[name] = fault
    if pol.device_restart not in (vcpu_pb2.DEVICE_RESTART_POLICY_UNSPECIFIED, vcpu_pb2.DEVICE_RESTART_POLICY_FAIL,
                                  vcpu_pb2.DEVICE_RESTART_POLICY_CONTINUE):
        raise VmConfigError(f"policy device_restart={pol.device_restart} is not a known DeviceRestartPolicy")
    if cfg.machine not in ("", "virt"):
        raise VmConfigError(f"unknown machine profile {cfg.machine!r}; known: virt")
    # At most what a thread may wait for (the limit is a threading.Timer): more, or inf, killed the timer's
    # thread with an OverflowError and left the VM with no limit; NaN slipped past a plain < 0 check.
    if not 0 <= cfg.limits.wall_clock_seconds <= threading.TIMEOUT_MAX:
        raise VmConfigError(f"limits.wall_clock_seconds must be between 0 (no limit) and {threading.TIMEOUT_MAX:g},"
                            f" got {cfg.limits.wall_clock_seconds}")
    return VmSpec(
        architecture=arch,
        cpu_model=cfg.cpu_model,
        vcpu_count=cfg.vcpu_count or 1,
        ram=[(r.base, r.size) for r in cfg.ram],
        images=[ImageSpec(i.name or f"image{n}", bytes(i.data), i.load_address) for n, i in enumerate(cfg.images)],
        entry_point=cfg.entry_point,
        policies=Policies(unmapped, **faults,
                          continue_on_device_restart=pol.device_restart == vcpu_pb2.DEVICE_RESTART_POLICY_CONTINUE),
        instruction_budget=cfg.limits.instruction_budget,
        wall_clock_seconds=cfg.limits.wall_clock_seconds,
        exit_deadline_ms=cfg.exit_deadline_ms,
        name=cfg.name,
        strict_kvm=cfg.strict_kvm,
        machine=cfg.machine,
        trace_exits=cfg.trace_exits,
        irq_routes=[IrqRouteSpec(r.device, r.spi, r.line, r.device_service) for r in cfg.irq_routes],
        region_deadlines=[RegionDeadlineSpec(d.device, d.deadline_ms, d.region, d.device_service)
                          for d in cfg.region_deadlines],
        dma_grants=[(g.device_service, DmaWindow(g.name, g.base, g.size)) for g in cfg.dma_grants],
    )


def exit_trace_proto(r: ExitRecord) -> vcpu_pb2.ExitTrace:
    return vcpu_pb2.ExitTrace(
        seq=r.seq, vcpu_id=r.vcpu, pc=r.pc, isa=r.isa, instruction=r.instruction, instruction_length=r.insn_len,
        address=r.address, size=r.size, is_write=r.is_write, rt=r.srt, sign_extend=r.sign_extend,
        sixty_four=r.sixty_four, writeback=r.writeback, value=r.value & 0xFFFF_FFFF_FFFF_FFFF, device=r.device,
        outcome=r.outcome, latency_us=r.latency_ns / 1000, syndrome=r.syndrome,
    )


def event_to_wire(e: VmEvent) -> vcpu_pb2.VmEvent:
    return vcpu_pb2.VmEvent(seq=e.seq, kind=_EVENT_KIND[e.kind], time=e.time, vcpu_id=e.vcpu_id, reason=e.reason,
                            error_kind=_ERROR_KIND[e.error_kind], pc=e.pc, fault_address=e.fault_address,
                            syndrome=e.syndrome, instruction=e.instruction, device=e.device)


def _latency_to_wire(s: LatencySummary) -> vcpu_pb2.LatencySummary:
    return vcpu_pb2.LatencySummary(count=s.count, p50_us=s.p50_us, p90_us=s.p90_us, p99_us=s.p99_us,
                                   p999_us=s.p999_us, max_us=s.max_us, mean_us=s.mean_us, hdr=s.hdr)


def stats_to_wire(stats: VmStats) -> vcpu_pb2.GetStatsResponse:
    resp = vcpu_pb2.GetStatsResponse(exits=stats.exits, run_seconds=stats.run_seconds)
    for v in stats.vcpus:
        vs = resp.vcpus.add(vcpu_id=v.vcpu_id, state=v.state, exits=v.exits, reads=v.reads, writes=v.writes,
                            posted_writes=v.posted_writes, posted_batches=v.posted_batches, psci_calls=v.psci_calls,
                            external_aborts=v.external_aborts, nops=v.nops, hand_decoded=v.hand_decoded,
                            shadow_reads=v.shadow_reads)
        if v.exit_latency is not None:
            vs.exit_latency.CopyFrom(_latency_to_wire(v.exit_latency))
    if stats.exit_latency is not None:
        resp.exit_latency.CopyFrom(_latency_to_wire(stats.exit_latency))
    if stats.irq_ack_latency is not None:
        resp.irq_ack_latency.CopyFrom(_latency_to_wire(stats.irq_ack_latency))
    if stats.irq_eoi_latency is not None:
        resp.irq_eoi_latency.CopyFrom(_latency_to_wire(stats.irq_eoi_latency))
    resp.irq_from_arrival = stats.irq_from_arrival
    for e in stats.kvm_report:
        resp.kvm_report.add(pc=e.pc, isa=e.isa, instruction=e.instruction, reason=e.reason, handled=e.handled,
                            count=e.count)
    return resp


class VcpuServicer(vcpu_pb2_grpc.VcpuServiceServicer):
    """Maps each RPC onto a Vm; every failure becomes a gRPC status whose message names the cause."""

    def __init__(self, ram_cap: int = DEFAULT_RAM_CAP, connect_timeout_s: float = 5.0,
                 default_deadline_ms: int = 5000, vm_lease_s: float = DEFAULT_LEASE_S) -> None:
        self._vms: dict[str, Vm] = {}
        # VMs being deleted (still counted from their own stats), and the totals of VMs already deleted:
        # the service-wide metrics counters must not go backwards when a VM goes away.
        self._deleting: list[Vm] = []
        self._retired = VmTotals()
        self._lock = threading.Lock()
        self._ram_cap = ram_cap
        self._connect_timeout_s = connect_timeout_s
        self._default_deadline_ms = default_deadline_ms
        # A VM whose client is gone (no stream follows it, no RPC names it) is deleted after this lease.
        self._leases = VmLeases(vm_lease_s, self._expire_vm)

    def _call(self, context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (VmConfigError, ArchError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except TransportError as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except VmStateError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except Exception as exc:
            log.exception("internal error")
            context.abort(grpc.StatusCode.INTERNAL, f"internal error in the vcpu service: {exc!r}")
        raise AssertionError("unreachable")

    def _vm(self, vm_id: str, context: grpc.ServicerContext) -> Vm:
        self._leases.touch(vm_id)  # every RPC naming a VM comes through here
        with self._lock:
            vm = self._vms.get(vm_id)
        if vm is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no VM with id {vm_id!r}")
        return vm

    def CreateVm(self, request: vcpu_pb2.CreateVmRequest, context: grpc.ServicerContext) -> vcpu_pb2.CreateVmResponse:
        def create() -> vcpu_pb2.CreateVmResponse:
            spec = spec_from_proto(request.config)
            endpoints: list[DeviceEndpoint] = []
            try:
                for address in request.config.device_services:
                    try:
                        parse_address(address)
                    except ValueError as exc:
                        raise VmConfigError(f"device service: {exc}") from None
                    deadline_s = (spec.exit_deadline_ms or self._default_deadline_ms) / 1000
                    endpoints.append(GrpcEndpoint(address, self._connect_timeout_s, deadline_s))
                vm = Vm(spec, endpoints, ram_cap=self._ram_cap, default_deadline_ms=self._default_deadline_ms)
            except Exception:
                for e in endpoints:
                    e.close()
                raise
            with self._lock:
                self._vms[vm.vm_id] = vm
            self._leases.add(vm.vm_id)
            log.info("created VM %s (%s, %d vCPUs, %d regions)", vm.vm_id, spec.architecture, spec.vcpu_count,
                     len(vm.regions))
            resp = vcpu_pb2.CreateVmResponse(vm_id=vm.vm_id)
            for r in vm.regions:
                resp.regions.add(device_service=r.service, device=r.device, device_type=r.device_type,
                                 region=r.name, base=r.base, size=r.size, posted=r.posted,
                                 has_console=r.has_console)
            return resp

        return self._call(context, create)

    def StartVm(self, request: vcpu_pb2.StartVmRequest, context: grpc.ServicerContext) -> vcpu_pb2.StartVmResponse:
        vm = self._vm(request.vm_id, context)
        self._call(context, vm.start)
        return vcpu_pb2.StartVmResponse()

    def PauseVm(self, request: vcpu_pb2.PauseVmRequest, context: grpc.ServicerContext) -> vcpu_pb2.PauseVmResponse:
        vm = self._vm(request.vm_id, context)
        self._call(context, vm.pause)
        return vcpu_pb2.PauseVmResponse()

    def ResumeVm(self, request: vcpu_pb2.ResumeVmRequest, context: grpc.ServicerContext) -> vcpu_pb2.ResumeVmResponse:
        vm = self._vm(request.vm_id, context)
        self._call(context, vm.resume)
        return vcpu_pb2.ResumeVmResponse()

    def StreamVmEvents(self, request: vcpu_pb2.StreamVmEventsRequest,
                       context: grpc.ServicerContext) -> Iterator[vcpu_pb2.StreamVmEventsResponse]:
        vm = self._vm(request.vm_id, context)
        with self._leases.held(request.vm_id):
            for event in vm.events.follow(context.is_active):
                yield vcpu_pb2.StreamVmEventsResponse(event=event_to_wire(event))

    def GetRegisters(self, request: vcpu_pb2.GetRegistersRequest,
                     context: grpc.ServicerContext) -> vcpu_pb2.GetRegistersResponse:
        vm = self._vm(request.vm_id, context)
        regs, pending = self._call(context, lambda: vm.get_registers(request.vcpu_id, list(request.names)))
        return vcpu_pb2.GetRegistersResponse(
            registers=[vcpu_pb2.Register(name=n, value=v) for n, v in regs], exit_pending=pending
        )

    def SetRegisters(self, request: vcpu_pb2.SetRegistersRequest,
                     context: grpc.ServicerContext) -> vcpu_pb2.SetRegistersResponse:
        vm = self._vm(request.vm_id, context)
        self._call(context, lambda: vm.set_registers(request.vcpu_id, [(r.name, r.value) for r in request.registers]))
        return vcpu_pb2.SetRegistersResponse()

    def ReadMemory(self, request: vcpu_pb2.ReadMemoryRequest,
                   context: grpc.ServicerContext) -> vcpu_pb2.ReadMemoryResponse:
        vm = self._vm(request.vm_id, context)
        if request.length > 64 * 2**20:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"ReadMemory of {request.length} bytes is over 64 MiB")
        return vcpu_pb2.ReadMemoryResponse(data=self._call(context, lambda: vm.read_memory(request.address,
                                                                                          request.length)))

    def WriteMemory(self, request: vcpu_pb2.WriteMemoryRequest,
                    context: grpc.ServicerContext) -> vcpu_pb2.WriteMemoryResponse:
        vm = self._vm(request.vm_id, context)
        self._call(context, lambda: vm.write_memory(request.address, bytes(request.data)))
        return vcpu_pb2.WriteMemoryResponse()

    def GetStats(self, request: vcpu_pb2.GetStatsRequest, context: grpc.ServicerContext) -> vcpu_pb2.GetStatsResponse:
        vm = self._vm(request.vm_id, context)
        return stats_to_wire(self._call(context, lambda: vm.stats(request.include_histograms, request.counters_only)))

    def StreamExitTrace(self, request: vcpu_pb2.StreamExitTraceRequest,
                        context: grpc.ServicerContext) -> Iterator[vcpu_pb2.StreamExitTraceResponse]:
        vm = self._vm(request.vm_id, context)
        if vm.trace is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"VM {request.vm_id} was created without trace_exits")
        assert vm.trace is not None
        with self._leases.held(request.vm_id):
            for batch in vm.trace.follow(context.is_active):
                yield vcpu_pb2.StreamExitTraceResponse(exits=[exit_trace_proto(r) for r in batch])

    def DeleteVm(self, request: vcpu_pb2.DeleteVmRequest, context: grpc.ServicerContext) -> vcpu_pb2.DeleteVmResponse:
        vm = self._vm(request.vm_id, context)
        self._leases.forget(request.vm_id)
        self._remove_vm(request.vm_id, vm)
        return vcpu_pb2.DeleteVmResponse()

    def _remove_vm(self, vm_id: str, vm: Vm) -> None:
        """Delete vm; whoever takes it out of the table first folds its totals into the retired ones."""
        with self._lock:
            owned = self._vms.pop(vm_id, None) is not None
            if owned:
                self._deleting.append(vm)
        vm.delete()
        if owned:
            self._retire(vm)

    def _retire(self, vm: Vm) -> None:
        """Fold a deleted VM's totals into the retired ones, as it leaves the deleting list (counted once)."""
        retired = vm_totals(vm)
        with self._lock:
            self._retired.add(retired)
            self._deleting.remove(vm)

    def _expire_vm(self, vm_id: str, why: str) -> None:
        """The lease reaper's way to delete a VM its client left behind; says which VM and why."""
        with self._lock:
            vm = self._vms.get(vm_id)
        if vm is None:
            return
        log.warning("deleting VM %s (%s): %s", vm_id, vm.spec.name or "unnamed", why)
        self._remove_vm(vm_id, vm)

    def metrics_snapshot(self) -> MetricsSnapshot:
        """Service-wide totals (live, deleting and deleted VMs) and the state of every live VM, for a scrape.

        The VM list and the retired totals are taken together under the lock, so a VM deleted meanwhile
        is counted exactly once; its counters are read outside the lock.
        """
        with self._lock:
            live = list(self._vms.values())
            counted = live + self._deleting
            totals = self._retired.copy()
        for vm in counted:
            totals.add(vm_totals(vm))
        snap = MetricsSnapshot(totals, posted_batches=POSTED_BATCH_SIZES.snapshot())
        for vm in live:
            snap.vm_states[vm.run_state.value] += 1
            snap.vcpu_states += [(vm.vm_id, v.index, vcpu_state_name(v.state)) for v in vm.vcpus]
        return snap

    def shutdown(self, reason: str = "the vcpu service is shutting down", timeout: float = 10.0) -> int:
        """Stop every VM as ``Vm.shut_down`` does (all at once, within ``timeout``), then delete them; returns
        how many there were. A client streaming a VM's events sees its final event with ``reason``."""
        with self._lock:
            vms = list(self._vms.values())
            self._vms.clear()
            self._deleting += vms
        deadline = time.monotonic() + timeout
        stoppers = [threading.Thread(target=vm.shut_down, args=(reason, timeout), name=f"shut-down-{vm.vm_id}",
                                     daemon=True) for vm in vms]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join(max(0.0, deadline - time.monotonic()))
        for vm in vms:
            vm.delete(max(0.1, deadline - time.monotonic()))
            stats = vm.stats(counters_only=True)
            log.info("VM %s stopped (%s): %d exits, %d posted writes delivered", vm.vm_id, reason, stats.exits,
                     sum(v.posted_writes for v in stats.vcpus))
            self._retire(vm)
        return len(vms)


def build_server(listen: str, servicer: VcpuServicer, sec: security.Security | None = None,
                 ) -> tuple[grpc.Server, str, DrainingHealth]:
    """A server with VcpuService, health and reflection, protected by ``sec`` (the process's credentials by
    default: the same ones its channels to device services use); returns it, the address actually bound and its
    health servicer. Raises ``security.SecurityError`` for a non-local address with no protection."""
    address = parse_address(listen)
    sec = security.current() if sec is None else sec
    security.check_listen(address, sec)
    server = security.server(futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="vcpu-rpc"), sec)
    vcpu_pb2_grpc.add_VcpuServiceServicer_to_server(servicer, server)
    health_servicer = DrainingHealth()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (vcpu_pb2.DESCRIPTOR.services_by_name["VcpuService"].full_name, health.SERVICE_NAME,
         reflection.SERVICE_NAME), server)
    port = security.bind(server, address, sec)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    bound = address.target if address.is_unix else f"{address.host}:{port}"
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, health_servicer


def serve(listen: str, ram_cap: int = DEFAULT_RAM_CAP, ready: Callable[[str], None] | None = None,
          on_servicer: Callable[[VcpuServicer], None] | None = None, grace_s: float = 10.0,
          vm_lease_s: float = DEFAULT_LEASE_S) -> None:
    """Run the vcpu service until SIGTERM or SIGINT, then drain (``drain``) and return.

    on_servicer sees the servicer before the server starts (the metrics collector attaches there).
    vm_lease_s: how long a VM nobody follows or names survives (0: forever; see ``vcpu_service.leases``).
    """
    servicer = VcpuServicer(ram_cap=ram_cap, vm_lease_s=vm_lease_s)
    if on_servicer is not None:
        on_servicer(servicer)
    server, bound, health_servicer = build_server(listen, servicer)
    stop = threading.Event()
    received: list[str] = []

    def on_signal(sig: int, _frame: object) -> None:
        received.append(signal.Signals(sig).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    if ready:
        ready(bound)
    stop.wait()
    drain(server, servicer, health_servicer, received[0] if received else "stop", grace_s)


def drain(server: grpc.Server, servicer: VcpuServicer, health_servicer: DrainingHealth, signal_name: str,
          grace_s: float) -> None:
    """Leave without losing an access: NOT_SERVING at once, no new RPCs, every VM paused at an instruction
    boundary with its posted writes delivered and its final event sent (clients streaming events see why),
    then every VM deleted; RPCs still open after ``grace_s`` are cancelled."""
    t0 = time.monotonic()
    health_servicer.drain(("", SERVICE_NAME))
    stopped = server.stop(grace_s)  # refuses new RPCs now; open ones get until the grace ends
    count = servicer.shutdown(f"the vcpu service is shutting down ({signal_name})", max(0.1, grace_s - 0.5))
    log.info("vcpu service drained: %d VM(s) stopped and deleted in %.2f s", count, time.monotonic() - t0)
    stopped.wait(max(0.0, grace_s - (time.monotonic() - t0)))
