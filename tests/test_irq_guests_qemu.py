"""The interrupt guests (guests/irq: timer-tick, uart-echo, sgi, fiq) under Debian's QEMU: their console output is
the reference transcript in guests/expected/<guest>-<arch>.txt, which ``mmiosplit run --machine virt`` must
reproduce byte for byte (tests/integration/test_irq_guests.py).

Each guest is flash bank 0 of the virt board (``-bios``), two vCPUs, the console on stdio through pipes (no
terminal: no CR/LF translation, no echo). uart-echo's input (guests/expected/uart-echo-input.txt) is written
only once the guest has printed its "ready" line: QEMU 7.2's PL011 empties its receive FIFO when the guest
turns the FIFOs on (LCR_H.FEN), so bytes sent earlier are lost.

The helpers here are shared with the mmiosplit test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / "guests" / "bin"
EXPECTED = ROOT / "guests" / "expected"

GUESTS = ["timer-tick", "uart-echo", "sgi", "fiq"]
ARCHES = ["a64", "a32"]
# The CPU models and machine options tests/firmware uses for U-Boot; -nic none: no NIC, so no option ROM needed.
QEMU = {
    "a64": ["qemu-system-aarch64", "-M", "virt", "-cpu", "cortex-a57"],
    "a32": ["qemu-system-arm", "-M", "virt,highmem=off", "-cpu", "cortex-a15"],
}
QEMU_COMMON = ["-smp", "2", "-m", "128M", "-nic", "none", "-nographic"]
READY = b"ready: type lines"  # uart-echo's prompt; its input goes in after this line


@dataclass
class ConsoleRun:
    returncode: int | None  # None: killed after the timeout
    stdout: bytes
    stderr: bytes


def image(guest: str, arch: str) -> Path:
    return BIN / f"{guest}-{arch}.bin"


def expected(guest: str, arch: str) -> str:
    return (EXPECTED / f"{guest}-{arch}.txt").read_text()


def console_input(guest: str) -> bytes | None:
    """What is typed into the guest's console after its ready line (None: nothing; stdin is /dev/null)."""
    return (EXPECTED / "uart-echo-input.txt").read_bytes() if guest == "uart-echo" else None


def qemu_command(guest: str, arch: str) -> list[str]:
    return [*QEMU[arch], *QEMU_COMMON, "-bios", str(image(guest, arch))]


def run_console(command: Sequence[str], typed: bytes | None, timeout: float) -> ConsoleRun:
    """Run `command` with the console on pipes; write `typed` once the ready line is out, then close stdin.

    The process is killed after `timeout` seconds (returncode None), keeping what it printed.
    """
    proc = subprocess.Popen(list(command), stdin=subprocess.DEVNULL if typed is None else subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    out = bytearray()
    err: list[bytes] = []

    def read_stdout() -> None:
        assert proc.stdout is not None
        sent = typed is None
        while chunk := os.read(proc.stdout.fileno(), 4096):
            out.extend(chunk)
            if not sent and READY in out and out.endswith(b"\n"):
                sent = True
                assert proc.stdin is not None
                try:
                    proc.stdin.write(typed or b"")
                    proc.stdin.close()
                except BrokenPipeError:
                    pass

    readers = [threading.Thread(target=read_stdout, daemon=True),
               threading.Thread(target=lambda: err.append(proc.stderr.read() if proc.stderr else b""), daemon=True)]
    for t in readers:
        t.start()
    try:
        rc: int | None = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = None
    for t in readers:
        t.join(timeout=10)
    if proc.stdin is not None and not proc.stdin.closed:
        proc.stdin.close()
    return ConsoleRun(rc, bytes(out), b"".join(err))


def _require(tool: str) -> None:
    if shutil.which(tool) is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must install {tool} (Debian: qemu-system-arm)")
        pytest.skip(f"{tool} is not installed (Debian: apt-get install qemu-system-arm)")


@pytest.mark.parametrize("guest", GUESTS)
@pytest.mark.parametrize("arch", ARCHES)
def test_irq_guest_matches_its_qemu_transcript(guest: str, arch: str) -> None:
    _require(QEMU[arch][0])
    run = run_console(qemu_command(guest, arch), console_input(guest), timeout=120)
    console = run.stdout.decode(errors="replace")
    assert run.returncode == 0, f"QEMU ended with {run.returncode}: {run.stderr.decode(errors='replace')}\n{console}"
    assert console == expected(guest, arch)


@pytest.mark.parametrize("guest", GUESTS)
@pytest.mark.parametrize("arch", ARCHES)
def test_irq_guest_binary_and_transcript_are_committed(guest: str, arch: str) -> None:
    """guests/build.sh --check (tests/test_guest_binaries.py) keeps the binaries current; here: both exist."""
    assert image(guest, arch).stat().st_size > 0
    text = expected(guest, arch)
    assert text.startswith(f"{guest} ({arch})\n")
    assert text.endswith(("done\n", "bye\n"))
