"""TLS, mutual TLS and the bearer token with real services: a device service and a vcpu service in processes of
their own, `mmiosplit run` of the bundled hello guest as a third, and every refusal seen by the client AND in the
refusing service's log (the peer's address, never the token). Certificates and tokens are made here, at test time.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from mmiosplit import security
from mmiosplit.v1 import device_pb2, device_pb2_grpc, vcpu_pb2, vcpu_pb2_grpc
from mmiosplit_cli.launcher import check_health, free_tcp_port
from tests.pki import Authority, Leaf, token_file

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
HELLO = ROOT / "guests" / "bin" / "hello-a64.bin"
DEVICES = ["pl011@0x09000000", "pl031@0x09010000", "scratch@0x0a000000,size=0x1000"]


def child_env(**extra: str) -> dict[str, str]:
    """This checkout's code in every child (not an installed copy), and none of the caller's MMIOSPLIT_ settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MMIOSPLIT_", "GRPC_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@dataclass
class Pki:
    ca: Path  # CA a: signs the services' and the client's certificates
    server: Leaf
    client: Leaf
    rogue: Leaf  # signed by CA b
    other_ca: Path
    token_file: Path
    token: str

    def tls_flags(self, leaf: Leaf, ca: bool = True) -> list[str]:
        return ["--tls-cert", str(leaf.cert), "--tls-key", str(leaf.key), *(["--tls-ca", str(self.ca)] if ca else [])]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    a, b = Authority.create(folder, "a"), Authority.create(folder, "b")
    path, token = token_file(folder)
    return Pki(a.ca, a.leaf("server"), a.leaf("client"), b.leaf("rogue"), b.ca, path, token)


@dataclass
class Service:
    """One service process and its log (stdout and stderr: Python's logging and gRPC core's)."""

    process: subprocess.Popen[bytes]
    address: str  # where a client connects
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout: float = 10.0) -> str:
        """The first log line matching ``pattern`` (a regex), waiting for the service to write it."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log_text().splitlines():
                if re.search(pattern, line):
                    return line
            if time.monotonic() > deadline:
                raise AssertionError(f"no log line matches {pattern!r}:\n{self.log_text()[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start(kind: str, listen: str, flags: list[str], log: Path, client: security.Security,
          env: dict[str, str] | None = None) -> Service:
    """Start ``serve-vcpu`` or ``serve-devices`` and wait until health (reached with ``client``) says SERVING."""
    args = ["serve-vcpu"] if kind == "vcpu" else ["serve-devices", *(a for d in DEVICES for a in ("--device", d))]
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mmiosplit_cli", *args, "--listen", listen, *flags],
                                cwd=ROOT, env=env or child_env(), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)
    address = listen.replace("0.0.0.0:", "127.0.0.1:")
    service = Service(proc, address, log)
    deadline = time.monotonic() + 30
    while check_health(address, timeout=0.5, sec=client) != "SERVING":
        if proc.poll() is not None or time.monotonic() > deadline:
            service.stop()
            raise AssertionError(f"{kind} service did not come up:\n{service.log_text()}")
        time.sleep(0.1)
    return service


def run_hello(vcpu: str, devices: str, flags: list[str], env: dict[str, str] | None = None,
              ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mmiosplit_cli", "run", str(HELLO), "--vcpu-service", vcpu,
                           "--device-service", devices, "--timeout", "60", *flags], cwd=ROOT, env=env or child_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)


def client_security(pki: Pki, leaf: Leaf | None = None, ca: Path | None = None, token: str | None = None,
                    tmp: Path | None = None) -> security.Security:
    """Credentials for this test process's own calls (health, direct RPCs)."""
    token_path = None
    if token is not None:
        assert tmp is not None
        token_path = tmp / f"client-token-{abs(hash(token))}"
        token_path.write_text(token)
    return security.load(str(leaf.cert) if leaf else None, str(leaf.key) if leaf else None,
                         str(ca) if ca else None, str(token_path) if token_path else None)


# ----- the strict pair: mutual TLS and a token, listening on every address ----------------------------------
@dataclass
class Pair:
    devices: Service
    vcpu: Service


