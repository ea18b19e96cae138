"""Prometheus metrics over HTTP for both services (``--metrics-port``): the endpoint the command line starts.

The collectors are the services' own (``vcpu_service/metrics.py``, ``device_service/metrics.py``); this
serves one of them, with the standard process metrics, from a daemon thread.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

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
