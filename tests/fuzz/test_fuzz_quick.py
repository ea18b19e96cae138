"""A short, seeded run of every fuzz target: part of the default test run, so a regression the targets catch
fails CI. Each runs its ``TestOneInput`` in a plain loop over inputs from ``random.Random(seed)`` (the same every
run, so a failure reproduces), not under libFuzzer, which exits the process on the first crash. A finding fails
the test with its input (hex) and traceback. One test also runs the campaign command under atheris for a few
hundred inputs, in a subprocess, so the libFuzzer path keeps working.
"""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import device_service.server
from tests.fuzz.campaign import TARGETS
from tests.fuzz.common import random_loop

pytestmark = pytest.mark.fuzz_quick

#: Inputs per target: with the two campaign tests, about 20 s on the 2-vCPU CI machine when it is idle.
QUICK_INPUTS = {"decode": 10000, "models": 1200, "device-service": 1500, "vcpu-api": 600, "exitpath": 200}
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _process_state_restored() -> Iterator[None]:
    """The targets quieten the services' logger, shorten the device service's DMA timeout and hook thread
    exceptions for their own runs; the tests after these must see none of it."""
    logger = logging.getLogger("mmiosplit")
    level, handlers, propagate = logger.level, list(logger.handlers), logger.propagate
    dma_timeout = device_service.server.DMA_TIMEOUT_S
    excepthook = threading.excepthook
    yield
    logger.setLevel(level)
    logger.handlers[:] = handlers
    logger.propagate = propagate
    device_service.server.DMA_TIMEOUT_S = dma_timeout
    threading.excepthook = excepthook


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_target_holds_for_seeded_inputs(target: str) -> None:
    module_name, _engine, max_len = TARGETS[target]
    module = importlib.import_module(module_name)
    threads_before = threading.active_count()
    report = random_loop(module.TestOneInput, QUICK_INPUTS[target], seed=12, max_len=max_len, stop_after=3)
    assert report.inputs == QUICK_INPUTS[target] or report.findings
    details = "\n\n".join(f"input {data.hex()}:\n{text}" for data, text in report.findings)
    assert not report.findings, f"{len(report.findings)} finding(s) in {report.inputs} inputs:\n{details}"
    assert threading.active_count() <= threads_before + 40, "threads pile up across inputs"


def test_every_target_has_a_quick_run() -> None:
    assert set(QUICK_INPUTS) == set(TARGETS)


def test_the_campaign_command_runs_atheris_and_reports_the_inputs(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "tests.fuzz.campaign", "--target", "decode", "--inputs", "500",
                           "--seed", "3", "--artifacts", str(tmp_path / "artifacts")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "inputs tried: 500 " in done.stdout and "findings: 0" in done.stdout, done.stdout


def test_a_finding_fails_the_campaign_and_keeps_the_input(tmp_path: Path) -> None:
    """The campaign must not pass silently when a target raises: libFuzzer's crash becomes exit status 1."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), MMIOSPLIT_FUZZ_SELFTEST="1")
    done = subprocess.run([sys.executable, "-m", "tests.fuzz.campaign", "--target", "decode", "--inputs", "100000",
                           "--artifacts", str(tmp_path / "artifacts")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "findings: 1" in done.stdout, done.stdout
    assert list((tmp_path / "artifacts").glob("crash-*")), done.stdout
