"""``mmiosplit loadtest`` end to end, as a user runs it: a subprocess that starts the services itself.

These check what the run reports and writes (fields, counts, files), never how fast it was.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
QUICK = ["--floor-exits", "200", "--warmup", "100", "--no-progress"]


def loadtest(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mmiosplit_cli", "loadtest", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, COLUMNS="200"))


def run_with_outputs(tmp_path: Path, *args: str, floors: bool = True) -> tuple[dict[str, Any], Path]:
    """A run with every output file; the variants skip the floors (checked by the first two) to stay short."""
    out = tmp_path
    proc = loadtest("--exits", "2000", "--json", str(out / "out.json"), "--plot", str(out / "p.png"),
                    "--csv", str(out / "c.csv"), "--hgrm", str(out / "h.hgrm"), *QUICK, *args,
                    *([] if floors else ["--no-floors"]))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return json.loads((out / "out.json").read_text()), out


def check_outputs(doc: dict[str, Any], out: Path, floors: bool = True) -> None:
    for key in ("exits", "exits_per_s", "latency_us", "floor_grpc_us", "ratio", "config", "machine", "floors",
                "cpu", "vcpus", "processes", "placement"):
        assert key in doc, key
    assert set(doc["latency_us"]) >= {"p50", "p90", "p99", "p999", "max"}
    assert doc["exits_per_s"] > 0
    lat = doc["latency_us"]
    if doc["exits"]:
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p999"] <= lat["max"]
    if floors:
        assert doc["floor_grpc_us"]["p50"] > 0 and doc["floor_grpc_us"]["p99"] > 0
        assert set(doc["floors"]) == {"grpc", "socket", "local"}
        if doc["exits"]:
            assert doc["ratio"]["p50"] > 0 and doc["ratio"]["p99"] > 0
    else:
        assert doc["floors"] == {} and doc["floor_grpc_us"] is None and doc["ratio"] is None
    for key in ("python", "grpcio", "unicorn", "cpu_model"):
        assert key in doc["machine"]
    names = [c["name"] for c in doc["cpu"]]
    assert any(n.startswith("vcpu service") for n in names) and any(n.startswith("device service") for n in names)
    assert (out / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((out / "c.csv").open()))
    assert rows[0]["name"] == "run" and int(rows[0]["count"]) == doc["exits"]
    hgrm = (out / "h.hgrm").read_text().splitlines()
    assert hgrm[0].split() == ["Value", "Percentile", "TotalCount", "1/(1-Percentile)"]
    assert hgrm[-2].startswith("#[Max") and f"Total count    = {doc['exits']:12d}" in hgrm[-2]


def test_aarch64_read_loop_against_every_floor(tmp_path: Path) -> None:
    doc, out = run_with_outputs(tmp_path)
    check_outputs(doc, out)
    assert doc["exits"] == 2000  # exactly: the warm-up is behind a barrier
    assert doc["warmup_exits_discarded"] == 100
    assert doc["config"]["arch"] == "aarch64" and doc["config"]["mix"] == "1r" and doc["config"]["mode"] == "exits"
    assert doc["vcpus"][0]["exits"] == 2000
    assert doc["floors"]["local"]["count"] == 200
    assert doc["floors"]["grpc"]["count"] == 200 and doc["floors"]["socket"]["count"] == 200


def test_arm_writes_and_reads(tmp_path: Path) -> None:
    doc, out = run_with_outputs(tmp_path, "--arch", "arm", "--mix", "1w1r", "--size", "2", "--transport", "tcp")
    check_outputs(doc, out)
    assert doc["exits"] == 2000  # 1000 iterations of a write and a read
    assert doc["config"]["arch"] == "arm" and doc["config"]["transport"] == "tcp"
    assert doc["placement"][0]["vcpu_service"].startswith("127.0.0.1:")


@pytest.mark.parametrize("arch", ["aarch64", "arm"])
def test_posted_writes_ride_on_the_read(tmp_path: Path, arch: str) -> None:
    doc, out = run_with_outputs(tmp_path, "--arch", arch, "--mix", "4w1r", "--posted", floors=False)
    check_outputs(doc, out, floors=False)
    assert doc["exits"] == 2000  # one synchronous exit (the read) per iteration
    assert doc["posted_writes"] == 8000
    assert doc["posted_writes_per_s"] > 0 and doc["iteration_us"] > 0
    assert doc["config"]["posted"] is True


def test_two_vcpus_each_run_the_loop(tmp_path: Path) -> None:
    doc, out = run_with_outputs(tmp_path, "--vcpus", "2", "--replicas", "2", floors=False)
    check_outputs(doc, out, floors=False)
    assert doc["exits"] == 4000
    assert [(v["vcpu_id"], v["exits"]) for v in doc["vcpus"]] == [(0, 2000), (1, 2000)]
    assert len(doc["placement"][0]["device_services"]) == 2
    assert sum(1 for c in doc["cpu"] if c["name"].startswith("device service")) == 2


def test_two_processes_scale_out(tmp_path: Path) -> None:
    doc, out = run_with_outputs(tmp_path, "--processes", "2", "--scale", floors=False)
    check_outputs(doc, out, floors=False)
    assert doc["exits"] == 4000
    assert [p["exits"] for p in doc["processes"]] == [2000, 2000]
    assert doc["exits_per_s"] == pytest.approx(sum(p["exits_per_s"] for p in doc["processes"]), rel=1e-3)
    cpus = sorted(os.sched_getaffinity(0))
    assert [p["vcpu_cpu"] for p in doc["placement"]] == [cpus[0], cpus[1 % len(cpus)]]
    assert [p["processes"] for p in doc["scale"]] == [1, 2]
    assert doc["scale"][0]["efficiency"] == 1.0 and doc["scale"][1]["efficiency"] > 0


def test_processes_confined_to_one_cpu_say_they_share_it(tmp_path: Path) -> None:
    """Under `taskset -c 0` every process lands on CPU 0: the report must not pass that off as scale-out."""
    cpu = min(os.sched_getaffinity(0))
    proc = subprocess.run([sys.executable, "-m", "mmiosplit_cli", "loadtest", "--processes", "2", "--exits", "300",
                           "--warmup", "50", "--no-floors", "--no-progress", "--json", str(tmp_path / "s.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "s.json").read_text())
    assert [p["vcpu_cpu"] for p in doc["placement"]] == [cpu, cpu]
    assert any("share" in n and "not scale-out" in n for n in doc["notes"]), doc["notes"]


def test_duration_mode_stops_the_vm(tmp_path: Path) -> None:
    proc = loadtest("--duration", "1", "--no-floors", "--json", str(tmp_path / "d.json"), "--warmup", "50",
                    "--no-progress")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "d.json").read_text())
    assert doc["config"]["mode"] == "duration" and doc["exits"] > 0
    assert doc["floor_grpc_us"] is None and doc["ratio"] is None
    assert 0.9 < doc["window_s"] < 10


def test_compare_two_runs(tmp_path: Path) -> None:
    a = {"exits": 10, "exits_per_s": 1000.0, "latency_us": {"p50": 500.0, "p99": 900.0}, "config": {"mix": "1r"}}
    b = {"exits": 10, "exits_per_s": 1200.0, "latency_us": {"p50": 400.0, "p99": 700.0}, "config": {"mix": "4w1r"}}
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    proc = loadtest("compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"))
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if "exits/s" in line)
    assert "1,000.0" in line and "1,200.0" in line and "1.200" in line
    assert "mix" in proc.stdout
    bad = loadtest("compare", str(tmp_path / "a.json"), str(tmp_path / "nope.json"))
    assert bad.returncode == 2 and "nope.json" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("arch", ["aarch64", "arm"])
def test_irq_reports_interrupt_latency_beside_its_local_floor(tmp_path: Path, arch: str) -> None:
    proc = loadtest("--irq", "--arch", arch, "--exits", "200", "--warmup", "20", "--floor-exits", "200",
                    "--irq-delay", "200", "--no-progress", "--json", str(tmp_path / "i.json"),
                    "--csv", str(tmp_path / "i.csv"))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "i.json").read_text())
    irq = doc["irq"]
    assert irq["interrupts"] == 200 and irq["delay_us"] == 200 and irq["from_arrival"] is False
    assert doc["exits"] == 400  # the FIRE that asks and the handler's ACK, per interrupt
    for key in ("ack_us", "eoi_us"):
        lat = irq[key]
        assert 0 < lat["p50"] <= lat["p99"] <= lat["max"]
    assert irq["eoi_us"]["p50"] >= irq["ack_us"]["p50"]  # the EOI comes after the handler's ACK exit
    assert irq["floor_local"]["ack_us"]["p50"] > 0 and set(irq["overhead_us"]) >= {"ack_p50", "eoi_p50"}
    assert doc["config"]["irq"] is True and doc["config"]["mix"] == "irq"
    assert "interrupt latency" in proc.stdout and "raised -> handler" in proc.stdout
    rows = [r["name"] for r in csv.DictReader((tmp_path / "i.csv").open())]
    assert "run irq raised->handler" in rows and "local irq raised->eoi" in rows


@pytest.mark.parametrize(("args", "named"), [
    (["--irq", "--vcpus", "2"], "--vcpus"),
    (["--irq", "--posted"], "--posted"),
    (["--irq-delay", "5"], "--irq-delay"),
    (["--irq", "--irq-delay", "2000000"], "--irq-delay"),
    (["--vcpus", "0"], "--vcpus"),
    (["--mix", "3x"], "--mix"),
    (["--size", "3"], "--size"),
    (["--arch", "arm", "--size", "8"], "--size"),
    (["--exits", "0"], "--exits"),
    (["--exits", "10", "--duration", "1"], "--duration"),
    (["--duration", "-1"], "--duration"),
    (["--scale"], "--scale"),
    (["--processes", "2", "--vcpu-cpu", "0"], "--processes"),
    (["--vcpu-cpu", "4096"], "--vcpu-cpu"),
    (["--target", "scratch-0"], "--target"),
    (["--device", "bogus@0x0a000000"], "--device"),
    (["--device", "scratch@0x0a000000,size=0x10", "--offset", "0x10"], "--offset"),
    (["--json", "/nonexistent-folder/out.json"], "--json"),
    (["--plot", "plot.txt"], "--plot"),
    (["--vcpu-service", "unix:/nonexistent-folder/vcpu.sock"], "--vcpu-service"),
    (["--device-service", "bad address"], "--device-service"),
    (["--device-service", "unix:/nonexistent-folder/dev.sock"], "--device-service"),
])
def test_bad_options_name_the_option(args: list[str], named: str) -> None:
    proc = loadtest(*args, "--no-floors", "--exits", "10", timeout=60) if "--exits" not in args and \
        "--duration" not in args else loadtest(*args, "--no-floors", timeout=60)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert named in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_guest_that_fails_is_reported_with_the_device_and_instruction() -> None:
    # The PL011 takes no 8-byte accesses: the first exit fails, the run ends with status 1 and says why.
    proc = loadtest("--device", "pl011@0x09000000", "--size", "8", "--exits", "10", "--no-floors", timeout=120)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "pl011-0" in proc.stderr and "8-byte" in proc.stderr and "instruction" in proc.stderr
    assert "Traceback" not in proc.stderr
