"""Fixed-bucket histograms cheap enough for the exit path (no prometheus_client import here).

The services count into these where an event happens; the metrics collectors read a snapshot at
scrape time. A record is a bisect and two additions, so a service pays almost nothing for metrics
nobody scrapes.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence
from dataclasses import dataclass

# Writes per posted batch: a batch holds at most vcpu_service.transport.POSTED_BATCH_MAX (1024).
POSTED_BATCH_BOUNDS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True, slots=True)
class BucketSnapshot:
    """Per-bucket (not cumulative) counts, one per bound plus the overflow bucket, and the sum."""

    bounds: tuple[int, ...]
    counts: tuple[int, ...]
    sum: int

    @property
    def count(self) -> int:
        return sum(self.counts)

    @classmethod
    def empty(cls, bounds: Sequence[int]) -> BucketSnapshot:
        return cls(tuple(bounds), (0,) * (len(bounds) + 1), 0)

    def merged(self, other: BucketSnapshot) -> BucketSnapshot:
        """The sum of two snapshots over the same bounds (vCPUs, VMs, retired VMs)."""
        if other.bounds != self.bounds:
            raise ValueError(f"cannot merge buckets {other.bounds} into {self.bounds}")
        return BucketSnapshot(self.bounds, tuple(a + b for a, b in zip(self.counts, other.counts, strict=True)),
                              self.sum + other.sum)

    def cumulative(self) -> list[int]:
        """Counts of observations <= each bound, then the total (Prometheus ``le`` buckets)."""
        out, running = [], 0
        for c in self.counts:
            running += c
            out.append(running)
        return out


class FixedHistogram:
    """Integer observations in fixed buckets (value <= bound goes to the first such bucket).

    ``thread_safe=False`` is for a single writer (the device service's event loop): readers copy the
    list, which the GIL makes atomic, and may see a sum a few observations ahead of the counts.
    """

    def __init__(self, bounds: Sequence[int], thread_safe: bool = True) -> None:
        self.bounds = tuple(bounds)
        if list(self.bounds) != sorted(set(self.bounds)):
            raise ValueError(f"bucket bounds must be strictly increasing: {self.bounds}")
        self._counts = [0] * (len(self.bounds) + 1)
        self._sum = 0
        self._lock = threading.Lock() if thread_safe else None

    def record(self, value: int) -> None:
        """Count one observation."""
        if self._lock is None:
            self._counts[bisect.bisect_left(self.bounds, value)] += 1
            self._sum += value
            return
        with self._lock:
            self._counts[bisect.bisect_left(self.bounds, value)] += 1
            self._sum += value

    def snapshot(self) -> BucketSnapshot:
        """A consistent copy (for a thread-safe histogram) to read at scrape time."""
        if self._lock is None:
            return BucketSnapshot(self.bounds, tuple(self._counts), self._sum)
        with self._lock:
            return BucketSnapshot(self.bounds, tuple(self._counts), self._sum)
