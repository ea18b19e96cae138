"""DeviceBus: decode by address, refuse overlaps, edges, straddles, device errors."""

from __future__ import annotations

import pytest

from device_service.bus import DeviceBus
from device_service.model import AccessError, AccessResult, ConfigError, DeviceModel, RegionSpec
from device_service.models import Pl011, Pl031, ReadAsOnes, ReadAsZero, Scratch

UART, RTC, SCRATCH = 0x0900_0000, 0x0901_0000, 0x0A00_0000


@pytest.fixture
def bus() -> DeviceBus:
    return DeviceBus(
        [
            Scratch("scratch0", SCRATCH, size=0x100),
            Pl011("uart0", UART),
            Pl031("rtc0", RTC, clock=lambda: 42.0),
        ]
    )


def test_regions_sorted_by_base(bus: DeviceBus) -> None:
    assert [r.base for r in bus.regions] == [UART, RTC, SCRATCH]
    assert [d.name for d in bus.devices] == ["scratch0", "uart0", "rtc0"]
    assert bus.regions[0].end == UART + 0x1000


@pytest.mark.parametrize(
    ("address", "name"),
    [(UART, "uart0"), (UART + 0xFFF, "uart0"), (RTC, "rtc0"), (RTC + 0xFFF, "rtc0"),
     (SCRATCH, "scratch0"), (SCRATCH + 0xFF, "scratch0")],
)  # fmt: skip
def test_find_at_region_edges(bus: DeviceBus, address: int, name: str) -> None:
    region = bus.find(address)
    assert region is not None and region.device.name == name


@pytest.mark.parametrize("address", [0, UART - 1, RTC + 0x1000, SCRATCH + 0x100, SCRATCH - 1, (1 << 64) - 1])
def test_find_outside_every_region(bus: DeviceBus, address: int) -> None:
    assert bus.find(address) is None


def test_reads_and_writes_reach_the_device_at_its_offset(bus: DeviceBus) -> None:
    assert bus.write(SCRATCH + 0x10, 4, 0xDEAD_BEEF).ok
    assert bus.read(SCRATCH + 0x10, 4).value == 0xDEAD_BEEF
    assert bus.read(SCRATCH + 0x12, 2).value == 0xDEAD
    assert bus.read(UART + 0x18, 4).value == 0x90
    assert bus.read(RTC, 4).value == 42
    assert bus.write(UART, 1, ord("!")).ok
    uart = bus.device("uart0")
    assert isinstance(uart, Pl011) and uart.tx_log == b"!"


def test_no_device_is_out_of_range_naming_the_address(bus: DeviceBus) -> None:
    result = bus.read(0x1234_5678, 4)
    assert result.error is AccessError.OUT_OF_RANGE
    assert "0x12345678" in result.message
    assert bus.write(0x1234_5678, 4, 0).error is AccessError.OUT_OF_RANGE


def test_access_straddling_the_end_is_refused(bus: DeviceBus) -> None:
    result = bus.read(SCRATCH + 0xFE, 4)
    assert result.error is AccessError.OUT_OF_RANGE
    assert "straddles" in result.message and "scratch0" in result.message
    assert bus.write(SCRATCH + 0xFC, 8, 0).error is AccessError.OUT_OF_RANGE
    assert bus.read(SCRATCH + 0xFC, 4).ok


def test_size_the_region_does_not_take(bus: DeviceBus) -> None:
    result = bus.read(UART + 0x18, 8)
    assert result.error is AccessError.INVALID_ACCESS_SIZE
    assert "uart0" in result.message
    assert bus.read(SCRATCH, 3).error is AccessError.INVALID_ACCESS_SIZE


def test_value_wider_than_the_access_is_refused(bus: DeviceBus) -> None:
    result = bus.write(SCRATCH, 1, 0x100)
    assert result.error is AccessError.INVALID_ACCESS_SIZE
    assert bus.read(SCRATCH, 1).value == 0


