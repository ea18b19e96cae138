"""Floors: what one round trip costs with the same placement but without mmiosplit, measured in the same run.

* ``socket_floor``: a raw 40-byte ping-pong over a UNIX socketpair or TCP loopback (the kernel's cost);
* ``grpc_floor``: a bare gRPC bidi ping-pong with the exit path's own messages (``ExitStreamRequest`` with
  an ``MmioExit``, ``ExitStreamResponse`` with a ``Completion``), a sync client on a queue-fed stream as the
  vCPU uses and a ``grpc.aio`` server as the device service runs (what gRPC in Python costs).

The client side runs in the calling process (pinned where the vCPU would be), the server side in a child
pinned where the device service would be. Shared by ``mmiosplit loadtest`` and ``bench/exit_latency.py``.
Run as ``python -m mmiosplit_cli.loadtest.floors --echo-server ADDR --cpu N`` it is that gRPC server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import queue
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator

import grpc
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hdrh.histogram import HdrHistogram

from mmiosplit import security
from mmiosplit.address import parse_address
from mmiosplit.v1 import device_pb2, device_pb2_grpc
from mmiosplit_cli import lifeline
from mmiosplit_cli.launcher import check_health
from mmiosplit_cli.loadtest.stats import new_histogram

WARMUP = 500
MESSAGE = b"x" * 40


class FloorError(RuntimeError):
    """A floor could not be measured (its server did not come up, the socket broke)."""


def _pin(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


@contextlib.contextmanager
def _affinity(cpu: int | None) -> Iterator[None]:
    """Run the client side on cpu, then give the caller its affinity back."""
    saved = os.sched_getaffinity(0)
    _pin(cpu)
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


# ----- raw socket -------------------------------------------------------------------------------------------
def _echo_forever(sock: socket.socket) -> None:
    while data := sock.recv(64):
        sock.sendall(data)


def socket_floor(n: int, transport: str = "unix", client_cpu: int | None = None, server_cpu: int | None = None,
                 warmup: int = WARMUP) -> HdrHistogram:
    """``n`` timed 40-byte round trips (after ``warmup``), the echo side in a forked child on server_cpu."""
    if transport == "unix":
        client, server = socket.socketpair()
    else:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        listener.close()
        for s in (client, server):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            client.close()
            _pin(server_cpu)
            _echo_forever(server)
        finally:
            os._exit(0)
    server.close()
    hist = new_histogram()
    try:
        with _affinity(client_cpu):
            for i in range(n + warmup):
                t = time.perf_counter_ns()
                client.sendall(MESSAGE)
                got = client.recv(64)
                elapsed = time.perf_counter_ns() - t
                if not got:
                    raise FloorError("socket floor: the echo side closed the socket")
                if i >= warmup:
                    hist.record_value(max(1, elapsed))
    finally:
        client.close()
        os.waitpid(pid, 0)
    return hist


# ----- bare gRPC --------------------------------------------------------------------------------------------
class _Echo(device_pb2_grpc.DeviceServiceServicer):
    async def ExitStream(self, requests: AsyncIterator[device_pb2.ExitStreamRequest],
                         context: grpc.aio.ServicerContext) -> AsyncIterator[device_pb2.ExitStreamResponse]:
        async for req in requests:
            yield device_pb2.ExitStreamResponse(
                seq=req.seq, completion=device_pb2.Completion(status=device_pb2.COMPLETION_STATUS_OK,
                                                              data=b"\0\0\0\0"))


async def serve_echo(address: str) -> None:
    """The floor's server: only ExitStream (an echo) and health, on grpc.aio like the device service."""
    # Plaintext on purpose, with no token, whatever this process's credentials: the floor measures bare gRPC on a
    # private socket (a UNIX socket in a temporary folder, or loopback) that only this load test uses.
    server = security.aio_server(security.PLAINTEXT)
    device_pb2_grpc.add_DeviceServiceServicer_to_server(_Echo(), server)
    hs = health_async.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    security.bind(server, parse_address(address), security.PLAINTEXT)
    await server.start()
    await hs.set("", health_pb2.HealthCheckResponse.SERVING)
    await server.wait_for_termination()


EXIT_MESSAGE = device_pb2.MmioExit(
    vcpu_id=0, address=0x0A00_0000, region_offset=0, device="scratch-0", region="mem", length=4,
    direction=device_pb2.ACCESS_DIRECTION_READ, syndrome=0x93810007, pc=0x4008_0008, instruction=0xB9400001)


def start_echo_server(address: str, cpu: int | None) -> subprocess.Popen[bytes]:
    """Start the echo server as a child process (ended with this one, by its lifeline) and wait until it is SERVING."""
    args = ["--echo-server", address]
    if cpu is not None:
        args += ["--cpu", str(cpu)]
    proc = lifeline.popen("mmiosplit_cli.loadtest.floors", args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while check_health(address, timeout=0.5, sec=security.PLAINTEXT) != "SERVING":
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise FloorError(f"the gRPC floor's echo server exited with status {proc.returncode}: {err.strip()}")
        if time.monotonic() > deadline:
            stop(proc)
            raise FloorError(f"the gRPC floor's echo server at {address} was not SERVING after 30 s")
        time.sleep(0.05)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def grpc_ping_pong(n: int, address: str, warmup: int = WARMUP) -> HdrHistogram:
    """``n`` timed round trips on one ExitStream to a running server at address (after ``warmup``)."""
    hist = new_histogram()
    with security.channel(address, security.PLAINTEXT) as channel:  # the echo server's: see serve_echo
        q: queue.SimpleQueue[device_pb2.ExitStreamRequest | None] = queue.SimpleQueue()
        call = device_pb2_grpc.DeviceServiceStub(channel).ExitStream(iter(q.get, None))
        try:
            for i in range(n + warmup):
                t = time.perf_counter_ns()
                q.put(device_pb2.ExitStreamRequest(seq=i + 1, exit=EXIT_MESSAGE))
                next(call)
                elapsed = time.perf_counter_ns() - t
                if i >= warmup:
                    hist.record_value(max(1, elapsed))
        except grpc.RpcError as exc:
            raise FloorError(f"gRPC floor: {exc.code().name}: {exc.details()}") from None
        finally:
            q.put(None)
            call.cancel()
    return hist


def grpc_floor(n: int, address: str, client_cpu: int | None = None, server_cpu: int | None = None,
               warmup: int = WARMUP) -> HdrHistogram:
    """Start the echo server on server_cpu, ping-pong from this process on client_cpu, stop the server."""
    proc = start_echo_server(address, server_cpu)
    try:
        with _affinity(client_cpu):
            return grpc_ping_pong(n, address, warmup)
    finally:
        stop(proc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="the gRPC floor's echo server")
    p.add_argument("--echo-server", required=True, metavar="ADDR")
    p.add_argument("--cpu", type=int)
    args = p.parse_args(argv)
    _pin(args.cpu)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_echo(args.echo_server))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
