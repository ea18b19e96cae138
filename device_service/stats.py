"""Counters a device service keeps about its accesses, read by the metrics collector at scrape time.

Kept on the ``DeviceBus`` (``bus.stats``), so the gRPC server and the in-process transport count
alike. Every update is one integer or dict operation on the device service's single event-loop thread;
the handling-time histogram costs two clock reads per access and is only kept once metrics are
enabled (``enable_timing``).
"""

from __future__ import annotations

import collections
from typing import Any, Protocol

from mmiosplit.buckets import POSTED_BATCH_BOUNDS, FixedHistogram

# Time to handle one access (decode, checks, the model), nanoseconds: 1 us to 10 ms.
HANDLING_BOUNDS_NS: tuple[int, ...] = (
    1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 10_000_000,
)


class _DoneCallbacks(Protocol):
    def add_done_callback(self, callback: Any) -> None: ...


class DeviceStats:
    """Accesses, errors, posted batches and exit streams of one device service."""

    def __init__(self) -> None:
        # (device, region, kind) with kind "read" or "write" (posted writes included); device and region
        # are "" for an address no region covers.
        self.accesses: collections.Counter[tuple[str, str, str]] = collections.Counter()
        # (device, outcome): outcome "device_error", "no_device" or "bad_request".
        self.errors: collections.Counter[tuple[str, str]] = collections.Counter()
        self.posted_writes = 0
        self.posted_batches = FixedHistogram(POSTED_BATCH_BOUNDS)
        self.handling: FixedHistogram | None = None
        self.streams_open = 0
        self.streams_opened = 0

    def enable_timing(self) -> None:
        """Start timing every access (metrics on); dispatch skips the clock while this is off."""
        if self.handling is None:
            self.handling = FixedHistogram(HANDLING_BOUNDS_NS, thread_safe=False)

    def posted_batch(self, writes: int) -> None:
        """One batch of posted writes arrived (called once per batch, not per write)."""
        self.posted_writes += writes
        self.posted_batches.record(writes)

    def stream_opened(self, context: _DoneCallbacks) -> None:
        """An exit stream finished its handshake; it counts as open until its RPC ends."""
        self.streams_open += 1
        self.streams_opened += 1
        context.add_done_callback(self._stream_closed)

    def _stream_closed(self, _context: object) -> None:
        self.streams_open -= 1
