"""The metrics collectors on known inputs, read back through Prometheus' own text format and parser."""

from __future__ import annotations

import argparse
import bisect
import collections
import random
import re
import socket
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hdrh.histogram import HdrHistogram
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from device_service.config import build_bus, parse_device_specs
from device_service.dispatch import dispatch
from device_service.metrics import DeviceCollector
from device_service.server import DeviceServicer
from mmiosplit.buckets import POSTED_BATCH_BOUNDS, BucketSnapshot, FixedHistogram
from mmiosplit.metrics import histogram_family
from mmiosplit_cli import cli
from mmiosplit_cli.metrics import MetricsError, serve_metrics
from vcpu_service.domain import ErrorKind, EventKind, VmEvent
from vcpu_service.exits import ExitStats, KvmReportEntry
from vcpu_service.metrics import VcpuCollector
from vcpu_service.totals import LATENCY_BOUNDS_NS, MetricsSnapshot, VmTotals, hdr_buckets, vm_totals
from vcpu_service.vcpu import VcpuState

ROOT = Path(__file__).resolve().parents[2]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(collector: Collector) -> Samples:
    """What a Prometheus server would read: the text exposition, parsed by prometheus_client's parser."""
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


def buckets(samples: Samples, name: str) -> dict[str, float]:
    return {dict(labels)["le"]: v for (n, labels), v in samples.items() if n == name + "_bucket"}


def ns_hist(*values: int) -> HdrHistogram:
    hist = HdrHistogram(1, 60_000_000_000, 3)  # what every vCPU keeps
    for v in values:
        hist.record_value(v)
    return hist


# ----- HdrHistogram -> Prometheus buckets ---------------------------------------------------------------------
def test_hdr_histogram_becomes_cumulative_buckets_in_seconds() -> None:
    # 5 us; exactly 10 us (a bound: le is <=); 3 x 50 us; 2 ms; 3 s (over the last bound, 1 s).
    values = [5_000, 10_000, 50_000, 50_000, 50_000, 2_000_000, 3_000_000_000]
    snap = hdr_buckets(ns_hist(*values))
    assert snap.bounds == LATENCY_BOUNDS_NS and snap.count == 7
    expected_le_us = {10: 2, 25: 2, 50: 5, 100: 5, 250: 5, 500: 5, 1000: 5, 2500: 6, 5000: 6, 1_000_000: 6}
    cumulative = dict(zip(snap.bounds, snap.cumulative(), strict=False))
    for bound_us, count in expected_le_us.items():
        assert cumulative[bound_us * 1000] == count, bound_us
    assert snap.cumulative()[-1] == 7
    # The sum is HdrHistogram's: each value to 3 significant digits.
    assert snap.sum == pytest.approx(sum(values), rel=1e-3)

    samples = scrape(_Families(histogram_family("t_latency_seconds", "test", snap, divisor=1e9)))
    b = buckets(samples, "t_latency_seconds")
    assert b["1e-05"] == 2 and b["5e-05"] == 5 and b["0.0025"] == 6 and b["1.0"] == 6 and b["+Inf"] == 7
    assert list(b)[:3] == ["1e-05", "2.5e-05", "5e-05"] and len(b) == len(LATENCY_BOUNDS_NS) + 1
    assert value(samples, "t_latency_seconds_count") == 7
    assert value(samples, "t_latency_seconds_sum") == pytest.approx(sum(values) / 1e9, rel=1e-3)


def test_values_within_hdr_precision_above_a_bound_count_as_at_the_bound() -> None:
    # 1,000,100 ns shares HdrHistogram's bucket (999,936-1,000,447 ns) with 1,000,000; 1,000,500 does not.
    snap = hdr_buckets(ns_hist(1_000_100, 1_000_500))
    cumulative = dict(zip(snap.bounds, snap.cumulative(), strict=False))
    assert cumulative[1_000_000] == 1 and cumulative[2_500_000] == 2


def _reference_buckets(hist: HdrHistogram, bounds: tuple[int, ...]) -> tuple[list[int], int]:
    """The same conversion the slow, obvious way: every recorded value by HdrHistogram's own iterator."""
    counts = [0] * (len(bounds) + 1)
    total = 0
    for item in hist.get_recorded_iterator():
        low = hist.get_lowest_equivalent_value(item.value_iterated_to)
        counts[bisect.bisect_left(bounds, low)] += item.count_at_value_iterated_to
        total += item.count_at_value_iterated_to * hist._hdr_median_equiv_value(item.value_iterated_to)
    return counts, total


