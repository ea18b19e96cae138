"""The vcpu side of interrupt lines and DMA: line routing into the GIC with generation ordering, QEMU virt's
wiring, DMA window checks, and a VM over the in-process transport."""

from __future__ import annotations

import logging
import struct
import time

import pytest

from device_service.bus import DeviceBus
from device_service.local import LocalEndpoint
from device_service.models.dma_probe import DmaProbe
from device_service.models.pl011 import Pl011
from mmiosplit.mmio import DmaError, DmaWindow, LineChange, RemoteLine, RemoteRegion
from vcpu_service.dma import GuestDma, check_windows
from vcpu_service.gic import GICD_ISPENDR, Gic
from vcpu_service.irq import IrqRouter, Route
from vcpu_service.machines.virt import board_services, line_routes
from vcpu_service.memory import RamBlock
from vcpu_service.vm import ImageSpec, IrqRouteSpec, Vm, VmConfigError, VmSpec


def spi_pending(gic: Gic, spi: int) -> bool:
    irq = 32 + spi
    return bool(gic.dist_read(0, GICD_ISPENDR + 4 * (irq // 32), 4) >> (irq % 32) & 1)


def change(generation: int, *levels: tuple[str, int, bool], service: str = "devs") -> LineChange:
    return LineChange(service, generation, levels)


# ----- the router -----------------------------------------------------------------------------------------

def test_a_level_line_drives_its_spi_and_older_generations_are_ignored() -> None:
    gic = Gic(1)
    router = IrqRouter(gic, {("devs", "uart0", 0): Route(1)})
    router.apply(change(5, ("uart0", 0, True)))  # e.g. on a completion
    assert spi_pending(gic, 1) and router.level("devs", "uart0", 0)
    router.apply(change(4, ("uart0", 0, False)))  # a watch event that lagged behind: older, ignored
    assert spi_pending(gic, 1) and router.stale == 1
    router.apply(change(5, ("uart0", 0, True)))  # the same generation again: harmless
    router.apply(change(6, ("uart0", 0, False)))
    assert not spi_pending(gic, 1) and router.generation("devs", "uart0", 0) == 6


def test_generations_are_per_service() -> None:
    gic = Gic(1)
    router = IrqRouter(gic, {("a", "d", 0): Route(3), ("b", "d", 0): Route(4)})
    router.apply(change(9, ("d", 0, True), service="a"))
    router.apply(change(1, ("d", 0, True), service="b"))
    assert spi_pending(gic, 3) and spi_pending(gic, 4)


def test_lines_sharing_an_spi_are_wired_or() -> None:
    gic = Gic(1)
    router = IrqRouter(gic, {("devs", "x", 0): Route(2), ("devs", "y", 0): Route(2)})
    router.apply(change(1, ("x", 0, True)))
    router.apply(change(2, ("y", 0, True)))
    router.apply(change(3, ("x", 0, False)))
    assert spi_pending(gic, 2)
    router.apply(change(4, ("y", 0, False)))
    assert not spi_pending(gic, 2)


def test_an_edge_line_sets_pending_on_a_rising_change_only() -> None:
    gic = Gic(1)
    router = IrqRouter(gic, {("devs", "v", 0): Route(16, edge=True)})
    router.apply(change(1, ("v", 0, True)))
    assert spi_pending(gic, 16)  # latched, although the SPI is configured level-sensitive (the reset value)
    gic.dist_write(0, 0x280 + 4, 4, 1 << 16)  # ICPENDR: the guest clears it
    router.apply(change(2, ("v", 0, False)))
    assert not spi_pending(gic, 16)
    router.apply(change(3, ("v", 0, True)))
    assert spi_pending(gic, 16)


def test_an_unrouted_line_is_logged_once_and_ignored(caplog: pytest.LogCaptureFixture) -> None:
    router = IrqRouter(Gic(1), {}, "vm1")
    with caplog.at_level(logging.INFO, logger="mmiosplit.vcpu"):
        router.apply(change(1, ("mystery", 2, True)))
        router.apply(change(2, ("mystery", 2, False)))
        router.apply(change(3, ("mystery", 2, True)))
    notes = [r.getMessage() for r in caplog.records if "not wired" in r.getMessage()]
    assert len(notes) == 1 and "line 2 of mystery on devs" in notes[0] and "--irq mystery.2=SPI" in notes[0]


def test_resync_raises_what_is_high_after_a_gic_reset() -> None:
    gic = Gic(1)
    router = IrqRouter(gic, {("devs", "u", 0): Route(1)})
    router.apply(change(1, ("u", 0, True)))
    gic.reset()
    assert not spi_pending(gic, 1)
    router.resync()
    assert spi_pending(gic, 1)


# ----- virt's wiring --------------------------------------------------------------------------------------

def _region(device: str, name: str, base: int, compatible: str, service: str = "board") -> RemoteRegion:
    return RemoteRegion(service, device, "t", name, base, 0x200, False, False, (4,), False, (compatible,))


def _line(device: str, index: int, name: str, compatible: str, service: str = "board") -> RemoteLine:
    return RemoteLine(service, device, index, name, "level", "t", (compatible,))


def test_virt_wires_the_board_as_qemu_does() -> None:
    regions = [_region("uart0", "regs", 0x0900_0000, "arm,pl011"), _region("uart1", "regs", 0x0904_0000, "arm,pl011"),
               _region("rtc0", "regs", 0x0901_0000, "arm,pl031"), _region("gpio0", "regs", 0x0903_0000, "arm,pl061"),
               _region("virtio", "slot0", 0x0A00_0000, "virtio,mmio"),
               _region("virtio", "slot3", 0x0A00_0600, "virtio,mmio"),
               _region("pcie", "ecam", 0x40_1000_0000, "pci-host-ecam-generic"),
               _region("dma0", "regs", 0x0A20_0000, "vendor,thing", service="third")]
    lines = [_line("uart1", 0, "uartintr", "arm,pl011"), _line("uart0", 0, "uartintr", "arm,pl011"),
             _line("rtc0", 0, "rtcintr", "arm,pl031"), _line("gpio0", 0, "gpiointr", "arm,pl061"),
             _line("virtio", 0, "slot0", "virtio,mmio"), _line("virtio", 3, "slot3", "virtio,mmio"),
             *(_line("pcie", i, f"int{p}", "pci-host-ecam-generic") for i, p in enumerate("abcd")),
             _line("dma0", 0, "done", "vendor,thing", service="third")]
    routes = {key: route.spi for key, route in line_routes(lines, regions).items()}
    assert routes == {("board", "uart0", 0): 1, ("board", "uart1", 0): 2, ("board", "rtc0", 0): 2,
                      ("board", "gpio0", 0): 7, ("board", "virtio", 0): 16, ("board", "virtio", 3): 19,
                      ("board", "pcie", 0): 3, ("board", "pcie", 1): 4, ("board", "pcie", 2): 5,
                      ("board", "pcie", 3): 6}  # the third-party device gets nothing from its type
    assert board_services(regions) == ["board"]


# ----- DMA windows ----------------------------------------------------------------------------------------

@pytest.fixture
def ram() -> RamBlock:
    block = RamBlock(0x4000_0000, 0x10_0000)
    yield block
    block.close()


def test_dma_inside_a_window_reads_and_writes_ram(ram: RamBlock) -> None:
    written: list[tuple[int, int]] = []
    dma = GuestDma("svc", (DmaWindow("buf", 0x4000_1000, 0x1000),),
                   lambda a, n: ram if ram.contains(a, n) else None, lambda s, e: written.append((s, e)))
    dma.dma_write("dev0", 0x4000_1FFC, b"wxyz")
    assert dma.dma_read("dev0", 0x4000_1FFC, 4) == b"wxyz" == ram.read(0x4000_1FFC, 4)
    assert written == [(0x4000_1FFC, 0x4000_2000)]


@pytest.mark.parametrize(("address", "length"), [(0x4000_0FFF, 1), (0x4000_1FFD, 4), (0x5000_0000, 4)])
def test_dma_outside_every_window_is_refused_naming_device_address_and_windows(
        ram: RamBlock, address: int, length: int) -> None:
    dma = GuestDma("svc", (DmaWindow("buf", 0x4000_1000, 0x1000), DmaWindow("ring", 0x4000_8000, 0x100)),
                   lambda a, n: ram if ram.contains(a, n) else None)
    before = ram.read(0x4000_0000, 0x10_0000)
    with pytest.raises(DmaError) as refused:
        dma.dma_write("dev0", address, bytes(length))
    assert str(refused.value) == (
        f"dev0: DMA write of {length} bytes at 0x{address:x} refused: outside every DMA window granted to device "
        "service svc (windows: buf 0x40001000-0x40001fff, ring 0x40008000-0x400080ff)")
    assert ram.read(0x4000_0000, 0x10_0000) == before
    with pytest.raises(DmaError, match=f"dev0: DMA read of {length} bytes at 0x{address:x} refused"):
        dma.dma_read("dev0", address, length)


def test_windows_must_lie_in_ram(ram: RamBlock) -> None:
    with pytest.raises(ValueError, match=r"DMA window 'x' of device service s .* is not inside one RAM region"):
        check_windows("s", [DmaWindow("x", 0x3FFF_F000, 0x2000)], [ram])
    with pytest.raises(ValueError, match="granted twice"):
        check_windows("s", [DmaWindow("x", 0x4000_0000, 1), DmaWindow("x", 0x4000_1000, 1)], [ram])


# ----- a VM over the in-process transport ----------------------------------------------------------------

RAM = 0x4000_0000
PROBE = 0x0A20_0000


def _movz(rd: int, imm16: int, shift: int = 0) -> int:
    return 0xD2800000 | (shift // 16) << 21 | imm16 << 5 | rd


def _movk(rd: int, imm16: int, shift: int) -> int:
    return 0xF2800000 | (shift // 16) << 21 | imm16 << 5 | rd


def _mov32(rd: int, value: int) -> list[int]:
    return [_movz(rd, value & 0xFFFF), _movk(rd, value >> 16, 16)]


def _str(rt: int, rn: int, offset: int) -> int:  # STR Wt, [Xn, #offset]
    return 0xB9000000 | (offset // 4) << 10 | rn << 5 | rt


def _ldr(rt: int, rn: int, offset: int) -> int:  # LDR Wt, [Xn, #offset]
    return 0xB9400000 | (offset // 4) << 10 | rn << 5 | rt


OFF = [*_mov32(0, 0x8400_0008), 0xD4000002, 0x14000000]  # PSCI SYSTEM_OFF (HVC), then spin


def _vm(words: list[int], *, machine: str = "virt", routes: list[IrqRouteSpec] | None = None,
        grants: list[tuple[str, DmaWindow]] | None = None, data: bytes = b"") -> tuple[Vm, LocalEndpoint]:
    endpoint = LocalEndpoint(DeviceBus([Pl011("uart0", 0x0900_0000), DmaProbe("dma0", PROBE)]), "local",
                             shadows=False)
    code = struct.pack(f"<{len(words)}I", *words)
    images = [ImageSpec("code", code, RAM + 0x20_0000)]
    if data:
        images.append(ImageSpec("data", data, RAM + 0x30_0000))
    vm = Vm(VmSpec("aarch64", ram=[(RAM, 16 << 20)], images=images, entry_point=RAM + 0x20_0000, machine=machine,
                   irq_routes=routes or [], dma_grants=grants or []), [endpoint], ram_cap=1 << 30)
    return vm, endpoint


def _run(vm: Vm) -> None:
    vm.start()
    final = vm.events.wait_final(20)
    assert final is not None and final.reason.startswith("PSCI SYSTEM_OFF"), final


def test_a_line_raised_inside_an_access_is_pending_before_the_next_instruction() -> None:
    guest = [*_mov32(1, 0x0900_0000), *_mov32(2, 0x20), _str(2, 1, 0x38),  # IMSC = TX
             _str(2, 1, 0x00),  # DR: TX raised inside the access, the completion carries the line
             *_mov32(3, 0x0800_0000), _ldr(4, 3, 0x204), *OFF]  # GICD_ISPENDR1 straight after
    vm, _ = _vm(guest)
    try:
        _run(vm)
        assert dict(vm.get_registers(0, ["x4"])[0])["x4"] & 1 << 1  # SPI 1 (interrupt 33): the UART
        assert vm.irqs.level("local", "uart0", 0)
    finally:
        vm.delete()


def test_console_input_reaches_the_gic_through_the_watch() -> None:
    vm, endpoint = _vm([*_mov32(1, 0x0900_0000), *_mov32(2, 0x50), _str(2, 1, 0x38), *OFF])
    try:
        _run(vm)
        assert vm.gic is not None and not spi_pending(vm.gic, 1)
        endpoint.console_input("uart0", b"k")
        deadline = time.monotonic() + 5
        while not spi_pending(vm.gic, 1) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert spi_pending(vm.gic, 1)
    finally:
        vm.delete()


def test_configured_routes_wire_a_third_party_line_and_bad_ones_are_refused() -> None:
    vm, _ = _vm(OFF, routes=[IrqRouteSpec("dma0", 20, "done")])
    try:
        assert vm.irqs.routes[("local", "dma0", 0)] == Route(20)
        assert vm.irqs.routes[("local", "uart0", 0)] == Route(1)
    finally:
        vm.delete()
    with pytest.raises(VmConfigError, match="dma0 has no line 'nope'; its lines: 0 \\(done\\)"):
        _vm(OFF, routes=[IrqRouteSpec("dma0", 20, "nope")])
    with pytest.raises(VmConfigError, match="no device named 'ghost' with interrupt lines"):
        _vm(OFF, routes=[IrqRouteSpec("ghost", 20)])
    with pytest.raises(VmConfigError, match="this machine has no interrupt controller"):
        _vm(OFF, machine="", routes=[IrqRouteSpec("dma0", 20)])


def test_dma_inside_a_write_handler_and_outside_the_windows_in_process() -> None:
    src, dst = RAM + 0x30_0000, RAM + 0x30_0800
    guest = [*_mov32(1, PROBE), *_mov32(2, src), _str(2, 1, 0x00), *_mov32(3, 16), _str(3, 1, 0x08),
             *_mov32(4, 1), _str(4, 1, 0x0C), _ldr(10, 1, 0x10),  # CMD read: DMA inside the write
             *_mov32(2, dst), _str(2, 1, 0x00), *_mov32(4, 2), _str(4, 1, 0x0C), _ldr(11, 1, 0x10),  # write back
             *_mov32(2, 0x4200_0000), _str(2, 1, 0x00), _str(4, 1, 0x0C), _ldr(12, 1, 0x10),  # outside
             *OFF]
    vm, endpoint = _vm(guest, machine="", grants=[("local", DmaWindow("buf", src, 0x1000))], data=b"0123456789abcdef")
    try:
        _run(vm)
        regs = dict(vm.get_registers(0, ["x10", "x11", "x12"])[0])
        assert (regs["x10"], regs["x11"], regs["x12"]) == (0, 0, 2)
        assert vm.read_memory(dst, 16) == b"0123456789abcdef"
        probe = endpoint.bus.device("dma0")
        assert isinstance(probe, DmaProbe)
        assert probe.last_error == ("dma0: DMA write of 16 bytes at 0x42000000 refused: outside every DMA window "
                                    "granted to device service local (windows: buf 0x40300000-0x40300fff)")
    finally:
        vm.delete()


def test_virt_grants_all_ram_to_the_board_service_by_default() -> None:
    vm, _ = _vm(OFF)
    try:
        assert vm.dma["local"].windows == (DmaWindow("ram", RAM, 16 << 20),)
    finally:
        vm.delete()
    with pytest.raises(VmConfigError, match="granted to device service 'elsewhere', which is not one of this VM's"):
        _vm(OFF, grants=[("elsewhere", DmaWindow("x", RAM, 0x1000))])


def test_levels_of_lines_never_described_are_dropped_not_kept() -> None:
    # A hostile service naming a new line in every update must not grow the router's table.
    gic = Gic(1)
    router = IrqRouter(gic, {("devs", "u", 0): Route(1)}, "vm1", declared=[("devs", "u", 0)])
    for n in range(1, 1001):
        router.apply(LineChange("devs", n, (("u", 0, n % 2 == 1), (f"ghost{n}", 0, True), ("u", 7, True))))
    assert router.undeclared == 2000 and len(router._held) == 1
    assert router.level("devs", "u", 0) is False and router.generation("devs", "u", 0) == 1000
