"""The conformance checks: each drives a running device service over gRPC, with no guest and no CPU.

A check is a function of the ``Target`` that returns when the service did what the contract
(``proto/mmiosplit/v1/device.proto``, ``docs/protocol.md``) says, raises ``CheckFailed`` with the reason when it
did not, and ``CheckSkipped`` when the service declares nothing the check needs. What each one asserts, and
which device types it needs, is in ``docs/conformance.md``; the names are stable.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mmiosplit import security
from mmiosplit.mmio import check_shadow_windows
from mmiosplit.v1 import device_pb2
from mmiosplit.wire import PROTOCOL_VERSION
from mmiosplit_cli.conformance.client import (
    CheckFailed,
    CheckSkipped,
    ExitClient,
    Stream,
    StreamClosed,
    Target,
    channel_options,
    new_session_id,
    short,
    status_name,
)
from mmiosplit_cli.conformance.defaults import DEFAULT_MAX_MESSAGE

OK = device_pb2.COMPLETION_STATUS_OK
BAD_REQUEST = device_pb2.COMPLETION_STATUS_BAD_REQUEST
DEVICE_ERROR = device_pb2.COMPLETION_STATUS_DEVICE_ERROR
NO_DEVICE = device_pb2.COMPLETION_STATUS_NO_DEVICE
CANCELLED = device_pb2.COMPLETION_STATUS_CANCELLED
FP = grpc.StatusCode.FAILED_PRECONDITION

# PL011 registers and bits the suite uses (ARM DDI 0183).
UART_DR, UART_FR, UART_IMSC, UART_ICR = 0x000, 0x018, 0x038, 0x044
FR_RXFE = 1 << 4
INT_RX, INT_TX, INT_RT = 1 << 4, 1 << 5, 1 << 6

# dma-probe registers (device_service/models/dma_probe.py's documented interface).
DMA_ADDR_LO, DMA_ADDR_HI, DMA_LEN, DMA_CMD, DMA_STATUS, DMA_DONE, DMA_BUF = 0x00, 0x04, 0x08, 0x0C, 0x10, 0x14, 0x100
DMA_CMD_READ, DMA_CMD_WRITE = 1, 2
DMA_STATUS_DONE, DMA_STATUS_ERROR = 0, 2

# irq-probe registers (device_service/models/irq_probe.py's documented interface).
PROBE_FIRE, PROBE_ACK, PROBE_DELAY = 0x00, 0x04, 0x08

#: The guest memory the suite plays for the DMA checks, and the window it grants.
DMA_WINDOW = device_pb2.DmaWindow(name="conformance", base=0x4000_0000, size=0x1000)

#: A scratch device whose accesses take at least this long can hold a later request behind it for a Cancel.
MIN_SLOW_US = 50_000
#: The other VM the scoping check plays.
OTHER_VM_SUFFIX = "-other"


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    run: Callable[[Target], None]
    doc: str


CHECKS: list[Check] = []


def check(name: str) -> Callable[[Callable[[Target], None]], Callable[[Target], None]]:
    """Register a check under its stable ``name``; its docstring is what it asserts."""

    def register(fn: Callable[[Target], None]) -> Callable[[Target], None]:
        CHECKS.append(Check(name, fn, " ".join((fn.__doc__ or "").split())))
        return fn

    return register


def expect(condition: bool, reason: str) -> None:
    if not condition:
        raise CheckFailed(reason)


# ----- what the service hosts ---------------------------------------------------------------------------------

def _first(target: Target, type_name: str, why: str) -> device_pb2.Device:
    devices = target.devices(type_name)
    if not devices:
        raise CheckSkipped(f"no {type_name} device declared ({why})")
    return devices[0]


def _scratch(target: Target, slow: bool = False, prefer_posted: bool = False) -> device_pb2.Region:
    """A scratch device's region: a slow one (delay= at least MIN_SLOW_US) or a fast one."""
    found: list[device_pb2.Region] = []
    for dev in target.devices("scratch"):
        delay = _int_property(dev, "delay")
        if (delay >= MIN_SLOW_US) if slow else delay == 0:
            found.extend(r for r in dev.regions if r.size >= 0x40 and r.kind == device_pb2.REGION_KIND_MMIO)
    if not found:
        what = f"with delay= of at least {MIN_SLOW_US} us" if slow else "without delay="
        raise CheckSkipped(f"no scratch device {what} declared")
    if prefer_posted:
        found.sort(key=lambda r: not r.posted)
    return found[0]


def _needs(target: Target, feature: str) -> None:
    """Skip unless the service lists ``feature`` (docs/protocol.md, "Versions and features")."""
    if feature not in target.describe().features:
        raise CheckSkipped(f"the service does not list feature {feature!r}")


def _sizes(region: device_pb2.Region) -> set[int]:
    """The access sizes a region takes (empty in Describe: all four)."""
    return set(region.access_sizes) or {1, 2, 4, 8}


def _int_property(dev: device_pb2.Device, key: str) -> int:
    """A numeric property of Describe's (0 when absent or not a number)."""
    try:
        return int(dev.properties.get(key, "0") or "0", 0)
    except ValueError:
        return 0


def _region(dev: device_pb2.Device) -> device_pb2.Region:
    return dev.regions[0]


def _expect_rpc_error(call: Callable[[], Any], code: grpc.StatusCode, what: str) -> str:
    """``call`` (a unary call, or a server-streaming one, read to its end) fails with ``code``; its details."""
    try:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, bytes):
            list(result)
    except grpc.RpcError as exc:
        expect(exc.code() == code, f"{what}: {exc.code().name} ({exc.details()}), expected {code.name}")
        return str(exc.details() or "")
    raise CheckFailed(f"{what}: succeeded, expected {code.name}")


# ----- handshake and description ------------------------------------------------------------------------------

@check("describe.well_formed")
def describe_well_formed(target: Target) -> None:
    """Describe names the service, speaks this protocol version, has an instance id, and declares devices with
    unique names, regions of sane size that do not overlap, access sizes among 1, 2, 4, 8 (none: all four), shadow
    windows inside their region at a size it takes and not overlapping, and unique line indexes."""
    d = target.describe()
    expect(bool(d.service_name), "service_name is empty")
    expect(d.protocol_version == PROTOCOL_VERSION, f"protocol_version {d.protocol_version}, this suite speaks "
           f"{PROTOCOL_VERSION}")
    expect(bool(d.instance_id), "instance_id is empty")
    expect(bool(d.devices), "no devices declared")
    names = [dev.name for dev in d.devices]
    expect(len(set(names)) == len(names), f"device names repeat: {names}")
    spans = []
    for dev in d.devices:
        expect(bool(dev.name) and bool(dev.type), f"a device without a name or type: {short(dev)}")
        expect(bool(dev.regions), f"device {dev.name} declares no region")
        region_names = [r.name for r in dev.regions]
        expect(len(set(region_names)) == len(region_names), f"{dev.name}: region names repeat: {region_names}")
        for r in dev.regions:
            where = f"{dev.name}/{r.name}"
            expect(r.size > 0, f"{where}: size 0")
            expect(r.base + r.size <= 1 << 64, f"{where}: {r.base:#x}+{r.size:#x} passes the end of the address space")
            expect(r.kind in (device_pb2.REGION_KIND_UNSPECIFIED, device_pb2.REGION_KIND_MMIO,
                              device_pb2.REGION_KIND_ROMD), f"{where}: unknown kind {r.kind}")
            expect(set(r.access_sizes) <= {1, 2, 4, 8},
                   f"{where}: access sizes {list(r.access_sizes)}, expected some of 1, 2, 4, 8 (or none: all four)")
            try:  # the check a vcpu service applies to the shadow windows of a Describe
                check_shadow_windows(where, r.size, sorted(_sizes(r)), [(w.offset, w.size) for w in r.shadows])
            except ValueError as exc:
                raise CheckFailed(str(exc)) from None
            spans.append((r.base, r.base + r.size, where))
        indexes = [line.index for line in dev.lines]
        expect(len(set(indexes)) == len(indexes), f"{dev.name}: line indexes repeat: {indexes}")
        for line in dev.lines:
            expect(line.trigger in (device_pb2.LINE_TRIGGER_UNSPECIFIED, device_pb2.LINE_TRIGGER_LEVEL,
                                    device_pb2.LINE_TRIGGER_EDGE), f"{dev.name}: line {line.index}: unknown trigger "
                   f"{line.trigger}")
    spans.sort()
    for (_, end, a), (start, _, b) in itertools.pairwise(spans):
        expect(start >= end, f"regions {a} and {b} overlap")


