"""How runs end, posted writes, PSCI, registers and pause: small A64 programs through the real split."""

from __future__ import annotations

import time

import pytest

from mmiosplit.v1 import vcpu_pb2
from tests.integration.client import LOAD, Services, a64

pytestmark = pytest.mark.integration

SYSTEM_OFF = [0xD2800100, 0xF2B08000, 0xD4000002]  # mov x0,#8; movk x0,#0x8400,lsl#16; hvc #0
SPIN = [0x14000000]  # b .
WFI_LOOP = [0xD503207F, 0x17FFFFFF]  # wfi; b wfi
LOAD_LOOP = [0xD2A14000, 0xB9400001, 0x91000442, 0x17FFFFFE]  # x0=scratch; 1: ldr w1,[x0]; add x2,x2,#1; b 1b
POSTED = [
    0xD2A14200,  # mov x0, #0x0a100000 (posted scratch)
    0x52800021, 0xB9000001,  # mov w1,#1; str w1,[x0]
    0x52800041, 0xB9000401,  # mov w1,#2; str w1,[x0,#4]
    0x52800061, 0xB9000801,  # mov w1,#3; str w1,[x0,#8]
    0x52800081, 0xB9000C01,  # mov w1,#4; str w1,[x0,#12]
    0xB9400002,  # ldr w2,[x0]
    0xB9400C03,  # ldr w3,[x0,#12]
    *SYSTEM_OFF,
]


def test_system_off_ends_the_run(services: Services) -> None:
    vm_id, final = services.run(services.config(a64(*SYSTEM_OFF)))
    services.delete(vm_id)
    assert final.kind == vcpu_pb2.VM_EVENT_KIND_POWERED_OFF
    assert "SYSTEM_OFF" in final.reason


def test_wfi_with_nothing_to_wake_halts(services: Services) -> None:
    vm_id, final = services.run(services.config(a64(*WFI_LOOP)))
    services.delete(vm_id)
    assert final.kind == vcpu_pb2.VM_EVENT_KIND_HALTED
    assert "WFI" in final.reason


def test_instruction_budget(unix_services: Services) -> None:
    vm_id, final = unix_services.run(unix_services.config(a64(0x91000442, 0x17FFFFFF), budget=10_001))
    regs = unix_services.registers(vm_id, 0, "x2", "pc")
    unix_services.delete(vm_id)
    assert final.kind == vcpu_pb2.VM_EVENT_KIND_BUDGET_EXHAUSTED
    # add, b, add, b, ...: 10,001 instructions are 5,001 adds, and the next is the branch at LOAD+4.
    assert regs["x2"] == 5001 and regs["pc"] == LOAD + 4


def test_wall_clock_limit(unix_services: Services) -> None:
    t0 = time.monotonic()
    vm_id, final = unix_services.run(unix_services.config(a64(*SPIN), wall_clock=0.5))
    unix_services.delete(vm_id)
    assert final.kind == vcpu_pb2.VM_EVENT_KIND_TIMED_OUT
    assert 0.4 < time.monotonic() - t0 < 10


def test_posted_writes_reach_the_device_before_the_next_read(services: Services) -> None:
    vm_id, final = services.run(services.config(a64(*POSTED)))
    regs = services.registers(vm_id, 0, "x2", "x3")
    stats = services.stats(vm_id)
    services.delete(vm_id)
    assert final.kind == vcpu_pb2.VM_EVENT_KIND_POWERED_OFF, final
    assert regs == {"x2": 1, "x3": 4}
    assert stats.vcpus[0].posted_writes == 4
    assert stats.vcpus[0].reads == 2 and stats.exits == 2


def test_unmapped_access_reads_as_zero_by_default(unix_services: Services) -> None:
    code = a64(0xD2A40000, 0xB9400001, *SYSTEM_OFF)  # x0=0x20000000; ldr w1,[x0]
    vm_id, final = unix_services.run(unix_services.config(code))
    regs = unix_services.registers(vm_id, 0, "x1")
    unix_services.delete(vm_id)
    assert final.kind == vcpu_pb2.VM_EVENT_KIND_POWERED_OFF
    assert regs["x1"] == 0


def test_unmapped_access_can_stop(unix_services: Services) -> None:
    cfg = unix_services.config(a64(0xD2A40000, 0xB9400001, *SYSTEM_OFF))
    cfg.policies.unmapped_access = vcpu_pb2.UNMAPPED_ACCESS_POLICY_STOP
    vm_id, final = unix_services.run(cfg)
    unix_services.delete(vm_id)
    assert final.kind == vcpu_pb2.VM_EVENT_KIND_ERROR
    assert final.error_kind == vcpu_pb2.VM_ERROR_KIND_UNMAPPED_ACCESS
    assert "0x20000000" in final.reason and final.pc == LOAD + 4


