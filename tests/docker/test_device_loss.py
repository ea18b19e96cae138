"""A device container killed or stopped mid-run, on a real Docker engine: the run ends with an error naming the
access, a stop drains without losing one, nothing else restarts, and a restarted container serves a new run."""

from __future__ import annotations

import re
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from tests.docker.stack import ClientResult, Stack

pytestmark = pytest.mark.docker

STR_W2 = 0xB9000002
# x0 = 0x0b000000 (the stack's scratch device); x2 = 0; 1: str w2, [x0]; add x2, x2, #1; b 1b
COUNT_FOREVER = [0xD2A16000, 0xD2800002, STR_W2, 0x91000442, 0x17FFFFFE]
# the same, 100 times, then PSCI SYSTEM_OFF
COUNT_100 = [0xD2A16000, 0xD2800002, STR_W2, 0x91000442, 0xF101905F, 0x54FFFFA1, 0xD2800100, 0xF2B08000, 0xD4000002]
DEADLINE_MS = 3000
OTHERS = ("vcpu", "devices", "guests")


def _guest(tmp_path: Path, name: str, words: list[int]) -> dict[str, dict[str, str]]:
    """The guest as a file a client container (a non-root user) can read, and the volume that shows it."""
    tmp_path.chmod(0o755)
    image = tmp_path / name
    image.write_bytes(struct.pack(f"<{len(words)}I", *words))
    image.chmod(0o644)
    return {str(tmp_path): {"bind": "/guest", "mode": "ro"}}


def _start_run(stack: Stack, volumes: dict[str, dict[str, str]], name: str) -> Any:
    """``mmiosplit run`` of the guest against `guests` (its UART) and `scratch`, its events on stderr; returns once
    the guest runs."""
    client = stack.start_client(
        "run", f"/guest/{name}", "--vcpu-service", stack.addresses["vcpu"], "--device-service",
        stack.addresses["guests"], "--device-service", stack.addresses["scratch"], "--on-device-error", "stop",
        "--deadline-ms", str(DEADLINE_MS), "--events", volumes=volumes)
    deadline = time.monotonic() + 60
    while b"vcpu_started" not in client.logs(stdout=False, stderr=True):
        client.reload()
        assert client.status in ("created", "running") and time.monotonic() < deadline, \
            client.logs().decode(errors="replace")
        time.sleep(0.1)
    time.sleep(1.0)  # a second of writes
    return client


def _states(stack: Stack) -> dict[str, tuple[str, int, bool]]:
    out = {}
    for service in OTHERS:
        attrs = stack.container(service).attrs
        out[service] = (attrs["State"]["StartedAt"], attrs["RestartCount"], attrs["State"]["Running"])
    return out


def _completed_exits(result: ClientResult) -> int:
    found = re.search(r"; (\d+) exits", result.stderr)
    assert found, result.stderr
    return int(found.group(1))


def _scratch_writes(log: str) -> int:
    found = re.findall(r"accesses served: .*?scratch/\w+ writes (\d+)", log)
    assert found, f"the scratch service logged no count of writes:\n{log[-3000:]}"
    return int(found[-1])


def _restore(stack: Stack, scratch: Any) -> None:
    scratch.start()
    stack.wait_healthy(("scratch",), timeout=60)


def _assert_names_the_access(reason: str) -> None:
    for needle in ("write of scratch", "at 0xb000000", f"instruction 0x{STR_W2:08x}", "pc 0x400800"):
        assert needle in reason, reason
    assert "watch" not in reason and "shadow" not in reason, reason


def test_docker_kill_of_the_scratch_container_ends_the_run_naming_the_access(compose_stack: Stack,
                                                                              tmp_path: Path) -> None:
    volumes = _guest(tmp_path, "count.bin", COUNT_FOREVER)
    before = _states(compose_stack)
    scratch = compose_stack.scratch_container()
    client = _start_run(compose_stack, volumes, "count.bin")
    killed_at = time.monotonic()
    scratch.kill()
    try:
        client.wait(timeout=DEADLINE_MS / 1000 + 30)
        ended = time.monotonic() - killed_at
        result = compose_stack.finish_client(client)
    finally:
        _restore(compose_stack, scratch)
    # The vCPU tries to resume its session until the exit deadline (the service might come back), then the run
    # ends. Measured from outside, so with the client's own exit and Docker's report: an upper bound.
    print(f"docker kill -> the run's end: {ended:.2f} s (deadline {DEADLINE_MS} ms)")
    assert ended < DEADLINE_MS / 1000 + 1.0, (ended, result.stderr)
    assert result.exit_code == 1, result
    final = result.stderr.strip().splitlines()[-1]
    assert final.startswith("mmiosplit: error: "), result.stderr
    _assert_names_the_access(final)
    assert _states(compose_stack) == before  # no other container restarted or stopped


def test_docker_stop_of_the_scratch_container_drains_without_losing_an_access(compose_stack: Stack,
                                                                               tmp_path: Path) -> None:
    volumes = _guest(tmp_path, "count.bin", COUNT_FOREVER)
    before = _states(compose_stack)
    scratch = compose_stack.scratch_container()
    client = _start_run(compose_stack, volumes, "count.bin")
    stopped_at = time.monotonic()
    scratch.stop(timeout=15)
    stop_took = time.monotonic() - stopped_at
    try:
        result = compose_stack.finish_client(client, timeout=60)
        scratch.reload()
        code = scratch.attrs["State"]["ExitCode"]
        log = scratch.logs().decode(errors="replace")
    finally:
        _restore(compose_stack, scratch)
    assert code == 0 and stop_took < 10, (code, stop_took, log[-2000:])
    assert "device_service_left" in result.stderr and "shutting down (SIGTERM)" in result.stderr, result.stderr
    assert result.exit_code == 1, result
    final = result.stderr.strip().splitlines()[-1]
    _assert_names_the_access(final)
    assert "has gone away" in final and "was not sent" in final, final
    # Every write the guest completed reached the device, and no other did.
    print(f"docker stop took {stop_took:.2f} s; writes completed {_completed_exits(result)}, served "
          f"{_scratch_writes(log)}")
    assert _scratch_writes(log) == _completed_exits(result) > 0, (log[-2000:], result.stderr)
    assert _states(compose_stack) == before


def test_after_a_restart_of_the_scratch_container_a_new_run_succeeds(compose_stack: Stack, tmp_path: Path) -> None:
    """The vcpu service is not restarted: a new VM reaches the restarted container."""
    volumes = _guest(tmp_path, "count100.bin", COUNT_100)
    vcpu_started = compose_stack.container("vcpu").attrs["State"]["StartedAt"]
    scratch = compose_stack.scratch_container()
    scratch.restart(timeout=15)
    compose_stack.wait_healthy(("scratch",), timeout=60)
    result = compose_stack.run_client(
        "run", "/guest/count100.bin", "--vcpu-service", compose_stack.addresses["vcpu"], "--device-service",
        compose_stack.addresses["guests"], "--device-service", compose_stack.addresses["scratch"], timeout=120,
        volumes=volumes)
    assert result.exit_code == 0 and "powered off" in result.stderr, result
    assert _completed_exits(result) == 100, result.stderr
    assert compose_stack.container("vcpu").attrs["State"]["StartedAt"] == vcpu_started