@check("handshake.welcome")
def handshake_welcome(target: Target) -> None:
    """A hello with this protocol version gets a welcome with seq 0, the same version, and the instance id and
    features Describe gave; a new session is not resumed and has applied nothing."""
    exits = target.exits(session_id=new_session_id())
    w = exits.welcome
    assert w is not None
    expect(w.protocol_version == PROTOCOL_VERSION, f"welcome says protocol version {w.protocol_version}")
    expect(w.instance_id == target.describe().instance_id,
           f"welcome instance_id {w.instance_id!r} differs from Describe's {target.describe().instance_id!r}")
    expect(not w.resumed and w.applied == 0, f"a new session was welcomed resumed={w.resumed} applied={w.applied}")
    features = list(target.describe().features)
    expect(list(w.features) == features, f"the welcome lists features {list(w.features)}, Describe {features}")


@check("handshake.version_refused")
def handshake_version_refused(target: Target) -> None:
    """A hello with a protocol version the service does not speak ends the stream with FAILED_PRECONDITION,
    and no welcome."""
    exits = target.exits(open_=False)
    exits.stream.send(exits.hello(version=PROTOCOL_VERSION + 1000))
    _expect_refused(exits.stream, grpc.StatusCode.FAILED_PRECONDITION, "a hello with protocol version "
                    f"{PROTOCOL_VERSION + 1000}", target.timeout)


@check("handshake.hello_required")
def handshake_hello_required(target: Target) -> None:
    """An ExitStream whose first message is not a hello ends with INVALID_ARGUMENT, and nothing is applied."""
    region = _scratch(target)
    target.reset()
    exits = target.exits(open_=False)
    exits.send_exit(region.base, 4, b"\x5a\x5a\x5a\x5a", seq=1)
    _expect_refused(exits.stream, grpc.StatusCode.INVALID_ARGUMENT, "an exit sent before any hello", target.timeout)
    check_exits = target.exits()
    expect(check_exits.read(region.base, 4) != b"\x5a\x5a\x5a\x5a", "the exit sent without a hello was applied")


def _expect_refused(stream: Stream, code: grpc.StatusCode, what: str, timeout: float) -> None:
    try:
        response = stream.recv(timeout, "the refusal")
    except StreamClosed as closed:
        got = closed.ended.code
        expect(got == code, f"{what}: the stream ended with {got.name if got else 'OK'} "
               f"({closed.ended.details}), expected {code.name}")
        return
    raise CheckFailed(f"{what} was answered with {short(response)}; expected the stream to end with {code.name}")


# ----- accesses -----------------------------------------------------------------------------------------------

@check("access.declared_sizes")
def access_declared_sizes(target: Target) -> None:
    """Every access size a scratch region declares reads back what it wrote, aligned and (scratch being RAM)
    unaligned."""
    region = _scratch(target)
    target.reset()
    exits = target.exits()
    for n, size in enumerate(sorted(_sizes(region))):
        for offset in (0x10 + 0x10 * n, 0x10 + 0x10 * n + 1):
            data = bytes((0xA0 + n * 8 + i + (offset & 1)) & 0xFF for i in range(size))
            exits.write(region.base + offset, data)
            got = exits.read(region.base + offset, size)
            expect(got == data, f"{size}-byte write of {data.hex()} at {region.base + offset:#x} read back {got.hex()}")


@check("access.undeclared_sizes_refused")
def access_undeclared_sizes_refused(target: Target) -> None:
    """A read of a size among 1, 2, 4, 8 that a region does not declare gets DEVICE_ERROR; a length that is none
    of them, or a write whose data is not `length` bytes, gets BAD_REQUEST."""
    exits = target.exits()
    for dev, region in target.regions():
        for size in sorted({1, 2, 4, 8} - _sizes(region)):
            seq = exits.send_exit(region.base, size)
            done = exits.completion(seq, f"{dev.name}/{region.name}: {size}-byte read")
            expect(done.status == DEVICE_ERROR, f"{dev.name}/{region.name} declares sizes "
                   f"{list(region.access_sizes)}; a {size}-byte read at {region.base:#x} got "
                   f"{status_name(done.status)}, expected DEVICE_ERROR")
    # Malformed lengths, where a wrongly accepted write does no harm: a scratch if there is one.
    scratch = [r for d in target.devices("scratch") for r in d.regions]
    region = scratch[0] if scratch else target.regions()[0][1]
    seq = exits.send_exit(region.base, 3)
    done = exits.completion(seq, "a 3-byte read")
    expect(done.status == BAD_REQUEST, f"a 3-byte read got {status_name(done.status)}, expected BAD_REQUEST")
    req = device_pb2.ExitStreamRequest(seq=exits.next_seq(), exit=exits.exit_msg(region.base, 4, b"\x01\x02"))
    done = exits.completion(exits.send(req), "a 4-byte write carrying 2 bytes")
    expect(done.status == BAD_REQUEST, f"a 4-byte write carrying 2 data bytes got {status_name(done.status)}, "
           "expected BAD_REQUEST")


# ----- sequence numbers ---------------------------------------------------------------------------------------

@check("seq.echo")
def seq_echo(target: Target) -> None:
    """Pipelined exits and posted batches are answered once each, in order, each response with its request's
    seq; nothing more comes before the stream ends."""
    region = _scratch(target)
    exits = target.exits()
    sent = []
    for n in range(6):
        if n % 3 == 1:
            sent.append(exits.send_flush([(region.base + 8 * n, n.to_bytes(4, "little"))]))
        elif n % 3 == 2:
            sent.append(exits.send_exit(region.base + 8 * n, 4, n.to_bytes(4, "little")))
        else:
            sent.append(exits.send_exit(region.base, 4))
    got = [exits.recv(f"the response to seq {seq}").seq for seq in sent]
    expect(got == sent, f"requests {sent} were answered with seqs {got}")
    exits.stream.close_send()
    extra = exits.stream.poll(min(target.timeout, 0.5))
    expect(extra is None, f"a response after the last request's: {short(extra)}")
    ended = exits.stream.ended
    expect(ended is None or ended.code is None, f"after its last response the stream ended with "
           f"{ended.code.name if ended and ended.code else ''}: {ended.details if ended else ''}")


