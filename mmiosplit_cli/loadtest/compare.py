"""``mmiosplit loadtest compare A.json B.json``: two runs side by side, each metric with its change B/A."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS: list[tuple[str, tuple[str, ...], int]] = [  # label, where in the JSON, decimals shown
    ("exits", ("exits",), 0),
    ("exits/s", ("exits_per_s",), 1),
    ("posted writes/s", ("posted_writes_per_s",), 1),
    ("loop iteration us", ("iteration_us",), 1),
    ("p50 us", ("latency_us", "p50"), 1),
    ("p90 us", ("latency_us", "p90"), 1),
    ("p99 us", ("latency_us", "p99"), 1),
    ("p99.9 us", ("latency_us", "p999"), 1),
    ("max us", ("latency_us", "max"), 1),
    ("gRPC floor p50 us", ("floor_grpc_us", "p50"), 1),
    ("gRPC floor p99 us", ("floor_grpc_us", "p99"), 1),
    ("p50 / gRPC floor", ("ratio", "p50"), 3),
    ("p99 / gRPC floor", ("ratio", "p99"), 3),
]
DIGITS = {label: digits for label, _, digits in METRICS}


class CompareError(ValueError):
    """A file that is not a load test's JSON; the message names it."""


def load(path: str) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as exc:
        raise CompareError(f"{path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise CompareError(f"{path}: not JSON ({exc})") from None
    if not isinstance(doc, dict) or "latency_us" not in doc or "exits_per_s" not in doc:
        raise CompareError(f"{path}: not the JSON of mmiosplit loadtest --json (no latency_us/exits_per_s)")
    return doc


def _get(doc: dict[str, Any], path: tuple[str, ...]) -> float | None:
    value: Any = doc
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def change(a: float | None, b: float | None) -> float | None:
    """b / a: above 1 is more (slower for latencies, faster for rates)."""
    if a is None or b is None or a == 0:
        return None
    return b / a


def compare_rows(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, float | None, float | None, float | None]]:
    """(metric, A, B, B/A) for every metric either run has, CPU per process last."""
    out = []
    for label, path, _ in METRICS:
        va, vb = _get(a, path), _get(b, path)
        if va is None and vb is None:
            continue
        out.append((label, va, vb, change(va, vb)))
    cpu_a = {c["name"]: c.get("percent") for c in a.get("cpu", []) if isinstance(c, dict)}
    cpu_b = {c["name"]: c.get("percent") for c in b.get("cpu", []) if isinstance(c, dict)}
    for name in list(dict.fromkeys([*cpu_a, *cpu_b])):
        va, vb = cpu_a.get(name), cpu_b.get(name)
        out.append((f"CPU % {name}", va, vb, change(va, vb)))
    return out


def config_differences(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    ca, cb = a.get("config", {}) or {}, b.get("config", {}) or {}
    return [(k, ca.get(k), cb.get(k)) for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k)]


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def compare_text(a: dict[str, Any], b: dict[str, Any], name_a: str = "A", name_b: str = "B") -> str:
    """The comparison as plain text (what the tests check; the terminal gets the same as a rich table)."""
    lines = [f"{'metric':<34}{name_a:>16}{name_b:>16}{'B/A':>9}"]
    for label, va, vb, ch in compare_rows(a, b):
        digits = DIGITS.get(label, 1)
        lines.append(f"{label:<34}{_fmt(va, digits):>16}{_fmt(vb, digits):>16}{_fmt(ch, 3):>9}")
    for key, va, vb in config_differences(a, b):
        lines.append(f"config {key}: {va!r} -> {vb!r}")
    return "\n".join(lines)


def render_compare(a: dict[str, Any], b: dict[str, Any], name_a: str, name_b: str, console: Any) -> None:
    from rich.table import Table  # lazy: start-up time (every `mmiosplit` command imports this module)

    table = Table(title=f"A = {name_a}, B = {name_b}", title_justify="left")
    for col in ("metric", "A", "B", "B/A"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for label, va, vb, ch in compare_rows(a, b):
        digits = DIGITS.get(label, 1)
        table.add_row(label, _fmt(va, digits), _fmt(vb, digits), _fmt(ch, 3))
    console.print(table)
    diffs = config_differences(a, b)
    if diffs:
        console.print("configuration differs: " + "; ".join(f"{k}: {va!r} -> {vb!r}" for k, va, vb in diffs))
