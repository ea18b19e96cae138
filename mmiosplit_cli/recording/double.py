"""``mmiosplit replay FILE --serve ADDR``: a device double, the recording served as if it were the device service.

A guest runs against the recorded model without it: Describe is answered as recorded, each exit with the recorded
completion when the request matches the recorded one, and the recorded Watch events, DMA requests and console output
are sent where they were recorded.

One sequencer thread walks the recording in its global order. A message the service sent (a completion, a Watch
event, console output) is sent when every request recorded before it has arrived and matched; a request waits for
the live client to send it. So the recorded causality is kept (a shadow update that told the vCPU a byte arrived is
sent after the console input that brought it, and before the read that followed). When a live request does not
match the recorded one, the double fails loudly: that exit (and every later one) completes with DEVICE_ERROR naming
the expected and the received request, and the report goes to stderr.

What is not compared: the VM id and session id (chosen by the live side), ``ack`` (when responses arrive is timing),
``deadline_ms`` (configuration) and the syndrome, PC and instruction (observability only; the same guest gives the
same ones, a rebuilt one need not). A live Cancel is ignored (the recorded completion is sent as recorded); a resumed
exit stream is not supported (the double serves the recording's streams, once each).
"""

from __future__ import annotations

import collections
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from mmiosplit import security
from mmiosplit.address import parse_address
from mmiosplit.v1 import device_pb2, device_pb2_grpc
from mmiosplit_cli.recording.format import CLOSE, FROM_SERVICE, MESSAGE, TO_SERVICE, Record, Recording
from mmiosplit_cli.recording.replay import first_difference, resolve_targets, short

SERVICE = "mmiosplit.v1.DeviceService"
_STREAMING = ("ExitStream", "Watch", "Console")


def normalise_exit_request(request: device_pb2.ExitStreamRequest) -> device_pb2.ExitStreamRequest:
    """The part of a request a double matches on (see the module docstring for what is left out, and why)."""
    out = device_pb2.ExitStreamRequest()
    out.CopyFrom(request)
    out.ack = 0
    if out.HasField("hello"):
        out.hello.vm_id = ""
        out.hello.session_id = ""
        out.hello.last_acked = 0
    elif out.HasField("exit"):
        out.exit.deadline_ms = 0
        out.exit.syndrome = 0
        out.exit.pc = 0
        out.exit.instruction = 0
    return out


def normalise_watch_request(request: device_pb2.WatchRequest) -> device_pb2.WatchRequest:
    out = device_pb2.WatchRequest()
    out.CopyFrom(request)
    out.vm_id = ""
    return out


def normalise_console_request(request: device_pb2.ConsoleRequest) -> device_pb2.ConsoleRequest:
    out = device_pb2.ConsoleRequest()
    out.CopyFrom(request)
    out.vm_id = ""
    return out


_NORMALISE: dict[str, Callable[[Any], Message]] = {
    "ExitStream": normalise_exit_request, "Watch": normalise_watch_request, "Console": normalise_console_request}


@dataclass
class _Live:
    """One live streaming call: what the sequencer sends it (None ends it)."""

    method: str
    out: collections.deque[Message | None] = field(default_factory=collections.deque)
    ready: threading.Condition = field(default_factory=threading.Condition)

    def put(self, message: Message | None) -> None:
        with self.ready:
            self.out.append(message)
            self.ready.notify()

    def responses(self, context: grpc.ServicerContext) -> Iterator[Message]:
        while context.is_active():
            with self.ready:
                while not self.out and context.is_active():
                    self.ready.wait(0.2)
                if not self.out:
                    return
                message = self.out.popleft()
            if message is None:
                return
            yield message


