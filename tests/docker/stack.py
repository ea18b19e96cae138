"""The compose stack of ``deploy/compose.yaml`` as tests see it: its containers, addresses and a client runner.

Tests drive the stack through the ``docker`` SDK (container objects to kill, stop, restart and inspect) and
``docker-compose`` (or ``docker compose``) for what only compose does: bringing the file up and down.
Clients run in containers on the stack's network because ``mmiosplit run``/``loadtest`` connect to the device
service address they pass to the vcpu service, and the compose service names resolve only on that network.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "deploy" / "compose.yaml"
IMAGE = "mmiosplit:dev"
UBOOT = Path("/usr/lib/u-boot/qemu_arm64/u-boot.bin")
# Where each service listens on the stack's network (deploy/compose.yaml): vcpu; devices, QEMU's virt board;
# scratch, one scratch device named `scratch` at 0x0b000000; guests, the bundled guests' board.
ADDRESSES = {"vcpu": "vcpu:50051", "devices": "devices:50052", "scratch": "scratch:50053", "guests": "guests:50054"}
SERVICES = tuple(ADDRESSES)
# What every container of the stack gets (deploy/compose.yaml's x-service), for the client containers too.
HARDENING: dict[str, Any] = {
    "read_only": True,
    "user": "10001:10001",
    "cap_drop": ["ALL"],
    "security_opt": ["no-new-privileges:true"],
    "tmpfs": {"/tmp": "size=64m"},
}


class StackError(RuntimeError):
    """The stack could not be brought up or torn down; the message names the step and carries its output."""


def compose_command() -> list[str] | None:
    """``docker-compose`` (v1, Debian 12's) or ``docker compose`` (v2), whichever is installed; None if neither."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_subnet(client: Any, first: int = 10, last: int = 250) -> str:
    """A 172.28.N.0/24 that no Docker network overlaps, so this stack can run beside smoke.sh's."""
    used = []
    for net in client.networks.list():
        for cfg in (net.attrs.get("IPAM") or {}).get("Config") or []:
            if cfg.get("Subnet"):
                used.append(ipaddress.ip_network(cfg["Subnet"], strict=False))
    for n in range(first, last + 1):
        candidate = ipaddress.ip_network(f"172.28.{n}.0/24")
        if not any(candidate.overlaps(u) for u in used):
            return str(candidate)
    raise StackError(f"no free subnet in 172.28.{first}-{last}.0/24")


@dataclass
class ClientResult:
    """What one client command in a container did."""

    exit_code: int
    stdout: str
    stderr: str
    seconds: float


@dataclass
class Stack:
    """One running copy of deploy/compose.yaml under its own project name."""

    client: Any  # docker.DockerClient
    compose: list[str]
    project: str
    image: str
    subnet: str
    vcpu_port: int  # on the host, 127.0.0.1
    addresses: Mapping[str, str] = field(default_factory=lambda: dict(ADDRESSES))
    _clients: dict[str, tuple[Any, float]] = field(default_factory=dict)  # id -> (container, when started)

    # ---- compose ----------------------------------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """The environment compose reads deploy/compose.yaml's variables from."""
        return dict(os.environ, MMIOSPLIT_IMAGE=self.image, MMIOSPLIT_SUBNET=self.subnet,
                    MMIOSPLIT_VCPU_PORT=str(self.vcpu_port))

    def run_compose(self, *args: str, stdin: Any = subprocess.DEVNULL, timeout: float = 180,
                    check: bool = True) -> subprocess.CompletedProcess[str]:
        """``docker-compose -f deploy/compose.yaml -p PROJECT ARGS``; a failure with check raises StackError."""
        cmd = [*self.compose, "-f", str(COMPOSE_FILE), "-p", self.project, *args]
        proc = subprocess.run(cmd, stdin=stdin, capture_output=True, text=True, timeout=timeout, env=self.env)
        if check and proc.returncode != 0:
            raise StackError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def load_flash(self, name: str, path: Path) -> None:
        """Copy a file onto the flash volume (e.g. U-Boot as flash0.img), with the compose file's flash-load tool.

        `devices` reads its flash files when it starts: load before `up`, or restart it afterwards.
        """
        with open(path, "rb") as f:
            self.run_compose("run", "--rm", "-T", "flash-load", name, stdin=f)

    def up(self, timeout: float = 120) -> None:
        self.run_compose("up", "-d")
        self.wait_healthy(timeout=timeout)

    def down(self) -> None:
        """Remove every container this stack made (clients too), its network and its volume."""
        for c, _ in self._clients.values():
            with contextlib.suppress(Exception):  # already gone
                c.remove(force=True)
        self._clients.clear()
        self.run_compose("down", "--volumes", "--remove-orphans", "--timeout", "20", check=False)

    # ---- containers -------------------------------------------------------------------------------------------
    def container(self, service: str) -> Any:
        """The container of a service (a fresh docker.models.containers.Container: .reload() for new state)."""
        found = self.client.containers.list(all=True, filters={
            "label": [f"com.docker.compose.project={self.project}", f"com.docker.compose.service={service}"]})
        found = [c for c in found if c.labels.get("com.docker.compose.oneoff", "False") == "False"]
        if len(found) != 1:
            raise StackError(f"expected one container for service {service!r} of {self.project}, found {len(found)}")
        return found[0]

    def scratch_container(self) -> Any:
        """The scratch device service's container: the one tests kill, stop and restart."""
        return self.container("scratch")

    def health(self, service: str) -> str:
        state = self.container(service).attrs["State"]
        return str((state.get("Health") or {}).get("Status") or state.get("Status"))

    def wait_healthy(self, services: Sequence[str] = SERVICES, timeout: float = 120) -> None:
        """Wait until each service's health check passes; StackError (with logs) if one fails or time runs out."""
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            states = {s: self.health(s) for s in services}
            if all(v == "healthy" for v in states.values()):
                return
            if any(v in ("unhealthy", "exited", "dead") for v in states.values()):
                break
            time.sleep(0.5)
        logs = self.run_compose("logs", "--no-color", "--tail", "30", check=False)
        raise StackError(f"services not healthy after {timeout:g} s: {states}\n{logs.stdout}{logs.stderr}")

    @property
    def network(self) -> str:
        """The name of the stack's network (compose prefixes it with the project)."""
        nets = self.client.networks.list(filters={"label": [f"com.docker.compose.project={self.project}",
                                                            "com.docker.compose.network=mmiosplit"]})
        if len(nets) != 1:
            raise StackError(f"expected one network of {self.project}, found {len(nets)}")
        return str(nets[0].name)

    # ---- clients ----------------------------------------------------------------------------------------------
    def start_client(self, *args: str, volumes: Mapping[str, Mapping[str, str]] | None = None,
                     name: str = "client") -> Any:
        """Start ``mmiosplit ARGS`` in a container on the stack's network (returns at once, with the container).

        It has the stack's hardening and ``volumes`` (host path or volume name -> {"bind": path, "mode": "rw"|"ro"}).
        Finish it with ``finish_client``; ``down`` removes it anyway.
        """
        container = self.client.containers.run(
            self.image, list(args), detach=True, network=self.network, volumes=dict(volumes or {}),
            name=f"{self.project}_{name}_{uuid.uuid4().hex[:8]}", labels={"mmiosplit.test.project": self.project},
            **HARDENING)
        self._clients[container.id] = (container, time.monotonic())
        return container

    def finish_client(self, container: Any, timeout: float = 300) -> ClientResult:
        """Wait for a client container (killing it after timeout), collect its output and remove it."""
        t0 = self._clients.get(container.id, (container, time.monotonic()))[1]
        try:
            status = container.wait(timeout=timeout)
            code = int(status.get("StatusCode", -1))
        except Exception as exc:  # requests' ReadTimeout: still running
            container.kill()
            container.wait(timeout=30)
            code = -1
            timed_out = f"\n[killed: still running after {timeout:g} s ({exc.__class__.__name__})]"
        else:
            timed_out = ""
        out = container.logs(stdout=True, stderr=False).decode(errors="replace")
        err = container.logs(stdout=False, stderr=True).decode(errors="replace") + timed_out
        container.remove(force=True)
        self._clients.pop(container.id, None)
        return ClientResult(code, out, err, time.monotonic() - t0)

    def run_client(self, *args: str, timeout: float = 300,
                   volumes: Mapping[str, Mapping[str, str]] | None = None) -> ClientResult:
        """Run ``mmiosplit ARGS`` in a client container on the stack's network to its end (see start_client)."""
        return self.finish_client(self.start_client(*args, volumes=volumes), timeout=timeout)