@pytest.fixture(scope="module")
def strict(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    """Both services with mutual TLS and the token on 0.0.0.0 (allowed: both protect it)."""
    folder = tmp_path_factory.mktemp("strict")
    flags = [*pki.tls_flags(pki.server), "--token-file", str(pki.token_file)]
    probe = client_security(pki, pki.client, pki.ca)  # health needs the TLS handshake, not the token
    devices = start("devices", f"0.0.0.0:{free_tcp_port()}", flags, folder / "devices.log", probe)
    try:
        vcpu = start("vcpu", f"0.0.0.0:{free_tcp_port()}", flags, folder / "vcpu.log", probe)
    except BaseException:
        devices.stop()
        raise
    yield Pair(devices, vcpu)
    vcpu.stop()
    devices.stop()


def test_mutual_tls_and_token_together_run_the_guest(strict: Pair, pki: Pki) -> None:
    for service in (strict.devices, strict.vcpu):
        service.wait_log(r"listening on 0\.0\.0\.0:\d+ \(mutual TLS \+ token\)")
    proc = run_hello(strict.vcpu.address, strict.devices.address,
                     [*pki.tls_flags(pki.client), "--token-file", str(pki.token_file)])
    assert proc.returncode == 0, proc.stderr
    assert "hello from mmiosplit guest (a64)" in proc.stdout and "powered off" in proc.stderr


def _describe(address: str, sec: security.Security) -> None:
    with security.channel(address, sec) as ch:
        device_pb2_grpc.DeviceServiceStub(ch).Describe(device_pb2.DescribeRequest(), timeout=5)


def _get_stats(address: str, sec: security.Security) -> None:
    with security.channel(address, sec) as ch:
        vcpu_pb2_grpc.VcpuServiceStub(ch).GetStats(vcpu_pb2.GetStatsRequest(vm_id="none"), timeout=5)


@pytest.mark.parametrize("case, reason", [
    ("a certificate from another CA", "CERTIFICATE_VERIFY_FAILED"),
    ("no client certificate", "PEER_DID_NOT_RETURN_A_CERTIFICATE"),
    ("plaintext to the TLS port", "WRONG_VERSION_NUMBER"),
])
def test_tls_refusals_are_refused_and_logged(strict: Pair, pki: Pki, tmp_path: Path, case: str,
                                             reason: str) -> None:
    sec = {"a certificate from another CA": client_security(pki, pki.rogue, pki.ca, pki.token, tmp_path),
           "no client certificate": client_security(pki, None, pki.ca, pki.token, tmp_path),
           "plaintext to the TLS port": client_security(pki, token=pki.token, tmp=tmp_path)}[case]
    for service, call in ((strict.devices, _describe), (strict.vcpu, _get_stats)):
        with pytest.raises(grpc.RpcError) as err:
            call(service.address, sec)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, case
        # gRPC's core refuses the handshake and logs it (without the peer: no hook reaches Python).
        line = service.wait_log(rf"Handshake failed.*{reason}")
        assert pki.token not in line


def test_a_server_certificate_from_another_ca_is_refused_by_the_client(strict: Pair, pki: Pki) -> None:
    proc = subprocess.run([sys.executable, "-m", "mmiosplit_cli", "health", strict.vcpu.address, "--tls-ca",
                           str(pki.other_ca), "--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key)],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "SERVING" not in proc.stdout, proc.stdout
    assert "CERTIFICATE_VERIFY_FAILED" in proc.stderr or "Handshake failed" in proc.stderr, proc.stderr


@pytest.mark.parametrize("sent, why", [(None, "missing token"), ("a-wrong-token-value", "wrong token")])
def test_token_refusals_are_refused_and_logged_with_the_peer(strict: Pair, pki: Pki, tmp_path: Path,
                                                             sent: str | None, why: str) -> None:
    sec = client_security(pki, pki.client, pki.ca, sent, tmp_path)
    for service, call, method in ((strict.devices, _describe, "/mmiosplit.v1.DeviceService/Describe"),
                                  (strict.vcpu, _get_stats, "/mmiosplit.v1.VcpuService/GetStats")):
        with pytest.raises(grpc.RpcError) as err:
            call(service.address, sec)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert why in (err.value.details() or "") and pki.token not in (err.value.details() or "")
        line = service.wait_log(rf"refused {re.escape(method)} from .*{why}")
        assert re.search(r"from ipv4:127\.0\.0\.1:\d+", line), line  # the peer's address
        assert pki.token not in line and (sent is None or sent not in line)
    for service in (strict.devices, strict.vcpu):
        assert pki.token not in service.log_text()


def test_health_stays_open_without_the_token(strict: Pair, pki: Pki) -> None:
    proc = subprocess.run([sys.executable, "-m", "mmiosplit_cli", "health", strict.devices.address,
                           *pki.tls_flags(pki.client)], cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "SERVING", proc.stdout + proc.stderr


def test_a_run_without_the_token_is_refused(strict: Pair, pki: Pki) -> None:
    proc = run_hello(strict.vcpu.address, strict.devices.address, pki.tls_flags(pki.client))
    assert proc.returncode == 2 and "UNAUTHENTICATED" in proc.stderr and "missing token" in proc.stderr, proc.stderr
    strict.vcpu.wait_log(r"refused /mmiosplit\.v1\.VcpuService/CreateVm from ipv4:127\.0\.0\.1:\d+")


# ----- the other positive cases ------------------------------------------------------------------------------
def test_tls_without_client_certificates(pki: Pki, tmp_path: Path) -> None:
    """Server-side TLS only. The vcpu service uses its flags in both directions, so it is given no --tls-ca (that
    would ask its clients for certificates) and checks device services against gRPC's default roots, pointed at
    the test CA."""
    env = child_env(GRPC_DEFAULT_SSL_ROOTS_FILE_PATH=str(pki.ca))
    probe = client_security(pki, ca=pki.ca)
    flags = pki.tls_flags(pki.server, ca=False)
    devices = start("devices", f"127.0.0.1:{free_tcp_port()}", flags, tmp_path / "devices.log", probe, env)
    try:
        vcpu = start("vcpu", f"127.0.0.1:{free_tcp_port()}", flags, tmp_path / "vcpu.log", probe, env)
        try:
            devices.wait_log(r"listening on .* \(TLS\)")
            proc = run_hello(vcpu.address, devices.address, ["--tls-ca", str(pki.ca)])
            assert proc.returncode == 0, proc.stderr
            assert "hello from mmiosplit guest (a64)" in proc.stdout
            with pytest.raises(grpc.RpcError) as err:  # and plaintext to it is refused
                _describe(devices.address, security.PLAINTEXT)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            devices.wait_log("Handshake failed.*WRONG_VERSION_NUMBER")
        finally:
            vcpu.stop()
    finally:
        devices.stop()


def test_mutual_tls_over_unix_sockets(pki: Pki, tmp_path: Path) -> None:
    probe = client_security(pki, pki.client, pki.ca)
    flags = pki.tls_flags(pki.server)
    devices = start("devices", f"unix:{tmp_path / 'd.sock'}", flags, tmp_path / "devices.log", probe)
    try:
        vcpu = start("vcpu", f"unix:{tmp_path / 'v.sock'}", flags, tmp_path / "vcpu.log", probe)
        try:
            proc = run_hello(vcpu.address, devices.address, pki.tls_flags(pki.client))
            assert proc.returncode == 0, proc.stderr
            assert "hello from mmiosplit guest (a64)" in proc.stdout
        finally:
            vcpu.stop()
    finally:
        devices.stop()


def test_token_alone_over_unix_sockets(pki: Pki, tmp_path: Path) -> None:
    flags = ["--token-file", str(pki.token_file)]
    devices = start("devices", f"unix:{tmp_path / 'd.sock'}", flags, tmp_path / "devices.log", security.PLAINTEXT)
    try:
        vcpu = start("vcpu", f"unix:{tmp_path / 'v.sock'}", flags, tmp_path / "vcpu.log", security.PLAINTEXT)
        try:
            proc = run_hello(vcpu.address, devices.address, [], env=child_env(MMIOSPLIT_TOKEN_FILE=str(pki.token_file)))
            assert proc.returncode == 0, proc.stderr  # the client read its token from MMIOSPLIT_TOKEN_FILE
            assert "hello from mmiosplit guest (a64)" in proc.stdout
            with pytest.raises(grpc.RpcError) as err:
                _get_stats(vcpu.address, security.PLAINTEXT)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            vcpu.wait_log(r"refused /mmiosplit\.v1\.VcpuService/GetStats from unix:.*missing token")
        finally:
            vcpu.stop()
    finally:
        devices.stop()


def test_run_passes_its_credentials_to_the_services_it_starts(pki: Pki) -> None:
    proc = subprocess.run([sys.executable, "-m", "mmiosplit_cli", "run", str(HELLO), "--timeout", "60",
                           *pki.tls_flags(pki.client), "--token-file", str(pki.token_file)],
                          cwd=ROOT, env=child_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "hello from mmiosplit guest (a64)" in proc.stdout


# ----- --insecure --------------------------------------------------------------------------------------------
def test_a_public_address_needs_protection_or_insecure(tmp_path: Path) -> None:
    listen = f"0.0.0.0:{free_tcp_port()}"
    args = [sys.executable, "-m", "mmiosplit_cli", "serve-devices", "--listen", listen, "--device", DEVICES[2]]
    refused = subprocess.run(args, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert f"refusing to listen on {listen}" in refused.stderr and "--insecure" in refused.stderr
    service = start("devices", listen, ["--insecure"], tmp_path / "devices.log", security.PLAINTEXT)
    try:
        service.wait_log(r"listening on 0\.0\.0\.0:\d+ \(plaintext \(--insecure\)\)")
    finally:
        service.stop()
