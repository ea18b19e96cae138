"""The recording file: every message exchanged with each device service, in the order the recorder saw them.

The byte layout is documented in ``docs/recording.md``; this module is its only reader and writer. Payloads are the
exact protobuf bytes that crossed the wire, so a reader of another language needs only the ``.proto`` files.
"""

from __future__ import annotations

import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from google.protobuf.message import DecodeError, Message

from mmiosplit.v1 import device_pb2

MAGIC = b"\x89MMIOREC"
FORMAT_VERSION = 1

# Record kinds (the tag byte is kind << 1 | direction).
CHECK = 0
OPEN = 1
MESSAGE = 2
CLOSE = 3
END = 4
KIND_NAMES = {CHECK: "check", OPEN: "open", MESSAGE: "message", CLOSE: "close", END: "end"}

# Directions.
TO_SERVICE = 0
FROM_SERVICE = 1

#: A CHECK record follows at most this many bytes of records.
CHECK_EVERY = 64 * 1024
#: Tag bit: the payload is zlib-compressed (payloads of at least COMPRESS_FROM bytes that shrink by a quarter: ROMD
#: contents, large DMA).
COMPRESSED = 0x80
COMPRESS_FROM = 1024

#: Method name -> (request type, response type, request streaming, response streaming).
METHODS: dict[str, tuple[type[Message], type[Message], bool, bool]] = {
    "Describe": (device_pb2.DescribeRequest, device_pb2.DescribeResponse, False, False),
    "ExitStream": (device_pb2.ExitStreamRequest, device_pb2.ExitStreamResponse, True, True),
    "Reset": (device_pb2.ResetRequest, device_pb2.ResetResponse, False, False),
    "Console": (device_pb2.ConsoleRequest, device_pb2.ConsoleResponse, True, True),
    "ReadMirror": (device_pb2.ReadMirrorRequest, device_pb2.ReadMirrorResponse, False, True),
    "Watch": (device_pb2.WatchRequest, device_pb2.WatchResponse, True, True),
}


class RecordingError(ValueError):
    """A recording that cannot be read: the message names the file and the byte offset."""


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


@dataclass(frozen=True)
class RecordedService:
    """One device service of the recording: the address ``run`` was given, and what it described."""

    name: str
    describe: device_pb2.DescribeResponse


@dataclass(frozen=True)
class Record:
    """One record: ``index`` counts every OPEN, MESSAGE and CLOSE from 0 (the global order); ``time_us`` is since
    the recording started; ``offset`` is where the record starts in the file."""

    index: int
    kind: int
    direction: int
    stream: int
    time_us: int
    payload: bytes
    offset: int


@dataclass
class Stream:
    """What an OPEN record said: which service and which RPC (``method``), and its records in order."""

    id: int
    service: int
    method: str
    records: list[Record] = field(default_factory=list)

    def message_type(self, direction: int) -> type[Message]:
        request, response, _, _ = METHODS[self.method]
        return request if direction == TO_SERVICE else response


@dataclass
class Recording:
    path: str
    format_version: int
    protocol_version: int
    started_ns: int
    services: list[RecordedService]
    records: list[Record]
    streams: dict[int, Stream]
    #: With ``read_recording(partial=True)``: why the file could not be read to its end ("" when it could).
    error: str = ""

    def decode(self, record: Record) -> Message:
        """The protobuf of a MESSAGE record (decoded when the file was read, so this cannot fail)."""
        message = self.streams[record.stream].message_type(record.direction)()
        message.ParseFromString(record.payload)
        return message

    def close_status(self, record: Record) -> tuple[int, str]:
        code, at = _read_varint(record.payload, 0, len(record.payload))
        return code, record.payload[at:].decode("utf-8", "replace")


