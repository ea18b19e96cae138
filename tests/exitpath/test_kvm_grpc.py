"""A subset of section 5 through both real services over gRPC (UNIX socket and TCP), against the same guest
run in-process: the final event and every register must be identical, so the transport changes nothing.

The session's device service hosts fixed devices (tests/integration/conftest.py), so each guest first
stores the value it later loads, into the RAM-like scratch0 at 0x0a000000.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from mmiosplit.v1 import vcpu_pb2
from tests.exitpath.harness import (
    A32,
    A64,
    HOLE,
    MASK32,
    MASK64,
    T32,
    VBAR,
    Abort,
    Machine,
    architecture,
    body_addr,
    build_image,
    code,
    entry_point,
    event_from_wire,
    interpret,
    policies,
    register_names,
    words,
)
from tests.integration.client import Services
from tests.integration.conftest import DEVICES
from vcpu_service.domain import EventKind, VmEvent

pytestmark = pytest.mark.integration

SCRATCH = 0x0A00_0000  # scratch0
POSTED = 0x0A10_0000  # posted0: a scratch device whose writes are posted
UART = 0x0900_0000  # uart0, a PL011


@dataclass(frozen=True)
class Case:
    isa: str
    body: bytes
    regs: dict[str, int]
    check: Callable[[VmEvent, dict[str, int], Abort | None], None]


def _finished(final: VmEvent, abort: Abort | None) -> None:
    assert final.kind == EventKind.POWERED_OFF and abort is None, (final, abort)


def _c01_c03(final: VmEvent, regs: dict[str, int], abort: Abort | None) -> None:
    _finished(final, abort)
    assert regs["x1"] == 0xFFFF_FF80  # ldrsb w1: sign-extended to 32 bits, upper half clear
    assert regs["x4"] == 0x8000_0000  # ldr w4: upper half clear


def _c12(final: VmEvent, regs: dict[str, int], abort: Abort | None) -> None:
    _finished(final, abort)
    assert regs["x2"] == 0x55  # the first byte in the device is the most significant one of w1
    assert regs["x3"] == 0x5566_7788  # and a big-endian load gives the word back


def _c14(final: VmEvent, regs: dict[str, int], abort: Abort | None) -> None:
    _finished(final, abort)
    assert regs["x0"] == SCRATCH  # +8 by the post-index store, -8 by the pre-index load
    assert regs["x2"] == 0x5566_7788


def _c17(final: VmEvent, regs: dict[str, int], abort: Abort | None) -> None:
    _finished(final, abort)  # no syndrome, emulated as two 8-byte exits each
    assert regs["x1"] == 0x33 and regs["x2"] == 0x44 and regs["x0"] == SCRATCH + 16


def _c21(final: VmEvent, regs: dict[str, int], abort: Abort | None) -> None:
    _finished(final, abort)
    assert regs["r1"] == 0 and regs["r2"] == 1


def _c22(final: VmEvent, regs: dict[str, int], abort: Abort | None) -> None:
    assert abort is not None, final
    assert abort.esr == 0x9600_0010 and abort.far == UART + 1 and abort.elr == body_addr(A64)
    assert regs["x1"] == 0x77


def _c25_c29(final: VmEvent, regs: dict[str, int], abort: Abort | None) -> None:
    _finished(final, abort)
    assert regs["r1"] == 0xFFFF_FF80 and regs["r4"] == 1  # ldrsb; then PC + 2 exactly (the marker ran)


def _c32(final: VmEvent, regs: dict[str, int], abort: Abort | None) -> None:
    _finished(final, abort)
    assert (regs["x2"], regs["x6"]) == (0x11, 0x22)  # the posted writes landed before the reads


CASES = {
    "c01-c03-a64-ldr-w-ldrsb": Case(A64, words(
        0xB9000003,  # str   w3, [x0]              (w3 = 0x80)
        0xB9000805,  # str   w5, [x0, #8]          (w5 = 0x80000000)
        0x39C00001,  # ldrsb w1, [x0]
        0xB9400804,  # ldr   w4, [x0, #8]
    ), {"x0": SCRATCH, "x1": MASK64, "x3": 0x80, "x4": MASK64, "x5": 0x8000_0000}, _c01_c03),
    "c12-a64-big-endian": Case(A64, words(
        0xD5381009,  # mrs  x9, sctlr_el1
        0xB2670129,  # orr  x9, x9, #0x2000000     (EE)
        0xD5181009,  # msr  sctlr_el1, x9
        0xD5033FDF,  # isb
        0xB9000001,  # str  w1, [x0]
        0x39400002,  # ldrb w2, [x0]
        0xB9400003,  # ldr  w3, [x0]
    ), {"x0": SCRATCH, "x1": 0x1122_3344_5566_7788}, _c12),
    "c14-a64-writeback": Case(A64, words(
        0xF8008401,  # str x1, [x0], #8
        0xB85F8C02,  # ldr w2, [x0, #-8]!
    ), {"x0": SCRATCH, "x1": 0x1122_3344_5566_7788}, _c14),
    "c17-a64-stp-ldp": Case(A64, words(
        0xA9001003,  # stp x3, x4, [x0]
        0xA8C10801,  # ldp x1, x2, [x0], #16
    ), {"x0": SCRATCH, "x1": 0x11, "x2": 0x22, "x3": 0x33, "x4": 0x44}, _c17),
    "c21-a32-hole": Case(A32, words(
        0xE5901000,  # ldr r1, [r0]                (nothing at r0)
        0xE2822001,  # add r2, r2, #1
    ), {"r0": HOLE, "r1": MASK32}, _c21),
    "c22-a64-device-error": Case(A64, words(
        0x39400001,  # ldrb w1, [x0]               (PL011 at +1: not a register, the device refuses)
    ), {"x0": UART + 1, "x1": 0x77}, _c22),
    "c25-c29-t16-ldrsb": Case(T32, code(T32,
        0x7003,  # strb  r3, [r0, #0]              (r3 = 0x80)
        0x5681,  # ldrsb r1, [r0, r2]              (r2 = 0)
        0x3401,  # adds  r4, #1
    ), {"r0": SCRATCH, "r3": 0x80}, _c25_c29),
    "c32-a64-posted": Case(A64, words(
        0xB9000001,  # str w1, [x0]                (posted)
        0xB9000403,  # str w3, [x0, #4]            (posted)
        0xB9400002,  # ldr w2, [x0]
        0xB9400406,  # ldr w6, [x0, #4]
    ), {"x0": POSTED, "x1": 0x11, "x3": 0x22}, _c32),
}


def _run_local(case: Case) -> tuple[VmEvent, dict[str, int]]:
    with Machine(case.isa, case.body, regs=case.regs, devices=[], specs=DEVICES, pol=policies()) as machine:
        machine.start()
        final = machine.wait()
        return final, machine.registers(*register_names(case.isa))


def _run_grpc(services: Services, case: Case) -> tuple[VmEvent, dict[str, int]]:
    zero = "x0" if case.isa == A64 else "r0"
    preset = {k: v for k, v in case.regs.items() if k != zero}
    if case.isa == A64:
        preset["vbar_el1"] = VBAR
    cfg = services.config(build_image(case.isa, case.body, case.regs.get(zero, 0)),
                          arch=architecture(case.isa), entry=entry_point(case.isa))
    vm_id = services.create(cfg)
    try:
        services.stub.SetRegisters(vcpu_pb2.SetRegistersRequest(
            vm_id=vm_id, vcpu_id=0, registers=[vcpu_pb2.Register(name=k, value=v) for k, v in preset.items()]))
        final = event_from_wire(services.start_and_wait(vm_id, timeout=30))
        return final, services.registers(vm_id, 0, *register_names(case.isa))
    finally:
        services.delete(vm_id)


@pytest.mark.parametrize("name", list(CASES))
def test_the_same_guest_over_grpc_and_in_process(services: Services, name: str) -> None:
    case = CASES[name]
    local_final, local_regs = _run_local(case)
    remote_final, remote_regs = _run_grpc(services, case)
    for final, raw in ((local_final, local_regs), (remote_final, remote_regs)):
        regs, abort = interpret(case.isa, final, raw)
        case.check(final, regs, abort)
    assert (remote_final.kind, remote_final.pc) == (local_final.kind, local_final.pc)
    assert remote_regs == local_regs  # every register, bit for bit
