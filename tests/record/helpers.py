"""Device services and device doubles as subprocesses, for the record and replay tests."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from mmiosplit_cli import lifeline
from mmiosplit_cli.launcher import check_health

ROOT = Path(__file__).resolve().parents[2]
GUESTS = ROOT / "guests"
#: The devices ``mmiosplit run`` gives a guest by default (cli.DEFAULT_DEVICES), as serve-devices flags.
DEFAULT_DEVICES = ["pl011@0x09000000", "pl031@0x09010000", "scratch@0x0a000000,size=0x1000"]


def mmiosplit(*args: str, timeout: float = 300, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mmiosplit_cli", *args], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout, **kwargs)  # type: ignore[call-overload]


def _wait_serving(proc: subprocess.Popen[bytes], address: str, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        if check_health(address, timeout=0.5) == "SERVING":
            return
        time.sleep(0.05)
    raise RuntimeError(f"{address} not SERVING after {timeout:g} s:\n{log.read_text(errors='replace')}")


@contextlib.contextmanager
def started(module: str, args: Sequence[str], address: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m module args`` until the block ends (then SIGTERM, and a kill after 10 s)."""
    with open(log, "wb") as out:
        proc = lifeline.popen(module, list(args), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_serving(proc, address, log)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def device_service(tmp_path: Path, devices: Sequence[str], changed: str | None = None,
                   name: str = "devices", extra: Sequence[str] = ()) -> Iterator[str]:
    """A device service with ``devices`` on a UNIX socket (``changed``: with tests.record.changed_pl011's PL011)."""
    address = f"unix:{tmp_path / (name + '.sock')}"
    args = ["serve-devices", "--listen", address, *[a for d in devices for a in ("--device", d)], *extra]
    module = "mmiosplit_cli"
    if changed is not None:
        module, args = "tests.record.changed_pl011", [changed, *args]
    with started(module, args, address, tmp_path / f"{name}.log"):
        yield address


@contextlib.contextmanager
def device_double(tmp_path: Path, recording: Path,
                  name: str = "double") -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    """``mmiosplit replay RECORDING --serve``; yields its address, process and log (its exit status and the end of
    its log are there once the block ended)."""
    address = f"unix:{tmp_path / (name + '.sock')}"
    log = tmp_path / f"{name}.log"
    with started("mmiosplit_cli", ["replay", str(recording), "--serve", address], address, log) as proc:
        yield address, proc, log
