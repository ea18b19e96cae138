"""Exit round-trip latency beside its floors, all measured in the same run on the same CPU.

    python3 bench/exit_latency.py [--exits 3000] [--cpu 0] [--transport unix|tcp] [--json out.json]

Floors: a raw socket ping-pong (what the kernel costs), a bare gRPC bidi ping-pong with the same
messages and the same server and client stacks (what gRPC in Python costs), then the exit channel
alone (our transport, no Unicorn), then a guest's loads through the whole split (the vCPU's own
measurement: from sending the exit to completing the load). Every service is pinned to one CPU,
because cross-CPU wakeups dominate everything on these VMs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from mmiosplit.launcher import check_health, free_tcp_port, local_services  # noqa: E402
from mmiosplit.v1 import common_pb2, device_pb2, device_pb2_grpc, vcpu_pb2  # noqa: E402
from mmiosplit.wire import GRPC_OPTIONS  # noqa: E402


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    s = sorted(samples_ns)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))] / 1000  # noqa: E731
    return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99), "max": s[-1] / 1000, "n": len(s)}


# ----- floor 1: raw socket ping-pong ------------------------------------------------------------------
def socket_floor(n: int, cpu: int) -> dict[str, float]:
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        a.close()
        os.sched_setaffinity(0, {cpu})
        while data := b.recv(64):
            b.send(data)
        os._exit(0)
    b.close()
    samples = []
    for i in range(n + 500):
        t = time.perf_counter_ns()
        a.send(b"x" * 40)
        a.recv(64)
        if i >= 500:
            samples.append(time.perf_counter_ns() - t)
    a.close()
    os.waitpid(pid, 0)
    return percentiles(samples)


# ----- floor 2: bare gRPC bidi ping-pong, same messages, aio server / sync client -------------------------
class _Echo(device_pb2_grpc.DeviceServiceServicer):
    async def ExitStream(self, requests, context):  # type: ignore[no-untyped-def]
        async for req in requests:
            yield device_pb2.ExitStreamResponse(
                seq=req.seq, completion=device_pb2.Completion(status=device_pb2.COMPLETION_STATUS_OK,
                                                              data=b"\0\0\0\0"))


async def _serve_echo(address: str) -> None:
    server = grpc.aio.server(options=GRPC_OPTIONS)
    device_pb2_grpc.add_DeviceServiceServicer_to_server(_Echo(), server)
    from grpc_health.v1 import _async as health_async
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    hs = health_async.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    server.add_insecure_port(address)
    await server.start()
    await hs.set("", health_pb2.HealthCheckResponse.SERVING)
    await server.wait_for_termination()


def grpc_floor(n: int, cpu: int, address: str) -> dict[str, float]:
    import queue

    proc = subprocess.Popen([sys.executable, __file__, "--echo-server", address, "--cpu", str(cpu)])
    try:
        while check_health(address, timeout=0.5) != "SERVING":
            time.sleep(0.05)
        with grpc.insecure_channel(address, options=GRPC_OPTIONS) as channel:
            q: queue.SimpleQueue[device_pb2.ExitStreamRequest | None] = queue.SimpleQueue()
            call = device_pb2_grpc.DeviceServiceStub(channel).ExitStream(iter(q.get, None))
            exit_msg = device_pb2.MmioExit(vcpu_id=0, address=0x0A00_0000, region_offset=0, device="scratch-0",
                                           region="mem", length=4, direction=device_pb2.ACCESS_DIRECTION_READ,
                                           syndrome=0x93810007, pc=0x4008_0008, instruction=0xB9400001)
            samples = []
            for i in range(n + 500):
                t = time.perf_counter_ns()
                q.put(device_pb2.ExitStreamRequest(seq=i + 1, exit=exit_msg))
                next(call)
                if i >= 500:
                    samples.append(time.perf_counter_ns() - t)
            q.put(None)
            call.cancel()
        return percentiles(samples)
    finally:
        proc.terminate()
        proc.wait()


# ----- our transport alone, then the whole split -----------------------------------------------------------
def channel_only(n: int, device_address: str) -> dict[str, float]:
    from vcpu_service.transport import GrpcEndpoint, MmioRequest

    endpoint = GrpcEndpoint(device_address)
    region = next(r for r in endpoint.describe() if r.device_type == "scratch")
    channel = endpoint.open_exit_channel("bench", 0, common_pb2.ARCHITECTURE_AARCH64)
    request = MmioRequest(0, region.base, region, 4, False)
    samples = []
    for i in range(n + 500):
        t = time.perf_counter_ns()
        channel.access(request)
        if i >= 500:
            samples.append(time.perf_counter_ns() - t)
    channel.close()
    endpoint.close()
    return percentiles(samples)


def guest_loop(exits: int) -> bytes:
    """x0 = scratch; x3 = exits; 1: ldr w1,[x0]; subs x3,x3,#1; b.ne 1b; PSCI SYSTEM_OFF."""
    words = [0xD2A14000, 0xD2800000 | (exits << 5) | 3, 0xB9400001, 0xF1000463, 0x54FFFFC1,
             0xD2800100, 0xF2B08000, 0xD4000002, 0x14000000]
    return struct.pack(f"<{len(words)}I", *words)


