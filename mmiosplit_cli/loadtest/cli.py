"""The ``mmiosplit loadtest`` subcommand: options, their checks, progress, and the outputs.

Exit status: 0 done, 1 the guest failed or did not finish, 2 bad options or unreachable services.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from mmiosplit import security
from mmiosplit.address import address_argument
from mmiosplit_cli.loadtest.compare import CompareError, load, render_compare
from mmiosplit_cli.loadtest.guest import GuestError, parse_mix
from mmiosplit_cli.loadtest.progress import Reporter

# Start-up time: every `mmiosplit` command (each service process too) builds this subcommand's parser, so rich,
# the runner (both services, Unicorn) and the report are imported only when a load test runs, each marked
# "lazy: start-up time". None of them is local to avoid a cycle.

EXIT_GUEST_FAILED = 1
EXIT_USAGE = 2


def _positive_int(name: str, lo: int = 1, hi: int | None = None) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text.replace("_", ""), 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < lo or (hi is not None and value > hi):
            bound = f"{lo} to {hi}" if hi is not None else f"at least {lo}"
            raise argparse.ArgumentTypeError(f"{value} is out of range ({bound})")
        return value

    parse.__name__ = name
    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value:g} must be more than 0")
    return value


def _mix(text: str) -> str:
    try:
        parse_mix(text)
    except GuestError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix(f"--mix {text!r}: ")) from None
    return text


def _address(text: str) -> str:
    return address_argument(text)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``loadtest`` (and ``loadtest compare``) on the main command's subparsers."""
    lt = sub.add_parser(
        "loadtest", help="measure exit latency and throughput under a generated guest, beside its floors",
        description="Run a generated guest (loops of MMIO accesses to a scratch device) through the split and "
        "report exit latency and exits/s beside floors measured in the same run, with the same placement: a "
        "bare gRPC ping-pong, a raw socket ping-pong and the local transport. The first --warmup exits of every "
        "vCPU are discarded exactly (the guest waits at a barrier while the warm-up histogram is taken).",
    )
    g = lt.add_argument_group("guest")
    g.add_argument("--arch", choices=["aarch64", "arm"], default="aarch64")
    g.add_argument("--vcpus", type=_positive_int("vcpus", 1, 64), default=1, help="vCPUs per VM, each runs the loop")
    g.add_argument("--mix", type=_mix, default="1r",
                   help="accesses per loop iteration in order, e.g. 1r, 4w1r (4 writes then 1 read), 2r2w")
    g.add_argument("--size", type=int, choices=[1, 2, 4, 8], default=4, help="access size in bytes")
    g.add_argument("--posted", action="store_true", help="the target posts its writes (scratch posted=on): they "
                   "queue in the vCPU and ride on the next synchronous exit")
    g.add_argument("--device", metavar="SPEC", help="target device for the started device services (default "
                   "scratch@0x0a000000,size=0x1000)")
    g.add_argument("--offset", type=_positive_int("offset", 0), default=0, help="register offset in the device")
    g.add_argument("--target", metavar="NAME", help="with --device-service: the device to load (default: the "
                   "first scratch device)")
    g.add_argument("--cpu", dest="cpu_model", default="", metavar="MODEL", help="CPU model (default: the "
                   "architecture's default)")
    g.add_argument("--irq", action="store_true", help="measure interrupt latency instead of a mix: on QEMU's virt "
                   "board (its GIC), the guest asks an irq-probe device for an interrupt and sleeps in WFI; the "
                   "device raises its line from its own thread, the handler reads GICC_IAR, acknowledges the "
                   "device and writes GICC_EOIR. Reports raised -> handler and raised -> EOI beside the exit round "
                   "trip and the local-transport floor; --exits and --warmup count interrupts")
    g.add_argument("--irq-delay", type=_positive_int("irq_delay", 0, 1_000_000), default=None, metavar="US",
                   help="with --irq: the device raises its line this long after the guest asks (default 500, so "
                   "the vCPU is asleep in WFI; 0: at once, usually while the vCPU still runs)")
    length = lt.add_argument_group("length").add_mutually_exclusive_group()
    length.add_argument("--exits", type=_positive_int("exits", 1, 2**32 - 1),
                        help="measured exits per vCPU (posted writes when the mix makes no synchronous exit), "
                        "rounded up to whole loop iterations; then the guest powers off (default 5000)")
    length.add_argument("--duration", type=_seconds, metavar="SECONDS", help="measure for this long; the guest "
                        "loops forever and the VM is deleted afterwards")
    lt.add_argument("--warmup", type=_positive_int("warmup", 0), default=300,
                    help="exits per vCPU before the measurement, discarded (default 300)")
    lt.add_argument("--timeout", type=_seconds, default=600.0, help="give up on a phase after this long (600)")
    pl = lt.add_argument_group("placement")
    pl.add_argument("--transport", choices=["unix", "tcp"], default="unix")
    pl.add_argument("--vcpu-cpu", type=_positive_int("vcpu_cpu", 0), help="CPU of the vcpu service, and of this "
                    "process (floors' client side, local transport) (default: the first allowed CPU)")
    pl.add_argument("--device-cpu", type=_positive_int("device_cpu", 0),
                    help="CPU of the device services (default: the first allowed CPU)")
    pl.add_argument("--replicas", type=_positive_int("replicas", 1, 64), default=1,
                    help="device services, each with its own copy of the device; vCPU i uses replica i %% N")
    pl.add_argument("--processes", type=_positive_int("processes", 1, 64), default=1,
                    help="scale-out: N vcpu-service processes, one VM each, each with its own device services; "
                    "process i and its devices pinned to CPU i %% ncpu")
    pl.add_argument("--scale", action="store_true", help="with --processes N: run 1..N processes and print the "
                    "scaling curve, efficiency = aggregate / (N x one process)")
    pl.add_argument("--vcpu-service", type=_address, metavar="ADDR", help="use a running vcpu service")
    pl.add_argument("--device-service", type=_address, action="append", metavar="ADDR",
                    help="use running device services (repeatable; vCPU i uses service i %% N)")
    fl = lt.add_argument_group("floors")
    fl.add_argument("--no-floors", action="store_true", help="skip the floors")
    fl.add_argument("--floor-exits", type=_positive_int("floor_exits", 1), default=3000,
                    help="round trips per floor (default 3000)")
    out = lt.add_argument_group("output")
    out.add_argument("--json", metavar="FILE")
    out.add_argument("--csv", metavar="FILE")
    out.add_argument("--hgrm", metavar="FILE", help="HdrHistogram percentile distribution of the run, in us")
    out.add_argument("--plot", metavar="FILE.png", help="latency by percentile of the run and its floors")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    security.add_arguments(lt, serving=False)
    lt.set_defaults(func=cmd_loadtest, _parser=lt)

    subs = lt.add_subparsers(dest="loadtest_command", metavar="{compare}")
    cmp = subs.add_parser("compare", help="two runs' JSON side by side with the change B/A")
    cmp.add_argument("a", metavar="A.json")
    cmp.add_argument("b", metavar="B.json")
    cmp.set_defaults(func=cmd_compare)
    return lt


