"""A VM: guest RAM shared by its vCPUs, the device map gathered from the device services, and its run.

Everything a client can get wrong is checked here, before anything runs, and reported by name:
overlapping regions, images that do not fit, RAM over the cap, unreachable device services.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from mmiosplit.mmio import (
    DeviceEndpoint,
    DeviceRestarted,
    DmaWindow,
    GoingAway,
    LineChange,
    MirrorChange,
    RemoteLine,
    RemoteRegion,
    ServiceWatch,
    ShadowChange,
    TransportError,
)
from mmiosplit.wire import FEATURE_WATCH
from vcpu_service import psci
from vcpu_service.arch import Arch, arch_by_name, close_uc
from vcpu_service.dma import GuestDma, check_windows
from vcpu_service.domain import ErrorKind, EventKind, Policies, VcpuStats, VmStats
from vcpu_service.events import EventLog
from vcpu_service.exits import fold_every_second, new_latency_histogram, release_histogram, summarize
from vcpu_service.gic import GICC_BASE, GICC_SIZE, GICD_BASE, GICD_SIZE, Gic
from vcpu_service.handlers import GicRegisters, HandlerRegistry, PostedWhileTrapped, PostedWrites, ShadowReads, Unmapped
from vcpu_service.interrupts import Ticker
from vcpu_service.irq import IrqRouter, LineKey, Route
from vcpu_service.machines.virt import VirtMachine, board_services, line_routes
from vcpu_service.memory import Mirror, RamBlock
from vcpu_service.shadows import ShadowTable
from vcpu_service.tracelog import TraceLog
from vcpu_service.vcpu import QUIESCENT, Vcpu, VcpuState

PAGE = 0x1000
MAX_VCPUS = 64
#: How long a device service may take to send its shadow registers (at VM creation and after a reset).
SHADOW_SNAPSHOT_S = 10.0

log = logging.getLogger("mmiosplit.vcpu")


class VmConfigError(ValueError):
    """A VM configuration that cannot be built; the message names what is wrong."""


class VmStateError(RuntimeError):
    """An operation the VM cannot do in its current state (start twice, read registers while running)."""


class RunState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    FINISHED = "finished"


@dataclass(frozen=True, slots=True)
class ImageSpec:
    name: str
    data: bytes
    load_address: int


@dataclass(frozen=True, slots=True)
class IrqRouteSpec:
    """One configured line-to-SPI route: ``line`` is a line name, its index in decimal, or "" for line 0;
    ``service`` "" means whichever device service has the device."""

    device: str
    spi: int
    line: str = ""
    service: str = ""

    def __str__(self) -> str:
        return f"{self.device}{'.' + self.line if self.line else ''}={self.spi}"


@dataclass(frozen=True, slots=True)
class RegionDeadlineSpec:
    """An exit deadline for one device's region (``region`` "": all its regions) on ``service`` ("": whichever
    device service has the device)."""

    device: str
    deadline_ms: int
    region: str = ""
    service: str = ""

    def __str__(self) -> str:
        return f"{self.device}{'/' + self.region if self.region else ''}={self.deadline_ms}ms"


@dataclass(slots=True)
class VmSpec:
    """A VM configuration in Python terms (the proto is parsed once, at the edge)."""

    architecture: str
    cpu_model: str = ""
    vcpu_count: int = 1
    ram: list[tuple[int, int]] = field(default_factory=list)
    images: list[ImageSpec] = field(default_factory=list)
    entry_point: int = 0
    policies: Policies = field(default_factory=Policies)
    instruction_budget: int = 0
    wall_clock_seconds: float = 0.0
    exit_deadline_ms: int = 0
    name: str = ""
    machine: str = ""
    strict_kvm: bool = False
    trace_exits: bool = False
    #: Device lines wired to SPIs, on top of the machine profile's wiring (``--irq``).
    irq_routes: list[IrqRouteSpec] = field(default_factory=list)
    #: Exit deadlines per region, over what the device services declare (``--region-deadline``).
    region_deadlines: list[RegionDeadlineSpec] = field(default_factory=list)
    #: (device service, window) of guest RAM its devices may reach by DMA (``--dma-window``).
    dma_grants: list[tuple[str, DmaWindow]] = field(default_factory=list)


def _fmt_range(base: int, size: int) -> str:
    return f"0x{base:x}-0x{base + size - 1:x}"


class Vm:
    """One guest machine. Thread-safe: control calls come from gRPC worker threads."""

    def __init__(self, spec: VmSpec, endpoints: list[DeviceEndpoint], *, ram_cap: int,
                 default_deadline_ms: int = 5000) -> None:
        self.vm_id = uuid.uuid4().hex[:12]
        self.spec = spec
        self.arch: Arch = arch_by_name(spec.architecture)
        self.cpu_model = spec.cpu_model or self.arch.default_cpu
        self.endpoints = endpoints
        self.policies = spec.policies
        self.instruction_budget = spec.instruction_budget
        self.deadline_ms = spec.exit_deadline_ms or default_deadline_ms
        self.strict_kvm = spec.strict_kvm
        self.trace: TraceLog | None = TraceLog() if spec.trace_exits else None
        self.lock = threading.RLock()
        self.events = EventLog()
        self.run_state = RunState.CREATED
        self._final_pending = False
        self._resetting = False
        self._started_at = 0.0
        self._finished_at = 0.0
        self.mirrors: dict[tuple[str, str, str], Mirror] = {}
        # Bumped whenever a ROMD mirror changes mode or bytes; each vCPU remaps when it sees a new value.
        self.map_generation = 0
        # (generation, start, end) of mirror bytes changed, so vCPUs drop only the code translated from them.
        self._patch_log: collections.deque[tuple[int, int, int]] = collections.deque(maxlen=4096)
        self.vcpus: list[Vcpu] = []
        # Shadow registers: reads served from this table without an exit (filled in _start_watches).
        self.shadows = ShadowTable(())
        # One watch per device service (shadow values, going away), each read by its own thread.
        self._watches: list[tuple[ServiceWatch, threading.Thread]] = []
        self._watches_closing = False
        self._restart_lock = threading.Lock()
        self._validate_basic(spec, ram_cap)
        self.regions: list[RemoteRegion] = []
        # The address map: device regions and the in-process handlers tried before an exit (filled in
        # _build_device_map).
        self.handlers = HandlerRegistry((), Unmapped(spec.policies.unmapped_access))
        self.gic: Gic | None = None  # the virt board's, in process
        # Device interrupt latency (ns), folded in from the GIC's samples once a second and when stats are read.
        self._irq_ack = new_latency_histogram()
        self._irq_eoi = new_latency_histogram()
        self._irq_lock = threading.Lock()
        self.irq_from_arrival = False
        # Fires the vCPUs' timer deadlines and brings back vCPUs with a masked IRQ signalled (boards with a GIC).
        self.ticker: Ticker | None = None
        self._counter_epoch_ns = time.monotonic_ns()
        # Device interrupt lines and where they go (filled in _build_irqs), and each service's DMA windows.
        self.lines: list[RemoteLine] = []
        self.irqs = IrqRouter(None, {}, self.vm_id)
        self.dma: dict[str, GuestDma] = {}
        self.posted_windows: list[tuple[RemoteRegion, RamBlock]] = []
        self.has_posted = False
        self.ram: list[RamBlock] = []
        self._ram_ends: frozenset[int] = frozenset()
        try:
            self.ram = [RamBlock(base, size) for base, size in sorted(spec.ram)]
            self._ram_ends = frozenset(block.end for block in self.ram)
            self._build_device_map()
            self._build_irqs()
            self._build_dma()
            self._images = list(spec.images)
            if spec.machine == "virt" and not any(i.load_address == self.ram[0].base for i in self._images):
                self._images.append(ImageSpec("virt.dtb", self.machine_dtb(), self.ram[0].base))
            self._load_images()
            self.vcpus = [Vcpu(self, i) for i in range(spec.vcpu_count)]
            if self.ticker is not None:
                self.ticker.start(self.vcpus)
            self._start_watches()
        except Exception:
            self._stop_watches()
            self._release_memory()
            raise

    # ----- validation ------------------------------------------------------------------------------------
    def _validate_basic(self, spec: VmSpec, ram_cap: int) -> None:
        if not 1 <= spec.vcpu_count <= MAX_VCPUS:
            raise VmConfigError(f"vcpu_count {spec.vcpu_count} is out of range 1-{MAX_VCPUS}")
        close_uc(self.arch.new_uc(self.cpu_model))  # raises ArchError for an unknown model
        if not spec.ram:
            raise VmConfigError("no RAM region given; e.g. 128 MiB at 0x40000000")
        total = 0
        ordered = sorted(spec.ram)
        for base, size in ordered:
            if size == 0 or base % PAGE or size % PAGE:
                raise VmConfigError(f"RAM region {_fmt_range(base, max(size, 1))} must have a non-zero size and "
                                    f"base and size aligned to 4 KiB")
            if base + size > 1 << 64:  # Unicorn refuses the mapping (UC_ERR_ARG) once the VM is half built
                raise VmConfigError(f"RAM region of 0x{size:x} bytes at 0x{base:x} runs past the end of the 64-bit "
                                    "address space")
            total += size
        for (b1, s1), (b2, s2) in itertools.pairwise(ordered):
            if b2 < b1 + s1:
                raise VmConfigError(f"RAM regions {_fmt_range(b1, s1)} and {_fmt_range(b2, s2)} overlap")
        if total > ram_cap:
            raise VmConfigError(f"RAM of {total / 2**20:g} MiB is over this service's cap of "
                                f"{ram_cap / 2**20:g} MiB (serve-vcpu --max-ram)")

    def counter_ns(self) -> int:
        """The system counter's clock: host monotonic ns since the VM was made (QEMU's virtual clock starts with
        the machine and keeps counting through a reset)."""
        return time.monotonic_ns() - self._counter_epoch_ns

    def _on_gic_output(self, cpu: int, level: bool) -> None:
        if cpu < len(self.vcpus):
            self.vcpus[cpu].irq_signal(level)

    def _on_gic_fiq(self, cpu: int, level: bool) -> None:
        if cpu < len(self.vcpus):
            self.vcpus[cpu].irq_signal(level, fiq=True)

    def _add_gic(self) -> None:
        """The virt board's GICv2, in process: its registers are handlers, its outputs go to the vCPUs."""
        try:
            self.gic = Gic(self.spec.vcpu_count, on_irq_change=self._on_gic_output, on_fiq_change=self._on_gic_fiq)
            fold_every_second(self)  # interrupt-latency samples wait in the GIC until folded
        except ValueError as exc:
            raise VmConfigError(f"the virt board's GICv2: {exc} (as in QEMU, virt with a GICv2 takes at most 8 "
                                "vCPUs)") from None
        for base, size, cpu_interface in ((GICD_BASE, GICD_SIZE, False), (GICC_BASE, GICC_SIZE, True)):
            try:
                self.handlers.add_device(base, size, GicRegisters(self.gic, base, cpu_interface,
                                                                  self.policies.device_error))
            except ValueError as exc:
                raise VmConfigError(f"the virt board's GIC: {exc}") from None
        self.ticker = Ticker(self.vm_id, self.counter_ns)

    def _ram_block(self, address: int, length: int) -> RamBlock | None:
        for block in self.ram:
            if block.contains(address, length):
                return block
        return None

    @property
    def ram_ends(self) -> frozenset[int]:
        """The first addresses past each RAM block: where an access can start in RAM and run on into a device."""
        return self._ram_ends

    def machine_dtb(self) -> bytes:
        """The device tree of the machine profile, from the devices the services described."""
        ram = self.ram[0]
        return VirtMachine(self.arch.name, self.cpu_model, self.spec.vcpu_count, (ram.base, ram.size),
                           self.regions).dtb()

    def _load_images(self) -> None:
        for image in self._images:
            block = self._ram_block(image.load_address, max(1, len(image.data)))
            if block is None:
                ram = ", ".join(_fmt_range(b.base, b.size) for b in self.ram)
                raise VmConfigError(
                    f"image {image.name!r} ({len(image.data)} bytes at "
                    f"{_fmt_range(image.load_address, len(image.data))}) does not fit in RAM ({ram})"
                )
            block.write(image.load_address, image.data)
        entry = self.spec.entry_point & ~1 if self.arch.name == "arm" else self.spec.entry_point
        rom = self.find_region(entry)
        if self._ram_block(entry, 2) is None and (rom is None or not rom.romd):
            raise VmConfigError(f"entry point 0x{self.spec.entry_point:x} is not in RAM or flash")

    def _with_deadlines(self, regions: list[RemoteRegion]) -> list[RemoteRegion]:
        """The regions with the configured exit deadlines over the declared ones; a deadline naming no region is
        refused, saying which devices there are."""
        for spec in self.spec.region_deadlines:
            if not 1 <= spec.deadline_ms <= 3_600_000:
                raise VmConfigError(f"region deadline {spec}: must be 1 to 3600000 ms")
            hits = [i for i, r in enumerate(regions) if r.device == spec.device and (not spec.region or
                    r.name == spec.region) and (not spec.service or r.service == spec.service)]
            if not hits:
                names = ", ".join(sorted({f"{r.device}/{r.name}" for r in regions})) or "none"
                raise VmConfigError(f"region deadline {spec}: no such device region (regions: {names})")
            if not spec.service and len({regions[i].service for i in hits}) > 1:
                raise VmConfigError(f"region deadline {spec}: device {spec.device} is on several device services; "
                                    "name the service")
            for i in hits:
                regions[i] = dataclasses.replace(regions[i], deadline_ms=spec.deadline_ms)
        return regions

    def _build_device_map(self) -> None:
        regions: list[RemoteRegion] = []
        for endpoint in self.endpoints:
            try:
                regions.extend(endpoint.describe())
            except TransportError as exc:
                raise VmConfigError(str(exc)) from None
        regions = self._with_deadlines(regions)
        regions.sort(key=lambda r: r.base)
        for a, b in itertools.pairwise(regions):
            if b.base < a.end:
                raise VmConfigError(
                    f"device regions overlap: {a.device}/{a.name} {_fmt_range(a.base, a.size)} on {a.service} and "
                    f"{b.device}/{b.name} {_fmt_range(b.base, b.size)} on {b.service}"
                )
        for r in regions:
            # A device service's Describe is not to be trusted: a region past 2**64, or a ROMD region not made of
            # whole pages, made Unicorn refuse its mapping (a mirror, a posted window) once the guest ran.
            if r.end > 1 << 64:
                raise VmConfigError(f"device region {r.device}/{r.name} of 0x{r.size:x} bytes at 0x{r.base:x} on "
                                    f"{r.service} runs past the end of the 64-bit address space")
            if r.romd and (r.base % PAGE or r.size % PAGE):
                raise VmConfigError(f"ROMD region {r.device}/{r.name} {_fmt_range(r.base, r.size)} on {r.service} is "
                                    "not made of whole 4 KiB pages, so its mirror cannot be mapped")
            for block in self.ram:
                if r.base < block.end and block.base < r.end:
                    raise VmConfigError(f"device region {r.device}/{r.name} {_fmt_range(r.base, r.size)} on "
                                        f"{r.service} overlaps RAM {_fmt_range(block.base, block.size)}")
        self.regions = regions
        self.shadows = ShadowTable(regions)
        self.handlers = HandlerRegistry(regions, Unmapped(self.policies.unmapped_access))
        if self.spec.machine == "virt":
            self._add_gic()
        shadow_reads = ShadowReads(self.shadows)
        posted_writes = PostedWrites()
        # A ROMD region's stores are posted only in a VM of one vCPU (see PostedWhileTrapped).
        posting = [r for r in regions if r.posted and (not r.romd or self.spec.vcpu_count == 1)]
        for r in regions:
            if r.shadows:
                self.handlers.attach(r, shadow_reads)
        for r in posting:
            self.handlers.attach(r, PostedWhileTrapped(posted_writes, self._mirror_switch(r)) if r.romd
                                 else posted_writes)
        for r in regions:
            if r.romd:
                endpoint = next(e for e in self.endpoints if e.name == r.service)
                try:
                    chunks, enabled = endpoint.read_mirror(self.vm_id, r.device, r.name)
                except TransportError as exc:
                    raise VmConfigError(str(exc)) from None
                mirror = RamBlock(r.base, r.size)
                for offset, data in chunks:
                    if offset + len(data) > r.size:
                        mirror.close()
                        raise VmConfigError(f"device service {r.service}: mirror of {r.device}/{r.name} sent "
                                            f"{len(data)} bytes at +0x{offset:x}, past the region's {r.size}")
                    mirror.write(r.base + offset, data)
                self.mirrors[(r.service, r.device, r.name)] = Mirror(r, mirror, enabled)
        self.posted_windows = self._posted_windows(regions)
        # Only VMs that post stores need the posted-write watchdog (it wakes every 5 ms).
        self.has_posted = bool(posting)

    def _build_irqs(self) -> None:
        """Wire the devices' interrupt lines: the machine profile's wiring (virt: QEMU's SPIs), then the VM
        configuration's routes on top. A route naming what no service described is refused by name."""
        lines: list[RemoteLine] = []
        for endpoint in self.endpoints:
            try:
                lines.extend(endpoint.interrupt_lines())
            except TransportError as exc:
                raise VmConfigError(str(exc)) from None
        self.lines = lines
        with_lines = {line.service for line in lines}
        self.irq_from_arrival = any(not ep.same_clock for ep in self.endpoints if ep.name in with_lines)
        routes: dict[LineKey, Route] = line_routes(lines, self.regions) if self.spec.machine == "virt" else {}
        if self.spec.irq_routes and self.gic is None:
            raise VmConfigError(f"interrupt route {self.spec.irq_routes[0]}: this machine has no interrupt "
                                "controller (only machine virt has one, a GICv2)")
        for route in self.spec.irq_routes:
            line = self._find_line(route)
            assert self.gic is not None
            spis = self.gic.num_irq - 32
            if not 0 <= route.spi < spis:
                raise VmConfigError(f"interrupt route {route}: SPI {route.spi} is outside 0-{spis - 1}")
            routes[(line.service, line.device, line.index)] = Route(route.spi, edge=line.trigger == "edge")
        self.irqs = IrqRouter(self.gic, routes, self.vm_id, {(ln.service, ln.device, ln.index) for ln in self.lines})

    def _find_line(self, route: IrqRouteSpec) -> RemoteLine:
        """The line an interrupt route names, or VmConfigError saying what there is."""
        own = [ln for ln in self.lines
               if ln.device == route.device and (not route.service or ln.service == route.service)]
        if not own:
            with_lines = sorted({ln.device for ln in self.lines}) or ["none"]
            raise VmConfigError(f"interrupt route {route}: no device named {route.device!r} with interrupt lines "
                                f"{'on ' + route.service if route.service else 'on any device service'} "
                                f"(devices with lines: {', '.join(with_lines)})")
        services = sorted({ln.service for ln in own})
        if len(services) > 1:
            raise VmConfigError(f"interrupt route {route}: device {route.device!r} is on several device services "
                                f"({', '.join(services)}); name the service")
        wanted = route.line or "0"
        for ln in own:
            if (wanted.isdigit() and ln.index == int(wanted)) or ln.name == wanted:
                return ln
        names = ", ".join(f"{ln.index} ({ln.name})" for ln in sorted(own, key=lambda ln: ln.index))
        raise VmConfigError(f"interrupt route {route}: {route.device} has no line {wanted!r}; its lines: {names}")

    def _build_dma(self) -> None:
        """The windows of RAM each device service may reach by DMA: what the configuration grants, and on virt
        all RAM for a service hosting the board's devices that is granted nothing (QEMU's devices reach all
        RAM)."""
        names = [e.name for e in self.endpoints]
        grants: dict[str, list[DmaWindow]] = {}
        for service, window in self.spec.dma_grants:
            if service not in names:
                raise VmConfigError(f"DMA window {window.name!r} is granted to device service {service!r}, which is "
                                    f"not one of this VM's ({', '.join(names) or 'none'})")
            grants.setdefault(service, []).append(window)
        if self.spec.machine == "virt":
            for service in board_services(self.regions):
                if service not in grants:
                    grants[service] = [DmaWindow("ram" if len(self.ram) == 1 else f"ram{i}", block.base, block.size)
                                       for i, block in enumerate(self.ram)]
        for service, windows in grants.items():
            try:
                checked = check_windows(service, windows, self.ram)
            except ValueError as exc:
                raise VmConfigError(str(exc)) from None
            self.dma[service] = GuestDma(service, checked, self._ram_block, self._dma_written)

    def _dma_written(self, start: int, end: int) -> None:
        """A device wrote guest RAM by DMA: every vCPU drops code translated from those bytes before it runs on
        from its next stop (through the patch log the ROMD mirrors use)."""
        with self.lock:
            self._patch_log.append((self.map_generation + 1, start, end))
            self.map_generation += 1

    def apply_line_changes(self, changes: Iterable[LineChange]) -> None:
        """Interrupt levels a device service reported (on a completion or its watch): into the GIC."""
        self.irqs.apply_all(changes)

    def _mirror_switch(self, region: RemoteRegion) -> Callable[[], bool]:
        """Whether ``region``'s mirror is on now (a ROMD region's posted stores wait for it to be off)."""
        key = (region.service, region.device, region.name)

        def mirror_on() -> bool:
            mirror = self.mirrors.get(key)
            return mirror is None or mirror.enabled

        return mirror_on

    def _posted_windows(self, regions: list[RemoteRegion]) -> list[tuple[RemoteRegion, RamBlock]]:
        """Posted regions whose stores need no exit at all: the vCPUs map them write-only over a sink
        and queue each store from a write hook, while loads still fault like any MMIO read.

        A write hook makes Unicorn send every guest load and store through its slow path (about a third
        slower on memory-heavy code), so only VMs with posted regions pay it. Regions must own whole
        pages; a traced or strict-KVM VM keeps the exit for every store (each one is traced or checked).
        AArch64 only (see below).
        """
        if self.trace is not None or self.strict_kvm or self.arch.name != "aarch64":
            # AArch32 keeps an exit per store: with a write hook, Unicorn 2.1.4 gets stores inside Thumb IT
            # blocks wrong (the differential campaign finds registers of later instructions never written).
            return []
        return [(r, RamBlock(r.base, r.size)) for r in regions
                if r.posted and not r.romd and r.base % PAGE == 0 and r.size % PAGE == 0]

    def patched_since(self, generation: int) -> list[tuple[int, int]] | None:
        """Address ranges of mirror bytes changed after `generation`; None when the log no longer reaches
        back that far (the caller then drops every translation). Called with the lock held."""
        if generation < 0:
            return None
        if self._patch_log and len(self._patch_log) == self._patch_log.maxlen and self._patch_log[0][0] > generation:
            return None
        return [(start, end) for gen, start, end in self._patch_log if gen > generation]

    def apply_mirror_changes(self, changes: Iterable[MirrorChange]) -> None:
        """Apply what a device reported for its ROMD regions: bytes first, then the mode; every vCPU
        remaps before it runs again (KVM's memslot update)."""
        changed = False
        with self.lock:
            for c in changes:
                mirror = self.mirrors.get((c.service, c.device, c.region))
                if mirror is None:
                    raise TransportError(f"device service {c.service} sent a mirror update for {c.device}/{c.region}, "
                                         "which is not a ROMD region it described")
                for offset, data in c.patches:
                    if offset + len(data) > mirror.block.size:
                        raise TransportError(f"device service {c.service}: mirror patch of {len(data)} bytes at "
                                             f"+0x{offset:x} is outside {c.device}/{c.region}")
                    if not data:
                        continue  # changes nothing; an empty range in the patch log makes Unicorn refuse the flush
                    mirror.block.write(mirror.block.base + offset, data)
                    start = mirror.block.base + offset
                    self._patch_log.append((self.map_generation + 1, start, start + len(data)))
                    changed = True
                if mirror.enabled != c.enabled:
                    mirror.enabled = c.enabled
                    changed = True
            if changed:
                self.map_generation += 1
                for v in self.vcpus:
                    if v.state is VcpuState.RUNNING:
                        v.kick()

    # ----- what device services say unasked: shadow registers, going away --------------------------------
    def _start_watches(self) -> None:
        """Watch every device service: fill the shadow table from the first message of each one that declares
        shadow registers, and keep it current, with one thread per service. Completions update it too
        (``ExitPath.apply_effects``)."""
        for endpoint in self.endpoints:
            if FEATURE_WATCH not in endpoint.features:
                self._check_unwatched(endpoint)
                continue
            try:
                self._start_watch(endpoint)
            except TransportError as exc:
                raise VmConfigError(str(exc)) from None

    def _check_unwatched(self, endpoint: DeviceEndpoint) -> None:
        """A service without the Watch RPC (a minimal one): refuse the VM if anything it was given needs Watch."""
        needs = []
        if endpoint.name in self.shadows.services:
            needs.append("its shadow registers")
        if any(key[0] == endpoint.name for key in self.irqs.routes):
            needs.append("its interrupt lines")
        if endpoint.name in self.dma:
            needs.append("the DMA windows granted to it")
        if needs:
            raise VmConfigError(f"device service {endpoint.name} does not implement Watch (it lists no "
                                f"'{FEATURE_WATCH}' feature), which {' and '.join(needs)} need")

    def _start_watch(self, endpoint: DeviceEndpoint) -> None:
        """Watch one device service (TransportError when its shadow snapshot is bad)."""
        watch = endpoint.watch(self.vm_id, self.dma.get(endpoint.name))
        thread = threading.Thread(target=self._watch, args=(endpoint, watch), name=f"watch-{self.vm_id}",
                                  daemon=True)
        self._watches.append((watch, thread))
        if endpoint.name in self.shadows.services:
            first = self._shadow_snapshot(watch)
            if isinstance(first, GoingAway):
                self._service_leaving(endpoint, first)
            elif first is not None:
                self.shadows.apply(first)
        thread.start()

    def device_restarted(self, service: str, restart: DeviceRestarted, vcpu_id: int) -> None:
        """``service`` came back as another instance and the policy is to go on (any vCPU; the first one does
        the work). The VM says so in an event, then trusts nothing it held from the old instance: shadow values,
        line levels and their generations go, ROMD mirrors are read again, and the service is watched again
        (its snapshot brings shadows and lines back). TransportError when the new instance cannot be read."""
        endpoint = next(e for e in self.endpoints if e.name == service)
        with self._restart_lock:
            if endpoint.instance_id == restart.new_instance:
                return
            endpoint.instance_id = restart.new_instance
            log.warning("VM %s: %s; going on with the new instance (--on-device-restart continue)", self.vm_id,
                        restart)
            self.events.emit(EventKind.DEVICE_SERVICE_RESTARTED, vcpu_id=vcpu_id, device=service,
                             reason=f"{restart}; going on with the new instance: its mirrors and shadow registers "
                             "are read again, and the access in flight is sent to it")
            self.shadows.reset(service)
            self.irqs.forget(service)
            changes = []
            for (owner, device, region), _mirror in list(self.mirrors.items()):
                if owner == service:
                    chunks, enabled = endpoint.read_mirror(self.vm_id, device, region)
                    changes.append(MirrorChange(service, device, region, enabled, tuple(chunks)))
            self.apply_mirror_changes(changes)
            self._start_watch(endpoint)

    def _shadow_snapshot(self, watch: ServiceWatch) -> ShadowChange | GoingAway | None:
        """The first shadow event of a watch (its snapshot), applying the line levels that come before it."""
        while True:
            event = watch.next(SHADOW_SNAPSHOT_S)
            if not isinstance(event, LineChange):
                return event
            self.irqs.apply(event)

    def _watch(self, endpoint: DeviceEndpoint, watch: ServiceWatch) -> None:
        """Apply a device service's shadow updates, and hear that it is going away, until the VM is deleted.

        A broken watch does not end the run: the service's shadow registers are dropped, so their reads exit
        (a guest polling one would otherwise wait forever on a value nobody updates), and if the service is
        gone that exit fails with an error naming the access, the device, the PC and the instruction.
        """
        service = endpoint.name
        try:
            while (event := watch.next()) is not None:
                if isinstance(event, LineChange):
                    self.irqs.apply(event)
                elif isinstance(event, GoingAway):
                    self._service_leaving(endpoint, event)
                else:
                    self.shadows.apply(event)
        except Exception as exc:  # TransportError, or a bug: either way the copies can no longer be trusted
            if self._watches_closing:
                return
            self.shadows.disable(service)
            reason = str(exc) if isinstance(exc, TransportError) else f"internal error: {exc!r}"
            if service in self.shadows.services:
                log.warning("VM %s: %s; its shadow registers are dropped, their reads exit", self.vm_id, reason)
            else:
                log.info("VM %s: %s", self.vm_id, reason)

    def _service_leaving(self, endpoint: DeviceEndpoint, going: GoingAway) -> None:
        """A device service is draining: the VM says so in an event, then sends it no new exit (such an access gets
        the device-error policy), drops its shadow registers (their reads exit, and fail as its other accesses do)
        and has every vCPU close its stream to it. The event comes first, so it precedes any error it causes."""
        with self.lock:
            over = self._final_pending or self.run_state is RunState.FINISHED
        if not over:
            log.info("VM %s: device service %s is going away: %s", self.vm_id, endpoint.name, going.reason)
            self.events.emit(EventKind.DEVICE_SERVICE_LEFT, device=endpoint.name,
                             reason=f"device service {endpoint.name} is going away ({going.reason}); its accesses "
                             "now get the device-error policy")
        endpoint.leaving = going
        self.shadows.disable(endpoint.name)
        for vcpu in self.vcpus:
            vcpu.release_channel(endpoint.name)

    def _resync_shadows(self) -> None:
        """After a reset, take a fresh snapshot of every service's shadow registers before a vCPU runs: the
        reset's own update may still be on its way through the watch stream."""
        for endpoint in self.endpoints:
            if endpoint.name not in self.shadows.services or endpoint.leaving is not None:
                continue
            watch = endpoint.watch(self.vm_id)
            try:
                snapshot = self._shadow_snapshot(watch)
            finally:
                watch.cancel()
            if isinstance(snapshot, GoingAway):
                self._service_leaving(endpoint, snapshot)
            elif snapshot is not None:
                self.shadows.apply(snapshot)

    def _stop_watches(self) -> None:
        self._watches_closing = True
        for watch, _thread in self._watches:
            watch.cancel()
        for _watch, thread in self._watches:
            if thread.is_alive():
                thread.join(2.0)
        self._watches = []

    def find_region(self, address: int) -> RemoteRegion | None:
        slot = self.handlers.lookup(address)
        return slot.region if slot is not None else None

    # ----- run control -----------------------------------------------------------------------------------
    def start(self) -> None:
        with self.lock:
            if self.run_state is not RunState.CREATED:
                raise VmStateError(f"VM {self.vm_id} was already started (state {self.run_state.value})")
            self.run_state = RunState.RUNNING
            self.events.restart_clock()
            self._started_at = time.monotonic()
            for vcpu in self.vcpus:
                vcpu.start_thread()
            self.events.emit(EventKind.RUNNING, reason=f"VM {self.vm_id} started")
            self.vcpus[0].power_on(self.spec.entry_point, 0)
        if self.spec.wall_clock_seconds > 0:
            timer = threading.Timer(self.spec.wall_clock_seconds, self._wall_clock_expired)
            timer.daemon = True
            timer.start()

    def _wall_clock_expired(self) -> None:
        self.finish(EventKind.TIMED_OUT,
                    reason=f"wall-clock limit of {self.spec.wall_clock_seconds:g} s reached")

    def _wait_quiescent(self, pred: set[VcpuState] | frozenset[VcpuState], what: str, timeout: float) -> None:
        """Kick every vCPU until each is in one of the states in pred (emu_stop can race emu_start)."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                busy = [v for v in self.vcpus if v.state not in pred]
                if not busy:
                    return
                for v in busy:
                    if v.state is VcpuState.RUNNING:
                        v.kick()
                self.vcpus[0].cond.wait(0.005)
            if time.monotonic() > deadline:
                raise VmStateError(f"VM {self.vm_id}: vCPUs {[v.index for v in busy]} did not {what} within "
                                   f"{timeout:g} s")

    def pause(self, timeout: float = 10.0, reason: str = "paused by a client") -> None:
        with self.lock:
            if self.run_state is not RunState.RUNNING:
                raise VmStateError(f"VM {self.vm_id} is {self.run_state.value}, not running")
            for v in self.vcpus:
                v.pause_req = True
            self.run_state = RunState.PAUSED
        self._wait_quiescent(QUIESCENT, "pause", timeout)
        self.events.emit(EventKind.PAUSED, reason=reason)

    def resume(self) -> None:
        with self.lock:
            if self.run_state is not RunState.PAUSED:
                raise VmStateError(f"VM {self.vm_id} is {self.run_state.value}, not paused")
            self.run_state = RunState.RUNNING
            for v in self.vcpus:
                v.pause_req = False
                v.cond.notify_all()
            self.events.emit(EventKind.RUNNING, reason="resumed by a client")

    def fail(self, error_kind: ErrorKind, reason: str, **fields: object) -> None:
        self.finish(EventKind.ERROR, error_kind=error_kind, reason=reason, **fields)

    def finish(self, kind: EventKind, **fields: object) -> None:
        """End the run: the first final event wins; it is emitted once every vCPU has stopped."""
        with self.lock:
            if self._final_pending or self.run_state is RunState.FINISHED:
                return
            self._final_pending = True
            for v in self.vcpus:
                v.stop_req = True
                v.cond.notify_all()
        threading.Thread(target=self._stop_all, args=(kind, fields), name="vm-stop", daemon=True).start()

    def _stop_all(self, kind: EventKind, fields: dict[str, object]) -> None:
        for _ in range(2000):
            alive = [v for v in self.vcpus if v.thread_alive_elsewhere()]
            if not alive:
                break
            for v in alive:
                if v.state is VcpuState.RUNNING:
                    v.kick()
                v.join(0.005)
        with self.lock:
            self.run_state = RunState.FINISHED
            self._finished_at = time.monotonic()
        if self.trace is not None:
            self.trace.close()
        self.events.emit(kind, **fields)  # type: ignore[arg-type]

    def check_idle(self) -> None:
        """When every vCPU is off or halted and nothing can wake one, the run is over."""
        with self.lock:
            if self._resetting or self._final_pending:
                return
            states = [v.state for v in self.vcpus]
            if all(s in (VcpuState.OFF, VcpuState.HALTED) for s in states):
                halted = sum(s is VcpuState.HALTED for s in states)
                reason = (f"every vCPU is halted in WFI or off ({halted} halted) and nothing can wake them"
                          if halted else "every vCPU is off (PSCI CPU_OFF)")
                self.finish(EventKind.HALTED, reason=reason)

    # ----- PSCI that needs the whole VM --------------------------------------------------------------
    def psci_cpu_on(self, caller: int, target_mpidr: int, entry: int, context: int) -> int:
        target = psci.mpidr_to_vcpu(target_mpidr)
        if target >= len(self.vcpus) or target_mpidr >> 24:
            return psci.INVALID_PARAMETERS
        entry_addr = entry & ~1 if self.arch.name == "arm" else entry
        if self._ram_block(entry_addr, 2) is None and not any(
                m.region.base <= entry_addr < m.region.end for m in self.mirrors.values()):
            return psci.INVALID_PARAMETERS  # neither RAM nor flash (QEMU starts the CPU there and it faults)
        with self.lock:
            vcpu = self.vcpus[target]
            if vcpu.state is VcpuState.STARTING:
                return psci.ON_PENDING
            if vcpu.state is not VcpuState.OFF or self._final_pending:
                return psci.ALREADY_ON
            vcpu.power_on(entry, context)
        return psci.SUCCESS

    def psci_affinity_info(self, target_mpidr: int) -> int:
        target = psci.mpidr_to_vcpu(target_mpidr)
        if target >= len(self.vcpus):
            return psci.INVALID_PARAMETERS
        state = self.vcpus[target].state
        return {VcpuState.OFF: 1, VcpuState.STARTING: 2}.get(state, 0)

    def request_reset(self, caller: int, pc: int) -> None:
        with self.lock:
            if self._resetting or self._final_pending:
                return
            self._resetting = True
            for v in self.vcpus:
                v.off_req = True
                v.cond.notify_all()
        threading.Thread(target=self._reset, args=(caller, pc), name="vm-reset", daemon=True).start()

    def _reset(self, caller: int, pc: int) -> None:
        try:
            self._wait_quiescent(frozenset({VcpuState.OFF, VcpuState.STOPPED}), "stop for the reset", 30.0)
            for endpoint in self.endpoints:
                self.apply_mirror_changes(endpoint.reset(self.vm_id))
            if self.gic is not None:
                self.gic.reset()
                self.irqs.resync()  # lines still high stay asserted; the reset's own changes follow on the watch
            self._resync_shadows()
            self._load_images()
            with self.lock:
                if self._final_pending:
                    return
                for v in self.vcpus:
                    v.reinit()
                    v.off_req = False
                self.events.emit(EventKind.RESET, vcpu_id=caller, pc=pc,
                                 reason=f"PSCI SYSTEM_RESET from vCPU {caller}")
                self._resetting = False
                self.vcpus[0].power_on(self.spec.entry_point, 0)
        except (TransportError, VmStateError) as exc:
            with self.lock:
                self._resetting = False
            self.fail(ErrorKind.DEVICE_SERVICE, f"system reset failed: {exc}")

    # ----- inspection ------------------------------------------------------------------------------------
    def _quiescent_vcpu(self, vcpu_id: int) -> Vcpu:
        if not 0 <= vcpu_id < len(self.vcpus):
            raise VmConfigError(f"VM {self.vm_id} has no vCPU {vcpu_id} (it has {len(self.vcpus)})")
        vcpu = self.vcpus[vcpu_id]
        if self.run_state is not RunState.CREATED and vcpu.state not in QUIESCENT:
            raise VmStateError(f"vCPU {vcpu_id} of VM {self.vm_id} is {vcpu.state.value}; pause the VM first")
        return vcpu

    def get_registers(self, vcpu_id: int, names: list[str]) -> tuple[list[tuple[str, int]], bool]:
        with self.lock:
            vcpu = self._quiescent_vcpu(vcpu_id)
            return vcpu.read_registers(names), vcpu.state is VcpuState.EXIT_WAIT

    def set_registers(self, vcpu_id: int, values: list[tuple[str, int]]) -> None:
        with self.lock:
            vcpu = self._quiescent_vcpu(vcpu_id)
            if vcpu.state is VcpuState.EXIT_WAIT:
                raise VmStateError(f"vCPU {vcpu_id} has an exit pending; its registers can be read, not written")
            vcpu.write_registers(values)

    def read_memory(self, address: int, length: int) -> bytes:
        block = self._ram_block(address, max(1, length))
        if block is None:
            raise VmConfigError(f"{_fmt_range(address, max(1, length))} is not inside one RAM region")
        return block.read(address, length)

    def write_memory(self, address: int, data: bytes) -> None:
        with self.lock:
            if self.run_state is RunState.RUNNING:
                raise VmStateError(f"VM {self.vm_id} is running; pause it before writing memory")
            block = self._ram_block(address, max(1, len(data)))
            if block is None:
                raise VmConfigError(f"{_fmt_range(address, max(1, len(data)))} is not inside one RAM region")
            block.write(address, data)
            for v in self.vcpus:
                v.uc.ctl_flush_tb()  # type: ignore[attr-defined]

    def fold_pending(self) -> None:
        """Move the GIC's interrupt-latency samples into this VM's histograms (any thread; once a second by the
        latency folder, and before the statistics are read)."""
        if self.gic is None:
            return
        acks, eois = self.gic.take_latency()
        if acks or eois:
            with self._irq_lock:
                for hist, samples in ((self._irq_ack, acks), (self._irq_eoi, eois)):
                    for ns in samples:
                        hist.record_value(ns)

    def stats(self, include_histograms: bool = False, counters_only: bool = False) -> VmStats:
        """Counters and exit latency per vCPU and for the VM.

        Percentiles cost about 0.1 s per vCPU in pure Python, so a client polling during a run asks for
        counters only; a load tester asks for the whole histograms to merge and plot them itself.
        """
        total = None if counters_only else new_latency_histogram()
        vcpus = []
        report = []
        for v in self.vcpus:
            st = v.exits.stats
            latency = None
            if total is not None:
                snapshot = v.latency_snapshot()
                total.add(snapshot)
                latency = summarize(snapshot, include_histograms)
                release_histogram(snapshot)
            vcpus.append(VcpuStats(
                vcpu_id=v.index, state=v.state.value, exits=st.exits, reads=st.reads, writes=st.writes,
                posted_writes=st.posted_writes, posted_batches=st.posted_batches, psci_calls=v.psci_calls,
                external_aborts=st.aborts, nops=st.nops, hand_decoded=st.hand_decoded, shadow_reads=st.shadow_reads,
                exit_latency=latency,
            ))
            report += list(st.kvm_report.values())
        end = self._finished_at or time.monotonic()
        irq_ack = irq_eoi = None
        if not counters_only and self.gic is not None:
            self.fold_pending()
            with self._irq_lock:
                irq_ack = summarize(self._irq_ack, include_histograms)
                irq_eoi = summarize(self._irq_eoi, include_histograms)
        exit_latency = None
        if total is not None:
            exit_latency = summarize(total, include_histograms)
            release_histogram(total)
        return VmStats(
            vcpus=tuple(vcpus), exits=sum(v.exits for v in vcpus),
            run_seconds=(end - self._started_at) if self._started_at else 0.0,
            exit_latency=exit_latency,
            kvm_report=tuple(report), irq_ack_latency=irq_ack, irq_eoi_latency=irq_eoi,
            irq_from_arrival=self.irq_from_arrival,
        )

    # ----- teardown --------------------------------------------------------------------------------------
    def shut_down(self, reason: str, timeout: float) -> None:
        """The service is going away: pause at an instruction boundary (every vCPU quiescent, its posted writes
        delivered and their failures known), then end the run with a final STOPPED event saying why."""
        with self.lock:
            running = self.run_state is RunState.RUNNING
        if running:
            try:
                self.pause(timeout, reason=f"{reason}: paused at an instruction boundary, posted writes delivered")
            except VmStateError as exc:  # a vCPU stuck in a device access: stop it anyway, the event says so
                reason = f"{reason} ({exc})"
        self.finish(EventKind.STOPPED, reason=reason)

    def delete(self, timeout: float = 10.0) -> None:
        self.finish(EventKind.STOPPED, reason="stopped by a client")
        deadline = time.monotonic() + timeout
        stopped = all(v.join(max(0.0, deadline - time.monotonic())) for v in self.vcpus)
        self._stop_watches()
        for endpoint in self.endpoints:
            endpoint.close()
        if not stopped:
            return  # a vCPU thread is stuck in Unicorn: leaking its memory beats freeing it under its feet
        for v in self.vcpus:
            close_uc(v.uc)
        self._release_memory()

    def _release_memory(self) -> None:
        if self.ticker is not None:
            self.ticker.stop()
        for block in self.ram:
            block.close()
        for mirror in self.mirrors.values():
            mirror.block.close()
        for _region, sink in self.posted_windows:
            sink.close()
        self.ram = []
        self.mirrors = {}
        self.posted_windows = []
