"""The device service's Prometheus collector: reads ``bus.stats`` and the host's consoles at scrape time.

A custom collector so that an access costs one Counter increment in ``dispatch`` and nothing more;
see docs/metrics.md for the table of metrics.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from device_service.bus import DeviceBus
from mmiosplit.metrics import histogram_family

if TYPE_CHECKING:
    from device_service.host import DeviceHost
    from device_service.server import DeviceServicer


class DeviceCollector(Collector):
    """Yields one device service's metrics; consoles appear once the servicer is attached."""

    def __init__(self, bus: DeviceBus) -> None:
        self.bus = bus
        self.host: DeviceHost | None = None

    def attach(self, servicer: DeviceServicer) -> None:
        """Also report what only the device host knows (its name, console bytes)."""
        self.host = servicer.host

    def collect(self) -> Iterator[Metric]:
        stats = self.bus.stats
        # Copies first: the event loop keeps counting while the scrape runs on the HTTP thread.
        accesses = dict(stats.accesses)
        errors = dict(stats.errors)

        family = CounterMetricFamily(
            "mmiosplit_device_accesses",
            "Accesses the device models handled, by device, region and kind (read or write; posted writes "
            "count as writes). Device and region are empty for an address no region covers.",
            labels=["device", "region", "kind"])
        for (device, region, kind), n in sorted(accesses.items()):
            family.add_metric([device, region, kind], n)
        yield family

        family = CounterMetricFamily(
            "mmiosplit_device_errors", "Accesses that did not complete OK, by device and outcome.",
            labels=["device", "outcome"])
        for (device, outcome), n in sorted(errors.items()):
            family.add_metric([device, outcome], n)
        yield family

        family = CounterMetricFamily("mmiosplit_device_posted_writes", "Posted writes received in batches.")
        family.add_metric([], stats.posted_writes)
        yield family
        yield histogram_family("mmiosplit_device_posted_batch_writes", "Posted writes per batch received.",
                               stats.posted_batches.snapshot())
        if stats.handling is not None:
            yield histogram_family(
                "mmiosplit_device_access_handling_seconds",
                "Time to handle one access in the device service (decode, checks and the device model), "
                "not counting gRPC.", stats.handling.snapshot(), divisor=1e9)

        gauge = GaugeMetricFamily("mmiosplit_device_exit_streams", "Exit streams open (one per vCPU per VM).")
        gauge.add_metric([], stats.streams_open)
        yield gauge
        family = CounterMetricFamily("mmiosplit_device_exit_streams_opened", "Exit streams opened (handshakes).")
        family.add_metric([], stats.streams_opened)
        yield family

        host = self.host
        if host is None:
            return
        family = CounterMetricFamily(
            "mmiosplit_device_console_bytes",
            "Bytes through UART consoles: out = transmitted by the guest, in = fed to it by console clients.",
            labels=["device", "direction"])
        for name, hub in sorted(host.consoles.items()):
            family.add_metric([name, "in"], hub.bytes_in)
            family.add_metric([name, "out"], hub.bytes_out)
        yield family
        info = GaugeMetricFamily("mmiosplit_device_service_info", "The service name reported to vcpu services.",
                                 labels=["service"])
        info.add_metric([host.service_name], 1.0)
        yield info