def _check(args: argparse.Namespace) -> str | None:
    """Cross-option checks argparse cannot express; returns the message naming the option."""
    if args.irq_delay is not None and not args.irq:
        return "argument --irq-delay: only with --irq"
    if args.irq:
        for option, bad in (("--vcpus", args.vcpus != 1), ("--posted", args.posted),
                            ("--replicas", args.replicas != 1), ("--processes", args.processes != 1),
                            ("--scale", args.scale), ("--offset", args.offset != 0)):
            if bad:
                return f"argument {option}: not with --irq (the interrupt loop runs one vCPU against one irq-probe)"
    if args.processes > 1 and (args.vcpu_service or args.device_service):
        return "argument --processes: starts its own services; it cannot be combined with --vcpu-service or " \
               "--device-service"
    if args.processes > 1 and (args.vcpu_cpu is not None or args.device_cpu is not None):
        return "argument --processes: places process i on CPU i % ncpu; drop --vcpu-cpu/--device-cpu"
    if args.scale and args.processes < 2:
        return "argument --scale: needs --processes N with N >= 2"
    if args.device_service and args.device:
        return "argument --device: describes the device for the device services the load tester starts; it " \
               "cannot be combined with --device-service"
    if args.device_service and args.replicas > 1:
        return "argument --replicas: starts device services; with --device-service, give one per replica"
    if args.target and not args.device_service:
        return "argument --target: only with --device-service (otherwise the target is --device)"
    if args.arch == "arm" and args.size == 8:
        return "argument --size: 8 needs --arch aarch64 (A32 has no single-register 64-bit load/store; LDRD/STRD " \
               "carry no syndrome and would be two 4-byte exits)"
    for option in ("json", "csv", "hgrm", "plot"):
        path = getattr(args, option)
        if path is None:
            continue
        parent = Path(path).resolve().parent
        if not parent.is_dir():
            return f"argument --{option}: folder {parent} does not exist"
        if not os.access(parent, os.W_OK):
            return f"argument --{option}: folder {parent} is not writable"
    if args.plot and Path(args.plot).suffix.lower() not in (".png", ".svg", ".pdf"):
        return f"argument --plot: {args.plot!r} should end in .png, .svg or .pdf"
    return None


