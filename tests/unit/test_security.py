"""mmiosplit.security in process: loading credentials, the listen check, the token check on both kinds of server
(thread pool and grpc.aio) and the flags. TLS handshakes and whole runs are in tests/integration/test_security.py."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from mmiosplit import security
from mmiosplit.address import parse_address
from mmiosplit_cli import launcher, lifeline
from mmiosplit_cli.cli import main
from tests.pki import Authority, token_file

ECHO = "/test.Echo/"


def _echo_handlers(sync: bool) -> grpc.GenericRpcHandler:
    """A unary and a bidirectional method on raw bytes (no protobufs needed to test an interceptor)."""
    if sync:
        def say(request: bytes, _context: object) -> bytes:
            return request

        def chat(requests: Iterator[bytes], _context: object) -> Iterator[bytes]:
            yield from requests

        def repeat(request: bytes, _context: object) -> Iterator[bytes]:
            yield from (request, request)

        def join(requests: Iterator[bytes], _context: object) -> bytes:
            return b"".join(requests)
    else:
        async def say(request: bytes, _context: object) -> bytes:  # type: ignore[misc]
            return request

        async def chat(requests, _context):  # type: ignore[no-untyped-def]
            async for r in requests:
                yield r

        async def repeat(request, _context):  # type: ignore[no-untyped-def]
            yield request
            yield request

        async def join(requests, _context):  # type: ignore[no-untyped-def]
            return b"".join([r async for r in requests])
    return grpc.method_handlers_generic_handler("test.Echo", {
        "Say": grpc.unary_unary_rpc_method_handler(say), "Chat": grpc.stream_stream_rpc_method_handler(chat),
        "Repeat": grpc.unary_stream_rpc_method_handler(repeat), "Join": grpc.stream_unary_rpc_method_handler(join)})


def _calls(ch: grpc.Channel) -> list[Callable[[], object]]:
    """One call of each streaming shape, each returning what the echo server answered."""
    return [lambda: ch.unary_unary(ECHO + "Say")(b"hi", timeout=5),
            lambda: list(ch.stream_stream(ECHO + "Chat")(iter([b"a", b"b"]), timeout=5)),
            lambda: list(ch.unary_stream(ECHO + "Repeat")(b"r", timeout=5)),
            lambda: ch.stream_unary(ECHO + "Join")(iter([b"j", b"k"]), timeout=5)]


@pytest.fixture(params=["sync", "aio"])
def token_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A server of each kind requiring a token, on loopback TCP; yields (address, token)."""
    path, token = token_file(tmp_path)
    sec = security.load(token_file=str(path))
    address = parse_address("127.0.0.1:0")
    if request.param == "sync":
        server = security.server(futures.ThreadPoolExecutor(4), sec)
        server.add_generic_rpc_handlers((_echo_handlers(True),))
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
        port = security.bind(server, address, sec)
        server.start()
        yield f"127.0.0.1:{port}", token
        server.stop(None)
        return
    loop = asyncio.new_event_loop()
    started = threading.Event()
    bound: list[int] = []
    stop = asyncio.Event()

    async def serve() -> None:
        nonlocal stop
        stop = asyncio.Event()
        server = security.aio_server(sec)
        server.add_generic_rpc_handlers((_echo_handlers(False),))
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
        bound.append(security.bind(server, address, sec))
        await server.start()
        started.set()
        await stop.wait()
        await server.stop(None)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert started.wait(10)
    yield f"127.0.0.1:{bound[0]}", token
    loop.call_soon_threadsafe(stop.set)
    thread.join(10)
    loop.close()


def _client(tmp_path: Path, token: str | None) -> security.Security:
    if token is None:
        return security.PLAINTEXT
    path = tmp_path / "client-token"
    path.write_text(token)
    return security.load(token_file=str(path))


def test_token_server_answers_the_right_token_on_unary_and_streams(token_server: tuple[str, str],
                                                                   tmp_path: Path) -> None:
    address, token = token_server
    with security.channel(address, _client(tmp_path, token)) as ch:
        assert [call() for call in _calls(ch)] == [b"hi", [b"a", b"b"], [b"r", b"r"], b"jk"]


