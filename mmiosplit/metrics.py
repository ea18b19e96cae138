"""What both services' Prometheus collectors share: fixed buckets as a Prometheus histogram family.

Each service has its own ``CollectorRegistry`` holding one custom collector that reads the service's
existing counters at scrape time, plus the standard process metrics; nothing is recorded on the exit
path for Prometheus. The HTTP endpoint that serves them (``--metrics-port``) is the command line's,
``mmiosplit_cli/metrics.py``. Imported only when metrics are asked for (prometheus_client takes a while to load).
"""

from __future__ import annotations

from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from mmiosplit.buckets import BucketSnapshot


def histogram_family(name: str, documentation: str, snap: BucketSnapshot, divisor: float = 1.0,
                     labels: dict[str, str] | None = None) -> HistogramMetricFamily:
    """A Prometheus histogram from fixed buckets; divisor converts units (1e9: nanoseconds to seconds)."""
    cumulative = snap.cumulative()
    buckets = [(floatToGoString(bound / divisor), float(n)) for bound, n in zip(snap.bounds, cumulative, strict=False)]
    buckets.append(("+Inf", float(cumulative[-1])))
    family = HistogramMetricFamily(name, documentation, labels=list(labels) if labels else None)
    family.add_metric(list(labels.values()) if labels else [], buckets, snap.sum / divisor)
    return family