def whole_split(exits: int, vcpu_address: str, device_address: str) -> dict[str, float]:
    from mmiosplit.runner import run_vm

    cfg = vcpu_pb2.VmConfig(
        architecture=common_pb2.ARCHITECTURE_AARCH64, vcpu_count=1,
        ram=[vcpu_pb2.MemoryRegion(base=0x4000_0000, size=16 * 2**20)], device_services=[device_address],
        images=[vcpu_pb2.Image(name="loop", data=guest_loop(exits), load_address=0x4008_0000)],
        entry_point=0x4008_0000,
    )
    result = run_vm(vcpu_address, cfg)
    if result.final.kind != vcpu_pb2.VM_EVENT_KIND_POWERED_OFF:
        raise SystemExit(f"guest did not finish: {result.final.reason}")
    lat = result.stats.exit_latency
    return {"p50": lat.p50_us, "p90": lat.p90_us, "p99": lat.p99_us, "max": lat.max_us, "n": lat.count,
            "exits_per_s": result.stats.exits / max(result.stats.run_seconds, 1e-9)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exits", type=int, default=3000)
    p.add_argument("--cpu", type=int, default=0)
    p.add_argument("--transport", choices=["unix", "tcp"], default="unix")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--echo-server", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.sched_setaffinity(0, {args.cpu})
    if args.echo_server:
        asyncio.run(_serve_echo(args.echo_server))
        return 0
    if not 1 <= args.exits <= 65535:
        p.error("--exits must be 1-65535 (the guest's loop counter is a 16-bit immediate)")
    results: dict[str, dict[str, float]] = {}
    results["socket"] = socket_floor(args.exits, args.cpu)
    with local_services(["--device", "scratch@0x0a000000,size=0x1000"], cpu=args.cpu,
                        transport=args.transport) as (vaddr, daddr, svc):
        assert vaddr and daddr
        echo = (f"unix:{svc.workdir / 'echo.sock'}" if args.transport == "unix"
                else f"127.0.0.1:{free_tcp_port()}")
        results["grpc_floor"] = grpc_floor(args.exits, args.cpu, echo)
        results["exit_channel"] = channel_only(args.exits, daddr)
        results["guest_exit"] = whole_split(args.exits, vaddr, daddr)
    floor = results["grpc_floor"]
    print(f"exit latency, {args.transport} socket, every process pinned to CPU {args.cpu}, "
          f"{args.exits} round trips each")
    header = ["p50 us", "p90 us", "p99 us", "max us"]
    print(f"{'measurement':<14}" + "".join(f"{h:>10}" for h in header) + f"{'p50/floor':>11}{'p99/floor':>11}")
    for name, r in results.items():
        print(f"{name:<14}{r['p50']:>10.1f}{r['p90']:>10.1f}{r['p99']:>10.1f}{r['max']:>10.1f}"
              f"{r['p50'] / floor['p50']:>11.2f}{r['p99'] / floor['p99']:>11.2f}")
    print(f"guest exits per second: {results['guest_exit']['exits_per_s']:.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
