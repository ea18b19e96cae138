"""``mmiosplit loadtest`` across containers beside the same run on the host, with the latencies side by side.

Across containers: the load tester in a client container, the vcpu service and the device service (the stack's
`scratch`, one scratch device) in containers of their own, over the stack's bridge network. Same host: the same
two services started here as processes over TCP loopback, unpinned like the containers, and the same command.
Both figures, and the CPU they ran on, go to latency.json in the test's tmp dir and to the terminal. No timing
is asserted (speed is for benchmarks): only that both runs measured what they were asked to.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from mmiosplit_cli.launcher import check_health
from tests.docker.stack import ROOT, Stack, free_port

pytestmark = pytest.mark.docker

EXITS = 3000
# The stack's scratch service (deploy/devices/scratch.toml), for the same-host run.
SCRATCH_CONFIG = ROOT / "deploy" / "devices" / "scratch.toml"
LOADTEST = ["loadtest", "--exits", str(EXITS), "--no-floors", "--no-progress"]


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def _check(doc: dict[str, Any], where: str) -> dict[str, float]:
    """The run measured EXITS exits with ordered, finite percentiles; returns its p50/p99 and rate."""
    lat = doc["latency_us"]
    assert doc["exits"] >= EXITS, f"{where}: {doc['exits']} exits"
    assert all(math.isfinite(lat[k]) for k in ("p50", "p90", "p99", "max")), f"{where}: {lat}"
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"], f"{where}: {lat}"
    assert doc["exits_per_s"] > 0, where
    return {"p50_us": lat["p50"], "p99_us": lat["p99"], "exits": doc["exits"], "exits_per_s": doc["exits_per_s"]}


def _containers(stack: Stack, out: Path) -> dict[str, Any]:
    out.mkdir()
    out.chmod(0o777)  # the client runs as UID 10001
    result = stack.run_client(*LOADTEST, "--vcpu-service", stack.addresses["vcpu"], "--device-service",
                              stack.addresses["scratch"], "--json", "/out/loadtest.json",
                              volumes={str(out): {"bind": "/out", "mode": "rw"}}, timeout=300)
    assert result.exit_code == 0, result.stdout + result.stderr
    return dict(json.loads((out / "loadtest.json").read_text()))


def _same_host(tmp: Path) -> dict[str, Any]:
    vaddr, daddr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMIOSPLIT_")}
    with open(tmp / "vcpu.log", "wb") as vlog, open(tmp / "devices.log", "wb") as dlog:
        procs = [
            subprocess.Popen([sys.executable, "-m", "mmiosplit_cli", "serve-vcpu", "--listen", vaddr], cwd=ROOT,
                             env=env, stdout=subprocess.DEVNULL, stderr=vlog),
            subprocess.Popen([sys.executable, "-m", "mmiosplit_cli", "serve-devices", "--listen", daddr, "--name",
                              "scratch", "--config", str(SCRATCH_CONFIG)], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=dlog),
        ]
        try:
            deadline = time.monotonic() + 60
            while any(check_health(a, timeout=1) != "SERVING" for a in (vaddr, daddr)):
                assert time.monotonic() < deadline, "the host's services did not become healthy in 60 s"
                assert all(p.poll() is None for p in procs), "a host service exited at start"
                time.sleep(0.2)
            proc = subprocess.run([sys.executable, "-m", "mmiosplit_cli", *LOADTEST, "--vcpu-service", vaddr,
                                   "--device-service", daddr, "--json", str(tmp / "loadtest.json")],
                                  cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stdout + proc.stderr
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    return dict(json.loads((tmp / "loadtest.json").read_text()))


@pytest.mark.timeout(600)
def test_loadtest_across_containers_beside_the_same_host(compose_stack: Stack, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    across = _check(_containers(compose_stack, tmp_path / "containers"), "across containers")
    (tmp_path / "host").mkdir()
    host = _check(_same_host(tmp_path / "host"), "same host")
    report = {
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "exits": EXITS,
        "command": "mmiosplit " + " ".join(LOADTEST),
        "across_containers": across,
        "same_host_tcp": host,
        "ratio_p50": across["p50_us"] / host["p50_us"],
        "ratio_p99": across["p99_us"] / host["p99_us"],
    }
    (tmp_path / "latency.json").write_text(json.dumps(report, indent=2) + "\n")
    with capsys.disabled():
        print(f"\nloadtest, {EXITS} exits, {report['cpu_model']} x{report['cpus']}:"
              f"\n  across containers   p50 {across['p50_us']:7.1f} us  p99 {across['p99_us']:7.1f} us"
              f"  {across['exits_per_s']:7.0f} exits/s"
              f"\n  same host (TCP)     p50 {host['p50_us']:7.1f} us  p99 {host['p99_us']:7.1f} us"
              f"  {host['exits_per_s']:7.0f} exits/s"
              f"\n  containers / host   p50 {report['ratio_p50']:.2f}x  p99 {report['ratio_p99']:.2f}x"
              f"\n  written to {tmp_path / 'latency.json'}")
