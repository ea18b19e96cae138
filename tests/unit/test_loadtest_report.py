"""The load tester's outputs from a hand-made result: JSON and CSV fields, the .hgrm file, the table, compare."""

from __future__ import annotations

import csv
import io
import json

import pytest
from hdrh.histogram import HdrHistogram
from rich.console import Console

from mmiosplit_cli.loadtest import compare, report, stats
from mmiosplit_cli.loadtest.runner import (
    Floor,
    LoadConfig,
    LoadResult,
    Measurement,
    ProcessUse,
    ScalePoint,
    VcpuResult,
    VmResult,
)


def hist_us(values: list[float]) -> HdrHistogram:
    return stats.histogram_of(int(v * 1000) for v in values)


def vm(label: str, values: list[float], exits: int, seconds: float, vcpus: int = 1) -> VmResult:
    h = hist_us(values)
    per = stats.Window(exits // vcpus, 0, exits // vcpus, 0, seconds)
    whole = stats.Window(exits, 0, exits, 0, seconds)
    return VmResult(label, h, whole, [VcpuResult(i, h, per, per) for i in range(vcpus)],
                    warmup_exits=300, iterations=float(exits), counts=whole)


def result(processes: int = 1, scale: bool = False) -> LoadResult:
    cfg = LoadConfig(exits=1000, mix="4w1r", posted=True, processes=processes, scale=scale)
    run = Measurement([vm(f"process {i}" if processes > 1 else "run", [500.0] * 990 + [900.0] * 10, 1000, 0.5)
                       for i in range(processes)], 0.5,
                      [ProcessUse("vcpu service", 11, 0, 62.5), ProcessUse("device service", 12, 0, 30.0)])
    floors = {"socket": Floor("socket", hist_us([20.0] * 100)),
              "grpc": Floor("grpc", hist_us([400.0] * 99 + [600.0])),
              "local": Floor("local", hist_us([40.0] * 100), exits_per_s=20_000.0)}
    points = []
    if scale:
        one = Measurement([vm("process 0", [450.0] * 100, 1000, 0.4)], 0.4)
        points = [ScalePoint(1, one), ScalePoint(processes, run)]
    return LoadResult(cfg, {"cpu_model": "test cpu", "python": "3.11"}, run, floors, points,
                      [{"process": 0, "vcpu_cpu": 0, "device_cpu": 0}], ["a note"])


def test_json_has_the_promised_fields_with_the_right_arithmetic() -> None:
    doc = report.to_json(result())
    json.dumps(doc)  # JSON-able
    assert doc["exits"] == 1000
    assert doc["exits_per_s"] == 2000.0
    lat = doc["latency_us"]
    assert set(lat) == {"p50", "p90", "p99", "p999", "max", "mean"}
    assert lat["p50"] == pytest.approx(500, rel=1e-3)
    assert lat["p99"] == pytest.approx(500, rel=1e-3)
    assert lat["p999"] == pytest.approx(900, rel=1e-3)
    assert doc["floor_grpc_us"]["p50"] == pytest.approx(400, rel=1e-3)
    assert doc["floor_grpc_us"]["p99"] == pytest.approx(400, rel=1e-3)
    assert doc["ratio"] == {"p50": pytest.approx(1.25, rel=2e-3), "p99": pytest.approx(1.25, rel=2e-3)}
    assert doc["ratio_to_local"]["p50"] == pytest.approx(12.5, rel=2e-3)
    assert doc["floors"]["local"]["exits_per_s"] == 20_000.0
    assert doc["floors"]["socket"]["ratio_to_grpc"]["p50"] == pytest.approx(0.05, rel=2e-3)
    assert doc["config"]["mix"] == "4w1r" and doc["config"]["posted"] is True and doc["config"]["mode"] == "exits"
    assert doc["machine"]["cpu_model"] == "test cpu"
    assert doc["cpu"][0] == {"name": "vcpu service", "pid": 11, "cpu": 0, "percent": 62.5}
    assert doc["vcpus"][0]["exits"] == 1000 and doc["vcpus"][0]["exits_per_s"] == 2000.0
    assert doc["warmup_exits_discarded"] == 300
    assert doc["iteration_us"] == pytest.approx(500.0)
    assert doc["notes"] == ["a note"]
    assert doc["scale"] == []


def test_no_floor_means_no_ratio() -> None:
    r = result()
    r.floors = {}
    doc = report.to_json(r)
    assert doc["floor_grpc_us"] is None and doc["ratio"] is None and doc["ratio_to_local"] is None


def test_scale_points_carry_efficiency_against_one_process() -> None:
    doc = report.to_json(result(processes=2, scale=True))
    assert [p["processes"] for p in doc["scale"]] == [1, 2]
    one, two = doc["scale"]
    assert one["aggregate_exits_per_s"] == 2500.0 and one["efficiency"] == 1.0
    # Two processes at 2000/s each against 2 x 2500: 0.8.
    assert two["aggregate_exits_per_s"] == 4000.0
    assert two["efficiency"] == pytest.approx(0.8)
    assert two["per_process_exits_per_s"] == [2000.0, 2000.0]
    assert doc["exits_per_s"] == 4000.0
    assert [p["label"] for p in doc["processes"]] == ["process 0", "process 1"]


def test_csv_rows_and_fields() -> None:
    rows = list(csv.DictReader(io.StringIO(report.csv_text(result()))))
    assert list(rows[0]) == report.CSV_FIELDS
    assert [(r["name"], r["kind"]) for r in rows] == [("run", "run"), ("socket", "floor"), ("grpc", "floor"),
                                                      ("local", "floor")]
    run = rows[0]
    assert run["count"] == "1000" and float(run["exits_per_s"]) == 2000.0
    assert float(run["p50_us"]) == pytest.approx(500, rel=1e-3)
    assert float(run["ratio_p50"]) == pytest.approx(1.25, rel=2e-3)
    assert rows[1]["exits_per_s"] == ""  # a ping-pong floor has no exit rate
    assert float(rows[3]["exits_per_s"]) == 20_000.0


def test_hgrm_is_hdrhistograms_percentile_distribution_in_microseconds() -> None:
    h = hist_us([float(v) for v in range(1, 101)])
    text = report.hgrm_text(h)
    lines = text.splitlines()
    assert lines[0] == "       Value     Percentile TotalCount 1/(1-Percentile)"
    assert lines[1] == ""
    assert lines[2].split() == ["1.000", "0.000000000000", "1", "1.00"]
    last = [line for line in lines if line and not line.startswith("#")][-1].split()
    assert float(last[0]) == pytest.approx(100, rel=1e-3) and last[1:] == ["1.000000000000", "100"]
    # The value lines are exactly what hdrh's own writer prints.
    ours = [line for line in lines[2:] if line and not line.startswith("#")]
    theirs = io.BytesIO()
    h.output_percentile_distribution(theirs, 1000)
    assert ours == [line for line in theirs.getvalue().decode().splitlines()[2:] if line and not line.startswith("#")]
    mean, stddev = (float(x.split("=")[1]) for x in lines[-3].strip("#[]").split(","))
    assert mean == pytest.approx(50.5, rel=1e-3)
    assert stddev == pytest.approx(28.87, rel=1e-2)  # in microseconds, like the values
    assert lines[-2].endswith("Total count    =          100]")
    assert lines[-1].startswith("#[Buckets =")


def test_the_table_shows_every_measurement_beside_the_floor() -> None:
    console = Console(file=io.StringIO(), width=200)
    report.render(result(processes=2, scale=True), console)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    for text in ("run (vcpu service over gRPC)", "process 0", "floor: bare gRPC ping-pong", "floor: raw socket",
                 "floor: local transport", "x gRPC p50", "1.25", "vcpu service", "62.5", "scale-out", "0.80",
                 "note: a note", "600 warm-up exits discarded"):
        assert text in out, text


def doc(exits_per_s: float, p50: float, mix: str = "1r") -> dict[str, object]:
    return {"exits": 1000, "exits_per_s": exits_per_s, "latency_us": {"p50": p50, "p99": 2 * p50},
            "floor_grpc_us": {"p50": 400.0, "p99": 800.0}, "ratio": {"p50": p50 / 400, "p99": p50 / 400},
            "cpu": [{"name": "vcpu service", "percent": 50.0}], "config": {"mix": mix, "arch": "aarch64"}}


def test_compare_rows_and_change() -> None:
    rows = {label: (a, b, ch) for label, a, b, ch in compare.compare_rows(doc(1000, 500), doc(1500, 450, "4w1r"))}
    assert rows["exits/s"] == (1000, 1500, 1.5)
    assert rows["p50 us"] == (500, 450, 0.9)
    assert rows["p99 / gRPC floor"][2] == pytest.approx(0.9)
    assert rows["CPU % vcpu service"] == (50.0, 50.0, 1.0)
    assert "posted writes/s" not in rows  # neither run has it
    assert compare.change(0, 5) is None and compare.change(None, 5) is None
    text = compare.compare_text(doc(1000, 500), doc(1500, 450, "4w1r"), "a.json", "b.json")
    assert text.splitlines()[0].split() == ["metric", "a.json", "b.json", "B/A"]
    assert any(line.split()[:1] == ["exits/s"] and line.split()[-1] == "1.500" for line in text.splitlines())
    assert "config mix: '1r' -> '4w1r'" in text


def test_compare_refuses_a_file_that_is_not_a_load_test(tmp_path: object) -> None:
    from pathlib import Path

    p = Path(str(tmp_path)) / "x.json"
    p.write_text('{"hello": 1}')
    with pytest.raises(compare.CompareError, match=r"x\.json: not the JSON of mmiosplit loadtest"):
        compare.load(str(p))
    p.write_text("{")
    with pytest.raises(compare.CompareError, match="not JSON"):
        compare.load(str(p))
    with pytest.raises(compare.CompareError, match=r"missing\.json"):
        compare.load(str(Path(str(tmp_path)) / "missing.json"))
