"""How a vCPU reaches device models: the one small interface the exit path talks to.

``GrpcEndpoint`` is the product's transport (one bidirectional stream per vCPU per device service,
handshake first, a sequence number on every message). ``LocalEndpoint`` calls the same device models
inside the vcpu process: the floor every benchmark compares against, as KVM keeps a few devices in
the kernel. The exit path never knows which one it has.
"""

from __future__ import annotations

import collections
import enum
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from mmiosplit.address import parse_address
from mmiosplit.v1 import common_pb2, device_pb2, device_pb2_grpc
from mmiosplit.wire import GRPC_OPTIONS, PROTOCOL_VERSION
from vcpu_service.totals import POSTED_BATCH_SIZES

POSTED_BATCH_MAX = 1024
# Full batches a vCPU may have sent without reading their completions (backpressure beyond that).
POSTED_INFLIGHT = 2


class TransportError(Exception):
    """The device service cannot be reached or broke the protocol; the message names the service."""


class DeadlineExceeded(TransportError):
    """No completion arrived before the exit deadline."""


class AccessStatus(enum.Enum):
    OK = "ok"
    DEVICE_ERROR = "device error"
    NO_DEVICE = "no device"
    BAD_REQUEST = "bad request"


@dataclass(frozen=True, slots=True)
class RemoteRegion:
    """A region a device service owns, as its Describe reported it."""

    service: str
    device: str
    device_type: str
    name: str
    base: int
    size: int
    romd: bool
    posted: bool
    access_sizes: tuple[int, ...]
    has_console: bool
    compatible: tuple[str, ...] = ()
    #: Shadow registers, as (offset inside the region, size): reads of exactly these are answered from the
    #: VM's shadow table when it holds a value, without an exit.
    shadows: frozenset[tuple[int, int]] = frozenset()

    @property
    def end(self) -> int:
        return self.base + self.size


@dataclass(frozen=True, slots=True)
class MirrorChange:
    """A ROMD region switching mode and/or changing bytes, as a device service reported it."""

    service: str
    device: str
    region: str
    enabled: bool
    patches: tuple[tuple[int, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class ShadowChange:
    """New values of shadow registers from one device service, all current as of ``generation``; values are
    (device, region, offset inside the region, bytes as a read returns them)."""

    service: str
    generation: int
    values: tuple[tuple[str, str, int, bytes], ...]


def shadow_change(service: str, update: device_pb2.ShadowUpdate) -> ShadowChange:
    return ShadowChange(service, update.generation,
                        tuple((v.device, v.region, v.offset, bytes(v.data)) for v in update.values))


#: Where a transport hands every ShadowChange a completion carries, before the completion is returned, so
#: the VM's table is current before the vCPU runs on (whichever path the completion took: exit, flush, batch).
ShadowSink = Callable[[ShadowChange], None]


@dataclass(frozen=True, slots=True)
class AccessReply:
    status: AccessStatus
    data: bytes = b""
    error: str = ""
    posted_errors: tuple[str, ...] = ()
    mirror_changes: tuple[MirrorChange, ...] = ()
    shadow: ShadowChange | None = None


def mirror_changes(service: str, updates: Iterable[device_pb2.MirrorUpdate]) -> tuple[MirrorChange, ...]:
    return tuple(MirrorChange(service, u.device, u.region, u.mirror_enabled,
                              tuple((p.offset, bytes(p.data)) for p in u.patches)) for u in updates)


@dataclass(slots=True)
class MmioRequest:
    """One trapped access as the exit path hands it to a transport."""

    vcpu_id: int
    address: int
    region: RemoteRegion
    length: int
    is_write: bool
    data: bytes = b""
    syndrome: int = 0
    pc: int = 0
    instruction: int = 0


@dataclass(slots=True)
class _PostedQueue:
    addresses: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)

    def __len__(self) -> int:
        return len(self.addresses)

    def take(self) -> device_pb2.PostedWrites:
        POSTED_BATCH_SIZES.record(len(self.addresses))  # once per batch, for the metrics
        batch = device_pb2.PostedWrites(address=self.addresses, length=self.lengths, data=bytes(self.data))
        self.addresses, self.lengths, self.data = [], [], bytearray()
        return batch


class ExitChannel(Protocol):
    """One vCPU's path to one device service."""

    def access(self, request: MmioRequest) -> AccessReply: ...
    def post(self, address: int, data: bytes) -> AccessReply | None: ...
    def flush(self, wait: bool = True) -> AccessReply: ...
    def pending_posted(self) -> int: ...
    def broken(self) -> bool: ...
    def close(self) -> None: ...


class ShadowWatch(Protocol):
    """A device service's stream of shadow-register values: every current value first, then changes."""

    def next(self, timeout: float | None = None) -> ShadowChange | None:
        """The next update; None once cancelled. Raises TransportError when the stream breaks or, with
        ``timeout``, when nothing arrives in time."""
        ...

    def cancel(self) -> None: ...


class DeviceEndpoint(Protocol):
    """One device service (or the in-process models)."""

    name: str
    #: Set by the VM that uses this endpoint; channels call it with the shadow values of each completion.
    shadow_sink: ShadowSink | None

    def describe(self) -> list[RemoteRegion]: ...
    def watch_shadows(self, vm_id: str) -> ShadowWatch: ...
    def open_exit_channel(self, vm_id: str, vcpu_id: int, architecture: int) -> ExitChannel: ...
    def read_mirror(self, device: str, region: str) -> tuple[list[tuple[int, bytes]], bool]: ...
    def reset(self) -> tuple[MirrorChange, ...]: ...
    def close(self) -> None: ...


class _Watchdog:
    """One thread that cancels streams whose completion is overdue (a per-exit timer costs too much)."""

    def __init__(self) -> None:
        self._channels: set[GrpcExitChannel] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, channel: GrpcExitChannel) -> None:
        with self._lock:
            self._channels.add(channel)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="exit-deadline-watchdog", daemon=True)
                self._thread.start()

    def remove(self, channel: GrpcExitChannel) -> None:
        with self._lock:
            self._channels.discard(channel)

    def _run(self) -> None:
        while True:
            time.sleep(0.02)
            now = time.monotonic()
            with self._lock:
                channels = list(self._channels)
            for ch in channels:
                since = ch.waiting_since
                if since is not None and now - since > ch.deadline_s:
                    ch.expire()


