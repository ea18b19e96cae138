"""Services leaving mid-run: a graceful drain on SIGTERM loses no access, a killed device service gives an error
naming the access, and neither names a side stream."""

from __future__ import annotations

import contextlib
import queue
import re
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mmiosplit.v1 import device_pb2, device_pb2_grpc, vcpu_pb2
from mmiosplit.wire import FINAL_EVENT_KINDS, PROTOCOL_VERSION
from mmiosplit_cli.launcher import LocalServices, ServiceProcess, local_services
from mmiosplit_cli.runner import channel
from tests.integration.client import Services, a64

pytestmark = pytest.mark.integration

SCRATCH = "scratch@0x0a000000,size=0x1000,name=scratch0"
POSTED = "scratch@0x0a100000,size=0x1000,posted=on,name=posted0"
STR_W2 = 0xB9000002
# x0 = device; x2 = 0; 1: str w2, [x0]; add x2, x2, #1; b 1b -- x2 counts the writes that completed
COUNT_WRITES = [0xD2A14000, 0xD2800002, STR_W2, 0x91000442, 0x17FFFFFE]
COUNT_POSTED = [0xD2A14200, 0xD2800002, STR_W2, 0x91000442, 0x17FFFFFE]
SPIN = [0x14000000]  # b . : never touches a device


