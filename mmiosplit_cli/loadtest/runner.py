"""Orchestration of a load test: place and start the services, measure the floors, run the guest, collect.

How a run is measured (the same for the gRPC run and the local-transport floor):

1. every VM starts; its vCPUs run the warm-up loop, then each sets its ready flag and spins in RAM;
2. once every vCPU of every VM is ready, each VM is paused (no exit is in flight: the guests spin in RAM),
   its cumulative histograms are taken (snapshot A, the warm-up), the go word is written, and it resumes;
3. right after, a counters-only snapshot (A') starts the rate window;
4. ``--exits``: the guests power off after their iterations and the final statistics are snapshot B;
   ``--duration``: after the duration a counters-only snapshot (B') ends the rate window, then the
   histograms are taken (B) and the VM is deleted.

Latency is histogram B minus histogram A (every exit after the release, warm-up excluded exactly);
exits/s is the counter difference over the vcpu service's own clock between A' and B'. The snapshots
with histograms cost the vcpu service about 0.1 s of CPU each; A is taken while the VM is paused, B after
the rate window, so neither falls inside a measured window (in ``--duration`` runs with several vCPUs,
the histogram of vCPU k is copied after the percentiles of vCPU k-1 were computed, so its last exits can
share the CPU with that work).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hdrh.histogram import HdrHistogram

from device_service.config import ConfigError, create_device, parse_device_spec
from device_service.models import irq_probe
from mmiosplit.mmio import TransportError
from mmiosplit.v1 import vcpu_pb2
from mmiosplit.wire import event_kind_name as kind_name
from mmiosplit_cli.launcher import LaunchError, check_health, free_tcp_port, local_services
from mmiosplit_cli.loadtest import floors as floors_mod
from mmiosplit_cli.loadtest import stats
from mmiosplit_cli.loadtest.guest import (
    RAM_BASE,
    RAM_SIZE,
    Access,
    GuestError,
    GuestProgram,
    IrqTarget,
    build_program,
    iterations_for,
    mix_text,
    parse_mix,
    sync_exits_per_iteration,
)
from mmiosplit_cli.loadtest.progress import Reporter
from mmiosplit_cli.loadtest.vms import GrpcVm, LocalVm, VmError, VmHandle, vm_config
from vcpu_service.arch import arch_by_name
from vcpu_service.gic import GICC_BASE, GICD_BASE
from vcpu_service.transport import GrpcEndpoint

DEFAULT_DEVICE = "scratch@0x0a000000,size=0x1000"
DEFAULT_IRQ_DEVICE = "irq-probe@0x0a000000"
#: The SPI the interrupt loop's device is wired to: one QEMU's virt board leaves free (UART 1, RTC 2, PCIe 3-6,
#: GPIO 7, secure UART 8, GED 9, virtio 16-47).
IRQ_SPI = 12
DEFAULT_IRQ_DELAY_US = 500
#: Synchronous exits of one interrupt round: the FIRE that asks for it and the handler's ACK.
IRQ_ROUND = (Access(True), Access(True))
DEFAULT_EXITS = 5000
# How often the progress is polled (GetStats counters_only) while the guest runs, if the reporter shows it.
POLL_S = 1.0
REPLICA_ALIGN = 0x1_0000


class LoadTestError(RuntimeError):
    """Bad configuration or an unreachable service (exit status 2); the message names the option or address."""


class GuestFailed(RuntimeError):
    """The guest stopped with an error, or never reached its barrier (exit status 1)."""


@dataclass
class LoadConfig:
    """Everything a load test needs, in plain Python (the command line is parsed into this)."""

    arch: str = "aarch64"
    vcpus: int = 1
    mix: str = "1r"
    size: int = 4
    posted: bool = False
    device: str | None = None
    offset: int = 0
    target: str | None = None
    duration: float | None = None
    exits: int | None = None
    warmup: int = 300
    transport: str = "unix"
    vcpu_cpu: int | None = None
    device_cpu: int | None = None
    replicas: int = 1
    processes: int = 1
    scale: bool = False
    floors: bool = True
    floor_exits: int = 3000
    vcpu_service: str | None = None
    device_services: list[str] = field(default_factory=list)
    cpu_model: str = ""
    timeout: float = 600.0
    #: Measure interrupt latency: the loop asks an irq-probe for an interrupt and handles it (``--irq``).
    irq: bool = False
    irq_delay_us: int = DEFAULT_IRQ_DELAY_US

    def parsed_mix(self) -> tuple[Access, ...]:
        return IRQ_ROUND if self.irq else parse_mix(self.mix)

    @property
    def default_device(self) -> str:
        return DEFAULT_IRQ_DEVICE if self.irq else DEFAULT_DEVICE

    def to_json(self) -> dict[str, object]:
        d = dict(vars(self))
        d["mix"] = "irq" if self.irq else mix_text(self.parsed_mix())
        d["device"] = self.device or (self.default_device if not self.device_services else None)
        d["mode"] = "duration" if self.duration is not None else "exits"
        return d


# ----- results -------------------------------------------------------------------------------------------------
@dataclass
class VcpuResult:
    vcpu_id: int
    hist: HdrHistogram
    window: stats.Window  # the rate window (A' to B')
    counts: stats.Window  # everything since the release (A to B): exact counts, not for rates


@dataclass
class VmResult:
    """One VM's measurement: its histogram after warm-up and its counters over the rate window."""

    label: str
    hist: HdrHistogram
    window: stats.Window
    vcpus: list[VcpuResult]
    warmup_exits: int
    iterations: float
    counts: stats.Window  # everything since the release (A to B): exact counts, not for rates
    irq: IrqLatency | None = None

    @property
    def exits_per_s(self) -> float:
        return self.window.exits_per_s


