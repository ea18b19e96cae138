"""The device host: what a device service does for the vCPUs that reach it, whichever way they do.

QEMU's side of ``KVM_EXIT_MMIO``, once: a ``DeviceHost`` owns the bus of plain device models, their
consoles, the mode and changes of every ROMD mirror, the shadow registers and their generations, the
models' interrupt lines (``device_service.lines``) and DMA handles, the description a vCPU service maps
regions and lines from, and reset. A ``HostSession`` is one vCPU's exit stream: it answers exits, posted
batches and flushes with ``mmiosplit.mmio.Completion``s that carry everything the vCPU must apply before it
runs on (failed posted writes, mirror changes, shadow values it was not sent, the interrupt levels the
request changed). What changes without a request (shadow values, line levels) goes to the watchers.

Two thin adapters wrap it: the gRPC servicer (``device_service.server``, protobuf in and out, all on one
asyncio loop) and the in-process transport (``device_service.local``, called from several vCPU threads).
The host's lock (re-entrant, so a transport may take it first to find out whether it is free) serialises
them, so a device model never sees two accesses at once and needs no lock of its own for them. Lock order:
the host's, then the shadow tracker's, then a model's, then the line tracker's.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from device_service.bus import DeviceBus
from device_service.dispatch import dispatch, dispatch_posted
from device_service.lines import HostDma, LineTracker
from device_service.model import (
    ConsoleDevice,
    DeviceModel,
    LineSpec,
    NoDma,
    RegionKind,
    RomdDevice,
    supports_console,
    supports_romd,
)
from device_service.shadows import ShadowEvent, ShadowFailure, ShadowTracker, ShadowValues
from mmiosplit.mmio import (
    Completion,
    CompletionStatus,
    DmaTarget,
    GoingAway,
    LineChange,
    MirrorChange,
    MmioExit,
    PostedError,
    RemoteRegion,
    ShadowChange,
)

#: Console output kept while nobody listens, for the first listener.
CONSOLE_BACKLOG = 1 << 20
#: ROMD mirrors are read in chunks of this size; all-zero chunks after the first are not sent.
MIRROR_CHUNK = 1 << 20

#: Where a console's output goes: called with the bytes the guest transmitted, in order.
ConsoleListener = Callable[[bytes], None]
#: What one VM hears without asking: shadow-register values and line levels (every current value first, then
#: each change), why the shadow values stopped, or, last, that this service is going away.
WatchEvent = ShadowChange | LineChange | ShadowFailure | GoingAway
WatchListener = Callable[[WatchEvent], None]

_DONE = Completion()  # a flush with nothing to report


class ConsoleHub:
    """Fans a UART's output out to its listeners and feeds their input into its RX FIFO.

    Output produced while nobody listens is kept (up to ``CONSOLE_BACKLOG``) for the first listener;
    input the FIFO cannot take yet is kept and pumped in as the guest drains the FIFO. The host calls it
    with its lock held.
    """

    def __init__(self, model: DeviceModel, console: ConsoleDevice, log_file: str | None = None) -> None:
        self.name = model.name
        self.model = model
        self.device = console
        self._listeners: list[ConsoleListener] = []
        self._backlog = bytearray()
        self._pending_input = bytearray()
        self._log = open(log_file, "ab", buffering=0) if log_file else None  # noqa: SIM115
        self.bytes_in = self.bytes_out = 0  # for the metrics
        console.set_output(self._on_output)

    def _on_output(self, data: bytes) -> None:
        self.bytes_out += len(data)
        if self._log is not None:
            self._log.write(data)
        if self._listeners:
            for listener in self._listeners:
                listener(bytes(data))
        else:
            self._backlog += data
            del self._backlog[:-CONSOLE_BACKLOG]

    def attach(self, listener: ConsoleListener) -> None:
        """Send output to ``listener``, starting with what was kept while nobody listened."""
        if self._backlog:
            listener(bytes(self._backlog))
            self._backlog.clear()
        self._listeners.append(listener)

    def detach(self, listener: ConsoleListener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def feed(self, data: bytes) -> None:
        """Input typed by a user: what the FIFO takes now goes in, the rest waits for ``pump``."""
        self.bytes_in += len(data)
        self._pending_input += data
        self.pump()

    def pump(self) -> None:
        """Move waiting input into the FIFO as far as it has room (after every access to the UART)."""
        if self._pending_input:
            taken = self.device.receive(bytes(self._pending_input))
            del self._pending_input[:taken]


@dataclass(frozen=True, slots=True)
class DescribedDevice:
    """One hosted device as Describe reports it: its regions as a vCPU service will map them."""

    name: str
    type_name: str
    compatible: tuple[str, ...]
    has_console: bool
    properties: Mapping[str, str]
    regions: tuple[RemoteRegion, ...]
    lines: tuple[LineSpec, ...] = ()


class DeviceHost:
    """The devices of one device service and everything kept about them between accesses.

    ``service_name`` names this host in what it reports (``MirrorChange.service``, ``ShadowChange.service``,
    Describe); ``shadows`` False declares no shadow registers (``serve-devices --no-shadows``).
    """

    def __init__(self, bus: DeviceBus, service_name: str = "mmiosplit-devices", console_log: str | None = None,
                 shadows: bool = True) -> None:
        self.bus = bus
        self.service_name = service_name
        #: Held for every access and every change of the state below; see the module docstring.
        self.lock = threading.RLock()
        # Shadow registers: the vCPU side serves their reads itself; this keeps its copies current.
        self.shadows = ShadowTracker(bus, enabled=shadows)
        # Interrupt lines: changes an access makes ride on its completion, the others go to the watchers.
        self.lines = LineTracker(bus, service_name)
        # Where the models' DMA goes: the target of the watch that granted windows, if one is open.
        self.dma_target: DmaTarget | None = None
        #: Devices whose accesses may DMA or take long (``DeviceModel.does_dma``, ``slow``), for a transport that
        #: must not wait on them.
        self.off_loop = frozenset(dev.name for dev in bus.devices if dev.does_dma or dev.slow)
        self.consoles: dict[str, ConsoleHub] = {}
        for dev in bus.devices:
            console = supports_console(dev)
            if console is not None:
                self.consoles[dev.name] = ConsoleHub(dev, console, console_log)
        # Found once: a runtime Protocol check per access would cost more than the access itself.
        self._romd: dict[str, RomdDevice] = {}
        # The mode each ROMD region was last reported in, so a mirror built later starts right.
        self._mirror_enabled: dict[tuple[str, str], bool] = {}
        # Every open watch, to tell it the service is going away; set once draining has begun.
        self._watchers: list[WatchListener] = []
        self.going_away: GoingAway | None = None
        for dev in bus.devices:
            romd = supports_romd(dev)
            if romd is not None:
                self._romd[dev.name] = romd
                for spec in dev.regions():
                    if spec.kind is RegionKind.ROMD:
                        self._mirror_enabled[(dev.name, spec.name)] = True

    def session(self) -> HostSession:
        """A session for one vCPU's exit stream."""
        return HostSession(self)

    # --- what a vCPU service asks before and between runs ----------------------------------------

    def describe(self) -> list[DescribedDevice]:
        """Every device and its regions, with the shadow registers this host keeps current."""
        out = []
        for dev in self.bus.devices:
            has_console = dev.name in self.consoles
            regions = tuple(
                RemoteRegion(
                    service=self.service_name, device=dev.name, device_type=dev.type_name, name=spec.name,
                    base=dev.base + spec.offset, size=spec.size, romd=spec.kind is RegionKind.ROMD,
                    posted=spec.posted, access_sizes=tuple(spec.access_sizes), has_console=has_console,
                    compatible=tuple(dev.compatible),
                    shadows=frozenset(self.shadows.windows(dev.name, spec.name)), deadline_ms=spec.deadline_ms,
                )
                for spec in dev.regions()
            )
            out.append(DescribedDevice(dev.name, dev.type_name, tuple(dev.compatible), has_console,
                                       dict(dev.describe()), regions, tuple(line.spec for line in dev.irq_lines)))
        return out

    def read_mirror(self, device: str, region: str) -> tuple[list[tuple[int, bytes]], bool]:
        """The contents of a ROMD region as (offset, bytes) chunks of ``MIRROR_CHUNK``, and whether reads may
        be served from the mirror now. The first chunk is always there; later all-zero ones are left out
        (a mirror starts zeroed and a flash is mostly empty). LookupError when there is no such region."""
        romd = self._romd.get(device)
        key = (device, region)
        if romd is None or key not in self._mirror_enabled:
            raise LookupError(f"no ROMD region {region!r} on a device named {device!r}")
        size = next(s.size for s in self.bus.device(device).regions() if s.name == region)
        zero = bytes(MIRROR_CHUNK)
        chunks = []
        with self.lock:
            for offset in range(0, size, MIRROR_CHUNK):
                data = romd.mirror_contents(region, offset, min(MIRROR_CHUNK, size - offset))
                if offset and data == zero[:len(data)]:
                    continue
                chunks.append((offset, data))
            return chunks, self._mirror_enabled[key]

    def reset(self) -> tuple[MirrorChange, ...]:
        """Reset every device, as a machine reset does; returns what the ROMD mirrors must follow."""
        with self.lock:
            self.bus.reset()
            for hub in self.consoles.values():
                hub.pump()  # input typed meanwhile goes into the emptied FIFO: a guest polling a shadow FR never exits
            self.shadows.refresh_all()  # watchers hear the reset values
            return self._take_mirror_changes()

    def watch(self, listener: WatchListener, dma: DmaTarget | None = None) -> Callable[[], None]:
        """Call ``listener`` with every shadow register now, then every line level, then with each change (or
        the failure that stopped the shadow values), from whichever thread made the change, and at last with
        ``GoingAway`` when the service drains; returns the unsubscriber. A watch that starts while the service
        drains hears only that it is going away.

        ``dma``: the VM's memory as this watch grants it (windows); the models' DMA goes there until the watch
        ends. One VM at a time: a second watch with windows replaces the first one's grant."""

        def deliver(event: ShadowEvent) -> None:
            if self.going_away is None:  # after GoingAway, nothing (the listener has heard its last)
                listener(event if isinstance(event, ShadowFailure) else self._shadow_change(event))

        def deliver_lines(change: LineChange) -> None:
            if self.going_away is None:
                listener(change)

        with self.lock:
            going = self.going_away
            if going is None:
                self._watchers.append(listener)
        if going is not None:
            listener(going)
            return lambda: None
        if dma is not None and dma.windows:
            self.grant_dma(dma)
        unsubscribe_shadows = self.shadows.subscribe(deliver)
        unsubscribe_lines = self.lines.subscribe(deliver_lines)

        def unsubscribe() -> None:
            unsubscribe_lines()
            unsubscribe_shadows()
            if dma is not None:
                self.revoke_dma(dma)
            with self.lock, contextlib.suppress(ValueError):
                self._watchers.remove(listener)

        return unsubscribe

    def grant_dma(self, target: DmaTarget) -> None:
        """Every model's ``dma`` reaches guest memory through ``target`` from now on."""
        with self.lock:
            self.dma_target = target
            for dev in self.bus.devices:
                dev.attach_dma(HostDma(dev.name, target))

    def revoke_dma(self, target: DmaTarget) -> None:
        """``target`` is gone (its watch ended): if it is still the one granted, models are back to ``NoDma``."""
        with self.lock:
            if self.dma_target is not target:
                return
            self.dma_target = None
            for dev in self.bus.devices:
                dev.attach_dma(NoDma(dev.name))

    def go_away(self, reason: str, grace_seconds: float) -> GoingAway:
        """Begin draining: every watch hears it once. Accesses are still answered (what a vCPU sent before it
        heard this must complete); the transport stops taking new streams."""
        with self.lock:
            if self.going_away is None:
                self.going_away = GoingAway(self.service_name, reason, grace_seconds)
                watchers, self._watchers = self._watchers, []
            else:
                watchers = []
            going = self.going_away
        for listener in watchers:
            listener(going)
        return going

    # --- consoles ---------------------------------------------------------------------------------

    def console(self, device: str) -> ConsoleHub:
        """The console of UART ``device``; LookupError naming the consoles there are."""
        hub = self.consoles.get(device)
        if hub is None:
            raise LookupError(f"no UART named {device!r}; consoles: {', '.join(self.consoles) or 'none'}")
        return hub

    def console_input(self, device: str, data: bytes) -> None:
        """Type ``data`` on the console of UART ``device``: what the RX FIFO cannot take now waits for the
        guest to drain it. Shadow watchers hear the change at once (the model reports it too; this covers a
        model that does not)."""
        hub = self.console(device)
        with self.lock:
            hub.feed(data)
            self.shadows.refresh((hub.model,))

    def attach_console(self, device: str, listener: ConsoleListener) -> Callable[[], None]:
        """Send the output of UART ``device`` to ``listener`` (what nobody heard yet first); returns the
        detacher. ``listener`` runs inside accesses, with the host's lock held: it must only queue."""
        hub = self.console(device)
        with self.lock:
            hub.attach(listener)

        def detach() -> None:
            with self.lock:
                hub.detach(listener)

        return detach

    # --- for sessions, with the lock held ---------------------------------------------------------

    def _access(self, exit: MmioExit, touched: set[DeviceModel]) -> Completion:
        done, region = dispatch(self.bus, exit.address, exit.length, exit.is_write, exit.data)
        if region is not None:
            device = region.device
            touched.add(device)
            hub = self.consoles.get(device.name)
            if hub is not None:
                hub.pump()  # the guest may have drained the FIFO
        return done

    def _apply_posted(self, writes: Sequence[tuple[int, bytes]], touched: set[DeviceModel]) -> tuple[PostedError, ...]:
        self.bus.stats.posted_batch(len(writes))
        errors, written = dispatch_posted(self.bus, writes)
        touched |= written
        for device in written:
            hub = self.consoles.get(device.name)
            if hub is not None:
                hub.pump()
        return tuple(errors)

    def _take_mirror_changes(self) -> tuple[MirrorChange, ...]:
        """What ROMD devices changed since the last call (polled after every request: there are only a few)."""
        out: list[MirrorChange] = []
        for name, romd in self._romd.items():
            for u in romd.take_mirror_updates():
                self._mirror_enabled[(name, u.region)] = u.mirror_enabled
                out.append(MirrorChange(self.service_name, name, u.region, u.mirror_enabled, u.patches))
        return tuple(out)

    def _shadow_change(self, values: ShadowValues) -> ShadowChange:
        return ShadowChange(self.service_name, values.generation, values.values)


