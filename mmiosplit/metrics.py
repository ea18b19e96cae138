"""Prometheus metrics over HTTP for both services (``--metrics-port``), and what their collectors share.

Each service has its own ``CollectorRegistry`` holding one custom collector that reads the service's
existing counters at scrape time, plus the standard process metrics; nothing is recorded on the exit
path for Prometheus. Imported only when metrics are asked for (prometheus_client takes a while to load).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from mmiosplit.buckets import BucketSnapshot

DEFAULT_METRICS_HOST = "127.0.0.1"


class MetricsError(Exception):
    """The metrics endpoint cannot be started; the message names the option at fault."""


@dataclass
class MetricsServer:
    """A running metrics endpoint: where it is, and how to stop it (tests; services just exit)."""

    url: str
    port: int
    registry: CollectorRegistry
    server: WSGIServer

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/metrics"


def serve_metrics(collector: Collector, host: str, port: int, process_metrics: bool = True) -> MetricsServer:
    """Serve collector (and process_* metrics) on host:port from a daemon thread; port 0 picks a free one."""
    if not 0 <= port <= 65535:
        raise MetricsError(f"--metrics-port {port} is out of range (0-65535; 0 picks a free port)")
    registry = CollectorRegistry()
    registry.register(collector)
    if process_metrics:
        ProcessCollector(registry=registry)
    try:
        server, _thread = start_http_server(port, host, registry=registry)
    except socket.gaierror as exc:
        raise MetricsError(f"--metrics-host {host!r}: cannot resolve it: {exc.strerror or exc}") from None
    except (OSError, OverflowError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise MetricsError(f"--metrics-port {port}: cannot listen on {host}:{port}: {reason}") from None
    bound = int(server.server_port)
    return MetricsServer(_url(host, bound), bound, registry, server)


def histogram_family(name: str, documentation: str, snap: BucketSnapshot, divisor: float = 1.0,
                     labels: dict[str, str] | None = None) -> HistogramMetricFamily:
    """A Prometheus histogram from fixed buckets; divisor converts units (1e9: nanoseconds to seconds)."""
    cumulative = snap.cumulative()
    buckets = [(floatToGoString(bound / divisor), float(n)) for bound, n in zip(snap.bounds, cumulative, strict=False)]
    buckets.append(("+Inf", float(cumulative[-1])))
    family = HistogramMetricFamily(name, documentation, labels=list(labels) if labels else None)
    family.add_metric(list(labels.values()) if labels else [], buckets, snap.sum / divisor)
    return family
