"""Debian's U-Boot for QEMU virt, booted over the split, against Debian's QEMU running the same script.

Both consoles are driven by the same script (a key stops autoboot, then each command at the prompt).
The transcripts must be identical line for line, except the lines listed in ALLOWED, each with the
reason it differs.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from tests.firmware.console import run_uboot_script

pytestmark = [pytest.mark.firmware, pytest.mark.slow]

UBOOT = {"aarch64": Path("/usr/lib/u-boot/qemu_arm64/u-boot.bin"), "arm": Path("/usr/lib/u-boot/qemu_arm/u-boot.bin")}
QEMU = {
    "aarch64": ["qemu-system-aarch64", "-M", "virt", "-cpu", "cortex-a57"],
    "arm": ["qemu-system-arm", "-M", "virt,highmem=off", "-cpu", "cortex-a15"],
}
SCRIPT = [
    "version", "bdinfo", "date", "flinfo", "md.l 0x09010000 1", "mw.l 0x09000000 0x41",
    "setenv foo bar; saveenv; reset", "printenv foo", "bootefi hello", "bootefi selftest",
]
# Lines allowed to differ, and why.
ALLOWED = [
    (re.compile(r"^Date: \d{4}-\d\d-\d\d \(\w+\)\s+Time:\s+\d+:\d\d:\d\d$"),
     "`date` prints the RTC: both read host time, but a few seconds apart"),
    (re.compile(r"^09010000: [0-9a-f]{8} .*$"), "`md.l 0x09010000 1` reads the PL031 counter (seconds since 1970)"),
    (re.compile(r"^Time according to real time clock: .*$"), "the EFI selftest prints the RTC"),
    (re.compile(r"^\d+ bytes read in \d+ ms( \(.*\))?$"), "`load` prints how long it took"),
]


def _require(tool: str) -> None:
    if shutil.which(tool) is None and not Path(tool).exists():
        if os.environ.get("CI"):
            pytest.fail(f"CI must install {tool}")
        pytest.skip(f"{tool} is not installed")


def compare(reference: list[str], ours: list[str]) -> list[str]:
    """Lines that differ and are not allowed to; QEMU's own quit message is dropped first."""
    while reference and not reference[-1]:
        reference.pop()
    if reference and reference[-1].endswith("QEMU: Terminated"):  # QEMU's own message on Ctrl-A X
        reference[-1] = reference[-1].removesuffix("QEMU: Terminated").rstrip()
    while ours and not ours[-1]:
        ours.pop()
    problems = []
    if len(reference) != len(ours):
        problems.append(f"QEMU printed {len(reference)} lines, mmiosplit {len(ours)}")
    for n, (a, b) in enumerate(zip(reference, ours, strict=False), 1):
        if a != b and not any(p.match(a) and p.match(b) for p, _ in ALLOWED):
            problems.append(f"line {n}: QEMU {a!r} / mmiosplit {b!r}")
    return problems


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("arch", ["aarch64", "arm"])
def test_uboot_console_matches_qemu(arch: str, tmp_path: Path) -> None:
    _require(str(UBOOT[arch]))
    _require(QEMU[arch][0])
    images = {}
    for who in ("qemu", "mmiosplit"):
        images[who] = tmp_path / f"{who}-flash1.img"
        with open(images[who], "wb") as f:
            f.truncate(64 << 20)
    qemu = [*QEMU[arch], "-m", "128M", "-nic", "none", "-nographic", "-bios", str(UBOOT[arch]),
            "-drive", f"if=pflash,format=raw,unit=1,file={images['qemu']}"]
    ours = [sys.executable, "-m", "mmiosplit_cli", "run", "--machine", "virt", "--arch", arch, str(UBOOT[arch]),
            "--flash1", str(images["mmiosplit"]), "-q"]
    reference = run_uboot_script(qemu, SCRIPT)
    transcript = run_uboot_script(ours, SCRIPT, timeout=600)
    (tmp_path / "qemu.txt").write_text("\n".join(reference.lines()))
    (tmp_path / "mmiosplit.txt").write_text("\n".join(transcript.lines()))
    lines = transcript.lines()
    assert any(line.startswith("U-Boot 2023.01") for line in lines)
    assert "Summary: 2 failures" in lines
    assert lines.count("Core:  47 devices, 13 uclasses, devicetree: board") == 2 + 1  # boot, reset, selftest reset
    problems = compare(reference.lines(), lines)
    assert not problems, "\n".join(problems[:20])


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("arch", ["aarch64", "arm"])
def test_saveenv_survives_reset_and_a_restart_of_the_whole_stack(arch: str, tmp_path: Path) -> None:
    """With upstream QEMU 7.2.0's buffered programming (--flash-write-buffer direct) and --persist-flash."""
    _require(str(UBOOT[arch]))
    flash1 = tmp_path / "flash1.img"
    with open(flash1, "wb") as f:
        f.truncate(64 << 20)
    ours = [sys.executable, "-m", "mmiosplit_cli", "run", "--machine", "virt", "--arch", arch, str(UBOOT[arch]),
            "--flash1", str(flash1), "--persist-flash", "--flash-write-buffer", "direct", "-q"]
    first = run_uboot_script(ours, ["setenv foo bar; saveenv; reset", "printenv foo"], timeout=600).lines()
    assert "Writing to Flash... done" in first
    assert first.count("Loading Environment from Flash... OK") == 1  # after the reset
    assert "foo=bar" in first
    again = run_uboot_script(ours, ["printenv foo"], timeout=600).lines()  # new services, same flash file
    assert "Loading Environment from Flash... OK" in again and "foo=bar" in again


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "modern"])
@pytest.mark.parametrize("arch", ["aarch64", "arm"])
def test_uboot_reads_a_fat_disk_behind_virtio_blk_as_under_qemu(arch: str, legacy: bool, tmp_path: Path) -> None:
    """`virtio scan`, `virtio info`, `ls virtio 0` and `load`: virtio-blk's DMA and its used-ring interrupt line
    (U-Boot polls, but the line must not disturb it), on the transport version QEMU's virt gives and the other."""
    from tests.firmware.test_edk2 import _fat_image

    _require(str(UBOOT[arch]))
    _require(QEMU[arch][0])
    disk = _fat_image(tmp_path / "fat.img")
    qemu = [*QEMU[arch], "-m", "128M", "-nic", "none", "-nographic", "-bios", str(UBOOT[arch]),
            "-drive", f"if=none,id=hd0,format=raw,file={disk}", "-device", "virtio-blk-device,drive=hd0"]
    ours = [sys.executable, "-m", "mmiosplit_cli", "run", "--machine", "virt", "--arch", arch, str(UBOOT[arch]),
            "--drive", str(disk), "-q"]
    if not legacy:
        qemu[qemu.index("-device"):qemu.index("-device")] = ["-global", "virtio-mmio.force-legacy=false"]
        ours.insert(-1, "--drive-modern")
    # `qfw cpus`: fw_cfg over DMA. U-Boot arm writes the DMA address with one STRD, which has no syndrome: KVM
    # refuses it, QEMU's TCG and mmiosplit split it into two 4-byte writes, lower address first.
    script = ["virtio scan", "virtio info", "ls virtio 0", "load virtio 0 0x40200000 HELLO.TXT",
              "md.b 0x40200000 0x10", "qfw cpus"]
    reference = run_uboot_script(qemu, script)
    transcript = run_uboot_script(ours, script, timeout=600)
    lines = transcript.lines()
    assert any("HELLO.TXT" in line for line in lines)
    problems = compare(reference.lines(), lines)
    assert not problems, "\n".join(problems[:20])
