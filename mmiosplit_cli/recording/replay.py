"""``mmiosplit replay FILE --device-service ADDR``: drive a live device service with a recording's requests and
compare every answer with the recorded one, FifoCI-style, to the first divergence.

Only gRPC: the driver knows nothing of the Python device service, so it checks any implementation of
``DeviceService``.

Order. Records are replayed in the recording's global order. A request is sent, and its response awaited, before
the next record is looked at; a recorded Watch event is awaited where it was recorded. That order never deadlocks:
the recorder wrote a service's message before forwarding any request that reached the service after it, so what a
recorded answer depends on was sent before it is awaited. The Watch stream is read by a thread of its own, which
answers each DMA request with the recorded DmaResult (the device's view of guest memory is the recording's).

What is normalised (and why) is in ``normalise_*`` and ``docs/recording.md``: values the protocol makes random or
clock-based (instance ids, service names, raised_ns, generation counters, the session ids the replay chooses),
and the data of reads of clock-dependent registers (``VOLATILE``, plus ``--volatile``). Nothing else.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import text_format
from google.protobuf.message import Message

from mmiosplit import security
from mmiosplit.v1 import device_pb2, device_pb2_grpc
from mmiosplit_cli.recording.format import (
    CLOSE,
    FROM_SERVICE,
    MESSAGE,
    OPEN,
    TO_SERVICE,
    Record,
    Recording,
    Stream,
)

#: Registers whose reads return the host's clock: (device type, offset in the region). Their read data is not
#: compared (status and errors still are).
VOLATILE: frozenset[tuple[str, int]] = frozenset({("pl031", 0x000)})  # RTCDR: seconds of host UTC time


class ReplayError(RuntimeError):
    """The replay could not start (an unknown service name, an unreachable service)."""


@dataclass
class Divergence:
    """The first place the live service answered differently from the recording."""

    exchange: int
    record: Record
    where: str
    expected: str
    got: str
    device: str = ""
    address: int | None = None
    seq: int | None = None
    note: str = ""

    def report(self, path: str) -> str:
        lines = [f"{path}: divergence at exchange {self.exchange} (record {self.record.index}, offset "
                 f"{self.record.offset}, {self.record.time_us / 1e6:.6f} s into the recording)",
                 f"  where:    {self.where}"]
        if self.seq is not None:
            lines.append(f"  seq:      {self.seq}")
        if self.device:
            lines.append(f"  device:   {self.device}" + (f" at 0x{self.address:x}" if self.address is not None else ""))
        lines += [f"  expected: {self.expected}", f"  got:      {self.got}"]
        if self.note:
            lines.append(f"  note:     {self.note}")
        return "\n".join(lines)


class _Diverged(Exception):
    def __init__(self, divergence: Divergence) -> None:
        super().__init__(divergence.where)
        self.divergence = divergence


@dataclass
class ReplayResult:
    exchanges: int
    records: int
    seconds: float
    divergence: Divergence | None = None
    volatile_reads: int = 0
    notes: list[str] = field(default_factory=list)


# ----- normalisation ----------------------------------------------------------------------------------------------

def normalise_exit_response(response: device_pb2.ExitStreamResponse, volatile: bool) -> device_pb2.ExitStreamResponse:
    """A copy without what legitimately differs between two runs of the same model: the service's instance id and
    name (random per start; configuration), what a resumed stream's welcome says was applied (where a connection
    broke is network timing), interrupt raise times (a clock), generation counters (the protocol only
    says they increase; their values are the service's own count), going_away (timing of a shutdown), and the data
    of a read of a clock-dependent register (``volatile``)."""
    out = device_pb2.ExitStreamResponse()
    out.CopyFrom(response)
    out.ClearField("going_away")
    if out.HasField("welcome"):
        out.welcome.instance_id = ""
        out.welcome.service_name = ""
        if out.welcome.resumed:  # how much the service had applied when a stream broke is network timing
            out.welcome.applied = 0
    if out.HasField("completion"):
        _normalise_completion(out.completion)
        if volatile:
            out.completion.data = b""
    return out


def _normalise_completion(c: device_pb2.Completion) -> None:
    if c.HasField("lines"):
        c.lines.raised_ns = 0
        c.lines.generation = 0
    if c.HasField("shadow"):
        c.shadow.generation = 0


def normalise_watch_response(response: device_pb2.WatchResponse) -> device_pb2.WatchResponse:
    """As ``normalise_exit_response``; a DMA request's id is the service's choice (the answer carries it back)."""
    out = device_pb2.WatchResponse()
    out.CopyFrom(response)
    if out.HasField("lines"):
        out.lines.raised_ns = 0
        out.lines.generation = 0
    elif out.HasField("shadow"):
        out.shadow.generation = 0
    elif out.HasField("dma"):
        out.dma.id = 0
    return out


def normalise_describe(response: device_pb2.DescribeResponse, properties: bool = False) -> device_pb2.DescribeResponse:
    """Without the instance id and clock id (random per start; the host) and the service's name (configuration).
    Without ``properties``, also without the devices' properties, which are informative (a flash's file path) and
    reported as a note rather than a divergence."""
    out = device_pb2.DescribeResponse()
    out.CopyFrom(response)
    out.instance_id = ""
    out.clock_id = ""
    out.service_name = ""
    if not properties:
        for device in out.devices:
            device.ClearField("properties")
    return out


def first_difference(expected: Message, got: Message, path: str = "") -> str:
    """Where two messages first differ, as ``field[index].field: expected X, got Y`` ("" when equal)."""
    if expected == got:
        return ""
    for descriptor in expected.DESCRIPTOR.fields:
        name = descriptor.name
        a, b = getattr(expected, name), getattr(got, name)
        here = f"{path}.{name}" if path else name
        if a == b:
            continue
        if descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry:
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    return f"{here}[{key!r}]: expected {a.get(key)!r}, got {b.get(key)!r}"
        if descriptor.is_repeated:
            for n, (x, y) in enumerate(zip(a, b, strict=False)):
                if x != y:
                    if descriptor.message_type is not None:
                        return first_difference(x, y, f"{here}[{n}]")
                    return f"{here}[{n}]: expected {x!r}, got {y!r}"
            return f"{here}: expected {len(a)} entries, got {len(b)}"
        if descriptor.message_type is not None:
            return first_difference(a, b, here)
        return f"{here}: expected {a!r}, got {b!r}"
    return f"{path or 'message'}: differs"


def short(message: Message, limit: int = 400) -> str:
    """One line of text format, cut at ``limit`` characters."""
    text = text_format.MessageToString(message, as_one_line=True) or "(empty)"
    return text if len(text) <= limit else text[:limit] + " ..."


def describe_completion(c: device_pb2.Completion) -> str:
    status = device_pb2.CompletionStatus.Name(c.status).removeprefix("COMPLETION_STATUS_")
    parts = [status]
    if c.data:
        parts.append(f"data 0x{int.from_bytes(c.data, 'little'):0{2 * len(c.data)}x}" if len(c.data) <= 8
                     else f"data {c.data[:32].hex()}{'...' if len(c.data) > 32 else ''} ({len(c.data)} bytes)")
    if c.error:
        parts.append(f"error {c.error!r}")
    rest = device_pb2.Completion()
    rest.CopyFrom(c)
    for name in ("status", "data", "error"):
        rest.ClearField(name)
    if rest.ByteSize():
        parts.append(short(rest, 300))
    return ", ".join(parts)


# ----- the live side ----------------------------------------------------------------------------------------------

_END = object()


class _LiveCall:
    """One live bidirectional stream: requests from a queue, responses read by a thread into another queue (or
    handed to ``on_response``, which the Watch stream uses to answer DMA at once)."""

    def __init__(self, method: Any, first: Message, on_response: Any = None, start: bool = True) -> None:
        self.requests: queue.SimpleQueue[Message | None] = queue.SimpleQueue()
        self.responses: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.requests.put(first)
        self.call = method(iter(self.requests.get, None))
        self.error = ""
        self._on_response = on_response
        self.thread = threading.Thread(target=self._read, daemon=True, name="replay-reader")
        if start:
            self.thread.start()

    def start(self) -> None:
        """Start reading (for a caller whose ``on_response`` needs the call stored first)."""
        self.thread.start()

    def _read(self) -> None:
        try:
            for response in self.call:
                if self._on_response is not None:
                    self._on_response(response)
                self.responses.put(response)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.error = f"{exc.code().name}: {exc.details()}"
        self.responses.put(_END)

    def next(self, timeout: float) -> Any:
        """The next response, ``_END`` when the stream ended, None when none came within ``timeout``."""
        try:
            return self.responses.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self.requests.put(None)

    def cancel(self) -> None:
        self.requests.put(None)
        self.call.cancel()


@dataclass
class _StreamState:
    stream: Stream
    call: _LiveCall | None = None
    closed: bool = False
    vm: str = ""
    vcpu: int = 0
    # ExitStream: request record index -> its response record; cancels to send right after a request.
    responses: dict[int, Record] = field(default_factory=dict)
    cancel_early: set[int] = field(default_factory=set)
    # Watch: the recorded events in order, and the DmaResult recorded for each recorded DMA request id.
    events: list[Record] = field(default_factory=list)
    dma_results: dict[int, device_pb2.DmaResult] = field(default_factory=dict)
    consumed: int = 0
    # Console: what the live service transmitted.
    output: bytearray = field(default_factory=bytearray)
    recorded_output: bytearray = field(default_factory=bytearray)


class Replayer:
    """Replays one recording against live services (``targets``: recorded service index -> live address)."""

    def __init__(self, recording: Recording, targets: dict[int, str], timeout_s: float = 10.0,
                 volatile: set[tuple[str, int]] | None = None, console_settle_s: float = 0.05) -> None:
        self.recording = recording
        self.timeout_s = timeout_s
        self.console_settle_s = console_settle_s
        self.channels = {index: security.channel(address) for index, address in targets.items()}
        for index, channel in self.channels.items():
            try:
                grpc.channel_ready_future(channel).result(timeout=min(timeout_s, 10.0))
            except grpc.FutureTimeoutError:
                for ch in self.channels.values():
                    ch.close()
                raise ReplayError(f"device service {targets[index]} is not reachable (no connection within "
                                  f"{min(timeout_s, 10.0):g} s)") from None
        self.stubs = {index: device_pb2_grpc.DeviceServiceStub(ch) for index, ch in self.channels.items()}
        self.targets = targets
        self._sessions: dict[str, str] = {}
        self._states: dict[int, _StreamState] = {}
        self._resent: set[int] = set()
        self._exchanges = 0
        self._volatile_reads = 0
        self._extra_volatile = volatile or set()
        #: What differed without counting as a divergence (a device property), for the report.
        self.notes: list[str] = []
        self._types: dict[int, dict[str, str]] = {}
        self._bases: dict[int, dict[tuple[str, str], int]] = {}
        for index, service in enumerate(recording.services):
            self._types[index] = {d.name: d.type for d in service.describe.devices}
            self._bases[index] = {(d.name, r.name): r.base for d in service.describe.devices for r in d.regions}
        self._prepare()

    def _prepare(self) -> None:
        """Pair each recorded request with its response, and each DMA request with its result; find the requests
        a broken stream left unanswered and a resumed one sent again (``_resent``)."""
        sent: dict[tuple[str, int], list[int]] = {}  # (session, seq) -> request records, in order
        for stream in self.recording.streams.values():
            if stream.method != "ExitStream":
                continue
            session = ""
            for record in stream.records:
                if record.kind == MESSAGE and record.direction == TO_SERVICE:
                    message = self.recording.decode(record)
                    assert isinstance(message, device_pb2.ExitStreamRequest)
                    if message.HasField("hello"):
                        session = message.hello.session_id
                    elif session and not message.HasField("cancel"):
                        sent.setdefault((session, message.seq), []).append(record.index)
        self._resent = {index for indices in sent.values() for index in indices[:-1]}
        for stream in self.recording.streams.values():
            state = _StreamState(stream)
            self._states[stream.id] = state
            if stream.method == "ExitStream":
                waiting: list[Record] = []
                cancelled: set[int] = set()
                for record in stream.records:
                    if record.kind != MESSAGE:
                        continue
                    message = self.recording.decode(record)
                    if record.direction == TO_SERVICE:
                        assert isinstance(message, device_pb2.ExitStreamRequest)
                        if message.WhichOneof("body") == "cancel":
                            if any(self._seq(r) == message.seq for r in waiting):
                                cancelled.add(message.seq)
                        else:
                            waiting.append(record)
                    elif waiting:
                        request = waiting.pop(0)
                        state.responses[request.index] = record
                        if self._seq(request) in cancelled:
                            state.cancel_early.add(request.index)
            elif stream.method == "Watch":
                for record in stream.records:
                    if record.kind != MESSAGE:
                        continue
                    message = self.recording.decode(record)
                    if record.direction == FROM_SERVICE:
                        state.events.append(record)
                    elif isinstance(message, device_pb2.WatchRequest) and message.HasField("dma_result"):
                        state.dma_results[message.dma_result.id] = message.dma_result
            elif stream.method == "Console":
                for record in stream.records:
                    if record.kind == MESSAGE and record.direction == FROM_SERVICE:
                        response = self.recording.decode(record)
                        assert isinstance(response, device_pb2.ConsoleResponse)
                        state.recorded_output += response.output

    def _seq(self, record: Record) -> int:
        return int(self.recording.decode(record).seq)  # type: ignore[attr-defined]

    # ----- the loop --------------------------------------------------------------------------------------------

    def run(self) -> ReplayResult:
        t0 = time.monotonic()
        result = ReplayResult(0, len(self.recording.records), 0.0)
        try:
            for record in self.recording.records:
                self._replay(record)
            self._finish()
        except _Diverged as exc:
            result.divergence = exc.divergence
        finally:
            for state in self._states.values():
                if state.call is not None:
                    state.call.cancel()
            for channel in self.channels.values():
                channel.close()
        result.exchanges = self._exchanges
        result.volatile_reads = self._volatile_reads
        result.notes = self.notes
        result.seconds = time.monotonic() - t0
        return result

    def _replay(self, record: Record) -> None:
        state = self._states[record.stream]
        method = state.stream.method
        if record.kind == OPEN:
            return
        if record.kind == CLOSE:
            self._close(record, state)
            return
        if state.closed and record.direction == TO_SERVICE:
            return  # the client sent it after the recorded call had ended: it never reached the service
        message = self.recording.decode(record)
        if method == "ExitStream":
            if record.direction == TO_SERVICE:
                self._exit_request(record, state, message)  # type: ignore[arg-type]
        elif method == "Watch":
            if record.direction == TO_SERVICE:
                if state.call is None:
                    self._open_watch(state, message)  # type: ignore[arg-type]
            else:
                self._watch_event(record, state, message)  # type: ignore[arg-type]
        elif method == "Console":
            if record.direction == TO_SERVICE:
                self._console_request(state, message)  # type: ignore[arg-type]
        elif record.direction == TO_SERVICE:
            self._unary(record, state, message)

    def _diverge(self, record: Record, where: str, expected: str, got: str, **kw: Any) -> _Diverged:
        return _Diverged(Divergence(self._exchanges + 1, record, where, expected, got, **kw))

    def _service(self, state: _StreamState) -> int:
        return state.stream.service

    def _stub(self, state: _StreamState) -> device_pb2_grpc.DeviceServiceStub:
        return self.stubs[self._service(state)]

    # ----- exit streams ----------------------------------------------------------------------------------------

    def _exit_request(self, record: Record, state: _StreamState, request: device_pb2.ExitStreamRequest) -> None:
        body = request.WhichOneof("body")
        if body == "hello":
            hello = request.hello
            state.vm, state.vcpu = hello.vm_id, hello.vcpu_id
            if hello.session_id:  # a session of its own, so a service that saw the recording's knows nothing of it
                hello.session_id = self._sessions.setdefault(hello.session_id, uuid.uuid4().hex)
            if state.call is not None:
                state.call.cancel()
            state.call = _LiveCall(self._stub(state).ExitStream, request)
        elif state.call is None:
            raise self._diverge(record, self._where(state), "a handshake first",
                                "the recording sends a request before any hello on this stream")
        elif body == "cancel":
            # Sent right after its request when it was recorded before the answer (cancel_early); one recorded after
            # the answer came too late to matter.
            return
        elif record.index in self._resent and record.index not in state.responses:
            # The stream broke before its answer and a resumed stream sent it again: sent there only, so whether
            # the service had it before the break (network timing) does not matter.
            return
        else:
            state.call.requests.put(request)
        if record.index in state.cancel_early:
            state.call.requests.put(device_pb2.ExitStreamRequest(seq=request.seq, cancel=device_pb2.Cancel()))
        expected_record = state.responses.get(record.index)
        if expected_record is None:
            return  # the recorded stream broke before this was answered; the live answer is not compared
        got = state.call.next(self.timeout_s)
        expected = self.recording.decode(expected_record)
        assert isinstance(expected, device_pb2.ExitStreamResponse)
        where = self._where(state)
        device, address = self._access(state, request)
        if got is None or got is _END:
            why = (state.call.error or "the stream ended") if got is _END else f"nothing within {self.timeout_s:g} s"
            raise self._diverge(record, where, self._show_response(expected), why, seq=request.seq,
                                device=device, address=address)
        volatile = self._is_volatile(state, request)
        if normalise_exit_response(got, volatile) != normalise_exit_response(expected, volatile):
            note = first_difference(normalise_exit_response(expected, volatile), normalise_exit_response(got, volatile))
            if record.index in state.cancel_early:
                note += ("; the recording cancelled this access: whether a service had started it when the Cancel "
                        "arrived is timing")
            raise self._diverge(record, where + f", {self._what(request)}", self._show_response(expected),
                                self._show_response(got), seq=request.seq, device=device, address=address, note=note)
        if volatile:
            self._volatile_reads += 1
        self._exchanges += 1

    def _where(self, state: _StreamState) -> str:
        name = self.recording.services[self._service(state)].describe.service_name or f"service {self._service(state)}"
        vcpu = f" vCPU {state.vcpu}" if state.stream.method == "ExitStream" else ""
        return f"{name}: {state.stream.method} of VM {state.vm or '?'}{vcpu} (stream {state.stream.id})"

    @staticmethod
    def _what(request: device_pb2.ExitStreamRequest) -> str:
        body = request.WhichOneof("body")
        if body == "exit":
            ex = request.exit
            kind = "write" if ex.direction == device_pb2.ACCESS_DIRECTION_WRITE else "read"
            data = f" of 0x{int.from_bytes(ex.data, 'little'):0{2 * len(ex.data)}x}" if ex.data else ""
            posted = f" after {len(ex.posted.address)} posted write(s)" if ex.HasField("posted") else ""
            return f"{ex.length}-byte {kind}{data} at {ex.device}/{ex.region}+0x{ex.region_offset:x}{posted}"
        if body == "flush":
            return f"posted batch of {len(request.flush.address)} write(s)"
        return str(body)

    def _access(self, state: _StreamState, request: device_pb2.ExitStreamRequest) -> tuple[str, int | None]:
        if request.HasField("exit"):
            return request.exit.device, request.exit.address
        if request.HasField("flush") and request.flush.address:
            return "(posted batch)", request.flush.address[0]
        return "", None

    def _is_volatile(self, state: _StreamState, request: device_pb2.ExitStreamRequest) -> bool:
        if not request.HasField("exit") or request.exit.direction != device_pb2.ACCESS_DIRECTION_READ:
            return False
        ex = request.exit
        kind = self._types[self._service(state)].get(ex.device, "")
        offset = ex.region_offset
        return (kind, offset) in VOLATILE or (ex.device, offset) in self._extra_volatile \
            or (kind, offset) in self._extra_volatile

    @staticmethod
    def _show_response(response: device_pb2.ExitStreamResponse) -> str:
        if response.HasField("completion"):
            return describe_completion(response.completion)
        return short(response)

    # ----- Watch -----------------------------------------------------------------------------------------------

    def _open_watch(self, state: _StreamState, first: device_pb2.WatchRequest) -> None:
        state.vm = first.vm_id
        answered = [0]

        def on_response(live: device_pb2.WatchResponse) -> None:
            """The reader's thread: a DMA request is answered at once from the recording (the vCPU side's
            answer), since the access that caused it waits for it."""
            position = answered[0]
            answered[0] += 1
            if not live.HasField("dma"):
                return
            assert state.call is not None  # set before the reader starts
            result = device_pb2.DmaResult(id=live.dma.id, error="replay: the recording has no DMA request here")
            if position < len(state.events):
                recorded = self.recording.decode(state.events[position])
                assert isinstance(recorded, device_pb2.WatchResponse)
                if recorded.HasField("dma") and recorded.dma.id in state.dma_results:
                    result.CopyFrom(state.dma_results[recorded.dma.id])
                    result.id = live.dma.id
            state.call.requests.put(device_pb2.WatchRequest(dma_result=result))

        state.call = _LiveCall(self._stub(state).Watch, first, on_response, start=False)
        state.call.start()

    def _watch_event(self, record: Record, state: _StreamState, expected: device_pb2.WatchResponse) -> None:
        where = self._where(state)
        if state.call is None:
            raise self._diverge(record, where, short(expected), "the recording has no Watch request before it")
        got = state.call.next(self.timeout_s)
        device, address = self._event_place(state, expected)
        if got is None or got is _END:
            why = (state.call.error or "the stream ended") if got is _END else f"nothing within {self.timeout_s:g} s"
            raise self._diverge(record, where + ", watch event", short(expected), why, device=device, address=address)
        state.consumed += 1
        if normalise_watch_response(got) != normalise_watch_response(expected):
            device, address = self._event_place(state, expected, got)
            shown = _shadow_difference(expected, got) or (short(normalise_watch_response(expected)),
                                                          short(normalise_watch_response(got)))
            raise self._diverge(record, where + ", watch event", *shown, device=device, address=address,
                                note=first_difference(normalise_watch_response(expected),
                                                      normalise_watch_response(got)))
        self._exchanges += 1

    def _event_place(self, state: _StreamState, expected: device_pb2.WatchResponse,
                     got: device_pb2.WatchResponse | None = None) -> tuple[str, int | None]:
        """The device and guest address an event is about (the first value that differs, for a shadow update)."""
        bases = self._bases[self._service(state)]
        if expected.HasField("shadow"):
            live = list(got.shadow.values) if got is not None and got.HasField("shadow") else []
            for n, value in enumerate(expected.shadow.values):
                if n >= len(live) or live[n] != value:
                    return value.device, bases.get((value.device, value.region), 0) + value.offset
            if expected.shadow.values:
                value = expected.shadow.values[0]
                return value.device, bases.get((value.device, value.region), 0) + value.offset
        if expected.HasField("dma"):
            return expected.dma.device, expected.dma.address
        if expected.HasField("lines") and expected.lines.levels:
            return expected.lines.levels[0].device, None
        return "", None

    # ----- Console and the unary RPCs --------------------------------------------------------------------------

    def _console_request(self, state: _StreamState, request: device_pb2.ConsoleRequest) -> None:
        if state.call is None:
            state.vm = request.vm_id

            def on_output(response: device_pb2.ConsoleResponse) -> None:
                state.output += response.output

            state.call = _LiveCall(self._stub(state).Console, request, on_output)
        elif request.input:
            state.call.requests.put(device_pb2.ConsoleRequest(input=request.input))
        if request.input:
            time.sleep(self.console_settle_s)  # the input has no answer: let the service take it before going on

    def _unary(self, record: Record, state: _StreamState, request: Message) -> None:
        method = state.stream.method
        expected = [self.recording.decode(r) for r in state.stream.records
                    if r.kind == MESSAGE and r.direction == FROM_SERVICE]
        closes = [r for r in state.stream.records if r.kind == CLOSE]
        expected_code = self.recording.close_status(closes[0])[0] if closes else 0
        stub = self._stub(state)
        got: list[Message] = []
        code = 0
        details = ""
        try:
            if method == "ReadMirror":
                got = list(stub.ReadMirror(request, timeout=max(60.0, self.timeout_s)))
            else:
                got = [getattr(stub, method)(request, timeout=self.timeout_s)]
        except grpc.RpcError as exc:
            code, details = exc.code().value[0], str(exc.details())
        where = f"{self._where(state).split(' of VM')[0]}: {short(request, 120)}"
        if code != expected_code:
            raise self._diverge(record, where, f"status {grpc_code_name(expected_code)}",
                                f"status {grpc_code_name(code)} {details}")
        if method == "Describe":
            if expected and got:
                note = first_difference(normalise_describe(expected[0], True),  # type: ignore[arg-type]
                                        normalise_describe(got[0], True))  # type: ignore[arg-type]
                if note:
                    self.notes.append(f"Describe differs in a device property (not compared): {note}")
            expected = [normalise_describe(m) for m in expected]  # type: ignore[arg-type]
            got = [normalise_describe(m) for m in got]  # type: ignore[arg-type]
        if method == "ReadMirror":
            expected_bytes, got_bytes = _mirror_bytes(expected), _mirror_bytes(got)
            if expected_bytes != got_bytes:
                at = next((n for n, (a, b) in enumerate(zip(expected_bytes, got_bytes, strict=False)) if a != b),
                          min(len(expected_bytes), len(got_bytes)))
                raise self._diverge(record, where,
                                    f"{len(expected_bytes)} bytes (mirror mode {expected_mode(expected)})",
                                    f"{len(got_bytes)} bytes (mirror mode {expected_mode(got)}), first difference at "
                                    f"offset 0x{at:x}")
            if expected_mode(expected) != expected_mode(got):
                raise self._diverge(record, where, f"mirror mode {expected_mode(expected)}",
                                    f"mirror mode {expected_mode(got)}")
        elif expected != got:
            detail = first_difference(expected[0], got[0]) if len(expected) == len(got) == 1 else ""
            raise self._diverge(record, where, " | ".join(short(m) for m in expected),
                                " | ".join(short(m) for m in got), note=detail)
        self._exchanges += 1

    # ----- ends ------------------------------------------------------------------------------------------------

    def _close(self, record: Record, state: _StreamState) -> None:
        state.closed = True
        if state.call is None or state.stream.method not in ("ExitStream", "Watch", "Console"):
            return
        if state.stream.method == "Watch":
            extra = state.call.next(0.0)
            if extra is not None and extra is not _END:
                raise self._diverge(record, self._where(state) + ", watch event",
                                    "no more events (the recorded stream ends here)", short(extra))
        if state.stream.method == "Console":
            self._compare_console(record, state)
        state.call.cancel()
        state.call = None

    def _compare_console(self, record: Record, state: _StreamState) -> None:
        deadline = time.monotonic() + min(self.timeout_s, 3.0)
        while len(state.output) < len(state.recorded_output) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        live, recorded = bytes(state.output), bytes(state.recorded_output)
        if live != recorded:
            at = next((n for n, (a, b) in enumerate(zip(recorded, live, strict=False)) if a != b),
                      min(len(live), len(recorded)))
            raise self._diverge(record, self._where(state) + f", console output byte {at}",
                                f"{recorded[at:at + 40]!r} ({len(recorded)} bytes in all)",
                                f"{live[at:at + 40]!r} ({len(live)} bytes in all)")
        self._exchanges += 1

    def _finish(self) -> None:
        for state in self._states.values():
            if state.call is not None and state.stream.method == "Console":
                self._compare_console(state.stream.records[-1], state)


def _shadow_difference(expected: device_pb2.WatchResponse, got: device_pb2.WatchResponse) -> tuple[str, str] | None:
    """For two shadow updates with the same registers: the first register whose value differs, both ways."""
    if not (expected.HasField("shadow") and got.HasField("shadow")):
        return None
    pairs = list(zip(expected.shadow.values, got.shadow.values, strict=False))
    if len(expected.shadow.values) != len(got.shadow.values) or any(
            (a.device, a.region, a.offset) != (b.device, b.region, b.offset) for a, b in pairs):
        return None
    def show(v: device_pb2.ShadowValue) -> str:
        return (f"shadow register {v.device}/{v.region}+0x{v.offset:x} = "
                f"0x{int.from_bytes(v.data, 'little'):0{2 * len(v.data)}x} (in an update of {len(pairs)})")

    return next(((show(a), show(b)) for a, b in pairs if a.data != b.data), None)


def expected_mode(chunks: list[Message]) -> bool:
    return bool(chunks and chunks[0].mirror_enabled)  # type: ignore[attr-defined]


def _mirror_bytes(chunks: list[Message]) -> bytes:
    out = bytearray()
    for chunk in chunks:
        offset, data = chunk.offset, chunk.data  # type: ignore[attr-defined]
        if len(out) < offset:
            out += bytes(offset - len(out))
        out[offset:offset + len(data)] = data
    return bytes(out.rstrip(b"\0"))


def grpc_code_name(code: int) -> str:
    return next((c.name for c in grpc.StatusCode if c.value[0] == code), str(code))


def resolve_targets(recording: Recording, specs: list[str]) -> dict[int, str]:
    """``ADDR`` (a recording of one service) or ``NAME=ADDR`` per service; NAME is the recorded address, the
    Describe service_name (when unique) or the service's index. Every recorded service needs one."""
    services = recording.services
    names: dict[str, int] = {}
    counts: dict[str, int] = {}
    for service in services:
        counts[service.describe.service_name] = counts.get(service.describe.service_name, 0) + 1
    for n, service in enumerate(services):
        names[str(n)] = n
        names[service.name] = n
        if counts[service.describe.service_name] == 1:
            names[service.describe.service_name] = n
    targets: dict[int, str] = {}
    for spec in specs:
        name, sep, address = spec.rpartition("=")
        if not sep:
            if len(services) != 1:
                raise ReplayError(f"the recording has {len(services)} device services; name each: NAME=ADDR with NAME "
                                  f"one of {', '.join(_labels(recording))}")
            targets[0] = spec
            continue
        if name not in names:
            raise ReplayError(f"{name!r} is not a service of the recording (its services: "
                              f"{', '.join(_labels(recording))})")
        targets[names[name]] = address
    missing = [label for n, label in enumerate(_labels(recording)) if n not in targets]
    if missing:
        raise ReplayError(f"no --device-service for {', '.join(missing)}")
    return targets


def _labels(recording: Recording) -> Iterator[str]:
    for n, service in enumerate(recording.services):
        yield f"{n} ({service.describe.service_name} at {service.name})"
