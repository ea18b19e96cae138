"""The DeviceService gRPC server: a thin asyncio adapter around a ``DeviceHost``.

The protocol lives here (the handshake, protocol version and sequence numbers of an exit stream, gRPC
status codes); everything a device service does lives in ``device_service.host``. Protobufs are converted
to and from ``mmiosplit.mmio`` in one place, the section below. Every stream of every vCPU is served on
one event loop, and the host's lock serialises accesses, so none is lost or duplicated; device models stay
synchronous and never see gRPC.

DMA and the event loop. A model's DMA travels on the VM's Watch stream (``StreamDma``), and its answer comes
back on that stream, through this loop. So the loop must never wait for anything a DMA may hold up:

* accesses to a device that may DMA inside them or take long (``DeviceModel.does_dma``, ``slow``) run on a worker
  thread;
* every other call into the host runs on the loop only when the host's lock is free at that instant
  (``DeviceServicer._run``); otherwise it too goes to a worker, so a vCPU's UART access arriving while
  another's doorbell write waits for its DMA never blocks the loop;
* a DMA issued on the loop itself (a model that DMAs without saying ``does_dma``) is refused at once with an
  error saying so, rather than deadlocking.

The fast path (an access to a device that does no DMA, host idle) stays on the loop, with no thread hop.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from device_service.bus import DeviceBus
from device_service.host import DescribedDevice, DeviceHost, WatchEvent
from device_service.model import Trigger
from device_service.sessions import ExitSession, SessionTable
from device_service.shadows import ShadowFailure
from mmiosplit import security
from mmiosplit.address import parse_address
from mmiosplit.health import DrainingAsyncHealth
from mmiosplit.mmio import (
    Completion,
    CompletionStatus,
    DmaError,
    DmaWindow,
    GoingAway,
    LineChange,
    MirrorChange,
    MmioExit,
    ShadowChange,
    clock_id,
    unpack_posted,
)
from mmiosplit.v1 import device_pb2, device_pb2_grpc
from mmiosplit.wire import DEVICE_FEATURES, PROTOCOL_VERSION

log = logging.getLogger("mmiosplit.devices")

SERVICE_NAME = "mmiosplit.v1.DeviceService"
#: How long a model's DMA waits for the VM's answer before it fails.
DMA_TIMEOUT_S = 10.0
#: Worker threads for host calls that must not run on the event loop (see the module docstring).
HOST_WORKERS = 32

T = TypeVar("T")


# ----- protobuf <-> mmiosplit.mmio, the only conversions ------------------------------------------------------

_STATUS = {
    CompletionStatus.OK: device_pb2.COMPLETION_STATUS_OK,
    CompletionStatus.DEVICE_ERROR: device_pb2.COMPLETION_STATUS_DEVICE_ERROR,
    CompletionStatus.NO_DEVICE: device_pb2.COMPLETION_STATUS_NO_DEVICE,
    CompletionStatus.BAD_REQUEST: device_pb2.COMPLETION_STATUS_BAD_REQUEST,
    CompletionStatus.CANCELLED: device_pb2.COMPLETION_STATUS_CANCELLED,
}


_WRITE = device_pb2.ACCESS_DIRECTION_WRITE


def _exit_from_pb(ex: device_pb2.MmioExit) -> MmioExit:
    """What the host acts on. The address is authoritative (the bus routes it); device, region, syndrome, PC and
    instruction are for observability and are not read here: each field read costs on every exit."""
    return MmioExit(ex.vcpu_id, ex.address, ex.length, ex.direction == _WRITE, ex.data)


def _posted_from_pb(batch: device_pb2.PostedWrites) -> list[tuple[int, bytes]]:
    """The (address, bytes) writes of a packed batch; ValueError if it is inconsistent."""
    return unpack_posted(batch.address, batch.length, batch.data)


def _shadow_update_pb(change: ShadowChange) -> device_pb2.ShadowUpdate:
    return device_pb2.ShadowUpdate(generation=change.generation, values=[
        device_pb2.ShadowValue(device=d, region=r, offset=o, data=b) for d, r, o, b in change.values])


def _line_update_pb(change: LineChange) -> device_pb2.LineUpdate:
    return device_pb2.LineUpdate(generation=change.generation, raised_ns=change.time_ns, levels=[
        device_pb2.LineLevel(device=d, index=i, level=v) for d, i, v in change.levels])


_TRIGGER = {Trigger.LEVEL: device_pb2.LINE_TRIGGER_LEVEL, Trigger.EDGE: device_pb2.LINE_TRIGGER_EDGE}


def _mirror_update_pb(change: MirrorChange) -> device_pb2.MirrorUpdate:
    return device_pb2.MirrorUpdate(device=change.device, region=change.region, mirror_enabled=change.enabled,
                                   patches=[device_pb2.MirrorPatch(offset=o, data=d) for o, d in change.patches])


def _response_pb(seq: int, done: Completion) -> device_pb2.ExitStreamResponse:
    """The response carrying ``done``, filled in place (building a Completion and then the response would copy it)."""
    response = device_pb2.ExitStreamResponse(seq=seq)
    pb = response.completion
    status = done.status
    pb.status = device_pb2.COMPLETION_STATUS_OK if status is CompletionStatus.OK else _STATUS[status]
    if done.data:
        pb.data = done.data
    if done.error:
        pb.error = done.error
    if done.posted_errors or done.mirror_changes or done.shadows or done.lines:
        for e in done.posted_errors:
            pb.posted_errors.add(index=e.index, address=e.address, error=e.error)
        pb.mirror_updates.extend(_mirror_update_pb(c) for c in done.mirror_changes)
        for change in done.shadows:  # a host sends at most one per completion
            pb.shadow.CopyFrom(_shadow_update_pb(change))
        for lines in done.lines:  # likewise
            pb.lines.CopyFrom(_line_update_pb(lines))
    return response


def _going_away_pb(going: GoingAway) -> device_pb2.GoingAway:
    return device_pb2.GoingAway(reason=going.reason, grace_seconds=going.grace_seconds)


def _vms(vm_ids: list[str]) -> str:
    """``VM 'a'`` or ``VMs 'a', 'b'``, for a refusal."""
    names = ", ".join(repr(v) if v else "(no id)" for v in vm_ids)
    return f"VM{'s' if len(vm_ids) > 1 else ''} {names}"


def _device_pb(dev: DescribedDevice) -> device_pb2.Device:
    return device_pb2.Device(
        name=dev.name, type=dev.type_name, compatible=list(dev.compatible), has_console=dev.has_console,
        properties=dict(dev.properties),
        regions=[device_pb2.Region(
            name=r.name, base=r.base, size=r.size,
            kind=device_pb2.REGION_KIND_ROMD if r.romd else device_pb2.REGION_KIND_MMIO,
            posted=r.posted, access_sizes=list(r.access_sizes),
            shadows=[device_pb2.ShadowWindow(offset=o, size=n) for o, n in sorted(r.shadows)],
            deadline_ms=r.deadline_ms,
        ) for r in dev.regions],
        lines=[device_pb2.InterruptLine(index=line.index, name=line.name, trigger=_TRIGGER[line.trigger])
               for line in dev.lines],
    )


# ----- DMA over the Watch stream ------------------------------------------------------------------------------

@dataclass(slots=True)
class _DmaOut:
    """A DMA request on its way out on a Watch stream."""

    request: device_pb2.DmaRequest


class _Waiter:
    __slots__ = ("data", "done", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.data = b""
        self.error = ""


class StreamDma:
    """The ``DmaTarget`` one Watch stream offers the host's models: each request goes out on the stream, the
    calling thread waits for the VM's answer (never the event loop's thread: that one carries the answer)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, send: Callable[[_DmaOut], None],
                 windows: tuple[DmaWindow, ...], who: str) -> None:
        self._loop = loop
        self._loop_thread = threading.get_ident()  # made on the loop
        self._send = send
        self._windows = windows
        self._who = who
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._waiting: dict[int, _Waiter] = {}
        self._closed: str | None = None

    @property
    def windows(self) -> tuple[DmaWindow, ...]:
        return self._windows

    def dma_read(self, device: str, address: int, length: int) -> bytes:
        return self._call(device, f"DMA read of {length} bytes at 0x{address:x}", device_pb2.DmaRequest(
            device=device, address=address, direction=device_pb2.DMA_DIRECTION_READ, length=length))

    def dma_write(self, device: str, address: int, data: bytes) -> None:
        self._call(device, f"DMA write of {len(data)} bytes at 0x{address:x}", device_pb2.DmaRequest(
            device=device, address=address, direction=device_pb2.DMA_DIRECTION_WRITE, data=data))

    def _call(self, device: str, what: str, request: device_pb2.DmaRequest) -> bytes:
        if threading.get_ident() == self._loop_thread:
            raise DmaError(f"{device}: {what} refused: issued on the device service's event loop, which must stay "
                           "free to carry the answer (a model that DMAs inside an access must set does_dma)")
        waiter = _Waiter()
        with self._lock:
            if self._closed is not None:
                raise DmaError(f"{device}: {what} failed: {self._closed}")
            request.id = next(self._ids)
            self._waiting[request.id] = waiter
        self._loop.call_soon_threadsafe(self._send, _DmaOut(request))
        if not waiter.done.wait(DMA_TIMEOUT_S):
            with self._lock:
                self._waiting.pop(request.id, None)
            raise DmaError(f"{device}: {what}: no answer from {self._who} within {DMA_TIMEOUT_S:g} s")
        if waiter.error:
            raise DmaError(waiter.error)
        return waiter.data

    def resolve(self, result: device_pb2.DmaResult) -> None:
        """The VM's answer to request ``result.id`` (an unknown id, e.g. one that timed out, is dropped)."""
        with self._lock:
            waiter = self._waiting.pop(result.id, None)
        if waiter is not None:
            waiter.data = bytes(result.data)
            waiter.error = result.error
            waiter.done.set()

    def close(self, reason: str) -> None:
        """The stream ended: every waiting DMA fails with ``reason``, and so does every later one."""
        with self._lock:
            self._closed = reason
            waiting, self._waiting = self._waiting, {}
        for waiter in waiting.values():
            waiter.error = f"DMA failed: {reason}"
            waiter.done.set()