@pytest.mark.parametrize("sent, why", [(None, "missing token"), ("not-the-token", "wrong token")])
def test_token_server_refuses_and_logs_without_echoing_the_token(
        token_server: tuple[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture, sent: str | None,
        why: str) -> None:
    address, token = token_server
    caplog.set_level(logging.WARNING, logger="mmiosplit.security")
    with security.channel(address, _client(tmp_path, sent)) as ch:
        for call in _calls(ch):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert why in (err.value.details() or "")
            assert token not in (err.value.details() or "")
    lines = [r.getMessage() for r in caplog.records if r.name == "mmiosplit.security"]
    assert len(lines) == 4, lines  # one per call, of every streaming shape
    for line in lines:
        assert "refused /test.Echo/" in line and why in line
        assert "from ipv4:127.0.0.1:" in line  # the peer
        assert token not in line and (sent is None or sent not in line)


def test_health_needs_no_token(token_server: tuple[str, str]) -> None:
    address, _ = token_server
    with security.channel(address, security.PLAINTEXT) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_bearer_prefix_is_required(token_server: tuple[str, str]) -> None:
    address, token = token_server
    with security.channel(address, security.PLAINTEXT) as ch, pytest.raises(grpc.RpcError) as err:
        ch.unary_unary(ECHO + "Say")(b"hi", timeout=5, metadata=[("authorization", token)])
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "Bearer" in (err.value.details() or "") and token not in (err.value.details() or "")


def test_token_over_a_plaintext_unix_socket(tmp_path: Path) -> None:
    path, _ = token_file(tmp_path)
    sec = security.load(token_file=str(path))
    server = security.server(futures.ThreadPoolExecutor(2), sec)
    server.add_generic_rpc_handlers((_echo_handlers(True),))
    address = parse_address(f"unix:{tmp_path / 's.sock'}")
    assert security.bind(server, address, sec)
    server.start()
    try:
        with security.channel(address, sec) as ch:
            assert ch.unary_unary(ECHO + "Say")(b"x", timeout=5) == b"x"
        with security.channel(address, security.PLAINTEXT) as ch, pytest.raises(grpc.RpcError) as err:
            ch.unary_unary(ECHO + "Say")(b"x", timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop(None)


# ----- loading -----------------------------------------------------------------------------------------------
def test_a_token_file_that_is_missing_empty_or_unreadable_is_named(tmp_path: Path) -> None:
    with pytest.raises(security.SecurityError, match=r"--token-file .*nope: no such file"):
        security.load(token_file=str(tmp_path / "nope"))
    (tmp_path / "empty").write_text("\n  \n")
    with pytest.raises(security.SecurityError, match=r"--token-file .*empty: the file is empty"):
        security.load(token_file=str(tmp_path / "empty"))
    with pytest.raises(security.SecurityError, match=r"--token-file .*: cannot read it"):
        security.load(token_file=str(tmp_path))  # a folder: unreadable as a file, even for root
    (tmp_path / "two").write_text("two words")
    with pytest.raises(security.SecurityError, match="without spaces"):
        security.load(token_file=str(tmp_path / "two"))


def test_tls_files_are_checked(tmp_path: Path) -> None:
    ca = Authority.create(tmp_path, "a")
    leaf = ca.leaf("server")
    with pytest.raises(security.SecurityError, match="go together"):
        security.load(tls_cert=str(leaf.cert))
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(security.SecurityError, match=r"--tls-ca .*junk.pem: not a PEM file"):
        security.load(tls_ca=str(tmp_path / "junk.pem"))
    sec = security.load(tls_cert=str(leaf.cert), tls_key=str(leaf.key), tls_ca=str(ca.ca))
    assert sec.serves_tls and sec.requires_client_certificates and sec.connects_tls
    assert sec.service_flags() == ["--tls-cert", str(leaf.cert), "--tls-key", str(leaf.key), "--tls-ca", str(ca.ca)]
    assert sec.describe() == "mutual TLS"
    assert sec.key is not None and sec.key.decode() not in repr(sec)


def test_the_token_stays_out_of_reprs(tmp_path: Path) -> None:
    path, token = token_file(tmp_path)
    sec = security.load(token_file=str(path))
    assert sec.token == token and token not in repr(sec) and token not in str(sec)


# ----- listening ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["unix:/tmp/x.sock", "127.0.0.1:1", "127.1.2.3:1", "[::1]:1", "localhost:1",
                                  "LOCALHOST:1"])
