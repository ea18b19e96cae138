"""Record and replay with the Node.js device service: U-Boot booted to its prompt with the UART in the Node service
and the rest of the board in the Python one, recorded, then replayed against fresh instances of both (0
divergences), and against the Python PL011 in the Node one's place (0 divergences: the two implementations answer
U-Boot's boot alike, access for access)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tests.firmware.console import run_uboot_script
from tests.firmware.test_uboot import UBOOT, _require
from tests.node.conftest import node_service
from tests.record.helpers import device_service, mmiosplit
from vcpu_service.machines.virt import device_specs

pytestmark = [pytest.mark.node, pytest.mark.firmware, pytest.mark.slow]


def _blank_flash(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(64 << 20)
    return path


def _board(tmp_path: Path, name: str) -> tuple[str, list[str]]:
    """The virt board's UART spec, and every other device's."""
    board = device_specs("aarch64", flash0=str(UBOOT["aarch64"]), flash1=str(_blank_flash(tmp_path / f"{name}.img")))
    uart = next(spec for spec in board if spec.startswith("pl011@"))
    return uart, [spec for spec in board if spec != uart]


@pytest.mark.timeout(1200)
def test_a_uboot_boot_recorded_with_the_node_uart_replays_against_node_and_python(tmp_path: Path) -> None:
    _require(str(UBOOT["aarch64"]))
    recording = tmp_path / "uboot-node.rec"
    uart, rest = _board(tmp_path, "flash1")
    with node_service([uart]) as node, device_service(tmp_path, rest, name="rest") as python:
        command = [sys.executable, "-m", "mmiosplit_cli", "run", "--machine", "virt", "--arch", "aarch64",
                   "--device-service", python, "--device-service", node.address, "--record", str(recording)]
        lines = run_uboot_script(command, ["echo recorded"], timeout=600).lines()
        recorded_node, recorded_python = node.address, python
    assert any(line.startswith("U-Boot 2023.01") for line in lines) and "recorded" in lines

    def replay(uart_service: str, rest_service: str) -> str:
        proc = mmiosplit("replay", str(recording), "--device-service", f"{recorded_node}={uart_service}",
                         "--device-service", f"{recorded_python}={rest_service}", timeout=900)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        found = re.fullmatch(r"0 divergences, (\d+) exchanges \(\d+ records, [\d.]+ s\)\n", proc.stdout)
        assert found and int(found.group(1)) > 1000, proc.stdout  # the boot's exits and posted flash batches
        return proc.stderr

    uart2, rest2 = _board(tmp_path, "flash1-again")
    with node_service([uart2]) as node2, device_service(tmp_path, rest2, name="rest2") as python2:
        replay(node2.address, python2)
    uart3, rest3 = _board(tmp_path, "flash1-python")
    with device_service(tmp_path, [uart3], name="uart-python") as python_uart, \
            device_service(tmp_path, rest3, name="rest3") as python3:
        replay(python_uart, python3)
