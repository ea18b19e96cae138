"""The bundled bare-metal guests (A64, A32, T32) through both services, over UNIX and TCP sockets."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from mmiosplit.v1 import vcpu_pb2
from mmiosplit_cli.demo import GUESTS, Guest
from mmiosplit_cli.runner import run_vm
from tests.integration.client import Services

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EXPECTED = ROOT / "guests" / "expected"
ACCESS = re.compile(r"^(st|ld)(\w+)\s+\+0x([0-9a-f]+) (<-|->) 0x([0-9a-f]+)\s")


def _expected(guest: Guest, vcpus: int) -> str:
    return (EXPECTED / f"hello-{guest.name}-{vcpus}cpu.txt").read_text()


@pytest.mark.parametrize("guest", GUESTS, ids=[g.name for g in GUESTS])
@pytest.mark.parametrize("vcpus", [1, 2])
def test_guest_console_matches_expected(services: Services, guest: Guest, vcpus: int) -> None:
    result = run_vm(services.vcpu, guest.config(services.devices, vcpus))
    console = result.console.decode()
    assert result.final.kind == vcpu_pb2.VM_EVENT_KIND_POWERED_OFF, result.final
    assert result.exit_status == 0
    # PL011 output reached the console stream, byte for byte as the guest wrote it.
    assert console == _expected(guest, vcpus)
    assert f"hello from mmiosplit guest ({guest.name})" in console
    assert "scratch ok" in console
    if vcpus == 2:
        # Both vCPUs made device accesses; RAM is shared (the secondary's result reached the primary).
        assert "cpu1 1000 round trips, 0 mismatches" in console
        assert all(v.exits > 1000 for v in result.stats.vcpus), result.stats


def _replay_as_ram(console: str) -> int:
    """Check every load in the guest's log against a RAM model fed by its stores; returns loads checked."""
    memory: dict[int, int] = {}
    checked = 0
    for line in console.splitlines():
        m = ACCESS.match(line)
        if not m:
            continue
        op, kind, offset, value = m.group(1), m.group(2), int(m.group(3), 16), int(m.group(5), 16)
        size = {"8": 1, "16": 2, "32": 4, "64": 8, "sb": 1, "sh": 2, "sw": 4}[kind if kind == "sw" else kind[:2]]
        if op == "st":
            for i in range(size):
                memory[offset + i] = (value >> (8 * i)) & 0xFF
            continue
        raw = sum(memory[offset + i] << (8 * i) for i in range(size))
        if kind.startswith("s"):  # signed: ldsb/ldsh (32-bit), ldsbw/ldshw (W), ldsbx/ldshx/ldsw (X)
            width = 64 if kind.endswith("x") or kind == "sw" else 32
            sign = 1 << (8 * size - 1)
            expect = ((raw ^ sign) - sign) & ((1 << width) - 1)
        else:
            expect = raw
        assert value == expect, f"{line!r}: RAM model says 0x{expect:x}"
        checked += 1
    return checked


@pytest.mark.parametrize("guest", GUESTS, ids=[g.name for g in GUESTS])
def test_loads_return_what_stores_put_there(unix_services: Services, guest: Guest) -> None:
    """Independent of the guest's own check: replay its log against a model of RAM."""
    result = run_vm(unix_services.vcpu, guest.config(unix_services.devices, 1))
    assert _replay_as_ram(result.console.decode()) > 30


def test_run_command_is_scriptable() -> None:
    """`mmiosplit run` with pipes: console on stdout, exit status 0 for PSCI SYSTEM_OFF."""
    proc = subprocess.run(
        [sys.executable, "-m", "mmiosplit_cli", "run", str(ROOT / "guests" / "bin" / "hello-t32.bin"), "--arch", "arm",
         "--entry", "0x40080001", "--vcpus", "2"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (EXPECTED / "hello-t32-2cpu.txt").read_text()
    assert "powered off: PSCI SYSTEM_OFF" in proc.stderr


def test_run_exit_status_says_how_the_guest_ended(tmp_path: Path) -> None:
    spin = tmp_path / "wfi.bin"
    spin.write_bytes(bytes.fromhex("7f2003d5ffffff17"))  # wfi; b wfi
    proc = subprocess.run([sys.executable, "-m", "mmiosplit_cli", "run", str(spin)], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "halted" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "mmiosplit_cli", "run", str(tmp_path / "missing.bin")],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "missing.bin" in proc.stderr


ECHO = bytes.fromhex(  # x0=UART; 1: poll FR.RXFE; w2=DR; DR=w2; until 'q'; then PSCI SYSTEM_OFF
    "0020a1d2 011840b9 e1ff2737 020040b9 020000b9 5fc40171 61ffff54 000180d2 0080b0f2 020000d4 00000014"
)


def test_console_input_reaches_the_guest(tmp_path: Path) -> None:
    image = tmp_path / "echo.bin"
    image.write_bytes(ECHO)
    proc = subprocess.run([sys.executable, "-m", "mmiosplit_cli", "run", str(image), "--device", "pl011@0x09000000"],
                          input="typed into stdin, q", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "typed into stdin, q"


def test_health_command(unix_services: Services, tmp_path: Path) -> None:
    for address in (unix_services.vcpu, unix_services.devices):
        proc = subprocess.run([sys.executable, "-m", "mmiosplit_cli", "health", address],
                              capture_output=True, text=True, timeout=60)
        assert (proc.returncode, proc.stdout.strip()) == (0, "SERVING")
    proc = subprocess.run([sys.executable, "-m", "mmiosplit_cli", "health", f"unix:{tmp_path / 'none.sock'}",
                           "--timeout", "0.5"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "UNREACHABLE" in proc.stdout
