"""Start a device service (the built-in one, or a mutant of it) as a subprocess for the conformance tests."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from mmiosplit_cli.launcher import check_health

ROOT = Path(__file__).resolve().parents[2]

#: The device set docs/conformance.md documents: with it every check runs (none is skipped).
DEVICES = [
    "scratch@0x0a000000,size=0x1000,name=scratch0",
    "scratch@0x0a001000,size=0x1000,posted=on,name=posted0",
    "scratch@0x0a002000,size=0x1000,delay=200000,name=slow0",
    "pl011@0x09000000,name=uart0",
    "pflash@0x04000000,size=0x100000,sector=0x10000,name=flash0",
    "dma-probe@0x0a003000,name=dma0",
    "irq-probe@0x0a004000,name=irq0",
]


@contextlib.contextmanager
def device_service(mutant: str | None = None, devices: Sequence[str] = DEVICES, extra: Sequence[str] = (),
                   startup_s: float = 30.0) -> Iterator[str]:
    """A device service on a UNIX socket (``mutant``: with that bug planted; ``extra``: more serve-devices flags);
    yields its address and stops it."""
    with device_service_process(mutant, devices, extra, startup_s) as (address, _proc):
        yield address


@contextlib.contextmanager
def device_service_process(mutant: str | None = None, devices: Sequence[str] = DEVICES, extra: Sequence[str] = (),
                           startup_s: float = 30.0) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``device_service``, yielding the process too (to kill it)."""
    with tempfile.TemporaryDirectory(prefix="conformance-") as tmp:
        address = f"unix:{tmp}/devices.sock"
        args = ["serve-devices", "--listen", address, *(a for d in devices for a in ("--device", d)), *extra]
        module = ["-m", "tests.conformance.mutant_service", mutant] if mutant else ["-m", "mmiosplit_cli"]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        log = Path(tmp) / "service.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, *module, *args], cwd=ROOT, env=env, stdout=out,
                                    stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + startup_s
            while check_health(address, timeout=0.5) != "SERVING":
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"device service {mutant or 'built-in'} did not start:\n"
                                       f"{log.read_text(errors='replace')[-3000:]}")
                time.sleep(0.1)
            yield address, proc
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
