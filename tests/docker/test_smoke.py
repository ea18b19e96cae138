"""deploy/smoke.sh, as a person or CI runs it: every step prints PASS and the script exits 0.

The image is the session's (built by the mmiosplit_image fixture), so the script runs with --no-build; its build
path is deploy/build-images.sh, which that fixture ran.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from tests.docker.stack import ROOT

pytestmark = pytest.mark.docker

STEPS = ["engine", "image", "flash", "stack", "port", "hello", "u-boot"]


@pytest.mark.timeout(600)
def test_smoke_script_passes_every_step(mmiosplit_image: str, capsys: pytest.CaptureFixture[str]) -> None:
    t0 = time.monotonic()
    env = {k: v for k, v in os.environ.items() if k not in ("MMIOSPLIT_SUBNET", "MMIOSPLIT_VCPU_PORT")}
    proc = subprocess.run([str(ROOT / "deploy" / "smoke.sh"), "--no-build"], cwd=ROOT, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=540)
    seconds = time.monotonic() - t0
    lines = proc.stdout.splitlines()
    with capsys.disabled():
        print(f"\ndeploy/smoke.sh --no-build: {seconds:.0f} s\n" + "\n".join(lines))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not [line for line in lines if line.startswith("FAIL")]
    passed = [line.split(":")[0].removeprefix("PASS ") for line in lines if line.startswith("PASS ")]
    assert passed == STEPS, lines