def _loop_put(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any]) -> Callable[[object], None]:
    """A put for ``queue`` that any thread may call; items keep the order they were put in (both paths go
    through the loop's ready queue)."""
    loop_thread = threading.get_ident()

    def put(item: object) -> None:
        if threading.get_ident() == loop_thread:
            loop.call_soon(queue.put_nowait, item)
        else:
            loop.call_soon_threadsafe(queue.put_nowait, item)

    return put


# ----- the servicer ---------------------------------------------------------------------------------------------

class DeviceServicer(device_pb2_grpc.DeviceServiceServicer):
    """Serves Describe, the exit streams, Reset, ReadMirror, Watch and the consoles of one DeviceHost."""

    def __init__(self, bus: DeviceBus, service_name: str = "mmiosplit-devices",
                 console_log: str | None = None, shadows: bool = True) -> None:
        self.host = DeviceHost(bus, service_name, console_log, shadows)
        self._workers = ThreadPoolExecutor(HOST_WORKERS, thread_name_prefix="device-host")
        #: Random per start: a client that sees another one knows this service restarted and its state is gone.
        self.instance_id = uuid.uuid4().hex
        self.sessions = SessionTable(self.host.session)
        #: Open exit and watch streams per VM id: the VMs attached now, whom the control RPCs are scoped to.
        self.attached: collections.Counter[str] = collections.Counter()

    def _attach(self, vm_id: str) -> None:
        """Count ``vm_id`` as attached while a stream of it is open (``_detach`` when it ends)."""
        self.attached[vm_id] += 1

    def _detach(self, vm_id: str) -> None:
        self.attached[vm_id] -= 1
        if self.attached[vm_id] <= 0:
            del self.attached[vm_id]

    async def _scoped(self, rpc: str, vm_id: str, context: grpc.aio.ServicerContext) -> None:
        """Refuse (FAILED_PRECONDITION) a control RPC that would act on the state of a VM other than the one it
        names: the devices' state is shared by every VM attached, so Reset, Console and ReadMirror are allowed
        only when no other VM is attached; with no VM named, when at most one is."""
        others = sorted(v for v in self.attached if v != vm_id) if vm_id else sorted(self.attached)
        if vm_id and others:
            reason = (f"{rpc} for VM {vm_id!r} refused: the devices of {self.host.service_name} are attached to "
                      f"{_vms(others)} too, whose state it would touch")
        elif not vm_id and len(others) > 1:
            reason = (f"{rpc} names no VM (vm_id) and {_vms(others)} are attached to {self.host.service_name}: "
                      "name the VM it acts for")
        else:
            return
        log.warning("%s (from %s)", reason, context.peer())
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, reason)

    async def _run(self, fn: Callable[..., T], *args: Any, on_worker: bool = False) -> T:
        """Call into the host: on the loop when the host's lock is free now (and ``on_worker`` is not asked),
        else on a worker thread, so the loop never waits for an access that may wait for a DMA."""
        lock = self.host.lock
        if not on_worker and lock.acquire(blocking=False):
            try:
                return fn(*args)
            finally:
                lock.release()
        return await asyncio.get_running_loop().run_in_executor(self._workers, lambda: fn(*args))

    def _background(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` (a detach, an unsubscribe) on a worker without waiting for it."""
        self._workers.submit(fn)

    def _off_loop(self, address: int) -> bool:
        """Whether the device at ``address`` may DMA inside the access or take long (then the access runs on a
        worker, and the loop stays free for DMA answers, other streams and cancels)."""
        if not self.host.off_loop:
            return False
        region = self.host.bus.find(address)
        return region is not None and region.device.name in self.host.off_loop

    async def Describe(self, request: device_pb2.DescribeRequest,
                       context: grpc.aio.ServicerContext) -> device_pb2.DescribeResponse:
        return device_pb2.DescribeResponse(service_name=self.host.service_name, protocol_version=PROTOCOL_VERSION,
                                           devices=[_device_pb(d) for d in self.host.describe()],
                                           clock_id=clock_id(), instance_id=self.instance_id,
                                           features=DEVICE_FEATURES)

    async def ReadMirror(self, request: device_pb2.ReadMirrorRequest,
                         context: grpc.aio.ServicerContext) -> AsyncIterator[device_pb2.ReadMirrorResponse]:
        await self._scoped("ReadMirror", request.vm_id, context)
        try:
            chunks, enabled = await self._run(self.host.read_mirror, request.device, request.region)
        except LookupError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]))
            return
        for offset, data in chunks:  # the first chunk is at offset 0 and carries the mode
            yield device_pb2.ReadMirrorResponse(offset=offset, data=data, mirror_enabled=enabled and offset == 0)

    async def Reset(self, request: device_pb2.ResetRequest,
                    context: grpc.aio.ServicerContext) -> device_pb2.ResetResponse:
        await self._scoped("Reset", request.vm_id, context)
        changes = await self._run(self.host.reset)
        return device_pb2.ResetResponse(mirror_updates=[_mirror_update_pb(c) for c in changes])

    async def Watch(self, request_iterator: AsyncIterator[device_pb2.WatchRequest],
                    context: grpc.aio.ServicerContext) -> AsyncIterator[device_pb2.WatchResponse]:
        """Every shadow register and line level now, then each change, and the models' DMA requests, in the
        order they happened; ends after telling the VM this service is going away. The first request names the
        VM and its DMA windows; later ones answer DMA requests."""
        requests = request_iterator.__aiter__()
        try:
            first = await requests.__anext__()
        except StopAsyncIteration:
            return
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[WatchEvent | _DmaOut] = asyncio.Queue()
        put = _loop_put(loop, queue)
        windows = tuple(DmaWindow(w.name, w.base, w.size) for w in first.dma_windows)
        dma = StreamDma(loop, queue.put_nowait, windows, f"VM {first.vm_id}") if windows else None
        self._attach(first.vm_id)
        try:
            unsubscribe = await self._run(self.host.watch, put, dma)
        except BaseException:
            self._detach(first.vm_id)
            raise
        log.debug("watched by VM %s (%d DMA window(s))", first.vm_id, len(windows))

        async def answers() -> None:
            async for req in requests:
                if dma is not None and req.HasField("dma_result"):
                    dma.resolve(req.dma_result)

        reader = asyncio.ensure_future(answers())
        try:
            while True:
                event = await queue.get()
                if isinstance(event, _DmaOut):
                    yield device_pb2.WatchResponse(dma=event.request)
                elif isinstance(event, LineChange):
                    yield device_pb2.WatchResponse(lines=_line_update_pb(event))
                elif isinstance(event, ShadowChange):
                    yield device_pb2.WatchResponse(shadow=_shadow_update_pb(event))
                elif isinstance(event, ShadowFailure):
                    await context.abort(grpc.StatusCode.INTERNAL, f"shadow registers of {self.host.service_name} "
                                        f"stopped: {event.message}")
                    return
                else:
                    yield device_pb2.WatchResponse(going_away=_going_away_pb(event))
                    return
        finally:
            reader.cancel()
            self._detach(first.vm_id)
            if dma is not None:
                dma.close(f"the watch stream of VM {first.vm_id} ended")
            self._background(unsubscribe)

    async def ExitStream(self, request_iterator: AsyncIterator[device_pb2.ExitStreamRequest],
                         context: grpc.aio.ServicerContext) -> AsyncIterator[device_pb2.ExitStreamResponse]:
        requests = request_iterator.__aiter__()
        try:
            first = await requests.__anext__()
        except StopAsyncIteration:
            return
        if first.WhichOneof("body") != "hello":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the first message on ExitStream must be a hello, got {first.WhichOneof('body')}")
        if first.hello.protocol_version != PROTOCOL_VERSION:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"protocol version {first.hello.protocol_version} is not supported; "
                                f"this device service speaks {PROTOCOL_VERSION}")
        hello = first.hello
        peer = f"VM {hello.vm_id} vCPU {hello.vcpu_id}"
        exit_session, resumed = self.sessions.attach(hello.session_id)
        self._attach(hello.vm_id)
        try:
            exit_session.acknowledge(hello.last_acked)
            log.debug("exit stream opened by %s (session %s%s)", peer, hello.session_id or "none",
                      ", resumed" if resumed else "")
            self.host.bus.stats.stream_opened(context)
            yield device_pb2.ExitStreamResponse(
                seq=first.seq,
                welcome=device_pb2.StreamWelcome(protocol_version=PROTOCOL_VERSION,
                                                 service_name=self.host.service_name,
                                                 instance_id=self.instance_id, resumed=resumed,
                                                 applied=exit_session.applied, features=DEVICE_FEATURES))
            keep = bool(hello.session_id)
            # Requests are read ahead of the one being answered, so a Cancel for it is seen while it still waits
            # for the host (behind another vCPU's access or a DMA): it is then never performed.
            pending: asyncio.Queue[device_pb2.ExitStreamRequest | None] = asyncio.Queue()

            async def read_ahead() -> None:
                received = 0  # the highest seq read on this stream: a Cancel names one of them, or is ignored
                try:
                    async for ahead in requests:
                        if ahead.WhichOneof("body") == "cancel":
                            if exit_session.applied < ahead.seq <= received:
                                exit_session.cancelled.add(ahead.seq)
                            continue
                        received = max(received, ahead.seq)
                        pending.put_nowait(ahead)
                except Exception as exc:  # the client went away mid-stream: the answers end with the requests
                    log.debug("exit stream of %s ended: %r", peer, exc)
                finally:
                    pending.put_nowait(None)

            reader = asyncio.ensure_future(read_ahead())
            try:
                while (req := await pending.get()) is not None:
                    exit_session.acknowledge(req.ack)
                    async with exit_session.lock:
                        if req.seq <= exit_session.applied:
                            # A repeat after a resume: answered from memory, never applied twice.
                            response = exit_session.responses.get(req.seq)
                            if response is None:
                                response = _response_pb(req.seq, await self._run(
                                    exit_session.host_session.bad_request,
                                    f"sequence number {req.seq} from {peer}, expected {exit_session.applied + 1}: "
                                    f"{req.seq} was applied already"
                                    + (" and its response acknowledged" if keep else "")))
                        else:
                            response = await self._answer(exit_session, req, peer)
                            exit_session.record(req.seq, response, keep)
                    yield response
            finally:
                reader.cancel()
        finally:
            self._detach(hello.vm_id)
            self.sessions.detach(exit_session)

    async def _answer(self, exit_session: ExitSession, req: device_pb2.ExitStreamRequest,
                      peer: str) -> device_pb2.ExitStreamResponse:
        """Apply request ``req`` (the next of its session, or refuse it) and build its response."""
        session = exit_session.host_session
        kind = req.WhichOneof("body")
        done: Completion
        expected = exit_session.applied + 1
        if req.seq != expected:
            done = await self._run(session.bad_request,
                                   f"sequence number {req.seq} from {peer}, expected {expected}")
        elif kind == "exit":
            ex = req.exit
            try:
                posted = _posted_from_pb(ex.posted) if ex.HasField("posted") else None
            except ValueError as exc:
                done = await self._run(session.bad_request, f"malformed posted batch: {exc}")
            else:
                cancelled, seq = exit_session.cancelled, req.seq
                done = await self._run(session.exit, _exit_from_pb(ex), posted, lambda: seq in cancelled,
                                       on_worker=self._off_loop(ex.address))
        elif kind == "flush":
            try:
                writes = _posted_from_pb(req.flush)
            except ValueError as exc:
                done = await self._run(session.bad_request, f"malformed posted batch: {exc}")
            else:
                done = await self._run(session.flush, writes,
                                       on_worker=any(self._off_loop(address) for address, _ in writes))
        else:
            done = await self._run(session.bad_request, f"unexpected {kind!r} from {peer} after the handshake")
        response = _response_pb(req.seq, done)
        going = self.host.going_away
        if going is not None:  # completed all the same; the client learns it should send no more
            response.going_away.CopyFrom(_going_away_pb(going))
        return response

    async def Console(self, request_iterator: AsyncIterator[device_pb2.ConsoleRequest],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[device_pb2.ConsoleResponse]:
        requests = request_iterator.__aiter__()
        try:
            first = await requests.__anext__()
        except StopAsyncIteration:
            return
        host = self.host
        await self._scoped("Console", first.vm_id, context)
        try:
            host.console(first.device)
        except LookupError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]))
            return
        if first.input:
            await self._run(host.console_input, first.device, first.input)
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        detach = await self._run(host.attach_console, first.device, _loop_put(asyncio.get_running_loop(), queue))

        async def pump_input() -> None:
            async for req in requests:
                if req.input:
                    await self._run(host.console_input, first.device, req.input)

        reader = asyncio.ensure_future(pump_input())
        try:
            while True:
                data = await queue.get()
                yield device_pb2.ConsoleResponse(output=data)
        finally:
            reader.cancel()
            self._background(detach)


async def serve_async(listen: str, bus: DeviceBus, service_name: str,
                      ready: Callable[[str], None] | None = None, console_log: str | None = None,
                      on_servicer: Callable[[DeviceServicer], None] | None = None, shadows: bool = True,
                      grace_s: float = 10.0) -> None:
    address = parse_address(listen)
    sec = security.current()
    security.check_listen(address, sec)  # before anything starts
    server = security.aio_server(sec)
    servicer = DeviceServicer(bus, service_name, console_log, shadows)
    if on_servicer is not None:  # e.g. the metrics collector, which reads the consoles
        on_servicer(servicer)
    device_pb2_grpc.add_DeviceServiceServicer_to_server(servicer, server)
    health_servicer = DrainingAsyncHealth()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = security.bind(server, address, sec)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[str] = loop.create_future()

    def on_signal(sig: signal.Signals) -> None:
        if not stop.done():
            stop.set_result(sig.name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    if ready:
        ready(address.target if address.is_unix else f"{address.host}:{port}")
    await drain(server, servicer, health_servicer, await stop, grace_s)


async def drain(server: grpc.aio.Server, servicer: DeviceServicer, health_servicer: DrainingAsyncHealth,
                signal_name: str, grace_s: float) -> None:
    """Leave without losing an access: NOT_SERVING at once, no new streams, every watching VM told (its vCPUs
    then send no new exits), every request already received completed; streams still open after ``grace_s``
    are cancelled."""
    host = servicer.host
    stats = host.bus.stats
    t0 = time.monotonic()
    await health_servicer.drain(("", SERVICE_NAME))
    going = await servicer._run(host.go_away, f"device service {host.service_name} is shutting down "
                                f"({signal_name})", grace_s)
    log.info("%s: draining %d exit stream(s) for up to %g s", going.reason, stats.streams_open, grace_s)
    await server.stop(grace=grace_s)  # returns when every RPC has ended, or cancels those left at the deadline
    took = time.monotonic() - t0
    served = ", ".join(f"{device}/{region} {kind}s {count}" for (device, region, kind), count
                       in sorted(stats.accesses.items()) if device) or "none"
    log.info("device service %s stopped after %.2f s (%s); accesses served: %s; posted writes: %d",
             host.service_name, took,
             "every exit stream ended" if took < grace_s else "exit streams still open were cancelled at the end "
             "of the grace period", served, stats.posted_writes)


def serve(listen: str, bus: DeviceBus, service_name: str = "mmiosplit-devices",
          ready: Callable[[str], None] | None = None, console_log: str | None = None,
          on_servicer: Callable[[DeviceServicer], None] | None = None, shadows: bool = True,
          grace_s: float = 10.0) -> None:
    """Run the device service until SIGTERM or SIGINT, then drain (``drain``) and return; ``shadows`` False
    declares no shadow registers."""
    asyncio.run(serve_async(listen, bus, service_name, ready, console_log, on_servicer, shadows, grace_s))
