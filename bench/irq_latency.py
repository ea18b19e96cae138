"""Interrupt latency over the split against its floors, in rounds: ``mmiosplit loadtest --irq`` R times.

    python3 bench/irq_latency.py [--rounds 3] [--interrupts 3000] [--arch aarch64|arm] [--delay-us 500]
                                 [--json out.json]

Each round is one load test: an irq-probe raises its line (from its own thread, over the Watch stream), the
guest's handler reads GICC_IAR, acknowledges the probe (an exit) and writes GICC_EOIR. Every process is pinned
to the first CPU this one may use. Per round it prints, beside the bare gRPC ping-pong floor of the same run:
raised -> handler and raised -> EOI (p50, p99) over gRPC and on the local transport (the same round in one
process), and the overhead of gRPC above that floor; then the median of the rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mmiosplit_cli.loadtest import report  # noqa: E402
from mmiosplit_cli.loadtest.runner import LoadConfig, run_loadtest  # noqa: E402

COLUMNS = [("grpc floor p50", ("floor_grpc_us", "p50")), ("exit p50", ("latency_us", "p50")),
           ("raised->handler p50", ("irq", "ack_us", "p50")), ("p99", ("irq", "ack_us", "p99")),
           ("raised->EOI p50", ("irq", "eoi_us", "p50")), ("p99", ("irq", "eoi_us", "p99")),
           ("local handler p50", ("irq", "floor_local", "ack_us", "p50")),
           ("local EOI p50", ("irq", "floor_local", "eoi_us", "p50")),
           ("handler p50 above local", ("irq", "overhead_us", "ack_p50"))]


def _get(doc: dict[str, Any], path: tuple[str, ...]) -> float:
    value: Any = doc
    for key in path:
        value = value[key]
    return float(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--interrupts", type=int, default=3000)
    parser.add_argument("--arch", choices=["aarch64", "arm"], default="aarch64")
    parser.add_argument("--delay-us", type=int, default=500)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    docs = []
    for r in range(args.rounds):
        cfg = LoadConfig(arch=args.arch, irq=True, exits=args.interrupts, irq_delay_us=args.delay_us)
        docs.append(report.to_json(run_loadtest(cfg)))
        print(f"round {r + 1}: " + ", ".join(f"{name} {_get(docs[-1], path):.1f}" for name, path in COLUMNS),
              flush=True)
    machine = docs[0]["machine"]
    print(f"\n{machine['cpu_model']}, {machine['cpus_allowed']} CPU(s) allowed, every process on one CPU, "
          f"{args.arch}, {args.interrupts} interrupts per round, raised {args.delay_us} us after FIRE, us:")
    print("| measurement | " + " | ".join(f"round {i + 1}" for i in range(len(docs))) + " | median |")
    print("|---|" + "---|" * (len(docs) + 1))
    for name, path in COLUMNS:
        values = [_get(d, path) for d in docs]
        print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in values) + f" | {statistics.median(values):.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": docs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
