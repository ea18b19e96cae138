"""Prometheus metrics of both services as real subprocesses, scraped over HTTP and checked against GetStats."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mmiosplit.v1 import vcpu_pb2
from mmiosplit_cli.demo import GUESTS
from mmiosplit_cli.launcher import local_services
from mmiosplit_cli.runner import run_vm
from tests.integration.client import Services, a64, a64_with_vectors
from tests.integration.conftest import DEVICES, ROOT
from tests.integration.test_run_control import POSTED, SPIN, SYSTEM_OFF

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
UNMAPPED_LOAD = [0xD2A40000, 0xB9400001]  # mov x0, #0x20000000 (nothing there); ldr w1, [x0]


@dataclass
class Metered:
    services: Services
    vcpu_url: str
    device_url: str

    def scrape(self) -> tuple[Samples, Samples]:
        return _scrape(self.vcpu_url), _scrape(self.device_url)


def _scrape(url: str) -> Samples:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _sum(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of name whose labels include labels."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)


def _delta(after: Samples, before: Samples) -> Samples:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


@pytest.fixture(scope="module")
def metered() -> Iterator[Metered]:
    """Both services with metrics on free ports (the URLs are read from what they print)."""
    args = [a for d in DEVICES for a in ("--device", d)]
    with local_services(args, metrics_port=0) as (vaddr, daddr, handle):
        assert vaddr and daddr
        urls = handle.metrics_urls()
        yield Metered(Services(vaddr, daddr, handle), urls["vcpu service"], urls["device service"])


def test_exit_counters_match_get_stats(metered: Metered) -> None:
    svc = metered.services
    vcpu0, dev0 = metered.scrape()
    stats: list[vcpu_pb2.GetStatsResponse] = []

    # The A64 hello guest on 2 vCPUs (UART, RTC, scratch); run_vm deletes the VM, so its counts must survive it.
    hello = run_vm(svc.vcpu, GUESTS[0].config(svc.devices, 2))
    assert hello.exit_status == 0
    stats.append(hello.stats)
    # Four posted stores (one batch, sent with the next exit), then two loads.
    vm_id, final = svc.run(svc.config(a64(*POSTED)))
    stats.append(svc.stats(vm_id))
    svc.delete(vm_id)
    assert final.kind == vcpu_pb2.VM_EVENT_KIND_POWERED_OFF
    # An unmapped load under the abort policy: the guest's vector powers off.
    cfg = svc.config(a64_with_vectors(*UNMAPPED_LOAD))
    cfg.policies.unmapped_access = vcpu_pb2.UNMAPPED_ACCESS_POLICY_ABORT
    vm_id, final = svc.run(cfg)
    stats.append(svc.stats(vm_id))
    svc.delete(vm_id)
    assert final.kind == vcpu_pb2.VM_EVENT_KIND_POWERED_OFF
    # The same load under the stop policy: the run ends in an error.
    cfg = svc.config(a64(*UNMAPPED_LOAD, *SYSTEM_OFF))
    cfg.policies.unmapped_access = vcpu_pb2.UNMAPPED_ACCESS_POLICY_STOP
    vm_id, final = svc.run(cfg)
    stats.append(svc.stats(vm_id))
    svc.delete(vm_id)
    assert final.error_kind == vcpu_pb2.VM_ERROR_KIND_UNMAPPED_ACCESS

    vcpu1, dev1 = metered.scrape()
    v, d = _delta(vcpu1, vcpu0), _delta(dev1, dev0)
    per_vcpu = [vs for s in stats for vs in s.vcpus]
    reads, writes = sum(x.reads for x in per_vcpu), sum(x.writes for x in per_vcpu)
    posted, aborts = sum(x.posted_writes for x in per_vcpu), sum(x.external_aborts for x in per_vcpu)
    shadow = sum(x.shadow_reads for x in per_vcpu)
    assert reads > 1000 and writes > 1000 and posted == 4 and aborts == 1
    assert sum(s.exits for s in stats) == reads + writes

    # The vcpu service: exits by kind and by device, latency, posted batches, aborts, errors, VMs.
    exits = "mmiosplit_vcpu_exits_total"
    assert _sum(v, exits, kind="read") == reads
    assert _sum(v, exits, kind="write") == writes
    assert _sum(v, exits, kind="posted_write") == posted
    assert _sum(v, exits, device="posted0", region="mem", kind="posted_write") == 4
    assert _sum(v, exits, kind="abort") == aborts
    assert _sum(v, exits, kind="shadow_read") == shadow  # reads answered from shadow registers, no exit
    assert _sum(v, exits, device="", kind="shadow_read") == 0  # each one counted for its device and region
    assert _sum(v, exits, device="uart0", kind="write") >= len(hello.console)  # one exit per byte sent, and setup
    assert _sum(v, "mmiosplit_vcpu_exit_latency_seconds_count") == reads + writes
    assert _sum(v, "mmiosplit_vcpu_exit_latency_seconds_bucket", le="+Inf") == reads + writes
    assert 0 < _sum(v, "mmiosplit_vcpu_exit_latency_seconds_sum") < 60
    assert _sum(v, "mmiosplit_vcpu_posted_batch_writes_count") == 1
    assert _sum(v, "mmiosplit_vcpu_posted_batch_writes_sum") == 4
    assert _sum(v, "mmiosplit_vcpu_posted_batch_writes_bucket", le="2.0") == 0
    assert _sum(v, "mmiosplit_vcpu_posted_batch_writes_bucket", le="4.0") == 1
    assert _sum(v, "mmiosplit_vcpu_external_aborts_total") == 1
    assert _sum(v, "mmiosplit_vcpu_vm_errors_total", error_kind="unmapped_access") == 1
    assert _sum(v, "mmiosplit_vcpu_vms_created_total") == 4
    assert _sum(vcpu1, "mmiosplit_vcpu_vms") == 0  # every VM was deleted
    assert _sum(v, "mmiosplit_vcpu_psci_calls_total") == sum(x.psci_calls for x in per_vcpu)

    # The device service saw the same accesses, per device and region (posted writes arrive as writes).
    for device, region in {(dict(lab)["device"], dict(lab)["region"]) for (n, lab) in v if n == exits}:
        if not device:
            continue
        for kind in ("read", "write"):
            expect = _sum(v, exits, device=device, region=region, kind=kind)
            if kind == "write":
                expect += _sum(v, exits, device=device, region=region, kind="posted_write")
            got = _sum(d, "mmiosplit_device_accesses_total", device=device, region=region, kind=kind)
            assert got == expect, (device, region, kind)
    assert _sum(d, "mmiosplit_device_accesses_total") == reads + writes + posted
    assert _sum(d, "mmiosplit_device_errors_total") == 0
    assert _sum(d, "mmiosplit_device_posted_writes_total") == 4
    assert _sum(d, "mmiosplit_device_posted_batch_writes_count") == 1
    assert _sum(d, "mmiosplit_device_access_handling_seconds_count") == reads + writes + posted
    assert _sum(d, "mmiosplit_device_console_bytes_total", device="uart0", direction="out") == len(hello.console)
    assert _sum(d, "mmiosplit_device_exit_streams_opened_total") == 2 + 1 + 1 + 1  # one per vCPU
    deadline = time.monotonic() + 10
    while _sum(_scrape(metered.device_url), "mmiosplit_device_exit_streams") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _sum(_scrape(metered.device_url), "mmiosplit_device_exit_streams") == 0


def test_vcpu_state_gauges_follow_a_running_vm(metered: Metered) -> None:
    svc = metered.services
    vm_id = svc.create(svc.config(a64(*SPIN)))
    try:
        v, _ = metered.scrape()
        assert v[("mmiosplit_vcpu_state", frozenset({("vm", vm_id), ("vcpu", "0"), ("state", "off")}))] == 1
        assert _sum(v, "mmiosplit_vcpu_vms", state="created") == 1
        svc.stub.StartVm(vcpu_pb2.StartVmRequest(vm_id=vm_id), timeout=30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            v, d = metered.scrape()
            if _sum(v, "mmiosplit_vcpu_state", vm=vm_id, state="running") == 1:
                break
            time.sleep(0.05)
        assert _sum(v, "mmiosplit_vcpu_state", vm=vm_id, state="running") == 1
        assert _sum(v, "mmiosplit_vcpu_state", vm=vm_id) == 1  # one state at a time
        assert _sum(v, "mmiosplit_vcpu_vms", state="running") == 1
        assert _sum(d, "mmiosplit_device_exit_streams") == 1
    finally:
        svc.delete(vm_id)
    v, _ = metered.scrape()
    assert _sum(v, "mmiosplit_vcpu_state", vm=vm_id) == 0 and _sum(v, "mmiosplit_vcpu_vms") == 0


def test_run_passes_metrics_ports_to_the_services_it_starts() -> None:
    proc = subprocess.run([sys.executable, "-m", "mmiosplit_cli", "run", str(ROOT / "guests" / "bin" / "hello-a64.bin"),
                           "--metrics-port", "0"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "metrics: device service http://127.0.0.1:" in proc.stderr
    assert ", vcpu service http://127.0.0.1:" in proc.stderr


def _busy_port() -> socket.socket:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    return busy


def test_serve_devices_with_its_metrics_port_in_use_says_so(tmp_path: Path) -> None:
    with _busy_port() as busy:
        port = busy.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "mmiosplit_cli", "serve-devices", "--listen",
                               f"unix:{tmp_path / 'd.sock'}", "--device", "scratch@0x0a000000",
                               "--metrics-port", str(port)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"mmiosplit serve-devices: --metrics-port {port}: cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_run_with_its_metrics_port_in_use_says_so() -> None:
    with _busy_port() as busy:
        port = busy.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "mmiosplit_cli", "run",
                               str(ROOT / "guests" / "bin" / "hello-a64.bin"), "--metrics-port", str(port)],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"--metrics-port {port}: cannot listen" in proc.stderr and "Traceback" not in proc.stderr