def test_local_addresses_need_nothing(text: str) -> None:
    security.check_listen(parse_address(text), security.PLAINTEXT)


@pytest.mark.parametrize("text", ["0.0.0.0:1", "[::]:1", "10.0.0.1:1", "vcpu:50051", "localhost.example:1"])
def test_other_addresses_need_tls_a_token_or_insecure(text: str, tmp_path: Path) -> None:
    with pytest.raises(security.SecurityError, match=r"refusing to listen on .*--insecure"):
        security.check_listen(parse_address(text), security.PLAINTEXT)
    path, _ = token_file(tmp_path)
    security.check_listen(parse_address(text), security.load(token_file=str(path)))
    security.check_listen(parse_address(text), security.Security(insecure=True))


# ----- the command line --------------------------------------------------------------------------------------
def test_serve_refuses_an_unprotected_public_address(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve-devices", "--listen", "0.0.0.0:0", "--device", "scratch@0x0"]) == 2
    err = capsys.readouterr().err
    assert "mmiosplit serve-devices: refusing to listen on 0.0.0.0:0" in err and "--insecure" in err
    assert main(["serve-vcpu", "--listen", "0.0.0.0:0"]) == 2
    assert "mmiosplit serve-vcpu: refusing to listen on 0.0.0.0:0" in capsys.readouterr().err


def test_a_bad_token_file_stops_any_command_at_start(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "missing-token"
    assert main(["serve-vcpu", "--listen", "127.0.0.1:0", "--token-file", str(missing)]) == 2
    assert f"--token-file {missing}: no such file" in capsys.readouterr().err
    monkeypatch.setenv("MMIOSPLIT_TOKEN_FILE", str(missing))
    assert main(["health", "127.0.0.1:1"]) == 2  # a client command reads the variable too
    assert f"mmiosplit health: --token-file {missing}: no such file" in capsys.readouterr().err
    security.configure(security.PLAINTEXT)


def test_services_started_by_the_launcher_get_the_same_credentials(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path, token = token_file(tmp_path)
    ca = Authority.create(tmp_path, "a")
    leaf = ca.leaf("both")
    sec = security.load(str(leaf.cert), str(leaf.key), str(ca.ca), str(path))
    seen: list[list[str]] = []

    class Started:
        pid = 1

        def poll(self) -> int:
            return 0

    def popen(module: str, args: list[str], **_kwargs: object) -> Started:
        seen.append(list(args))
        return Started()

    monkeypatch.setattr(lifeline, "popen", popen)
    security.configure(sec)
    try:
        launcher.LocalServices(tmp_path).start("device service", ["serve-devices"], "unix:/tmp/x.sock")
    finally:
        security.configure(security.PLAINTEXT)
    args = seen[0]
    assert args[args.index("--token-file") + 1] == str(path)
    assert args[args.index("--tls-ca") + 1] == str(ca.ca)
    assert args[args.index("--tls-cert") + 1] == str(leaf.cert)
    assert token not in " ".join(args)


def test_nothing_else_creates_a_channel_or_a_server() -> None:
    """ARCHITECTURE.md's invariant: every gRPC server and channel of the packages comes from mmiosplit/security.py."""
    root = Path(__file__).resolve().parents[2]
    forbidden = re.compile(r"grpc\.(insecure_channel|secure_channel|server|aio\.server|aio\.insecure_channel|"
                           r"aio\.secure_channel)\(|add_(in)?secure_port\(")
    offenders = [f"{path.relative_to(root)}:{n}" for package in ("mmiosplit", "mmiosplit_cli", "vcpu_service",
                                                                  "device_service")
                 for path in sorted((root / package).rglob("*.py")) if path.name != "security.py"
                 and "/v1/" not in str(path)
                 for n, line in enumerate(path.read_text().splitlines(), 1) if forbidden.search(line)]
    assert offenders == []
