"""The Node service behind mutual TLS and a bearer token, the flags of mmiosplit.security: the hello guest runs
through a vcpu service holding the same credentials, and a caller without them is refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from mmiosplit import security
from mmiosplit.v1 import device_pb2, device_pb2_grpc
from mmiosplit_cli.launcher import check_health
from tests.node.conftest import HELLO_DEVICES, node_service
from tests.pki import Authority, token_file

pytestmark = [pytest.mark.node, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]


def test_mutual_tls_and_a_token_protect_it(tmp_path: Path) -> None:
    ca = Authority.create(tmp_path, "node")
    server, client = ca.leaf("server"), ca.leaf("client")
    token_path, _ = token_file(tmp_path)
    tls = ["--tls-cert", str(server.cert), "--tls-key", str(server.key), "--tls-ca", str(ca.ca)]
    full = security.load(str(client.cert), str(client.key), str(ca.ca), str(token_path))
    tls_only = security.load(str(client.cert), str(client.key), str(ca.ca))
    with node_service(HELLO_DEVICES, extra=[*tls, "--token-file", str(token_path)], health=tls_only) as node:
        assert node.log().startswith(f"mmiosplit device service listening on {node.address} (mutual TLS + token)")
        assert check_health(node.address, timeout=2, sec=security.PLAINTEXT) != "SERVING"  # no TLS: no answer
        with pytest.raises(grpc.RpcError) as err:  # TLS, no token
            device_pb2_grpc.DeviceServiceStub(security.channel(node.address, tls_only)).Describe(
                device_pb2.DescribeRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert err.value.details() == ("missing token: this service requires 'authorization: Bearer <token>' "
                                       "metadata (--token-file)")
        described = device_pb2_grpc.DeviceServiceStub(security.channel(node.address, full)).Describe(
            device_pb2.DescribeRequest(), timeout=5)
        assert [d.name for d in described.devices] == ["uart0", "scratch0"]
        # `mmiosplit run` starts a vcpu service with its own credentials, which it presents to the Node service.
        run = subprocess.run([sys.executable, "-m", "mmiosplit_cli", "run", str(ROOT / "guests/bin/hello-a64.bin"),
                              "--device-service", node.address, "--timeout", "60",
                              "--tls-cert", str(client.cert), "--tls-key", str(client.key), "--tls-ca", str(ca.ca),
                              "--token-file", str(token_path)],
                             cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        assert "hello from mmiosplit guest (a64)" in run.stdout and "scratch ok" in run.stdout
        assert "wrong token" not in node.log()
