"""What the vcpu service's metrics report, gathered from counters the service keeps anyway.

Nothing here runs on the exit path: the vCPUs only bump plain integers (``ExitStats``) and record
into their latency HdrHistogram; this module reads those at scrape time. The one exception is
``transport.POSTED_BATCH_SIZES``, recorded once per posted batch (not per write). Counters are service-wide and
survive VM deletion: the server folds a deleted VM's totals into its retired totals, so Prometheus
counters never go backwards. No prometheus_client import here, so a service without
``--metrics-port`` never loads it.
"""

from __future__ import annotations

import collections
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mmiosplit.buckets import POSTED_BATCH_BOUNDS, BucketSnapshot
from vcpu_service.domain import EventKind
from vcpu_service.exits import release_histogram

if TYPE_CHECKING:
    from hdrh.histogram import HdrHistogram

    from vcpu_service.vcpu import VcpuState
    from vcpu_service.vm import Vm

# Exit latency buckets, nanoseconds: 10 us to 1 s (a local exit is tens of us, a gRPC one about a ms).
LATENCY_BOUNDS_NS: tuple[int, ...] = (
    10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000, 25_000_000, 50_000_000,
    100_000_000, 250_000_000, 500_000_000, 1_000_000_000,
)

# Exit kinds whose counts come from ExitStats.by_region: every such exit has a device region.
REGION_KINDS = ("read", "write", "posted_write")
# Kinds counted only in aggregate (ExitStats attribute); reported with device="" and region="" unless
# ExitStats.by_region carries that kind too, in which case by_region is used for it.
AGGREGATE_KINDS = {"shadow_read": "shadow_reads", "nop": "nops", "abort": "aborts"}


def vcpu_state_name(state: VcpuState) -> str:
    """A label value: ``VcpuState.EXIT_WAIT`` -> ``exit_wait``."""
    return state.name.lower()


def hdr_buckets(hist: HdrHistogram, bounds_ns: Sequence[int] = LATENCY_BOUNDS_NS) -> BucketSnapshot:
    """Per-bucket counts of an HdrHistogram of nanoseconds, and its sum.

    A value counts as <= a bound when the lowest value of its HdrHistogram bucket is, so a value within
    the histogram's precision (3 significant digits) above a bound counts in that bound's bucket. The
    sum adds each value's bucket midpoint, as HdrHistogram's mean does. Only the counts between the
    minimum and the maximum are read, by slices and C-level sums (a scrape should not hog the GIL the
    vCPU threads need): per Prometheus bucket, and per HdrHistogram bucket for the sum, where values are
    evenly spaced.
    """
    bounds = tuple(bounds_ns)
    counts = [0] * (len(bounds) + 1)
    if hist.get_total_count() == 0:
        return BucketSnapshot(bounds, tuple(counts), 0)
    arr = hist.counts
    lo = hist.get_counts_array_index(hist.get_min_value())
    hi = min(hist.get_counts_array_index(hist.get_max_value()), hist.counts_len - 1)
    start = lo
    for n, bound in enumerate(bounds):
        end = min(hist.get_counts_array_index(bound), hi)  # index i <= end  <=>  lowest value of i <= bound
        if end >= start:
            counts[n] = sum(arr[start:end + 1])
            start = end + 1
    if start <= hi:
        counts[-1] = sum(arr[start:hi + 1])
    # The first sub_bucket_count indices share one unit; after them, each run of sub_bucket_half_count does.
    full, half = hist.sub_bucket_count, hist.sub_bucket_half_count
    total = 0
    i = lo
    while i <= hi:
        e = min(full - 1 if i < full else i + half - 1 - (i - full) % half, hi)
        segment = arr[i:e + 1]
        c = sum(segment)
        if c:
            v0 = hist.get_value_from_index(i)
            unit = hist.get_highest_equivalent_value(v0) + 1 - v0
            total += (v0 + (unit >> 1)) * c + unit * sum(map(operator.mul, segment, range(len(segment))))
        i = e + 1
    return BucketSnapshot(bounds, tuple(counts), total)


@dataclass
class VmTotals:
    """Counters summed over vCPUs and VMs: what the service-wide Prometheus counters show."""

    vms: int = 0
    exits: collections.Counter[tuple[str, str, str]] = field(default_factory=collections.Counter)
    external_aborts: int = 0
    psci_calls: int = 0
    kvm_unhandled: collections.Counter[str] = field(default_factory=collections.Counter)
    vm_errors: collections.Counter[str] = field(default_factory=collections.Counter)
    latency: BucketSnapshot = field(default_factory=lambda: BucketSnapshot.empty(LATENCY_BOUNDS_NS))

    def add(self, other: VmTotals) -> None:
        self.vms += other.vms
        self.exits.update(other.exits)
        self.external_aborts += other.external_aborts
        self.psci_calls += other.psci_calls
        self.kvm_unhandled.update(other.kvm_unhandled)
        self.vm_errors.update(other.vm_errors)
        self.latency = self.latency.merged(other.latency)

    def copy(self) -> VmTotals:
        out = VmTotals()
        out.add(self)
        return out


def vm_totals(vm: Vm) -> VmTotals:
    """Read one VM's counters (running or stopped); safe against the vCPU threads updating them."""
    t = VmTotals(vms=1)
    for v in vm.vcpus:
        st = v.exits.stats
        # Aggregates first, by_region after: a vCPU bumps by_region no later than the aggregate.
        aggregates = {kind: getattr(st, attr) for kind, attr in AGGREGATE_KINDS.items()}
        by_region = dict(st.by_region)  # one C-level copy under the GIL, safe while the vCPU inserts keys
        t.exits.update(by_region)
        attributed = {kind for _, _, kind in by_region}
        for kind, count in aggregates.items():
            if count and kind not in attributed:
                t.exits["", "", kind] += count
        t.external_aborts += st.aborts
        t.psci_calls += v.psci_calls
        for entry in list(st.kvm_report.values()):
            t.kvm_unhandled["decoded" if entry.handled else "refused"] += entry.count
        snapshot = v.latency_snapshot()
        t.latency = t.latency.merged(hdr_buckets(snapshot))
        release_histogram(snapshot)
    final = vm.events.final
    if final is not None and final.kind is EventKind.ERROR:
        t.vm_errors[final.error_kind.value] += 1
    return t


@dataclass
class MetricsSnapshot:
    """Everything the vcpu service's collector reports, read at one scrape."""

    totals: VmTotals
    # (vm id, vCPU index, state name) of every vCPU of every VM not yet deleted.
    vcpu_states: list[tuple[str, int, str]] = field(default_factory=list)
    # VMs not yet deleted, by run state (created, running, paused, finished).
    vm_states: collections.Counter[str] = field(default_factory=collections.Counter)
    posted_batches: BucketSnapshot = field(default_factory=lambda: BucketSnapshot.empty(POSTED_BATCH_BOUNDS))