class Recorder:
    """Appends records to a file from any thread; the lock gives the one global order."""

    def __init__(self, path: str | Path, services: list[RecordedService], protocol_version: int) -> None:
        self.path = str(path)
        self._file: BinaryIO = open(path, "wb")  # noqa: SIM115 (closed by close())
        self._lock = threading.Lock()
        self._streams = 0
        self._count = 0
        self._crc = 0
        self._since_check = 0
        self._closed = False
        self._started_ns = time.time_ns()
        self._t0 = time.monotonic_ns()
        self._last_us = 0
        body = bytearray(_varint(len(services)))
        for service in services:
            name = service.name.encode()
            describe = service.describe.SerializeToString()
            body += _varint(len(name)) + name + _varint(len(describe)) + describe
        header = bytearray(MAGIC)
        header += struct.pack("<HHQI", FORMAT_VERSION, protocol_version, self._started_ns, len(body))
        header += body
        header += struct.pack("<I", zlib.crc32(header))
        self._file.write(header)
        #: Bytes written so far (for the report).
        self.size = len(header)

    def open_stream(self, service: int, method: str) -> int:
        with self._lock:
            self._streams += 1
            stream = self._streams
            self._append(OPEN, TO_SERVICE, stream, _varint(service) + method.encode())
        return stream

    def message(self, stream: int, direction: int, payload: bytes) -> None:
        with self._lock:
            self._append(MESSAGE, direction, stream, payload)

    def close_stream(self, stream: int, direction: int, code: int, details: str) -> None:
        with self._lock:
            self._append(CLOSE, direction, stream, _varint(code) + details.encode())

    def _append(self, kind: int, direction: int, stream: int, payload: bytes) -> None:
        if self._closed:
            return
        now_us = (time.monotonic_ns() - self._t0) // 1000
        delta = max(0, now_us - self._last_us)
        self._last_us = max(self._last_us, now_us)
        tag = kind << 1 | direction
        if len(payload) >= COMPRESS_FROM:
            packed = zlib.compress(payload, 6)
            if len(packed) <= len(payload) * 3 // 4:
                tag |= COMPRESSED
                payload = packed
        data = bytes([tag]) + _varint(stream) + _varint(delta) + _varint(len(payload)) + payload
        self._file.write(data)
        self.size += len(data)
        if kind != CHECK:
            self._count += 1
            self._crc = zlib.crc32(data, self._crc)
            self._since_check += len(data)
            if self._since_check >= CHECK_EVERY:
                self._check()

    def _check(self) -> None:
        crc = self._crc
        self._crc = 0
        self._since_check = 0
        self._append(CHECK, TO_SERVICE, 0, struct.pack("<I", crc))
        self._file.flush()  # a recorder that dies loses at most the block after this

    @property
    def records(self) -> int:
        return self._count

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._check()
            end = _varint(self._count)
            data = bytes([END << 1]) + _varint(0) + _varint(0) + _varint(len(end)) + end
            self._file.write(data)
            self.size += len(data)
            self._closed = True
            self._file.close()


def _read_varint(data: bytes, at: int, end: int) -> tuple[int, int]:
    """(value, offset after it); IndexError past ``end``, ValueError when longer than 10 bytes."""
    value = shift = 0
    for n in range(10):
        if at + n >= end:
            raise IndexError
        byte = data[at + n]
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at + n + 1
    raise ValueError


class _Reader:
    def __init__(self, path: str, data: bytes) -> None:
        self.path = path
        self.data = data
        self.at = 0

    def fail(self, offset: int, what: str) -> RecordingError:
        return RecordingError(f"{self.path}: offset {offset} (0x{offset:x}): {what}")

    def varint(self, what: str) -> int:
        start = self.at
        try:
            value, self.at = _read_varint(self.data, self.at, len(self.data))
        except IndexError:
            raise self.fail(start, f"truncated: the file ends inside the {what}") from None
        except ValueError:
            raise self.fail(start, f"corrupt: the {what} is not a valid varint") from None
        return value

    def take(self, n: int, what: str) -> bytes:
        if self.at + n > len(self.data):
            raise self.fail(self.at, f"truncated: the {what} needs {n} bytes, the file has "
                            f"{len(self.data) - self.at} left")
        out = self.data[self.at:self.at + n]
        self.at += n
        return out


