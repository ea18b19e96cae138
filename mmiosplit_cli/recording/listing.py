"""``mmiosplit replay FILE --list``: a recording as text, one line per record, to read what a guest and its devices
said to each other (and where a divergence happened: the report gives the record's index)."""

from __future__ import annotations

import datetime
from collections.abc import Iterator

from mmiosplit.v1 import device_pb2
from mmiosplit_cli.recording.format import CLOSE, MESSAGE, OPEN, TO_SERVICE, Recording
from mmiosplit_cli.recording.replay import Replayer, describe_completion, grpc_code_name, short


def describe_message(message: object) -> str:
    """A few words for one message: an exit's access, a completion's status and data, else the text format."""
    if isinstance(message, device_pb2.ExitStreamRequest):
        body = message.WhichOneof("body")
        what = Replayer._what(message) if body in ("exit", "flush") else short(message, 160)
        return f"seq {message.seq} {what}" if body in ("exit", "flush", "cancel") else what
    if isinstance(message, device_pb2.ExitStreamResponse) and message.HasField("completion"):
        return f"seq {message.seq} {describe_completion(message.completion)}"
    if isinstance(message, device_pb2.ConsoleResponse):
        return f"output {bytes(message.output)!r}"
    if isinstance(message, device_pb2.ReadMirrorResponse):
        return f"offset 0x{message.offset:x}, {len(message.data)} bytes, mirror_enabled {message.mirror_enabled}"
    return short(message, 160)  # type: ignore[arg-type]


def list_recording(recording: Recording) -> Iterator[str]:
    started = datetime.datetime.fromtimestamp(recording.started_ns / 1e9, datetime.UTC)
    yield (f"{recording.path}: format {recording.format_version}, protocol {recording.protocol_version}, recorded "
           f"{started:%Y-%m-%d %H:%M:%S} UTC, {len(recording.records)} records, {len(recording.streams)} calls")
    for n, service in enumerate(recording.services):
        d = service.describe
        yield f"service {n}: {d.service_name} at {service.name}, devices: " + ", ".join(
            f"{dev.name} ({dev.type})" for dev in d.devices)
    for record in recording.records:
        stream = recording.streams[record.stream]
        arrow = "->" if record.direction == TO_SERVICE else "<-"
        head = f"{record.index:7d} {record.time_us / 1e6:10.6f} s  #{record.stream:<4d} {stream.method:<10s} {arrow}"
        if record.kind == OPEN:
            yield f"{head} open (service {stream.service})"
        elif record.kind == CLOSE:
            code, details = recording.close_status(record)
            yield f"{head} close {grpc_code_name(code)}" + (f": {details}" if details else "")
        elif record.kind == MESSAGE:
            yield f"{head} {describe_message(recording.decode(record))}"
