"""The load tester's arithmetic on known inputs: percentiles, warm-up subtraction, rates, ratios, CPU use."""

from __future__ import annotations

import pytest

from mmiosplit_cli.loadtest import stats


def us(values: list[float]) -> list[int]:
    return [int(v * 1000) for v in values]


def test_percentiles_of_one_to_a_thousand_microseconds() -> None:
    hist = stats.histogram_of(us([float(v) for v in range(1, 1001)]))
    p = stats.percentiles_us(hist)
    assert p["count"] == 1000
    # Three significant digits: each value is within 0.1% of the exact order statistic.
    assert p["p50"] == pytest.approx(500, rel=1e-3)
    assert p["p90"] == pytest.approx(900, rel=1e-3)
    assert p["p99"] == pytest.approx(990, rel=1e-3)
    assert p["p999"] == pytest.approx(999, rel=1e-3)
    assert p["max"] == pytest.approx(1000, rel=1e-3)
    assert p["mean"] == pytest.approx(500.5, rel=1e-3)


def test_percentiles_of_a_skewed_distribution() -> None:
    # 990 exits at 100 us, 9 at 1 ms, one at 50 ms: p50 and p99 sit on the body, p99.9 on the tail.
    hist = stats.histogram_of(us([100.0] * 990 + [1000.0] * 9 + [50_000.0]))
    p = stats.percentiles_us(hist)
    assert p["p50"] == pytest.approx(100, rel=1e-3)
    assert p["p99"] == pytest.approx(100, rel=1e-3)
    assert p["p999"] == pytest.approx(1000, rel=1e-3)
    assert p["max"] == pytest.approx(50_000, rel=1e-3)


def test_an_empty_histogram_reads_as_zeros() -> None:
    p = stats.percentiles_us(stats.new_histogram())
    assert p == {"count": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "p999": 0.0, "max": 0.0, "mean": 0.0}


def test_subtract_takes_the_warm_up_out_exactly() -> None:
    warm = us([5000.0] * 300)  # slow first exits
    later = us([100.0] * 700)
    before = stats.histogram_of(warm)
    after = stats.histogram_of(warm + later)
    measured = stats.subtract(after, before)
    assert measured.get_total_count() == 700
    p = stats.percentiles_us(measured)
    assert p["max"] == pytest.approx(100, rel=1e-3)


def test_subtract_survives_the_encoding_the_vcpu_service_sends() -> None:
    before = stats.histogram_of(us([1.0, 2.0, 3.0]))
    after = stats.histogram_of(us([1.0, 2.0, 3.0, 4.0, 4.0]))
    decoded = stats.subtract(stats.decode(after.encode().decode("ascii")), stats.decode(before.encode()))
    assert decoded.get_total_count() == 2
    assert stats.percentiles_us(decoded)["p50"] == pytest.approx(4.0, rel=1e-3)
    assert stats.decode("").get_total_count() == 0


def test_subtract_refuses_snapshots_in_the_wrong_order() -> None:
    small = stats.histogram_of(us([1.0]))
    big = stats.histogram_of(us([1.0, 2.0]))
    with pytest.raises(ValueError, match="earlier snapshot"):
        stats.subtract(small, big)


def test_merge_adds_counts() -> None:
    merged = stats.merge([stats.histogram_of(us([1.0] * 3)), stats.new_histogram(), stats.histogram_of(us([2.0]))])
    assert merged.get_total_count() == 4


def test_rate_and_ratio() -> None:
    assert stats.rate(3000, 1.5) == 2000
    assert stats.rate(10, 0) == 0.0
    assert stats.rate(0, 2.0) == 0.0
    assert stats.ratio(575.0, 500.0) == pytest.approx(1.15)
    assert stats.ratio(1.0, 0.0) is None
    assert stats.ratio(None, 2.0) is None


def test_scaling_efficiency() -> None:
    assert stats.scaling_efficiency(3200, 2, 2000) == pytest.approx(0.8)
    assert stats.scaling_efficiency(2000, 1, 2000) == 1.0
    assert stats.scaling_efficiency(100, 2, 0) is None


def test_window_of_counter_snapshots() -> None:
    a = {"exits": 100, "posted_writes": 400, "reads": 100, "writes": 0, "run_seconds": 1.0}
    b = {"exits": 2100, "posted_writes": 8400, "reads": 2100, "writes": 0, "run_seconds": 3.0}
    w = stats.window(a, b)
    assert (w.exits, w.posted_writes, w.reads, w.seconds) == (2000, 8000, 2000, 2.0)
    assert w.exits_per_s == 1000
    assert w.posted_writes_per_s == 4000
    # 4 posted writes + 1 read per iteration: iterations come from the reads.
    assert stats.iterations(w, reads_per_iteration=1, sync_writes_per_iteration=0, posted_per_iteration=4) == 2000
    # Posted writes only: from the posted counter.
    assert stats.iterations(w, 0, 0, posted_per_iteration=4) == 2000
    assert stats.iterations(w, 0, 0, 0) == 0


PROC_STAT = ("4242 (python3 (vcpu) x) S 1 4242 4242 0 -1 4194560 12345 0 0 0 "
             "750 250 0 0 20 0 9 0 123456 1000000 5000 18446744073709551615 1 1 0 0 0 0 0 16781312 2 0 0 0 17 0 0 0")


def test_proc_stat_utime_plus_stime_with_a_name_holding_spaces_and_parens() -> None:
    assert stats.parse_proc_stat(PROC_STAT) == 1000


def test_cpu_percent_from_tick_deltas() -> None:
    # 150 ticks at 100 Hz over 2 s: 1.5 s of CPU in 2 s = 75% of one CPU.
    assert stats.cpu_percent(1000, 1150, 100, 2.0) == pytest.approx(75.0)
    # Two CPUs' worth in one process shows as 200%.
    assert stats.cpu_percent(0, 400, 100, 2.0) == pytest.approx(200.0)
    assert stats.cpu_percent(10, 5, 100, 1.0) is None
    assert stats.cpu_percent(0, 5, 100, 0.0) is None


def test_percentile_curve_and_its_x_axis() -> None:
    hist = stats.histogram_of(us([float(v) for v in range(1, 101)]))
    curve = stats.percentile_curve(hist)
    assert curve[0][0] == 0.0
    assert curve[-1][0] == 100.0
    assert curve[-1][1] == pytest.approx(100, rel=1e-3)
    assert [p for p, _ in curve] == sorted(p for p, _ in curve)
    assert stats.percentile_to_x(0) == 1.0
    assert stats.percentile_to_x(90) == pytest.approx(10)
    assert stats.percentile_to_x(99) == pytest.approx(100)
    assert stats.percentile_to_x(100, count=5000) == 5000
