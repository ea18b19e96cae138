"""Time from start to U-Boot's banner and to its prompt: mmiosplit over gRPC, the same device models in
the vcpu process (the local transport), and Debian's QEMU, in one run, as ratios.

    python3 bench/uboot_boot.py [--arch aarch64|arm] [--runs 3] [--cpu 0] [--json out.json]

The autoboot countdown is stopped by a key as soon as it is printed, so "prompt" is the time to a
usable prompt. Rows: ``grpc`` is ``mmiosplit run --machine virt`` as a user types it (it starts both
services); ``grpc-warm`` uses services that are already running (the client still starts); ``local``
runs the vCPU and the same device models in this process; ``qemu`` is Debian's qemu-system. Every
process is pinned to one CPU (cross-CPU wakeups dominate on these VMs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.firmware.console import run_uboot_script  # noqa: E402

UBOOT = {"aarch64": "/usr/lib/u-boot/qemu_arm64/u-boot.bin", "arm": "/usr/lib/u-boot/qemu_arm/u-boot.bin"}
BANNER = b"U-Boot 2023.01"


def local_transport(arch: str, flash1: str) -> dict[str, float]:
    """The vcpu loop and the device models in this process: no gRPC, no second process."""
    from device_service.config import build_bus, parse_device_specs
    from device_service.local import LocalEndpoint
    from vcpu_service.machines.virt import device_specs
    from vcpu_service.vm import Vm, VmSpec

    t0 = time.monotonic()
    bus = build_bus(parse_device_specs(device_specs(arch, UBOOT[arch], flash1)))
    vm = Vm(VmSpec(arch, ram=[(0x4000_0000, 128 << 20)], entry_point=0, machine="virt"), [LocalEndpoint(bus)],
            ram_cap=1 << 33)
    uart = bus.device("uart0")
    marks: dict[str, float] = {}
    vm.start()
    try:
        deadline = t0 + 300
        while time.monotonic() < deadline:
            log = bytes(uart.tx_log)  # type: ignore[attr-defined]
            if "banner" not in marks and BANNER in log:
                marks["banner"] = time.monotonic() - t0
            if "autoboot" not in marks and b"Hit any key" in log:
                marks["autoboot"] = time.monotonic() - t0
                uart.receive(b" ")  # type: ignore[attr-defined]
            if "autoboot" in marks and log.rstrip().endswith(b"=>"):
                marks["prompt"] = time.monotonic() - t0
                break
            time.sleep(0.005)
    finally:
        vm.delete()
    return marks


def console(command: list[str]) -> dict[str, float]:
    t = run_uboot_script(command, [])
    return {"banner": t.marks["banner"], "autoboot": t.marks["autoboot"], "prompt": t.marks["prompt"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=["aarch64", "arm"], default="aarch64")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--cpu", type=int, default=0)
    p.add_argument("--json")
    args = p.parse_args()
    os.sched_setaffinity(0, {args.cpu})  # children inherit it
    work = Path(tempfile.mkdtemp(prefix="uboot-bench-"))
    flash1 = work / "flash1.img"
    with open(flash1, "wb") as f:
        f.truncate(64 << 20)
    qemu = (["qemu-system-aarch64", "-M", "virt", "-cpu", "cortex-a57"] if args.arch == "aarch64"
            else ["qemu-system-arm", "-M", "virt,highmem=off", "-cpu", "cortex-a15"])
    qemu += ["-m", "128M", "-nic", "none", "-nographic", "-bios", UBOOT[args.arch],
             "-drive", f"if=pflash,format=raw,unit=1,file={flash1}"]
    grpc = [sys.executable, "-m", "mmiosplit_cli", "run", "--machine", "virt", "--arch", args.arch, UBOOT[args.arch],
            "--flash1", str(flash1), "-q"]
    from mmiosplit_cli.launcher import local_services
    from vcpu_service.machines.virt import device_specs

    results: dict[str, list[dict[str, float]]] = {"grpc": [], "grpc-warm": [], "local": [], "qemu": []}
    warm_flash = work / "warm-flash1.img"
    with open(warm_flash, "wb") as f:
        f.truncate(64 << 20)
    device_args = [a for d in device_specs(args.arch, UBOOT[args.arch], str(warm_flash)) for a in ("--device", d)]
    with local_services(device_args, cpu=args.cpu) as (vaddr, daddr, _):
        assert vaddr and daddr
        warm = [sys.executable, "-m", "mmiosplit_cli", "run", "--machine", "virt", "--arch", args.arch,
                UBOOT[args.arch], "--vcpu-service", vaddr, "--device-service", daddr, "-q"]
        for _ in range(args.runs):
            results["grpc"].append(console(grpc))
            results["grpc-warm"].append(console(warm))
            results["local"].append(local_transport(args.arch, str(flash1)))
            results["qemu"].append(console(qemu))
    med = {k: {m: statistics.median(r[m] for r in runs) for m in ("banner", "autoboot", "prompt")}
           for k, runs in results.items()}
    print(f"U-Boot {args.arch}, time from start (median of {args.runs}), every process pinned to CPU {args.cpu}")
    print(f"{'':<11}{'banner s':>10}{'autoboot s':>12}{'prompt s':>10}"
          f"{'prompt / local':>16}{'prompt / qemu':>15}")
    for k, m in med.items():
        print(f"{k:<11}{m['banner']:>10.2f}{m['autoboot']:>12.2f}{m['prompt']:>10.2f}"
              f"{m['prompt'] / med['local']['prompt']:>16.2f}{m['prompt'] / med['qemu']['prompt']:>15.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "runs": results, "median": med}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
