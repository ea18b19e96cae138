"""Debian's EDK2 for QEMU virt (AAVMF) booted over the split to its UEFI Shell, against Debian's QEMU.

Both run the same flash images and a FAT image the test makes behind a virtio-blk device at virtio-mmio slot 31
(QEMU: ``-device virtio-blk-device``). The shell's answers to the same commands must be identical; the time
to ``Shell>`` of each is printed (the README quotes it).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.firmware.console import run_shell_script
from tests.firmware.test_uboot import _require

pytestmark = [pytest.mark.firmware, pytest.mark.slow]

CODE = Path("/usr/share/AAVMF/AAVMF_CODE.fd")
VARS = Path("/usr/share/AAVMF/AAVMF_VARS.fd")
SCRIPT = ["ver", "map", "ls fs0:\\", "type fs0:\\HELLO.TXT"]
HELLO = "hello from a FAT image the test made\n"


def _fat_image(path: Path) -> Path:
    _require("mkfs.fat")
    _require("mcopy")
    subprocess.run(["mkfs.fat", "-C", "-n", "MMIOSPLIT", str(path), "16384"], check=True, capture_output=True)
    hello = path.with_name("hello.txt")
    hello.write_text(HELLO)
    # A fixed timestamp, so `ls` prints the same date under both.
    subprocess.run(["touch", "-d", "2026-01-02 03:04:00", str(hello)], check=True)
    subprocess.run(["mcopy", "-m", "-i", str(path), str(hello), "::HELLO.TXT"], check=True, capture_output=True)
    return path


def _shell_answers(text: str) -> list[str]:
    """Everything from the first command on, without escapes, carriage returns or trailing blanks."""
    clean = re.sub(r"\x1b\[[0-9;?=]*[A-Za-z]", "", text.replace("\r", ""))
    lines = [line.rstrip() for line in clean.split("\n")]
    start = next(i for i, line in enumerate(lines) if line.startswith("Shell> ver"))
    answers = lines[start:]
    while answers and (not answers[-1] or answers[-1].startswith(("mmiosplit:", "QEMU:"))):
        answers.pop()
    if answers:
        answers[-1] = answers[-1].removesuffix("QEMU: Terminated").rstrip()  # QEMU's own message on Ctrl-A X
    return answers


@pytest.mark.timeout(600)
def test_edk2_reaches_its_shell_and_reads_a_fat_disk_as_under_qemu(tmp_path: Path) -> None:
    for tool in (str(CODE), str(VARS), "qemu-system-aarch64"):
        _require(tool)
    disk = _fat_image(tmp_path / "fat.img")
    qemu_vars, our_vars = tmp_path / "qemu-vars.fd", tmp_path / "vars.fd"
    shutil.copy(VARS, qemu_vars)
    shutil.copy(VARS, our_vars)
    qemu = ["qemu-system-aarch64", "-M", "virt", "-cpu", "cortex-a57", "-m", "512M", "-nographic", "-nic", "none",
            "-drive", f"if=pflash,format=raw,readonly=on,file={CODE}",
            "-drive", f"if=pflash,format=raw,file={qemu_vars}",
            "-drive", f"if=none,id=hd0,format=raw,file={disk}", "-device", "virtio-blk-device,drive=hd0"]
    ours = [sys.executable, "-m", "mmiosplit_cli", "run", "--machine", "virt", "--ram", "512M", str(CODE),
            "--flash1", str(our_vars), "--drive", str(disk), "-q"]
    reference = run_shell_script(qemu, "Shell>", SCRIPT)
    transcript = run_shell_script(ours, "Shell>", SCRIPT, timeout=300)  # 21 s here: a hang must not cost 10 min
    print(f"Shell> after {transcript.marks['prompt']:.1f} s over the split, {reference.marks['prompt']:.1f} s "
          "under QEMU")
    answers = _shell_answers(transcript.text)
    assert "UEFI Interactive Shell v2.2" in answers
    assert any("FS0: Alias(s):F0:;BLK0:" in line for line in answers)
    assert HELLO.strip() in answers
    assert answers == _shell_answers(reference.text)