@check("seq.skipped_refused")
def seq_skipped_refused(target: Target) -> None:
    """A request that skips a seq gets BAD_REQUEST under its own seq and is not applied; it counts as applied, so
    numbering goes on from it."""
    region = _scratch(target)
    target.reset()
    exits = target.exits()
    exits.read(region.base, 4)
    exits.seq += 1  # skip one
    seq = exits.send_exit(region.base, 4, b"\x33\x33\x33\x33")
    done = exits.completion(seq, f"seq {seq} after {seq - 2}")
    expect(done.status == BAD_REQUEST, f"seq {seq} sent after {seq - 2} got {status_name(done.status)}, expected "
           "BAD_REQUEST")
    got = exits.read(region.base, 4)
    expect(got != b"\x33\x33\x33\x33", "the refused request was applied")


@check("seq.resume_no_reapply")
def seq_resume_no_reapply(target: Target) -> None:
    """On a new stream of the same session (last_acked 0) the service says resumed and applied 2, and answers a
    repeat of seq 1 from memory: write A (seq 1), write B (seq 2), resume, re-send seq 1, read: still B."""
    _needs(target, "sessions")
    region = _scratch(target)
    target.reset()
    session = new_session_id()
    first = target.exits(session_id=session)
    a, b = b"\xaa\x11\xaa\x11", b"\xbb\x22\xbb\x22"
    seq_a = first.send_exit(region.base, 4, a)
    seq_b = first.send_exit(region.base, 4, b)
    first.ok(seq_a, "write A")
    first.ok(seq_b, "write B")
    first.stream.cancel()
    again = target.exits(session_id=session, last_acked=0)
    w = again.welcome
    assert w is not None
    expect(w.resumed, "a new stream of a known session was welcomed with resumed = false")
    expect(w.applied == seq_b, f"the resumed session says applied {w.applied}, expected {seq_b}")
    again.ack = 0
    again.send_exit(region.base, 4, a, seq=seq_a)
    done = again.completion(seq_a, "the repeat of write A")
    expect(done.status == OK, f"the repeat of seq {seq_a} got {status_name(done.status)}, expected its kept "
           "response (OK)")
    again.seq = seq_b
    got = again.read(region.base, 4)
    expect(got == b, f"after the repeat of write A the scratch reads {got.hex()}, expected B {b.hex()}: the repeat "
           "was applied again" if got == a else f"the scratch reads {got.hex()}, expected {b.hex()}")


@check("seq.acked_repeat_refused")
def seq_acked_repeat_refused(target: Target) -> None:
    """A repeat of a seq whose response the client acknowledged (last_acked) gets BAD_REQUEST and is not
    applied."""
    _needs(target, "sessions")
    region = _scratch(target)
    target.reset()
    session = new_session_id()
    first = target.exits(session_id=session)
    a, b = b"\xa1\xa1\xa1\xa1", b"\xb2\xb2\xb2\xb2"
    first.write(region.base, a)
    first.write(region.base, b)
    first.stream.cancel()
    again = target.exits(session_id=session, last_acked=2)
    again.send_exit(region.base, 4, a, seq=1)
    done = again.completion(1, "the repeat of acknowledged seq 1")
    expect(done.status == BAD_REQUEST, f"a repeat of acknowledged seq 1 got {status_name(done.status)}, expected "
           "BAD_REQUEST")
    again.seq = 2
    got = again.read(region.base, 4)
    expect(got == b, f"the scratch reads {got.hex()} after the refused repeat, expected {b.hex()}")


@check("seq.sessionless")
def seq_sessionless(target: Target) -> None:
    """Without a session id nothing is kept: each stream numbers from 1 again (its seq 1 is applied, not taken for a
    repeat), and a hello naming an unknown session, even with last_acked, is welcomed not resumed, applied 0."""
    region = _scratch(target)
    target.reset()
    for value in (b"\x51\x51\x51\x51", b"\x52\x52\x52\x52"):
        exits = target.exits()
        exits.write(region.base, value)
        got = exits.read(region.base, 4)
        expect(got == value, f"a second session-less stream's seq 1 write of {value.hex()} reads back {got.hex()}")
        exits.stream.cancel()
    unknown = target.exits(session_id=new_session_id(), last_acked=5)
    w = unknown.welcome
    assert w is not None
    expect(not w.resumed and w.applied == 0, f"a hello naming an unknown session with last_acked 5 was welcomed "
           f"resumed={w.resumed} applied={w.applied}")


# ----- ordering and bad requests ------------------------------------------------------------------------------

@check("order.posted_before_read")
def order_posted_before_read(target: Target) -> None:
    """A posted batch (a flush, or the batch an exit carries) is applied, in order, before a later read: three
    writes to one address then a read return the last one."""
    region = _scratch(target, prefer_posted=True)
    target.reset()
    exits = target.exits()
    x, y = region.base + 0x20, region.base + 0x28
    exits.send_flush([(x, v.to_bytes(4, "little")) for v in (0x1111, 0x2222, 0x3333)])
    seq = exits.send_exit(x, 4)  # pipelined: not waiting for the flush's response
    exits.recv("the flush's completion")
    got = int.from_bytes(exits.ok(seq, "the read after the flush").data, "little")
    expect(got == 0x3333, f"a read after a flushed batch writing 0x1111, 0x2222, 0x3333 returned {got:#x}")
    seq = exits.send_exit(y, 4, posted=[(y, v.to_bytes(4, "little")) for v in (0x4444, 0x5555)])
    got = int.from_bytes(exits.ok(seq, "a read carrying a posted batch").data, "little")
    expect(got == 0x5555, f"a read carrying a posted batch writing 0x4444, 0x5555 returned {got:#x}")


@check("status.no_device")
def status_no_device(target: Target) -> None:
    """An access where no region is declared gets NO_DEVICE."""
    address = target.unmapped_address()
    exits = target.exits()
    seq = exits.send_exit(address, 4)
    done = exits.completion(seq, f"a read at unmapped {address:#x}")
    expect(done.status == NO_DEVICE, f"a read at unmapped {address:#x} got {status_name(done.status)}")


@check("status.malformed_posted")
def status_malformed_posted(target: Target) -> None:
    """A posted batch whose lengths do not add up to its data gets BAD_REQUEST (as a flush, and inside an exit,
    whose access is then not performed); a batch with one bad write reports it in posted_errors and applies the
    rest."""
    region = _scratch(target)
    target.reset()
    exits = target.exits()
    bad = device_pb2.PostedWrites(address=[region.base], length=[4], data=b"\x01\x02")
    done = exits.completion(exits.send_flush(bad), "a malformed flush")
    expect(done.status == BAD_REQUEST, f"a flush with 2 data bytes for a 4-byte write got "
           f"{status_name(done.status)}")
    req = device_pb2.ExitStreamRequest(seq=exits.next_seq(), exit=exits.exit_msg(region.base, 4, b"\x77" * 4))
    req.exit.posted.CopyFrom(bad)
    done = exits.completion(exits.send(req), "an exit with a malformed batch")
    expect(done.status == BAD_REQUEST, f"an exit carrying a malformed batch got {status_name(done.status)}")
    expect(exits.read(region.base, 4) != b"\x77" * 4, "the write carrying a malformed batch was performed")
    unmapped = target.unmapped_address()
    done = exits.completion(exits.send_flush([(region.base + 8, b"\x12\x34\x56\x78"), (unmapped, b"\0\0\0\0"),
                                              (region.base + 12, b"\x9a\xbc\xde\xf0")]), "a flush with a bad write")
    expect(done.status == OK, f"a flush with one write to an unmapped address got {status_name(done.status)}, "
           "expected OK with posted_errors")
    expect([e.index for e in done.posted_errors] == [1],
           f"posted_errors {[short(e) for e in done.posted_errors]}, expected index 1 only")
    got = exits.read(region.base + 8, 8)
    expect(got == bytes.fromhex("123456789abcdef0"), f"the good writes of that batch read back {got.hex()}")