class Double(device_pb2_grpc.DeviceServiceServicer):
    """The recorded service ``index`` of ``recording``, served."""

    def __init__(self, recording: Recording, index: int, log: Callable[[str], None]) -> None:
        self.recording = recording
        self.index = index
        self._log = log
        self.describe = recording.services[index].describe
        # A request recorded after its call ended never reached the service: the live client is not asked for it.
        ended = {s.id: next((r.index for r in s.records if r.kind == CLOSE), len(recording.records))
                 for s in recording.streams.values()}
        self._records = [r for r in recording.records if r.kind == MESSAGE
                         and recording.streams[r.stream].service == index
                         and recording.streams[r.stream].method in _STREAMING
                         and not (r.direction == TO_SERVICE and r.index > ended[r.stream])]
        self._lock = threading.Condition()
        self._live: dict[int, _Live] = {}  # recorded stream -> the live call it is mapped to
        self._backlog: dict[int, list[Message]] = collections.defaultdict(list)  # outputs before the call opened
        self._pending: dict[int, collections.deque[Message]] = collections.defaultdict(collections.deque)
        self._firsts: dict[int, Message] = {}  # recorded stream -> its first request
        for stream in recording.streams.values():
            if stream.service == index:
                first = next((r for r in stream.records if r.kind == MESSAGE and r.direction == TO_SERVICE), None)
                if first is not None:
                    self._firsts[stream.id] = recording.decode(first)
        self._used: set[int] = set()
        self._unary_used: set[int] = set()
        self._unanswered: set[tuple[int, int]] = set()  # (recorded stream, seq): matched, completion not sent yet
        #: The first divergence (None while the guest follows the recording), and how far the sequencer got.
        self.divergence: str | None = None
        self.matched = 0
        self.position = 0
        self._stop = False
        self._thread = threading.Thread(target=self._sequence, name="double-sequencer", daemon=True)
        self._thread.start()

    @property
    def total(self) -> int:
        return len(self._records)

    # ----- the sequencer ---------------------------------------------------------------------------------------

    def _sequence(self) -> None:
        for n, record in enumerate(self._records):
            self.position = n
            stream = self.recording.streams[record.stream]
            message = self.recording.decode(record)
            if record.direction == FROM_SERVICE:
                self._emit(record.stream, message)
                continue
            if isinstance(message, device_pb2.ExitStreamRequest) and message.HasField("cancel"):
                continue  # timing: a live Cancel is ignored, and a recorded one is not waited for
            with self._lock:
                while not self._pending[record.stream] and not self._stop and self.divergence is None:
                    self._lock.wait(0.5)
                if self._stop or self.divergence is not None:
                    return
                got = self._pending[record.stream].popleft()
            normalise = _NORMALISE[stream.method]
            if normalise(got) != normalise(message):
                self._diverge(record, stream.method, message, got)
                return
            self.matched += 1
            if isinstance(got, device_pb2.ExitStreamRequest) and got.WhichOneof("body") in ("exit", "flush"):
                with self._lock:
                    self._unanswered.add((record.stream, got.seq))
        self.position = len(self._records)
        self._log(f"replay double: the guest went through the whole recording ({self.matched} requests matched)")

    def _emit(self, stream: int, message: Message) -> None:
        with self._lock:
            if isinstance(message, device_pb2.ExitStreamResponse):
                self._unanswered.discard((stream, message.seq))
            live = self._live.get(stream)
            if live is None:
                self._backlog[stream].append(message)
                return
        live.put(message)

    def _diverge(self, record: Record, method: str, expected: Message, got: Message) -> None:
        what = ""
        if isinstance(got, device_pb2.ExitStreamRequest):
            what = f" (seq {got.seq})"
        text = (f"the guest diverged from the recording at record {record.index} (offset {record.offset}), "
                f"{method}{what}: expected {short(expected, 300)}; got {short(got, 300)}"
                f" [{first_difference(_NORMALISE[method](expected), _NORMALISE[method](got))}]")
        with self._lock:
            self.divergence = text
            lives = list(self._live.items())
            unanswered, self._unanswered = self._unanswered, set()
            self._lock.notify_all()
        self._log(f"replay double: {text}")
        # Requests that matched but wait for something recorded after the divergence (a DMA answer) fail too.
        for stream_id, seq in sorted(unanswered):
            live = self._live[stream_id]
            self._refuse(live, device_pb2.ExitStreamRequest(seq=seq, exit=device_pb2.MmioExit()))
        # The exit that diverged, and every one queued, completes with the error.
        for stream_id, live in lives:
            if live.method != "ExitStream":
                continue
            with self._lock:
                queued = list(self._pending[stream_id])
                self._pending[stream_id].clear()
            if stream_id == record.stream:
                queued.insert(0, got)
            for request in queued:
                self._refuse(live, request)  # type: ignore[arg-type]

    def _refuse(self, live: _Live, request: device_pb2.ExitStreamRequest) -> None:
        if request.WhichOneof("body") in ("exit", "flush"):
            live.put(device_pb2.ExitStreamResponse(seq=request.seq, completion=device_pb2.Completion(
                status=device_pb2.COMPLETION_STATUS_DEVICE_ERROR, error=f"replay double: {self.divergence}")))

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            lives = list(self._live.values())
            self._lock.notify_all()
        for live in lives:
            live.put(None)

    # ----- live calls ------------------------------------------------------------------------------------------

    def _attach(self, method: str, first: Message, context: grpc.ServicerContext) -> tuple[int, _Live]:
        """Map a new live call to the next recorded call of the same kind (an exit stream: of the same vCPU; a
        console: of the same UART), and queue its first request."""
        live = _Live(method)
        with self._lock:
            for stream_id, recorded_first in self._firsts.items():
                stream = self.recording.streams[stream_id]
                if stream.method != method or stream_id in self._used:
                    continue
                if isinstance(first, device_pb2.ExitStreamRequest) and (
                        not recorded_first.HasField("hello")
                        or recorded_first.hello.vcpu_id != first.hello.vcpu_id):  # type: ignore[attr-defined]
                    continue
                if isinstance(first, device_pb2.ConsoleRequest) and \
                        recorded_first.device != first.device:  # type: ignore[attr-defined]
                    continue
                self._used.add(stream_id)
                self._live[stream_id] = live
                for message in self._backlog.pop(stream_id, []):
                    live.out.append(message)
                self._pending[stream_id].append(first)
                self._lock.notify_all()
                return stream_id, live
        context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                      f"replay double: the recording has no further {method} call like this one ({short(first, 200)})")
        raise AssertionError  # abort raises

    def _input(self, stream_id: int, live: _Live, request: Message) -> None:
        if isinstance(request, device_pb2.ExitStreamRequest) and request.HasField("cancel"):
            return
        with self._lock:
            if self.divergence is None and self.position >= len(self._records):
                self.divergence = (f"the guest went on after the end of the recording: got {short(request, 300)}, "
                                   "expected nothing more")
                self._log(f"replay double: {self.divergence}")
            if self.divergence is not None:
                if isinstance(request, device_pb2.ExitStreamRequest):
                    self._refuse(live, request)
                return
            self._pending[stream_id].append(request)
            self._lock.notify_all()

    def _streaming(self, method: str, requests: Iterator[Message], context: grpc.ServicerContext) -> Iterator[Message]:
        try:
            first = next(requests)
        except StopIteration:
            return
        stream_id, live = self._attach(method, first, context)

        def read() -> None:
            try:
                for request in requests:
                    self._input(stream_id, live, request)
            except grpc.RpcError:
                pass

        threading.Thread(target=read, daemon=True, name=f"double-{method}").start()
        yield from live.responses(context)

    def ExitStream(self, request_iterator: Iterator[device_pb2.ExitStreamRequest],
                   context: grpc.ServicerContext) -> Iterator[Message]:
        return self._streaming("ExitStream", request_iterator, context)

    def Watch(self, request_iterator: Iterator[device_pb2.WatchRequest],
              context: grpc.ServicerContext) -> Iterator[Message]:
        return self._streaming("Watch", request_iterator, context)

    def Console(self, request_iterator: Iterator[device_pb2.ConsoleRequest],
                context: grpc.ServicerContext) -> Iterator[Message]:
        return self._streaming("Console", request_iterator, context)

    def Describe(self, request: device_pb2.DescribeRequest, context: grpc.ServicerContext) -> Message:
        return self.describe

    def _recorded_unary(self, method: str, match: Callable[[Message], bool]) -> list[Message] | None:
        """The responses of the first recorded ``method`` call whose request matches (a call not used yet first)."""
        candidates = [s for s in self.recording.streams.values() if s.service == self.index and s.method == method
                      and s.id in self._firsts and match(self._firsts[s.id])]
        candidates.sort(key=lambda s: (s.id in self._unary_used, s.id))
        if not candidates:
            return None
        stream = candidates[0]
        self._unary_used.add(stream.id)
        return [self.recording.decode(r) for r in stream.records if r.kind == MESSAGE and r.direction == FROM_SERVICE]

    def ReadMirror(self, request: device_pb2.ReadMirrorRequest, context: grpc.ServicerContext) -> Iterator[Message]:
        found = self._recorded_unary("ReadMirror", lambda r: (r.device, r.region)  # type: ignore[attr-defined]
                                     == (request.device, request.region))
        if found is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"replay double: the recording has no ReadMirror of "
                          f"{request.device}/{request.region}")
        yield from found or []

    def Reset(self, request: device_pb2.ResetRequest, context: grpc.ServicerContext) -> Message:
        found = self._recorded_unary("Reset", lambda _: True)
        if not found:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "replay double: the recording has no Reset")
        return found[0] if found else device_pb2.ResetResponse()