_WATCHDOG = _Watchdog()


class GrpcExitChannel:
    """A synchronous bidi stream: put the request on the queue gRPC reads from, block on the reply.

    The vCPU thread stays synchronous on purpose: an asyncio hop costs about 60 us per exit
    (latency.md section 1).
    """

    def __init__(self, endpoint: GrpcEndpoint, vm_id: str, vcpu_id: int, architecture: int,
                 deadline_s: float) -> None:
        self._endpoint = endpoint
        self._name = endpoint.name
        self._requests: queue.SimpleQueue[device_pb2.ExitStreamRequest | None] = queue.SimpleQueue()
        self._seq = 0
        self._posted = _PostedQueue()
        # Posted-write flushes sent but not yet answered, and what answered ones reported meanwhile.
        self._inflight: collections.deque[int] = collections.deque()
        self._carried_errors: list[str] = []
        self._carried_changes: list[MirrorChange] = []
        self._closed = False
        self._expired = False
        self.deadline_s = deadline_s
        self.waiting_since: float | None = None
        self._call = endpoint.stub.ExitStream(iter(self._requests.get, None))
        hello = device_pb2.StreamHello(protocol_version=PROTOCOL_VERSION, vm_id=vm_id, vcpu_id=vcpu_id,
                                       architecture=common_pb2.Architecture.ValueType(architecture))
        _WATCHDOG.add(self)
        reply = self._round_trip(device_pb2.ExitStreamRequest(seq=0, hello=hello), what="handshake")
        if reply.WhichOneof("body") != "welcome":
            self.close()
            raise TransportError(f"device service {self._name}: expected a welcome to the handshake, "
                                 f"got {reply.WhichOneof('body')}")
        if reply.welcome.protocol_version != PROTOCOL_VERSION:
            self.close()
            raise TransportError(f"device service {self._name} speaks protocol {reply.welcome.protocol_version}, "
                                 f"this vcpu service speaks {PROTOCOL_VERSION}")

    def expire(self) -> None:
        self._expired = True
        self._call.cancel()

    def _round_trip(self, request: device_pb2.ExitStreamRequest, what: str) -> device_pb2.ExitStreamResponse:
        self._send(request)
        return self._receive(request.seq, what)

    def _send(self, request: device_pb2.ExitStreamRequest) -> None:
        if self._closed:
            raise TransportError(f"device service {self._name}: exit stream is closed")
        self._requests.put(request)

    def _receive(self, seq: int, what: str) -> device_pb2.ExitStreamResponse:
        self.waiting_since = time.monotonic()
        try:
            reply: device_pb2.ExitStreamResponse = next(self._call)
        except StopIteration:
            raise TransportError(f"device service {self._name} ended the exit stream during the {what}") from None
        except grpc.RpcError as exc:
            self._closed = True
            if self._expired:
                raise DeadlineExceeded(
                    f"device service {self._name}: no completion for the {what} within "
                    f"{self.deadline_s * 1000:.0f} ms"
                ) from None
            raise TransportError(
                f"device service {self._name}: exit stream failed during the {what}: "
                f"{exc.code().name}: {exc.details()}"
            ) from None
        finally:
            self.waiting_since = None
        if reply.seq != seq:
            self._closed = True
            raise TransportError(
                f"device service {self._name} answered sequence number {reply.seq} to request {seq} "
                f"({what}); the stream is out of step and was closed"
            )
        return reply

    def _drain(self, keep: int) -> None:
        """Read the completions of posted-write flushes sent earlier until at most ``keep`` are unanswered;
        what they report (failed writes, mirror changes) rides on the next reply the vCPU sees."""
        while len(self._inflight) > keep:
            seq = self._inflight.popleft()
            done = self._completion(self._receive(seq, "posted-write flush"), None)
            self._carried_errors += done.posted_errors
            self._carried_changes += done.mirror_changes

    def _with_carried(self, reply: AccessReply) -> AccessReply:
        if not (self._carried_errors or self._carried_changes):
            return reply
        merged = AccessReply(reply.status, reply.data, reply.error,
                             (*self._carried_errors, *reply.posted_errors),
                             (*self._carried_changes, *reply.mirror_changes), reply.shadow)
        self._carried_errors, self._carried_changes = [], []
        return merged

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def access(self, request: MmioRequest) -> AccessReply:
        region = request.region
        exit_msg = device_pb2.MmioExit(
            vcpu_id=request.vcpu_id, address=request.address, region_offset=request.address - region.base,
            device=region.device, region=region.name, length=request.length,
            direction=device_pb2.ACCESS_DIRECTION_WRITE if request.is_write else device_pb2.ACCESS_DIRECTION_READ,
            data=request.data, syndrome=request.syndrome, pc=request.pc, instruction=request.instruction,
        )
        if len(self._posted):
            exit_msg.posted.CopyFrom(self._posted.take())
        seq = self._next_seq()
        self._send(device_pb2.ExitStreamRequest(seq=seq, exit=exit_msg))
        self._drain(0)  # flushes sent earlier are answered first, in order
        reply = self._receive(seq, f"access at 0x{request.address:x}")
        return self._with_carried(self._completion(reply, request))

    def _completion(self, reply: device_pb2.ExitStreamResponse, request: MmioRequest | None) -> AccessReply:
        if reply.WhichOneof("body") != "completion":
            self._closed = True
            raise TransportError(f"device service {self._name} sent {reply.WhichOneof('body')!r} "
                                 "where a completion was due")
        c = reply.completion
        status = _STATUS.get(c.status)
        if status is None:
            raise TransportError(f"device service {self._name} sent completion status {c.status}, "
                                 "which is not a known CompletionStatus")
        posted_errors = tuple(f"posted write to 0x{e.address:x}: {e.error}" for e in c.posted_errors)
        if (request is not None and status is AccessStatus.OK and not request.is_write
                and len(c.data) != request.length):
            raise TransportError(
                f"device service {self._name} completed a {request.length}-byte read of "
                f"{request.region.device} at 0x{request.address:x} with {len(c.data)} bytes"
            )
        shadow = None
        if c.HasField("shadow"):
            shadow = shadow_change(self._name, c.shadow)
            sink = self._endpoint.shadow_sink
            if sink is not None:
                sink(shadow)  # raises TransportError naming a value the device service had no right to send
        return AccessReply(status, bytes(c.data), c.error, posted_errors,
                           mirror_changes(self._name, c.mirror_updates), shadow)

    def post(self, address: int, data: bytes) -> AccessReply | None:
        """Queue a posted write. A full batch is sent without waiting for its completion (at most
        ``POSTED_INFLIGHT`` unanswered); what earlier batches reported is returned when there is any."""
        posted = self._posted
        posted.addresses.append(address)
        posted.lengths.append(len(data))
        posted.data += data
        if len(posted) < POSTED_BATCH_MAX:
            return None
        self._send_flush()
        self._drain(POSTED_INFLIGHT)
        if self._carried_errors or self._carried_changes:
            return self._with_carried(AccessReply(AccessStatus.OK))
        return None

    def _send_flush(self) -> None:
        seq = self._next_seq()
        self._send(device_pb2.ExitStreamRequest(seq=seq, flush=self._posted.take()))
        self._inflight.append(seq)

    def pending_posted(self) -> int:
        return len(self._posted)

    def broken(self) -> bool:
        """The stream failed (deadline, protocol error, lost service) and must be reopened."""
        return self._closed

    def flush(self, wait: bool = True) -> AccessReply:
        """Send the queued posted writes; with ``wait``, also read every outstanding completion so that
        all of them have reached the device (halt, pause, stop, reset) and their errors are known."""
        if len(self._posted):
            self._send_flush()
        self._drain(0 if wait else POSTED_INFLIGHT)
        return self._with_carried(AccessReply(AccessStatus.OK))

    def close(self) -> None:
        _WATCHDOG.remove(self)
        if not self._closed:
            self._closed = True
            self._requests.put(None)
        self._call.cancel()


