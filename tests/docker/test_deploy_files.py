"""The deploy/ files checked without an engine (these run in the README's test command): the compose file
configures the services by environment with variables the services know, hardens every container, and
the device files describe what the guests and U-Boot expect, the same files as the Kubernetes ConfigMap's.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from device_service.config import DeviceSpec, build_bus, load_config, parse_device_specs
from mmiosplit_cli.cli import build_parser
from mmiosplit_cli.envconfig import service_parsers, variable
from tests.docker.stack import ADDRESSES, COMPOSE_FILE, ROOT
from vcpu_service.machines.virt import device_specs

SERVICES = {"vcpu": "serve-vcpu", "devices": "serve-devices", "scratch": "serve-devices", "guests": "serve-devices"}
DEVICES = ROOT / "deploy" / "devices"
K8S_DEVICE_CONFIG = ROOT / "deploy" / "k8s" / "10-device-config.yaml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE_FILE.read_text()))


def _seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", text)
    assert m, f"duration {text!r}"
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[m.group(2)]


def test_services_are_configured_by_environment_with_known_variables(compose: dict[str, Any]) -> None:
    parsers = service_parsers(build_parser())
    for name, command in SERVICES.items():
        svc = compose["services"][name]
        assert svc["command"] == [command], f"{name}: flags belong in the environment, not the command"
        known = {variable(a) for a in parsers[command]._actions} - {None}
        env = svc["environment"]
        assert set(env) <= known, f"{name}: {set(env) - known} name no flag of {command}"
        port = ADDRESSES[name].rsplit(":", 1)[1]
        assert env["MMIOSPLIT_LISTEN"] == f"0.0.0.0:{port}"
        # Plaintext on the project's own network, said on purpose (or the service refuses to start).
        assert env.get("MMIOSPLIT_INSECURE") == "1" or "MMIOSPLIT_TOKEN_FILE" in env or "MMIOSPLIT_TLS_CERT" in env
        assert svc["healthcheck"]["test"][:4] == ["CMD", "mmiosplit", "health", f"127.0.0.1:{port}"]
        # Docker's SIGKILL must come after the service's own drain.
        assert _seconds(svc["stop_grace_period"]) > float(env["MMIOSPLIT_GRACE_S"]), name


def test_every_container_is_hardened(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        assert svc["read_only"] is True, name
        assert svc["cap_drop"] == ["ALL"], name
        assert not str(svc["user"]).startswith("0"), name
        assert any(t.startswith("/tmp") for t in svc["tmpfs"]), name
    published = {n: s["ports"] for n, s in compose["services"].items() if s.get("ports")}
    assert list(published) == ["vcpu"]
    assert all(p.startswith("127.0.0.1:") for p in published["vcpu"])
    assert compose["networks"]["mmiosplit"]["ipam"]["config"][0]["subnet"]
    needs = compose["services"]["client"]["depends_on"]
    assert {n: d["condition"] for n, d in needs.items()} == dict.fromkeys(SERVICES, "service_healthy")


def _normal(specs: list[DeviceSpec]) -> list[tuple[str, int, str, dict[str, str]]]:
    """Specs as comparable values: TOML gives sizes in decimal, --device specs in hex."""
    return [(s.type, s.base, s.name, {k: str(int(v, 0)) if k == "size" else v for k, v in s.options.items()})
            for s in specs]


def test_guests_service_has_the_bundled_guests_devices(compose: dict[str, Any]) -> None:
    """hello-*.bin expect mmiosplit run's default board: a UART, an RTC and scratch at 0x0a000000."""
    env = compose["services"]["guests"]["environment"]
    specs = {s.type: s for s in parse_device_specs(env["MMIOSPLIT_DEVICE"].split())}
    assert {t: s.base for t, s in specs.items()} == {"pl011": 0x0900_0000, "pl031": 0x0901_0000, "scratch": 0x0A00_0000}


def test_virt_device_file_is_the_virt_board() -> None:
    """deploy/devices/virt.toml is device_specs("aarch64") with both banks on the flash volume, persistent."""
    flash = "/var/lib/mmiosplit/flash"
    board = device_specs("aarch64", flash0=f"{flash}/flash0.img", flash1=f"{flash}/flash1.img", persist=True,
                         write_buffer="direct")
    assert _normal(load_config(DEVICES / "virt.toml")) == _normal(parse_device_specs(board))


def test_scratch_device_is_free_on_the_virt_board() -> None:
    """One VM can use the devices and scratch services together: one bus with both files refuses no overlap."""
    specs = load_config(DEVICES / "virt.toml") + load_config(DEVICES / "scratch.toml")
    assert [s.name for s in specs if s.type == "scratch"] == ["scratch"]
    build_bus(specs)  # flash files with persist=on may be missing: they read as erased flash


@pytest.mark.skipif(not K8S_DEVICE_CONFIG.exists(), reason="no deploy/k8s/ in this checkout")
@pytest.mark.parametrize("name", ["virt.toml", "scratch.toml"])
def test_device_files_are_the_kubernetes_configmaps(name: str, tmp_path: Path) -> None:
    """The compose stack and the Kubernetes manifests run the same boards."""
    data = yaml.safe_load(K8S_DEVICE_CONFIG.read_text())["data"]
    (tmp_path / name).write_text(data[name])
    assert _normal(load_config(tmp_path / name)) == _normal(load_config(DEVICES / name))


def test_compose_file_is_accepted_by_docker_compose() -> None:
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed")
    proc = subprocess.run(["docker-compose", "-f", str(COMPOSE_FILE), "config", "-q"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", ["build-images.sh", "smoke.sh", "dockerd.sh"])
def test_shell_scripts_stop_on_errors(script: str) -> None:
    text = (ROOT / "deploy" / script).read_text()
    if script != "dockerd.sh":  # sourced, so it inherits its caller's options
        assert "\nset -euo pipefail\n" in text
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", "-x", f"deploy/{script}"], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout


def test_dockerfile_defaults_to_the_registry_base_and_runs_mmiosplit() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in text
    assert 'ENTRYPOINT ["mmiosplit"]' in text
    assert re.search(r"^USER \$\{APP_UID\}:\$\{APP_UID\}$", text, re.MULTILINE) and "ARG APP_UID=10001" in text
    assert "--no-index" in text


def test_build_context_is_only_what_the_image_needs() -> None:
    lines = [line for line in Path(ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert lines[0] == "*"
    assert set(lines[1:]) == {"!build/wheelhouse/", "!guests/bin/", "!deploy/devices/"}