def serve_double(recording: Recording, specs: list[str], ready: Callable[[str], None] | None = None,
                 grace_s: float = 1.0) -> int:
    """Serve each recorded service named in ``specs`` (``ADDR``, or ``NAME=ADDR`` each) until SIGTERM or SIGINT;
    0 when the guest never diverged, 1 when it did (the report is on stderr)."""

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    targets = resolve_targets(recording, specs)
    servers: list[grpc.Server] = []
    doubles: list[Double] = []
    stop = threading.Event()
    for index, address in targets.items():
        double = Double(recording, index, log)
        doubles.append(double)
        server = security.server(futures.ThreadPoolExecutor(64, thread_name_prefix=f"double-{index}"))
        device_pb2_grpc.add_DeviceServiceServicer_to_server(double, server)
        health_servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        for name in ("", SERVICE):
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        where = parse_address(address)
        port = security.bind(server, where, security.current())
        if port == 0:
            raise OSError(f"cannot listen on {address}")
        server.start()
        servers.append(server)
        if ready is not None:
            ready(where.target if where.is_unix else f"{where.host}:{port}")
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for double in doubles:
            double.stop()
        for server in servers:
            server.stop(grace_s).wait()
    status = 0
    for double in doubles:
        name = recording.services[double.index].describe.service_name
        if double.divergence is not None:
            status = 1
            log(f"replay double {name}: 1 divergence: {double.divergence}")
        else:
            log(f"replay double {name}: 0 divergences, {double.matched} requests matched, "
                f"{double.position} of {double.total} recorded messages served")
    return status