_STATUS = {
    device_pb2.COMPLETION_STATUS_OK: AccessStatus.OK,
    device_pb2.COMPLETION_STATUS_DEVICE_ERROR: AccessStatus.DEVICE_ERROR,
    device_pb2.COMPLETION_STATUS_NO_DEVICE: AccessStatus.NO_DEVICE,
    device_pb2.COMPLETION_STATUS_BAD_REQUEST: AccessStatus.BAD_REQUEST,
}


class GrpcEndpoint:
    """A device service reached over gRPC at ``unix:PATH`` or ``HOST:PORT``."""

    def __init__(self, address: str, connect_timeout_s: float = 5.0, deadline_s: float = 5.0) -> None:
        self.name = address
        self._target = parse_address(address).target
        self._connect_timeout_s = connect_timeout_s
        self._deadline_s = deadline_s
        self.shadow_sink: ShadowSink | None = None
        self.channel = grpc.insecure_channel(self._target, options=GRPC_OPTIONS)
        self.stub = device_pb2_grpc.DeviceServiceStub(self.channel)
        try:
            grpc.channel_ready_future(self.channel).result(timeout=connect_timeout_s)
        except grpc.FutureTimeoutError:
            self.channel.close()
            raise TransportError(
                f"device service {address} is not reachable (no connection within {connect_timeout_s:g} s)"
            ) from None

    def describe(self) -> list[RemoteRegion]:
        try:
            resp: device_pb2.DescribeResponse = self.stub.Describe(
                device_pb2.DescribeRequest(), timeout=self._connect_timeout_s
            )
        except grpc.RpcError as exc:
            raise TransportError(f"device service {self.name}: Describe failed: {exc.code().name}: "
                                 f"{exc.details()}") from None
        if resp.protocol_version != PROTOCOL_VERSION:
            raise TransportError(f"device service {self.name} speaks protocol {resp.protocol_version}, "
                                 f"this vcpu service speaks {PROTOCOL_VERSION}")
        regions = []
        for dev in resp.devices:
            for r in dev.regions:
                if r.size == 0:
                    raise TransportError(f"device service {self.name}: device {dev.name} region {r.name} "
                                         "has size 0")
                access_sizes = tuple(r.access_sizes) or (1, 2, 4, 8)
                regions.append(RemoteRegion(
                    service=self.name, device=dev.name, device_type=dev.type, name=r.name, base=r.base,
                    size=r.size, romd=r.kind == device_pb2.REGION_KIND_ROMD, posted=r.posted,
                    access_sizes=access_sizes, has_console=dev.has_console,
                    compatible=tuple(dev.compatible),
                    shadows=shadow_windows(self.name, dev.name, r.name, r.size, access_sizes,
                                           [(w.offset, w.size) for w in r.shadows]),
                ))
        return regions

    def watch_shadows(self, vm_id: str) -> ShadowWatch:
        return GrpcShadowWatch(self, vm_id)

    def open_exit_channel(self, vm_id: str, vcpu_id: int, architecture: int) -> ExitChannel:
        return GrpcExitChannel(self, vm_id, vcpu_id, architecture, self._deadline_s)

    def read_mirror(self, device: str, region: str) -> tuple[list[tuple[int, bytes]], bool]:
        """The non-zero chunks of a ROMD region as (offset, bytes), and whether reads may be served now."""
        chunks: list[tuple[int, bytes]] = []
        enabled = False
        end = 0
        try:
            for chunk in self.stub.ReadMirror(device_pb2.ReadMirrorRequest(device=device, region=region),
                                              timeout=max(60.0, self._deadline_s)):
                if chunk.offset < end or (not chunks and chunk.offset != 0):
                    raise TransportError(f"device service {self.name}: mirror of {device}/{region} arrived out of "
                                         f"order (chunk at {chunk.offset} after {end})")
                if chunk.offset == 0:
                    enabled = chunk.mirror_enabled
                chunks.append((chunk.offset, bytes(chunk.data)))
                end = chunk.offset + len(chunk.data)
        except grpc.RpcError as exc:
            raise TransportError(f"device service {self.name}: ReadMirror {device}/{region} failed: "
                                 f"{exc.code().name}: {exc.details()}") from None
        return chunks, enabled

    def reset(self) -> tuple[MirrorChange, ...]:
        try:
            resp = self.stub.Reset(device_pb2.ResetRequest(), timeout=self._deadline_s)
        except grpc.RpcError as exc:
            raise TransportError(f"device service {self.name}: Reset failed: {exc.code().name}: "
                                 f"{exc.details()}") from None
        return mirror_changes(self.name, resp.mirror_updates)

    def close(self) -> None:
        self.channel.close()


