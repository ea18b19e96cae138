"""A load test's results as a terminal table, JSON, CSV, an HdrHistogram percentile file and a plot.

Every latency is shown beside the bare gRPC floor of the same run as a ratio, because absolute
microseconds on a shared machine mean little on their own.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram
from rich.table import Table

from mmiosplit_cli.loadtest import stats
from mmiosplit_cli.loadtest.runner import IrqLatency, LoadResult, Measurement

FLOOR_TITLES = {"grpc": "floor: bare gRPC ping-pong", "socket": "floor: raw socket ping-pong",
                "local": "floor: local transport (same guest)"}
CSV_FIELDS = ["name", "kind", "count", "exits_per_s", "p50_us", "p90_us", "p99_us", "p999_us", "max_us", "mean_us",
              "ratio_p50", "ratio_p99"]
LATENCY_KEYS = ("p50", "p90", "p99", "p999", "max", "mean")


def latency(hist: HdrHistogram) -> dict[str, float]:
    """The latency summary of a histogram in microseconds (JSON's ``latency_us``)."""
    p = stats.percentiles_us(hist)
    return {k: round(p[k], 3) for k in LATENCY_KEYS}


def _ratios(hist: HdrHistogram, floor: HdrHistogram | None) -> dict[str, float | None] | None:
    if floor is None or not hist.get_total_count() or not floor.get_total_count():
        return None
    a, f = stats.percentiles_us(hist), stats.percentiles_us(floor)
    return {k: _round(stats.ratio(a[k], f[k]), 4) for k in ("p50", "p99")}


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _grpc_floor(result: LoadResult) -> HdrHistogram | None:
    f = result.floors.get("grpc")
    return f.hist if f is not None else None


def _measurement_json(m: Measurement) -> dict[str, Any]:
    return {
        "exits": m.exits, "exits_per_s": round(m.exits_per_s, 2), "posted_writes": m.posted_writes,
        "posted_writes_per_s": round(m.posted_writes_per_s, 2), "iteration_us": _round(m.iteration_us),
        "window_s": round(m.wall_seconds, 4), "latency_us": latency(m.hist),
        "per_process": [{"label": v.label, "exits": int(v.hist.get_total_count()),
                         "exits_per_s": round(v.exits_per_s, 2)} for v in m.vms],
    }


def _irq_json(result: LoadResult) -> dict[str, Any] | None:
    """Interrupt latency (``--irq``): the run, the local-transport floor, and the run's overhead above it."""
    irq = result.run.irq
    if irq is None:
        return None
    floor = _floor_irq(result)
    doc: dict[str, Any] = {
        "interrupts": int(irq.ack.get_total_count()), "from_arrival": irq.from_arrival,
        "delay_us": result.config.irq_delay_us,
        "ack_us": latency(irq.ack), "eoi_us": latency(irq.eoi),
        "floor_local": None if floor is None else {"ack_us": latency(floor.ack), "eoi_us": latency(floor.eoi)},
        "overhead_us": None,
    }
    if floor is not None and floor.ack.get_total_count():
        doc["overhead_us"] = {
            f"{what}_{k}": round(stats.percentiles_us(getattr(irq, what))[k]
                                 - stats.percentiles_us(getattr(floor, what))[k], 3)
            for what in ("ack", "eoi") for k in ("p50", "p99")}
    return doc


def to_json(result: LoadResult) -> dict[str, Any]:
    """Everything a later comparison or a target check needs, in one JSON-able dict."""
    run = result.run
    floor = _grpc_floor(result)
    doc: dict[str, Any] = {
        "tool": "mmiosplit loadtest",
        "format": 1,
        "config": result.config.to_json(),
        "machine": result.machine,
        "placement": result.placement,
        "exits": run.exits,
        "exits_per_s": round(run.exits_per_s, 2),
        "posted_writes": run.posted_writes,
        "posted_writes_per_s": round(run.posted_writes_per_s, 2),
        "shadow_reads": run.shadow_reads,
        "iteration_us": _round(run.iteration_us),
        "window_s": round(run.wall_seconds, 4),
        "warmup_exits_discarded": run.warmup_exits,
        "latency_us": latency(run.hist),
        "floor_grpc_us": latency(floor) if floor is not None else None,
        "ratio": _ratios(run.hist, floor),
        "floors": {name: {"count": int(f.hist.get_total_count()),
                          "exits_per_s": _round(f.exits_per_s, 2), "latency_us": latency(f.hist),
                          "ratio_to_grpc": _ratios(f.hist, floor)}
                   for name, f in result.floors.items()},
        "ratio_to_local": _ratios(run.hist, result.floors["local"].hist) if "local" in result.floors else None,
        "cpu": [{"name": u.name, "pid": u.pid, "cpu": u.cpu, "percent": _round(u.percent, 1)} for u in run.cpu],
        "vcpus": [{"process": v.label, "vcpu_id": c.vcpu_id, "exits": int(c.hist.get_total_count()),
                   "exits_per_s": round(c.window.exits_per_s, 2), "posted_writes": c.counts.posted_writes,
                   "posted_writes_per_s": round(c.window.posted_writes_per_s, 2), "latency_us": latency(c.hist),
                   "ratio": _ratios(c.hist, floor)}
                  for v in run.vms for c in v.vcpus],
        "processes": [{"label": v.label, "exits": int(v.hist.get_total_count()),
                       "exits_per_s": round(v.exits_per_s, 2), "posted_writes_per_s":
                       round(v.window.posted_writes_per_s, 2), "window_s": round(v.window.seconds, 4),
                       "latency_us": latency(v.hist), "ratio": _ratios(v.hist, floor)} for v in run.vms],
        "scale": _scale_json(result),
        "irq": _irq_json(result),
        "notes": result.notes,
    }
    return doc


def _scale_json(result: LoadResult) -> list[dict[str, Any]]:
    if not result.scale:
        return []
    single = result.scale[0].measurement.exits_per_s
    out = []
    for point in result.scale:
        m = point.measurement
        out.append({"processes": point.processes, "aggregate_exits_per_s": round(m.exits_per_s, 2),
                    "per_process_exits_per_s": [round(v.exits_per_s, 2) for v in m.vms],
                    "efficiency": _round(stats.scaling_efficiency(m.exits_per_s, point.processes, single), 4),
                    "latency_us": latency(m.hist)})
    return out


def rows(result: LoadResult) -> list[dict[str, Any]]:
    """One row per measurement (the run, its vCPUs and processes, the floors, the scale points)."""
    floor = _grpc_floor(result)
    out: list[dict[str, Any]] = []

    def add(name: str, kind: str, hist: HdrHistogram, per_s: float | None) -> None:
        p = stats.percentiles_us(hist)
        r = _ratios(hist, floor) or {}
        out.append({"name": name, "kind": kind, "count": int(hist.get_total_count()),
                    "exits_per_s": _round(per_s, 2),
                    **{f"{k}_us": round(p[k], 3) for k in LATENCY_KEYS},
                    "ratio_p50": r.get("p50"), "ratio_p99": r.get("p99")})

    run = result.run
    add("run", "run", run.hist, run.exits_per_s)
    if len(run.vms) > 1:
        for v in run.vms:
            add(v.label, "process", v.hist, v.exits_per_s)
    for v in run.vms:
        if len(v.vcpus) > 1:
            for c in v.vcpus:
                prefix = f"{v.label} " if len(run.vms) > 1 else ""
                add(f"{prefix}vcpu {c.vcpu_id}", "vcpu", c.hist, c.window.exits_per_s)
    for name, f in result.floors.items():
        add(name, "floor", f.hist, f.exits_per_s)
    for label, irq in (("run", result.run.irq), ("local", _floor_irq(result))):
        if irq is not None:
            add(f"{label} irq raised->handler", "irq", irq.ack, None)
            add(f"{label} irq raised->eoi", "irq", irq.eoi, None)
    for point in result.scale:
        add(f"scale n={point.processes}", "scale", point.measurement.hist, point.measurement.exits_per_s)
    return out


def _floor_irq(result: LoadResult) -> IrqLatency | None:
    local = result.floors.get("local")
    return local.irq if local is not None else None


def csv_text(result: LoadResult) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows(result):
        writer.writerow({k: "" if row[k] is None else row[k] for k in CSV_FIELDS})
    return buf.getvalue()


def hgrm_text(hist: HdrHistogram, ticks_per_half_distance: int = 5) -> str:
    """HdrHistogram's percentile distribution (the ``.hgrm`` format of ``outputPercentileDistribution``),
    values in microseconds.

    Written here rather than with hdrh's ``output_percentile_distribution``, which leaves the standard
    deviation unscaled (nanoseconds beside microseconds) and prints the total count as a float.
    """
    digits = hist.significant_figures
    out = [f"{'Value':>12} {'Percentile':>14} {'TotalCount':>10} {'1/(1-Percentile)':>14}", ""]
    for it in hist.get_percentile_iterator(ticks_per_half_distance) if hist.get_total_count() else []:
        value = it.value_iterated_to / 1000
        pct = it.percentile_level_iterated_to / 100
        if it.percentile_level_iterated_to != 100:
            out.append(f"{value:12.{digits}f} {pct:2.12f} {it.total_count_to_this_value:10d} {1 / (1 - pct):14.2f}")
        else:
            out.append(f"{value:12.{digits}f} {pct:2.12f} {it.total_count_to_this_value:10d}")
    count = hist.get_total_count()
    mean = hist.get_mean_value() / 1000 if count else 0.0
    stddev = hist.get_stddev() / 1000 if count else 0.0
    top = hist.get_max_value() / 1000 if count else 0.0
    out.append(f"#[Mean    = {mean:12.{digits}f}, StdDeviation   = {stddev:12.{digits}f}]")
    out.append(f"#[Max     = {top:12.{digits}f}, Total count    = {count:12d}]")
    out.append(f"#[Buckets = {hist.bucket_count:12d}, SubBuckets     = {hist.sub_bucket_count:12d}]")
    return "\n".join(out) + "\n"


def write_outputs(result: LoadResult, json_path: str | None = None, csv_path: str | None = None,
                  hgrm_path: str | None = None, plot_path: str | None = None,
                  doc: dict[str, Any] | None = None) -> None:
    """Write each output asked for (``doc``: the JSON already built by ``to_json``, to save the work)."""
    if json_path:
        Path(json_path).write_text(json.dumps(doc or to_json(result), indent=2) + "\n")
    if csv_path:
        Path(csv_path).write_text(csv_text(result))
    if hgrm_path:
        Path(hgrm_path).write_text(hgrm_text(result.run.hist))
    if plot_path:
        write_plot(result, plot_path)


def write_plot(result: LoadResult, path: str) -> None:
    """Latency by percentile for the run and its floors, HdrHistogram style (x = 1/(1-p), log scale)."""
    # lazy: start-up time (matplotlib takes about 0.2 s to import, and only --plot needs it)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    curves = [("run (gRPC split)", result.run.hist)]
    curves += [(FLOOR_TITLES.get(name, name), f.hist) for name, f in result.floors.items()]
    right = 100.0
    for label, hist in curves:
        points = stats.percentile_curve(hist)
        if not points:
            continue
        xs = [stats.percentile_to_x(p, int(hist.get_total_count())) for p, _ in points]
        ys = [max(v, 1e-3) for _, v in points]
        right = max(right, max(xs))
        ax.plot(xs, ys, label=label, linewidth=1.6 if label.startswith("run") else 1.1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = [(1, "0%"), (10, "90%"), (100, "99%"), (1000, "99.9%"), (10_000, "99.99%"), (100_000, "99.999%"),
             (1_000_000, "99.9999%")]
    shown = [t for t in ticks if t[0] <= right * 1.01]
    ax.set_xticks([t[0] for t in shown], [t[1] for t in shown])
    ax.set_xlim(1, right * 1.1)
    ax.set_xlabel("percentile")
    ax.set_ylabel("exit round trip (us)")
    cfg = result.config
    ax.set_title(f"mmiosplit loadtest: {cfg.arch}, {cfg.vcpus} vCPU, mix {cfg.to_json()['mix']}, size {cfg.size}"
                 f"{', posted' if cfg.posted else ''}, {cfg.transport}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----- the terminal --------------------------------------------------------------------------------------------
def _render_irq(result: LoadResult, console: Any, irq: dict[str, Any]) -> None:
    """Interrupt latency: the run and its local-transport floor, raised -> handler and raised -> EOI."""
    table = Table(title=f"interrupt latency (us): device raises its line {irq['delay_us']} us after FIRE -> the "
                  "guest's handler reads GICC_IAR -> ... -> GICC_EOIR", title_justify="left")
    for col in ("measurement", "count", "p50", "p90", "p99", "p99.9", "max", "p50 above local"):
        table.add_column(col, justify="left" if col == "measurement" else "right")
    local = _floor_irq(result)
    assert result.run.irq is not None
    for label, what, hist in (("run: raised -> handler (IAR)", "ack", result.run.irq.ack),
                              ("run: raised -> EOI", "eoi", result.run.irq.eoi),
                              ("floor: local transport, raised -> handler", "ack", local.ack if local else None),
                              ("floor: local transport, raised -> EOI", "eoi", local.eoi if local else None)):
        if hist is None:
            continue
        p = stats.percentiles_us(hist)
        above = irq["overhead_us"].get(f"{what}_p50") if label.startswith("run") and irq["overhead_us"] else None
        table.add_row(label, str(int(hist.get_total_count())),
                      *(stats.fmt_float(p[k]) for k in ("p50", "p90", "p99", "p999", "max")),
                      stats.fmt_float(above), style="bold" if label.startswith("run") else None)
    console.print(table)
    if irq["from_arrival"]:
        console.print("note: the device service does not share this host's clock, so these latencies start when "
                      "the line change reached the vcpu service (the trip from the device is left out)")
def render(result: LoadResult, console: Any, doc: dict[str, Any] | None = None) -> None:
    """The rich tables: measurements beside the gRPC floor, CPU per process, the scale curve."""
    cfg = result.config
    doc = doc or to_json(result)
    title = (f"{cfg.arch}, {cfg.vcpus} vCPU{'s' if cfg.vcpus > 1 else ''}, mix {doc['config']['mix']}, "
             f"{cfg.size}-byte{' posted' if cfg.posted else ''}, {cfg.transport}, "
             f"{cfg.processes} process{'es' if cfg.processes > 1 else ''}")
    table = Table(title=f"exit round trip (us): {title}", title_justify="left")
    for col in ("measurement", "count", "exits/s", "p50", "p90", "p99", "p99.9", "max", "x gRPC p50",
                "x gRPC p99"):
        table.add_column(col, justify="left" if col == "measurement" else "right")
    for row in rows(result):
        if row["kind"] == "irq":
            continue  # their own table below
        name = {"run": "run (vcpu service over gRPC)"}.get(row["name"], row["name"])
        if row["kind"] == "floor":
            name = FLOOR_TITLES.get(row["name"], row["name"])
        elif row["kind"] in ("vcpu", "process"):
            name = "  " + name
        table.add_row(name, str(row["count"]), stats.fmt_float(row["exits_per_s"], 0),
                      *(stats.fmt_float(row[f"{k}_us"]) for k in ("p50", "p90", "p99", "p999", "max")),
                      stats.fmt_float(row["ratio_p50"], 2), stats.fmt_float(row["ratio_p99"], 2),
                      style="bold" if row["kind"] == "run" else None)
    console.print(table)
    if doc.get("irq"):
        _render_irq(result, console, doc["irq"])
    run = result.run
    parts = [f"{run.exits} exits measured in {run.wall_seconds:.2f} s ({run.exits_per_s:.0f} exits/s"]
    if run.posted_writes:
        parts.append(f", {run.posted_writes_per_s:.0f} posted writes/s")
    if run.iteration_us:
        parts.append(f", {run.iteration_us:.1f} us per loop iteration per vCPU")
    if run.shadow_reads:
        parts.append(f", {run.shadow_reads} reads answered from shadow registers without an exit")
    parts.append(f"); {run.warmup_exits} warm-up exits discarded")
    line = "".join(parts)
    console.print(line)
    console.print("CPU per process over the measured window, % of one CPU (/proc/PID/stat utime+stime):")
    cpu = Table()
    for col in ("process", "pid", "pinned to", "CPU %"):
        cpu.add_column(col, justify="left" if col == "process" else "right")
    for use in run.cpu:
        cpu.add_row(use.name, str(use.pid), "-" if use.cpu is None else str(use.cpu), stats.fmt_float(use.percent))
    console.print(cpu)
    if result.scale:
        sc = Table(title="scale-out: N vcpu-service processes, one VM each", title_justify="left")
        for col in ("N", "aggregate exits/s", "per process exits/s", "efficiency"):
            sc.add_column(col, justify="right")
        for point in doc["scale"]:
            sc.add_row(str(point["processes"]), f"{point['aggregate_exits_per_s']:.0f}",
                       " ".join(f"{r:.0f}" for r in point["per_process_exits_per_s"]),
                       stats.fmt_float(point["efficiency"], 2))
        console.print(sc)
    for note in result.notes:
        console.print(f"note: {note}")
