"""The chaos campaign: a guest's device accesses through a proxy that breaks, stalls and corrupts the connection,
and a device service killed and restarted under it; the verdict counts accesses lost, duplicated and wrong.

The guest writes a countdown to the PL011's data register, one exit per byte (``mix 1w`` of the load tester's
guest). The device service appends every byte the UART sends to a log that outlives it, so the log is exactly
what the device applied, in order, across restarts. After each run the guest's loop counter says how many
writes it completed; the log must be those bytes, once each, in order. A run that ended in a defined error (a
restarted service under ``--on-device-restart fail``, a service that did not come back within the deadline) may
also show the one write in flight, since whether the device performed it is unknown: that is the defined
outcome, counted apart, never as a loss or a duplicate.

    python -m tests.chaos [--faults 1000] [--seed S] [--writes 1500] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from mmiosplit.v1 import vcpu_pb2, vcpu_pb2_grpc
from mmiosplit_cli.launcher import free_tcp_port, local_services
from mmiosplit_cli.loadtest.guest import build_program, parse_mix
from mmiosplit_cli.loadtest.vms import vm_config
from mmiosplit_cli.runner import channel
from tests.chaos.proxy import ChaosProxy

ROOT = Path(__file__).resolve().parents[2]
UART = 0x0900_0000
DEADLINE_MS = 1000
#: Fault kinds and their weights. A restart ends the run it hits (the default policy), so it is rarer.
FAULTS = {"reset": 30, "stall": 25, "duplicate": 15, "garbage": 15, "restart": 5}


@dataclass
class RunResult:
    writes: int
    completed: int
    applied: int
    faults: dict[str, int]
    ended: str
    reason: str = ""
    in_flight_performed: bool = False
    lost: int = 0
    duplicated: int = 0
    wrong: int = 0


@dataclass
class Verdict:
    runs: list[RunResult] = field(default_factory=list)

    @property
    def faults(self) -> int:
        return sum(sum(r.faults.values()) for r in self.runs)

    def totals(self) -> dict[str, int]:
        return {k: sum(getattr(r, k) for r in self.runs) for k in ("lost", "duplicated", "wrong", "completed",
                                                                   "applied")}

    @property
    def clean(self) -> bool:
        t = self.totals()
        return t["lost"] == 0 and t["duplicated"] == 0 and t["wrong"] == 0


def countdown(n: int) -> bytes:
    return bytes(i & 0xFF for i in range(n, 0, -1))


def compare(expected: bytes, applied: bytes) -> tuple[int, int, int]:
    """(lost, duplicated, wrong) bytes between what the guest completed and what the device applied."""
    lost = duplicated = wrong = 0
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, expected, applied, autojunk=False).get_opcodes():
        if op == "delete":
            lost += i2 - i1
        elif op == "insert":
            duplicated += j2 - j1
        elif op == "replace":
            wrong += max(i2 - i1, j2 - j1)
    return lost, duplicated, wrong


class DeviceProcess:
    """``serve-devices`` with one PL011 on a fixed port, its output appended to ``log``; can be killed and
    started again on the same port (a restart)."""

    def __init__(self, port: int, log: Path) -> None:
        self.port = port
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mmiosplit_cli", "serve-devices", "--listen", f"127.0.0.1:{self.port}",
             "--device", "pl011@0x09000000,name=uart0", "--console-log", str(self.log)],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with grpc.insecure_channel(f"127.0.0.1:{self.port}") as ch:
                try:
                    grpc.channel_ready_future(ch).result(timeout=0.2)
                    return
                except grpc.FutureTimeoutError:
                    if self.proc.poll() is not None:
                        break
        self.kill()  # never left behind
        raise RuntimeError(f"the device service on port {self.port} did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def restart(self) -> None:
        self.kill()
        self.start()


def run_countdown(stub: vcpu_pb2_grpc.VcpuServiceStub, device: str, writes: int, *, deadline_ms: int = DEADLINE_MS,
                  restart: str = "fail", during: Callable[[], object] | None = None) -> tuple[
                      vcpu_pb2.VmEvent, list[vcpu_pb2.VmEvent], int]:
    """Run the countdown guest against the UART of ``device``, calling ``during()`` once it has started; returns
    its final event, every event, and the writes it had left (its loop counter, x21: the one in flight if any)."""
    program = build_program("aarch64", parse_mix("1w"), 4, [UART], 0, writes)
    cfg = vm_config(program, 1, [device], name="countdown")
    cfg.exit_deadline_ms = deadline_ms
    if restart == "continue":
        cfg.policies.device_restart = vcpu_pb2.DEVICE_RESTART_POLICY_CONTINUE
    vm_id = stub.CreateVm(vcpu_pb2.CreateVmRequest(config=cfg), timeout=60).vm_id
    try:
        stub.WriteMemory(vcpu_pb2.WriteMemoryRequest(vm_id=vm_id, address=program.go_address, data=b"\1\0\0\0"))
        events: list[vcpu_pb2.VmEvent] = []
        stream = stub.StreamVmEvents(vcpu_pb2.StreamVmEventsRequest(vm_id=vm_id))
        stub.StartVm(vcpu_pb2.StartVmRequest(vm_id=vm_id))
        if during is not None:
            during()
        for resp in stream:
            events.append(resp.event)
            if resp.event.kind in (vcpu_pb2.VM_EVENT_KIND_POWERED_OFF, vcpu_pb2.VM_EVENT_KIND_ERROR,
                                   vcpu_pb2.VM_EVENT_KIND_STOPPED):
                break
        regs = stub.GetRegisters(vcpu_pb2.GetRegistersRequest(vm_id=vm_id, vcpu_id=0, names=["x21"]))
        left = next(r.value for r in regs.registers if r.name == "x21")
    finally:
        stub.DeleteVm(vcpu_pb2.DeleteVmRequest(vm_id=vm_id))
    return events[-1], events, left


def one_run(stub: vcpu_pb2_grpc.VcpuServiceStub, rng: random.Random, writes: int, budget: int,
            workdir: Path) -> RunResult:
    """One guest run under at most ``budget`` faults."""
    port, log = free_tcp_port(), workdir / f"uart-{time.monotonic_ns()}.log"
    device = DeviceProcess(port, log)
    faults: Counter[str] = Counter()
    stop = threading.Event()
    try:
        with ChaosProxy(f"127.0.0.1:{port}") as proxy:
            def inject() -> None:
                kinds, weights = zip(*FAULTS.items(), strict=True)
                while sum(faults.values()) < budget and not stop.wait(rng.uniform(0.02, 0.1)):
                    kind = rng.choices(kinds, weights)[0]
                    if kind == "reset":
                        proxy.cut()
                    elif kind == "stall":
                        proxy.stall(rng.uniform(0.001, 0.3))
                    elif kind == "duplicate":
                        proxy.duplicate()
                    elif kind == "garbage":
                        proxy.garbage(rng.randbytes(rng.randint(1, 64)))
                    else:
                        device.restart()
                    faults[kind] += 1

            injector = threading.Thread(target=inject, daemon=True)
            final, _, left = run_countdown(stub, proxy.address, writes, during=injector.start)
            stop.set()
            injector.join()
    finally:
        stop.set()
        device.kill()
    powered_off = final.kind == vcpu_pb2.VM_EVENT_KIND_POWERED_OFF
    completed = writes if powered_off else writes - left
    applied = log.read_bytes() if log.exists() else b""
    expected = countdown(writes)
    result = RunResult(writes, completed, len(applied), dict(faults),
                       "powered off" if powered_off else "error", "" if powered_off else final.reason)
    if not powered_off and applied == expected[:completed + 1] and len(applied) == completed + 1:
        result.in_flight_performed = True
    else:
        result.lost, result.duplicated, result.wrong = compare(expected[:completed], applied)
    return result


def run_campaign(faults: int, seed: int, writes: int = 1500, per_run: int = 25,
                 progress: bool = False) -> Verdict:
    """Runs until ``faults`` faults were injected; one vcpu service, a new device service per run."""
    rng = random.Random(seed)
    verdict = Verdict()
    with tempfile.TemporaryDirectory(prefix="mmiosplit-chaos-") as tmp, \
            local_services(None, transport="tcp") as (vaddr, _, _handle):
        assert vaddr
        with channel(vaddr) as ch:
            stub = vcpu_pb2_grpc.VcpuServiceStub(ch)
            while verdict.faults < faults:
                run = one_run(stub, rng, writes, min(per_run, faults - verdict.faults), Path(tmp))
                if not sum(run.faults.values()):
                    run.faults["none"] = 0
                verdict.runs.append(run)
                if progress:
                    print(f"run {len(verdict.runs)}: {run.ended}, {run.completed}/{run.writes} writes, faults "
                          f"{dict(run.faults)}, lost {run.lost} duplicated {run.duplicated} wrong {run.wrong}"
                          + (f" ({run.reason[:150]})" if run.reason else ""), flush=True)
    return verdict


def report(verdict: Verdict) -> str:
    t = verdict.totals()
    kinds: Counter[str] = Counter()
    for r in verdict.runs:
        kinds.update(r.faults)
    failed = [r for r in verdict.runs if r.ended != "powered off"]
    lines = [f"{verdict.faults} faults ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()) if v)}) over "
             f"{len(verdict.runs)} runs: {t['completed']} writes completed, {t['applied']} applied by the device",
             f"lost {t['lost']}, duplicated {t['duplicated']}, wrong {t['wrong']}; "
             f"{len(failed)} runs ended in a defined error "
             f"({sum(r.in_flight_performed for r in failed)} with the write in flight performed)"]
    reasons: Counter[str] = Counter()
    for r in failed:
        reasons[_reason_class(r.reason)] += 1
    lines += [f"  {n} x {reason}" for reason, n in reasons.most_common()]
    lines.append("verdict: " + ("PASS" if verdict.clean else "FAIL"))
    return "\n".join(lines)


def _reason_class(reason: str) -> str:
    for needle in ("restarted", "could not be resumed", "no longer knows", "no completion", "refused"):
        if needle in reason:
            return needle
    return reason[:120]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faults", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--writes", type=int, default=1500, help="writes per run (default 1500)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    print(f"chaos campaign: {args.faults} faults, seed {seed}", flush=True)
    t0 = time.monotonic()
    verdict = run_campaign(args.faults, seed, args.writes, progress=True)
    print(report(verdict))
    print(f"{time.monotonic() - t0:.0f} s")
    if args.json:
        with contextlib.suppress(OSError):
            Path(args.json).write_text(json.dumps({"seed": seed, "runs": [asdict(r) for r in verdict.runs],
                                                   "totals": verdict.totals()}, indent=2) + "\n")
    return 0 if verdict.clean else 1
