"""The conformance suite against the Node.js device service: no check fails, and the only ones skipped are those
for device types it does not host (an irq-probe, a dma-probe, a ROMD flash)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmiosplit_cli.cli import main
from tests.node.conftest import node_service

pytestmark = pytest.mark.node

DEVICES = [
    "pl011@0x09000000,name=uart0",
    "scratch@0x0a000000,size=0x1000,name=scratch0",
    "scratch@0x0a001000,size=0x1000,posted=on,name=posted0",
    "scratch@0x0a002000,size=0x1000,delay=200000,name=slow0",  # 200 ms per access: the Cancel checks
]
#: Checks that need a device the Node service does not have.
NOT_HOSTED = {"irq.device_thread", "dma.inside_window", "dma.outside_refused", "mirror.romd"}


def test_the_node_service_passes_the_conformance_suite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "report.json"
    with node_service(DEVICES) as node:
        status = main(["conformance", node.address, "--json", str(report)])
    out = capsys.readouterr().out
    checks = json.loads(report.read_text())["checks"]
    failed = {c["name"]: c["reason"] for c in checks if c["status"] == "FAIL"}
    skipped = {c["name"] for c in checks if c["status"] == "SKIP"}
    assert failed == {}, out
    assert skipped == NOT_HOSTED, out
    assert status == 0 and "PASS seq.resume_no_reapply" in out and "PASS vm.scoping" in out
