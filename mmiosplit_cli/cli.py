"""The ``mmiosplit`` command line: serve each service, check health, run a guest, run the demo."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import termios
import threading
import tty
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from device_service.config import ConfigError, build_bus, load_config, parse_device_specs, parse_size
from mmiosplit import security
from mmiosplit.address import address_argument, parse_address
from mmiosplit.v1 import common_pb2, vcpu_pb2
from mmiosplit.wire import event_kind_name as kind_name
from mmiosplit_cli.conformance.command import add_parser as add_conformance_parser
from mmiosplit_cli.demo import run_demo
from mmiosplit_cli.envconfig import parse_with_environment
from mmiosplit_cli.launcher import LaunchError, check_health, local_services
from mmiosplit_cli.loadtest.cli import add_parser as add_loadtest_parser
from mmiosplit_cli.runner import EXIT_CONFIG_ERROR, ConsoleInput, RunError, format_latency, pump_stdin, run_vm

if TYPE_CHECKING:
    from mmiosplit_cli.recording.proxy import RecordingProxy

# Start-up time: every service process is `python -m mmiosplit_cli serve-vcpu|serve-devices`, and `health` is
# run in loops, so what only some subcommands need (Unicorn and the vCPU core, the device service's server,
# prometheus_client, capstone, libfdt) is imported inside them, each marked "lazy: start-up time". Importing it
# all here would add about 0.2 s to every service start. No import in this package is local to avoid a cycle:
# the import-linter contracts in pyproject.toml keep the graph acyclic.

DEFAULT_DEVICES = ["pl011@0x09000000", "pl031@0x09010000", "scratch@0x0a000000,size=0x1000"]
DEFAULT_RAM = "128M@0x40000000"
LOAD_OFFSET = 0x80000  # images go 512 KiB into the first RAM region, as the arm64 Linux boot protocol does
CTRL_A = 0x01


def _int(text: str) -> int:
    try:
        return int(text.replace("_", ""), 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (use 0x... for hex)") from None


_address = address_argument


def _ram(text: str) -> tuple[int, int]:
    size_text, _, base_text = text.partition("@")
    try:
        size = parse_size(size_text)
        base = _int(base_text) if base_text else 0x4000_0000
    except (ConfigError, argparse.ArgumentTypeError) as exc:
        raise argparse.ArgumentTypeError(
            f"--ram {text!r}: {exc} (expected SIZE[@ADDR], e.g. 128M@0x40000000)"
        ) from None
    return base, size


#: What ``--dma-window`` calls the device service ``mmiosplit run`` starts itself.
EMBEDDED_SERVICE = "embedded"


def _irq_route(text: str) -> tuple[str, str, int]:
    """``DEVICE[.LINE]=SPI`` (LINE a name or an index; SPI 0-based, GIC interrupt 32 + SPI)."""
    target, sep, spi_text = text.partition("=")
    device, _, line = target.partition(".")
    try:
        spi = int(spi_text, 0)
    except ValueError:
        spi = -1
    if not sep or not device or spi < 0:
        raise argparse.ArgumentTypeError(f"--irq {text!r}: expected DEVICE[.LINE]=SPI, e.g. dma0=20 or "
                                         "uart1.uartintr=9 (SPI n is GIC interrupt 32+n)")
    return device, line, spi


def _region_deadline(text: str) -> tuple[str, str, int]:
    """``DEVICE[/REGION]=MS``: the exit deadline of a device's regions (or one of them)."""
    target, sep, ms_text = text.partition("=")
    device, _, region = target.partition("/")
    try:
        ms = int(ms_text, 0)
    except ValueError:
        ms = 0
    if not sep or not device or not 1 <= ms <= 3_600_000:
        raise argparse.ArgumentTypeError(f"--region-deadline {text!r}: expected DEVICE[/REGION]=MS with MS 1 to "
                                         "3600000, e.g. flash0=2000 or uart0/regs=50")
    return device, region, ms


