"""The gRPC transport: how a vCPU reaches a device service over ``mmiosplit.v1`` (one bidirectional stream per
vCPU per device service, handshake first, a sequence number on every message).

This is the vCPU side's only gRPC adapter for devices: protobufs enter and leave here, converted once to the
plain types of ``mmiosplit.mmio`` (``to_wire_exit``, ``completion_from_wire``, ``GrpcEndpoint.describe``). The
in-process transport, ``device_service.local``, implements the same protocols without any of this.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any

import grpc

from mmiosplit import security
from mmiosplit.address import parse_address
from mmiosplit.buckets import POSTED_BATCH_BOUNDS, FixedHistogram
from mmiosplit.mmio import (
    POSTED_INFLIGHT,
    Completion,
    CompletionStatus,
    DeadlineExceeded,
    DeviceRestarted,
    DmaError,
    DmaTarget,
    ExitChannel,
    GoingAway,
    LineChange,
    MirrorChange,
    MmioExit,
    PostedError,
    PostedQueue,
    RemoteLine,
    RemoteRegion,
    ServiceLost,
    ServiceWatch,
    ShadowChange,
    TransportError,
    WatchEvent,
    check_shadow_windows,
    clock_id,
)
from mmiosplit.v1 import common_pb2, device_pb2, device_pb2_grpc
from mmiosplit.wire import FEATURE_CANCEL, FEATURE_SESSIONS, PROTOCOL_VERSION

# Writes per posted batch sent by any vCPU of this process, for the metrics (recorded once per batch).
POSTED_BATCH_SIZES = FixedHistogram(POSTED_BATCH_BOUNDS)

_ARCHITECTURE = {"aarch64": common_pb2.ARCHITECTURE_AARCH64, "arm": common_pb2.ARCHITECTURE_ARM}
_STATUS = {
    device_pb2.COMPLETION_STATUS_OK: CompletionStatus.OK,
    device_pb2.COMPLETION_STATUS_DEVICE_ERROR: CompletionStatus.DEVICE_ERROR,
    device_pb2.COMPLETION_STATUS_NO_DEVICE: CompletionStatus.NO_DEVICE,
    device_pb2.COMPLETION_STATUS_BAD_REQUEST: CompletionStatus.BAD_REQUEST,
    device_pb2.COMPLETION_STATUS_CANCELLED: CompletionStatus.CANCELLED,
}


def shadow_change(service: str, update: device_pb2.ShadowUpdate) -> ShadowChange:
    return ShadowChange(service, update.generation,
                        tuple((v.device, v.region, v.offset, bytes(v.data)) for v in update.values))


def line_change(service: str, update: device_pb2.LineUpdate, same_clock: bool = False) -> LineChange:
    """``same_clock``: the service shares this process's CLOCK_MONOTONIC, so its ``raised_ns`` is kept; else the
    change is stamped on arrival (interrupt latency then starts here)."""
    stamp = update.raised_ns if same_clock and update.raised_ns else time.monotonic_ns()
    return LineChange(service, update.generation, tuple((v.device, v.index, v.level) for v in update.levels), stamp)


_TRIGGER = {device_pb2.LINE_TRIGGER_LEVEL: "level", device_pb2.LINE_TRIGGER_EDGE: "edge",
            device_pb2.LINE_TRIGGER_UNSPECIFIED: "level"}


def mirror_changes(service: str, updates: Iterable[device_pb2.MirrorUpdate]) -> tuple[MirrorChange, ...]:
    return tuple(MirrorChange(service, u.device, u.region, u.mirror_enabled,
                              tuple((p.offset, bytes(p.data)) for p in u.patches)) for u in updates)


def to_wire_exit(exit: MmioExit, seq: int, templates: dict[tuple[str, str], device_pb2.MmioExit]) -> (
        device_pb2.ExitStreamRequest):
    """The request carrying ``exit``, filled in place: building an MmioExit and then the request copies it, and
    the fields a region never changes (vCPU, device, region names) come from a per-region ``templates`` entry."""
    request = device_pb2.ExitStreamRequest(seq=seq)
    message = request.exit
    template = templates.get((exit.device, exit.region))
    if template is None:
        template = templates[exit.device, exit.region] = device_pb2.MmioExit(
            vcpu_id=exit.vcpu_id, device=exit.device, region=exit.region)
    message.CopyFrom(template)
    message.address = exit.address
    message.region_offset = exit.region_offset
    message.length = exit.length
    if exit.is_write:
        message.direction = _WRITE
        message.data = exit.data
    else:
        message.direction = _READ
    message.syndrome = exit.syndrome
    message.pc = exit.pc
    message.instruction = exit.instruction
    return request


_WRITE = device_pb2.ACCESS_DIRECTION_WRITE
_READ = device_pb2.ACCESS_DIRECTION_READ


def completion_from_wire(service: str, c: device_pb2.Completion, same_clock: bool = False) -> Completion:
    """A wire completion as the exit path sees it; TransportError for a status this side does not know."""
    status = _STATUS.get(c.status)
    if status is None:
        raise TransportError(f"device service {service} sent completion status {c.status}, "
                             "which is not a known CompletionStatus")
    if not (c.posted_errors or c.mirror_updates or c.HasField("shadow") or c.HasField("lines")):
        return Completion(status, c.data, c.error)  # the usual answer: nothing besides the access
    return Completion(
        status, bytes(c.data), c.error,
        tuple(PostedError(e.index, e.address, e.error) for e in c.posted_errors),
        mirror_changes(service, c.mirror_updates),
        (shadow_change(service, c.shadow),) if c.HasField("shadow") else (),
        (line_change(service, c.lines, same_clock),) if c.HasField("lines") else (),
    )


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
                until = ch.wait_until
                if until is not None and now > until:
                    ch.expire()


_WATCHDOG = _Watchdog()


def _what(what: str | int) -> str:
    return f"access at 0x{what:x}" if isinstance(what, int) else what


#: gRPC codes after which a broken exit stream is resumed: the connection or the stream failed, not the request.
_RESUMABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
                        grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED})
#: First and longest wait between attempts to resume a broken exit stream (within the exit deadline).
RESUME_BACKOFF_S = (0.005, 0.2)
#: How long an exit whose deadline passed waits for the answer to its Cancel before its stream is abandoned.
CANCEL_GRACE_S = 0.5


class GrpcExitChannel:
    """One vCPU's session with a device service, over one synchronous bidi stream at a time: put the request on
    the queue gRPC reads from, block on the reply.

    The vCPU thread stays synchronous on purpose: an asyncio hop costs about 60 us per exit
    (latency.md section 1).

    Exactly once: requests are numbered per session and kept until their response arrives. When the stream
    breaks, a new one resumes the session (with backoff, within the exit deadline) and the unanswered requests
    are sent again with their numbers; the service answers one it already applied from memory. A service that
    answers with another instance id restarted: ``DeviceRestarted``.
    """

    def __init__(self, endpoint: GrpcEndpoint, vm_id: str, vcpu_id: int, architecture: str,
                 deadline_s: float) -> None:
        self._name = endpoint.name
        self._endpoint = endpoint
        self._requests: queue.SimpleQueue[device_pb2.ExitStreamRequest | None] = queue.SimpleQueue()
        self._seq = 0
        self._session_id = uuid.uuid4().hex
        self._acked = 0  # the highest seq whose response arrived
        self._unacked: dict[int, device_pb2.ExitStreamRequest] = {}
        self._hello = device_pb2.StreamHello(protocol_version=PROTOCOL_VERSION, vm_id=vm_id, vcpu_id=vcpu_id,
                                             architecture=_ARCHITECTURE[architecture], session_id=self._session_id)
        #: The service's instance this session began with (Describe's, else the first welcome's).
        self.instance_id = endpoint.instance_id
        #: Streams resumed after a break, and responses dropped because they came twice (for tests and metrics).
        self.resumes = 0
        self.duplicates = 0
        self._posted = PostedQueue()
        # Posted-write flushes sent but not yet answered, and the completions of answered ones whose side
        # effects have not reached the vCPU yet (they ride on the next completion it sees).
        self._inflight: collections.deque[int] = collections.deque()
        self._carried: list[Completion] = []
        self._templates: dict[tuple[str, str], device_pb2.MmioExit] = {}  # (device, region) -> fixed fields
        self._closed = False
        self._expired = False
        self.deadline_s = deadline_s
        self.waiting_since: float | None = None
        #: When the current wait runs out (the watchdog then cancels the access, and later the stream).
        self.wait_until: float | None = None
        self._wait_s = deadline_s
        self._waiting_seq = 0
        self._cancellable = 0  # the exit whose completion is awaited: it may be cancelled, a flush may not
        self._cancel_sent = 0
        self._features: frozenset[str] = frozenset()  # the welcome's
        self._resuming = False  # a broken stream is being replaced: an expiry then ends the attempt, no Cancel
        self._call = self._open_call()
        _WATCHDOG.add(self)
        reply = self._round_trip(device_pb2.ExitStreamRequest(seq=0, hello=self._hello), what="handshake")
        self._welcome(reply)

    def _open_call(self) -> Any:
        """A new ExitStream fed from a new request queue (the old queue, if any, is the caller's to close); the
        call is both the responses' iterator and what cancels the stream (the generated stub is untyped)."""
        self._requests = queue.SimpleQueue()
        return self._endpoint.stub.ExitStream(iter(self._requests.get, None))

    def _welcome(self, reply: device_pb2.ExitStreamResponse) -> bool:
        """Check the answer to a handshake; whether the service resumed the session."""
        if reply.WhichOneof("body") != "welcome":
            self.close()
            raise TransportError(f"device service {self._name}: expected a welcome to the handshake, "
                                 f"got {reply.WhichOneof('body')}")
        welcome = reply.welcome
        if welcome.protocol_version != PROTOCOL_VERSION:
            self.close()
            raise TransportError(f"device service {self._name} speaks protocol {welcome.protocol_version}, "
                                 f"this vcpu service speaks {PROTOCOL_VERSION}")
        if self.instance_id and welcome.instance_id and welcome.instance_id != self.instance_id:
            self.close()
            raise DeviceRestarted(
                f"device service {self._name} restarted (instance {self.instance_id[:8]} is now "
                f"{welcome.instance_id[:8]}): the state of its devices is gone", self._name, self.instance_id,
                welcome.instance_id)
        self.instance_id = self.instance_id or welcome.instance_id
        self._features = frozenset(welcome.features)
        return welcome.resumed

    def expire(self) -> None:
        """The watchdog's thread: the wait ran out. An exit's first expiry sends a Cancel for it on the stream
        and waits CANCEL_GRACE_S more for its answer (CANCELLED: never performed; a completion: performed late);
        any other expiry ends the stream, and whether the request was performed is unknown."""
        seq = self._waiting_seq
        if (seq and seq == self._cancellable and self._cancel_sent != seq and not self._closed
                and not self._resuming and FEATURE_CANCEL in self._features):
            self._cancel_sent = seq
            self.wait_until = time.monotonic() + CANCEL_GRACE_S
            self._requests.put(device_pb2.ExitStreamRequest(seq=seq, cancel=device_pb2.Cancel()))
            return
        self._expired = True
        self._call.cancel()

    def _resume(self, what: str | int, failure: str) -> None:
        """The stream broke while waiting for the response to the ``what``: open another one on the same session,
        within the exit deadline, and send the unanswered requests again. Raises TransportError (the access's
        fate unknown) when it cannot, DeviceRestarted when the service came back as another instance."""
        self._resuming = True
        try:
            self._resume_within(what, failure)
        finally:
            self._resuming = False

    def _resume_within(self, what: str | int, failure: str) -> None:
        started = self.waiting_since or time.monotonic()
        give_up = started + self._wait_s
        delay, longest = RESUME_BACKOFF_S
        last = failure
        while True:
            # The deadline watchdog cancels an attempt that hangs (a connection to an address that vanished).
            if self._expired or self._endpoint.leaving is not None or time.monotonic() >= give_up:
                self._closed = True
                raise ServiceLost(
                    f"device service {self._name}: exit stream failed during the {_what(what)} ({failure}) and "
                    f"could not be resumed within {self._wait_s * 1000:.0f} ms ({last}): whether the device "
                    "performed it is unknown")
            self._requests.put(None)
            self._call.cancel()
            self._call = self._open_call()
            hello = device_pb2.StreamHello()
            hello.CopyFrom(self._hello)
            hello.last_acked = self._acked
            self._requests.put(device_pb2.ExitStreamRequest(seq=0, hello=hello))
            try:
                reply = next(self._call)
            except (grpc.RpcError, StopIteration) as exc:
                last = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else "stream ended"
                time.sleep(max(0.0, min(delay, give_up - time.monotonic())))
                delay = min(delay * 2, longest)
                continue
            if not self._welcome(reply):
                self._closed = True
                raise ServiceLost(
                    f"device service {self._name} no longer knows this vCPU's session after the stream broke during "
                    f"the {_what(what)} ({failure}): whether the device performed it is unknown")
            self.resumes += 1
            for seq in sorted(self._unacked):
                request = self._unacked[seq]
                request.ack = self._acked
                self._requests.put(request)
            return

    def _round_trip(self, request: device_pb2.ExitStreamRequest, what: str) -> device_pb2.ExitStreamResponse:
        self._send(request)
        return self._receive(request.seq, what)

    def _send(self, request: device_pb2.ExitStreamRequest) -> None:
        if self._closed:
            raise TransportError(f"device service {self._name}: exit stream is closed")
        if request.seq:
            request.ack = self._acked
            self._unacked[request.seq] = request
        self._requests.put(request)

    def _receive(self, seq: int, what: str | int, wait_s: float = 0.0) -> device_pb2.ExitStreamResponse:
        """The response to request ``seq``, waiting at most ``wait_s`` (default: the channel's deadline); ``what``
        names it in errors (an int: the address of an access, formatted only if something goes wrong)."""
        now = time.monotonic()
        self._wait_s = wait_s or self.deadline_s
        self._waiting_seq = seq
        self.waiting_since = now
        self.wait_until = now + self._wait_s
        try:
            while True:
                try:
                    reply: device_pb2.ExitStreamResponse = next(self._call)
                    if reply.seq <= self._acked < seq:
                        # A response that came twice (a repeat answered from memory, or a duplicated message):
                        # this request was completed once already, so the copy is dropped.
                        self.duplicates += 1
                        continue
                    break
                except StopIteration:
                    self._closed = True
                    ended = f"device service {self._name} ended the exit stream during the {_what(what)}"
                    raise TransportError(self._gone(what) or ended) from None
                except grpc.RpcError as exc:
                    gone = self._gone(what, f"{exc.code().name}: {exc.details()}")
                    if gone:
                        self._closed = True
                        raise TransportError(gone) from None
                    if self._expired:
                        self._closed = True
                        cancel = (f"; its cancel was not answered within {CANCEL_GRACE_S * 1000:.0f} ms either"
                                  if self._cancel_sent == seq else
                                  f" (the service takes no Cancel: its welcome lists no '{FEATURE_CANCEL}' feature)"
                                  if FEATURE_CANCEL not in self._features else "")
                        raise DeadlineExceeded(
                            f"device service {self._name}: no completion for the {_what(what)} within "
                            f"{self._wait_s * 1000:.0f} ms{cancel}: whether the device performed it is unknown"
                        ) from None
                    if seq == 0 or self._closed or exc.code() not in _RESUMABLE:
                        self._closed = True
                        raise TransportError(
                            f"device service {self._name}: exit stream failed during the {_what(what)}: "
                            f"{exc.code().name}: {exc.details()}"
                        ) from None
                    if FEATURE_SESSIONS not in self._features:
                        self._closed = True
                        raise ServiceLost(
                            f"device service {self._name}: exit stream failed during the {_what(what)} "
                            f"({exc.code().name}: {exc.details()}), and the service keeps no sessions (its welcome "
                            f"lists no '{FEATURE_SESSIONS}' feature), so it cannot be resumed: whether the device "
                            "performed it is unknown") from None
                    self._resume(what, f"{exc.code().name}: {exc.details()}")
        finally:
            self.waiting_since = self.wait_until = None
            self._waiting_seq = 0
        if reply.seq != seq:
            self._closed = True
            raise TransportError(
                f"device service {self._name} answered sequence number {reply.seq} to request {seq} "
                f"({_what(what)}); the stream is out of step and was closed"
            )
        if seq:
            self._acked = seq  # responses come in order
            self._unacked.pop(seq, None)
        return reply

    def _gone(self, what: str | int, how: str = "it ended the stream") -> str | None:
        """Why the stream ended, when its service said it was going away (None otherwise)."""
        leaving = self._endpoint.leaving
        if leaving is None:
            return None
        return (f"device service {self._name} went away during the {_what(what)} ({leaving.reason}; "
                f"{how}): whether the device performed it is unknown")

    def _completion(self, reply: device_pb2.ExitStreamResponse) -> Completion:
        if reply.WhichOneof("body") != "completion":
            self._closed = True
            raise TransportError(f"device service {self._name} sent {reply.WhichOneof('body')!r} "
                                 "where a completion was due")
        return completion_from_wire(self._name, reply.completion, self._endpoint.same_clock)

    def _drain(self, keep: int) -> None:
        """Read the completions of posted-write flushes sent earlier until at most ``keep`` are unanswered;
        what they report (failed writes, mirror changes, shadow values) rides on the next completion."""
        while len(self._inflight) > keep:
            seq = self._inflight.popleft()
            self._carried.append(self._completion(self._receive(seq, "posted-write flush")))

    def _with_carried(self, completion: Completion) -> Completion:
        if not self._carried:
            return completion
        carried, self._carried = self._carried, []
        return completion.merged_after(carried)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def access(self, exit: MmioExit) -> Completion:
        leaving = self._endpoint.leaving
        if leaving is not None:  # it completes what it has, but takes nothing new
            raise TransportError(f"device service {self._name} has gone away ({leaving.reason}): the "
                                 f"{exit.length}-byte {'write' if exit.is_write else 'read'} was not sent")
        seq = self._next_seq()
        request = to_wire_exit(exit, seq, self._templates)
        wait_s = exit.deadline_ms / 1000 if exit.deadline_ms else self.deadline_s
        request.exit.deadline_ms = round(wait_s * 1000)
        if len(self._posted):
            request.exit.posted.CopyFrom(self._take_posted())
        self._send(request)
        if self._inflight:
            self._drain(0)  # flushes sent earlier are answered first, in order
        self._cancellable = seq
        sent = time.monotonic()
        try:
            completion = self._completion(self._receive(seq, exit.address, wait_s))
        finally:
            self._cancellable = 0
        if self._cancel_sent == seq:
            self._cancel_sent = 0
            if completion.has_effects:  # what rode on it (posted-write errors, shadows, lines) is not lost
                self._carried.append(completion)
            what = f"{exit.length}-byte {'write' if exit.is_write else 'read'} of {exit.device} at 0x{exit.address:x}"
            if completion.status is CompletionStatus.CANCELLED:
                raise DeadlineExceeded(f"device service {self._name}: no completion for the {what} within "
                                       f"{wait_s * 1000:.0f} ms; cancelled before the device started it: never "
                                       "performed", performed=False)
            raise DeadlineExceeded(f"device service {self._name}: the {what} completed "
                                   f"{(time.monotonic() - sent) * 1000:.0f} ms after it was sent, past its "
                                   f"{wait_s * 1000:.0f} ms deadline: performed late ({completion.status.value})",
                                   performed=True)
        if completion.status is CompletionStatus.OK and not exit.is_write and len(completion.data) != exit.length:
            raise TransportError(
                f"device service {self._name} completed a {exit.length}-byte read of "
                f"{exit.device} at 0x{exit.address:x} with {len(completion.data)} bytes"
            )
        return self._with_carried(completion)

    def _take_posted(self) -> device_pb2.PostedWrites:
        addresses, lengths, data = self._posted.take()
        POSTED_BATCH_SIZES.record(len(addresses))  # once per batch, for the metrics
        return device_pb2.PostedWrites(address=addresses, length=lengths, data=data)

    def post(self, address: int, data: bytes) -> Completion | None:
        """Queue a posted write. A full batch is sent without waiting for its completion (at most
        ``POSTED_INFLIGHT`` unanswered) and what answered batches reported is returned with it."""
        if not self._posted.add(address, data):
            return None
        self._send_flush()
        self._drain(POSTED_INFLIGHT)
        return self._with_carried(Completion())

    def _send_flush(self) -> None:
        seq = self._next_seq()
        self._send(device_pb2.ExitStreamRequest(seq=seq, flush=self._take_posted()))
        self._inflight.append(seq)

    def pending_posted(self) -> int:
        return len(self._posted)

    def broken(self) -> bool:
        """The stream failed (deadline, protocol error, lost service) and must be reopened."""
        return self._closed

    def flush(self, wait: bool = True) -> Completion:
        """Send the queued posted writes; with ``wait``, also read every outstanding completion so that
        all of them have reached the device (halt, pause, stop, reset) and their errors are known."""
        if len(self._posted):
            self._send_flush()
        self._drain(0 if wait else POSTED_INFLIGHT)
        return self._with_carried(Completion())

    def close(self) -> None:
        _WATCHDOG.remove(self)
        if not self._closed:
            self._closed = True
            self._requests.put(None)
        self._call.cancel()


class GrpcEndpoint:
    """A device service reached over gRPC at ``unix:PATH`` or ``HOST:PORT``."""

    def __init__(self, address: str, connect_timeout_s: float = 5.0, deadline_s: float = 5.0) -> None:
        self.name = address
        self._address = parse_address(address)
        self._connect_timeout_s = connect_timeout_s
        self._deadline_s = deadline_s
        #: Set when the service said it is going away (its Watch stream): exits are no longer sent to it.
        self.leaving: GoingAway | None = None
        self._lines: list[RemoteLine] | None = None  # from the last Describe
        #: The service said (Describe) that it reads the same CLOCK_MONOTONIC as this process.
        self.same_clock = False
        #: The service's instance, from Describe ("" before, or from a service that does not say).
        self.instance_id = ""
        self.features: frozenset[str] = frozenset()
        # The process's credentials: the vcpu service presents to device services the certificate and token it
        # checks its own clients with (security.configure).
        self.channel = security.channel(self._address)
        self.stub = device_pb2_grpc.DeviceServiceStub(self.channel)
        try:
            grpc.channel_ready_future(self.channel).result(timeout=connect_timeout_s)
        except grpc.FutureTimeoutError:
            self.channel.close()
            tls = " or no TLS handshake succeeded" if security.current().connects_tls else ""
            raise TransportError(
                f"device service {address} is not reachable (no connection within {connect_timeout_s:g} s{tls})"
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
        self.same_clock = bool(resp.clock_id) and resp.clock_id == clock_id()
        self.instance_id = self.instance_id or resp.instance_id
        self.features = frozenset(resp.features)
        regions = []
        lines: list[RemoteLine] = []
        for dev in resp.devices:
            seen: set[int] = set()
            for ln in dev.lines:
                if ln.index in seen:
                    raise TransportError(f"device service {self.name}: device {dev.name} lists line {ln.index} twice")
                seen.add(ln.index)
                lines.append(RemoteLine(self.name, dev.name, ln.index, ln.name, _TRIGGER.get(ln.trigger, "level"),
                                        dev.type, tuple(dev.compatible)))
            for r in dev.regions:
                if r.size == 0:
                    raise TransportError(f"device service {self.name}: device {dev.name} region {r.name} "
                                         "has size 0")
                access_sizes = tuple(r.access_sizes) or (1, 2, 4, 8)
                try:
                    shadows = check_shadow_windows(
                        f"device service {self.name}: {dev.name}/{r.name}", r.size, access_sizes,
                        [(w.offset, w.size) for w in r.shadows])
                except ValueError as exc:
                    raise TransportError(str(exc)) from None
                regions.append(RemoteRegion(
                    service=self.name, device=dev.name, device_type=dev.type, name=r.name, base=r.base,
                    size=r.size, romd=r.kind == device_pb2.REGION_KIND_ROMD, posted=r.posted,
                    access_sizes=access_sizes, has_console=dev.has_console,
                    compatible=tuple(dev.compatible), shadows=shadows, deadline_ms=r.deadline_ms,
                ))
        self._lines = lines
        return regions

    def interrupt_lines(self) -> list[RemoteLine]:
        if self._lines is None:
            self.describe()
        return list(self._lines or ())

    def watch(self, vm_id: str, dma: DmaTarget | None = None) -> ServiceWatch:
        return GrpcServiceWatch(self, vm_id, dma)

    def open_exit_channel(self, vm_id: str, vcpu_id: int, architecture: str) -> ExitChannel:
        return GrpcExitChannel(self, vm_id, vcpu_id, architecture, self._deadline_s)

    def read_mirror(self, vm_id: str, device: str, region: str) -> tuple[list[tuple[int, bytes]], bool]:
        """The non-zero chunks of a ROMD region as (offset, bytes), and whether reads may be served now."""
        chunks: list[tuple[int, bytes]] = []
        enabled = False
        end = 0
        try:
            for chunk in self.stub.ReadMirror(device_pb2.ReadMirrorRequest(device=device, region=region, vm_id=vm_id),
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

    def reset(self, vm_id: str) -> tuple[MirrorChange, ...]:
        try:
            resp = self.stub.Reset(device_pb2.ResetRequest(vm_id=vm_id), timeout=self._deadline_s)
        except grpc.RpcError as exc:
            raise TransportError(f"device service {self.name}: Reset failed: {exc.code().name}: "
                                 f"{exc.details()}") from None
        return mirror_changes(self.name, resp.mirror_updates)

    def close(self) -> None:
        self.channel.close()


class GrpcServiceWatch:
    """The Watch stream of one device service for one VM, read by one thread of the VM.

    The stream is bidirectional: the first request names the VM and the DMA windows ``dma`` grants; the
    service's DMA requests are served inside ``next`` by ``dma`` on the reading thread (never a vCPU's) and
    answered on the stream, so they never wait behind an exit."""

    def __init__(self, endpoint: GrpcEndpoint, vm_id: str, dma: DmaTarget | None = None) -> None:
        self._name = endpoint.name
        self._endpoint = endpoint
        self._cancelled = False
        self._gone = False
        self._dma = dma
        self._requests: queue.SimpleQueue[device_pb2.WatchRequest | None] = queue.SimpleQueue()
        windows = [device_pb2.DmaWindow(name=w.name, base=w.base, size=w.size) for w in dma.windows] if dma else []
        self._requests.put(device_pb2.WatchRequest(vm_id=vm_id, dma_windows=windows))
        self._call = endpoint.stub.Watch(iter(self._requests.get, None))

    def _serve_dma(self, request: device_pb2.DmaRequest) -> None:
        """Carry out one DMA request of the service's devices and answer it; a refusal is the answer's error."""
        result = device_pb2.DmaResult(id=request.id)
        try:
            if self._dma is None:
                raise DmaError(f"{request.device}: DMA at 0x{request.address:x} refused: this VM grants device "
                               f"service {self._name} no DMA window")
            if request.direction == device_pb2.DMA_DIRECTION_READ:
                result.data = self._dma.dma_read(request.device, request.address, request.length)
            elif request.direction == device_pb2.DMA_DIRECTION_WRITE:
                self._dma.dma_write(request.device, request.address, bytes(request.data))
            else:
                raise DmaError(f"{request.device}: DMA request {request.id} has no direction")
        except DmaError as exc:
            result.error = str(exc)
        self._requests.put(device_pb2.WatchRequest(dma_result=result))

    def next(self, timeout: float | None = None) -> WatchEvent | None:
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
            while True:
                response: device_pb2.WatchResponse = next(self._call)
                if response.WhichOneof("event") != "dma":
                    break
                self._serve_dma(response.dma)
        except StopIteration:
            if self._cancelled or self._gone:
                return None
            raise TransportError(f"device service {self._name} ended its watch stream") from None
        except grpc.RpcError as exc:
            if expired.is_set():
                raise TransportError(f"device service {self._name} sent no shadow registers within "
                                     f"{timeout:g} s") from None
            if self._cancelled or self._gone:
                return None
            raise TransportError(f"device service {self._name}: watch stream failed: "
                                 f"{exc.code().name}: {exc.details()}") from None
        finally:
            if timer is not None:
                timer.cancel()
        if expired.is_set():  # the timer went off just as the update arrived: the call is cancelled now
            raise TransportError(f"device service {self._name} sent no shadow registers within {timeout:g} s")
        event = response.WhichOneof("event")
        if event == "going_away":
            self._gone = True
            return GoingAway(self._name, response.going_away.reason, response.going_away.grace_seconds)
        if event == "lines":
            return line_change(self._name, response.lines, self._endpoint.same_clock)
        if event != "shadow":
            raise TransportError(f"device service {self._name} sent a watch response with no event")
        return shadow_change(self._name, response.shadow)

    def cancel(self) -> None:
        self._cancelled = True
        self._requests.put(None)
        self._call.cancel()
