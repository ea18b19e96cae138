"""uart-echo (guests/irq), an interrupt-driven PL011 driver, with its UART in the Node.js device service and the
rest of the virt board in the Python one: its console must be exactly what Debian's QEMU prints. Typed bytes
raise UARTINTR without a guest access (the change travels on the Watch stream); the guest's reads of DR lower it
(the change rides on the read's Completion)."""

from __future__ import annotations

import sys

import pytest

from mmiosplit_cli.launcher import local_services
from tests.integration.test_irq_guests import ARCH
from tests.node.conftest import node_service
from tests.test_irq_guests_qemu import console_input, expected, image, run_console
from vcpu_service.machines.virt import device_specs

pytestmark = [pytest.mark.node, pytest.mark.integration]


@pytest.mark.timeout(400)
@pytest.mark.parametrize("arch", ["a64", "a32"])
def test_uart_echo_takes_its_input_by_interrupt_from_the_node_uart(arch: str) -> None:
    name, cpu = ARCH[arch]
    board = device_specs(name, flash0=str(image("uart-echo", arch)))
    uart = next(spec for spec in board if spec.startswith("pl011@"))
    python_devices = [a for spec in board if spec != uart for a in ("--device", spec)]
    with node_service([uart]) as node, local_services(python_devices, start_vcpu=False) as (_, daddr, _):
        assert daddr is not None
        command = [sys.executable, "-m", "mmiosplit_cli", "run", "--machine", "virt", "--arch", name, "--cpu", cpu,
                   "--vcpus", "2", "--timeout", "240", "--device-service", daddr, "--device-service", node.address]
        run = run_console(command, console_input("uart-echo"), timeout=300)
    stderr = run.stderr.decode(errors="replace")
    assert run.stdout.decode(errors="replace") == expected("uart-echo", arch), f"exit {run.returncode}:\n{stderr}"
    assert run.returncode == 0, stderr
    assert "powered off: PSCI SYSTEM_OFF" in stderr
