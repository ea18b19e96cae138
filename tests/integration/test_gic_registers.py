"""The virt board's GIC answers its registers in the vcpu service: no exit, banked per vCPU."""

from __future__ import annotations

import grpc
import pytest

from mmiosplit.v1 import vcpu_pb2
from tests.integration.client import Services, a64

pytestmark = pytest.mark.integration

LOAD = 0x4020_0000

SYSTEM_OFF = [0xD2800100, 0xF2B08000, 0xD4000002]
# x0 = GICD; w1 = GICD_TYPER; x3 = GICC; w2 = GICC_IIDR; w4 = 1; str w4, GICD_CTLR; w5 = GICD_CTLR;
# w6 = GICD_ITARGETSR0 (SGI 0..3: this CPU's own bit in each byte)
GIC_PROBE = [0xD2A10000, 0xB9400401, 0xD2A10023, 0xB940FC62, 0x52800024, 0xB9000004, 0xB9400005, 0xB9480006,
             *SYSTEM_OFF]


def test_gic_registers_are_answered_in_process(unix_services: Services) -> None:
    cfg = unix_services.config(a64(*GIC_PROBE), vcpus=2, machine="virt", stop_on=("device_error",))
    cfg.images[0].load_address = cfg.entry_point = LOAD  # past the device tree virt puts at the start of RAM
    vm_id, final = unix_services.run(cfg, timeout=30)
    regs = unix_services.registers(vm_id, 0, "x1", "x2", "x5", "x6")
    stats = unix_services.stats(vm_id)
    unix_services.delete(vm_id)
    assert final.kind == vcpu_pb2.VM_EVENT_KIND_POWERED_OFF, final
    assert regs["x1"] == (288 // 32 - 1) | (1 << 5)  # GICD_TYPER: 288 interrupts, 2 CPUs
    assert regs["x2"] == 0x0002_043B  # GICC_IIDR, as QEMU's GICv2
    assert regs["x5"] == 1  # GICD_CTLR read back
    assert regs["x6"] == 0x0101_0101  # vCPU 0's own bit, banked
    assert stats.exits == 0  # none of it left the vcpu service


def test_a_virt_vm_with_more_vcpus_than_a_gicv2_takes_is_refused(unix_services: Services) -> None:
    cfg = unix_services.config(a64(*SYSTEM_OFF), vcpus=9, machine="virt")
    with pytest.raises(grpc.RpcError) as info:
        unix_services.create(cfg)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "GICv2" in info.value.details() and "8" in info.value.details()


def test_a_register_pair_is_split_into_two_in_process_gic_accesses(unix_services: Services) -> None:
    # x0 = GICD; ldp w1, w2, [x0]: GICD_CTLR then GICD_TYPER, no syndrome, two 4-byte accesses the GIC answers.
    cfg = unix_services.config(a64(0xD2A10000, 0x29400801, *SYSTEM_OFF), machine="virt", stop_on=("device_error",))
    cfg.images[0].load_address = cfg.entry_point = LOAD
    vm_id, final = unix_services.run(cfg, timeout=30)
    regs = unix_services.registers(vm_id, 0, "x1", "x2")
    stats = unix_services.stats(vm_id)
    unix_services.delete(vm_id)
    assert final.kind == vcpu_pb2.VM_EVENT_KIND_POWERED_OFF, final
    assert regs["x1"] == 0 and regs["x2"] == (288 // 32 - 1)  # GICD_CTLR, GICD_TYPER (one CPU)
    assert stats.exits == 0
