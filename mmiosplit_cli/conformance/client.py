"""The suite's side of the wire: a device service seen only through its gRPC API, as a third party sees it.

Every wait has a timeout: a stream's responses are read on a thread of their own into a queue, so a service
that hangs makes a check fail with a reason instead of hanging the run.
"""

from __future__ import annotations

import queue
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from mmiosplit import security
from mmiosplit.v1 import device_pb2, device_pb2_grpc
from mmiosplit.wire import GRPC_OPTIONS, PROTOCOL_VERSION


class CheckFailed(Exception):
    """The service did something the contract forbids (the message says what)."""


class CheckSkipped(Exception):
    """The service declares nothing this check needs."""


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """How a stream ended: None for OK, else the gRPC status code and details."""

    code: grpc.StatusCode | None
    details: str


class StreamClosed(CheckFailed):
    """A stream ended while the check waited for a message on it."""

    def __init__(self, what: str, ended: StreamEnded) -> None:
        how = "normally" if ended.code is None else f"with {ended.code.name}: {ended.details}"
        super().__init__(f"{what}: the stream ended {how}")
        self.ended = ended


_END = object()


class Stream:
    """A bidirectional stream: ``send`` queues a request, ``recv`` waits at most ``timeout`` for a response.

    ``on_message`` (optional) sees every response on the reader thread first; it returns True when it handled
    the message itself (a DMA request the suite answers), which then does not reach ``recv``.
    """

    def __init__(self, method: Any, timeout: float, what: str,
                 on_message: Callable[[Any], bool] | None = None) -> None:
        self.what = what
        self._requests: queue.Queue[object] = queue.Queue()
        self._responses: queue.Queue[object] = queue.Queue()
        self._on_message = on_message
        self.ended: StreamEnded | None = None
        self.call = method(self._iterate(), timeout=timeout)
        self._reader = threading.Thread(target=self._read, name=f"conformance-{what}", daemon=True)
        self._reader.start()

    def _iterate(self) -> Iterator[Any]:
        while (item := self._requests.get()) is not _END:
            yield item

    def _read(self) -> None:
        try:
            for message in self.call:
                if self._on_message is not None and self._on_message(message):
                    continue
                self._responses.put(message)
            ended = StreamEnded(None, "")
        except grpc.RpcError as exc:
            ended = StreamEnded(exc.code(), exc.details() or "")
        except Exception as exc:  # a response the stubs could not parse, a failing on_message
            ended = StreamEnded(grpc.StatusCode.UNKNOWN, f"client side: {exc!r}")
        self.ended = ended
        self._responses.put(ended)

    def send(self, message: Any) -> None:
        self._requests.put(message)

    def close_send(self) -> None:
        """Half-close: the service sees the end of the requests."""
        self._requests.put(_END)

    def recv(self, timeout: float, what: str = "a response") -> Any:
        """The next response; CheckFailed when none comes within ``timeout`` or the stream ended."""
        try:
            item = self._responses.get(timeout=timeout)
        except queue.Empty:
            raise CheckFailed(f"{self.what}: nothing within {timeout:g} s while waiting for {what}") from None
        if isinstance(item, StreamEnded):
            self._responses.put(item)  # every later recv sees the end too
            raise StreamClosed(f"{self.what}: waiting for {what}", item)
        return item

    def poll(self, timeout: float) -> Any | None:
        """The next response within ``timeout``, or None (also when the stream ended)."""
        try:
            item = self._responses.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(item, StreamEnded):
            self._responses.put(item)
            return None
        return item

    def cancel(self) -> None:
        self.close_send()
        self.call.cancel()


def _short(message: Any) -> str:
    return " ".join(str(message).split())[:200]


def short(message: Any) -> str:
    """A protobuf message on one line, cut short, for a failure reason."""
    return _short(message)


def status_name(status: int) -> str:
    return str(device_pb2.CompletionStatus.Name(status))  # type: ignore[arg-type]


