"""Soak: a million exits (or a time limit) through both services, watching their memory, threads and descriptors.

    python3 bench/soak.py [--exits 1000000] [--minutes 10] [--mix 1w1r] [--json out.json]

Both services are started here (UNIX socket, both on the first CPU this process may use) and a load-test guest
loops over a scratch device. After a warm-up of ``--warmup`` exits the script samples, every ``--every``
seconds, each service's resident memory (VmRSS), threads and open file descriptors from /proc, and at the end
prints the first and last samples, the largest, and the change: a leak shows as growth, a flat service as
noise. The run stops at ``--exits`` exits or after ``--minutes``, whichever comes first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mmiosplit_cli.launcher import local_services  # noqa: E402
from mmiosplit_cli.loadtest.guest import build_program, parse_mix  # noqa: E402
from mmiosplit_cli.loadtest.runner import machine_info  # noqa: E402
from mmiosplit_cli.loadtest.vms import GrpcVm, vm_config  # noqa: E402

SCRATCH = 0x0A00_0000


def sample(pid: int) -> dict[str, int]:
    """RSS in KiB, threads and open descriptors of ``pid``, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {"rss_kib": int(fields["VmRSS"].split()[0]), "threads": int(fields["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exits", type=int, default=1_000_000)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--warmup", type=int, default=20_000, help="exits before the first sample (20000)")
    parser.add_argument("--mix", default="1w1r")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between samples (10)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    cpu = min(os.sched_getaffinity(0))
    mix = parse_mix(args.mix)
    program = build_program("aarch64", mix, 4, [SCRATCH], 0, 0)  # loops until the VM is deleted
    samples: list[dict[str, Any]] = []
    with local_services(["--device", f"scratch@{SCRATCH:#x},size=0x1000"], cpu=cpu) as (vaddr, daddr, handle):
        assert vaddr and daddr
        pids = {sp.name: sp.process.pid for sp in handle.processes}
        vm = GrpcVm(vaddr, vm_config(program, 1, [daddr], name="soak"), "soak")
        vm.write_memory(program.go_address, b"\1\0\0\0")
        vm.start()
        t0 = time.monotonic()
        end = t0 + 60 * args.minutes
        exits = 0
        next_sample = 0.0
        try:
            while True:
                if (event := vm.final()) is not None:
                    raise SystemExit(f"the guest stopped: {event.reason}")
                exits = int(vm.stats(counters_only=True).exits)
                now = time.monotonic()
                if exits >= args.warmup and now >= next_sample:
                    row = {"seconds": round(now - t0, 1), "exits": exits,
                           **{name: sample(pid) for name, pid in pids.items()}}
                    samples.append(row)
                    print(json.dumps(row), flush=True)
                    next_sample = now + args.every
                if exits >= args.exits or now >= end:
                    break
                time.sleep(0.5)
            final = {"seconds": round(time.monotonic() - t0, 1), "exits": exits,
                     **{name: sample(pid) for name, pid in pids.items()}}
            samples.append(final)
        finally:
            vm.delete()
    first, last = samples[0], samples[-1]
    print(f"\n{machine_info()['cpu_model']}, both services on CPU {cpu}, mix {args.mix}: {last['exits']} exits in "
          f"{last['seconds']:.0f} s; from the first sample (after {first['exits']} exits) to the last:")
    print("| service | RSS KiB first -> last (max) | change | threads | descriptors |")
    print("|---|---|---|---|---|")
    for name in pids:
        rss = [s[name]["rss_kib"] for s in samples]
        change = 100.0 * (rss[-1] - rss[0]) / rss[0]
        print(f"| {name} | {rss[0]} -> {rss[-1]} ({max(rss)}) | {change:+.1f}% | "
              f"{first[name]['threads']} -> {last[name]['threads']} | {first[name]['fds']} -> {last[name]['fds']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"samples": samples}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
