"""The Node.js device service (examples/node-device) as a subprocess, for the tests in this folder.

Skipped, saying why, when its dependencies are not installed (``npm ci`` in examples/node-device), unless
``MMIOSPLIT_REQUIRE_NODE=1`` (CI), where that is a failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from mmiosplit import security
from mmiosplit_cli.launcher import check_health, free_tcp_port
from tests.integration.test_sessions import vcpu_stub  # noqa: F401  (a fixture: a vcpu service over TCP)

ROOT = Path(__file__).resolve().parents[2]
NODE_DIR = ROOT / "examples" / "node-device"


def require_node() -> None:
    """Skip (or, under MMIOSPLIT_REQUIRE_NODE=1, fail) when the Node service cannot run here."""
    reason = None
    if shutil.which("node") is None:
        reason = "node is not installed"
    elif not (NODE_DIR / "node_modules").is_dir():
        reason = "examples/node-device/node_modules is missing: run `npm ci` in examples/node-device"
    if reason is None:
        return
    if os.environ.get("MMIOSPLIT_REQUIRE_NODE") == "1":
        pytest.fail(f"MMIOSPLIT_REQUIRE_NODE=1 but {reason}")
    pytest.skip(reason)


@dataclass
class NodeService:
    """A running Node device service: its address and where it logs."""

    address: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def node_service(devices: Sequence[str], transport: str = "tcp", extra: Sequence[str] = (),
                 health: security.Security | None = None) -> Iterator[NodeService]:
    """Start the Node service with these ``--device`` specs (and ``extra`` flags) on a free loopback port (or a UNIX
    socket in a temporary folder), wait until gRPC health, asked with ``health`` credentials (plaintext by default),
    says SERVING, and stop it after."""
    require_node()
    workdir = Path(tempfile.mkdtemp(prefix="mmiosplit-node-"))
    address = f"127.0.0.1:{free_tcp_port()}" if transport == "tcp" else f"unix:{workdir / 'node.sock'}"
    log_path = workdir / "node.log"
    cmd = ["node", "src/main.js", "--listen", address, *(a for d in devices for a in ("--device", d)), *extra]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=NODE_DIR, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    service = NodeService(address, proc, log_path)
    try:
        deadline = time.monotonic() + 30
        while check_health(address, timeout=0.5, sec=health or security.PLAINTEXT) != "SERVING":
            if proc.poll() is not None:
                raise RuntimeError(f"the Node device service exited with status {proc.returncode}:\n{service.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Node device service was not SERVING after 30 s:\n{service.log()}")
            time.sleep(0.05)
        yield service
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


# The devices of the bundled hello guest (tests/integration/conftest.py's, less the RTC it does not use).
HELLO_DEVICES = ["pl011@0x09000000,name=uart0", "scratch@0x0a000000,size=0x1000,name=scratch0"]


@pytest.fixture(scope="module")
def node() -> Iterator[NodeService]:
    """The Node service with a UART, a scratch device and a posted scratch device, for one test module."""
    with node_service([*HELLO_DEVICES, "scratch@0x0a100000,size=0x1000,posted=on,name=posted0"]) as service:
        yield service