class Target:
    """The service under test: its channel, stubs, description, and the streams each check opened."""

    def __init__(self, address: str, timeout: float, vm_id: str) -> None:
        self.address = address
        self.timeout = timeout
        self.vm_id = vm_id
        self.channel = security.channel(address)
        self.stub = device_pb2_grpc.DeviceServiceStub(self.channel)
        self._describe: device_pb2.DescribeResponse | None = None
        self._streams: list[Stream] = []
        self._lock = threading.Lock()

    def close(self) -> None:
        self.cancel_streams()
        self.channel.close()

    # --- description --------------------------------------------------------------------------

    def describe(self) -> device_pb2.DescribeResponse:
        if self._describe is None:
            self._describe = self.stub.Describe(device_pb2.DescribeRequest(), timeout=self.timeout)
        return self._describe

    def devices(self, type_name: str) -> list[device_pb2.Device]:
        return [d for d in self.describe().devices if d.type == type_name]

    def regions(self) -> list[tuple[device_pb2.Device, device_pb2.Region]]:
        return [(d, r) for d in self.describe().devices for r in d.regions]

    def unmapped_address(self) -> int:
        """An address no declared region covers (just above the highest one, or 0x1000 below the lowest)."""
        spans = sorted((r.base, r.base + r.size) for _, r in self.regions())
        candidates = [0x1000] + [end + 0x1000 for _, end in spans] + [start - 0x1000 for start, _ in spans]
        for address in candidates:
            if 0 <= address < 1 << 64 and not any(lo <= address < hi for lo, hi in spans):
                return address & ~0xFFF
        raise CheckSkipped("every address is covered by a region")

    # --- streams ------------------------------------------------------------------------------

    def stream(self, method: Any, what: str, on_message: Callable[[Any], bool] | None = None) -> Stream:
        """A stream that is cancelled at the end of the check that opened it. Its RPC deadline is a few check
        timeouts: every wait on it is bounded separately."""
        s = Stream(method, self.timeout * 4, what, on_message)
        with self._lock:
            self._streams.append(s)
        return s

    def cancel_streams(self) -> None:
        with self._lock:
            streams, self._streams = self._streams, []
        for s in streams:
            s.cancel()

    def exits(self, session_id: str = "", last_acked: int = 0, vm_id: str | None = None,
              open_: bool = True) -> ExitClient:
        client = ExitClient(self, session_id, last_acked, self.vm_id if vm_id is None else vm_id)
        if open_:
            client.open()
        return client

    def watch(self, windows: list[device_pb2.DmaWindow] | None = None, vm_id: str | None = None,
              on_message: Callable[[Any], bool] | None = None) -> Stream:
        s = self.stream(self.stub.Watch, "Watch", on_message)
        s.send(device_pb2.WatchRequest(vm_id=self.vm_id if vm_id is None else vm_id, dma_windows=windows or []))
        return s

    def reset(self, vm_id: str | None = None) -> device_pb2.ResetResponse:
        return self.stub.Reset(device_pb2.ResetRequest(vm_id=self.vm_id if vm_id is None else vm_id),
                               timeout=self.timeout)


def new_session_id() -> str:
    return f"conformance-{uuid.uuid4().hex}"