@check("status.unexpected_body")
def status_unexpected_body(target: Target) -> None:
    """A second hello, or a request with no body, after the handshake gets BAD_REQUEST under its seq, and the
    stream goes on."""
    region = _scratch(target)
    exits = target.exits()
    hello = exits.hello()
    hello.seq = exits.next_seq()
    done = exits.completion(exits.send(hello), "a hello after the handshake")
    expect(done.status == BAD_REQUEST, f"a hello after the handshake got {status_name(done.status)}")
    done = exits.completion(exits.send(device_pb2.ExitStreamRequest(seq=exits.next_seq())), "an empty request")
    expect(done.status == BAD_REQUEST, f"a request with no body got {status_name(done.status)}")
    exits.read(region.base, 4)


@check("status.undecodable_message")
def status_undecodable_message(target: Target) -> None:
    """A message that does not decode as the method's request gets INVALID_ARGUMENT: a Describe request, and an
    ExitStream request after the handshake (the requests before it are answered first)."""
    # Field 15 (no request has one) with wire type 7, which does not exist: every protobuf library refuses it. (A
    # known field with a bad wire type is not enough: protobufjs reads field 1 as a varint whatever the wire type
    # says, and protocol.md lets a service answer what its library decoded.)
    undecodable = b"\x7f\x01"
    describe = target.channel.unary_unary("/mmiosplit.v1.DeviceService/Describe", request_serializer=_raw,
                                          response_deserializer=device_pb2.DescribeResponse.FromString)
    _expect_rpc_error(lambda: describe(undecodable, timeout=target.timeout), grpc.StatusCode.INVALID_ARGUMENT,
                      "an undecodable Describe request")
    exit_stream = target.channel.stream_stream("/mmiosplit.v1.DeviceService/ExitStream", request_serializer=_raw,
                                               response_deserializer=device_pb2.ExitStreamResponse.FromString)
    raw = target.stream(exit_stream, "ExitStream")
    client = ExitClient(target, "", 0, target.vm_id)
    raw.send(client.hello().SerializeToString())
    welcome = raw.recv(target.timeout, "the welcome")
    expect(welcome.WhichOneof("body") == "welcome", f"the hello was answered with {short(welcome)}")
    address = target.unmapped_address()
    raw.send(device_pb2.ExitStreamRequest(seq=1, exit=client.exit_msg(address, 4)).SerializeToString())
    raw.send(undecodable)
    first = raw.recv(target.timeout, "the response to seq 1")
    expect(first.seq == 1 and first.WhichOneof("body") == "completion",
           f"the request before the undecodable one was answered with {short(first)}")
    _expect_refused(raw, grpc.StatusCode.INVALID_ARGUMENT, "an undecodable request on ExitStream", target.timeout)


def _raw(message: bytes) -> bytes:
    return message


# ----- deadlines and Cancel -----------------------------------------------------------------------------------

@check("deadline.cancel_before_start")
def deadline_cancel_before_start(target: Target) -> None:
    """A write queued behind a slow access and cancelled before it starts completes CANCELLED and is never
    performed (needs a scratch device with delay=)."""
    _needs(target, "cancel")
    region = _scratch(target, slow=True)
    target.reset()
    exits = target.exits()
    a, b = b"\x0a\x0a\x0a\x0a", b"\x0b\x0b\x0b\x0b"
    first = exits.send_exit(region.base, 4, a)
    second = exits.send_exit(region.base, 4, b)
    exits.cancel(second)
    exits.ok(first, "the slow write")
    done = exits.completion(second, "the cancelled write")
    expect(done.status == CANCELLED, f"a write cancelled while it waited behind a slow one got "
           f"{status_name(done.status)}, expected CANCELLED")
    got = exits.read(region.base, 4)
    expect(got == a, f"the slow scratch reads {got.hex()}, expected {a.hex()}: the cancelled write was performed")


@check("deadline.cancel_after_done")
def deadline_cancel_after_done(target: Target) -> None:
    """A Cancel for a request already answered gets no response and changes nothing."""
    _needs(target, "cancel")
    region = _scratch(target)
    target.reset()
    exits = target.exits()
    exits.write(region.base, b"\x0c\x0c\x0c\x0c")
    exits.cancel(exits.seq)
    seq = exits.send_exit(region.base, 4)
    done = exits.ok(seq, "the read after a late Cancel")
    expect(done.data == b"\x0c\x0c\x0c\x0c", f"the write cancelled after it completed reads {done.data.hex()}")


@check("deadline.cancel_unknown_seq")
def deadline_cancel_unknown_seq(target: Target) -> None:
    """A Cancel naming a seq the service has not received yet is ignored: when that request comes, it is applied
    and answered OK, and the Cancel got no response of its own."""
    _needs(target, "cancel")
    region = _scratch(target)
    target.reset()
    exits = target.exits()
    exits.read(region.base, 4)
    exits.cancel(exits.seq + 1)
    done = exits.completion(exits.send_exit(region.base, 4, b"\x0f\x0f\x0f\x0f"), "the write named by an early Cancel")
    expect(done.status == OK, f"a write whose seq a Cancel named before it was sent got {status_name(done.status)}, "
           "expected OK (the Cancel is ignored)")
    got = exits.read(region.base, 4)
    expect(got == b"\x0f\x0f\x0f\x0f", f"the scratch reads {got.hex()}: the write named by an early Cancel was not "
           "applied")


@check("deadline.flush_not_cancelled")
def deadline_flush_not_cancelled(target: Target) -> None:
    """A Cancel naming a posted batch queued behind a slow access changes nothing: batches are never cancelled, so
    it completes OK and its writes are applied (needs a scratch device with delay=)."""
    _needs(target, "cancel")
    region = _scratch(target, slow=True)
    target.reset()
    exits = target.exits()
    first = exits.send_exit(region.base, 4, b"\x0d\x0d\x0d\x0d")
    batch = exits.send_flush([(region.base, b"\x0e\x0e\x0e\x0e")])
    exits.cancel(batch)
    exits.ok(first, "the slow write")
    done = exits.completion(batch, "the posted batch named by a Cancel")
    expect(done.status == OK, f"a posted batch named by a Cancel got {status_name(done.status)}, expected OK")
    got = exits.read(region.base, 4)
    expect(got == b"\x0e\x0e\x0e\x0e",
           f"the slow scratch reads {got.hex()}: the batch named by a Cancel was not applied")


# ----- reset and VM scoping -----------------------------------------------------------------------------------