@dataclass
class IrqLatency:
    """Device interrupt latency after the warm-up: the line raised to the handler reading GICC_IAR (``ack``),
    and to its GICC_EOIR (``eoi``); ``from_arrival`` when the device service does not share the vcpu service's
    clock, so both start when the line change arrived."""

    ack: HdrHistogram
    eoi: HdrHistogram
    from_arrival: bool = False

    @staticmethod
    def merge(parts: Sequence[IrqLatency | None]) -> IrqLatency | None:
        got = [p for p in parts if p is not None]
        if not got:
            return None
        return IrqLatency(stats.merge(p.ack for p in got), stats.merge(p.eoi for p in got),
                          any(p.from_arrival for p in got))


@dataclass
class ProcessUse:
    """CPU time of one process over the measured window."""

    name: str
    pid: int
    cpu: int | None
    percent: float | None


@dataclass
class Measurement:
    """A run of one or more VMs measured together."""

    vms: list[VmResult]
    wall_seconds: float
    cpu: list[ProcessUse] = field(default_factory=list)

    @property
    def hist(self) -> HdrHistogram:
        return stats.merge(v.hist for v in self.vms)

    @property
    def irq(self) -> IrqLatency | None:
        return IrqLatency.merge([v.irq for v in self.vms])

    @property
    def exits(self) -> int:
        return int(self.hist.get_total_count())

    @property
    def exits_per_s(self) -> float:
        """Aggregate: the sum of each VM's rate over its own window (the windows overlap)."""
        return sum(v.exits_per_s for v in self.vms)

    @property
    def posted_writes(self) -> int:
        """Posted writes since the release (exact; the rate uses the rate window)."""
        return sum(v.counts.posted_writes for v in self.vms)

    @property
    def posted_writes_per_s(self) -> float:
        return sum(v.window.posted_writes_per_s for v in self.vms)

    @property
    def shadow_reads(self) -> int:
        """Loads the vcpu service answered from its copy of a register: no exit, not in the histogram."""
        return sum(v.counts.shadow_reads for v in self.vms)

    @property
    def iteration_us(self) -> float | None:
        """Mean time of one loop iteration on one vCPU."""
        per_vcpu = [stats.rate(v.iterations / max(1, len(v.vcpus)), v.window.seconds) for v in self.vms]
        rates = [r for r in per_vcpu if r > 0]
        return 1e6 / (sum(rates) / len(rates)) if rates else None

    @property
    def warmup_exits(self) -> int:
        return sum(v.warmup_exits for v in self.vms)


@dataclass
class Floor:
    name: str
    hist: HdrHistogram
    exits_per_s: float | None = None
    note: str = ""
    irq: IrqLatency | None = None


@dataclass
class ScalePoint:
    processes: int
    measurement: Measurement


@dataclass
class LoadResult:
    config: LoadConfig
    machine: dict[str, object]
    run: Measurement
    floors: dict[str, Floor]
    scale: list[ScalePoint]
    placement: list[dict[str, object]]
    notes: list[str] = field(default_factory=list)