def test_device_errors_name_device_and_address(bus: DeviceBus) -> None:
    result = bus.read(UART + 0x08, 4)
    assert result.error is AccessError.INVALID_REGISTER
    assert result.message.startswith("uart0 at 0x9000008:")


def test_overlap_names_both_devices() -> None:
    with pytest.raises(ConfigError) as caught:
        DeviceBus([Pl011("uart0", UART), Scratch("scratch0", UART + 0x800, size=0x1000)])
    assert "uart0" in str(caught.value) and "scratch0" in str(caught.value)


def test_overlap_found_whatever_the_order() -> None:
    with pytest.raises(ConfigError, match=r"rtc0.*uart0|uart0.*rtc0"):
        DeviceBus([Pl031("rtc0", UART + 0xFFF), Pl011("uart0", UART)])


def test_adjacent_regions_are_fine() -> None:
    bus = DeviceBus([Pl011("uart0", UART), Pl031("rtc0", UART + 0x1000)])
    assert bus.find(UART + 0xFFF).device.name == "uart0"  # type: ignore[union-attr]
    assert bus.find(UART + 0x1000).device.name == "rtc0"  # type: ignore[union-attr]


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(ConfigError, match="'uart0'"):
        DeviceBus([Pl011("uart0", UART), Pl011("uart0", RTC)])


def test_region_past_64_bits_is_refused() -> None:
    with pytest.raises(ConfigError, match="64-bit"):
        DeviceBus([ReadAsOnes("top", (1 << 64) - 0x800)])


def test_device_lookup(bus: DeviceBus) -> None:
    assert bus.device("rtc0").type_name == "pl031"
    with pytest.raises(KeyError, match=r"no device named 'uart9'.*rtc0, scratch0, uart0"):
        bus.device("uart9")


def test_reset_resets_every_device(bus: DeviceBus) -> None:
    bus.write(SCRATCH, 8, 0x1122_3344_5566_7788)
    bus.write(UART + 0x24, 4, 0x27)
    bus.reset()
    assert bus.read(SCRATCH, 8).value == 0
    assert bus.read(UART + 0x24, 4).value == 0


class Broken(DeviceModel):
    """A model with a bug: the bus must turn its exception into a device fault."""

    type_name = "broken"
    compatible = ("test,broken",)

    def regions(self) -> list[RegionSpec]:
        return [RegionSpec("regs", 0, 0x10), RegionSpec("more", 0x100, 0x10)]

    def read(self, offset: int, size: int) -> AccessResult:
        raise RuntimeError("oops")

    def write(self, offset: int, size: int, value: int) -> AccessResult:
        raise RuntimeError("oops")

    def reset(self) -> None:
        pass


def test_model_exception_becomes_device_fault() -> None:
    bus = DeviceBus([Broken("b", 0x1000)])
    result = bus.read(0x1004, 4)
    assert result.error is AccessError.DEVICE_FAULT
    assert "b:" in result.message and "RuntimeError: oops" in result.message
    assert bus.write(0x1100, 4, 0).error is AccessError.DEVICE_FAULT


def test_multi_region_device_sees_offsets_from_its_base() -> None:
    bus = DeviceBus([Broken("b", 0x1000)])
    assert [(r.base, r.spec.name) for r in bus.regions] == [(0x1000, "regs"), (0x1100, "more")]
    assert bus.find(0x1010) is None


def test_empty_bus() -> None:
    bus = DeviceBus([])
    assert bus.find(0) is None
    assert bus.read(0, 4).error is AccessError.OUT_OF_RANGE
    bus.reset()


def test_qemu_virt_layout_builds() -> None:
    bus = DeviceBus(
        [
            Pl011("uart0", 0x0900_0000),
            Pl031("rtc0", 0x0901_0000),
            ReadAsZero("fw_cfg", 0x0902_0000),
            ReadAsZero("virtio", 0x0A00_0000, size=0x4000),
            ReadAsOnes("ecam", 0x40_1000_0000, size=0x1000_0000),
        ]
    )
    assert bus.read(0x0A00_3E00, 4).value == 0
    assert bus.read(0x40_1000_8000, 2).value == 0xFFFF