@check("reset.values")
def reset_values(target: Target) -> None:
    """Reset returns devices to their reset values: a scratch reads zero, a PL011's IMSC reads zero."""
    scratch = _scratch(target)
    uarts = target.devices("pl011")
    exits = target.exits()
    exits.write(scratch.base, b"\xde\xad\xbe\xef")
    if uarts:
        exits.write32(_region(uarts[0]).base + UART_IMSC, INT_RX | INT_TX)
    exits.stream.cancel()
    target.reset()
    exits = target.exits()
    got = exits.read(scratch.base, 4)
    expect(got == bytes(4), f"a scratch reads {got.hex()} after Reset")
    if uarts:
        imsc = exits.read32(_region(uarts[0]).base + UART_IMSC)
        expect(imsc == 0, f"{uarts[0].name}: IMSC reads {imsc:#x} after Reset")


@check("vm.scoping")
def vm_scoping(target: Target) -> None:
    """While VM A is attached (by a Watch, or an ExitStream without feature watch), Reset, Console and ReadMirror
    naming VM B get FAILED_PRECONDITION naming A, and Reset naming A, or no VM, succeeds; once B has an ExitStream
    open too, Reset naming no VM and naming A are refused; once both are gone, Resets naming either succeed."""
    _needs(target, "vm-scoped-control")
    vm_a, vm_b = target.vm_id, target.vm_id + OTHER_VM_SUFFIX
    if "watch" in target.describe().features:
        attach: Stream = target.watch()
        _wait_attached(target, attach)
        how = "a Watch"
    else:
        attach = target.exits().stream
        how = "an ExitStream"
    while_a = f"while VM A is attached by {how}"
    details = _expect_rpc_error(lambda: target.reset(vm_id=vm_b), FP, f"Reset naming VM B {while_a}")
    expect(vm_a in details, f"the refusal of VM B's Reset does not name the attached VM {vm_a!r}: {details!r}")
    uarts = [d for d in target.describe().devices if d.has_console]
    if uarts:
        console = target.stream(target.stub.Console, "Console")
        console.send(device_pb2.ConsoleRequest(device=uarts[0].name, vm_id=vm_b))
        _expect_refused(console, FP, f"a Console naming VM B {while_a}", target.timeout)
    romd = [(d, r) for d, r in target.regions() if r.kind == device_pb2.REGION_KIND_ROMD]
    if romd:
        d, r = romd[0]
        _expect_rpc_error(lambda: target.stub.ReadMirror(device_pb2.ReadMirrorRequest(
            device=d.name, region=r.name, vm_id=vm_b), timeout=target.timeout), FP,
            f"ReadMirror naming VM B {while_a}")
    target.reset()
    target.reset(vm_id="")
    intruder = target.exits(vm_id=vm_b)
    _expect_rpc_error(lambda: target.reset(vm_id=""), FP, "Reset naming no VM while A and B are attached")
    details = _expect_rpc_error(lambda: target.reset(), FP, "Reset naming VM A while VM B is attached too")
    expect(vm_b in details, f"the refusal of VM A's Reset does not name the attached VM {vm_b!r}: {details!r}")
    intruder.stream.cancel()
    attach.cancel()
    # Both left: once a Reset naming A and one naming B both succeed, neither is attached any more.
    deadline = time.monotonic() + target.timeout
    while True:
        try:
            target.reset(vm_id=vm_b)
            target.reset()
            return
        except grpc.RpcError as exc:
            if exc.code() != FP or time.monotonic() > deadline:
                raise CheckFailed(f"Reset after both VMs left: {exc.code().name} ({exc.details()})") from None
        time.sleep(0.05)


def _wait_attached(target: Target, watch: Stream) -> None:
    """A Watch is attached once its first response came (a service with neither shadows nor lines sends none:
    then a moment's wait)."""
    if watch.poll(min(1.0, target.timeout)) is None and watch.ended is not None:
        raise CheckFailed(f"the Watch stream ended at once: {watch.ended}")


# ----- consoles -----------------------------------------------------------------------------------------------

def _console(target: Target) -> tuple[device_pb2.Device, Stream]:
    uart = _first(target, "pl011", "the console checks write and read a PL011's data register")
    expect(uart.has_console, f"{uart.name} is a PL011 but Describe says it has no console")
    stream = target.stream(target.stub.Console, "Console")
    stream.send(device_pb2.ConsoleRequest(device=uart.name, vm_id=target.vm_id))
    return uart, stream


@check("console.output")
def console_output(target: Target) -> None:
    """Bytes written to a PL011's data register by exits appear, in order, on its Console stream."""
    uart, console = _console(target)
    base = _region(uart).base
    exits = target.exits()
    marker = b"<conformance %d>" % (time.monotonic_ns() % 100000)
    for byte in marker:
        exits.write(base + UART_DR, bytes((byte, 0, 0, 0)))
    seen = b""
    deadline = time.monotonic() + target.timeout
    while marker not in seen:
        left = deadline - time.monotonic()
        message = console.poll(max(0.0, left)) if left > 0 else None
        if message is None:
            raise CheckFailed(f"{uart.name}: {marker!r} written to DR; the Console carried {seen[-80:]!r}")
        seen += message.output


@check("console.input")
def console_input(target: Target) -> None:
    """Input sent on a PL011's Console reaches its RX FIFO: FR.RXFE clears and DR reads the bytes in order (the
    second once the first was read, the FIFO being one deep after reset)."""
    uart, console = _console(target)
    base = _region(uart).base
    target.reset()
    exits = target.exits()
    console.send(device_pb2.ConsoleRequest(input=b"hi"))
    _wait_rx(exits, base, target.timeout, uart.name)
    first = exits.read32(base + UART_DR) & 0xFF
    _wait_rx(exits, base, target.timeout, uart.name)
    second = exits.read32(base + UART_DR) & 0xFF
    expect(bytes((first, second)) == b"hi", f"{uart.name}: DR read {bytes((first, second))!r} after input 'hi'")


@check("console.unknown_device")
def console_unknown_device(target: Target) -> None:
    """A Console naming a device that has no console ends with NOT_FOUND."""
    names = {d.name for d in target.describe().devices}
    name = next(n for n in (f"no-such-uart{i}" for i in range(len(names) + 1)) if n not in names)
    console = target.stream(target.stub.Console, "Console")
    console.send(device_pb2.ConsoleRequest(device=name, vm_id=target.vm_id))
    _expect_refused(console, grpc.StatusCode.NOT_FOUND, f"a Console naming device {name!r}", target.timeout)


def _wait_rx(exits: ExitClient, base: int, timeout: float, name: str) -> None:
    deadline = time.monotonic() + timeout
    while exits.read32(base + UART_FR) & FR_RXFE:
        if time.monotonic() > deadline:
            raise CheckFailed(f"{name}: FR.RXFE still set {timeout:g} s after input was sent on the Console")
        time.sleep(0.01)


# ----- interrupt lines and shadows ----------------------------------------------------------------------------

class _WatchLog:
    """What a Watch stream carried, in order."""

    def __init__(self, target: Target, windows: list[device_pb2.DmaWindow] | None = None) -> None:
        self.events: list[device_pb2.WatchResponse] = []
        self.stream = target.watch(windows)
        self.target = target

    def take(self, want: Callable[[device_pb2.WatchResponse], bool], what: str) -> device_pb2.WatchResponse:
        deadline = time.monotonic() + self.target.timeout
        while True:
            left = deadline - time.monotonic()
            event = self.stream.poll(left) if left > 0 else None
            if event is None:
                raise CheckFailed(f"no {what} on Watch within {self.target.timeout:g} s (it carried: "
                                  f"{[short(e) for e in self.events][-4:]})")
            self.events.append(event)
            if want(event):
                return event


