"""U-Boot's ``saveenv`` (256 KiB of flash erased and programmed) over gRPC, with the flash's writes posted while it
is out of array mode (the default) and with an exit for every write (``pflash ...,posted=off``), in one run.

    python3 bench/uboot_saveenv.py [--arch aarch64|arm] [--runs 1] [--cpu 0] [--json out.json]

Both services are started once per row with the virt board's devices (upstream QEMU 7.2.0's buffered programming,
``write_buffer=direct``, under which ``saveenv`` works) and every process is pinned to one CPU. The row with an exit
per write is the floor the posted row is measured against: the ratio and the seconds saved are printed. Exits are
the whole run's (boot to the prompt, about 1,200, included), as ``mmiosplit run`` prints them at its end. QEMU is no
reference here: Debian's build fails ``saveenv`` ("Flash buffer write timeout", see the README).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.firmware.console import run_uboot_script  # noqa: E402

UBOOT = {"aarch64": "/usr/lib/u-boot/qemu_arm64/u-boot.bin", "arm": "/usr/lib/u-boot/qemu_arm/u-boot.bin"}
EXITS = re.compile(r"; (\d+) exits")


def saveenv(arch: str, flash1: Path, posted: bool, cpu: int) -> tuple[float, int]:
    """Seconds from typing ``saveenv`` to the next prompt, and the run's exits."""
    from mmiosplit_cli.launcher import local_services
    from vcpu_service.machines.virt import device_specs

    with open(flash1, "wb") as f:
        f.truncate(64 << 20)
    specs = [s if posted or not s.startswith("pflash@") else s + ",posted=off"
             for s in device_specs(arch, UBOOT[arch], str(flash1), write_buffer="direct")]
    with local_services([a for s in specs for a in ("--device", s)], cpu=cpu) as (vaddr, daddr, _):
        assert vaddr and daddr
        command = [sys.executable, "-m", "mmiosplit_cli", "run", "--machine", "virt", "--arch", arch, UBOOT[arch],
                   "--vcpu-service", vaddr, "--device-service", daddr]
        transcript = run_uboot_script(command, ["setenv foo bar; saveenv"], timeout=900)
    lines = transcript.lines()
    if "Writing to Flash... done" not in lines:
        raise SystemExit(f"saveenv did not write the flash ({'posted' if posted else 'exits'}):\n" + "\n".join(lines))
    exits = [int(m.group(1)) for line in lines if (m := EXITS.search(line))]
    return transcript.marks["done"] - transcript.marks["prompt"], exits[-1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=["aarch64", "arm"], default="aarch64")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--cpu", type=int, default=0)
    p.add_argument("--json")
    args = p.parse_args()
    os.sched_setaffinity(0, {args.cpu})  # children inherit it
    work = Path(tempfile.mkdtemp(prefix="saveenv-bench-"))
    runs: dict[str, list[tuple[float, int]]] = {"posted": [], "exits": []}
    for _ in range(args.runs):
        for row in runs:
            runs[row].append(saveenv(args.arch, work / f"{row}.img", row == "posted", args.cpu))
    med = {row: (statistics.median(s for s, _ in r), statistics.median(e for _, e in r)) for row, r in runs.items()}
    print(f"U-Boot {args.arch} saveenv over gRPC (median of {args.runs}), every process pinned to CPU {args.cpu}")
    print(f"{'':<8}{'saveenv s':>11}{'run exits':>11}")
    for row, (seconds, exits) in med.items():
        print(f"{row:<8}{seconds:>11.2f}{exits:>11.0f}")
    posted, floor = med["posted"][0], med["exits"][0]
    print(f"posted / exit per write: {posted / floor:.3f} ({floor - posted:.1f} s less)")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "runs": runs, "median": med}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
