"""The machine profile ``virt``: QEMU's virt board, so firmware built for it boots unchanged.

The memory map, interrupt numbers and device-tree layout follow QEMU 7.2's ``hw/arm/virt.c`` (the
nodes, their order, names, compatible strings and properties, and a 1 MiB blob), so U-Boot binds the
same drivers, counts the same devices and relocates to the same addresses. The device nodes come from
what the device services describe; the CPU, GIC, timer, PSCI and clock nodes are the machine's own.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from mmiosplit.mmio import RemoteLine, RemoteRegion
from vcpu_service.fdt import Node, build, cells, sized_cells, strings
from vcpu_service.irq import LineKey, Route

FLASH_BASE = 0x0000_0000
FLASH_BANK_SIZE = 0x0400_0000
GIC_DIST = (0x0800_0000, 0x1_0000)
GIC_CPU = (0x0801_0000, 0x1_0000)
GIC_V2M = (0x0802_0000, 0x1000)
UART = 0x0900_0000
RTC = 0x0901_0000
FW_CFG = 0x0902_0000
GPIO = 0x0903_0000
VIRTIO = 0x0A00_0000
VIRTIO_SLOTS = 32
VIRTIO_SLOT_SIZE = 0x200
PLATFORM_BUS = (0x0C00_0000, 0x0200_0000)
PCIE_MMIO = (0x1000_0000, 0x2EFF_0000)
PCIE_PIO = (0x3EFF_0000, 0x1_0000)
PCIE_ECAM_LOW = (0x3F00_0000, 0x0100_0000)
PCIE_ECAM_HIGH = (0x40_1000_0000, 0x1000_0000)
PCIE_MMIO_HIGH = (0x80_0000_0000, 0x80_0000_0000)
RAM_BASE = 0x4000_0000
DTB_SIZE = 1 << 20

# SPI numbers (GIC interrupt = 32 + SPI).
IRQ_UART, IRQ_RTC, IRQ_PCIE, IRQ_GPIO, IRQ_VIRTIO = 1, 2, 3, 7, 16
GIC_SPI, GIC_PPI = 0, 1
IRQ_LEVEL_HI, IRQ_EDGE_LO_HI = 4, 1
PPI_TIMER_S, PPI_TIMER_NS, PPI_TIMER_VIRT, PPI_TIMER_HYP, PPI_PMU = 13, 14, 11, 10, 7

CPU_COMPATIBLE = {
    "cortex-a57": "arm,cortex-a57", "cortex-a53": "arm,cortex-a53", "cortex-a72": "arm,cortex-a72",
    "max": "arm,arm-v8", "cortex-a15": "arm,cortex-a15", "cortex-a7": "arm,cortex-a7",
    "cortex-a9": "arm,cortex-a9", "cortex-a8": "arm,cortex-a8",
}
PSCI_FNS_64 = (0xC400_0001, 0x8400_0002, 0xC400_0003, 0xC400_0005)  # suspend, off, on, migrate
PSCI_FNS_32 = (0x8400_0001, 0x8400_0002, 0x8400_0003, 0x8400_0005)


def device_specs(architecture: str, flash0: str | None = None, flash1: str | None = None,
                 flash0_readonly: bool = False, persist: bool = False, write_buffer: str = "",
                 drive: str | None = None, drive_readonly: bool = False, drive_modern: bool = False) -> list[str]:
    """The ``--device`` specs of a device service that fills the virt map as QEMU does.

    ``drive`` puts a virtio-blk disk (a raw image) in the last virtio-mmio slot, 0x0a003e00: QEMU creates
    the transports so that the first ``-device virtio-blk-device`` lands on the highest-addressed one,
    and the other 31 slots stay empty. ``drive_modern`` gives it Version 2, as QEMU's
    ``-global virtio-mmio.force-legacy=false``. The QEMU command to compare with is
    ``-drive if=none,id=hd0,file=FILE,format=raw -device virtio-blk-device,drive=hd0``: on ``virt``,
    ``-drive if=virtio`` makes a virtio-blk-pci instead (U-Boot then says "1af4 VirtIO Block Device",
    not "QEMU VirtIO Block Device")."""
    ecam = PCIE_ECAM_HIGH if architecture == "aarch64" else PCIE_ECAM_LOW

    def flash(name: str, base: int, path: str | None, readonly: bool) -> str:
        spec = f"pflash@{base:#x},name={name},size={FLASH_BANK_SIZE:#x}"
        if path:
            spec += f",file={path}"
            if persist and not readonly:
                spec += ",persist=on"
        if readonly:
            spec += ",readonly=on"
        if write_buffer:
            spec += f",write_buffer={write_buffer}"
        return spec

    def virtio() -> list[str]:
        if not drive:
            return [f"virtio-mmio@{VIRTIO:#x},name=virtio,slots={VIRTIO_SLOTS}"]
        disk = f"virtio-blk-mmio@{VIRTIO + (VIRTIO_SLOTS - 1) * VIRTIO_SLOT_SIZE:#x},name=virtio-blk,file={drive}"
        if drive_readonly:
            disk += ",readonly=on"
        if drive_modern:
            disk += ",legacy=off"
        return [f"virtio-mmio@{VIRTIO:#x},name=virtio,slots={VIRTIO_SLOTS - 1}", disk]

    return [
        flash("flash0", FLASH_BASE, flash0, flash0_readonly),
        flash("flash1", FLASH_BASE + FLASH_BANK_SIZE, flash1, False),
        f"pl011@{UART:#x},name=uart0",
        f"pl031@{RTC:#x},name=rtc0",
        f"fw_cfg@{FW_CFG:#x},name=fw_cfg",
        f"pl061@{GPIO:#x},name=gpio0",
        *virtio(),
        f"pcie@{ecam[0]:#x},name=pcie,size={ecam[1]:#x}",
    ]


#: Compatible strings of the board's own devices: a service hosting any of them is the board's device service.
BOARD_COMPATIBLE = ("arm,pl011", "arm,pl031", "arm,pl061", "qemu,fw-cfg-mmio", "virtio,mmio", "pci-host-ecam-generic",
                    "cfi-flash")


def board_services(regions: Sequence[RemoteRegion]) -> list[str]:
    """The device services that host the board's devices (QEMU's devices reach all RAM by DMA)."""
    return sorted({r.service for r in regions if any(c in BOARD_COMPATIBLE for c in r.compatible)})


def line_routes(lines: Sequence[RemoteLine], regions: Sequence[RemoteRegion]) -> dict[LineKey, Route]:
    """QEMU virt's wiring of the board's device lines to SPIs, found by compatible string as the device tree
    finds the devices (so the tree and the wiring agree): UART i (in address order) line 0 to SPI 1 + i, the
    RTC to SPI 2, the GPIO block to SPI 7, virtio-mmio transport N (by address, 0x200 apart from 0x0a000000)
    to SPI 16 + N through the line named like its region, PCIe INTA-D (lines 0-3) to SPI 3-6. Lines of other
    devices get nothing here."""
    first_base: dict[tuple[str, str], int] = {}
    region_base: dict[tuple[str, str, str], int] = {}
    for r in regions:
        key = (r.service, r.device)
        first_base[key] = min(first_base.get(key, r.base), r.base)
        region_base[(r.service, r.device, r.name)] = r.base
    routes: dict[LineKey, Route] = {}
    uarts = sorted({(first_base.get((ln.service, ln.device), 0), ln.service, ln.device)
                    for ln in lines if "arm,pl011" in ln.compatible})
    uart_number = {(service, device): i for i, (_, service, device) in enumerate(uarts)}
    for ln in lines:
        compatible = ln.compatible
        spi: int | None = None
        if "arm,pl011" in compatible and ln.index == 0:
            spi = IRQ_UART + uart_number[(ln.service, ln.device)]
        elif "arm,pl031" in compatible and ln.index == 0:
            spi = IRQ_RTC
        elif "arm,pl061" in compatible and ln.index == 0:
            spi = IRQ_GPIO
        elif "pci-host-ecam-generic" in compatible and 0 <= ln.index < 4:
            spi = IRQ_PCIE + ln.index
        elif "virtio,mmio" in compatible:
            base = region_base.get((ln.service, ln.device, ln.name))
            if base is not None and base >= VIRTIO and (base - VIRTIO) % VIRTIO_SLOT_SIZE == 0:
                slot = (base - VIRTIO) // VIRTIO_SLOT_SIZE
                if slot < VIRTIO_SLOTS:
                    spi = IRQ_VIRTIO + slot
        if spi is not None:
            routes[(ln.service, ln.device, ln.index)] = Route(spi, edge=ln.trigger == "edge")
    return routes


@dataclass(frozen=True)
class VirtMachine:
    """What the device tree describes: the CPUs, the RAM and the device regions found."""

    architecture: str
    cpu_model: str
    vcpus: int
    ram: tuple[int, int]
    regions: Sequence[RemoteRegion]

    @property
    def highmem(self) -> bool:
        return self.architecture == "aarch64"

    def _with(self, compatible: str, per_device: bool = False) -> list[RemoteRegion]:
        """Regions of devices with this compatible string; with per_device, each device's first region."""
        found = sorted((r for r in self.regions if compatible in r.compatible), key=lambda r: r.base)
        if per_device:
            first: dict[tuple[str, str], RemoteRegion] = {}
            for r in found:
                first.setdefault((r.service, r.device), r)
            found = list(first.values())
        return found

    def dtb(self, seed: bytes | None = None) -> bytes:
        """The flattened device tree, a 1 MiB blob like QEMU's (seed: 40 bytes for rng-seed/kaslr-seed)."""
        return build(self.tree(seed), DTB_SIZE)

    def tree(self, seed: bytes | None = None) -> Node:
        n = self.vcpus
        clock, first_cpu = 0x8000, 0x8001
        gic = first_cpu + n
        v2m = gic + 1
        gpio_phandle = v2m + 1
        ppi_cpus = ((1 << n) - 1) << 8
        uarts = self._with("arm,pl011")
        root = Node("").prop("interrupt-parent", gic).prop("model", "linux,dummy-virt")
        root.prop("#size-cells", 2).prop("#address-cells", 2).prop("compatible", "linux,dummy-virt")

        suspend, off, on, migrate = PSCI_FNS_64 if self.architecture == "aarch64" else PSCI_FNS_32
        root.child(Node("psci").prop("migrate", migrate).prop("cpu_on", on).prop("cpu_off", off)
                   .prop("cpu_suspend", suspend).prop("method", "hvc")
                   .prop("compatible", ["arm,psci-1.0", "arm,psci-0.2", "arm,psci"]))
        base, size = self.ram
        root.child(Node(f"memory@{base:x}").prop("reg", sized_cells((base, size))).prop("device_type", "memory"))
        pb_base, pb_size = PLATFORM_BUS
        root.child(Node(f"platform-bus@{pb_base:x}").prop("interrupt-parent", gic)
                   .prop("ranges", cells(0, 0, pb_base, pb_size)).prop("#address-cells", 1).prop("#size-cells", 1)
                   .prop("compatible", ["qemu,platform", "simple-bus"]))
        for r in self._with("qemu,fw-cfg-mmio", per_device=True):
            root.child(Node(f"fw-cfg@{r.base:x}").prop("dma-coherent", None).prop("reg", sized_cells((r.base, 0x18)))
                       .prop("compatible", "qemu,fw-cfg-mmio"))
        for r in self._with("virtio,mmio"):
            slot = (r.base - VIRTIO) // VIRTIO_SLOT_SIZE
            root.child(Node(f"virtio_mmio@{r.base:x}").prop("dma-coherent", None)
                       .prop("interrupts", cells(GIC_SPI, IRQ_VIRTIO + slot, IRQ_EDGE_LO_HI))
                       .prop("reg", sized_cells((r.base, r.size))).prop("compatible", "virtio,mmio"))
        for r in self._with("arm,pl061", per_device=True):
            keys = root.child(Node("gpio-keys").prop("compatible", "gpio-keys"))
            keys.child(Node("poweroff").prop("gpios", cells(gpio_phandle, 3, 0)).prop("linux,code", 0x74)
                       .prop("label", "GPIO Key Poweroff"))
            root.child(Node(f"pl061@{r.base:x}").prop("phandle", gpio_phandle).prop("clock-names", "apb_pclk")
                       .prop("clocks", clock).prop("interrupts", cells(GIC_SPI, IRQ_GPIO, IRQ_LEVEL_HI))
                       .prop("gpio-controller", None).prop("#gpio-cells", 2)
                       .prop("compatible", ["arm,pl061", "arm,primecell"]).prop("reg", sized_cells((r.base, r.size))))
        for r in self._with("pci-host-ecam-generic"):
            root.child(self._pcie(r, gic, v2m))
        for r in self._with("arm,pl031"):
            root.child(Node(f"pl031@{r.base:x}").prop("clock-names", "apb_pclk").prop("clocks", clock)
                       .prop("interrupts", cells(GIC_SPI, IRQ_RTC, IRQ_LEVEL_HI))
                       .prop("reg", sized_cells((r.base, r.size))).prop("compatible", ["arm,pl031", "arm,primecell"]))
        for i, r in enumerate(uarts):
            root.child(Node(f"pl011@{r.base:x}").prop("clock-names", ["uartclk", "apb_pclk"])
                       .prop("clocks", cells(clock, clock))
                       .prop("interrupts", cells(GIC_SPI, IRQ_UART + i, IRQ_LEVEL_HI))
                       .prop("reg", sized_cells((r.base, r.size))).prop("compatible", ["arm,pl011", "arm,primecell"]))
        pmu = root.child(Node("pmu"))  # QEMU adds the node for every CPU; only ARMv8 gets properties
        if self.architecture == "aarch64":
            pmu.prop("interrupts", cells(GIC_PPI, PPI_PMU, ppi_cpus | IRQ_LEVEL_HI))
            pmu.prop("compatible", "arm,armv8-pmuv3")
        intc = root.child(Node(f"intc@{GIC_DIST[0]:x}").prop("phandle", gic).prop("reg", sized_cells(GIC_DIST, GIC_CPU))
                          .prop("compatible", "arm,cortex-a15-gic").prop("ranges", None).prop("#size-cells", 2)
                          .prop("#address-cells", 2).prop("interrupt-controller", None).prop("#interrupt-cells", 3))
        intc.child(Node(f"v2m@{GIC_V2M[0]:x}").prop("phandle", v2m).prop("reg", sized_cells(GIC_V2M))
                   .prop("msi-controller", None).prop("compatible", "arm,gic-v2m-frame"))
        flashes = self._with("cfi-flash")
        if flashes:
            root.child(Node(f"flash@{flashes[0].base:x}").prop("bank-width", 4)
                       .prop("reg", sized_cells(*((r.base, r.size) for r in flashes))).prop("compatible", "cfi-flash"))
        cpus = root.child(Node("cpus").prop("#size-cells", 0).prop("#address-cells", 1))
        cluster = cpus.child(Node("cpu-map")).child(Node("socket0")).child(Node("cluster0"))
        for cpu in range(n):
            cluster.child(Node(f"core{cpu}").prop("cpu", first_cpu + n - 1 - cpu))
        compatible = CPU_COMPATIBLE.get(self.cpu_model, f"arm,{self.cpu_model}")
        for cpu in range(n):
            node = cpus.child(Node(f"cpu@{cpu}").prop("phandle", first_cpu + n - 1 - cpu).prop("reg", cpu))
            if n > 1:
                node.prop("enable-method", "psci")
            node.prop("compatible", compatible).prop("device_type", "cpu")
        timer_flags = ppi_cpus | IRQ_LEVEL_HI
        timer_compat = (["arm,armv8-timer", "arm,armv7-timer"] if self.architecture == "aarch64"
                        else "arm,armv7-timer")
        root.child(Node("timer").prop("interrupts", cells(GIC_PPI, PPI_TIMER_S, timer_flags, GIC_PPI, PPI_TIMER_NS,
                                                          timer_flags, GIC_PPI, PPI_TIMER_VIRT, timer_flags,
                                                          GIC_PPI, PPI_TIMER_HYP, timer_flags))
                   .prop("always-on", None).prop("compatible", timer_compat))
        root.child(Node("apb-pclk").prop("phandle", clock).prop("clock-output-names", "clk24mhz")
                   .prop("clock-frequency", 24_000_000).prop("#clock-cells", 0).prop("compatible", "fixed-clock"))
        seed = seed if seed is not None else os.urandom(40)
        chosen = root.child(Node("chosen"))
        if uarts:
            chosen.prop("stdout-path", f"/pl011@{uarts[0].base:x}")
        chosen.prop("rng-seed", seed[:32]).prop("kaslr-seed", seed[32:40])
        return root

    def _pcie(self, r: RemoteRegion, gic: int, v2m: int) -> Node:
        imap: list[int] = []
        for slot in range(4):
            for pin in range(4):
                irq = IRQ_PCIE + (pin + slot) % 4
                imap += [slot << 11, 0, 0, pin + 1, gic, 0, 0, GIC_SPI, irq, IRQ_LEVEL_HI]
        pio_base, pio_size = PCIE_PIO
        mmio_base, mmio_size = PCIE_MMIO
        ranges = [0x0100_0000, 0, 0, 0, pio_base, 0, pio_size,
                  0x0200_0000, 0, mmio_base, 0, mmio_base, 0, mmio_size]
        if self.highmem:
            hb, hs = PCIE_MMIO_HIGH
            ranges += [0x0300_0000, hb >> 32, hb & 0xFFFF_FFFF, hb >> 32, hb & 0xFFFF_FFFF, hs >> 32, hs & 0xFFFF_FFFF]
        buses = r.size // (1 << 20)
        return (Node(f"pcie@{PCIE_MMIO[0]:x}").prop("interrupt-map-mask", cells(0x1800, 0, 0, 7))
                .prop("interrupt-map", cells(*imap)).prop("#interrupt-cells", 1).prop("ranges", cells(*ranges))
                .prop("reg", sized_cells((r.base, r.size))).prop("msi-map", cells(0, v2m, 0, 0x1_0000))
                .prop("dma-coherent", None).prop("bus-range", cells(0, buses - 1)).prop("linux,pci-domain", 0)
                .prop("#size-cells", 2).prop("#address-cells", 3).prop("device_type", "pci")
                .prop("compatible", "pci-host-ecam-generic"))


__all__ = ["VirtMachine", "board_services", "device_specs", "line_routes", "strings"]