def _declared_lines(target: Target) -> set[tuple[str, int]]:
    return {(d.name, line.index) for d in target.describe().devices for line in d.lines}


def _level(update: device_pb2.LineUpdate, device: str, index: int = 0) -> bool | None:
    for level in update.levels:
        if level.device == device and level.index == index:
            return bool(level.level)
    return None


@check("irq.watch_initial")
def irq_watch_initial(target: Target) -> None:
    """A Watch first carries the current value of every declared shadow register (in one or more shadow updates,
    each value at its register's size), then the level of every declared line, before anything else."""
    _needs(target, "watch")
    lines = _declared_lines(target)
    shadows = {(d.name, r.name, w.offset): w.size for d, r in target.regions() for w in r.shadows}
    if not lines and not shadows:
        raise CheckSkipped("no interrupt lines or shadow registers declared")
    log = _WatchLog(target)
    seen: dict[tuple[str, str, int], int] = {}
    while set(seen) != set(shadows):
        event = log.take(lambda e: True, "initial shadow values")
        expect(event.WhichOneof("event") == "shadow", f"Watch sent {short(event)} before the value of every shadow "
               f"register (missing: {sorted(set(shadows) - set(seen))})")
        for v in event.shadow.values:
            seen[(v.device, v.region, v.offset)] = len(v.data)
        expect(set(seen) <= set(shadows), f"shadow values for undeclared registers: {sorted(set(seen) - set(shadows))}")
    expect(seen == shadows, f"shadow value sizes {seen}, declared {shadows}")
    levels: set[tuple[str, int]] = set()
    while levels != lines:
        event = log.take(lambda e: True, "initial line levels")
        if event.WhichOneof("event") == "shadow" and not event.shadow.values:
            continue  # an empty first shadow update from a service with no shadow registers: says nothing
        expect(event.WhichOneof("event") == "lines", f"Watch sent {short(event)} before the level of every line "
               f"(missing: {sorted(lines - levels)})")
        levels |= {(lv.device, lv.index) for lv in event.lines.levels}
        expect(levels <= lines, f"levels for undeclared lines: {sorted(levels - lines)}")


@check("irq.on_completion")
def irq_on_completion(target: Target) -> None:
    """A line change an access causes travels on that access's Completion: a PL011 with TXIM set raises
    UARTINTR on a DR write and lowers it on an ICR write, with increasing generations."""
    uart = _first(target, "pl011", "its TX interrupt is raised by a DR write")
    base = _region(uart).base
    target.reset()
    exits = target.exits()
    exits.write32(base + UART_IMSC, INT_TX)
    raised = exits.write32(base + UART_DR, 0x2E)
    expect(raised.HasField("lines") and _level(raised.lines, uart.name) is True,
           f"{uart.name}: a DR write with TXIM set completed without raising line 0: {short(raised)}")
    lowered = exits.write32(base + UART_ICR, INT_TX)
    expect(lowered.HasField("lines") and _level(lowered.lines, uart.name) is False,
           f"{uart.name}: an ICR write clearing TX completed without lowering line 0: {short(lowered)}")
    expect(lowered.lines.generation > raised.lines.generation > 0,
           f"line generations {raised.lines.generation} then {lowered.lines.generation} do not increase")


@check("irq.on_watch")
def irq_on_watch(target: Target) -> None:
    """A line change with no access (Console input into a PL011 with RXIM set) is on Watch, with a generation
    above the initial levels'; reading DR then lowers it on that read's Completion, newer still."""
    _needs(target, "watch")
    uart = _first(target, "pl011", "its RX interrupt is raised by Console input")
    base = _region(uart).base
    target.reset()
    exits = target.exits()
    exits.write32(base + UART_IMSC, INT_RX | INT_RT)
    log = _WatchLog(target)
    initial = log.take(lambda e: e.WhichOneof("event") == "lines", "initial line levels")
    expect(_level(initial.lines, uart.name) is False, f"{uart.name}: line 0 is high after reset with no input")
    console = target.stream(target.stub.Console, "Console")
    console.send(device_pb2.ConsoleRequest(device=uart.name, vm_id=target.vm_id, input=b"!"))
    raised = _raised_on_watch(log, uart.name, initial.lines, "Console input with RXIM set")
    done = exits.ok(exits.send_exit(base + UART_DR, 4), "the DR read")
    _lowered_by(done, uart.name, raised, "reading the only received byte")


def _raised_on_watch(log: _WatchLog, device: str, initial: device_pb2.LineUpdate,
                     after: str) -> device_pb2.LineUpdate:
    """The next line change of ``device`` on Watch: line 0 raised, at a generation above the initial levels'."""
    raised = log.take(lambda e: e.WhichOneof("event") == "lines" and _level(e.lines, device) is not None,
                      f"{device} line change after {after}").lines
    expect(_level(raised, device) is True, f"{device}: Watch sent {short(raised)} after {after}")
    expect(raised.generation > initial.generation,
           f"generation {raised.generation} of the raise is not above the initial {initial.generation}")
    return raised


def _lowered_by(done: device_pb2.Completion, device: str, raised: device_pb2.LineUpdate, access: str) -> None:
    """``done``, the completion of ``access``, lowers line 0 of ``device``, at a generation above ``raised``."""
    expect(done.HasField("lines") and _level(done.lines, device) is False,
           f"{device}: {access} did not lower line 0 on its completion: {short(done)}")
    expect(done.lines.generation > raised.generation,
           f"generation {done.lines.generation} of the lowering is not above {raised.generation}")


@check("irq.device_thread")
def irq_device_thread(target: Target) -> None:
    """A line an irq-probe raises on its own thread after a FIRE is on Watch, not on the FIRE's completion; the
    ACK write's completion lowers it, at a newer generation."""
    _needs(target, "watch")
    probe = _first(target, "irq-probe", "it raises its line on a thread of its own")
    base = _region(probe).base
    target.reset()
    exits = target.exits()
    log = _WatchLog(target)
    initial = log.take(lambda e: e.WhichOneof("event") == "lines", "initial line levels")
    expect(_level(initial.lines, probe.name) is False, f"{probe.name}: line 0 is high after reset")
    exits.write32(base + PROBE_DELAY, 20_000)
    fired = exits.write32(base + PROBE_FIRE, 1)
    expect(_level(fired.lines, probe.name) is not True,
           f"{probe.name}: the FIRE write's completion raised the line, which the device raises 20 ms later")
    raised = _raised_on_watch(log, probe.name, initial.lines, "FIRE")
    _lowered_by(exits.write32(base + PROBE_ACK, 1), probe.name, raised, "the ACK write")