@pytest.mark.parametrize("seed", range(5))
def test_hdr_conversion_agrees_with_hdr_histograms_own_iterator(seed: int) -> None:
    rng = random.Random(seed)
    values = [int(rng.lognormvariate(13.5, 1.5)) + 1 for _ in range(3000)] + [rng.randrange(1, 3000) for _ in range(50)]
    hist = ns_hist(*values, *LATENCY_BOUNDS_NS)
    snap = hdr_buckets(hist)
    assert (list(snap.counts), snap.sum) == _reference_buckets(hist, LATENCY_BOUNDS_NS)
    assert snap.count == len(values) + len(LATENCY_BOUNDS_NS)


def test_empty_hdr_histogram() -> None:
    snap = hdr_buckets(ns_hist())
    assert snap.count == 0 and snap.sum == 0 and len(snap.counts) == len(LATENCY_BOUNDS_NS) + 1


# ----- fixed buckets ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("thread_safe", [True, False])
def test_fixed_histogram_puts_a_value_in_the_first_bound_it_does_not_exceed(thread_safe: bool) -> None:
    hist = FixedHistogram(POSTED_BATCH_BOUNDS, thread_safe=thread_safe)
    for n in (1, 2, 3, 4, 256, 300, 1500):
        hist.record(n)
    snap = hist.snapshot()
    assert dict(zip(snap.bounds, snap.cumulative(), strict=False)) == {
        1: 1, 2: 2, 4: 4, 8: 4, 16: 4, 32: 4, 64: 4, 128: 4, 256: 5, 512: 6, 1024: 6}
    assert snap.cumulative()[-1] == 7 and snap.sum == 2066
    assert snap.merged(snap).cumulative()[-1] == 14 and snap.merged(snap).sum == 4132
    with pytest.raises(ValueError, match="merge"):
        snap.merged(BucketSnapshot.empty((1, 2)))
    with pytest.raises(ValueError, match="increasing"):
        FixedHistogram((4, 2))


# ----- the vcpu service's collector ---------------------------------------------------------------------------
class _Families:
    """A collector that yields fixed metric families."""

    def __init__(self, *families: object) -> None:
        self.families = families

    def collect(self):  # type: ignore[no-untyped-def]
        yield from self.families


def test_vcpu_collector_reports_a_snapshot() -> None:
    totals = VmTotals(vms=3, external_aborts=2, psci_calls=7)
    totals.exits.update({("uart0", "regs", "read"): 10, ("uart0", "regs", "write"): 12,
                         ("posted0", "mem", "posted_write"): 300, ("", "", "nop"): 1})
    totals.vm_errors["unmapped_access"] = 1
    totals.kvm_unhandled["decoded"] = 3
    totals.latency = hdr_buckets(ns_hist(*[800_000] * 21, 30_000_000))
    posted = FixedHistogram(POSTED_BATCH_BOUNDS)
    posted.record(256)
    posted.record(44)
    snap = MetricsSnapshot(totals, vcpu_states=[("vm1", 0, "running"), ("vm1", 1, "exit_wait")],
                           vm_states=collections.Counter({"running": 1}), posted_batches=posted.snapshot())
    s = scrape(VcpuCollector(lambda: snap))

    assert value(s, "mmiosplit_vcpu_exits_total", device="uart0", region="regs", kind="read") == 10
    assert value(s, "mmiosplit_vcpu_exits_total", device="uart0", region="regs", kind="write") == 12
    assert value(s, "mmiosplit_vcpu_exits_total", device="posted0", region="mem", kind="posted_write") == 300
    assert value(s, "mmiosplit_vcpu_exits_total", device="", region="", kind="nop") == 1
    lat = buckets(s, "mmiosplit_vcpu_exit_latency_seconds")
    assert lat["0.0005"] == 0 and lat["0.001"] == 21 and lat["0.025"] == 21 and lat["0.05"] == 22
    assert lat["+Inf"] == 22 and value(s, "mmiosplit_vcpu_exit_latency_seconds_count") == 22
    assert value(s, "mmiosplit_vcpu_exit_latency_seconds_sum") == pytest.approx(0.0468, rel=1e-3)
    batches = buckets(s, "mmiosplit_vcpu_posted_batch_writes")
    assert batches["32.0"] == 0 and batches["64.0"] == 1 and batches["256.0"] == 2
    assert value(s, "mmiosplit_vcpu_posted_batch_writes_sum") == 300
    assert value(s, "mmiosplit_vcpu_external_aborts_total") == 2
    assert value(s, "mmiosplit_vcpu_vm_errors_total", error_kind="unmapped_access") == 1
    assert value(s, "mmiosplit_vcpu_kvm_unhandled_accesses_total", outcome="decoded") == 3
    assert value(s, "mmiosplit_vcpu_kvm_unhandled_accesses_total", outcome="refused") == 0
    assert value(s, "mmiosplit_vcpu_psci_calls_total") == 7
    assert value(s, "mmiosplit_vcpu_vms_created_total") == 3
    assert value(s, "mmiosplit_vcpu_vms", state="running") == 1
    assert value(s, "mmiosplit_vcpu_vms", state="finished") == 0
    states = {dict(labels)["state"]: v for (n, labels), v in s.items()
              if n == "mmiosplit_vcpu_state" and dict(labels)["vcpu"] == "1"}
    assert states == {st.name.lower(): (1.0 if st is VcpuState.EXIT_WAIT else 0.0) for st in VcpuState}


