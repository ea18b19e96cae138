"""No process outlives its owner, no VM outlives its client.

``mmiosplit run`` killed by SIGTERM, SIGHUP or SIGKILL (as ``timeout``, a closed terminal or a test driver
does) must take the services it started with it: they are found through /proc before the kill and must be
gone within seconds after it. A standalone vcpu service deletes a VM whose client went away once its lease
runs out, and keeps one whose client still follows its events, however long that is.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mmiosplit.v1 import vcpu_pb2, vcpu_pb2_grpc
from mmiosplit_cli.launcher import LocalServices, check_health
from mmiosplit_cli.loadtest.guest import A64
from mmiosplit_cli.runner import channel
from tests.integration.client import LOAD, Services, a64
from tests.integration.conftest import ROOT

pytestmark = pytest.mark.integration

SCRATCH = 0x0A00_0000  # `mmiosplit run`'s default scratch device
LEASE_S = 1.0
GONE_WITHIN_S = 5.0  # how long the services may take to stop once their owner is dead
BUSY = 0.1  # share of a CPU a vcpu service running the guest below uses at least (50-90% on an idle machine)
IDLE = 0.05  # ... and at most once no guest runs


def forever_image() -> bytes:
    """An A64 guest that never ends: store to and load from the scratch device in a loop, each one an exit."""
    loop = LOAD + 4
    return a64(A64.movz(20, SCRATCH >> 16, 1),  # x20 = the scratch device
               A64.ldst(4, False, 21, 20), A64.ldst(4, True, 2, 20),  # str w21, [x20]; ldr w2, [x20]
               A64.add_imm(21, 21, 1), A64.b(loop + 12, loop))


# ----- processes, from /proc -----------------------------------------------------------------------------------
def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat from the state on (the command name may hold spaces), None when gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def children(pid: int) -> dict[int, str]:
    """PID -> command line of every live child of pid."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))) is not None and int(fields[1]) == pid:
            found[int(entry)] = _cmdline(int(entry))
    return found