def test_nisv_stops_with_pc_and_instruction(unix_services: Services) -> None:
    # x0=scratch; ldp x1,x2,[x0]: no syndrome; mmiosplit splits it unless strict, as KVM, refuses it
    code = a64(0xD2A14000, 0xA9400801, *SPIN)
    vm_id, final = unix_services.run(unix_services.config(code, stop_on=("nisv",), strict_kvm=True))
    regs = unix_services.registers(vm_id, 0, "x1", "x2", "pc")
    unix_services.delete(vm_id)
    assert final.kind == vcpu_pb2.VM_EVENT_KIND_ERROR
    assert final.error_kind == vcpu_pb2.VM_ERROR_KIND_NISV
    assert final.instruction == 0xA9400801 and final.pc == LOAD + 4 and final.fault_address == 0x0A00_0000
    assert "a9400801" in final.reason and f"0x{LOAD + 4:x}" in final.reason and "pair" in final.reason.lower()
    assert regs == {"x1": 0, "x2": 0, "pc": LOAD + 4}


def test_an_unaligned_device_access_with_no_vectors_ends_the_run_naming_the_alignment_fault(
        unix_services: Services) -> None:
    # MMU off: the unaligned load takes an alignment fault (it never reaches scratch0); VBAR_EL1 is 0, where
    # nothing is, so the vector's fetch ends the run, naming the fault that led there.
    code = a64(0xD2A14000, 0xF281FF80, 0xF9400001, *SPIN)  # x0=0x0a000ffc; ldr x1,[x0]
    vm_id, final = unix_services.run(unix_services.config(code, stop_on=("device_error",)))
    unix_services.delete(vm_id)
    assert final.kind == vcpu_pb2.VM_EVENT_KIND_ERROR
    assert final.error_kind == vcpu_pb2.VM_ERROR_KIND_GUEST_EXCEPTION
    assert "vector of the alignment fault at 0x40080008" in final.reason, final.reason
    assert final.fault_address == 0x200 and final.syndrome == 0x9600_0021


def test_pause_shows_a_consistent_state_and_resume_completes_once(unix_services: Services) -> None:
    services = unix_services
    vm_id = services.create(services.config(a64(*LOAD_LOOP)))
    try:
        services.stub.StartVm(vcpu_pb2.StartVmRequest(vm_id=vm_id))
        for _ in range(20):
            time.sleep(0.02)
            services.stub.PauseVm(vcpu_pb2.PauseVmRequest(vm_id=vm_id))
            resp = services.stub.GetRegisters(vcpu_pb2.GetRegistersRequest(vm_id=vm_id, vcpu_id=0,
                                                                           names=["x2", "pc"]))
            regs = {r.name: r.value for r in resp.registers}
            stats = services.stats(vm_id)
            # x2 counts completed loads: every completed exit retired its add, or is about to.
            reads = stats.vcpus[0].reads
            assert regs["x2"] in (reads, reads - 1), (regs, reads)
            assert regs["pc"] in (LOAD + 4, LOAD + 8, LOAD + 12)
            if resp.exit_pending:
                assert regs["pc"] == LOAD + 4
            services.stub.ResumeVm(vcpu_pb2.ResumeVmRequest(vm_id=vm_id))
        assert services.stats(vm_id).vcpus[0].reads > 20
    finally:
        services.delete(vm_id)


def test_registers_cannot_be_read_while_running(unix_services: Services) -> None:
    import grpc

    vm_id = unix_services.create(unix_services.config(a64(0x91000442, 0x17FFFFFF)))
    try:
        unix_services.stub.StartVm(vcpu_pb2.StartVmRequest(vm_id=vm_id))
        time.sleep(0.1)
        with pytest.raises(grpc.RpcError) as info:
            unix_services.registers(vm_id, 0, "x2")
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "pause the VM first" in info.value.details()
    finally:
        unix_services.delete(vm_id)


RESET_THREE_TIMES = [
    0xD2A80201, 0xB9400022, 0x11000442, 0xB9000022,  # x1=0x40100000; w2 = ++boots (RAM survives reset)
    0xD2A14004, 0xB9410083, 0xB9000423,  # x4=scratch; w3 = scratch[0x100]; RAM[x1+4] = w3
    0x52800AA5, 0xB9010085,  # scratch[0x100] = 0x55 (a device reset must clear it)
    0x71000C5F, 0x540000AA,  # if boots >= 3: power off
    0xD2800120, 0xF2B08000, 0xD4000002, 0x14000000,  # PSCI SYSTEM_RESET
    *SYSTEM_OFF, 0x14000000,
]


def test_system_reset_reboots_with_devices_reset_and_ram_kept(unix_services: Services) -> None:
    vm_id = unix_services.create(unix_services.config(a64(*RESET_THREE_TIMES)))
    final = unix_services.start_and_wait(vm_id)
    events = [r.event for r in unix_services.stub.StreamVmEvents(vcpu_pb2.StreamVmEventsRequest(vm_id=vm_id))]
    ram = unix_services.stub.ReadMemory(vcpu_pb2.ReadMemoryRequest(vm_id=vm_id, address=0x4010_0000, length=8))
    unix_services.delete(vm_id)
    assert final.kind == vcpu_pb2.VM_EVENT_KIND_POWERED_OFF
    assert sum(e.kind == vcpu_pb2.VM_EVENT_KIND_RESET for e in events) == 2
    boots, seen = int.from_bytes(ram.data[:4], "little"), int.from_bytes(ram.data[4:], "little")
    assert boots == 3
    assert seen == 0, "the scratch device kept its contents across SYSTEM_RESET"