def test_vcpu_collector_before_the_servicer_exists_reports_nothing() -> None:
    assert scrape(VcpuCollector()) == {}


@dataclass
class _Path:
    stats: ExitStats


@dataclass
class _Vcpu:
    exits: _Path
    latency: HdrHistogram
    psci_calls: int = 0

    def latency_snapshot(self) -> HdrHistogram:
        return self.latency


@dataclass
class _Events:
    final: VmEvent | None = None


@dataclass
class _Vm:
    vcpus: list[_Vcpu]
    events: _Events = field(default_factory=_Events)


def test_vm_totals_sum_vcpus_and_report_unattributed_kinds_without_a_region() -> None:
    a, b = ExitStats(reads=2, writes=1, nops=4, aborts=1), ExitStats(reads=1, shadow_reads=5)
    a.by_region.update({("uart0", "regs", "read"): 2, ("uart0", "regs", "write"): 1})
    b.by_region.update({("uart0", "regs", "read"): 1, ("rtc0", "regs", "shadow_read"): 5})
    a.kvm_report[(0x1000, 0xB8404401)] = KvmReportEntry(0x1000, "A64", 0xB8404401, "writeback", True, count=3)
    error = VmEvent(1, EventKind.ERROR, 0.0, error_kind=ErrorKind.DEADLINE)
    vm = _Vm([_Vcpu(_Path(a), ns_hist(20_000, 30_000, 40_000), psci_calls=1),
              _Vcpu(_Path(b), ns_hist(20_000), psci_calls=2)], _Events(error))
    t = vm_totals(vm)  # type: ignore[arg-type]
    assert t.exits == {("uart0", "regs", "read"): 3, ("uart0", "regs", "write"): 1, ("", "", "nop"): 4,
                       ("", "", "abort"): 1, ("rtc0", "regs", "shadow_read"): 5}
    assert (t.vms, t.external_aborts, t.psci_calls) == (1, 1, 3)
    assert t.kvm_unhandled == {"decoded": 3} and t.vm_errors == {"deadline": 1}
    assert t.latency.count == 4 and t.latency.cumulative()[1] == 2  # le 25 us
    both = t.copy()
    both.add(t)
    assert both.exits[("uart0", "regs", "read")] == 6 and both.vms == 2 and both.latency.count == 8
    assert t.vms == 1  # copy() left the original alone


# ----- the device service's collector -------------------------------------------------------------------------
def test_device_collector_counts_accesses_errors_batches_streams_and_consoles() -> None:
    bus = build_bus(parse_device_specs(["pl011@0x09000000,name=uart0", "scratch@0x0a000000,size=0x1000,name=s0"]))
    bus.stats.enable_timing()
    servicer = DeviceServicer(bus, "devs")
    collector = DeviceCollector(bus)
    collector.attach(servicer)
    assert dispatch(bus, 0x0A00_0000, 4, True, b"\x01\x02\x03\x04")[0].status.value == "ok"
    dispatch(bus, 0x0A00_0000, 4, False, b"")
    dispatch(bus, 0x0A00_0004, 2, False, b"")
    dispatch(bus, 0x0A00_0FFE, 4, False, b"")  # straddles the end: a device error
    dispatch(bus, 0x0B00_0000, 4, False, b"")  # nothing there
    dispatch(bus, 0x0A00_0000, 3, False, b"")  # not a bus size
    bus.stats.posted_batch(256)
    bus.stats.posted_batch(3)

    class Context:
        def __init__(self) -> None:
            self.callbacks: list[object] = []

        def add_done_callback(self, cb: object) -> None:
            self.callbacks.append(cb)

    ctx = Context()
    bus.stats.stream_opened(ctx)
    bus.stats.stream_opened(ctx)
    ctx.callbacks[0](ctx)  # type: ignore[operator]
    hub = servicer.host.consoles["uart0"]
    hub.feed(b"hi")
    hub._on_output(b"hello\n")

    s = scrape(collector)
    assert value(s, "mmiosplit_device_accesses_total", device="s0", region="mem", kind="write") == 1
    assert value(s, "mmiosplit_device_accesses_total", device="s0", region="mem", kind="read") == 4
    assert value(s, "mmiosplit_device_accesses_total", device="", region="", kind="read") == 1
    assert value(s, "mmiosplit_device_errors_total", device="s0", outcome="device_error") == 1
    assert value(s, "mmiosplit_device_errors_total", device="s0", outcome="bad_request") == 1
    assert value(s, "mmiosplit_device_errors_total", device="", outcome="no_device") == 1
    assert value(s, "mmiosplit_device_posted_writes_total") == 259
    batches = buckets(s, "mmiosplit_device_posted_batch_writes")
    assert batches["2.0"] == 0 and batches["4.0"] == 1 and batches["256.0"] == 2 and batches["+Inf"] == 2
    assert value(s, "mmiosplit_device_access_handling_seconds_count") == 6
    assert value(s, "mmiosplit_device_exit_streams") == 1
    assert value(s, "mmiosplit_device_exit_streams_opened_total") == 2
    assert value(s, "mmiosplit_device_console_bytes_total", device="uart0", direction="in") == 2
    assert value(s, "mmiosplit_device_console_bytes_total", device="uart0", direction="out") == 6
    assert value(s, "mmiosplit_device_service_info", service="devs") == 1