def _dma_window(text: str) -> tuple[str, str, int, int]:
    """``SERVICE=NAME:BASE:SIZE`` (SERVICE: an address given with --device-service, or "embedded")."""
    service, sep, window = text.partition("=")
    parts = window.split(":")
    try:
        if not sep or not service or len(parts) != 3 or not parts[0]:
            raise ValueError
        base = _int(parts[1])
        size = parse_size(parts[2])
    except (ValueError, ConfigError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(
            f"--dma-window {text!r}: expected SERVICE=NAME:BASE:SIZE, e.g. {EMBEDDED_SERVICE}=buffers:0x48000000:1M "
            f"(SERVICE: an address given with --device-service, or {EMBEDDED_SERVICE!r} for the embedded one)"
        ) from None
    return service, parts[0], base, size


def _pin(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def _log_setup(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _ready(name: str) -> object:
    def ready(bound: str) -> None:
        print(f"mmiosplit {name} listening on {bound} ({security.current().describe()})", flush=True)

    return ready


def _port(text: str) -> int:
    """--metrics-port: a TCP port, 0 for any free one (checked here so a typo is an argparse error)."""
    try:
        port = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535; 0 picks a free port)") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is out of range (0-65535; 0 picks a free port)")
    return port


def _start_metrics(command: str, service: str, collector: object, args: argparse.Namespace) -> bool:
    """Serve collector on --metrics-host/--metrics-port; False (after saying why) when it cannot."""
    from mmiosplit_cli.metrics import MetricsError, serve_metrics  # lazy: start-up time (prometheus_client)

    try:
        server = serve_metrics(collector, args.metrics_host, args.metrics_port)  # type: ignore[arg-type]
    except MetricsError as exc:
        print(f"mmiosplit {command}: {exc}", file=sys.stderr)
        return False
    print(f"mmiosplit {service} metrics on {server.url}", flush=True)
    return True


def _may_listen(command: str, listen: str) -> bool:
    """False (after saying why) when --listen needs protection the credentials do not give (``--insecure``)."""
    try:
        security.check_listen(parse_address(listen), security.current())
    except security.SecurityError as exc:
        print(f"mmiosplit {command}: {exc}", file=sys.stderr)
        return False
    return True


# ----- subcommands ---------------------------------------------------------------------------------------
def cmd_serve_vcpu(args: argparse.Namespace) -> int:
    from vcpu_service.server import serve  # lazy: start-up time (Unicorn, the vCPU core)

    if not _may_listen("serve-vcpu", args.listen):
        return 2
    _pin(args.cpu_affinity)
    _log_setup(args.verbose)
    on_servicer = None
    if args.metrics_port is not None:
        from vcpu_service.metrics import VcpuCollector  # lazy: start-up time (prometheus_client)

        collector = VcpuCollector()
        if not _start_metrics("serve-vcpu", "vcpu service", collector, args):
            return 2
        on_servicer = collector.attach
    serve(args.listen, ram_cap=args.max_ram, ready=_ready("vcpu service"),  # type: ignore[arg-type]
          on_servicer=on_servicer, grace_s=args.grace_s, vm_lease_s=args.vm_lease_s)
    return 0


def cmd_serve_devices(args: argparse.Namespace) -> int:
    from device_service.server import serve  # lazy: start-up time (the device service's asyncio server)

    if not _may_listen("serve-devices", args.listen):
        return 2
    _pin(args.cpu_affinity)
    _log_setup(args.verbose)
    try:
        specs = parse_device_specs(args.device or [])
        for path in args.config or []:
            specs += load_config(path)
        if not specs:
            raise ConfigError("no devices: give --device TYPE@ADDR[,key=value...] or --config FILE")
        bus = build_bus(specs)
    except ConfigError as exc:
        print(f"mmiosplit serve-devices: {exc}", file=sys.stderr)
        return 2
    on_servicer = None
    if args.metrics_port is not None:
        from device_service.metrics import DeviceCollector  # lazy: start-up time (prometheus_client)

        collector = DeviceCollector(bus)
        if not _start_metrics("serve-devices", "device service", collector, args):
            return 2
        bus.stats.enable_timing()
        on_servicer = collector.attach
    serve(args.listen, bus, args.name, ready=_ready("device service"),  # type: ignore[arg-type]
          console_log=args.console_log, on_servicer=on_servicer, shadows=not args.no_shadows, grace_s=args.grace_s)
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    status = check_health(args.address, timeout=args.timeout, service=args.service)
    print(status)
    return 0 if status == "SERVING" else 1


def _read_image(path: str) -> bytes:
    data = Path(path).read_bytes()
    if data[:4] == b"\x7fELF":
        raise ValueError(f"{path} is an ELF file; give a flat binary (objcopy -O binary) and --load/--entry")
    return data


def build_config(args: argparse.Namespace, image: bytes, image_name: str, device_services: list[str],
                 embedded: str | None = None) -> object:
    ram = args.ram or [_ram(DEFAULT_RAM)]
    load = args.load if args.load is not None else ram[0][0] + LOAD_OFFSET
    entry = args.entry if args.entry is not None else load
    images = [vcpu_pb2.Image(name=image_name, data=image, load_address=load)]
    if args.machine == "virt":
        # The firmware is in flash (the device service holds it); the device tree goes at the start of RAM.
        entry = args.entry if args.entry is not None else 0
        images = [vcpu_pb2.Image(name=args.dtb, data=Path(args.dtb).read_bytes(), load_address=ram[0][0])] \
            if args.dtb else []
    cfg = vcpu_pb2.VmConfig(
        name=image_name,
        architecture=common_pb2.ARCHITECTURE_AARCH64 if args.arch == "aarch64" else common_pb2.ARCHITECTURE_ARM,
        cpu_model=args.cpu or "",
        vcpu_count=args.vcpus,
        ram=[vcpu_pb2.MemoryRegion(base=b, size=s) for b, s in ram],
        device_services=device_services,
        images=images,
        entry_point=entry,
        machine=args.machine or "",
        limits=vcpu_pb2.RunLimits(instruction_budget=args.budget or 0, wall_clock_seconds=args.timeout or 0.0),
        exit_deadline_ms=args.deadline_ms or 0,
    )
    unmapped = {"raz-wi": vcpu_pb2.UNMAPPED_ACCESS_POLICY_RAZ_WI, "abort": vcpu_pb2.UNMAPPED_ACCESS_POLICY_ABORT,
                "stop": vcpu_pb2.UNMAPPED_ACCESS_POLICY_STOP}
    fault = {"abort": vcpu_pb2.FAULT_POLICY_ABORT, "stop": vcpu_pb2.FAULT_POLICY_STOP}
    cfg.policies.unmapped_access = unmapped[args.unmapped]
    cfg.policies.nisv = fault[args.on_nisv]
    cfg.policies.device_error = fault[args.on_device_error]
    cfg.policies.deadline = fault[args.on_deadline]
    if args.on_device_restart == "continue":  # fail is the default (UNSPECIFIED)
        cfg.policies.device_restart = vcpu_pb2.DEVICE_RESTART_POLICY_CONTINUE
    cfg.strict_kvm = args.strict_kvm
    cfg.trace_exits = _tracing(args)
    for device, line, spi in getattr(args, "irq", None) or []:
        cfg.irq_routes.add(device=device, line=line, spi=spi)
    for device, region, ms in getattr(args, "region_deadline", None) or []:
        cfg.region_deadlines.add(device=device, region=region, deadline_ms=ms)
    for service, name, base, size in getattr(args, "dma_window", None) or []:
        if service == EMBEDDED_SERVICE:
            if embedded is None:
                raise ValueError(f"--dma-window {service}={name}:...: no embedded device service is started "
                                 "(--device-service was given); name one of those addresses")
            service = embedded
        elif service not in device_services:
            known = [s for s in device_services if s != embedded] + ([EMBEDDED_SERVICE] if embedded else [])
            raise ValueError(f"--dma-window {service}={name}:...: {service!r} is not a device service of this run "
                             f"(known: {', '.join(known) or 'none'})")
        cfg.dma_grants.add(device_service=service, name=name, base=base, size=size)
    return cfg


def _tracing(args: argparse.Namespace) -> bool:
    return bool(args.trace_exits or args.trace_file or args.trace_json)


class _Terminal:
    """Raw mode on a terminal with QEMU's escape: Ctrl-A X quits, Ctrl-A Ctrl-A sends Ctrl-A."""

    def __init__(self, fd: int, inp: object, quit_event: threading.Event) -> None:
        self.fd = fd
        self._saved = termios.tcgetattr(fd)
        tty.setraw(fd)
        self._inp = inp
        self._quit = quit_event
        threading.Thread(target=self._pump, name="tty", daemon=True).start()

    def _pump(self) -> None:
        escape = False
        while not self._quit.is_set():
            try:
                data = os.read(self.fd, 1024)
            except OSError:
                return
            if not data:
                return
            out = bytearray()
            for b in data:
                if escape:
                    escape = False
                    if b in (ord("x"), ord("X")):
                        self._quit.set()
                        return
                    out.append(b)
                elif b == CTRL_A:
                    escape = True
                else:
                    out.append(b)
            if out:
                self._inp.feed(bytes(out))  # type: ignore[attr-defined]

    def restore(self) -> None:
        termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)