@check("shadow.updates")
def shadow_updates(target: Target) -> None:
    """A completion that changed a shadow register carries its new value; a change with no access (Console input
    changing a PL011's FR) is on Watch with a higher generation."""
    _needs(target, "watch")
    uart = _first(target, "pl011", "its FR and IMSC are shadow registers")
    region = _region(uart)
    offsets = {w.offset for w in region.shadows}
    if UART_FR not in offsets or UART_IMSC not in offsets:
        raise CheckSkipped(f"{uart.name} declares no shadow windows at FR and IMSC")
    target.reset()
    exits = target.exits()
    done = exits.write32(region.base + UART_IMSC, INT_RX)
    values = {v.offset: v.data for v in done.shadow.values if v.device == uart.name}
    expect(values.get(UART_IMSC) == INT_RX.to_bytes(4, "little"),
           f"{uart.name}: the IMSC write's completion carries shadow values {values}, expected IMSC = {INT_RX:#x}")
    log = _WatchLog(target)
    first = log.take(lambda e: e.WhichOneof("event") == "shadow", "initial shadow values").shadow
    console = target.stream(target.stub.Console, "Console")
    console.send(device_pb2.ConsoleRequest(device=uart.name, vm_id=target.vm_id, input=b"?"))

    def fr_changed(e: device_pb2.WatchResponse) -> bool:
        return e.WhichOneof("event") == "shadow" and any(
            v.device == uart.name and v.offset == UART_FR for v in e.shadow.values)

    update = log.take(fr_changed, f"{uart.name} FR update after Console input").shadow
    fr = next(int.from_bytes(v.data, "little") for v in update.values if v.device == uart.name and v.offset == UART_FR)
    expect(not fr & FR_RXFE, f"{uart.name}: FR {fr:#x} on Watch after input still says RX FIFO empty")
    expect(update.generation > first.generation,
           f"shadow generation {update.generation} after input is not above {first.generation}")
    exits.read32(region.base + UART_DR)  # leave the FIFO empty


# ----- DMA ----------------------------------------------------------------------------------------------------

class _GuestMemory:
    """The vcpu service's side of DMA: one window of memory; requests outside it are refused and remembered."""

    def __init__(self, window: device_pb2.DmaWindow) -> None:
        self.window = window
        self.memory = bytearray(window.size)
        self.requests: list[device_pb2.DmaRequest] = []
        self.outside: list[device_pb2.DmaRequest] = []
        self.stream: Stream | None = None

    def inside(self, address: int, length: int) -> bool:
        return self.window.base <= address and address + length <= self.window.base + self.window.size

    def on_message(self, message: device_pb2.WatchResponse) -> bool:
        if message.WhichOneof("event") != "dma":
            return False
        req = message.dma
        self.requests.append(req)
        write = req.direction == device_pb2.DMA_DIRECTION_WRITE
        length = len(req.data) if write else req.length
        result = device_pb2.DmaResult(id=req.id)
        if not self.inside(req.address, length) or length == 0:
            self.outside.append(req)
            result.error = (f"{req.device}: DMA of {length} bytes at {req.address:#x} is outside window "
                            f"{self.window.name} {self.window.base:#x}+{self.window.size:#x}")
        elif write:
            offset = req.address - self.window.base
            self.memory[offset:offset + length] = req.data
        else:
            offset = req.address - self.window.base
            result.data = bytes(self.memory[offset:offset + length])
        assert self.stream is not None
        self.stream.send(device_pb2.WatchRequest(dma_result=result))
        return True


def _dma_setup(target: Target) -> tuple[int, _GuestMemory, ExitClient]:
    dev = _first(target, "dma-probe", "the DMA checks program its transfers")
    target.reset()
    memory = _GuestMemory(DMA_WINDOW)
    memory.stream = target.watch([DMA_WINDOW], on_message=memory.on_message)
    _wait_attached(target, memory.stream)
    return _region(dev).base, memory, target.exits()


def _dma_run(exits: ExitClient, base: int, address: int, length: int, command: int) -> int:
    exits.write32(base + DMA_ADDR_LO, address & 0xFFFF_FFFF)
    exits.write32(base + DMA_ADDR_HI, address >> 32)
    exits.write32(base + DMA_LEN, length)
    exits.write32(base + DMA_CMD, command)
    status = exits.read32(base + DMA_STATUS)
    exits.write32(base + DMA_DONE, 1)
    return status


@check("dma.inside_window")
def dma_inside_window(target: Target) -> None:
    """A dma-probe transfer programmed inside the granted window asks exactly for it (address, length, data),
    never outside the window, and succeeds both ways: a write stores the buffer, a read fills it."""
    _needs(target, "watch")
    base, memory, exits = _dma_setup(target)
    pattern = bytes(range(0x40, 0x50))
    for i in range(0, 16, 4):
        exits.write(base + DMA_BUF + i, pattern[i:i + 4])
    address = DMA_WINDOW.base + 0x20
    status = _dma_run(exits, base, address, 16, DMA_CMD_WRITE)
    expect(not memory.outside, f"the device asked outside the granted window: {[short(r) for r in memory.outside]}")
    writes = [r for r in memory.requests if r.direction == device_pb2.DMA_DIRECTION_WRITE]
    expect(len(writes) == 1 and writes[0].address == address and writes[0].data == pattern,
           f"a 16-byte DMA write to {address:#x} was asked as {[short(r) for r in memory.requests]}")
    expect(status == DMA_STATUS_DONE, f"STATUS {status} after a DMA write inside the window")
    expect(memory.memory[0x20:0x30] == pattern, "guest memory does not hold the written pattern")
    memory.memory[0x80:0x90] = bytes(range(0x90, 0xA0))
    status = _dma_run(exits, base, DMA_WINDOW.base + 0x80, 16, DMA_CMD_READ)
    expect(not memory.outside, f"the device asked outside the granted window: {[short(r) for r in memory.outside]}")
    expect(status == DMA_STATUS_DONE, f"STATUS {status} after a DMA read inside the window")
    got = exits.read(base + DMA_BUF, 8) + exits.read(base + DMA_BUF + 8, 8)
    expect(got == bytes(range(0x90, 0xA0)), f"the buffer holds {got.hex()} after a DMA read")


@check("dma.outside_refused")
def dma_outside_refused(target: Target) -> None:
    """A dma-probe transfer programmed outside the granted window fails (STATUS says error) and leaves guest
    memory alone, whether the device asked and was refused or did not ask."""
    _needs(target, "watch")
    base, memory, exits = _dma_setup(target)
    outside = DMA_WINDOW.base + DMA_WINDOW.size + 0x100
    status = _dma_run(exits, base, outside, 16, DMA_CMD_WRITE)
    expect(status == DMA_STATUS_ERROR, f"STATUS {status} after a DMA write outside the window, expected "
           f"{DMA_STATUS_ERROR} (error)")
    expect(memory.memory == bytes(DMA_WINDOW.size), "guest memory changed")
    status = _dma_run(exits, base, DMA_WINDOW.base + DMA_WINDOW.size - 8, 16, DMA_CMD_READ)
    expect(status == DMA_STATUS_ERROR, f"STATUS {status} after a DMA read straddling the window's end")


# ----- ROMD mirrors -------------------------------------------------------------------------------------------

def _read_mirror(target: Target, device: str, region: device_pb2.Region) -> tuple[_Sparse, bool]:
    chunks = list(target.stub.ReadMirror(device_pb2.ReadMirrorRequest(device=device, region=region.name,
                                                                      vm_id=target.vm_id), timeout=target.timeout))
    expect(bool(chunks) and chunks[0].offset == 0, f"{device}/{region.name}: ReadMirror's first chunk is not at "
           f"offset 0 ({len(chunks)} chunks)")
    last = -1
    contents: dict[int, bytes] = {}
    for c in chunks:
        expect(c.offset > last, f"{device}/{region.name}: chunk offsets do not increase ({c.offset} after {last})")
        expect(c.offset + len(c.data) <= region.size, f"{device}/{region.name}: a chunk passes the region's end")
        last = c.offset
        contents[c.offset] = c.data
    return _Sparse(contents), bool(chunks[0].mirror_enabled)


