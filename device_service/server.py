"""The DeviceService gRPC server: a thin asyncio adapter around a ``DeviceHost``.

The protocol lives here (the handshake, protocol version and sequence numbers of an exit stream, gRPC
status codes); everything a device service does lives in ``device_service.host``. Protobufs are converted
to and from ``mmiosplit.mmio`` in one place, the section below. Every stream of every vCPU is served on
one event loop, so accesses to a device are serialised and none is lost or duplicated; device models stay
synchronous and never see gRPC.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from device_service.bus import DeviceBus
from device_service.host import DescribedDevice, DeviceHost, WatchEvent
from device_service.shadows import ShadowFailure
from mmiosplit.address import parse_address
from mmiosplit.health import DrainingAsyncHealth
from mmiosplit.mmio import (
    Completion,
    CompletionStatus,
    GoingAway,
    MirrorChange,
    MmioExit,
    ShadowChange,
    unpack_posted,
)
from mmiosplit.v1 import device_pb2, device_pb2_grpc
from mmiosplit.wire import GRPC_OPTIONS, PROTOCOL_VERSION

log = logging.getLogger("mmiosplit.devices")

SERVICE_NAME = "mmiosplit.v1.DeviceService"


# ----- protobuf <-> mmiosplit.mmio, the only conversions ------------------------------------------------------

_STATUS = {
    CompletionStatus.OK: device_pb2.COMPLETION_STATUS_OK,
    CompletionStatus.DEVICE_ERROR: device_pb2.COMPLETION_STATUS_DEVICE_ERROR,
    CompletionStatus.NO_DEVICE: device_pb2.COMPLETION_STATUS_NO_DEVICE,
    CompletionStatus.BAD_REQUEST: device_pb2.COMPLETION_STATUS_BAD_REQUEST,
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
    if done.posted_errors or done.mirror_changes or done.shadows:
        for e in done.posted_errors:
            pb.posted_errors.add(index=e.index, address=e.address, error=e.error)
        pb.mirror_updates.extend(_mirror_update_pb(c) for c in done.mirror_changes)
        for change in done.shadows:  # a host sends at most one per completion
            pb.shadow.CopyFrom(_shadow_update_pb(change))
    return response


def _going_away_pb(going: GoingAway) -> device_pb2.GoingAway:
    return device_pb2.GoingAway(reason=going.reason, grace_seconds=going.grace_seconds)


def _device_pb(dev: DescribedDevice) -> device_pb2.Device:
    return device_pb2.Device(
        name=dev.name, type=dev.type_name, compatible=list(dev.compatible), has_console=dev.has_console,
        properties=dict(dev.properties),
        regions=[device_pb2.Region(
            name=r.name, base=r.base, size=r.size,
            kind=device_pb2.REGION_KIND_ROMD if r.romd else device_pb2.REGION_KIND_MMIO,
            posted=r.posted, access_sizes=list(r.access_sizes),
            shadows=[device_pb2.ShadowWindow(offset=o, size=n) for o, n in sorted(r.shadows)],
        ) for r in dev.regions],
    )


# ----- the servicer ---------------------------------------------------------------------------------------------

class DeviceServicer(device_pb2_grpc.DeviceServiceServicer):
    """Serves Describe, the exit streams, Reset, ReadMirror, Watch and the consoles of one DeviceHost."""

    def __init__(self, bus: DeviceBus, service_name: str = "mmiosplit-devices",
                 console_log: str | None = None, shadows: bool = True) -> None:
        self.host = DeviceHost(bus, service_name, console_log, shadows)

    async def Describe(self, request: device_pb2.DescribeRequest,
                       context: grpc.aio.ServicerContext) -> device_pb2.DescribeResponse:
        return device_pb2.DescribeResponse(service_name=self.host.service_name, protocol_version=PROTOCOL_VERSION,
                                           devices=[_device_pb(d) for d in self.host.describe()])

    async def ReadMirror(self, request: device_pb2.ReadMirrorRequest,
                         context: grpc.aio.ServicerContext) -> AsyncIterator[device_pb2.ReadMirrorResponse]:
        try:
            chunks, enabled = self.host.read_mirror(request.device, request.region)
        except LookupError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]))
            return
        for offset, data in chunks:  # the first chunk is at offset 0 and carries the mode
            yield device_pb2.ReadMirrorResponse(offset=offset, data=data, mirror_enabled=enabled and offset == 0)

    async def Reset(self, request: device_pb2.ResetRequest,
                    context: grpc.aio.ServicerContext) -> device_pb2.ResetResponse:
        return device_pb2.ResetResponse(mirror_updates=[_mirror_update_pb(c) for c in self.host.reset()])

    async def Watch(self, request: device_pb2.WatchRequest,
                    context: grpc.aio.ServicerContext) -> AsyncIterator[device_pb2.WatchResponse]:
        """Every shadow register now, then each change (all on this event loop, so none is missed); ends after
        telling the VM this service is going away."""
        queue: asyncio.Queue[WatchEvent] = asyncio.Queue()
        unsubscribe = self.host.watch(queue.put_nowait)
        log.debug("watched by VM %s", request.vm_id)
        try:
            while True:
                event = await queue.get()
                if isinstance(event, ShadowFailure):
                    await context.abort(grpc.StatusCode.INTERNAL, f"shadow registers of {self.host.service_name} "
                                        f"stopped: {event.message}")
                    return
                if isinstance(event, GoingAway):
                    yield device_pb2.WatchResponse(going_away=_going_away_pb(event))
                    return
                yield device_pb2.WatchResponse(shadow=_shadow_update_pb(event))
        finally:
            unsubscribe()

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
        peer = f"VM {first.hello.vm_id} vCPU {first.hello.vcpu_id}"
        log.debug("exit stream opened by %s", peer)
        self.host.bus.stats.stream_opened(context)
        yield device_pb2.ExitStreamResponse(
            seq=first.seq,
            welcome=device_pb2.StreamWelcome(protocol_version=PROTOCOL_VERSION, service_name=self.host.service_name))
        session = self.host.session()
        expected = first.seq + 1
        async for req in requests:
            kind = req.WhichOneof("body")
            done: Completion
            if req.seq != expected:
                done = session.bad_request(f"sequence number {req.seq} from {peer}, expected {expected}")
            elif kind == "exit":
                ex = req.exit
                try:
                    posted = _posted_from_pb(ex.posted) if ex.HasField("posted") else None
                except ValueError as exc:
                    done = session.bad_request(f"malformed posted batch: {exc}")
                else:
                    done = session.exit(_exit_from_pb(ex), posted)
            elif kind == "flush":
                try:
                    writes = _posted_from_pb(req.flush)
                except ValueError as exc:
                    done = session.bad_request(f"malformed posted batch: {exc}")
                else:
                    done = session.flush(writes)
            else:
                done = session.bad_request(f"unexpected {kind!r} from {peer} after the handshake")
            expected = req.seq + 1
            response = _response_pb(req.seq, done)
            going = self.host.going_away
            if going is not None:  # completed all the same; the client learns it should send no more
                response.going_away.CopyFrom(_going_away_pb(going))
            yield response

    async def Console(self, request_iterator: AsyncIterator[device_pb2.ConsoleRequest],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[device_pb2.ConsoleResponse]:
        requests = request_iterator.__aiter__()
        try:
            first = await requests.__anext__()
        except StopAsyncIteration:
            return
        host = self.host
        try:
            host.console(first.device)
        except LookupError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]))
            return
        if first.input:
            host.console_input(first.device, first.input)
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        detach = host.attach_console(first.device, queue.put_nowait)

        async def pump_input() -> None:
            async for req in requests:
                if req.input:
                    host.console_input(first.device, req.input)

        reader = asyncio.ensure_future(pump_input())
        try:
            while True:
                data = await queue.get()
                yield device_pb2.ConsoleResponse(output=data)
        finally:
            reader.cancel()
            detach()


async def serve_async(listen: str, bus: DeviceBus, service_name: str,
                      ready: Callable[[str], None] | None = None, console_log: str | None = None,
                      on_servicer: Callable[[DeviceServicer], None] | None = None, shadows: bool = True,
                      grace_s: float = 10.0) -> None:
    address = parse_address(listen)
    server = grpc.aio.server(options=GRPC_OPTIONS)
    servicer = DeviceServicer(bus, service_name, console_log, shadows)
    if on_servicer is not None:  # e.g. the metrics collector, which reads the consoles
        on_servicer(servicer)
    device_pb2_grpc.add_DeviceServiceServicer_to_server(servicer, server)
    health_servicer = DrainingAsyncHealth()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(address.target)
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
    going = host.go_away(f"device service {host.service_name} is shutting down ({signal_name})", grace_s)
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
