"""Exactly once across broken streams, with the Node service: a guest writes a countdown to its UART, one exit
per byte, through a proxy that resets every connection every 30 ms; the UART's log must hold every byte once,
in order (tests/integration/test_sessions.py's check, against the Python service)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from mmiosplit.v1 import vcpu_pb2, vcpu_pb2_grpc
from tests.chaos.campaign import countdown, run_countdown
from tests.chaos.proxy import ChaosProxy
from tests.node.conftest import node_service

pytestmark = [pytest.mark.node, pytest.mark.integration]


def test_connections_reset_every_30_ms_lose_and_repeat_no_write(vcpu_stub: vcpu_pb2_grpc.VcpuServiceStub,
                                                                tmp_path: Path) -> None:
    log, n = tmp_path / "uart.log", 1500
    stop = threading.Event()
    with node_service(["pl011@0x09000000,name=uart0"], extra=["--console-log", str(log)]) as node, \
            ChaosProxy(node.address) as proxy:
        def chaos() -> None:
            while not stop.wait(0.03):
                proxy.cut()

        cutter = threading.Thread(target=chaos, daemon=True)
        try:
            final, _, _ = run_countdown(vcpu_stub, proxy.address, n, deadline_ms=5000, during=cutter.start)
        finally:
            stop.set()
        cutter.join()
        cuts = proxy.cuts
    assert final.kind == vcpu_pb2.VM_EVENT_KIND_POWERED_OFF, final
    assert cuts >= 5, cuts  # the run really crossed broken connections
    assert log.read_bytes() == countdown(n)  # every byte once, in order