def _open_outputs(args: argparse.Namespace, stack: contextlib.ExitStack) -> dict[str, TextIO]:
    """Open every output file up front, so a bad path fails before the guest runs, not after."""
    files: dict[str, TextIO] = {}
    for key in ("trace_file", "trace_json", "kvm_report_json"):
        path = getattr(args, key)
        if path:
            files[key] = stack.enter_context(open(path, "w", encoding="utf-8"))  # noqa: SIM115 (the stack closes it)
    return files


def _print_kvm_report(stats: vcpu_pb2.GetStatsResponse, files: dict[str, TextIO], show: bool) -> None:
    """The KVM compatibility report from the final statistics: a table on stderr and/or JSON in a file."""
    from mmiosplit_cli.trace import format_kvm_report, kvm_report_to_json  # lazy: start-up time (capstone)

    entries = list(stats.kvm_report)
    if show:
        if stats.vcpus:
            print(format_kvm_report(entries), file=sys.stderr, flush=True)
        else:
            print("KVM report: not available (the vcpu service returned no statistics)", file=sys.stderr, flush=True)
    if "kvm_report_json" in files:
        json.dump(kvm_report_to_json(entries), files["kvm_report_json"], indent=2)
        files["kvm_report_json"].write("\n")


def cmd_run(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as stack:
        try:
            files = _open_outputs(args, stack)
        except OSError as exc:
            print(f"mmiosplit run: {exc}", file=sys.stderr)
            return 2
        return _run(args, files)


def _run(args: argparse.Namespace, files: dict[str, TextIO]) -> int:
    from mmiosplit_cli.trace import TracePrinter  # lazy: start-up time (capstone)

    if args.image is None and not (args.machine == "virt" and args.device_service):
        print("mmiosplit run: give an IMAGE (only --machine virt with --device-service, whose device service holds "
              "the firmware in its flash, needs none)", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    try:
        image = _read_image(args.image) if args.image is not None else b""
    except (OSError, ValueError) as exc:
        print(f"mmiosplit run: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if (args.drive_readonly or args.drive_modern) and not args.drive:
        print("mmiosplit run: --drive-readonly and --drive-modern describe a --drive", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.drive and (args.machine != "virt" or args.device_service or "," in args.drive):
        print("mmiosplit run: --drive needs --machine virt and the embedded device service, and a file name "
              "without commas", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    device_args = None
    if not args.device_service:
        device_args = []
        if args.machine == "virt":
            from vcpu_service.machines.virt import device_specs  # lazy: start-up time (libfdt)

            # The image is flash bank 0, like QEMU's -bios; flash bank 1 is --flash1 (U-Boot keeps its env there).
            defaults = device_specs(args.arch, flash0=str(Path(args.image).resolve()),
                                    flash1=str(Path(args.flash1).resolve()) if args.flash1 else None,
                                    persist=args.persist_flash, write_buffer=args.flash_write_buffer,
                                    drive=str(Path(args.drive).resolve()) if args.drive else None,
                                    drive_readonly=args.drive_readonly, drive_modern=args.drive_modern)
            defaults += args.device or []
        else:
            defaults = args.device or ([] if args.config else DEFAULT_DEVICES)
        for spec in defaults:
            device_args += ["--device", spec]
        for path in args.config or []:
            device_args += ["--config", path]
        if args.no_shadows:
            device_args.append("--no-shadows")
    elif args.device or args.config or args.no_shadows:
        print("mmiosplit run: --device/--config/--no-shadows describe devices for an embedded device service; they "
              "cannot be combined with --device-service", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.metrics_port and device_args is not None and args.metrics_port + 1 > 65535:
        print(f"mmiosplit run: --metrics-port {args.metrics_port}: the device service would get port "
              f"{args.metrics_port + 1}, out of range; use a lower port (or 0 for free ones)", file=sys.stderr)
        return EXIT_CONFIG_ERROR

    def say(msg: str) -> None:
        if not args.quiet:
            sys.stderr.write(f"\r\nmmiosplit: {msg}\r\n" if is_tty else f"mmiosplit: {msg}\n")
            sys.stderr.flush()

    is_tty = sys.stdin.isatty()
    printer: TracePrinter | None = None
    if _tracing(args):
        human = files.get("trace_file", sys.stderr) if args.trace_exits or args.trace_file else None
        # A terminal in raw mode needs CR LF; a file or pipe gets plain lines.
        printer = TracePrinter(human, files.get("trace_json"), "\r\n" if is_tty and human is sys.stderr else "\n")
    quit_event = threading.Event()
    inp = ConsoleInput()
    terminal: _Terminal | None = None
    stack = contextlib.ExitStack()
    try:
        with local_services(device_args, start_vcpu=args.vcpu_service is None, metrics_port=args.metrics_port,
                            metrics_host=args.metrics_host) as (vaddr, daddr, svc), stack:
            if args.metrics_port is not None:
                urls = svc.metrics_urls()
                say("metrics: " + (", ".join(f"{name} {url}" for name, url in urls.items()) or "none (no service "
                                   "started here)"))
            services = list(args.device_service or []) + ([daddr] if daddr else [])
            vcpu_addr = args.vcpu_service or vaddr
            assert vcpu_addr is not None
            try:
                cfg = build_config(args, image, Path(args.image).name if args.image else "virt", services, daddr)
            except ValueError as exc:
                print(f"mmiosplit run: {exc}", file=sys.stderr)
                return EXIT_CONFIG_ERROR
            if args.record:
                proxy = _start_recording(args, services, vcpu_addr, stack)
                if proxy is None:
                    return EXIT_CONFIG_ERROR
                _route_through(cfg, proxy.addresses)  # type: ignore[arg-type]
            if is_tty:
                terminal = _Terminal(sys.stdin.fileno(), inp, quit_event)
            else:
                pump_stdin(inp)

            def out(data: bytes) -> None:
                sys.stdout.buffer.write(data)
                sys.stdout.buffer.flush()

            def on_event(ev: object) -> None:
                if args.events:
                    say(f"[{ev.time:8.3f}] {kind_name(ev.kind)}: {ev.reason}")  # type: ignore[attr-defined]

            try:
                result = run_vm(vcpu_addr, cfg, console_device=args.console, console_out=out, console_in=inp,  # type: ignore[arg-type]
                                on_event=on_event, on_trace=printer, stop_request=quit_event)
            except RunError as exc:
                say(f"cannot run {args.image or 'the virt board'}: {exc}")
                return EXIT_CONFIG_ERROR
    except LaunchError as exc:
        say(str(exc))
        return EXIT_CONFIG_ERROR
    finally:
        if terminal is not None:
            terminal.restore()
    if printer is not None:
        printer.flush()
        if result.trace_error:
            say(f"the exit trace is incomplete: {result.trace_error}")
        elif not (args.trace_exits or args.trace_file):
            say(f"{result.traced} exits traced to {args.trace_json}")
    say(f"{kind_name(result.final.kind).replace('_', ' ')}: {result.final.reason}; {format_latency(result.stats)}")
    _print_kvm_report(result.stats, files, args.kvm_report)
    return result.exit_status


def _start_recording(args: argparse.Namespace, services: list[str], vcpu_addr: str,
                     stack: contextlib.ExitStack) -> RecordingProxy | None:
    """The recording proxy in front of every device service (closed, and the file finished, by ``stack``); None
    after saying why it cannot start."""
    from mmiosplit_cli.recording.proxy import ProxyError, RecordingProxy  # lazy: start-up time

    listen = args.record_listen
    if listen is None and not parse_address(vcpu_addr).is_unix and args.vcpu_service:
        print("mmiosplit run: --record with a vcpu service reached over TCP needs --record-listen HOST[:PORT], an "
              "address of this machine that vcpu service can reach (the proxy listens there)", file=sys.stderr)
        return None
    try:
        proxy = RecordingProxy(args.record, services, listen)
    except (ProxyError, OSError) as exc:
        print(f"mmiosplit run: {exc}", file=sys.stderr)
        return None
    stack.callback(_finish_recording, proxy, args)
    return proxy


def _finish_recording(proxy: RecordingProxy, args: argparse.Namespace) -> None:
    proxy.close()
    if not args.quiet:
        recorder = proxy.recorder
        text = f"mmiosplit: recorded {recorder.records} records ({recorder.size} bytes) to {args.record}"
        # A terminal in raw mode needs CR LF, and the guest's last line may have no end.
        sys.stderr.write(f"\r\n{text}\r\n" if sys.stdin.isatty() else f"{text}\n")
        sys.stderr.flush()


def _route_through(cfg: vcpu_pb2.VmConfig, addresses: dict[str, str]) -> None:
    """Give the vcpu service the proxies' addresses in place of the device services' (and in the DMA grants)."""
    services = [addresses.get(s, s) for s in cfg.device_services]
    del cfg.device_services[:]
    cfg.device_services.extend(services)
    for grant in cfg.dma_grants:
        grant.device_service = addresses.get(grant.device_service, grant.device_service)


def _volatile(text: str) -> tuple[str, int]:
    """``DEVICE_OR_TYPE:OFFSET`` for ``replay --volatile``."""
    name, sep, offset = text.rpartition(":")
    try:
        value = int(offset, 0)
    except ValueError:
        value = -1
    if not sep or not name or value < 0:
        raise argparse.ArgumentTypeError(f"--volatile {text!r}: expected DEVICE_OR_TYPE:OFFSET, e.g. pl031:0x0 or "
                                         "rtc0:0x0")
    return name, value


def cmd_replay(args: argparse.Namespace) -> int:
    from mmiosplit_cli.recording.format import RecordingError, read_recording  # lazy: start-up time
    from mmiosplit_cli.recording.replay import Replayer, ReplayError, resolve_targets

    if sum(map(bool, (args.device_service, args.serve, args.list))) != 1:
        print("mmiosplit replay: give --device-service ADDR (drive a live device service and compare), --serve "
              "ADDR (stand in for the recorded one) or --list (print the recording), one of the three",
              file=sys.stderr)
        return EXIT_CONFIG_ERROR
    try:
        recording = read_recording(args.file, partial=args.list)
    except RecordingError as exc:
        print(f"mmiosplit replay: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.list:
        from mmiosplit_cli.recording.listing import list_recording  # lazy: start-up time

        with contextlib.suppress(BrokenPipeError):  # `| head`
            for line in list_recording(recording):
                print(line)
        if recording.error:  # a recording cut short (its recorder died): listed up to the damage
            print(f"mmiosplit replay: {recording.error}", file=sys.stderr)
            return 1
        return 0
    if args.serve:
        from mmiosplit_cli.recording.double import serve_double  # lazy: start-up time

        try:
            return serve_double(recording, args.serve, ready=_ready("device double"),  # type: ignore[arg-type]
                                grace_s=args.grace_s)
        except (ReplayError, OSError, security.SecurityError) as exc:
            print(f"mmiosplit replay: {exc}", file=sys.stderr)
            return EXIT_CONFIG_ERROR
    try:
        targets = resolve_targets(recording, args.device_service)
        replayer = Replayer(recording, targets, timeout_s=args.timeout, volatile=set(args.volatile or ()))
    except ReplayError as exc:
        print(f"mmiosplit replay: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    result = replayer.run()
    for note in result.notes:
        print(f"mmiosplit replay: note: {note}", file=sys.stderr, flush=True)
    if result.divergence is not None:
        print(result.divergence.report(args.file), flush=True)
        print(f"mmiosplit replay: 1 divergence after {result.exchanges} matching exchanges "
              f"({result.seconds:.2f} s)", file=sys.stderr, flush=True)
        return 1
    skipped = f"; {result.volatile_reads} clock-dependent reads' data not compared" if result.volatile_reads else ""
    print(f"0 divergences, {result.exchanges} exchanges ({len(recording.records)} records, "
          f"{result.seconds:.2f} s{skipped})", flush=True)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(vcpus=args.vcpus, cpu=None if args.no_pin else args.pin_cpu, transport=args.transport)


# ----- parser -----------------------------------------------------------------------------------------------
def _metrics_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics-port", type=_port, metavar="PORT",
                   help="serve Prometheus metrics over HTTP on this port, at /metrics (0: pick a free port and "
                   "print it); off by default")
    p.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                   help="address the metrics endpoint listens on (default 127.0.0.1)")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{value:g} s is out of range (0-3600)")
    return value


def _grace_arg(p: argparse.ArgumentParser, drain: str) -> None:
    p.add_argument("--grace-s", type=_seconds, default=10.0, metavar="SECONDS",
                   help=f"on SIGTERM or SIGINT: report NOT_SERVING, take no new streams, {drain}, then exit 0 "
                   "within this many seconds (default 10)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmiosplit", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    sv = sub.add_parser("serve-vcpu", help="run the vcpu service (guest RAM, vCPUs, the exit path)")
    sv.add_argument("--listen", required=True, type=_address, help="unix:PATH or HOST:PORT")
    sv.add_argument("--max-ram", type=lambda t: _ram(t + "@0")[1], default=8 * 2**30,
                    help="cap on the RAM of one VM (default 8G)")
    sv.add_argument("--cpu-affinity", type=int, help="pin the service to this CPU")
    _grace_arg(sv, "pause every VM at an instruction boundary, flush its posted writes and send its final events")
    sv.add_argument("--vm-lease-s", type=_seconds, default=10.0, metavar="S",
                    help="delete a VM after S seconds with no event stream open on it and no RPC naming it: its "
                    "client is gone (default 10; 0: never)")
    _metrics_args(sv)
    security.add_arguments(sv, serving=True)
    sv.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    sv.set_defaults(func=cmd_serve_vcpu)

    sd = sub.add_parser("serve-devices", help="run a device service hosting device models")
    sd.add_argument("--listen", required=True, type=_address, help="unix:PATH or HOST:PORT")
    sd.add_argument("--device", action="append", metavar="SPEC",
                    help="TYPE@ADDR[,key=value...], e.g. pl011@0x09000000 or scratch@0x0a000000,size=0x1000")
    sd.add_argument("--config", action="append", metavar="FILE", help="TOML file with [[device]] tables")
    sd.add_argument("--name", default="mmiosplit-devices", help="service name reported to vcpu services")
    sd.add_argument("--console-log", metavar="FILE", help="append every byte UARTs transmit to FILE")
    sd.add_argument("--no-shadows", action="store_true",
                    help="declare no shadow registers: every device read exits (for comparisons)")
    sd.add_argument("--cpu-affinity", type=int, help="pin the service to this CPU")
    _grace_arg(sd, "complete every exit and posted batch already received and tell each vCPU it is going away")
    _metrics_args(sd)
    security.add_arguments(sd, serving=True)
    sd.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    sd.set_defaults(func=cmd_serve_devices)

    h = sub.add_parser("health", help="exit 0 when the service at ADDR reports SERVING")
    h.add_argument("address", type=_address)
    h.add_argument("--service", default="", help="service name to check (default: the whole server)")
    h.add_argument("--timeout", type=float, default=3.0)
    security.add_arguments(h, serving=False)
    h.set_defaults(func=cmd_health)

    r = sub.add_parser("run", help="run a guest image with its console on this terminal (or stdin/stdout)")
    r.add_argument("image", nargs="?", help="flat binary image (with --machine virt: flash bank 0 for the device "
                   "service run starts; not needed when --device-service serves the board)")
    r.add_argument("--arch", choices=["aarch64", "arm"], default="aarch64")
    r.add_argument("--machine", choices=["virt"],
                   help="virt: QEMU's virt board; IMAGE is flash bank 0 (like qemu -bios), the device tree is "
                        "generated at the start of RAM, the CPU starts at 0")
    r.add_argument("--flash1", metavar="FILE", help="with --machine virt: contents of flash bank 1 (U-Boot's env)")
    r.add_argument("--persist-flash", action="store_true",
                   help="with --machine virt: write flash programs and erases back to --flash1's file")
    r.add_argument("--flash-write-buffer", choices=["staged", "direct"], default="",
                   help="with --machine virt: how buffered flash programs behave: 'staged' as Debian's QEMU 7.2 "
                        "(the default; U-Boot's saveenv fails there), 'direct' as upstream QEMU 7.2.0 (saveenv works)")
    r.add_argument("--drive", metavar="FILE",
                   help="with --machine virt: a raw disk image as a virtio-blk disk in the last virtio-mmio slot "
                        "(0x0a003e00, where QEMU puts its first -device virtio-blk-device)")
    r.add_argument("--drive-readonly", action="store_true", help="with --drive: the guest cannot write the image")
    r.add_argument("--drive-modern", action="store_true",
                   help="with --drive: virtio-mmio Version 2 (QEMU's -global virtio-mmio.force-legacy=false) "
                        "instead of virt's legacy Version 1")
    r.add_argument("--dtb", metavar="FILE", help="with --machine virt: use this device tree instead of generating one")
    r.add_argument("--cpu", help="CPU model (cortex-a57, cortex-a53, cortex-a72, max; cortex-a15, cortex-a7)")
    r.add_argument("--load", type=_int, help="load address (default: first RAM region + 0x80000)")
    r.add_argument("--entry", type=_int, help="entry point (default: the load address; on arm bit 0 = Thumb)")
    r.add_argument("--ram", type=_ram, action="append", help=f"SIZE[@ADDR], repeatable (default {DEFAULT_RAM})")
    r.add_argument("--vcpus", type=int, default=1)
    r.add_argument("--device", action="append", metavar="SPEC",
                   help=f"device for the embedded device service (default: {' '.join(DEFAULT_DEVICES)})")
    r.add_argument("--config", action="append", metavar="FILE", help="TOML device file for the embedded service")
    r.add_argument("--device-service", action="append", type=_address, metavar="ADDR",
                   help="use a running device service instead of starting one (repeatable)")
    r.add_argument("--vcpu-service", type=_address, metavar="ADDR", help="use a running vcpu service")
    r.add_argument("--console", metavar="DEVICE", help="UART to attach (default: the first one)")
    r.add_argument("--irq", type=_irq_route, action="append", metavar="DEVICE[.LINE]=SPI",
                   help="wire a device's interrupt line (name or index; default line 0) to GIC SPI n (interrupt "
                        "32+n), with --machine virt; repeatable. The board's own devices are wired as QEMU wires them")
    r.add_argument("--region-deadline", type=_region_deadline, action="append", metavar="DEVICE[/REGION]=MS",
                   help="how long an access to the device's regions (or one region) may take before the vCPU "
                        "cancels it, over --deadline-ms and what the device declares; repeatable. The device is told "
                        "each access's deadline; one it had not started when cancelled is never performed")
    r.add_argument("--dma-window", type=_dma_window, action="append", metavar="SERVICE=NAME:BASE:SIZE",
                   help=f"let the devices of SERVICE (an address given with --device-service, or "
                        f"{EMBEDDED_SERVICE!r}) read and write guest RAM in BASE..BASE+SIZE by DMA; repeatable. With "
                        "--machine virt the board's service gets all RAM unless given windows here")
    r.add_argument("--budget", type=_int, help="stop after this many instructions per vCPU (exit status 4)")
    r.add_argument("--timeout", type=float, help="stop after this many seconds (exit status 5)")
    r.add_argument("--deadline-ms", type=int, help="how long a vCPU waits for a device (default 5000)")
    r.add_argument("--events", action="store_true", help="print VM events on stderr")
    r.add_argument("-q", "--quiet", action="store_true", help="no summary line on stderr")
    r.add_argument("--no-shadows", action="store_true",
                   help="the embedded device service declares no shadow registers: every device read exits")
    r.add_argument("--metrics-port", type=_port, metavar="PORT",
                   help="serve Prometheus metrics from the services run starts itself: the vcpu service on PORT, "
                   "the device service on PORT+1 (0: each picks a free port; the URLs are printed on stderr)")
    r.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                   help="address the metrics endpoints listen on (default 127.0.0.1)")
    pol = r.add_argument_group(
        "policies", "what happens when an access cannot be completed normally: 'abort' injects a synchronous "
        "external abort at the instruction (the guest sees it, as on hardware), 'stop' ends the run with an "
        "error naming the PC and instruction (exit status 1)")
    pol.add_argument("--unmapped", choices=["raz-wi", "abort", "stop"], default="raz-wi",
                     help="access to an address no device or RAM owns: read as zero/ignore writes (default, as "
                     "QEMU+KVM), abort, or stop")
    pol.add_argument("--on-nisv", choices=["abort", "stop"], default="abort",
                     help="a device access by an instruction with no usable syndrome that mmiosplit does not "
                     "emulate (ISV=0: atomics, LD1/ST1; with --strict-kvm also writeback forms, pairs, duals, "
                     "multiples, exclusives, SIMD&FP and loads to PC) (default abort)")
    pol.add_argument("--on-device-error", choices=["abort", "stop"], default="abort",
                     help="a device refuses an access or cannot be reached (default abort)")
    pol.add_argument("--on-deadline", choices=["abort", "stop"], default="abort",
                     help="no completion within --deadline-ms (default abort)")
    pol.add_argument("--on-device-restart", choices=["fail", "continue"], default="fail",
                     help="a device service restarted (its state is gone): end the run naming the device and the "
                     "access in flight (default), or say so in an event, re-read its mirrors and shadow registers "
                     "and go on with the new instance, sending it the access in flight")
    pol.add_argument("--strict-kvm", action="store_true",
                     help="refuse the instructions with no syndrome (ISV=0) that mmiosplit emulates (writeback "
                     "forms, pairs, duals, multiples, exclusives, SIMD&FP, loads to PC), as upstream KVM/ARM does; "
                     "--on-nisv then applies to them")
    rec = r.add_argument_group(
        "recording", "record every exchange with each device service, for `mmiosplit replay` (docs/recording.md)")
    rec.add_argument("--record", metavar="FILE",
                     help="write every message exchanged with each device service to FILE, through a recording proxy "
                     "this command starts between the vcpu service and the device services")
    rec.add_argument("--record-listen", metavar="HOST[:PORT]",
                     help="where the recording proxy listens, for a vcpu service on another machine or in a "
                     "container: an address of this machine it can reach (PORT, PORT+1... per device service; none "
                     "or 0: free ports). Default: UNIX sockets, for a vcpu service on this machine")
    tr = r.add_argument_group(
        "exit trace and KVM report", "stdout carries the guest console, so the human-readable trace and the "
        "report go to stderr (or to the files named below)")
    tr.add_argument("--trace-exits", action="store_true",
                    help="print every exit as it completes, on stderr: PC, ISA, instruction and its disassembly, "
                    "direction, size, address, device, value, register, sign, writeback, latency")
    tr.add_argument("--trace-file", metavar="FILE", help="write that trace to FILE instead of stderr (implies "
                    "--trace-exits)")
    tr.add_argument("--trace-json", metavar="FILE",
                    help="write every exit as one JSON object per line to FILE: every ExitTrace field plus "
                    "instruction_hex, disasm and register (traces the run even without --trace-exits)")
    tr.add_argument("--kvm-report", action="store_true",
                    help="at the end, print on stderr each PC whose device accesses upstream KVM/ARM could not "
                    "handle (ISV=0), with the instruction, count, reason and whether mmiosplit decoded it or "
                    "refused it")
    tr.add_argument("--kvm-report-json", metavar="FILE", help="write that report to FILE as a JSON array")
    security.add_arguments(r, serving=False)
    r.set_defaults(func=cmd_run)

    rp = sub.add_parser("replay", help="replay a recording (run --record) against a device service, or serve it "
                        "as a stand-in device service")
    rp.add_argument("file", metavar="FILE", help="a recording written by `mmiosplit run --record`")
    rp.add_argument("--device-service", action="append", metavar="[NAME=]ADDR",
                    help="drive the device service at ADDR with the recorded requests and compare every answer; "
                    "NAME=ADDR per service when the recording has several (NAME: the recorded address, the "
                    "service's name, or its index); exit status 1 at the first divergence")
    rp.add_argument("--serve", action="append", metavar="[NAME=]ADDR",
                    help="serve the recording at ADDR as a stand-in device service (a device double) until SIGTERM or "
                    "SIGINT: recorded answers to matching requests, a device error naming both requests when the "
                    "guest diverges (exit status 1); NAME=ADDR per service as for --device-service")
    rp.add_argument("--list", action="store_true",
                    help="print the recording, one line per record (index, time, call, direction, message); a "
                    "damaged one up to the damage, then the error (exit status 1)")
    rp.add_argument("--timeout", type=float, default=10.0, metavar="S",
                    help="how long to wait for each live answer (default 10)")
    rp.add_argument("--volatile", type=_volatile, action="append", metavar="DEVICE_OR_TYPE:OFFSET",
                    help="also ignore the data of reads of this register (a clock, a random number); pl031:0x0 "
                    "(the RTC's counter) always is")
    _grace_arg(rp, "with --serve, end every stream")
    security.add_arguments(rp, serving=True)
    rp.set_defaults(func=cmd_replay)

    d = sub.add_parser("demo", help="run the three bundled guests (A64, A32, T32) through the split")
    d.add_argument("--vcpus", type=int, default=2)
    d.add_argument("--pin-cpu", type=int, default=0, help="CPU both services are pinned to (default 0)")
    d.add_argument("--no-pin", action="store_true", help="do not pin the services")
    d.add_argument("--transport", choices=["unix", "tcp"], default="unix")
    security.add_arguments(d, serving=False)
    d.set_defaults(func=cmd_demo)

    add_loadtest_parser(sub)
    add_conformance_parser(sub, _address)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_with_environment(build_parser(), None if argv is None else list(argv), os.environ)
    if hasattr(args, "tls_cert"):  # a command that serves or connects: its credentials, read once, now
        try:
            security.configure(security.from_arguments(args, os.environ))
        except security.SecurityError as exc:
            print(f"mmiosplit {args.command}: {exc}", file=sys.stderr)
            return 2
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
