"""ROMD mirror updates a device service sends: applied before the guest runs on, and harmless when empty."""

from __future__ import annotations

import threading

from mmiosplit.mmio import MirrorChange
from tests.exitpath.harness import A64, DEV, Machine, Probe, code

FLASH = "pflash@0x00000000,size=256k,sector=64k,name=flash"
LDR_W1_X0 = 0xB9400001  # ldr w1, [x0]


def _patch_while_an_exit_waits(patches: tuple[tuple[int, bytes], ...]) -> Machine:
    """A guest whose one device read is held by the device until ``patches`` reached the flash mirror: the vCPU
    has mapped its mirrors already, so it applies them from the patch log before it runs on."""
    gate = threading.Event()
    probe = Probe(gate=gate)
    machine = Machine(A64, code(A64, LDR_W1_X0), regs={"x0": DEV}, devices=[probe], specs=[FLASH])
    machine.start()
    assert probe.entered.wait(10)
    machine.vm.apply_mirror_changes([MirrorChange("local", "flash", "flash", True, patches)])
    gate.set()
    return machine


# Found by the exitpath fuzz target: an empty patch put an empty range in the VM's patch log, the vCPU's
# ctl_remove_cache(start, start) failed with UC_ERR_ARG, and the run ended with an internal error.
def test_an_empty_mirror_patch_changes_nothing_and_the_guest_runs_on() -> None:
    with _patch_while_an_exit_waits(((0x10, b""),)) as machine:
        final = machine.wait()
        assert machine.result(final).finished_body, final


def test_a_mirror_patch_lands_in_the_mirror_and_the_guest_runs_on() -> None:
    with _patch_while_an_exit_waits(((0x10, b"\x5a\xa5"),)) as machine:
        final = machine.wait()
        assert machine.result(final).finished_body, final
        assert machine.vm.mirrors[("local", "flash", "flash")].block.read(0x10, 2) == b"\x5a\xa5"