class HostSession:
    """One vCPU's exit stream: exits, posted batches and flushes, answered in order.

    It remembers the shadow generation its vCPU was sent up to, so every completion brings that vCPU's
    copies up to date (a vCPU never reads a shadow value older than its own last completion), and the
    devices its current request touched, to re-peek only those.
    """

    def __init__(self, host: DeviceHost) -> None:
        self.host = host
        self.shadows_seen = 0  # the shadow generation this stream's vCPU has been sent up to
        self._touched: set[DeviceModel] = set()

    def exit(self, exit: MmioExit, posted: Sequence[tuple[int, bytes]] | None = None,
             cancelled: Callable[[], bool] | None = None) -> Completion:
        """Apply the posted writes queued before the exit (``posted``, in order), then the access, unless
        ``cancelled()`` says, once the host is free for it, that its client gave up on it (then it is never
        performed and the completion says CANCELLED; posted writes are never cancelled)."""
        host = self.host
        lines = host.lines
        with host.lock:
            lines.begin()
            try:
                errors = host._apply_posted(posted, self._touched) if posted is not None else ()
                if cancelled is not None and cancelled():
                    done = Completion(CompletionStatus.CANCELLED, error=f"the {exit.length}-byte "
                                      f"{'write' if exit.is_write else 'read'} at 0x{exit.address:x} was cancelled "
                                      "before it started: never performed")
                else:
                    done = host._access(exit, self._touched)
            finally:
                changed = lines.end()
            return self._finish(done, errors, changed)

    def flush(self, posted: Sequence[tuple[int, bytes]]) -> Completion:
        """Apply a batch of posted writes, in order; the completion names the ones that failed."""
        host = self.host
        lines = host.lines
        with host.lock:
            lines.begin()
            try:
                errors = host._apply_posted(posted, self._touched)
            finally:
                changed = lines.end()
            return self._finish(_DONE, errors, changed)

    def bad_request(self, error: str) -> Completion:
        """Refuse a request the transport could not make sense of; the side effects still go out."""
        with self.host.lock:
            return self._finish(Completion(CompletionStatus.BAD_REQUEST, error=error), (), ())

    def _finish(self, done: Completion, errors: tuple[PostedError, ...], lines: tuple[LineChange, ...]) -> Completion:
        """``done`` with what the request changed besides the access: mirrors, shadows, and the interrupt levels
        it changed (``lines``, collected while it ran). Lock held."""
        host = self.host
        changes = host._take_mirror_changes() if host._romd else ()
        shadow = self._shadow_change()
        if not (errors or changes or shadow is not None or lines):
            return done
        return Completion(done.status, done.data, done.error, errors, changes, () if shadow is None else (shadow,),
                          lines)

    def _shadow_change(self) -> ShadowChange | None:
        """What this request changed, and anything else this vCPU was not sent yet."""
        touched = self._touched
        tracker = self.host.shadows
        if not tracker.active:
            touched.clear()
            return None
        tracker.refresh(touched)
        touched.clear()
        values = tracker.since(self.shadows_seen)
        if values is None:
            return None
        self.shadows_seen = values.generation
        return self.host._shadow_change(values)
