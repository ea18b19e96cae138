"""The virt profile's device tree against the one QEMU 7.2 itself builds for the same machine."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from mmiosplit.mmio import RemoteRegion
from vcpu_service.fdt import walk
from vcpu_service.machines.virt import VirtMachine

SEEDS = ("rng-seed", "kaslr-seed")


def _region(compatible: str, base: int, size: int) -> RemoteRegion:
    return RemoteRegion("svc", "dev", "type", "regs", base, size, False, False, (4,), False, (compatible,))


def _virt_regions(arch: str) -> list[RemoteRegion]:
    regions = [
        _region("cfi-flash", 0, 0x400_0000), _region("cfi-flash", 0x400_0000, 0x400_0000),
        _region("arm,pl011", 0x900_0000, 0x1000), _region("arm,pl031", 0x901_0000, 0x1000),
        _region("qemu,fw-cfg-mmio", 0x902_0000, 0x18), _region("arm,pl061", 0x903_0000, 0x1000),
    ]
    regions += [_region("virtio,mmio", 0xA00_0000 + 0x200 * i, 0x200) for i in range(32)]
    ecam = (0x40_1000_0000, 0x1000_0000) if arch == "aarch64" else (0x3F00_0000, 0x100_0000)
    regions.append(_region("pci-host-ecam-generic", *ecam))
    return regions


def _qemu_dtb(arch: str, smp: int, tmp_path: Path) -> bytes:
    binary = "qemu-system-aarch64" if arch == "aarch64" else "qemu-system-arm"
    if shutil.which(binary) is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must install {binary} (Debian qemu-system-arm)")
        pytest.skip(f"{binary} not installed")
    out = tmp_path / f"{arch}.dtb"
    machine = "virt" if arch == "aarch64" else "virt,highmem=off"
    cpu = "cortex-a57" if arch == "aarch64" else "cortex-a15"
    subprocess.run([binary, "-machine", f"{machine},dumpdtb={out}", "-cpu", cpu, "-smp", str(smp), "-m", "128M",
                    "-nic", "none", "-nographic"], check=True, capture_output=True, timeout=60)
    return out.read_bytes()


@pytest.mark.parametrize("arch", ["aarch64", "arm"])
@pytest.mark.parametrize("smp", [1, 2])
def test_same_tree_as_qemu(arch: str, smp: int, tmp_path: Path) -> None:
    reference = _qemu_dtb(arch, smp, tmp_path)
    cpu = "cortex-a57" if arch == "aarch64" else "cortex-a15"
    ours = VirtMachine(arch, cpu, smp, (0x4000_0000, 128 << 20), _virt_regions(arch)).dtb()
    assert len(ours) == len(reference) == 1 << 20
    theirs = list(walk(reference))
    mine = list(walk(ours))
    assert [p for p, _ in mine] == [p for p, _ in theirs]
    for (path, props), (_, ref_props) in zip(mine, theirs, strict=True):
        assert list(props) == list(ref_props), path
        for name, value in ref_props.items():
            if name in SEEDS:
                assert len(props[name]) == len(value)
            else:
                assert props[name] == value, f"{path}:{name}"


def test_devices_not_described_get_no_node() -> None:
    ours = VirtMachine("aarch64", "cortex-a57", 1, (0x4000_0000, 64 << 20),
                       [_region("arm,pl011", 0x900_0000, 0x1000)]).dtb(seed=bytes(40))
    paths = [p for p, _ in walk(ours)]
    assert "/pl011@9000000" in paths and "/flash@0" not in paths and "/pl031@9010000" not in paths
    chosen = dict(walk(ours))["/chosen"]
    assert chosen["stdout-path"] == b"/pl011@9000000\0" and chosen["rng-seed"] == bytes(32)
    memory = dict(walk(ours))["/memory@40000000"]["reg"]
    assert memory == (0x4000_0000).to_bytes(8, "big") + (64 << 20).to_bytes(8, "big")
