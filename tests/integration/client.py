"""A small test client of the VcpuService: create a VM from raw code, run it, inspect it."""

from __future__ import annotations

import contextlib
import struct
import threading
from dataclasses import dataclass, field

import grpc

from mmiosplit.v1 import common_pb2, vcpu_pb2, vcpu_pb2_grpc
from mmiosplit.wire import FINAL_EVENT_KINDS as FINAL_KINDS
from mmiosplit_cli.launcher import LocalServices
from mmiosplit_cli.runner import channel

RAM_BASE = 0x4000_0000
LOAD = 0x4008_0000


def a64(*words: int) -> bytes:
    """Little-endian A64 code from instruction words."""
    return struct.pack(f"<{len(words)}I", *words)


# An A64 guest with an exception vector table: VBAR_EL1 = LOAD + 0x800; the synchronous exception from
# the current EL (SP_EL1) lands at +0x200 and saves ESR/FAR/ELR/SPSR_EL1 into x10..x13, then powers off.
SEA_PROLOGUE = [0x10004009, 0xD518C009, 0xD5033FDF]  # adr x9, LOAD+0x800; msr vbar_el1, x9; isb
SEA_HANDLER = [0xD538520A, 0xD538600B, 0xD538402C, 0xD538400D,  # mrs x10..x13, esr/far/elr/spsr_el1
               0xD2800100, 0xF2B08000, 0xD4000002, 0x14000000]  # PSCI SYSTEM_OFF


def a64_with_vectors(*body: int) -> bytes:
    """SEA_PROLOGUE, then body (at LOAD + 0xc) followed by `b .`, with the vector table at LOAD + 0x800."""
    image = bytearray(0xA00 + 4 * len(SEA_HANDLER))
    code = a64(*SEA_PROLOGUE, *body, 0x14000000)
    assert len(code) <= 0x800
    image[:len(code)] = code
    image[0xA00:] = a64(*SEA_HANDLER)
    return bytes(image)


@dataclass
class Services:
    vcpu: str
    devices: str
    handle: LocalServices
    _stub: vcpu_pb2_grpc.VcpuServiceStub | None = field(default=None, repr=False)

    @property
    def stub(self) -> vcpu_pb2_grpc.VcpuServiceStub:
        if self._stub is None:
            self._stub = vcpu_pb2_grpc.VcpuServiceStub(channel(self.vcpu))
        return self._stub

    def config(self, image: bytes, *, arch: str = "aarch64", vcpus: int = 1, entry: int | None = None,
               **kw: object) -> vcpu_pb2.VmConfig:
        cfg = vcpu_pb2.VmConfig(
            architecture=common_pb2.ARCHITECTURE_AARCH64 if arch == "aarch64" else common_pb2.ARCHITECTURE_ARM,
            vcpu_count=vcpus, ram=[vcpu_pb2.MemoryRegion(base=RAM_BASE, size=16 * 2**20)],
            device_services=[self.devices], images=[vcpu_pb2.Image(name="test", data=image, load_address=LOAD)],
            entry_point=LOAD if entry is None else entry,
        )
        for k, v in kw.items():
            if k == "stop_on":  # fault policies to set to STOP, e.g. stop_on=("nisv", "device_error")
                for name in v:  # type: ignore[attr-defined]
                    setattr(cfg.policies, name, vcpu_pb2.FAULT_POLICY_STOP)
            elif k == "budget":
                cfg.limits.instruction_budget = int(v)  # type: ignore[call-overload]
            elif k == "wall_clock":
                cfg.limits.wall_clock_seconds = float(v)  # type: ignore[arg-type]
            else:
                setattr(cfg, k, v)
        return cfg

    def create(self, cfg: vcpu_pb2.VmConfig) -> str:
        return str(self.stub.CreateVm(vcpu_pb2.CreateVmRequest(config=cfg), timeout=30).vm_id)

    def start_and_wait(self, vm_id: str, timeout: float = 60) -> vcpu_pb2.VmEvent:
        events: list[vcpu_pb2.VmEvent] = []
        done = threading.Event()

        def follow() -> None:
            for r in self.stub.StreamVmEvents(vcpu_pb2.StreamVmEventsRequest(vm_id=vm_id), timeout=timeout):
                events.append(r.event)
            done.set()

        threading.Thread(target=follow, daemon=True).start()
        self.stub.StartVm(vcpu_pb2.StartVmRequest(vm_id=vm_id), timeout=30)
        assert done.wait(timeout), f"VM {vm_id} did not finish within {timeout} s: {events}"
        final = [e for e in events if e.kind in FINAL_KINDS]
        assert len(final) == 1, events
        return final[0]

    def registers(self, vm_id: str, vcpu: int = 0, *names: str) -> dict[str, int]:
        resp = self.stub.GetRegisters(vcpu_pb2.GetRegistersRequest(vm_id=vm_id, vcpu_id=vcpu, names=list(names)))
        return {r.name: r.value for r in resp.registers}

    def stats(self, vm_id: str) -> vcpu_pb2.GetStatsResponse:
        return self.stub.GetStats(vcpu_pb2.GetStatsRequest(vm_id=vm_id))

    def delete(self, vm_id: str) -> None:
        with contextlib.suppress(grpc.RpcError):
            self.stub.DeleteVm(vcpu_pb2.DeleteVmRequest(vm_id=vm_id), timeout=30)

    def run(self, cfg: vcpu_pb2.VmConfig, timeout: float = 60) -> tuple[str, vcpu_pb2.VmEvent]:
        vm_id = self.create(cfg)
        return vm_id, self.start_and_wait(vm_id, timeout)
