"""What an idle guest costs the device service, with and without shadow registers, and how long a typed
key takes to reach the guest and to come back.

    python3 bench/idle_shadow.py [--arch aarch64|arm] [--seconds 10] [--keys 20] [--cpu 0] [--json out.json]

U-Boot idling at its ``=>`` prompt polls the PL011's flag register (FR) without pause. With shadow
registers the vcpu service answers those reads from its copy, so the device service should sleep; with
``serve-devices --no-shadows`` every poll is an exit. For each mode this starts both services (pinned, as
every process here, to one CPU), boots Debian's U-Boot with ``mmiosplit run --machine virt`` against them
in a pseudo-terminal, stops the countdown, then:

* measures, over ``--seconds``, the CPU time (utime + stime from /proc/PID/stat) of the device service,
  the vcpu service and the ``mmiosplit run`` client, as a share of one CPU;
* types ``--keys`` characters one at a time, and times each from the write to the terminal until
  - the guest has it: the guest saw FR change and its read of DR reaches the device service (the device
    service notes the time of each DR access; it runs as ``serve-devices`` with only that hook added);
  - its echo is read back from the terminal (the whole path: client, Console stream, device service, the
    copy of FR or an exit, the guest, its DR write, the Console stream back).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pexpect

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mmiosplit_cli.launcher import ServiceProcess, local_services  # noqa: E402
from tests.firmware.console import AUTOBOOT, BANNER, CTRL_A_X, PROMPT  # noqa: E402
from vcpu_service.machines.virt import device_specs  # noqa: E402

UBOOT = {"aarch64": "/usr/lib/u-boot/qemu_arm64/u-boot.bin", "arm": "/usr/lib/u-boot/qemu_arm/u-boot.bin"}
UART_DR = 0x0900_0000  # the virt board's PL011: DR at offset 0
KEYS = "abcdefghijklmnopqrstuvwxyz"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # fields 14 and 15 of proc(5), counted from 1


def serve_devices_noting_dr_reads(log_path: str, argv: list[str]) -> int:
    """``mmiosplit serve-devices`` that appends the monotonic time of every read of the UART's DR to a file."""
    import device_service.host as host
    from mmiosplit_cli.cli import main as cli_main

    log = open(log_path, "w", buffering=1)  # noqa: SIM115 - lives as long as the service
    dispatch = host.dispatch

    def noting(bus: object, address: int, length: int, is_write: bool, data: bytes) -> object:
        if address == UART_DR and not is_write:
            log.write(f"{time.monotonic():.6f}\n")
        return dispatch(bus, address, length, is_write, data)  # type: ignore[arg-type]

    host.dispatch = noting  # type: ignore[assignment]
    return cli_main(["serve-devices", *argv])


def dr_reads(log_path: Path) -> list[float]:
    return [float(line) for line in log_path.read_text().split()]


@dataclass
class Mode:
    shadows: bool
    prompt_s: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)  # share of one CPU while idle, by process
    reach_ms: list[float] = field(default_factory=list)  # key written -> the guest reads DR
    echo_ms: list[float] = field(default_factory=list)  # key written -> its echo read back
    exits: int = 0  # over the whole run, from the client's summary line

    @property
    def name(self) -> str:
        return "shadows" if self.shadows else "no shadows"