def running(pid: int, cmdline: str) -> bool:
    """pid is still that process and has not ended (a zombie has: an init that does not reap keeps it)."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z" and _cmdline(pid) == cmdline


def cpu_use(pid: int, interval: float) -> float:
    """Share of one CPU pid used over the next interval seconds (utime + stime from /proc/PID/stat)."""

    def seconds() -> float:
        fields = _stat(pid)
        assert fields is not None, f"process {pid} is gone"
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    before = seconds()
    time.sleep(interval)
    return (seconds() - before) / interval


def listening(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:  # no file, or nobody accepting on it
            return False
    return True


def wait_for(pred: object, timeout: float, what: str) -> float:
    """Poll pred() until true; returns the seconds it took, fails naming what after timeout."""
    t0 = time.monotonic()
    while not pred():  # type: ignore[operator]
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"{what}: not within {timeout:g} s")
        time.sleep(0.05)
    return time.monotonic() - t0


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


# ----- `mmiosplit run` killed --------------------------------------------------------------------------------
def _default_exit_signals() -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL], ids=lambda s: s.name)
def test_killed_run_leaves_no_service_and_no_guest_running(sig: signal.Signals, tmp_path: Path) -> None:
    image = tmp_path / "forever.bin"
    image.write_bytes(forever_image())
    err_path = tmp_path / "run.err"
    with open(err_path, "wb") as err:
        # With the signal's default action, whatever this test inherited: under nohup SIGHUP is ignored, and run
        # rightly leaves an ignored signal alone.
        run = subprocess.Popen([sys.executable, "-m", "mmiosplit_cli", "run", str(image), "--events"], cwd=ROOT,
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                               preexec_fn=_default_exit_signals)
    kids: dict[int, str] = {}
    try:
        wait_for(lambda: "vcpu_started" in _read(err_path) or run.poll() is not None, 60, "the guest started")
        assert run.poll() is None, f"run ended early ({run.returncode}): {_read(err_path)}"
        kids = children(run.pid)
        kinds = sorted(kind for cmd in kids.values() for kind in ("serve-vcpu", "serve-devices") if kind in cmd)
        assert kinds == ["serve-devices", "serve-vcpu"], kids
        vcpu_pid = next(pid for pid, cmd in kids.items() if "serve-vcpu" in cmd)
        sockets = [m.group(1) for cmd in kids.values() if (m := re.search(r"--listen unix:(\S+)", cmd))]
        assert len(sockets) == 2 and all(listening(s) for s in sockets), kids
        workdir = Path(sockets[0]).parent
        # What would be left behind: a vcpu service spinning the guest.
        busy = cpu_use(vcpu_pid, 1.0)
        assert busy > BUSY

        run.send_signal(sig)
        try:
            status = run.wait(30)
        except subprocess.TimeoutExpired:  # say where it hangs (its stack, if py-spy is here) before failing
            dump = subprocess.run(["py-spy", "dump", "--pid", str(run.pid)], capture_output=True, text=True,
                                  timeout=30, check=False) if shutil.which("py-spy") else None
            pytest.fail(f"run did not end within 30 s of {sig.name}:\n{_read(err_path)}\n"
                        f"{dump.stdout if dump else '(no py-spy to show its threads)'}")
        assert status == (-sig if sig == signal.SIGKILL else 128 + sig), _read(err_path)
        took = wait_for(lambda: not any(running(p, c) for p, c in kids.items()), GONE_WITHIN_S,
                        f"every service run started ended after run got {sig.name} ({kids})")
        print(f"{sig.name}: services gone {took:.2f} s after run ended (the vcpu service used {busy:.0%} of a CPU)")
        assert not any(listening(s) for s in sockets)
        if sig == signal.SIGKILL:
            # run could not clean up: the services ended themselves when their lifeline closed.
            for log in workdir.glob("*.log"):
                assert "lifeline closed" in log.read_text(), log.read_text()
        else:
            # run's own exit path stopped them and removed its temporary folder.
            assert not workdir.exists()
    finally:
        run.kill()
        run.wait()
        for pid, cmd in kids.items():
            if running(pid, cmd):
                os.kill(pid, signal.SIGKILL)
        for cmd in kids.values():
            if m := re.search(r"--listen unix:(\S+)/[^/]+\.sock", cmd):
                shutil.rmtree(m.group(1), ignore_errors=True)


def test_a_service_dies_with_a_parent_killed_while_it_starts(tmp_path: Path) -> None:
    """A parent killed before the child even runs: the pipe's EOF waits for the child (no race to close)."""
    parent = subprocess.run(
        [sys.executable, "-c", "import os, signal, sys; from mmiosplit_cli import lifeline; "
         f"p = lifeline.popen('mmiosplit_cli', ['serve-vcpu', '--listen', 'unix:{tmp_path / 'v.sock'}']); "
         "print(p.pid, flush=True); os.kill(os.getpid(), signal.SIGKILL)"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert parent.returncode == -signal.SIGKILL, parent.stderr
    child = int(parent.stdout.split()[0])
    cmd = _cmdline(child)
    try:
        wait_for(lambda: not running(child, cmd), 10, f"the service {child} ({cmd}) ended")
    finally:
        if running(child, cmd):
            os.kill(child, signal.SIGKILL)


def test_a_service_started_from_a_thread_outlives_the_thread(tmp_path: Path) -> None:
    """The trap the lifeline avoids: PR_SET_PDEATHSIG fires when the *thread* that started a child ends."""
    services = LocalServices(tmp_path)
    address = f"unix:{tmp_path / 'vcpu.sock'}"
    starter = threading.Thread(target=services.start, args=("vcpu service", ["serve-vcpu"], address))
    starter.start()
    starter.join()
    try:
        services.processes[0].wait_ready()
        time.sleep(0.5)
        assert check_health(address) == "SERVING"
    finally:
        services.stop()


# ----- VM leases -----------------------------------------------------------------------------------------------
@dataclass
class Leased:
    """A device service and a vcpu service with a LEASE_S lease, started here."""

    services: Services
    vcpu_pid: int
    metrics_url: str
    log: Path

    def vm_ids(self) -> set[str]:
        """The VMs the service holds, from its metrics (a scrape names no VM, so it renews no lease)."""
        text = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()
        return {s.labels["vm"] for family in text_string_to_metric_families(text) for s in family.samples
                if s.name == "mmiosplit_vcpu_state"}

    def not_found(self, vm_id: str) -> bool:
        """GetStats says NOT_FOUND (only ask once the VM should be gone: an RPC naming it renews its lease)."""
        with channel(self.services.vcpu) as ch:
            try:
                vcpu_pb2_grpc.VcpuServiceStub(ch).GetStats(vcpu_pb2.GetStatsRequest(vm_id=vm_id), timeout=10)
            except grpc.RpcError as exc:
                return bool(exc.code() == grpc.StatusCode.NOT_FOUND)
        return False


@pytest.fixture(scope="module")
def leased(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Leased]:
    handle = LocalServices(tmp_path_factory.mktemp("leased"))
    devices = f"unix:{handle.workdir / 'devices.sock'}"
    vcpu = f"unix:{handle.workdir / 'vcpu.sock'}"
    try:
        handle.start("device service", ["serve-devices", "--device", "scratch@0x0a000000,size=0x1000"], devices)
        sp = handle.start("vcpu service", ["serve-vcpu", "--vm-lease-s", f"{LEASE_S:g}", "--metrics-port", "0"], vcpu)
        for p in handle.processes:
            p.wait_ready()
        assert sp.metrics_url, sp.log_tail()
        yield Leased(Services(vcpu, devices, handle), sp.process.pid, sp.metrics_url, sp.log_path)
    finally:
        handle.stop()


def test_a_vm_whose_client_closed_its_channel_is_deleted_after_the_lease(leased: Leased) -> None:
    with channel(leased.services.vcpu) as ch:
        stub = vcpu_pb2_grpc.VcpuServiceStub(ch)
        vm_id = str(stub.CreateVm(vcpu_pb2.CreateVmRequest(config=leased.services.config(forever_image())),
                                  timeout=30).vm_id)
        # The client follows the VM's events while the service's CPU use is measured, then goes away.
        events = stub.StreamVmEvents(vcpu_pb2.StreamVmEventsRequest(vm_id=vm_id))
        stub.StartVm(vcpu_pb2.StartVmRequest(vm_id=vm_id), timeout=30)
        busy = cpu_use(leased.vcpu_pid, 1.0)
        assert vm_id in leased.vm_ids()
        assert next(events).event.kind == vcpu_pb2.VM_EVENT_KIND_RUNNING
    took = wait_for(lambda: vm_id not in leased.vm_ids(), LEASE_S + 3, f"VM {vm_id} deleted")
    assert took >= LEASE_S * 0.9, f"deleted {took:.2f} s after its client left, before its lease ran out"
    assert leased.not_found(vm_id)
    assert re.search(rf"deleting VM {vm_id} \(unnamed\): lease expired: no event stream open", leased.log.read_text())
    idle = cpu_use(leased.vcpu_pid, 1.0)
    print(f"VM {vm_id} deleted {took:.2f} s after its client closed its channel (lease {LEASE_S:g} s); the vcpu "
          f"service used {busy:.0%} of a CPU while it ran, {idle:.0%} after")
    assert busy > BUSY and idle < IDLE


def test_a_vm_whose_run_client_was_killed_is_deleted_after_the_lease(leased: Leased, tmp_path: Path) -> None:
    image = tmp_path / "forever.bin"
    image.write_bytes(forever_image())
    err_path = tmp_path / "run.err"
    with open(err_path, "wb") as err:
        run = subprocess.Popen([sys.executable, "-m", "mmiosplit_cli", "run", str(image), "--events", "--vcpu-service",
                                leased.services.vcpu, "--device-service", leased.services.devices],
                               cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_for(lambda: "vcpu_started" in _read(err_path) or run.poll() is not None, 60, "the guest started")
        found = re.search(r"running: VM (\w+) started", _read(err_path))
        assert found and run.poll() is None, _read(err_path)
        vm_id = found.group(1)
        time.sleep(2 * LEASE_S)  # run follows the VM's events: it keeps the VM for as long as it runs
        assert vm_id in leased.vm_ids()
    finally:
        run.kill()
        run.wait()
    wait_for(lambda: vm_id not in leased.vm_ids(), LEASE_S + 3, f"VM {vm_id} of the killed run deleted")
    assert leased.not_found(vm_id)
    assert cpu_use(leased.vcpu_pid, 1.0) < IDLE


def test_a_vm_with_an_open_event_stream_outlives_the_lease_running_and_paused(leased: Leased) -> None:
    with channel(leased.services.vcpu) as ch:
        stub = vcpu_pb2_grpc.VcpuServiceStub(ch)
        vm_id = str(stub.CreateVm(vcpu_pb2.CreateVmRequest(config=leased.services.config(forever_image())),
                                  timeout=30).vm_id)
        events = stub.StreamVmEvents(vcpu_pb2.StreamVmEventsRequest(vm_id=vm_id))
        kinds: list[int] = []

        def follow() -> None:
            with contextlib.suppress(grpc.RpcError):
                kinds.extend(r.event.kind for r in events)

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        stub.StartVm(vcpu_pb2.StartVmRequest(vm_id=vm_id), timeout=30)
        time.sleep(3 * LEASE_S)
        assert vm_id in leased.vm_ids(), "a running VM whose events are followed was deleted"
        stub.PauseVm(vcpu_pb2.PauseVmRequest(vm_id=vm_id), timeout=30)
        time.sleep(3 * LEASE_S)
        assert vm_id in leased.vm_ids(), "a paused VM whose events are followed was deleted"
        assert vcpu_pb2.VM_EVENT_KIND_PAUSED in kinds
        events.cancel()
        follower.join(5)
        took = wait_for(lambda: vm_id not in leased.vm_ids(), LEASE_S + 3, f"VM {vm_id} deleted once unfollowed")
        assert took >= LEASE_S * 0.9 - 0.3, "deleted before its lease ran out after the stream closed"


def test_rpcs_naming_a_vm_renew_its_lease(leased: Leased) -> None:
    with channel(leased.services.vcpu) as ch:
        stub = vcpu_pb2_grpc.VcpuServiceStub(ch)
        vm_id = str(stub.CreateVm(vcpu_pb2.CreateVmRequest(config=leased.services.config(forever_image())),
                                  timeout=30).vm_id)
        end = time.monotonic() + 3 * LEASE_S
        while time.monotonic() < end:
            stub.GetStats(vcpu_pb2.GetStatsRequest(vm_id=vm_id, counters_only=True), timeout=10)
            time.sleep(LEASE_S / 3)
        assert vm_id in leased.vm_ids()
        wait_for(lambda: vm_id not in leased.vm_ids(), LEASE_S + 3, f"VM {vm_id} deleted once nothing named it")
