"""``spec_from_proto``: a VmConfig the service cannot honour is refused with a message, never half accepted."""

from __future__ import annotations

import math
import threading

import pytest

from mmiosplit.mmio import RemoteRegion
from mmiosplit.v1 import common_pb2, vcpu_pb2
from vcpu_service.server import spec_from_proto
from vcpu_service.vm import Vm, VmConfigError, VmSpec


def _config(wall_clock: float) -> vcpu_pb2.VmConfig:
    cfg = vcpu_pb2.VmConfig(architecture=common_pb2.ARCHITECTURE_AARCH64)
    cfg.ram.add(base=0x4000_0000, size=0x10_0000)
    cfg.limits.wall_clock_seconds = wall_clock
    return cfg


@pytest.mark.parametrize("wall_clock", [0.0, 0.5, 3600.0, threading.TIMEOUT_MAX])
def test_a_wall_clock_limit_a_timer_can_wait_for_is_taken(wall_clock: float) -> None:
    assert spec_from_proto(_config(wall_clock)).wall_clock_seconds == wall_clock


# Found by the vcpu-api fuzz target: inf or 1e300 passed the old `< 0` check and killed the limit's
# threading.Timer with "OverflowError: timestamp out of range" (the run then had no limit); NaN passed too.
@pytest.mark.parametrize("wall_clock", [-1.0, math.inf, -math.inf, math.nan, 1e300, threading.TIMEOUT_MAX * 2])
def test_a_wall_clock_limit_no_timer_can_wait_for_is_refused(wall_clock: float) -> None:
    with pytest.raises(VmConfigError, match="wall_clock_seconds must be between 0"):
        spec_from_proto(_config(wall_clock))


# Found by the vcpu-api fuzz target: a 4 KiB-aligned region that wraps past 2**64 passed every check, then
# Unicorn's mem_map_ptr refused it (UC_ERR_ARG) and CreateVm answered INTERNAL.
@pytest.mark.parametrize("architecture", ["aarch64", "arm"])
def test_a_ram_region_past_the_end_of_the_address_space_is_refused(architecture: str) -> None:
    spec = VmSpec(architecture, ram=[(0x4000_0000, 0x10_0000), ((1 << 64) - 0x1000, 0x10_0000)])
    with pytest.raises(VmConfigError, match="runs past the end of the 64-bit address space"):
        Vm(spec, [], ram_cap=1 << 30)


def test_a_ram_region_that_ends_at_the_top_of_the_address_space_is_taken() -> None:
    vm = Vm(VmSpec("aarch64", ram=[((1 << 64) - 0x10_0000, 0x10_0000)], entry_point=(1 << 64) - 0x10_0000), [],
            ram_cap=1 << 30)
    vm.delete()


class _DescribeOnly:
    """A device endpoint that answers Describe with ``regions`` (the VM refuses them before asking more)."""

    def __init__(self, *regions: RemoteRegion) -> None:
        self.name = "svc"
        self.leaving = None
        self.same_clock = False
        self._regions = list(regions)

    def describe(self) -> list[RemoteRegion]:
        return self._regions

    def close(self) -> None:
        pass


def _region(base: int, size: int, romd: bool = False, posted: bool = False) -> RemoteRegion:
    return RemoteRegion("svc", "dev", "fuzz", "regs", base, size, romd, posted, (1, 2, 4, 8), False)


# Found by the exitpath fuzz target (Describe answers read by the gRPC transport): a ROMD region of 2**64-1
# bytes raised OverflowError out of CreateVm; one not made of whole pages, or a posted one past 2**64, made
# Unicorn refuse its mapping once the guest ran, and the run ended with an internal error.
@pytest.mark.parametrize(("region", "message"), [
    (_region((1 << 64) - 0x1000, 0x10_0000, posted=True), "runs past the end of the 64-bit address space"),
    (_region(0x1000, (1 << 64) - 1, romd=True), "runs past the end of the 64-bit address space"),
    (_region(0x0A00_0800, 0x100, romd=True), "not made of whole 4 KiB pages"),
    (_region(0x0A00_0000, 0x1800, romd=True), "not made of whole 4 KiB pages"),
])
def test_a_device_region_the_vcpu_cannot_map_is_refused(region: RemoteRegion, message: str) -> None:
    spec = VmSpec("aarch64", ram=[(0x4000_0000, 0x10_0000)], entry_point=0x4000_0000)
    with pytest.raises(VmConfigError, match=message):
        Vm(spec, [_DescribeOnly(region)], ram_cap=1 << 30)  # type: ignore[list-item]