class Run:
    """A VM started in the background, its events collected as they come."""

    def __init__(self, services: Services, cfg: vcpu_pb2.VmConfig) -> None:
        self.services = services
        self.vm_id = services.create(cfg)
        self.events: list[vcpu_pb2.VmEvent] = []
        self.final_at: float | None = None
        self.done = threading.Event()
        threading.Thread(target=self._follow, daemon=True).start()
        services.stub.StartVm(vcpu_pb2.StartVmRequest(vm_id=self.vm_id), timeout=30)

    def _follow(self) -> None:
        try:
            for r in self.services.stub.StreamVmEvents(vcpu_pb2.StreamVmEventsRequest(vm_id=self.vm_id), timeout=60):
                self.events.append(r.event)
                if r.event.kind in FINAL_EVENT_KINDS:
                    self.final_at = time.monotonic()
        finally:
            self.done.set()

    def final(self, timeout: float = 20) -> vcpu_pb2.VmEvent:
        assert self.done.wait(timeout), f"VM {self.vm_id} did not finish within {timeout} s: {self.events}"
        final = [e for e in self.events if e.kind in FINAL_EVENT_KINDS]
        assert len(final) == 1, self.events
        return final[0]

    def wait_for_exits(self, count: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while self.services.stats(self.vm_id).exits < count:
            assert time.monotonic() < deadline, f"fewer than {count} exits after {timeout} s"
            time.sleep(0.05)


@contextmanager
def fresh_services(*device_args: str) -> Iterator[tuple[Services, ServiceProcess, ServiceProcess]]:
    """A device service and a vcpu service of the test's own (it stops or kills them)."""
    with local_services(list(device_args)) as (vaddr, daddr, handle):
        assert vaddr and daddr
        device, vcpu = _process(handle, "device service"), _process(handle, "vcpu service")
        yield Services(vaddr, daddr, handle), device, vcpu


def _process(handle: LocalServices, name: str) -> ServiceProcess:
    return next(p for p in handle.processes if p.name == name)


def _exited(sp: ServiceProcess, timeout: float) -> tuple[int, float]:
    t0 = time.monotonic()
    code = sp.process.wait(timeout)
    return code, time.monotonic() - t0


def _served(log: str, device: str, kind: str) -> int:
    found = re.search(rf"accesses served: .*?{device}/\w+ {kind}s (\d+)", log)
    assert found, f"no count of {device} {kind}s in the device service's log:\n{log}"
    return int(found.group(1))


def test_sigterm_drains_a_device_service_and_loses_no_access() -> None:
    """Every write the guest completed reached the device and no other did; the VM hears the service leave and the
    next access gets the policy with an error naming the device, the address, the PC and the instruction."""
    with fresh_services("--device", SCRATCH, "--grace-s", "5") as (services, device, _vcpu):
        run = Run(services, services.config(a64(*COUNT_WRITES), stop_on=("device_error",)))
        run.wait_for_exits(200)
        device.process.send_signal(signal.SIGTERM)
        final = run.final()
        code, took = _exited(device, 10)
        completed = services.registers(run.vm_id, 0, "x2")["x2"]
        services.delete(run.vm_id)
        log = device.log_path.read_text()
    assert code == 0 and took < 5, (code, took, device.log_tail())
    left = [e for e in run.events if e.kind == vcpu_pb2.VM_EVENT_KIND_DEVICE_SERVICE_LEFT]
    assert len(left) == 1 and "shutting down (SIGTERM)" in left[0].reason, run.events
    assert final.kind == vcpu_pb2.VM_EVENT_KIND_ERROR and final.error_kind == vcpu_pb2.VM_ERROR_KIND_DEVICE_SERVICE
    for needle in ("4-byte write of scratch0", "at 0xa000000", f"instruction 0x{STR_W2:08x}", "pc 0x40080008",
                   "has gone away", "was not sent"):
        assert needle in final.reason, final.reason
    assert "watch" not in final.reason and "shadow" not in final.reason, final.reason
    assert _served(log, "scratch0", "write") == completed > 200, (completed, log)
    assert "every exit stream ended" in log, log


def test_a_killed_device_service_ends_the_run_at_once_naming_the_access() -> None:
    with fresh_services("--device", SCRATCH) as (services, device, _vcpu):
        run = Run(services, services.config(a64(*COUNT_WRITES), stop_on=("device_error",), exit_deadline_ms=2000))
        run.wait_for_exits(200)
        killed_at = time.monotonic()
        device.process.kill()
        final = run.final()
        services.delete(run.vm_id)
    assert run.final_at is not None and run.final_at - killed_at < 2.1, run.final_at - killed_at
    assert final.kind == vcpu_pb2.VM_EVENT_KIND_ERROR and final.error_kind == vcpu_pb2.VM_ERROR_KIND_DEVICE_SERVICE
    for needle in ("write of scratch0", "at 0xa000000", f"instruction 0x{STR_W2:08x}", "pc 0x40080008"):
        assert needle in final.reason, final.reason
    assert "watch" not in final.reason and "shadow" not in final.reason, final.reason
    assert final.device == "scratch0" and final.fault_address == 0x0A00_0000, final


def test_sigterm_drains_the_vcpu_service_with_its_posted_writes() -> None:
    """Paused at an instruction boundary, posted writes delivered, a final event saying why, exit 0 in the grace."""
    with fresh_services("--device", POSTED) as (services, device, vcpu):
        run = Run(services, services.config(a64(*COUNT_POSTED)))
        time.sleep(1.0)
        vcpu.process.send_signal(signal.SIGTERM)
        final = run.final()
        code, took = _exited(vcpu, 12)
        device.process.send_signal(signal.SIGTERM)
        assert _exited(device, 12)[0] == 0
        vcpu_log, device_log = vcpu.log_path.read_text(), device.log_path.read_text()
    assert code == 0 and took < 10, (code, took, vcpu_log)
    kinds = [e.kind for e in run.events]
    assert vcpu_pb2.VM_EVENT_KIND_PAUSED in kinds, run.events
    assert final.kind == vcpu_pb2.VM_EVENT_KIND_STOPPED and "shutting down (SIGTERM)" in final.reason, final
    posted = re.search(r"(\d+) posted writes delivered", vcpu_log)
    assert posted, vcpu_log
    assert _served(device_log, "posted0", "write") == int(posted.group(1)) > 0, (vcpu_log, device_log)


def test_a_vm_that_does_not_touch_a_leaving_service_closes_its_stream_at_once() -> None:
    """The VM, told the service is going away, closes its exit stream at the vCPU's next boundary and runs on; the
    service need not wait out its grace."""
    with fresh_services("--device", SCRATCH, "--grace-s", "5") as (services, device, _vcpu):
        run = Run(services, services.config(a64(*SPIN)))
        time.sleep(0.3)
        device.process.send_signal(signal.SIGTERM)
        code, took = _exited(device, 8)
        time.sleep(0.2)
        assert not run.done.is_set(), run.events
        assert any(e.kind == vcpu_pb2.VM_EVENT_KIND_DEVICE_SERVICE_LEFT for e in run.events), run.events
        services.delete(run.vm_id)
        log = device.log_path.read_text()
    assert code == 0 and took < 2, (code, took, log)
    assert "every exit stream ended" in log, log


def test_a_stream_that_ignores_going_away_is_cancelled_at_the_end_of_the_grace() -> None:
    """A client that does not watch still has what it sends completed, learns from the reply that the service is
    going away, and holds the service only until the grace ends if it keeps its stream open; the service exits 0."""
    requests: queue.SimpleQueue[device_pb2.ExitStreamRequest | None] = queue.SimpleQueue()
    with fresh_services("--device", SCRATCH, "--grace-s", "1") as (services, device, _vcpu):
        stub = device_pb2_grpc.DeviceServiceStub(channel(services.devices))
        call = stub.ExitStream(iter(requests.get, None))
        requests.put(device_pb2.ExitStreamRequest(seq=0, hello=device_pb2.StreamHello(
            protocol_version=PROTOCOL_VERSION, vm_id="idle", vcpu_id=0)))
        assert next(call).WhichOneof("body") == "welcome"
        device.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)  # draining now
        requests.put(device_pb2.ExitStreamRequest(seq=1, exit=device_pb2.MmioExit(
            address=0x0A00_0000, length=4, direction=device_pb2.ACCESS_DIRECTION_WRITE, data=b"\1\2\3\4")))
        reply = next(call)
        code, took = _exited(device, 5)
        requests.put(None)
        log = device.log_path.read_text()
    # Received while draining, so completed; and the reply says the service is going away.
    assert reply.completion.status == device_pb2.COMPLETION_STATUS_OK, reply
    assert "shutting down (SIGTERM)" in reply.going_away.reason and reply.going_away.grace_seconds == 1, reply
    assert code == 0 and 0.6 < took < 3, (code, took, log)
    assert "cancelled at the end of the grace period" in log, log


@pytest.mark.parametrize("service", ["device service", "vcpu service"])
def test_sigterm_reports_not_serving_at_once_and_a_health_watch_does_not_hold_the_drain(service: str) -> None:
    """A load balancer watching health hears NOT_SERVING at once, and its stream ends instead of holding the
    service for the whole grace period."""
    seen: list[tuple[float, str]] = []
    with fresh_services("--device", SCRATCH) as (_services, device, vcpu):
        target = device if service == "device service" else vcpu
        stub = health_pb2_grpc.HealthStub(channel(target.address))
        t0 = time.monotonic()

        def watch() -> None:
            with contextlib.suppress(grpc.RpcError):
                for r in stub.Watch(health_pb2.HealthCheckRequest(service="")):
                    seen.append((time.monotonic() - t0, health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        signalled = time.monotonic() - t0
        target.process.send_signal(signal.SIGTERM)
        code, took = _exited(target, 8)
        watcher.join(5)
    assert [status for _, status in seen] == ["SERVING", "NOT_SERVING"], seen
    assert seen[1][0] - signalled < 1.0 and code == 0 and took < 2, (seen, signalled, code, took)
