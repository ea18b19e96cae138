"""Debian's U-Boot for QEMU virt (arm64) booted to its prompt with ``run --record``; the recording replayed against
the Python device service (0 divergences), against one with a changed PL011 (a divergence at its register), and
served as a device double that U-Boot boots against again, printing the same console."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tests.firmware.console import run_uboot_script
from tests.firmware.test_uboot import UBOOT, _require
from tests.record.helpers import device_double, device_service, mmiosplit

pytestmark = [pytest.mark.firmware, pytest.mark.slow]

ARCH = "aarch64"


def _flash1(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(64 << 20)
    return path


def _board(flash1: Path) -> list[str]:
    """The virt board's devices as ``run --machine virt`` gives them (the same flash contents)."""
    from vcpu_service.machines.virt import device_specs

    return device_specs(ARCH, flash0=str(UBOOT[ARCH]), flash1=str(flash1))


@pytest.fixture(scope="module")
def uboot_recording(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """The recording of a boot to the prompt, and the console lines it printed."""
    _require(str(UBOOT[ARCH]))
    where = tmp_path_factory.mktemp("uboot-record")
    recording = where / "uboot.rec"
    command = [sys.executable, "-m", "mmiosplit_cli", "run", "--machine", "virt", "--arch", ARCH, str(UBOOT[ARCH]),
               "--flash1", str(_flash1(where / "flash1.img")), "--record", str(recording)]
    transcript = run_uboot_script(command, [], timeout=600)
    lines = transcript.lines()
    assert any(line.startswith("U-Boot 2023.01") for line in lines)
    assert re.search(r"recorded \d+ records \(\d+ bytes\)", transcript.text)
    return recording, lines


@pytest.mark.timeout(900)
def test_uboot_boot_replays_against_the_device_service_without_divergence(
        uboot_recording: tuple[Path, list[str]], tmp_path: Path) -> None:
    recording, _ = uboot_recording
    with device_service(tmp_path, _board(_flash1(tmp_path / "flash1.img"))) as address:
        proc = mmiosplit("replay", str(recording), "--device-service", address, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = re.fullmatch(r"0 divergences, (\d+) exchanges \(\d+ records, [\d.]+ s\)\n", proc.stdout)
    assert found and int(found.group(1)) > 1000, proc.stdout  # the boot's exits and posted flash batches
    assert "properties['file']" in proc.stderr  # flash1's file differs: a note, not a divergence


@pytest.mark.timeout(900)
def test_uboot_boot_replay_finds_a_changed_pl011(uboot_recording: tuple[Path, list[str]], tmp_path: Path) -> None:
    recording, _ = uboot_recording
    with device_service(tmp_path, _board(_flash1(tmp_path / "flash1.img")), changed="cr") as address:
        proc = mmiosplit("replay", str(recording), "--device-service", address, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "device:   uart0 at 0x9000030" in proc.stdout, proc.stdout  # UARTCR
    assert "shadow.values" in proc.stdout


@pytest.mark.timeout(900)
def test_uboot_boots_against_the_device_double(uboot_recording: tuple[Path, list[str]], tmp_path: Path) -> None:
    recording, recorded_lines = uboot_recording
    with device_double(tmp_path, recording) as (address, proc, log):
        command = [sys.executable, "-m", "mmiosplit_cli", "run", "--machine", "virt", "--arch", ARCH,
                   "--device-service", address]
        lines = run_uboot_script(command, [], timeout=600).lines()
    assert proc.returncode == 0, log.read_text()
    assert "0 divergences" in log.read_text()

    def console(transcript: list[str]) -> list[str]:
        return [line for line in transcript if line and not line.startswith("mmiosplit:")]

    assert console(lines) == console(recorded_lines)


@pytest.mark.timeout(1200)
def test_uboot_commands_reset_and_the_rtc_replay_without_divergence(tmp_path: Path) -> None:
    """A session with the RTC read twice (its data is the host's clock: not compared, and counted) and a `reset`
    (Reset and the mirrors read again, in the recorded order), replayed against a fresh device service."""
    _require(str(UBOOT[ARCH]))
    recording = tmp_path / "session.rec"
    command = [sys.executable, "-m", "mmiosplit_cli", "run", "--machine", "virt", "--arch", ARCH, str(UBOOT[ARCH]),
               "--flash1", str(_flash1(tmp_path / "flash1.img")), "--record", str(recording)]
    lines = run_uboot_script(command, ["version", "date", "md.l 0x09010000 1", "reset"], timeout=600).lines()
    assert sum(line.startswith("U-Boot 2023.01") for line in lines) >= 2  # booted again after the reset
    with device_service(tmp_path, _board(_flash1(tmp_path / "flash1-replay.img"))) as address:
        proc = mmiosplit("replay", str(recording), "--device-service", address, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = re.search(r"(\d+) clock-dependent reads' data not compared", proc.stdout)
    assert found and int(found.group(1)) >= 2, proc.stdout  # `date` and `md.l` of RTCDR
