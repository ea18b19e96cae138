"""kvm-mmio.md section 5, cases 23 and 24: the completion is applied exactly once.

A device model that holds the access open (a ``threading.Event`` gate) lets the test pause the VM and
inspect the vCPU while its exit is pending, the way a signal or a register dump interrupts KVM_RUN after
KVM_EXIT_MMIO. KVM's ``mmio_needed`` guard exists because a second KVM_RUN once skipped an instruction
twice [S25].
"""

from __future__ import annotations

import threading
import time

import pytest

from tests.exitpath.harness import (
    A32,
    A64,
    DEV,
    T32,
    Access,
    Counter,
    Machine,
    Probe,
    body_addr,
    code,
    words,
)
from vcpu_service.domain import EventKind
from vcpu_service.vm import VmStateError

PENDING = [
    # (isa, body, registers before, registers expected after)
    (A64, words(
        0xB9400001,  # ldr w1, [x0]
        0x91000442,  # add x2, x2, #1
    ), {"x0": DEV, "x1": 0x77, "x2": 0}, {"x0": DEV, "x1": 0xC0DE_F00D, "x2": 1}),
    (A32, words(
        0xE0D010B2,  # ldrh r1, [r0], #2            (hand-decoded writeback: r0 moves at completion)
        0xE2822001,  # add  r2, r2, #1
    ), {"r0": DEV, "r1": 0x77, "r2": 0}, {"r0": DEV + 2, "r1": 0xF00D, "r2": 1}),
    (T32, code(T32,
        0x429B,  # cmp   r3, r3
        0xBF0C,  # ite   eq
        0x6801,  # ldreq r1, [r0, #0]            (pending in the first IT slot)
        0x3201,  # addne r2, #1                  (must stay skipped)
        0x3204,  # adds  r2, #4
    ), {"r0": DEV, "r1": 0x77, "r2": 0}, {"r0": DEV, "r1": 0xC0DE_F00D, "r2": 4}),
]
LOAD_AT = {A64: body_addr(A64), A32: body_addr(A32), T32: body_addr(T32, 4)}


def _wait_entered(probe: Probe) -> None:
    assert probe.entered.wait(5), "the guest never reached the device"


@pytest.mark.parametrize(("isa", "body", "before", "after"), PENDING, ids=["a64", "a32-writeback", "t16-it"])
def test_case23_pause_while_an_exit_is_pending_completes_once(isa: str, body: bytes, before: dict[str, int],
                                                              after: dict[str, int]) -> None:
    gate = threading.Event()
    probe = Probe(gate=gate)
    probe.load(0, 0xC0DE_F00D, 4)
    names = [*before, "pc"] + (["cpsr"] if isa != A64 else [])
    with Machine(isa, body, regs=before, devices=[probe]) as machine:
        machine.start()
        _wait_entered(probe)
        machine.vm.pause()
        # Several dumps while the device still holds the access: the state before the instruction.
        for _ in range(3):
            regs, pending = machine.vm.get_registers(0, names)
            assert pending
            regs_d = dict(regs)
            assert regs_d["pc"] == LOAD_AT[isa]
            assert {k: regs_d[k] for k in before} == before
        if isa == T32:
            cpsr = dict(regs)["cpsr"]
            assert (cpsr >> 10) & 0x3F == 0x03 and (cpsr >> 25) & 3 == 0  # ITE EQ, first slot: IT = 0x0C
        with pytest.raises(VmStateError, match="exit pending"):
            machine.vm.set_registers(0, [("pc", LOAD_AT[isa])])
        # The answer arrives while paused: it is held, not applied, and the exit still shows as pending.
        gate.set()
        time.sleep(0.05)
        regs, pending = machine.vm.get_registers(0, names)
        assert pending and dict(regs)["pc"] == LOAD_AT[isa]
        assert {k: dict(regs)[k] for k in before} == before
        with pytest.raises(VmStateError, match="exit pending"):
            machine.vm.set_registers(0, [(names[1], 0)])
        machine.vm.resume()
        final = machine.wait()
        res = machine.result(final)
    assert res.finished_body
    assert {k: res.regs[k] for k in after} == after
    assert probe.log == [Access(0, 2 if isa == A32 else 4, False, 0)]
    assert res.vcpu_stats.reads == 1 and res.vcpu_stats.exits == 1


def test_case23_pause_and_resume_repeatedly_while_pending() -> None:
    gate = threading.Event()
    probe = Probe(gate=gate)
    probe.load(0, 0x1234, 4)
    body = words(
        0xB8404401,  # ldr w1, [x0], #4             (writeback: must move x0 once)
        0x91000442,  # add x2, x2, #1
    )
    with Machine(A64, body, regs={"x0": DEV, "x2": 0}, devices=[probe]) as machine:
        machine.start()
        _wait_entered(probe)
        for _ in range(5):
            machine.vm.pause()
            regs, pending = machine.vm.get_registers(0, ["x0", "pc"])
            assert pending and dict(regs) == {"x0": DEV, "pc": body_addr(A64)}
            machine.vm.resume()
        gate.set()
        res = machine.result(machine.wait())
    assert res.finished_body
    assert res.regs["x0"] == DEV + 4 and res.regs["x1"] == 0x1234 and res.regs["x2"] == 1
    assert len(probe.log) == 1


BODY_24 = {
    A64: words(
        0xB9400001,  # ldr w1, [x0]
        0x91000442,  # add x2, x2, #1
        0x14000000,  # b .
    ),
    A32: words(
        0xE5901000,  # ldr r1, [r0]
        0xE2822001,  # add r2, r2, #1
        0xEAFFFFFE,  # b .
    ),
}


@pytest.mark.parametrize("isa", [A64, A32])
def test_case24_resuming_again_after_the_completion_changes_nothing(isa: str) -> None:
    counter = Counter(base=DEV)  # every read returns the number of reads before it
    body = BODY_24[isa]
    x = "x" if isa == A64 else "r"
    spin = body_addr(isa, 8)
    with Machine(isa, body, regs={f"{x}0": DEV, f"{x}1": 0x77, f"{x}2": 0}, devices=[counter]) as machine:
        machine.start()
        for _ in range(400):  # wait until the guest sits in its final loop
            machine.vm.pause()
            if machine.registers("pc")["pc"] == spin:
                break
            machine.vm.resume()
            time.sleep(0.005)
        else:
            pytest.fail("the guest never reached its final loop")
        for _ in range(10):  # more resumes: none may complete the load again
            machine.vm.resume()
            time.sleep(0.002)
            machine.vm.pause()
            regs, pending = machine.vm.get_registers(0, [f"{x}1", f"{x}2", "pc"])
            assert not pending
            assert dict(regs) == {f"{x}1": 0, f"{x}2": 1, "pc": spin}
        with pytest.raises(VmStateError, match="not running"):
            machine.vm.pause()  # a second pause is refused, not counted
        machine.vm.resume()
        with pytest.raises(VmStateError, match="not paused"):
            machine.vm.resume()  # a resume with nothing to resume is refused
        assert counter.count == 1
        assert machine.vm.stats().vcpus[0].reads == 1
    final = machine.vm.events.wait_final(5)
    assert final is not None and final.kind == EventKind.STOPPED
