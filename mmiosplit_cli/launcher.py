"""Start the services as real subprocesses and wait until gRPC health says SERVING.

Used by ``mmiosplit run``/``demo`` (the embedded default) and by the integration tests, so both run
the split exactly as a user would. No service outlives the process that started it: each is tied to it
by a lifeline (``mmiosplit_cli.lifeline``), which ends it however this process dies, and SIGTERM or SIGHUP
of this process is turned into its ordinary exit while services run, so they are stopped and the
temporary folder removed on the way out.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mmiosplit import security
from mmiosplit_cli import lifeline


class LaunchError(RuntimeError):
    """A service did not come up; the message carries the end of its log."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived while services ran: it unwinds like Ctrl-C, so every ``finally`` runs.

    A KeyboardInterrupt so that callers which already stop cleanly on Ctrl-C (a test session, a loop
    catching ``Exception``) do so here too; ``local_services`` turns it into ``SystemExit(128 + signal)``
    once its services are stopped, the exit status a shell expects of a process ended by that signal.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"{signal.Signals(signum).name} received")
        self.signum = signum


_EXIT_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _signals_unwind() -> Iterator[None]:
    """While services run, SIGTERM and SIGHUP raise ``Terminated`` in the main thread (see ``Terminated``).

    Only on the main thread (the only one that may set handlers) and only for a signal whose action is
    still the default: a program's own handler is left alone. The first signal restores the defaults, so
    a second one ends the process at once (the lifeline still ends the services then).
    """
    saved: list[signal.Signals] = []
    if threading.current_thread() is threading.main_thread():
        for sig in _EXIT_SIGNALS:
            if signal.getsignal(sig) is signal.SIG_DFL:
                saved.append(sig)

    def restore() -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in saved:
                signal.signal(sig, signal.SIG_DFL)

    def handler(signum: int, _frame: object) -> None:
        restore()
        raise Terminated(signum)

    for sig in saved:
        signal.signal(sig, handler)
    try:
        yield
    except Terminated as exc:
        raise SystemExit(128 + exc.signum) from None
    finally:
        restore()


def check_health(address: str, timeout: float = 3.0, service: str = "",
                 sec: security.Security | None = None) -> str:
    """Return the health status name of the service at address (``SERVING`` when up), over a channel with
    ``sec`` (this process's credentials by default): health needs no token, but a TLS port needs TLS."""
    with security.channel(address, sec, options=()) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=timeout)
        except grpc.FutureTimeoutError:
            return "UNREACHABLE"
        except grpc.RpcError as exc:
            return f"ERROR ({exc.code().name})"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


@dataclass
class ServiceProcess:
    """One service subprocess and where it logs."""

    name: str
    address: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    @property
    def metrics_url(self) -> str | None:
        """Where the service serves its metrics, as it printed at start (with --metrics-port), if it does."""
        try:
            found = re.search(r" metrics on (http://\S+)", self.log_path.read_text(errors="replace"))
        except OSError:
            return None
        return found.group(1) if found else None

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise LaunchError(f"{self.name} exited with status {self.process.returncode} while starting:\n"
                                  f"{self.log_tail()}")
            if check_health(self.address, timeout=0.5) == "SERVING":
                return
            time.sleep(0.05)
        raise LaunchError(f"{self.name} at {self.address} was not SERVING after {timeout:g} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 5.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class LocalServices:
    """Services this process started; stopped on exit of the context."""

    workdir: Path
    processes: list[ServiceProcess] = field(default_factory=list)
    _own_workdir: bool = False
    # Every device service local_services started, in order (the first is the one it yields).
    device_addresses: list[str] = field(default_factory=list)

    def start(self, name: str, args: Sequence[str], address: str, cpu: int | None = None) -> ServiceProcess:
        """Start one service with this process's credentials (their files, as flags: see ``security.configure``)."""
        log_path = self.workdir / f"{name}.log"
        cmd = [*args, "--listen", address, *security.current().service_flags()]
        if cpu is not None:
            cmd += ["--cpu-affinity", str(cpu)]
        log = open(log_path, "wb")  # noqa: SIM115 - handed to the child
        # Everything a started service needs is on its command line: a user's MMIOSPLIT_<FLAG> settings are for
        # the services they run themselves, and would otherwise reconfigure these behind the flags.
        env = {k: v for k, v in os.environ.items() if not k.startswith("MMIOSPLIT_")}
        env["PYTHONUNBUFFERED"] = "1"
        proc = lifeline.popen("mmiosplit_cli", cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                              env=env)
        log.close()
        sp = ServiceProcess(name, address, proc, log_path)
        self.processes.append(sp)
        return sp

    def metrics_urls(self) -> dict[str, str]:
        """Service name -> metrics URL, for the services started with metrics."""
        return {sp.name: url for sp in self.processes if (url := sp.metrics_url)}

    def stop(self) -> None:
        for sp in reversed(self.processes):
            sp.stop()
        self.processes.clear()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def local_services(device_args: Sequence[str] | None, start_vcpu: bool = True, cpu: int | None = None,
                   transport: str = "unix", *, vcpu_cpu: int | None = None, device_cpu: int | None = None,
                   more_device_args: Sequence[Sequence[str]] = (), metrics_port: int | None = None,
                   metrics_host: str = "127.0.0.1") -> Iterator[tuple[str | None, str | None, LocalServices]]:
    """Start a device service (when device_args is not None) and a vcpu service on local sockets.

    Yields (vcpu address, device address, handle). transport "unix" uses sockets in a private
    temporary folder; "tcp" uses free loopback ports. ``cpu`` pins both services; ``vcpu_cpu`` and
    ``device_cpu`` pin each kind apart (load tests place them). Each entry of ``more_device_args``
    starts one more device service (replicas for load tests); ``handle.device_addresses`` lists them all.
    With ``metrics_port`` P the vcpu service serves metrics on P and the device services on P+1, P+2, ...
    (P = 0: each picks a free port); ``handle.metrics_urls()`` says where.
    """

    def metrics(offset: int) -> list[str]:
        if metrics_port is None:
            return []
        return ["--metrics-port", str(metrics_port + offset if metrics_port else 0), "--metrics-host", metrics_host]

    workdir = Path(tempfile.mkdtemp(prefix="mmiosplit-"))
    services = LocalServices(workdir, _own_workdir=True)
    vcpu_cpu = cpu if vcpu_cpu is None else vcpu_cpu
    device_cpu = cpu if device_cpu is None else device_cpu
    with _signals_unwind():
        try:
            dev_addr = vcpu_addr = None
            started: list[ServiceProcess] = []
            if device_args is not None:
                dev_addr = _address(workdir, "devices", transport)
                started.append(services.start("device service", ["serve-devices", *device_args, *metrics(1)],
                                              dev_addr, device_cpu))
                services.device_addresses.append(dev_addr)
            for n, args in enumerate(more_device_args, start=1):
                addr = _address(workdir, f"devices-{n}", transport)
                started.append(services.start(f"device service {n}", ["serve-devices", *args, *metrics(1 + n)],
                                              addr, device_cpu))
                services.device_addresses.append(addr)
            if start_vcpu:
                vcpu_addr = _address(workdir, "vcpu", transport)
                started.append(services.start("vcpu service", ["serve-vcpu", *metrics(0)], vcpu_addr, vcpu_cpu))
            for sp in started:
                sp.wait_ready()
            yield vcpu_addr, dev_addr, services
        finally:
            services.stop()


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _address(workdir: Path, name: str, transport: str) -> str:
    if transport == "tcp":
        return f"127.0.0.1:{free_tcp_port()}"
    return f"unix:{workdir / (name + '.sock')}"
