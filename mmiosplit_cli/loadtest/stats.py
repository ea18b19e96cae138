"""The load tester's arithmetic, kept pure (no I/O, no clocks) so the unit tests can check it on known inputs.

Latency histograms count nanoseconds (as the vcpu service records them); everything shown is in
microseconds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from hdrh.histogram import HdrHistogram

LOWEST_NS = 1
HIGHEST_NS = 60_000_000_000
SIGNIFICANT_DIGITS = 3
PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p999": 99.9}


def new_histogram() -> HdrHistogram:
    """A histogram of nanoseconds with the vcpu service's parameters, so the two can be added and subtracted."""
    return HdrHistogram(LOWEST_NS, HIGHEST_NS, SIGNIFICANT_DIGITS)


def histogram_of(samples_ns: Iterable[int]) -> HdrHistogram:
    hist = new_histogram()
    for ns in samples_ns:
        hist.record_value(max(LOWEST_NS, min(HIGHEST_NS, int(ns))))
    return hist


def decode(encoded: str) -> HdrHistogram:
    """A histogram from GetStats' base64 compressed encoding; an empty string is an empty histogram."""
    if not encoded:
        return new_histogram()
    hist = new_histogram()
    hist.add(HdrHistogram.decode(encoded))
    return hist


def merge(hists: Iterable[HdrHistogram]) -> HdrHistogram:
    total = new_histogram()
    for h in hists:
        if h.get_total_count():
            total.add(h)
    return total


def _nonzero(hist: HdrHistogram) -> list[tuple[int, int]]:
    """(index, count) of every non-empty bucket, read from the counts array in one pass (hdrh's own
    iterators cost about 0.4 s per histogram in pure Python)."""
    n = min(hist.counts_len, hist.encoder.payload.counts_len)
    counts = list(hist.counts[:n])
    return [(i, c) for i, c in enumerate(counts) if c]


def subtract(after: HdrHistogram, before: HdrHistogram) -> HdrHistogram:
    """What was recorded between two snapshots of one cumulative histogram (the warm-up taken out).

    Raises ValueError when ``before`` is not a prefix of ``after`` (a count went down).
    """
    if before.get_total_count() and before.counts_len != after.counts_len:
        raise ValueError("histograms have different layouts; they cannot be subtracted")
    prior = dict(_nonzero(before))
    out = new_histogram()
    for index, count in _nonzero(after):
        earlier = prior.pop(index, 0)
        if earlier > count:
            raise ValueError("the earlier snapshot has more counts than the later one")
        if count > earlier:
            out.record_value(after.get_value_from_index(index), count - earlier)
    if prior:
        raise ValueError("the earlier snapshot has more counts than the later one")
    return out


def percentiles_us(hist: HdrHistogram) -> dict[str, float]:
    """count, p50, p90, p99, p99.9, max and mean in microseconds (zeros for an empty histogram).

    HdrHistogram's definitions: a percentile is the highest value equivalent to the bucket where the
    running count first reaches the target count (``get_value_at_percentile``); the mean weighs each
    bucket's median equivalent value (``get_mean_value``).
    """
    count = hist.get_total_count()
    out: dict[str, float] = {"count": float(count)}
    if not count:
        out.update({k: 0.0 for k in (*PERCENTILES, "max", "mean")})
        return out
    targets = sorted((hist.get_target_count_at_percentile(pct), key) for key, pct in PERCENTILES.items())
    running = 0
    weighted = 0
    values: dict[str, float] = {}
    for index, c in _nonzero(hist):
        running += c
        value = hist.get_value_from_index(index)
        weighted += c * hist._hdr_median_equiv_value(value)
        while targets and running >= targets[0][0]:
            values[targets.pop(0)[1]] = hist.get_highest_equivalent_value(value) / 1000
    for key in PERCENTILES:
        out[key] = values.get(key, 0.0)
    out["max"] = hist.get_max_value() / 1000
    out["mean"] = weighted / count / 1000
    return out