class ExitClient:
    """One ExitStream, numbered as a vCPU numbers it; responses are matched by order, and checked against
    the request's seq only where a check says so."""

    def __init__(self, target: Target, session_id: str, last_acked: int, vm_id: str) -> None:
        self.target = target
        self.session_id = session_id
        self.last_acked = last_acked
        self.vm_id = vm_id
        self.stream = target.stream(target.stub.ExitStream, "ExitStream")
        self.seq = last_acked
        self.ack = last_acked
        self.welcome: device_pb2.StreamWelcome | None = None

    def hello(self, version: int = PROTOCOL_VERSION) -> device_pb2.ExitStreamRequest:
        return device_pb2.ExitStreamRequest(seq=0, hello=device_pb2.StreamHello(
            protocol_version=version, vm_id=self.vm_id, vcpu_id=0, session_id=self.session_id,
            last_acked=self.last_acked))

    def open(self) -> device_pb2.StreamWelcome:
        self.stream.send(self.hello())
        response = self.stream.recv(self.target.timeout, "the welcome")
        if response.WhichOneof("body") != "welcome":
            raise CheckFailed(f"the handshake was answered with {short(response)}, not a welcome")
        if response.seq != 0:
            raise CheckFailed(f"the welcome has seq {response.seq}, not the hello's 0")
        self.welcome = response.welcome
        return self.welcome

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def exit_msg(self, address: int, length: int, data: bytes | None = None,
                 posted: list[tuple[int, bytes]] | None = None, deadline_ms: int = 0) -> device_pb2.MmioExit:
        """An MmioExit as a vCPU builds it (device and region filled in when a declared region covers it)."""
        ex = device_pb2.MmioExit(vcpu_id=0, address=address, length=length, deadline_ms=deadline_ms,
                                 direction=device_pb2.ACCESS_DIRECTION_WRITE if data is not None
                                 else device_pb2.ACCESS_DIRECTION_READ)
        if data is not None:
            ex.data = data
        for dev, region in self.target.regions():
            if region.base <= address < region.base + region.size:
                ex.device, ex.region, ex.region_offset = dev.name, region.name, address - region.base
                break
        if posted is not None:
            ex.posted.CopyFrom(pack_posted(posted))
        return ex

    def send(self, request: device_pb2.ExitStreamRequest) -> int:
        request.ack = self.ack
        self.stream.send(request)
        return request.seq

    def send_exit(self, address: int, length: int, data: bytes | None = None,
                  posted: list[tuple[int, bytes]] | None = None, seq: int | None = None) -> int:
        return self.send(device_pb2.ExitStreamRequest(seq=self.next_seq() if seq is None else seq,
                                                      exit=self.exit_msg(address, length, data, posted)))

    def send_flush(self, writes: list[tuple[int, bytes]] | device_pb2.PostedWrites) -> int:
        batch = writes if isinstance(writes, device_pb2.PostedWrites) else pack_posted(writes)
        return self.send(device_pb2.ExitStreamRequest(seq=self.next_seq(), flush=batch))

    def cancel(self, seq: int) -> None:
        self.stream.send(device_pb2.ExitStreamRequest(seq=seq, cancel=device_pb2.Cancel(), ack=self.ack))

    def recv(self, what: str = "a completion") -> device_pb2.ExitStreamResponse:
        response = self.stream.recv(self.target.timeout, what)
        if response.WhichOneof("body") != "completion":
            raise CheckFailed(f"expected a completion, got {short(response)}")
        self.ack = max(self.ack, response.seq)
        return response

    def completion(self, seq: int, what: str) -> device_pb2.Completion:
        """The next response, which must be ``seq``'s."""
        response = self.recv(what)
        if response.seq != seq:
            raise CheckFailed(f"{what}: the response has seq {response.seq}, expected {seq}")
        return response.completion

    def ok(self, seq: int, what: str) -> device_pb2.Completion:
        done = self.completion(seq, what)
        if done.status != device_pb2.COMPLETION_STATUS_OK:
            raise CheckFailed(f"{what}: {status_name(done.status)} ({done.error or 'no error text'})")
        return done

    def read(self, address: int, length: int) -> bytes:
        seq = self.send_exit(address, length)
        done = self.ok(seq, f"the {length}-byte read at {address:#x}")
        if len(done.data) != length:
            raise CheckFailed(f"the {length}-byte read at {address:#x} returned {len(done.data)} bytes")
        return bytes(done.data)

    def read32(self, address: int) -> int:
        return int.from_bytes(self.read(address, 4), "little")

    def write(self, address: int, data: bytes) -> device_pb2.Completion:
        seq = self.send_exit(address, len(data), data)
        return self.ok(seq, f"the {len(data)}-byte write of {data.hex()} at {address:#x}")

    def write32(self, address: int, value: int) -> device_pb2.Completion:
        return self.write(address, value.to_bytes(4, "little"))


def pack_posted(writes: list[tuple[int, bytes]]) -> device_pb2.PostedWrites:
    return device_pb2.PostedWrites(address=[a for a, _ in writes], length=[len(d) for _, d in writes],
                                   data=b"".join(d for _, d in writes))


def channel_options(max_send: int) -> list[tuple[str, Any]]:
    """The project's channel options with a send limit of ``max_send`` bytes (to send an oversized message)."""
    return [(k, v) for k, v in GRPC_OPTIONS if k != "grpc.max_send_message_length"] + [
        ("grpc.max_send_message_length", max_send)]
