"""How a vCPU reaches device models: the one small interface the exit path talks to.

``GrpcEndpoint`` is the product's transport (one bidirectional stream per vCPU per device service,
handshake first, a sequence number on every message). ``LocalEndpoint`` calls the same device models
inside the vcpu process: the floor every benchmark compares against, as KVM keeps a few devices in
the kernel. The exit path never knows which one it has.
"""

from __future__ import annotations

import enum
import queue
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from mmiosplit.address import parse_address
from mmiosplit.v1 import common_pb2, device_pb2, device_pb2_grpc
from mmiosplit.wire import GRPC_OPTIONS, PROTOCOL_VERSION

POSTED_BATCH_MAX = 256


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
class AccessReply:
    status: AccessStatus
    data: bytes = b""
    error: str = ""
    posted_errors: tuple[str, ...] = ()
    mirror_changes: tuple[MirrorChange, ...] = ()


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
        batch = device_pb2.PostedWrites(address=self.addresses, length=self.lengths, data=bytes(self.data))
        self.addresses, self.lengths, self.data = [], [], bytearray()
        return batch


class ExitChannel(Protocol):
    """One vCPU's path to one device service."""

    def access(self, request: MmioRequest) -> AccessReply: ...
    def post(self, address: int, data: bytes) -> AccessReply | None: ...
    def flush(self) -> AccessReply: ...
    def pending_posted(self) -> int: ...
    def broken(self) -> bool: ...
    def close(self) -> None: ...


class DeviceEndpoint(Protocol):
    """One device service (or the in-process models)."""

    name: str

    def describe(self) -> list[RemoteRegion]: ...
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
        if self._closed:
            raise TransportError(f"device service {self._name}: exit stream is closed")
        self.waiting_since = time.monotonic()
        self._requests.put(request)
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
        if reply.seq != request.seq:
            self._closed = True
            raise TransportError(
                f"device service {self._name} answered sequence number {reply.seq} to request {request.seq} "
                f"({what}); the stream is out of step and was closed"
            )
        return reply

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
        reply = self._round_trip(device_pb2.ExitStreamRequest(seq=self._next_seq(), exit=exit_msg),
                                 what=f"access at 0x{request.address:x}")
        return self._completion(reply, request)

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
        return AccessReply(status, bytes(c.data), c.error, posted_errors,
                           mirror_changes(self._name, c.mirror_updates))

    def post(self, address: int, data: bytes) -> AccessReply | None:
        """Queue a posted write; when the batch is full it is sent and its reply returned."""
        self._posted.addresses.append(address)
        self._posted.lengths.append(len(data))
        self._posted.data += data
        if len(self._posted) >= POSTED_BATCH_MAX:
            return self.flush()
        return None

    def pending_posted(self) -> int:
        return len(self._posted)

    def broken(self) -> bool:
        """The stream failed (deadline, protocol error, lost service) and must be reopened."""
        return self._closed

    def flush(self) -> AccessReply:
        if not len(self._posted):
            return AccessReply(AccessStatus.OK)
        reply = self._round_trip(device_pb2.ExitStreamRequest(seq=self._next_seq(), flush=self._posted.take()),
                                 what="posted-write flush")
        return self._completion(reply, None)

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
                regions.append(RemoteRegion(
                    service=self.name, device=dev.name, device_type=dev.type, name=r.name, base=r.base,
                    size=r.size, romd=r.kind == device_pb2.REGION_KIND_ROMD, posted=r.posted,
                    access_sizes=tuple(r.access_sizes) or (1, 2, 4, 8), has_console=dev.has_console,
                    compatible=tuple(dev.compatible),
                ))
        return regions

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


def architecture_enum(name: str) -> int:
    return {"aarch64": common_pb2.ARCHITECTURE_AARCH64, "arm": common_pb2.ARCHITECTURE_ARM}[name]
