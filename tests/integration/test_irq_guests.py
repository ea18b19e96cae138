"""The interrupt guests (guests/irq) on ``mmiosplit run --machine virt --vcpus 2``: the console must be exactly what
Debian's QEMU prints for the same image (guests/expected/<guest>-<arch>.txt, checked by tests/test_irq_guests_qemu.py).

timer-tick needs the generic timer's PPIs delivered through the GIC, uart-echo the PL011's SPI 33 (its input is
typed after its ready line, as under QEMU), sgi SGIs between the two vCPUs and PSCI CPU_ON/CPU_OFF/AFFINITY_INFO,
fiq the GIC's FIQ output (a Group 0 interrupt with GICC_CTLR.FIQEn set).
"""

from __future__ import annotations

import sys

import pytest

from tests.test_irq_guests_qemu import ARCHES, GUESTS, console_input, expected, image, run_console

pytestmark = pytest.mark.integration

ARCH = {"a64": ("aarch64", "cortex-a57"), "a32": ("arm", "cortex-a15")}  # the CPUs the QEMU transcripts come from


@pytest.mark.timeout(400)
@pytest.mark.parametrize("guest", GUESTS)
@pytest.mark.parametrize("arch", ARCHES)
def test_irq_guest_console_matches_qemu(guest: str, arch: str) -> None:
    name, cpu = ARCH[arch]
    command = [sys.executable, "-m", "mmiosplit_cli", "run", "--machine", "virt", "--arch", name, "--cpu", cpu,
               "--vcpus", "2", "--timeout", "240", str(image(guest, arch))]
    run = run_console(command, console_input(guest), timeout=300)
    console = run.stdout.decode(errors="replace")
    stderr = run.stderr.decode(errors="replace")
    assert console == expected(guest, arch), f"exit status {run.returncode}; stderr:\n{stderr}"
    assert run.returncode == 0, stderr
    assert "powered off: PSCI SYSTEM_OFF" in stderr