class _Sparse:
    """A mirror as ReadMirror sends it: chunks, zero elsewhere."""

    def __init__(self, chunks: dict[int, bytes]) -> None:
        self.chunks = chunks

    def get(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        for start, data in self.chunks.items():
            lo, hi = max(start, offset), min(start + len(data), offset + length)
            if lo < hi:
                out[lo - offset:hi - offset] = data[lo - start:hi - start]
        return bytes(out)


@check("mirror.romd")
def mirror_romd(target: Target) -> None:
    """ReadMirror of every ROMD region sends increasing chunks inside it, the first at offset 0 in mirror mode
    after Reset, and an unknown region is NOT_FOUND; on a pflash, a program sequence's completions switch the
    mirror off, then on with the programmed bytes, which ReadMirror then returns."""
    romd = [(d, r) for d, r in target.regions() if r.kind == device_pb2.REGION_KIND_ROMD]
    if not romd:
        raise CheckSkipped("no ROMD region declared")
    target.reset()
    for dev, region in romd:
        _, enabled = _read_mirror(target, dev.name, region)
        expect(enabled, f"{dev.name}/{region.name}: not in mirror mode after Reset")
    dev, region = romd[0]
    _expect_rpc_error(lambda: target.stub.ReadMirror(device_pb2.ReadMirrorRequest(
        device=dev.name, region=region.name + "-nonexistent", vm_id=target.vm_id), timeout=target.timeout),
        grpc.StatusCode.NOT_FOUND, "ReadMirror of an undeclared region")
    flashes = [(d, r) for d, r in romd if d.type == "pflash"]
    if not flashes:
        return
    dev, region = flashes[0]
    offset = region.size - 0x1000
    mirror, _ = _read_mirror(target, dev.name, region)
    old = mirror.get(offset, 4)
    value = bytes(b ^ 0x5A for b in old)
    exits = target.exits()
    updates = list(exits.write32(region.base + offset, 0x0040_0040).mirror_updates)
    expect(any(u.device == dev.name and u.region == region.name and not u.mirror_enabled for u in updates),
           f"{dev.name}: the program command's completion did not switch the mirror off: {updates}")
    programmed = list(exits.write(region.base + offset, value).mirror_updates)
    back = list(exits.write32(region.base + offset, 0x00FF_00FF).mirror_updates)
    on = [u for u in back if u.device == dev.name and u.region == region.name and u.mirror_enabled]
    expect(bool(on), f"{dev.name}: read-array's completion did not switch the mirror on: {back}")
    patched = _Sparse({p.offset: p.data for u in updates + programmed + back for p in u.patches})
    expect(patched.get(offset, 4) == value, f"{dev.name}: the mirror patches do not carry the programmed "
           f"{value.hex()} at {offset:#x}")
    mirror, enabled = _read_mirror(target, dev.name, region)
    got = mirror.get(offset, 4)
    expect(enabled and got == value, f"{dev.name}: ReadMirror gives {got.hex()} (mirror mode {enabled}) at "
           f"{offset:#x} after programming {value.hex()}")


# ----- health and limits --------------------------------------------------------------------------------------

@check("health.serving")
def health_serving(target: Target) -> None:
    """grpc.health.v1 says SERVING for the server ("") and for mmiosplit.v1.DeviceService."""
    stub = health_pb2_grpc.HealthStub(target.channel)
    for service in ("", "mmiosplit.v1.DeviceService"):
        status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=target.timeout).status
        expect(status == health_pb2.HealthCheckResponse.SERVING,
               f"health of {service or 'the server'!r}: {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}")


#: The size of the oversized message; the runner sets it from --max-message.
MAX_MESSAGE = [DEFAULT_MAX_MESSAGE]


#: A request this big must be accepted: bigger than the largest a device service receives (a 16 MiB DmaResult),
#: and than gRPC's usual 4 MiB default, which a service must raise (docs/protocol.md, "Sizes and limits").
LARGE_MESSAGE = 16 * 1024 * 1024 + 64 * 1024


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _padded_describe(size: int) -> bytes:
    """A DescribeRequest of exactly ``size`` (at least 4) bytes that decodes: unknown length-delimited fields
    (number 15) that the service skips, so only the size matters."""
    header = bytes([15 << 3 | 2])
    length = size - 2
    while 1 + len(_varint(length)) + length > size:
        length -= 1
    message = header + _varint(length) + bytes(length)
    if len(message) < size:  # the varint's width skipped this size: a shorter field and an empty one after it
        message = _padded_describe(size - 2) + header + b"\0"
    return message


def _describe_of_size(target: Target, size: int) -> None:
    """Send a Describe request of ``size`` bytes on a channel of its own (whose send limit allows it), once the
    channel is connected, so that only the service's receive limit can refuse it."""
    payload = _padded_describe(size)
    with security.channel(target.address, options=channel_options(size + 1024)) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=target.timeout)
        except grpc.FutureTimeoutError:
            raise CheckFailed(f"a second channel to the service did not connect within {target.timeout:g} s") from None
        describe = channel.unary_unary("/mmiosplit.v1.DeviceService/Describe", request_serializer=_raw,
                                       response_deserializer=device_pb2.DescribeResponse.FromString)
        describe(payload, timeout=target.timeout * 3)


@check("limits.large_message")
def limits_large_message(target: Target) -> None:
    """A request of 16 MiB + 64 KiB (more than gRPC's usual 4 MiB default, and than the largest DMA result) is
    accepted: the service raised its receive limit."""
    try:
        _describe_of_size(target, LARGE_MESSAGE)
    except grpc.RpcError as exc:
        raise CheckFailed(f"a {LARGE_MESSAGE}-byte Describe request got {exc.code().name} ({exc.details()}); a "
                          "service must take messages up to 256 MiB") from None


@check("limits.oversized_message")
def limits_oversized_message(target: Target) -> None:
    """A message one byte over the service's receive limit (256 MiB unless --max-message says otherwise) gets
    RESOURCE_EXHAUSTED, and the service still answers Describe afterwards."""
    size = MAX_MESSAGE[0] + 1
    try:
        _describe_of_size(target, size)
    except grpc.RpcError as exc:
        expect(exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED,
               f"a {size}-byte request got {exc.code().name} ({exc.details()}), expected RESOURCE_EXHAUSTED")
    else:
        raise CheckFailed(f"a {size}-byte request was accepted: the service's limit is larger than --max-message "
                          f"{MAX_MESSAGE[0]}")
    target.stub.Describe(device_pb2.DescribeRequest(), timeout=target.timeout)


def names() -> list[str]:
    return [c.name for c in CHECKS]


@check("describe.stable")
def describe_stable(target: Target) -> None:
    """Describe, asked again after every other check, says what it said at the start: it must not change while
    the instance lives."""
    now = target.stub.Describe(device_pb2.DescribeRequest(), timeout=target.timeout)
    expect(now == target.describe(), "Describe changed during the run: "
           f"{short(now)[:120]} versus {short(target.describe())[:120]}")