def test_device_accesses_are_not_timed_until_metrics_are_on() -> None:
    bus = build_bus(parse_device_specs(["scratch@0x0a000000,size=0x1000"]))
    dispatch(bus, 0x0A00_0000, 4, False, b"")
    s = scrape(DeviceCollector(bus))
    assert not any(name.startswith("mmiosplit_device_access_handling") for name, _ in s)
    assert sum(v for (name, _), v in s.items() if name == "mmiosplit_device_accesses_total") == 1


# ----- the HTTP endpoint and its options ----------------------------------------------------------------------
def test_metrics_endpoint_on_a_free_port_serves_the_collector() -> None:
    server = serve_metrics(VcpuCollector(lambda: MetricsSnapshot(VmTotals(vms=1))), "127.0.0.1", 0)
    try:
        assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}/metrics"
        text = urllib.request.urlopen(server.url, timeout=10).read().decode()
    finally:
        server.close()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert "mmiosplit_vcpu_vms_created" in names and "process_cpu_seconds" in names


def test_metrics_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(MetricsError, match=rf"--metrics-port {port}: cannot listen on 127.0.0.1:{port}: "):
            serve_metrics(VcpuCollector(), "127.0.0.1", port)


def test_bad_metrics_host_and_port_name_the_option() -> None:
    with pytest.raises(MetricsError, match=re.escape("--metrics-host 'no.such.host.invalid'")):
        serve_metrics(VcpuCollector(), "no.such.host.invalid", 0)
    with pytest.raises(MetricsError, match="--metrics-port 70000 is out of range"):
        serve_metrics(VcpuCollector(), "127.0.0.1", 70000)


@pytest.mark.parametrize("command", [["serve-vcpu"], ["serve-devices", "--device", "scratch@0x0a000000"]])
@pytest.mark.parametrize("port", ["70000", "-1", "http"])
def test_cli_refuses_a_bad_metrics_port(capsys: pytest.CaptureFixture[str], command: list[str], port: str) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main([*command, "--listen", "unix:/tmp/unused.sock", "--metrics-port", port])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --metrics-port" in err and "Traceback" not in err


@pytest.mark.parametrize("command", [["serve-vcpu"], ["serve-devices", "--device", "scratch@0x0a000000"]])
def test_cli_metrics_port_in_use_exits_2_before_serving(capsys: pytest.CaptureFixture[str],
                                                        command: list[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        status = cli.main([*command, "--listen", "unix:/tmp/unused.sock", "--metrics-port", str(port)])
    assert status == 2
    err = capsys.readouterr().err
    assert f"mmiosplit {command[0]}: --metrics-port {port}: cannot listen" in err and "in use" in err


def test_run_refuses_a_metrics_port_without_room_for_the_device_service(capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(["run", str(ROOT / "guests" / "bin" / "hello-a64.bin"), "--metrics-port", "65535"])
    assert status == 2
    assert "--metrics-port 65535: the device service would get port 65536" in capsys.readouterr().err


def test_port_type() -> None:
    assert cli._port("0") == 0 and cli._port("9464") == 9464
    with pytest.raises(argparse.ArgumentTypeError, match="out of range"):
        cli._port("65536")