class _RichReporter(Reporter):
    """A rich progress bar on stderr (only on a terminal), one task per phase."""

    def __init__(self, enabled: bool) -> None:
        from rich.console import Console  # lazy: start-up time
        from rich.progress import (  # lazy: start-up time
            BarColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self.console = Console(stderr=True)
        self.enabled = enabled and self.console.is_terminal
        self.polls = self.enabled
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                                  TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                                  console=self.console, transient=True, refresh_per_second=4,
                                  disable=not self.enabled)
        self._task: Any = None

    def __enter__(self) -> _RichReporter:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def phase(self, text: str) -> None:
        if self._task is not None:
            self._progress.remove_task(self._task)
        self._task = self._progress.add_task(text, total=None, detail="")

    def progress(self, done: float, total: float, detail: str = "") -> None:
        if self._task is not None:
            self._progress.update(self._task, completed=done, total=total or None, detail=detail)


def _out_console() -> Any:
    from rich.console import Console  # lazy: start-up time

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    return console


def cmd_loadtest(args: argparse.Namespace) -> int:
    from mmiosplit_cli.loadtest import report  # lazy: start-up time
    from mmiosplit_cli.loadtest.runner import (  # lazy: start-up time
        DEFAULT_IRQ_DELAY_US,
        GuestFailed,
        LoadConfig,
        LoadTestError,
        default_exits,
        run_loadtest,
    )

    problem = _check(args)
    if problem:
        args._parser.error(problem)
    cfg = LoadConfig(
        arch=args.arch, vcpus=args.vcpus, mix=args.mix, size=args.size, posted=args.posted, device=args.device,
        offset=args.offset, target=args.target, duration=args.duration, exits=args.exits, warmup=args.warmup,
        transport=args.transport, vcpu_cpu=args.vcpu_cpu, device_cpu=args.device_cpu, replicas=args.replicas,
        processes=args.processes, scale=args.scale, floors=not args.no_floors, floor_exits=args.floor_exits,
        vcpu_service=args.vcpu_service, device_services=list(args.device_service or []), cpu_model=args.cpu_model,
        timeout=args.timeout, irq=args.irq,
        irq_delay_us=DEFAULT_IRQ_DELAY_US if args.irq_delay is None else args.irq_delay,
    )
    default_exits(cfg)
    reporter = _RichReporter(not args.no_progress)
    try:
        with reporter:
            result = run_loadtest(cfg, reporter)
    except LoadTestError as exc:
        print(f"mmiosplit loadtest: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except GuestFailed as exc:
        print(f"mmiosplit loadtest: {exc}", file=sys.stderr)
        return EXIT_GUEST_FAILED
    doc = report.to_json(result)
    report.render(result, _out_console(), doc)
    try:
        report.write_outputs(result, args.json, args.csv, args.hgrm, args.plot, doc)
    except OSError as exc:
        print(f"mmiosplit loadtest: cannot write {exc.filename}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    try:
        a, b = load(args.a), load(args.b)
    except CompareError as exc:
        print(f"mmiosplit loadtest compare: {exc}", file=sys.stderr)
        return EXIT_USAGE
    render_compare(a, b, args.a, args.b, _out_console())
    return 0
