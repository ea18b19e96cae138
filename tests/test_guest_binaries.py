"""The committed guest binaries are what their sources build to (Debian's gcc cross toolchains)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_committed_guest_binaries_match_a_fresh_build() -> None:
    missing = [t for t in ("aarch64-linux-gnu-gcc", "arm-none-eabi-gcc") if shutil.which(t) is None]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must install the guest toolchains; missing {missing}")
        pytest.skip(f"cross toolchains not installed: {missing}")
    proc = subprocess.run(["bash", str(ROOT / "guests" / "build.sh"), "--check"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
