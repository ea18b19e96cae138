"""``mmiosplit conformance`` on an address that is not a working device service: it ends, within its timeouts,
with a message saying what is wrong, never hangs."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from mmiosplit.v1 import device_pb2, device_pb2_grpc
from mmiosplit.wire import DEVICE_FEATURES, PROTOCOL_VERSION
from mmiosplit_cli.cli import main
from mmiosplit_cli.conformance.checks import CHECKS
from mmiosplit_cli.conformance.runner import Result, run_suite
from tests.conformance.services import device_service, device_service_process

pytestmark = pytest.mark.integration

SCRATCH = 0x0A00_0000


class Hanging(device_pb2_grpc.DeviceServiceServicer):
    """Describes a scratch device and a UART, then never answers anything else (until the test ends);
    ``describe`` False: not even Describe."""

    def __init__(self, describe: bool) -> None:
        self.describe = describe
        self.release = threading.Event()

    def _hang(self, context: grpc.ServicerContext) -> None:
        while context.is_active() and not self.release.wait(0.05):
            pass

    def Describe(self, request: device_pb2.DescribeRequest,
                 context: grpc.ServicerContext) -> device_pb2.DescribeResponse:
        if not self.describe:
            self._hang(context)
        resp = device_pb2.DescribeResponse(service_name="hanging", protocol_version=PROTOCOL_VERSION,
                                           instance_id="hanging-1", features=DEVICE_FEATURES)
        dev = resp.devices.add(name="scratch0", type="scratch")
        dev.regions.add(name="mem", base=SCRATCH, size=0x1000, kind=device_pb2.REGION_KIND_MMIO,
                        access_sizes=[1, 2, 4, 8])
        uart = resp.devices.add(name="uart0", type="pl011", has_console=True)
        uart.regions.add(name="regs", base=0x0900_0000, size=0x1000, kind=device_pb2.REGION_KIND_MMIO,
                         access_sizes=[1, 2, 4])
        uart.lines.add(index=0, name="uartintr", trigger=device_pb2.LINE_TRIGGER_LEVEL)
        return resp

    def ExitStream(self, request_iterator: Iterator[device_pb2.ExitStreamRequest],
                   context: grpc.ServicerContext) -> Iterator[device_pb2.ExitStreamResponse]:
        self._hang(context)
        return iter(())

    Watch = Console = ExitStream

    def Reset(self, request: device_pb2.ResetRequest, context: grpc.ServicerContext) -> device_pb2.ResetResponse:
        self._hang(context)
        return device_pb2.ResetResponse()


def _serve(tmp_path: Path, servicer: device_pb2_grpc.DeviceServiceServicer | None) -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
    if servicer is not None:
        device_pb2_grpc.add_DeviceServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"unix:{tmp_path}/svc.sock"
    server.add_insecure_port(address)
    server.start()
    try:
        yield address
    finally:
        if isinstance(servicer, Hanging):
            servicer.release.set()
        server.stop(0)


@pytest.fixture
def health_only(tmp_path: Path) -> Iterator[str]:
    yield from _serve(tmp_path, None)


def test_an_unreachable_address_ends_with_a_clear_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    t0 = time.monotonic()
    assert main(["conformance", f"unix:{tmp_path}/nobody.sock", "--timeout", "1", "--json",
                 str(tmp_path / "r.json")]) == 2
    assert time.monotonic() - t0 < 10
    assert "cannot reach unix:" in capsys.readouterr().err
    assert "cannot reach" in (tmp_path / "r.json").read_text()


def test_a_listener_that_does_not_speak_grpc_is_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        accepted: list[socket.socket] = []

        def babble() -> None:
            conn, _ = listener.accept()
            accepted.append(conn)
            conn.sendall(b"SSH-2.0-not-grpc\r\n")

        threading.Thread(target=babble, daemon=True).start()
        assert main(["conformance", f"127.0.0.1:{port}", "--timeout", "1"]) == 2
        for conn in accepted:
            conn.close()
    assert "cannot reach 127.0.0.1:" in capsys.readouterr().err


def test_a_service_that_is_not_a_device_service_is_named_so(health_only: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conformance", health_only, "--timeout", "2"]) == 2
    assert "not a device service" in capsys.readouterr().err


def test_a_service_whose_describe_hangs_ends_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for address in _serve(tmp_path, Hanging(describe=False)):
        t0 = time.monotonic()
        assert main(["conformance", address, "--timeout", "1"]) == 2
        assert time.monotonic() - t0 < 10
    assert "did not answer Describe within 1 s" in capsys.readouterr().err


def test_a_service_that_hangs_after_describe_fails_each_check_in_bounded_time(tmp_path: Path) -> None:
    for address in _serve(tmp_path, Hanging(describe=True)):
        t0 = time.monotonic()
        results = run_suite(address, only=["handshake", "seq.echo", "reset", "console.output", "irq.watch_initial"],
                            timeout=0.5)
        took = time.monotonic() - t0
    assert took < 30, took
    assert {r.status for r in results} == {"FAIL"}, results
    welcome = next(r for r in results if r.name == "handshake.welcome")
    assert welcome.reason == "ExitStream: nothing within 0.5 s while waiting for the welcome"
    reset = next(r for r in results if r.name == "reset.values")
    assert reset.reason.startswith("ExitStream: nothing within") or reset.reason.startswith("DEADLINE_EXCEEDED"), reset


def test_the_credential_flags_apply(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    token = tmp_path / "token"
    token.write_text("conformance-token-0123456789abcdef\n")
    token.chmod(0o600)
    with device_service(devices=["scratch@0x0a000000,name=scratch0"], extra=["--token-file", str(token)]) as address:
        assert main(["conformance", address, "--timeout", "2", "--only", "seq.echo"]) == 2
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        assert main(["conformance", address, "--timeout", "2", "--only", "seq.echo", "limits",
                     "--token-file", str(token)]) == 0
    assert "PASS seq.echo\nPASS limits.large_message\nPASS limits.oversized_message\n" in capsys.readouterr().out


def test_list_names_every_check_without_an_address(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conformance", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(f"{c.name}\n    {c.doc}" in out for c in CHECKS)
    assert main(["conformance"]) == 2
    assert "give the ADDR" in capsys.readouterr().err


def test_a_service_that_dies_mid_run_fails_the_rest_quickly() -> None:
    with device_service_process() as (address, proc):
        def kill_after_five(result: Result) -> None:
            seen.append(result)
            if len(seen) == 5:
                proc.kill()
                proc.wait()

        seen: list[Result] = []
        t0 = time.monotonic()
        results = run_suite(address, timeout=2.0, report=kill_after_five)
        took = time.monotonic() - t0
    assert [r.status for r in results[:5]] == ["PASS"] * 5
    assert len(results) == len(CHECKS)
    rest = results[5:]
    assert all(r.status in ("FAIL", "SKIP") for r in rest), rest
    assert any("UNAVAILABLE" in r.reason for r in rest), rest
    assert took < 60, took