def measure(arch: str, shadows: bool, seconds: float, keys: int, cpu: int, work: Path) -> Mode:
    mode = Mode(shadows)
    flash1 = work / f"flash1-{int(shadows)}.img"
    with open(flash1, "wb") as f:
        f.truncate(64 << 20)
    device_args = [a for d in device_specs(arch, UBOOT[arch], str(flash1)) for a in ("--device", d)]
    if not shadows:
        device_args.append("--no-shadows")
    dr_log = work / f"dr-reads-{int(shadows)}.txt"
    daddr = f"unix:{work / f'devices-{int(shadows)}.sock'}"
    log_path = work / f"devices-{int(shadows)}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, __file__, "--dr-log", str(dr_log), *device_args, "--listen", daddr,
                                    "--cpu-affinity", str(cpu)], stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT)
    dev = ServiceProcess("device service", daddr, process, log_path)
    try:
        dev.wait_ready()
        with local_services(None, cpu=cpu) as (vaddr, _, services):
            assert vaddr
            pids = {"device service": dev.process.pid, "vcpu service": services.processes[0].process.pid}
            command = [sys.executable, "-m", "mmiosplit_cli", "run", "--machine", "virt", "--arch", arch, UBOOT[arch],
                       "--vcpu-service", vaddr, "--device-service", daddr]
            t0 = time.monotonic()
            child = pexpect.spawn(command[0], command[1:], timeout=300, encoding="utf-8", codec_errors="replace",
                                  dimensions=(50, 200))
            child.delaybeforesend = None  # pexpect sleeps 50 ms before every send by default
            try:
                child.expect_exact(BANNER)
                child.expect_exact(AUTOBOOT)
                child.send(" ")
                child.expect_exact(PROMPT)
                mode.prompt_s = time.monotonic() - t0
                pids["mmiosplit run"] = child.pid
                time.sleep(1.0)  # let the boot's last output drain
                before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                start = time.monotonic()
                time.sleep(seconds)
                elapsed = time.monotonic() - start
                mode.cpu = {name: (cpu_seconds(pid) - before[name]) / elapsed for name, pid in pids.items()}
                typed: list[float] = []
                for key in (KEYS * (keys // len(KEYS) + 1))[:keys]:
                    sent = time.monotonic()
                    child.send(key)
                    child.expect_exact(key)
                    mode.echo_ms.append((time.monotonic() - sent) * 1000)
                    typed.append(sent)
                    time.sleep(0.05)
                reads = dr_reads(dr_log)
                for sent in typed:
                    mode.reach_ms.append((min(r for r in reads if r >= sent) - sent) * 1000)
                child.send("\x03")  # Ctrl-C: U-Boot drops the line and prompts again
                child.expect_exact(PROMPT)
                child.send(CTRL_A_X)
                child.expect(pexpect.EOF, timeout=60)
                found = re.findall(r"; (\d+) exits", child.before or "")
                mode.exits = int(found[-1]) if found else 0
            finally:
                child.close(force=True)
    finally:
        dev.stop()
    return mode


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--dr-log":  # the device service, started by measure()
        return serve_devices_noting_dr_reads(sys.argv[2], sys.argv[3:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=["aarch64", "arm"], default="aarch64")
    p.add_argument("--seconds", type=float, default=10.0, help="how long to measure the idle prompt")
    p.add_argument("--keys", type=int, default=20, help="how many keys to time")
    p.add_argument("--cpu", type=int, default=0, help="the CPU every process is pinned to")
    p.add_argument("--json")
    args = p.parse_args()
    os.sched_setaffinity(0, {args.cpu})  # the client (and pexpect's child) inherit it; the services get --cpu-affinity
    work = Path(tempfile.mkdtemp(prefix="idle-shadow-"))
    load = os.getloadavg()[0]  # other work on the machine shares the CPU and shows in the latencies
    try:
        modes = [measure(args.arch, shadows, args.seconds, args.keys, args.cpu, work) for shadows in (True, False)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"U-Boot {args.arch} idle at its prompt for {args.seconds:g} s; every process pinned to CPU {args.cpu} "
          f"(load average before the run: {load:.1f})")
    print(f"{'':<12}{'device svc':>11}{'vcpu svc':>10}{'client':>8}{'to guest p50/max ms':>21}"
          f"{'echo p50/max ms':>17}{'exits':>7}{'prompt s':>10}")
    for m in modes:
        print(f"{m.name:<12}{m.cpu['device service']:>11.1%}{m.cpu['vcpu service']:>10.1%}"
              f"{m.cpu['mmiosplit run']:>8.1%}"
              f"{statistics.median(m.reach_ms):>14.2f} /{max(m.reach_ms):>5.1f}"
              f"{statistics.median(m.echo_ms):>10.2f} /{max(m.echo_ms):>5.1f}{m.exits:>7}{m.prompt_s:>10.2f}")
    print("CPU: share of one CPU over the idle window (utime+stime); to guest: key written -> the guest's read of "
          "DR reaches the device service; echo: key written -> echo read back; exits: whole run, boot included")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "modes": [asdict(m) for m in modes]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
