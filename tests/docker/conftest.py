"""Fixtures for the tests on a real Docker engine (marked ``docker``): the engine, the image, the compose stack.

Without an engine these tests skip, saying why, so the README's test command needs no Docker. CI sets
MMIOSPLIT_REQUIRE_DOCKER=1 (and starts an engine, .ci/run): there a missing engine, SDK or compose fails them.
The image is built once per session with deploy/build-images.sh, and one stack serves the whole session;
tests that break a container (kill, stop) restore it before they end, or the next test sees the damage.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any, NoReturn

import pytest

from tests.docker.stack import IMAGE, ROOT, UBOOT, Stack, StackError, compose_command, free_port, free_subnet

REGISTRY_BASE = "python:3.11-slim"


def docker_required() -> bool:
    """CI's switch: a missing engine is a failure, not a skip."""
    return os.environ.get("MMIOSPLIT_REQUIRE_DOCKER", "") == "1"


def unavailable(reason: str) -> NoReturn:
    if docker_required():
        pytest.fail(f"MMIOSPLIT_REQUIRE_DOCKER=1, but {reason}", pytrace=False)
    pytest.skip(f"docker tests skipped: {reason}")


@pytest.fixture(scope="session")
def docker_client() -> Iterator[Any]:
    """A client of the engine that answers (skip, or fail under MMIOSPLIT_REQUIRE_DOCKER=1, when none does)."""
    try:
        import docker  # the dev extra; imported here so collection never needs it
    except ImportError:
        unavailable("the docker Python SDK is not installed (python3 -m pip install -e '.[dev]')")
    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except Exception as exc:
        unavailable(f"no Docker engine answers ({exc.__class__.__name__}: {exc}); .ci/run starts one")
    yield client
    client.close()


@pytest.fixture(scope="session")
def mmiosplit_image(docker_client: Any, pytestconfig: pytest.Config) -> str:
    """mmiosplit:dev built from this checkout, once per session (on the debootstrap base when no registry base)."""
    args = [] if _has_image(docker_client, REGISTRY_BASE) else ["--local-base"]
    t0 = time.monotonic()
    proc = subprocess.run([str(ROOT / "deploy" / "build-images.sh"), *args, "--tag", IMAGE], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"deploy/build-images.sh {' '.join(args)} failed ({proc.returncode}):\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}", pytrace=False)
    _say(pytestconfig, f"deploy/build-images.sh {' '.join(args)}: {IMAGE} in {time.monotonic() - t0:.0f} s")
    return IMAGE


def _say(config: pytest.Config, line: str) -> None:
    """A line on the terminal even while output is captured (how long the session's build took)."""
    capture = config.pluginmanager.get_plugin("capturemanager")
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if capture is None or reporter is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("\n" + line)


def _has_image(client: Any, name: str) -> bool:
    try:
        client.images.get(name)
    except Exception:
        return False
    return True


@pytest.fixture(scope="session")
def compose_stack(docker_client: Any, mmiosplit_image: str) -> Iterator[Stack]:
    """deploy/compose.yaml up under a unique project name (its own subnet and host port), torn down at the end.

    U-Boot (u-boot-qemu), when it is installed, goes onto the flash volume as flash0.img before `devices` starts;
    without it the virt board's flash is erased, and the stack comes up all the same.
    """
    compose = compose_command()
    if compose is None:
        unavailable("neither docker-compose nor 'docker compose' is installed (apt-get install docker-compose)")
    stack = Stack(docker_client, compose, f"mmiosplittest{uuid.uuid4().hex[:8]}", mmiosplit_image,
                  free_subnet(docker_client, first=100), free_port())
    try:
        if UBOOT.exists():
            stack.load_flash("flash0.img", UBOOT)
        stack.up()
    except (StackError, subprocess.TimeoutExpired) as exc:
        stack.down()
        pytest.fail(f"the compose stack did not come up: {exc}", pytrace=False)
    try:
        yield stack
    finally:
        stack.down()
