"""The DeviceService gRPC server: a thin asyncio adapter around a ``DeviceBus`` of plain models.

Every stream of every vCPU is served on one event loop, so accesses to a device are serialised and
none is lost or duplicated; device models stay synchronous and never see gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable

import grpc
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from device_service.bus import DeviceBus
from device_service.dispatch import Outcome, dispatch, dispatch_posted
from device_service.model import (
    ConsoleDevice,
    DeviceModel,
    RegionKind,
    RomdDevice,
    supports_console,
    supports_romd,
)
from device_service.shadows import ShadowEvent, ShadowFailure, ShadowTracker, ShadowValues
from mmiosplit.address import parse_address
from mmiosplit.v1 import device_pb2, device_pb2_grpc
from mmiosplit.wire import GRPC_OPTIONS, PROTOCOL_VERSION, iter_posted

log = logging.getLogger("mmiosplit.devices")

SERVICE_NAME = "mmiosplit.v1.DeviceService"
CONSOLE_BACKLOG = 1 << 20


class ConsoleHub:
    """Fans a UART's output out to console streams and feeds their input back into the RX FIFO.

    Output produced while nobody listens is kept (up to 1 MiB) for the first listener; input the
    FIFO cannot take yet is kept and pumped in as the guest drains the FIFO.
    """

    def __init__(self, name: str, device: ConsoleDevice, log_file: str | None = None) -> None:
        self.name = name
        self.device = device
        self._listeners: list[asyncio.Queue[bytes]] = []
        self._backlog = bytearray()
        self._pending_input = bytearray()
        self._log = open(log_file, "ab", buffering=0) if log_file else None  # noqa: SIM115
        self.bytes_in = self.bytes_out = 0  # for the metrics
        device.set_output(self._on_output)

    def _on_output(self, data: bytes) -> None:
        self.bytes_out += len(data)
        if self._log is not None:
            self._log.write(data)
        if self._listeners:
            for q in self._listeners:
                q.put_nowait(bytes(data))
        else:
            self._backlog += data
            del self._backlog[:-CONSOLE_BACKLOG]

    def attach(self) -> asyncio.Queue[bytes]:
        q: asyncio.Queue[bytes] = asyncio.Queue()
        if self._backlog:
            q.put_nowait(bytes(self._backlog))
            self._backlog.clear()
        self._listeners.append(q)
        return q

    def detach(self, q: asyncio.Queue[bytes]) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(q)

    def feed(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self._pending_input += data
        self.pump()

    def pump(self) -> None:
        if self._pending_input:
            taken = self.device.receive(bytes(self._pending_input))
            del self._pending_input[:taken]


def _shadow_update(values: ShadowValues) -> device_pb2.ShadowUpdate:
    return device_pb2.ShadowUpdate(generation=values.generation, values=[
        device_pb2.ShadowValue(device=d, region=r, offset=o, data=b) for d, r, o, b in values.values])


_STATUS = {
    Outcome.OK: device_pb2.COMPLETION_STATUS_OK,
    Outcome.DEVICE_ERROR: device_pb2.COMPLETION_STATUS_DEVICE_ERROR,
    Outcome.NO_DEVICE: device_pb2.COMPLETION_STATUS_NO_DEVICE,
    Outcome.BAD_REQUEST: device_pb2.COMPLETION_STATUS_BAD_REQUEST,
}


class DeviceServicer(device_pb2_grpc.DeviceServiceServicer):
    """Serves Describe, the exit streams, Reset and the consoles of one DeviceBus."""

    def __init__(self, bus: DeviceBus, service_name: str = "mmiosplit-devices",
                 console_log: str | None = None, shadows: bool = True) -> None:
        self.bus = bus
        # Shadow registers: the vcpu service serves their reads itself; this keeps its copies current.
        self.shadows = ShadowTracker(bus, enabled=shadows)
        self._touched: set[DeviceModel] = set()  # devices the current request accessed, to re-peek after it
        self.service_name = service_name
        self.consoles: dict[str, ConsoleHub] = {}
        for dev in bus.devices:
            console = supports_console(dev)
            if console is not None:
                self.consoles[dev.name] = ConsoleHub(dev.name, console, console_log)
        self.exits = 0
        self.romd: dict[str, RomdDevice] = {}
        # The mode each ROMD region was last reported in, so a mirror built later starts right.
        self.romd_enabled: dict[tuple[str, str], bool] = {}
        for dev in bus.devices:
            romd = supports_romd(dev)
            if romd is not None:
                self.romd[dev.name] = romd
                for spec in dev.regions():
                    if spec.kind is RegionKind.ROMD:
                        self.romd_enabled[(dev.name, spec.name)] = True

    def _mirror_updates(self) -> list[device_pb2.MirrorUpdate]:
        """Collect what ROMD devices changed (polled after every request: there are only a few)."""
        out = []
        for name, romd in self.romd.items():
            for u in romd.take_mirror_updates():
                self.romd_enabled[(name, u.region)] = u.mirror_enabled
                out.append(device_pb2.MirrorUpdate(
                    device=name, region=u.region, mirror_enabled=u.mirror_enabled,
                    patches=[device_pb2.MirrorPatch(offset=o, data=d) for o, d in u.patches]))
        return out

    async def ReadMirror(self, request: device_pb2.ReadMirrorRequest,
                         context: grpc.aio.ServicerContext) -> AsyncIterator[device_pb2.ReadMirrorResponse]:
        romd = self.romd.get(request.device)
        key = (request.device, request.region)
        if romd is None or key not in self.romd_enabled:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"no ROMD region {request.region!r} on a device named {request.device!r}")
        assert romd is not None
        dev = self.bus.device(request.device)
        size = next(s.size for s in dev.regions() if s.name == request.region)
        chunk = 1 << 20
        zero = bytes(chunk)
        for offset in range(0, size, chunk):
            data = romd.mirror_contents(request.region, offset, min(chunk, size - offset))
            if offset and data == zero[:len(data)]:
                continue  # the mirror starts zeroed: a flash is mostly empty, so send only what is not
            yield device_pb2.ReadMirrorResponse(offset=offset, data=data,
                                                mirror_enabled=self.romd_enabled[key] if offset == 0 else False)

    async def Describe(self, request: device_pb2.DescribeRequest,
                       context: grpc.aio.ServicerContext) -> device_pb2.DescribeResponse:
        resp = device_pb2.DescribeResponse(service_name=self.service_name, protocol_version=PROTOCOL_VERSION)
        for dev in self.bus.devices:
            d = resp.devices.add(name=dev.name, type=dev.type_name, compatible=list(dev.compatible),
                                 has_console=dev.name in self.consoles, properties=dev.describe())
            for spec in dev.regions():
                d.regions.add(
                    name=spec.name, base=dev.base + spec.offset, size=spec.size,
                    kind=device_pb2.REGION_KIND_ROMD if spec.kind is RegionKind.ROMD else device_pb2.REGION_KIND_MMIO,
                    posted=spec.posted, access_sizes=list(spec.access_sizes),
                    shadows=[device_pb2.ShadowWindow(offset=o, size=n)
                             for o, n in self.shadows.windows(dev.name, spec.name)],
                )
        return resp

    async def Reset(self, request: device_pb2.ResetRequest,
                    context: grpc.aio.ServicerContext) -> device_pb2.ResetResponse:
        self.bus.reset()
        for hub in self.consoles.values():
            hub.pump()  # input typed meanwhile goes into the emptied FIFO: a guest polling a shadow FR never exits
        self.shadows.refresh_all()  # watchers hear the reset values; the vcpu service takes a snapshot too
        return device_pb2.ResetResponse(mirror_updates=self._mirror_updates())

    async def WatchShadows(self, request: device_pb2.WatchShadowsRequest,
                           context: grpc.aio.ServicerContext) -> AsyncIterator[device_pb2.WatchShadowsResponse]:
        """Every shadow register now, then each change (all on this event loop, so none is missed)."""
        queue: asyncio.Queue[ShadowEvent] = asyncio.Queue()
        unsubscribe = self.shadows.subscribe(queue.put_nowait)
        log.debug("shadow registers watched by VM %s", request.vm_id)
        try:
            while True:
                event = await queue.get()
                if isinstance(event, ShadowFailure):
                    await context.abort(grpc.StatusCode.INTERNAL, f"shadow registers of {self.service_name} "
                                        f"stopped: {event.message}")
                    return
                yield device_pb2.WatchShadowsResponse(update=_shadow_update(event))
        finally:
            unsubscribe()

    def _access(self, address: int, length: int, is_write: bool, data: bytes) -> device_pb2.Completion:
        reply = dispatch(self.bus, address, length, is_write, data)
        if reply.region is not None:
            self._touched.add(reply.region.device)
            hub = self.consoles.get(reply.region.device.name)
            if hub is not None:
                hub.pump()
        return device_pb2.Completion(status=_STATUS[reply.outcome], data=reply.data, error=reply.error)

    def _apply_posted(self, batch: device_pb2.PostedWrites, completion: device_pb2.Completion) -> bool:
        try:
            writes = list(iter_posted(batch))
        except ValueError as exc:
            completion.status = device_pb2.COMPLETION_STATUS_BAD_REQUEST
            completion.error = f"malformed posted batch: {exc}"
            return False
        self.bus.stats.posted_batch(len(writes))
        errors, touched = dispatch_posted(self.bus, writes)
        for i, address, error in errors:
            completion.posted_errors.add(index=i, address=address, error=error)
        for device in touched:
            self._touched.add(device)
            hub = self.consoles.get(device.name)
            if hub is not None:
                hub.pump()
        return True

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
        self.bus.stats.stream_opened(context)
        yield device_pb2.ExitStreamResponse(
            seq=first.seq,
            welcome=device_pb2.StreamWelcome(protocol_version=PROTOCOL_VERSION, service_name=self.service_name))
        expected = first.seq + 1
        shadows_seen = 0  # the shadow generation this stream's vCPU has been sent up to
        async for req in requests:
            kind = req.WhichOneof("body")
            completion = device_pb2.Completion(status=device_pb2.COMPLETION_STATUS_OK)
            if req.seq != expected:
                completion.status = device_pb2.COMPLETION_STATUS_BAD_REQUEST
                completion.error = f"sequence number {req.seq} from {peer}, expected {expected}"
            elif kind == "exit":
                ex = req.exit
                if ex.HasField("posted") and not self._apply_posted(ex.posted, completion):
                    pass
                else:
                    c = self._access(ex.address, ex.length, ex.direction == device_pb2.ACCESS_DIRECTION_WRITE,
                                     ex.data)
                    completion.status, completion.data, completion.error = c.status, c.data, c.error
                    self.exits += 1
            elif kind == "flush":
                self._apply_posted(req.flush, completion)
            else:
                completion.status = device_pb2.COMPLETION_STATUS_BAD_REQUEST
                completion.error = f"unexpected {kind!r} from {peer} after the handshake"
            expected = req.seq + 1
            if self.romd:
                completion.mirror_updates.extend(self._mirror_updates())
            if self.shadows.active:
                # What this request changed, and anything else this vCPU has not been sent yet.
                self.shadows.refresh(self._touched)
                self._touched.clear()
                update = self.shadows.since(shadows_seen)
                if update is not None:
                    shadows_seen = update.generation
                    completion.shadow.CopyFrom(_shadow_update(update))
            yield device_pb2.ExitStreamResponse(seq=req.seq, completion=completion)

    def _feed(self, hub: ConsoleHub, model: DeviceModel, data: bytes) -> None:
        """Console input changes FR and the interrupt status: shadow watchers hear it at once (the model
        reports it too; this covers a model that does not)."""
        hub.feed(data)
        self.shadows.refresh((model,))

    async def Console(self, request_iterator: AsyncIterator[device_pb2.ConsoleRequest],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[device_pb2.ConsoleResponse]:
        requests = request_iterator.__aiter__()
        try:
            first = await requests.__anext__()
        except StopAsyncIteration:
            return
        hub = self.consoles.get(first.device)
        if hub is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"no UART named {first.device!r}; consoles: {', '.join(self.consoles) or 'none'}")
        assert hub is not None
        model = self.bus.device(hub.name)
        if first.input:
            self._feed(hub, model, first.input)
        queue = hub.attach()

        async def pump_input() -> None:
            async for req in requests:
                if req.input:
                    self._feed(hub, model, req.input)

        reader = asyncio.ensure_future(pump_input())
        try:
            while True:
                data = await queue.get()
                yield device_pb2.ConsoleResponse(output=data)
        finally:
            reader.cancel()
            hub.detach(queue)


async def serve_async(listen: str, bus: DeviceBus, service_name: str,
                      ready: Callable[[str], None] | None = None, console_log: str | None = None,
                      on_servicer: Callable[[DeviceServicer], None] | None = None, shadows: bool = True) -> None:
    address = parse_address(listen)
    server = grpc.aio.server(options=GRPC_OPTIONS)
    servicer = DeviceServicer(bus, service_name, console_log, shadows)
    if on_servicer is not None:  # e.g. the metrics collector, which reads the consoles
        on_servicer(servicer)
    device_pb2_grpc.add_DeviceServiceServicer_to_server(servicer, server)
    health_servicer = health_async.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(address.target)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready:
        ready(address.target if address.is_unix else f"{address.host}:{port}")
    await stop.wait()
    await server.stop(grace=1.0)


def serve(listen: str, bus: DeviceBus, service_name: str = "mmiosplit-devices",
          ready: Callable[[str], None] | None = None, console_log: str | None = None,
          on_servicer: Callable[[DeviceServicer], None] | None = None, shadows: bool = True) -> None:
    """Run the device service until SIGTERM or SIGINT; ``shadows`` False declares no shadow registers."""
    asyncio.run(serve_async(listen, bus, service_name, ready, console_log, on_servicer, shadows))
