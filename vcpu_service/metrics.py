"""The vcpu service's Prometheus collector: reads ``MetricsSnapshot`` at scrape time.

A custom collector rather than prometheus_client Counters so the exit path keeps its plain integer
increments: a labelled Counter.inc() takes a lock and a dict lookup per exit, this costs nothing
until someone scrapes. See docs/metrics.md for the table of metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mmiosplit.metrics import histogram_family
from vcpu_service.totals import MetricsSnapshot, vcpu_state_name
from vcpu_service.vcpu import VcpuState

if TYPE_CHECKING:
    from vcpu_service.server import VcpuServicer

VM_STATES = ("created", "running", "paused", "finished")


class VcpuCollector(Collector):
    """Yields the vcpu service's metrics from a snapshot source (the servicer, once it exists)."""

    def __init__(self, source: Callable[[], MetricsSnapshot] | None = None) -> None:
        self._source = source

    def attach(self, servicer: VcpuServicer) -> None:
        """Read this servicer from now on (the server creates it after the metrics port is bound)."""
        self._source = servicer.metrics_snapshot

    def collect(self) -> Iterator[Metric]:
        if self._source is None:
            return
        snap = self._source()
        t = snap.totals

        exits = CounterMetricFamily(
            "mmiosplit_vcpu_exits", "Trapped device accesses handled by vCPUs, by device, region and kind.",
            labels=["device", "region", "kind"])
        for (device, region, kind), n in sorted(t.exits.items()):
            exits.add_metric([device, region, kind], n)
        yield exits

        yield histogram_family(
            "mmiosplit_vcpu_exit_latency_seconds",
            "Time from the trap to the completion of exits answered by a device service (reads and writes, "
            "not posted writes).", t.latency, divisor=1e9)
        yield histogram_family(
            "mmiosplit_vcpu_posted_batch_writes", "Posted writes per batch sent to a device service.",
            snap.posted_batches)

        aborts = CounterMetricFamily(
            "mmiosplit_vcpu_external_aborts", "Synchronous external aborts injected into guests.")
        aborts.add_metric([], t.external_aborts)
        yield aborts

        errors = CounterMetricFamily(
            "mmiosplit_vcpu_vm_errors", "VM runs that ended in an error, by error kind.", labels=["error_kind"])
        for kind, n in sorted(t.vm_errors.items()):
            errors.add_metric([kind], n)
        yield errors

        unhandled = CounterMetricFamily(
            "mmiosplit_vcpu_kvm_unhandled_accesses",
            "Device accesses upstream KVM/ARM could not handle (ISV=0): decoded by hand, or refused.",
            labels=["outcome"])
        for outcome in ("decoded", "refused"):
            unhandled.add_metric([outcome], t.kvm_unhandled.get(outcome, 0))
        yield unhandled

        psci = CounterMetricFamily("mmiosplit_vcpu_psci_calls", "PSCI calls (HVC) made by guests.")
        psci.add_metric([], t.psci_calls)
        yield psci

        created = CounterMetricFamily("mmiosplit_vcpu_vms_created", "VMs created since the service started.")
        created.add_metric([], t.vms)
        yield created

        vms = GaugeMetricFamily("mmiosplit_vcpu_vms", "VMs not yet deleted, by run state.", labels=["state"])
        for state in VM_STATES:
            vms.add_metric([state], snap.vm_states.get(state, 0))
        yield vms

        states = GaugeMetricFamily(
            "mmiosplit_vcpu_state", "1 for the state each vCPU is in, 0 for the others.",
            labels=["vm", "vcpu", "state"])
        names = [vcpu_state_name(s) for s in VcpuState]
        for vm_id, index, current in snap.vcpu_states:
            for name in names:
                states.add_metric([vm_id, str(index), name], 1.0 if name == current else 0.0)
        yield states
