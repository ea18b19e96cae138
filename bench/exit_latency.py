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
import json
import os
import struct
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hdrh.histogram import HdrHistogram  # noqa: E402

from mmiosplit.v1 import common_pb2, vcpu_pb2  # noqa: E402
from mmiosplit_cli.launcher import free_tcp_port, local_services  # noqa: E402
from mmiosplit_cli.loadtest.floors import WARMUP, grpc_floor, socket_floor  # noqa: E402
from mmiosplit_cli.loadtest.stats import histogram_of, percentiles_us  # noqa: E402


def percentiles(hist: HdrHistogram) -> dict[str, float]:
    """p50/p90/p99/max in microseconds and the count, from a histogram of nanoseconds."""
    p = percentiles_us(hist)
    return {"p50": p["p50"], "p90": p["p90"], "p99": p["p99"], "max": p["max"], "n": int(p["count"])}


# The floors (raw socket, bare gRPC) are mmiosplit_cli.loadtest.floors, shared with `mmiosplit loadtest`.


# ----- our transport alone, then the whole split -----------------------------------------------------------
def channel_only(n: int, device_address: str) -> dict[str, float]:
    from mmiosplit.mmio import MmioExit
    from vcpu_service.transport import GrpcEndpoint

    endpoint = GrpcEndpoint(device_address)
    region = next(r for r in endpoint.describe() if r.device_type == "scratch")
    channel = endpoint.open_exit_channel("bench", 0, "aarch64")
    request = MmioExit(0, region.base, 4, False, device=region.device, region=region.name)
    samples = []
    for i in range(n + WARMUP):
        t = time.perf_counter_ns()
        channel.access(request)
        if i >= WARMUP:
            samples.append(time.perf_counter_ns() - t)
    channel.close()
    endpoint.close()
    return percentiles(histogram_of(samples))


def guest_loop(exits: int) -> bytes:
    """x0 = scratch; x3 = exits; 1: ldr w1,[x0]; subs x3,x3,#1; b.ne 1b; PSCI SYSTEM_OFF."""
    words = [0xD2A14000, 0xD2800000 | (exits << 5) | 3, 0xB9400001, 0xF1000463, 0x54FFFFC1,
             0xD2800100, 0xF2B08000, 0xD4000002, 0x14000000]
    return struct.pack(f"<{len(words)}I", *words)


def whole_split(exits: int, vcpu_address: str, device_address: str) -> dict[str, float]:
    from mmiosplit_cli.runner import run_vm

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
    args = p.parse_args()
    os.sched_setaffinity(0, {args.cpu})
    if not 1 <= args.exits <= 65535:
        p.error("--exits must be 1-65535 (the guest's loop counter is a 16-bit immediate)")
    results: dict[str, dict[str, float]] = {}
    results["socket"] = percentiles(socket_floor(args.exits, args.transport, args.cpu, args.cpu))
    with local_services(["--device", "scratch@0x0a000000,size=0x1000"], cpu=args.cpu,
                        transport=args.transport) as (vaddr, daddr, svc):
        assert vaddr and daddr
        echo = (f"unix:{svc.workdir / 'echo.sock'}" if args.transport == "unix"
                else f"127.0.0.1:{free_tcp_port()}")
        results["grpc_floor"] = percentiles(grpc_floor(args.exits, echo, args.cpu, args.cpu))
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