# ----- the plan -----------------------------------------------------------------------------------------------
@dataclass
class ProcessPlan:
    """One vcpu service (started here or given) and its device services, and where they run."""

    index: int
    vcpu_cpu: int | None
    device_cpu: int | None
    device_args: list[list[str]]  # one list of serve-devices arguments per replica we start
    vcpu_address: str | None = None
    device_addresses: list[str] = field(default_factory=list)
    pids: dict[str, tuple[int, int | None]] = field(default_factory=dict)


def available_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def replica_specs(device: str, replicas: int, posted: bool) -> tuple[list[str], list[int], int]:
    """Spec texts of the target device for each replica (shifted apart), their bases, and its extent."""

    text = device.strip()
    if posted and "posted=" not in text:
        text += ",posted=on"
    try:
        spec = parse_device_spec(text)
        model = create_device(spec)
    except ConfigError as exc:
        raise LoadTestError(f"--device {device!r}: {exc}") from None
    extent = max(r.offset + r.size for r in model.regions())
    stride = -(-extent // REPLICA_ALIGN) * REPLICA_ALIGN
    specs, bases = [], []
    options = "".join(f",{k}={v}" for k, v in spec.options.items())
    for r in range(replicas):
        base = spec.base + r * stride
        name = spec.name if replicas == 1 else f"{spec.name}-r{r}"
        specs.append(f"{spec.type}@{base:#x}{options},name={name}")
        bases.append(base)
    return specs, bases, extent


def describe_target(address: str, target: str | None, posted: bool,
                    kind: str = "scratch") -> tuple[int, int, str, str]:
    """Find the device to load in a running device service: (base, size, local spec or '', device name).
    Without ``target``, the first device of type ``kind``."""

    try:
        endpoint = GrpcEndpoint(address, connect_timeout_s=3.0)
        try:
            regions = endpoint.describe()
        finally:
            endpoint.close()
    except TransportError as exc:
        raise LoadTestError(f"--device-service {address}: {exc}") from None
    if target:
        chosen = [r for r in regions if r.device == target]
        if not chosen:
            names = ", ".join(sorted({r.device for r in regions})) or "none"
            raise LoadTestError(f"--target {target!r}: no such device on {address} (devices: {names})")
    else:
        chosen = [r for r in regions if r.device_type == kind]
        if not chosen:
            raise LoadTestError(f"--device-service {address} has no {kind} device; name one with --target")
    region = chosen[0]
    if posted and not region.posted:
        raise LoadTestError(f"--posted: {region.device} on {address} does not post its writes (posted=off)")
    if region.posted and not posted:
        raise LoadTestError(f"{region.device} on {address} posts its writes; add --posted so the report says so")
    local = ""
    if region.device_type == "scratch":
        local = (f"scratch@{region.base:#x},size={region.size:#x},posted={'on' if region.posted else 'off'},"
                 f"name={region.device}")
    elif region.device_type == "irq-probe":
        local = f"irq-probe@{region.base:#x},name={region.device}"
    return region.base, region.size, local, region.device


def check_reachable(address: str, option: str) -> None:

    status = check_health(address, timeout=3.0)
    if status != "SERVING":
        raise LoadTestError(f"{option} {address}: not reachable ({status})")


def machine_info() -> dict[str, object]:
    """What the numbers depend on: CPU model and count, kernel, Python and the libraries in the path."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str] = {}
    for pkg in ("grpcio", "protobuf", "unicorn", "hdrhistogram", "capstone"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = ""
    return {"cpu_model": model, "cpu_count": os.cpu_count(), "cpus_allowed": len(available_cpus()),
            "kernel": platform.release(), "python": platform.python_version(), **versions}


def _ticks(pid: int) -> int | None:
    try:
        return stats.parse_proc_stat(Path(f"/proc/{pid}/stat").read_text())
    except (OSError, ValueError, IndexError):
        return None


# ----- measurement ------------------------------------------------------------------------------------------
def _counters(resp: vcpu_pb2.GetStatsResponse) -> dict[str, float]:
    return {"exits": resp.exits, "posted_writes": sum(v.posted_writes for v in resp.vcpus),
            "reads": sum(v.reads for v in resp.vcpus), "writes": sum(v.writes for v in resp.vcpus),
            "shadow_reads": sum(v.shadow_reads for v in resp.vcpus), "run_seconds": resp.run_seconds}


def _vcpu_counters(v: vcpu_pb2.VcpuStats, run_seconds: float) -> dict[str, float]:
    return {"exits": v.exits, "posted_writes": v.posted_writes, "reads": v.reads, "writes": v.writes,
            "shadow_reads": v.shadow_reads, "run_seconds": run_seconds}


def _failed(vm: VmHandle, event: vcpu_pb2.VmEvent, when: str) -> GuestFailed:

    return GuestFailed(f"{vm.label}: the guest stopped {when}: {kind_name(event.kind)}: {event.reason}")


@dataclass
class _Tracked:
    vm: VmHandle
    a: vcpu_pb2.GetStatsResponse | None = None
    a_counters: vcpu_pb2.GetStatsResponse | None = None
    b_counters: vcpu_pb2.GetStatsResponse | None = None
    b: vcpu_pb2.GetStatsResponse | None = None


class _Mix:
    def __init__(self, mix: tuple[Access, ...], posted: bool) -> None:
        self.reads = sum(1 for a in mix if not a.is_write)
        self.sync_writes = 0 if posted else sum(1 for a in mix if a.is_write)
        self.posted = sum(1 for a in mix if a.is_write) if posted else 0
        self.sync = sync_exits_per_iteration(mix, posted)


def measure(vms: Sequence[VmHandle], program: GuestProgram, mix: _Mix, *, duration: float | None,
            expected_exits: int, timeout: float, reporter: Reporter,
            pids: Sequence[tuple[str, int, int | None]] = ()) -> Measurement:
    """Run the VMs through warm-up, the barrier and the measured phase; see the module docstring."""
    tracked = [_Tracked(vm) for vm in vms]
    for t in tracked:
        t.vm.start()
    deadline = time.monotonic() + timeout
    n_ready = len(program.ready_addresses)
    first, length = program.ready_addresses[0], 8 * n_ready
    reporter.phase("warm-up")
    while True:
        ready = 0
        for t in tracked:
            event = t.vm.final()
            if event is not None:
                raise _failed(t.vm, event, "during warm-up")
            flags = t.vm.read_memory(first, length)
            ready += sum(1 for i in range(n_ready) if flags[8 * i])
        reporter.progress(ready, n_ready * len(tracked), "vCPUs ready")
        if ready == n_ready * len(tracked):
            break
        if time.monotonic() > deadline:
            raise GuestFailed(f"the warm-up did not finish within {timeout:g} s ({ready} of "
                              f"{n_ready * len(tracked)} vCPUs reached the barrier)")
        time.sleep(0.02)
    for t in tracked:
        t.vm.pause()
    for t in tracked:
        t.a = t.vm.stats(histograms=True)
        t.vm.write_memory(program.go_address, b"\x01\0\0\0")
    for t in tracked:
        t.vm.resume()
    t0 = time.monotonic()
    ticks0 = {pid: _ticks(pid) for _, pid, _ in pids}
    self0 = os.times()
    for t in tracked:
        t.a_counters = t.vm.stats(counters_only=True)
    reporter.phase(f"measuring for {duration:g} s" if duration is not None else f"measuring {expected_exits} exits")
    deadline = time.monotonic() + timeout
    t_end = t0
    if duration is not None:
        last_poll = 0.0
        while (now := time.monotonic()) < t0 + duration:
            for t in tracked:
                event = t.vm.final()
                if event is not None:
                    raise _failed(t.vm, event, "during the measurement")
            if reporter.polls and now - last_poll >= POLL_S:
                last_poll = now
                done = sum(_progress_count(t.vm.stats(counters_only=True), t.a_counters, mix) for t in tracked)
                reporter.progress(now - t0, duration, f"{done} exits")
            time.sleep(min(0.05, max(0.0, t0 + duration - now)))
        for t in tracked:
            t.b_counters = t.vm.stats(counters_only=True)
        t_end = time.monotonic()
        ticks1 = {pid: _ticks(pid) for _, pid, _ in pids}
        self1 = os.times()
        for t in tracked:
            t.b = t.vm.stats(histograms=True)
    else:
        last_poll = 0.0
        while True:
            pending = [t for t in tracked if t.b is None]
            for t in pending:
                event = t.vm.final()
                if event is None:
                    continue
                if event.kind != vcpu_pb2.VM_EVENT_KIND_POWERED_OFF:
                    raise _failed(t.vm, event, "during the measurement")
                t.b = t.b_counters = t.vm.stats(histograms=True)
            if all(t.b is not None for t in tracked):
                t_end = time.monotonic()
                break
            now = time.monotonic()
            if now > deadline:
                raise GuestFailed(f"the guest did not finish {expected_exits} exits within {timeout:g} s (--timeout)")
            if reporter.polls and now - last_poll >= POLL_S:
                last_poll = now
                done = 0
                for t in tracked:
                    snap = t.b_counters if t.b is not None else t.vm.stats(counters_only=True)
                    assert snap is not None
                    done += _progress_count(snap, t.a_counters, mix)
                reporter.progress(done, expected_exits, "exits")
            time.sleep(0.02)
        ticks1 = {pid: _ticks(pid) for _, pid, _ in pids}
        self1 = os.times()
    wall = t_end - t0
    clk = os.sysconf("SC_CLK_TCK")
    cpu = []
    for name, pid, where in pids:
        before, after = ticks0.get(pid), ticks1.get(pid)
        pct = stats.cpu_percent(before, after, clk, wall) if before is not None and after is not None else None
        cpu.append(ProcessUse(name, pid, where, pct))
    own = (self1.user + self1.system) - (self0.user + self0.system)
    mine = os.sched_getaffinity(0)
    cpu.append(ProcessUse("loadtest (this process)", os.getpid(), next(iter(mine)) if len(mine) == 1 else None,
                          100.0 * own / wall if wall > 0 else None))
    results = []
    for t in tracked:
        assert t.a is not None and t.a_counters is not None and t.b is not None and t.b_counters is not None
        results.append(_vm_result(t, mix))
        t.vm.delete()
    return Measurement(results, wall, cpu)


def _progress_count(now: vcpu_pb2.GetStatsResponse, start: vcpu_pb2.GetStatsResponse | None, mix: _Mix) -> int:
    """Exits since the release (posted writes when the mix makes no synchronous exit)."""
    key = "exits" if mix.sync else "posted_writes"
    base = _counters(start)[key] if start is not None else 0
    return int(_counters(now)[key] - base)


def _vm_result(t: _Tracked, mix: _Mix) -> VmResult:
    assert t.a is not None and t.a_counters is not None and t.b is not None and t.b_counters is not None
    win = stats.window(_counters(t.a_counters), _counters(t.b_counters))
    vcpus = []
    a_by_id = {v.vcpu_id: v for v in t.a.vcpus}
    ac_by_id = {v.vcpu_id: v for v in t.a_counters.vcpus}
    bc_by_id = {v.vcpu_id: v for v in t.b_counters.vcpus}
    for vb in t.b.vcpus:
        va = a_by_id.get(vb.vcpu_id)
        before = stats.decode(va.exit_latency.hdr) if va is not None else stats.new_histogram()
        try:
            hist = stats.subtract(stats.decode(vb.exit_latency.hdr), before)
        except ValueError as exc:
            raise GuestFailed(f"{t.vm.label}: vCPU {vb.vcpu_id}: the histograms do not add up: {exc}") from None
        vwin = stats.window(_vcpu_counters(ac_by_id[vb.vcpu_id], t.a_counters.run_seconds),
                            _vcpu_counters(bc_by_id[vb.vcpu_id], t.b_counters.run_seconds))
        counts = stats.window(_vcpu_counters(va, t.a.run_seconds) if va is not None else _ZERO,
                              _vcpu_counters(vb, t.b.run_seconds))
        vcpus.append(VcpuResult(vb.vcpu_id, hist, vwin, counts))
    its = stats.iterations(win, mix.reads, mix.sync_writes, mix.posted)
    irq = None
    if t.b.irq_ack_latency.count:
        try:
            ack, eoi = (stats.subtract(stats.decode(getattr(t.b, f).hdr), stats.decode(getattr(t.a, f).hdr))
                        for f in ("irq_ack_latency", "irq_eoi_latency"))
            irq = IrqLatency(ack, eoi, t.b.irq_from_arrival)
        except ValueError as exc:
            raise GuestFailed(f"{t.vm.label}: the interrupt histograms do not add up: {exc}") from None
    return VmResult(t.vm.label, stats.merge(v.hist for v in vcpus), win, vcpus,
                    int(t.a.exit_latency.count), its, stats.window(_counters(t.a), _counters(t.b)), irq)


_ZERO = {"exits": 0, "posted_writes": 0, "reads": 0, "writes": 0, "run_seconds": 0.0}


# ----- the whole load test -------------------------------------------------------------------------------------
@contextlib.contextmanager
def _started(plans: list[ProcessPlan], cfg: LoadConfig, reporter: Reporter) -> Iterator[Path]:
    """Start the services each plan needs (none for given addresses); yields a scratch folder."""

    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mmiosplit-loadtest-")))
        for plan in plans:
            start_devices = bool(plan.device_args)
            start_vcpu = plan.vcpu_address is None
            if not start_devices and not start_vcpu:
                continue
            reporter.phase(f"starting services for process {plan.index}")
            try:
                vaddr, _, handle = stack.enter_context(local_services(
                    plan.device_args[0] if start_devices else None, start_vcpu=start_vcpu,
                    transport=cfg.transport, vcpu_cpu=plan.vcpu_cpu, device_cpu=plan.device_cpu,
                    more_device_args=plan.device_args[1:]))
            except LaunchError as exc:
                raise LoadTestError(f"cannot start the services: {exc}") from None
            if start_vcpu:
                plan.vcpu_address = vaddr
            if start_devices:
                plan.device_addresses = list(handle.device_addresses)
            for sp in handle.processes:
                cpu = plan.vcpu_cpu if sp.name == "vcpu service" else plan.device_cpu
                label = sp.name if len(plans) == 1 else f"{sp.name} (process {plan.index})"
                plan.pids[label] = (sp.process.pid, cpu)
        yield scratch


def _echo_address(cfg: LoadConfig, scratch: Path) -> str:

    return f"unix:{scratch / 'echo.sock'}" if cfg.transport == "unix" else f"127.0.0.1:{free_tcp_port()}"


def run_loadtest(cfg: LoadConfig, reporter: Reporter | None = None) -> LoadResult:
    """Run the whole load test described by cfg; raises LoadTestError or GuestFailed with a clear message."""
    reporter = reporter or Reporter()
    try:
        mix = cfg.parsed_mix()
    except GuestError as exc:
        raise LoadTestError(str(exc)) from None
    cpus = available_cpus()
    machine = machine_info()  # before this process pins itself
    for option, cpu in (("--vcpu-cpu", cfg.vcpu_cpu), ("--device-cpu", cfg.device_cpu)):
        if cpu is not None and cpu not in cpus:
            raise LoadTestError(f"{option} {cpu}: not a CPU this process may use (allowed: {cpus})")
    notes: list[str] = []
    # Where everything runs: the load tester itself (the floors' client side, the local transport) sits
    # where the (first) vcpu service does.
    plans: list[ProcessPlan] = []
    local_specs: list[str] = []
    if cfg.vcpu_service:
        check_reachable(cfg.vcpu_service, "--vcpu-service")
    if cfg.device_services:
        for addr in cfg.device_services:
            check_reachable(addr, "--device-service")
        found = [describe_target(addr, cfg.target, cfg.posted, "irq-probe" if cfg.irq else "scratch")
                 for addr in cfg.device_services]
        bases = [b for b, _, _, _ in found]
        extents = [s for _, s, _, _ in found]
        local_specs = [s for _, _, s, _ in found if s]
        target_name = found[0][3]
        if len(local_specs) != len(found):
            local_specs = []
            notes.append("local-transport floor skipped: the target device of a given device service is not "
                         "a scratch device or an irq-probe, so it cannot be rebuilt in this process")
        device_args: list[list[str]] = []
    else:
        specs, bases, extent = replica_specs(cfg.device or cfg.default_device, cfg.replicas, cfg.posted)
        target_name = parse_device_spec(specs[0]).name
        extents = [extent] * len(bases)
        local_specs = specs
        device_args = [["--device", s] for s in specs]
    if not cfg.irq and cfg.offset + cfg.size > min(extents):
        raise LoadTestError(f"--offset {cfg.offset:#x}: a {cfg.size}-byte access there falls outside the "
                            f"target device ({min(extents):#x} bytes)")
    for p in range(cfg.processes):
        if cfg.processes > 1:
            vcpu_cpu = device_cpu = cpus[p % len(cpus)]
        else:
            vcpu_cpu = cpus[0] if cfg.vcpu_cpu is None else cfg.vcpu_cpu
            device_cpu = cpus[0] if cfg.device_cpu is None else cfg.device_cpu
        plans.append(ProcessPlan(p, vcpu_cpu, device_cpu, [list(a) for a in device_args],
                                 cfg.vcpu_service, list(cfg.device_services)))
    if cfg.processes > len(cpus):
        # Placement follows this process's affinity: under `taskset -c 0` every process shares CPU 0, and a
        # scale-out curve would measure CPU sharing. Say so beside the numbers.
        shared = [str(p.index) for p in plans if p.index >= len(cpus)]
        many = len(shared) > 1
        notes.append(f"{cfg.processes} processes on {len(cpus)} CPU{'s' if len(cpus) > 1 else ''} "
                     f"({', '.join(map(str, cpus))}: all this process may use): process{'es' if many else ''} "
                     f"{', '.join(shared)} share{'' if many else 's'} a CPU with another one, so aggregate "
                     "exits/s and scale-out efficiency measure CPU sharing, not scale-out")
    # This process is the floors' client side and hosts the local transport: it sits where the (first)
    # vcpu service does, and gives the caller its own affinity back afterwards.
    saved_affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {plans[0].vcpu_cpu if plans[0].vcpu_cpu is not None else cpus[0]})
    try:
        addresses = [bases[i % len(bases)] + cfg.offset for i in range(cfg.vcpus)]
        irq = irq_target(cfg, target_name)
        if irq is not None:  # --exits and --warmup count interrupts
            measured_iters = cfg.exits if cfg.duration is None and cfg.exits else 0
            warm_iters = cfg.warmup
        else:
            measured_iters = iterations_for(cfg.exits, mix, cfg.posted) if cfg.duration is None and cfg.exits else 0
            warm_iters = iterations_for(cfg.warmup, mix, cfg.posted) if cfg.warmup else 0
        try:
            program = build_program(cfg.arch, mix, cfg.size, addresses, warm_iters, measured_iters,
                                    irq[0] if irq else None)
        except GuestError as exc:
            raise LoadTestError(str(exc)) from None
        m = _Mix(mix, cfg.posted)
        per_vm = measured_iters * (m.sync or len(mix)) * cfg.vcpus
        placement: list[dict[str, object]] = []
        floors: dict[str, Floor] = {}
        with _started(plans, cfg, reporter) as scratch:
            for plan in plans:
                placement.append({"process": plan.index, "vcpu_service": plan.vcpu_address, "vcpu_cpu": plan.vcpu_cpu,
                                  "device_services": plan.device_addresses, "device_cpu": plan.device_cpu,
                                  "pids": {k: v[0] for k, v in plan.pids.items()}})
            if cfg.floors:
                floors = _measure_floors(cfg, plans[0], scratch, mix, m, addresses, local_specs, warm_iters, reporter,
                                         notes, irq)
            scale: list[ScalePoint] = []
            counts = range(1, cfg.processes + 1) if cfg.scale else [cfg.processes]
            run: Measurement | None = None
            for n in counts:
                if cfg.scale:
                    reporter.phase(f"scale: {n} process{'es' if n > 1 else ''}")
                run = _run_processes(plans[:n], cfg, program, m, per_vm * n, reporter, irq)
                if cfg.scale:
                    scale.append(ScalePoint(n, run))
            assert run is not None
        return LoadResult(cfg, machine, run, floors, scale, placement, notes)
    finally:
        os.sched_setaffinity(0, saved_affinity)


def _measure_floors(cfg: LoadConfig, plan: ProcessPlan, scratch: Path, mix: tuple[Access, ...], m: _Mix,
                    addresses: list[int], local_specs: list[str], warm_iters: int, reporter: Reporter,
                    notes: list[str], irq: IrqPlan | None = None) -> dict[str, Floor]:
    """The floors with the first process's placement; one that fails is a note, not the end of the run."""

    out: dict[str, Floor] = {}
    client_cpu, server_cpu = plan.vcpu_cpu, plan.device_cpu
    steps: list[tuple[str, str, Callable[[], Floor]]] = [
        ("socket", f"floor: raw {cfg.transport} socket", lambda: Floor("socket", floors_mod.socket_floor(
            cfg.floor_exits, cfg.transport, client_cpu, server_cpu))),
        ("grpc", "floor: bare gRPC ping-pong", lambda: Floor("grpc", floors_mod.grpc_floor(
            cfg.floor_exits, _echo_address(cfg, scratch), client_cpu, server_cpu))),
    ]
    if local_specs:
        steps.append(("local", "floor: local transport (the same guest in this process)",
                      lambda: _local_floor(cfg, mix, m, addresses, local_specs, warm_iters, reporter, irq)))
    for name, title, fn in steps:
        reporter.phase(title)
        try:
            out[name] = fn()
        except (floors_mod.FloorError, LoadTestError, GuestFailed, VmError, OSError) as exc:
            notes.append(f"the {name} floor could not be measured: {exc}")
    return out


def _run_processes(plans: list[ProcessPlan], cfg: LoadConfig, program: GuestProgram, mix: _Mix,
                   expected: int, reporter: Reporter, irq: IrqPlan | None = None) -> Measurement:
    vms: list[VmHandle] = []
    try:
        for plan in plans:
            assert plan.vcpu_address is not None
            label = f"process {plan.index}" if len(plans) > 1 or cfg.processes > 1 else "run"
            cfg_pb = vm_config(program, cfg.vcpus, plan.device_addresses, cfg.cpu_model,
                               irq_route=irq[1] if irq else None)
            try:
                vms.append(GrpcVm(plan.vcpu_address, cfg_pb, label))
            except VmError as exc:
                raise LoadTestError(str(exc)) from None
        pids = [(name, pid, cpu) for plan in plans for name, (pid, cpu) in plan.pids.items()]
        return measure(vms, program, mix, duration=cfg.duration, expected_exits=expected, timeout=cfg.timeout,
                       reporter=reporter, pids=pids)
    except VmError as exc:
        raise GuestFailed(str(exc)) from None
    finally:
        for vm in vms:
            with contextlib.suppress(Exception):
                vm.delete()


def _local_floor(cfg: LoadConfig, mix: tuple[Access, ...], m: _Mix, addresses: list[int], specs: list[str],
                 warm_iters: int, reporter: Reporter, irq: IrqPlan | None = None) -> Floor:
    """The same guest, with the device models in this process: what the split costs beyond the models."""
    if irq is not None:
        iters = max(1, cfg.floor_exits // len(IRQ_ROUND))
        program = build_program(cfg.arch, mix, cfg.size, addresses, warm_iters, iters, irq[0])
    else:
        iters = iterations_for(cfg.floor_exits, mix, cfg.posted)
        program = build_program(cfg.arch, mix, cfg.size, addresses, warm_iters, iters)
    try:
        vm = LocalVm(vm_config(program, cfg.vcpus, ["local"], cfg.cpu_model, irq_route=irq[1] if irq else None),
                     specs)
    except VmError as exc:
        raise LoadTestError(str(exc)) from None
    try:
        meas = measure([vm], program, m, duration=None, expected_exits=iters * (m.sync or len(mix)) * cfg.vcpus,
                       timeout=cfg.timeout, reporter=reporter)
    except VmError as exc:
        raise GuestFailed(str(exc)) from None
    finally:
        vm.delete()
    return Floor("local", meas.hist, meas.exits_per_s, irq=meas.irq)


def run_compute(vcpu_address: str, program: GuestProgram, timeout: float = 600.0) -> float:
    """Seconds a device-free guest runs in the vcpu service (its own clock, start to power-off)."""
    vm = GrpcVm(vcpu_address, vm_config(program, 1, [], name="compute"), "compute")
    try:
        vm.start()
        deadline = time.monotonic() + timeout
        while (event := vm.final()) is None:
            if time.monotonic() > deadline:
                raise GuestFailed(f"the compute guest did not finish within {timeout:g} s")
            time.sleep(0.01)
        if event.kind != vcpu_pb2.VM_EVENT_KIND_POWERED_OFF:
            raise _failed(vm, event, "")
        return float(vm.stats(counters_only=True).run_seconds)
    finally:
        vm.delete()


def bare_unicorn_seconds(program: GuestProgram, cpu_model: str = "") -> float:
    """Wall time of the same device-free code in a bare Unicorn in this process: RAM mapped, no hooks."""

    arch = arch_by_name(program.arch)
    uc = arch.new_uc(cpu_model or arch.default_cpu)
    uc.mem_map(RAM_BASE, RAM_SIZE)
    uc.mem_write(program.load_address, program.image)
    arch.set_entry(uc, program.entry, 0)
    t = time.perf_counter()
    uc.emu_start(program.entry, program.stop_address)
    return time.perf_counter() - t


#: The guest's side of the interrupt loop and the VM's route of the device's line: (device name, SPI).
IrqPlan = tuple[IrqTarget, tuple[str, int]]


def irq_target(cfg: LoadConfig, device: str) -> IrqPlan | None:
    """With ``--irq``: the interrupt loop against ``device`` (an irq-probe), on QEMU virt's GIC."""
    if not cfg.irq:
        return None
    target = IrqTarget(GICD_BASE, GICC_BASE, IRQ_SPI, irq_probe.FIRE, irq_probe.ACK, irq_probe.DELAY,
                       cfg.irq_delay_us)
    return target, (device, IRQ_SPI)


def default_exits(cfg: LoadConfig) -> None:
    """Neither --exits nor --duration: a fixed number of exits."""
    if cfg.duration is None and cfg.exits is None:
        cfg.exits = DEFAULT_EXITS