def rate(count: float, seconds: float) -> float:
    """Events per second; 0 for an empty or zero-length window rather than a division error."""
    return count / seconds if seconds > 0 and count > 0 else 0.0


def ratio(value: float | None, floor: float | None) -> float | None:
    """value / floor, or None when either is missing or the floor is zero."""
    if value is None or floor is None or floor <= 0:
        return None
    return value / floor


def scaling_efficiency(aggregate: float, n: int, single: float) -> float | None:
    """aggregate / (n x single): 1.0 is perfect scale-out."""
    if n <= 0 or single <= 0:
        return None
    return aggregate / (n * single)


def parse_proc_stat(text: str) -> int:
    """utime + stime in clock ticks from the text of /proc/PID/stat (the name may hold spaces and parens)."""
    rest = text[text.rindex(")") + 2:].split()
    # After "pid (comm) ", field 3 (state) is rest[0]; utime and stime are fields 14 and 15.
    return int(rest[11]) + int(rest[12])


def cpu_percent(ticks_before: int, ticks_after: int, clock_ticks: int, wall_seconds: float) -> float | None:
    """CPU use over a window as a percentage of one CPU (100 = one CPU busy all the time)."""
    if wall_seconds <= 0 or clock_ticks <= 0 or ticks_after < ticks_before:
        return None
    return 100.0 * (ticks_after - ticks_before) / clock_ticks / wall_seconds


@dataclass(frozen=True)
class Window:
    """Two counter snapshots of one VM (GetStats counters): the measured window between them."""

    exits: int
    posted_writes: int
    reads: int
    writes: int
    seconds: float
    shadow_reads: int = 0  # loads answered from the vcpu service's copy of a register, without an exit

    @property
    def exits_per_s(self) -> float:
        return rate(self.exits, self.seconds)

    @property
    def posted_writes_per_s(self) -> float:
        return rate(self.posted_writes, self.seconds)


def window(before: Mapping[str, float], after: Mapping[str, float]) -> Window:
    """The difference of two counter snapshots (keys exits, posted_writes, reads, writes, run_seconds, and
    optionally shadow_reads)."""
    return Window(int(after["exits"] - before["exits"]), int(after["posted_writes"] - before["posted_writes"]),
                  int(after["reads"] - before["reads"]), int(after["writes"] - before["writes"]),
                  float(after["run_seconds"] - before["run_seconds"]),
                  int(after.get("shadow_reads", 0) - before.get("shadow_reads", 0)))


def iterations(w: Window, reads_per_iteration: int, sync_writes_per_iteration: int, posted_per_iteration: int) -> float:
    """Loop iterations done in a window, from whichever counter the mix moves."""
    if reads_per_iteration:
        return (w.reads + w.shadow_reads) / reads_per_iteration
    if sync_writes_per_iteration:
        return w.writes / sync_writes_per_iteration
    if posted_per_iteration:
        return w.posted_writes / posted_per_iteration
    return 0.0


def percentile_curve(hist: HdrHistogram, ticks_per_half_distance: int = 5) -> list[tuple[float, float]]:
    """(percentile, microseconds) points as HdrHistogram's percentile distribution lists them."""
    if not hist.get_total_count():
        return []
    return [(it.percentile_level_iterated_to, it.value_iterated_to / 1000)
            for it in hist.get_percentile_iterator(ticks_per_half_distance)]


def percentile_to_x(percentile: float, count: int = 0) -> float:
    """HdrHistogram plots' x axis: 1 / (1 - p), so 90%, 99%, 99.9% are evenly spaced on a log scale.

    100% (the maximum) would be infinite: it is placed where one sample in ``count`` sits, 1 / (1/count).
    """
    if percentile >= 100:
        return float(max(count, 1))
    return 1.0 / (1.0 - percentile / 100)


def fmt_float(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"
