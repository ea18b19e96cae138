"""Debian's U-Boot for QEMU virt to its prompt, with the UART served by the Node.js device service and every other
device of the board by the Python one: the vcpu service routes each region to the service that described it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mmiosplit_cli.launcher import local_services
from tests.firmware.console import run_uboot_script
from tests.firmware.test_uboot import UBOOT, _require
from tests.node.conftest import node_service
from vcpu_service.machines.virt import device_specs

pytestmark = [pytest.mark.node, pytest.mark.firmware, pytest.mark.slow]

SCRIPT = ["version", "echo node uart ok", "md.l 0x09000fe0 8", "bdinfo", "reset", "echo after reset"]


def _blank_flash(path: Path) -> Path:
    """An empty 64 MiB flash bank 1 (U-Boot's environment), as QEMU's test gives it."""
    with open(path, "wb") as f:
        f.truncate(64 << 20)
    return path


@pytest.mark.timeout(900)
def test_uboot_reaches_its_prompt_with_the_uart_in_node(tmp_path: Path) -> None:
    _require(str(UBOOT["aarch64"]))
    board = device_specs("aarch64", flash0=str(UBOOT["aarch64"]), flash1=str(_blank_flash(tmp_path / "flash1.img")))
    uart = next(spec for spec in board if spec.startswith("pl011@"))
    python_devices = [a for spec in board if spec != uart for a in ("--device", spec)]
    with node_service([uart]) as node, local_services(python_devices, start_vcpu=False) as (_, daddr, _):
        assert daddr is not None
        ours = [sys.executable, "-m", "mmiosplit_cli", "run", "--machine", "virt", "--arch", "aarch64",
                "--device-service", daddr, "--device-service", node.address, "-q"]
        # Typed commands reach U-Boot through the Node UART's RX FIFO; their output comes back through its console.
        transcript = run_uboot_script(ours, SCRIPT, timeout=600)
    lines = transcript.lines()
    assert any(line.startswith("U-Boot 2023.01") for line in lines), lines
    assert "node uart ok" in lines
    # `reset`: the VM resets every device service (the Node one through its Reset RPC, for the VM attached) and
    # takes its shadow registers again; U-Boot boots a second time and takes input.
    banners = sum(line.startswith("U-Boot 2023.01") for line in lines)
    assert banners == 3 and "after reset" in lines  # two boots, and `version`
    # The PrimeCell ID registers of the UART, read by U-Boot through the Node service: the bytes QEMU's PL011 gives.
    assert any(line.startswith("09000fe0: 00000011 00000010 00000014 00000000") for line in lines), lines
    assert "prompt" in transcript.marks
    # And byte for byte what the same script prints with every device in the Python service.
    python_only = [sys.executable, "-m", "mmiosplit_cli", "run", "--machine", "virt", "--arch", "aarch64",
                   str(UBOOT["aarch64"]), "--flash1", str(_blank_flash(tmp_path / "python-flash1.img")), "-q"]
    assert run_uboot_script(python_only, SCRIPT, timeout=600).lines() == lines
