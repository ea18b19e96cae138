"""One VM as the load tester drives it: over gRPC in a vcpu service, or in this process (the local transport).

Both offer the same few calls (start, read and write memory, pause, resume, statistics, the final event,
delete) and return the same protos, so a run and its local-transport floor are measured by one procedure.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Protocol

import grpc

from device_service.config import ConfigError, build_bus, parse_device_specs
from device_service.local import LocalEndpoint
from mmiosplit.v1 import common_pb2, vcpu_pb2, vcpu_pb2_grpc
from mmiosplit_cli.loadtest.guest import RAM_BASE, RAM_SIZE, GuestProgram
from mmiosplit_cli.runner import EXIT_STATUS, channel
from vcpu_service.server import event_to_wire, spec_from_proto, stats_to_wire
from vcpu_service.vm import Vm, VmConfigError, VmStateError

CREATE_TIMEOUT_S = 60.0
CALL_TIMEOUT_S = 30.0


class VmError(RuntimeError):
    """The VM could not be created or driven; the message names the service and what it said."""


def vm_config(program: GuestProgram, vcpus: int, device_services: list[str], cpu_model: str = "",
              name: str = "loadtest", irq_route: tuple[str, int] | None = None) -> vcpu_pb2.VmConfig:
    """The VmConfig of a load-test guest: small RAM, every fault policy ``stop`` so a failure ends the run
    with a message instead of an external abort the guest has no vectors for. With ``irq_route`` (device,
    SPI): QEMU's virt board, for its GIC, with the device's line 0 wired to that SPI."""
    cfg = vcpu_pb2.VmConfig(
        name=name,
        architecture=common_pb2.ARCHITECTURE_AARCH64 if program.arch == "aarch64" else common_pb2.ARCHITECTURE_ARM,
        cpu_model=cpu_model, vcpu_count=vcpus,
        ram=[vcpu_pb2.MemoryRegion(base=RAM_BASE, size=RAM_SIZE)], device_services=device_services,
        images=[vcpu_pb2.Image(name=f"{name}-{program.arch}", data=program.image, load_address=program.load_address)],
        entry_point=program.entry,
    )
    cfg.policies.unmapped_access = vcpu_pb2.UNMAPPED_ACCESS_POLICY_STOP
    cfg.policies.device_error = vcpu_pb2.FAULT_POLICY_STOP
    cfg.policies.deadline = vcpu_pb2.FAULT_POLICY_STOP
    cfg.policies.nisv = vcpu_pb2.FAULT_POLICY_STOP
    if irq_route is not None:
        cfg.machine = "virt"
        cfg.irq_routes.add(device=irq_route[0], spi=irq_route[1])
    return cfg


class VmHandle(Protocol):
    """What the measurement needs from a VM."""

    label: str

    def start(self) -> None: ...
    def read_memory(self, address: int, length: int) -> bytes: ...
    def write_memory(self, address: int, data: bytes) -> None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def stats(self, histograms: bool = False, counters_only: bool = False) -> vcpu_pb2.GetStatsResponse: ...
    def final(self) -> vcpu_pb2.VmEvent | None: ...
    def delete(self) -> None: ...


def _rpc_error(what: str, address: str, exc: grpc.RpcError) -> VmError:
    return VmError(f"vcpu service {address}: {what}: {exc.code().name}: {exc.details()}")


class GrpcVm:
    """A VM in a vcpu service; its events are followed on a thread so the final one is seen at once."""

    def __init__(self, vcpu_address: str, config: vcpu_pb2.VmConfig, label: str = "") -> None:
        self.label = label or vcpu_address
        self.address = vcpu_address
        self._channel = channel(vcpu_address)
        self._stub = vcpu_pb2_grpc.VcpuServiceStub(self._channel)
        try:
            created = self._stub.CreateVm(vcpu_pb2.CreateVmRequest(config=config), timeout=CREATE_TIMEOUT_S)
        except grpc.RpcError as exc:
            self._channel.close()
            raise _rpc_error("cannot create the VM", vcpu_address, exc) from None
        self.vm_id = created.vm_id
        self.regions = list(created.regions)
        self._final: vcpu_pb2.VmEvent | None = None
        self._final_lock = threading.Lock()
        self._events = self._stub.StreamVmEvents(vcpu_pb2.StreamVmEventsRequest(vm_id=self.vm_id))
        self._thread = threading.Thread(target=self._follow, name=f"events-{self.vm_id}", daemon=True)
        self._thread.start()
        self._deleted = False

    def _follow(self) -> None:
        try:
            for resp in self._events:
                if resp.event.kind in EXIT_STATUS:
                    with self._final_lock:
                        self._final = resp.event
                    return
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                with self._final_lock:
                    self._final = vcpu_pb2.VmEvent(kind=vcpu_pb2.VM_EVENT_KIND_ERROR,
                                                   reason=f"lost the vcpu service {self.address}: {exc.code().name}")

    def _call(self, what: str, method: str, request: object) -> object:
        try:
            return getattr(self._stub, method)(request, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise _rpc_error(what, self.address, exc) from None

    def start(self) -> None:
        self._call("cannot start the VM", "StartVm", vcpu_pb2.StartVmRequest(vm_id=self.vm_id))

    def read_memory(self, address: int, length: int) -> bytes:
        resp = self._call("ReadMemory", "ReadMemory",
                          vcpu_pb2.ReadMemoryRequest(vm_id=self.vm_id, address=address, length=length))
        return bytes(resp.data)  # type: ignore[attr-defined]

    def write_memory(self, address: int, data: bytes) -> None:
        self._call("WriteMemory", "WriteMemory",
                   vcpu_pb2.WriteMemoryRequest(vm_id=self.vm_id, address=address, data=data))

    def pause(self) -> None:
        self._call("PauseVm", "PauseVm", vcpu_pb2.PauseVmRequest(vm_id=self.vm_id))

    def resume(self) -> None:
        self._call("ResumeVm", "ResumeVm", vcpu_pb2.ResumeVmRequest(vm_id=self.vm_id))

    def stats(self, histograms: bool = False, counters_only: bool = False) -> vcpu_pb2.GetStatsResponse:
        resp = self._call("GetStats", "GetStats", vcpu_pb2.GetStatsRequest(
            vm_id=self.vm_id, include_histograms=histograms, counters_only=counters_only))
        assert isinstance(resp, vcpu_pb2.GetStatsResponse)
        return resp

    def final(self) -> vcpu_pb2.VmEvent | None:
        with self._final_lock:
            return self._final

    def delete(self) -> None:
        if self._deleted:
            return
        self._deleted = True
        with contextlib.suppress(grpc.RpcError):
            self._stub.DeleteVm(vcpu_pb2.DeleteVmRequest(vm_id=self.vm_id), timeout=CALL_TIMEOUT_S)
        self._events.cancel()
        self._channel.close()


class LocalVm:
    """The same VM in this process with the device models on the local transport (no gRPC at all)."""

    def __init__(self, config: vcpu_pb2.VmConfig, device_specs: list[str], label: str = "local") -> None:
        self.label = label
        try:
            bus = build_bus(parse_device_specs(device_specs))
            self.vm = Vm(spec_from_proto(config), [LocalEndpoint(bus)], ram_cap=1 << 32)
        except (ConfigError, VmConfigError, ValueError) as exc:
            raise VmError(f"local transport: cannot create the VM: {exc}") from None
        self._deleted = False

    def _guard(self, what: str, fn: object) -> object:
        try:
            return fn()  # type: ignore[operator]
        except (VmConfigError, VmStateError) as exc:
            raise VmError(f"local transport: {what}: {exc}") from None

    def start(self) -> None:
        self._guard("start", self.vm.start)

    def read_memory(self, address: int, length: int) -> bytes:
        return bytes(self._guard("ReadMemory", lambda: self.vm.read_memory(address, length)))  # type: ignore[call-overload]

    def write_memory(self, address: int, data: bytes) -> None:
        self._guard("WriteMemory", lambda: self.vm.write_memory(address, data))

    def pause(self) -> None:
        self._guard("pause", self.vm.pause)

    def resume(self) -> None:
        self._guard("resume", self.vm.resume)

    def stats(self, histograms: bool = False, counters_only: bool = False) -> vcpu_pb2.GetStatsResponse:
        return stats_to_wire(self.vm.stats(histograms, counters_only))

    def final(self) -> vcpu_pb2.VmEvent | None:
        final = self.vm.events.final
        return None if final is None else event_to_wire(final)

    def delete(self) -> None:
        if not self._deleted:
            self._deleted = True
            self.vm.delete()