def read_recording(path: str | Path, partial: bool = False) -> Recording:
    """Read and check a whole recording; RecordingError (naming the file and offset) when it is truncated or
    corrupt, or was not written to its end (the recorder was killed). With ``partial``, a file whose header is
    sound gives the records before the damage, and the error in ``Recording.error`` (the records after the last
    checksum are then unchecked): what a run that crashed had exchanged."""
    name = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise RecordingError(f"{name}: cannot read it ({exc.strerror or exc})") from None
    r = _Reader(name, data)
    if data[:len(MAGIC)] != MAGIC:
        raise r.fail(0, "not an mmiosplit recording (bad magic)")
    r.at = len(MAGIC)
    version, protocol, started, length = struct.unpack("<HHQI", r.take(16, "header"))
    if version != FORMAT_VERSION:
        raise r.fail(len(MAGIC), f"format version {version}; this reader knows version {FORMAT_VERSION}")
    header_end = r.at + length
    if header_end + 4 > len(data):
        raise r.fail(r.at, f"truncated: the header needs {length + 4} more bytes, the file has {len(data) - r.at}")
    (crc,) = struct.unpack("<I", data[header_end:header_end + 4])
    if crc != zlib.crc32(data[:header_end]):
        raise r.fail(0, f"corrupt: the header checksum does not match (header of {header_end} bytes)")
    services: list[RecordedService] = []
    for _ in range(r.varint("service count")):
        service_name = r.take(r.varint("service name length"), "service name").decode("utf-8", "replace")
        at = r.at
        raw = r.take(r.varint("Describe length"), "Describe")
        describe = device_pb2.DescribeResponse()
        try:
            describe.ParseFromString(raw)
        except DecodeError:
            raise r.fail(at, f"corrupt: the Describe of service {service_name!r} does not parse") from None
        services.append(RecordedService(service_name, describe))
    if r.at != header_end:
        raise r.fail(r.at, f"corrupt: the header's services end at offset {r.at}, its length says {header_end}")
    r.at = header_end + 4
    records: list[Record] = []
    streams: dict[int, Stream] = {}
    recording = Recording(name, version, protocol, started, services, records, streams)
    try:
        _read_records(r, recording)
    except RecordingError as exc:
        if not partial:
            raise
        recording.error = str(exc)
    return recording


def _read_records(r: _Reader, recording: Recording) -> None:
    data, records, streams, services = r.data, recording.records, recording.streams, recording.services
    block_start = r.at
    crc = 0
    time_us = 0
    while True:
        start = r.at
        if start >= len(data):
            raise r.fail(start, f"truncated: the file ends after {len(records)} records without an end record "
                         "(the recording was cut short)")
        tag = data[start]
        r.at += 1
        kind, direction = (tag & ~COMPRESSED) >> 1, tag & 1
        if kind not in KIND_NAMES:
            raise r.fail(start, f"corrupt: unknown record kind {kind} (tag byte 0x{tag:02x})")
        stream_id = r.varint("stream id")
        time_us += r.varint("time delta")
        payload = r.take(r.varint("payload length"), "payload")
        crc_end = r.at
        if tag & COMPRESSED:
            try:
                payload = zlib.decompress(payload)
            except zlib.error:
                raise r.fail(start, "corrupt: a compressed payload does not decompress") from None
        if kind == CHECK:
            if len(payload) != 4 or struct.unpack("<I", payload)[0] != crc:
                raise r.fail(block_start, f"corrupt: the records from offset {block_start} to {start} do not match "
                             "their checksum")
            block_start = r.at
            crc = 0
            continue
        if kind == END:
            if crc or block_start != start:
                raise r.fail(start, "corrupt: records between the last checksum and the end record")
            try:
                count, _ = _read_varint(payload, 0, len(payload))
            except (IndexError, ValueError):
                raise r.fail(start, "corrupt: the end record's count does not parse") from None
            if count != len(records):
                raise r.fail(start, f"corrupt: the end record counts {count} records, the file has {len(records)}")
            if r.at != len(data):
                raise r.fail(r.at, f"corrupt: {len(data) - r.at} bytes after the end record")
            break
        crc = zlib.crc32(data[start:crc_end], crc)
        record = Record(len(records), kind, direction, stream_id, time_us, payload, start)
        if kind == OPEN:
            if stream_id in streams:
                raise r.fail(start, f"corrupt: stream {stream_id} opened twice")
            try:
                service, at = _read_varint(payload, 0, len(payload))
            except (IndexError, ValueError):
                raise r.fail(start, "corrupt: an open record without a service index") from None
            method = payload[at:].decode("utf-8", "replace")
            if service >= len(services) or method not in METHODS:
                raise r.fail(start, f"corrupt: stream {stream_id} opens {method!r} on service {service} (the "
                             f"recording has {len(services)} service(s))")
            streams[stream_id] = Stream(stream_id, service, method)
        elif stream_id not in streams:
            raise r.fail(start, f"corrupt: a {KIND_NAMES[kind]} record for stream {stream_id}, never opened")
        stream = streams[stream_id]
        if kind == MESSAGE:
            try:
                stream.message_type(direction)().ParseFromString(payload)
            except DecodeError:
                raise r.fail(start, f"corrupt: the {stream.method} message does not parse") from None
        records.append(record)
        stream.records.append(record)


def iter_messages(recording: Recording) -> Iterator[tuple[Record, Stream, Message]]:
    """Every MESSAGE record with its stream and decoded protobuf, in the global order."""
    for record in recording.records:
        if record.kind == MESSAGE:
            stream = recording.streams[record.stream]
            yield record, stream, recording.decode(record)