def shadow_windows(service: str, device: str, region: str, size: int, access_sizes: tuple[int, ...],
                   windows: Iterable[tuple[int, int]]) -> frozenset[tuple[int, int]]:
    """Check the shadow registers a Describe declared: each inside its region, of a size the region takes,
    none overlapping another. A bad one is refused by name, before any VM trusts it."""
    out: set[tuple[int, int]] = set()
    taken_until = 0
    for offset, length in sorted(windows):
        where = (f"device service {service}: {device}/{region} declares a shadow register at +0x{offset:x} "
                 f"({length} bytes)")
        if length not in access_sizes:
            raise TransportError(f"{where}, but the region takes {'/'.join(map(str, access_sizes))}-byte accesses")
        if offset + length > size:
            raise TransportError(f"{where}, past the end of the region (0x{size:x} bytes)")
        if offset < taken_until:
            raise TransportError(f"{where}, overlapping another one")
        taken_until = offset + length
        out.add((offset, length))
    return frozenset(out)


class GrpcShadowWatch:
    """The WatchShadows stream of one device service, read by one thread of the VM."""

    def __init__(self, endpoint: GrpcEndpoint, vm_id: str) -> None:
        self._name = endpoint.name
        self._cancelled = False
        self._call = endpoint.stub.WatchShadows(device_pb2.WatchShadowsRequest(vm_id=vm_id))

    def next(self, timeout: float | None = None) -> ShadowChange | None:
        expired = threading.Event()
        timer = None
        if timeout is not None:
            def expire() -> None:
                expired.set()
                self._call.cancel()

            timer = threading.Timer(timeout, expire)
            timer.daemon = True
            timer.start()
        try:
            update: device_pb2.ShadowUpdate = next(self._call).update
        except StopIteration:
            if self._cancelled:
                return None
            raise TransportError(f"device service {self._name} ended its shadow-register stream") from None
        except grpc.RpcError as exc:
            if expired.is_set():
                raise TransportError(f"device service {self._name} sent no shadow registers within "
                                     f"{timeout:g} s") from None
            if self._cancelled:
                return None
            raise TransportError(f"device service {self._name}: shadow-register stream failed: "
                                 f"{exc.code().name}: {exc.details()}") from None
        finally:
            if timer is not None:
                timer.cancel()
        if expired.is_set():  # the timer went off just as the update arrived: the call is cancelled now
            raise TransportError(f"device service {self._name} sent no shadow registers within {timeout:g} s")
        return shadow_change(self._name, update)

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()


def architecture_enum(name: str) -> int:
    return {"aarch64": common_pb2.ARCHITECTURE_AARCH64, "arm": common_pb2.ARCHITECTURE_ARM}[name]
