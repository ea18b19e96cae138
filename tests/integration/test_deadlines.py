"""Deadlines per region and Cancel (issue 12): a device learns each exit's deadline; when it passes, the vCPU
cancels the access; an access the device had not started is never performed, one it had is "performed late";
the deadline policy acts and the event names the device, the address, the PC and the instruction.

A slow scratch device (every access takes 400 ms with the device service's lock held) makes another device's
access wait behind it; a fast one alone makes an access that is merely late.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from mmiosplit.v1 import vcpu_pb2, vcpu_pb2_grpc
from mmiosplit_cli.launcher import local_services
from mmiosplit_cli.loadtest.guest import RAM_BASE, RAM_SIZE, build_program, parse_mix
from mmiosplit_cli.runner import channel
from tests.integration.client import a64

pytestmark = pytest.mark.integration

SLOW, FAST, LATE = 0x0A00_0000, 0x0A10_0000, 0x0A20_0000
DEVICES = [f"scratch@{SLOW:#x},size=0x1000,delay=400000,name=slow", f"scratch@{FAST:#x},size=0x1000,name=fast",
           f"scratch@{LATE:#x},size=0x1000,delay=300000,deadline=100,name=late"]


@pytest.fixture(scope="module")
def services() -> Iterator[tuple[vcpu_pb2_grpc.VcpuServiceStub, str]]:
    args = [a for d in DEVICES for a in ("--device", d)]
    with local_services(args) as (vaddr, daddr, _handle):
        assert vaddr and daddr
        with channel(vaddr) as ch:
            yield vcpu_pb2_grpc.VcpuServiceStub(ch), daddr


def _run(stub: vcpu_pb2_grpc.VcpuServiceStub, cfg: vcpu_pb2.VmConfig, timeout: float = 30) -> tuple[
        str, vcpu_pb2.VmEvent]:
    vm_id = stub.CreateVm(vcpu_pb2.CreateVmRequest(config=cfg), timeout=60).vm_id
    events = stub.StreamVmEvents(vcpu_pb2.StreamVmEventsRequest(vm_id=vm_id), timeout=timeout)
    stub.StartVm(vcpu_pb2.StartVmRequest(vm_id=vm_id))
    for resp in events:
        if resp.event.kind in (vcpu_pb2.VM_EVENT_KIND_ERROR, vcpu_pb2.VM_EVENT_KIND_POWERED_OFF,
                               vcpu_pb2.VM_EVENT_KIND_STOPPED):
            return vm_id, resp.event
    raise AssertionError("no final event")


def _read(stub: vcpu_pb2_grpc.VcpuServiceStub, daddr: str, address: int) -> int:
    """A 4-byte read of a device through a VM of its own (x1 = [x0]; PSCI SYSTEM_OFF)."""
    movz, movk = 0xD2800000 | (address & 0xFFFF) << 5, 0xF2A00000 | (address >> 16 & 0xFFFF) << 5
    cfg = _config(a64(movz, movk, 0xB9400001, 0xD2800100, 0xF2B08000, 0xD4000002), daddr)
    cfg.region_deadlines.add(device="late", deadline_ms=3000)  # the configuration overrides what it declares
    vm_id, final = _run(stub, cfg)
    assert final.kind == vcpu_pb2.VM_EVENT_KIND_POWERED_OFF, final
    value = next(r.value for r in stub.GetRegisters(vcpu_pb2.GetRegistersRequest(
        vm_id=vm_id, names=["x1"])).registers)
    stub.DeleteVm(vcpu_pb2.DeleteVmRequest(vm_id=vm_id))
    return value


def _config(image: bytes, daddr: str, vcpus: int = 1, entry: int = RAM_BASE) -> vcpu_pb2.VmConfig:
    from mmiosplit.v1 import common_pb2
    cfg = vcpu_pb2.VmConfig(architecture=common_pb2.ARCHITECTURE_AARCH64, vcpu_count=vcpus,
                            ram=[vcpu_pb2.MemoryRegion(base=RAM_BASE, size=RAM_SIZE)], device_services=[daddr],
                            images=[vcpu_pb2.Image(name="t", data=image, load_address=RAM_BASE)], entry_point=entry)
    cfg.policies.deadline = vcpu_pb2.FAULT_POLICY_STOP
    return cfg


def test_an_access_waiting_behind_a_slow_device_is_cancelled_and_never_performed(
        services: tuple[vcpu_pb2_grpc.VcpuServiceStub, str]) -> None:
    stub, daddr = services
    # vCPU 0 writes the slow device in a loop; vCPU 1 writes 0x77 to the fast one, whose deadline is 50 ms here:
    # its write waits for the service's lock behind a 400 ms access, so it is cancelled before it starts.
    program = build_program("aarch64", parse_mix("1w"), 4, [SLOW, FAST + 0x10], 0, 0)
    cfg = _config(program.image, daddr, vcpus=2, entry=program.entry)
    cfg.images[0].load_address = program.load_address
    cfg.region_deadlines.add(device="fast", deadline_ms=50)
    vm_id = stub.CreateVm(vcpu_pb2.CreateVmRequest(config=cfg), timeout=60).vm_id
    stub.WriteMemory(vcpu_pb2.WriteMemoryRequest(vm_id=vm_id, address=program.go_address, data=b"\1\0\0\0"))
    t0 = time.monotonic()
    events = stub.StreamVmEvents(vcpu_pb2.StreamVmEventsRequest(vm_id=vm_id), timeout=60)
    stub.StartVm(vcpu_pb2.StartVmRequest(vm_id=vm_id))
    final = next(r.event for r in events if r.event.kind == vcpu_pb2.VM_EVENT_KIND_ERROR)
    took = time.monotonic() - t0
    stub.DeleteVm(vcpu_pb2.DeleteVmRequest(vm_id=vm_id))
    assert final.error_kind == vcpu_pb2.VM_ERROR_KIND_DEADLINE, final
    assert "never performed" in final.reason and "cancelled" in final.reason, final.reason
    assert "fast" in final.reason and f"0x{FAST + 0x10:x}" in final.reason and "0xb9000295" in final.reason
    assert final.vcpu_id == 1 and final.fault_address == FAST + 0x10
    assert took < 5, took  # the 50 ms deadline acted, not the VM's 5 s default
    time.sleep(1)  # the slow access in progress finishes; the cancelled write must still not happen
    assert _read(stub, daddr, FAST + 0x10) == 0


def test_an_access_the_device_was_performing_is_reported_performed_late(
        services: tuple[vcpu_pb2_grpc.VcpuServiceStub, str]) -> None:
    stub, daddr = services
    # The `late` device declares a 100 ms deadline and takes 300 ms: the write was under way when the cancel came.
    program = build_program("aarch64", parse_mix("1w"), 4, [LATE + 0x20], 0, 1)
    cfg = _config(program.image, daddr, entry=program.entry)
    cfg.images[0].load_address = program.load_address
    vm_id = stub.CreateVm(vcpu_pb2.CreateVmRequest(config=cfg), timeout=60).vm_id
    stub.WriteMemory(vcpu_pb2.WriteMemoryRequest(vm_id=vm_id, address=program.go_address, data=b"\1\0\0\0"))
    events = stub.StreamVmEvents(vcpu_pb2.StreamVmEventsRequest(vm_id=vm_id), timeout=60)
    stub.StartVm(vcpu_pb2.StartVmRequest(vm_id=vm_id))
    final = next(r.event for r in events if r.event.kind in (vcpu_pb2.VM_EVENT_KIND_ERROR,
                                                              vcpu_pb2.VM_EVENT_KIND_POWERED_OFF))
    stub.DeleteVm(vcpu_pb2.DeleteVmRequest(vm_id=vm_id))
    assert final.kind == vcpu_pb2.VM_EVENT_KIND_ERROR and final.error_kind == vcpu_pb2.VM_ERROR_KIND_DEADLINE, final
    assert "performed late" in final.reason and "100 ms deadline" in final.reason, final.reason
    assert "late" in final.reason and f"0x{LATE + 0x20:x}" in final.reason
    assert _read(stub, daddr, LATE + 0x20) == 1  # it was performed (the loop counter, 1)


def test_a_region_deadline_naming_nothing_is_refused(services: tuple[vcpu_pb2_grpc.VcpuServiceStub, str]) -> None:
    import grpc
    stub, daddr = services
    cfg = _config(a64(0xD4000002), daddr)
    cfg.region_deadlines.add(device="nope", deadline_ms=10)
    with pytest.raises(grpc.RpcError) as info:
        stub.CreateVm(vcpu_pb2.CreateVmRequest(config=cfg), timeout=60)
    assert "region deadline nope=10ms" in info.value.details() and "fast/mem" in info.value.details()
