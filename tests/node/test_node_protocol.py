"""The Node.js device service over gRPC, directly: Describe, the handshake, statuses, sessions and resume, Cancel,
Watch, and the VM scoping of the control RPCs. Where the Python service defines the answer, the same requests
go to both and the answers must be the same."""

from __future__ import annotations

import contextlib
import queue
import signal
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from mmiosplit.v1 import device_pb2, device_pb2_grpc
from mmiosplit_cli.launcher import check_health, local_services
from tests.node.conftest import NodeService, node_service

pytestmark = pytest.mark.node

DEVICES = ["pl011@0x09000000,name=uart0", "scratch@0x0a000000,size=0x1000,name=scratch0",
           "scratch@0x0a100000,size=0x1000,posted=on,name=posted0"]
READ, WRITE = device_pb2.ACCESS_DIRECTION_READ, device_pb2.ACCESS_DIRECTION_WRITE


class Stream:
    """One ExitStream, fed request by request."""

    def __init__(self, stub: device_pb2_grpc.DeviceServiceStub) -> None:
        self._requests: queue.SimpleQueue[device_pb2.ExitStreamRequest | None] = queue.SimpleQueue()
        self.call = stub.ExitStream(iter(self._requests.get, None))

    def send(self, request: device_pb2.ExitStreamRequest) -> None:
        self._requests.put(request)

    def receive(self) -> device_pb2.ExitStreamResponse:
        return next(self.call)

    def hello(self, session: str = "", last_acked: int = 0, vm: str = "test",
              version: int = 1) -> device_pb2.ExitStreamResponse:
        self.send(device_pb2.ExitStreamRequest(seq=0, hello=device_pb2.StreamHello(
            protocol_version=version, vm_id=vm, vcpu_id=0, session_id=session, last_acked=last_acked)))
        return self.receive()

    def exchange(self, request: device_pb2.ExitStreamRequest) -> device_pb2.ExitStreamResponse:
        self.send(request)
        return self.receive()

    def close(self) -> None:
        self._requests.put(None)
        self.call.cancel()


def access(seq: int, address: int, length: int, direction: device_pb2.AccessDirection.ValueType = READ,
           data: bytes = b"", posted: device_pb2.PostedWrites | None = None,
           ack: int = 0) -> device_pb2.ExitStreamRequest:
    ex = device_pb2.MmioExit(address=address, length=length, direction=direction, data=data)
    if posted is not None:
        ex.posted.CopyFrom(posted)
    return device_pb2.ExitStreamRequest(seq=seq, exit=ex, ack=ack)


def posted(*writes: tuple[int, bytes]) -> device_pb2.PostedWrites:
    return device_pb2.PostedWrites(address=[a for a, _ in writes], length=[len(d) for _, d in writes],
                                   data=b"".join(d for _, d in writes))


def stub(address: str) -> device_pb2_grpc.DeviceServiceStub:
    return device_pb2_grpc.DeviceServiceStub(grpc.insecure_channel(address))


@pytest.fixture(scope="module")
def both() -> Iterator[tuple[str, str]]:
    """(Python device service, Node device service), fresh, with the same devices."""
    with node_service(DEVICES) as node, \
            local_services([a for d in DEVICES for a in ("--device", d)], start_vcpu=False,
                           transport="tcp") as (_, python, _):
        assert python is not None
        yield python, node.address


# Requests whose answers the Python service defines: every status, every refusal, line changes on completions.
SCRIPT = [
    access(1, 0x0A000010, 4, WRITE, bytes.fromhex("78563412")),
    access(2, 0x0A000010, 4),
    access(3, 0x0A000010, 8),
    access(4, 0x0A000013, 1),
    access(5, 0x0A000FFC, 8),  # straddles the end of the region
    access(6, 0x0A000010, 3, WRITE, b"abc"),  # not a bus size
    access(7, 0x0A000010, 4, WRITE, b"ab"),  # data shorter than the length
    access(8, 0x0B000000, 4),  # nothing there
    access(9, 0x0A000010, 0),
    access(10, 0x0A000010, 16),
    access(11, 0x09000018, 4),  # FR
    access(12, 0x09000018, 8),  # the UART takes no 8-byte access
    access(13, 0x09000019, 1),  # inside FR
    access(14, 0x09000100, 4),  # no register
    access(15, 0x09000038, 4, WRITE, (0x20).to_bytes(4, "little")),  # IMSC: TX
    access(16, 0x09000000, 4, WRITE, b"X\0\0\0"),  # DR: TX raises the line
    access(17, 0x0900003C, 4),  # RIS
    access(18, 0x09000040, 2),  # MIS
    access(19, 0x09000044, 4, WRITE, (0x20).to_bytes(4, "little")),  # ICR: the line goes down
    access(20, 0x09000044, 4),  # ICR reads 0
    access(21, 0x09000024, 2, WRITE, b"\x0d\x00"),  # IBRD
    access(22, 0x09000024, 4),
    access(23, 0x09000018, 4, WRITE, b"\xff\xff\xff\xff"),  # FR is read-only: ignored
    access(24, 0x09000FE0, 1),  # PeriphID0
    access(25, 0x0900002C, 1, WRITE, b"\x10"),  # LCR_H: FIFOs on
    access(26, 0x09000034, 4),  # IFLS
    access(27, 0x0A000020, 8, device_pb2.ACCESS_DIRECTION_UNSPECIFIED),  # no direction: a read
    access(28, 0x0A000000, 4, WRITE, b"\1\2\3\4",
           posted=posted((0x0A100000, b"\xaa"), (0x0C000000, b"\0\0"), (0x0A100FFF, b"\0\0"))),
    access(29, 0x0A000000, 4, posted=device_pb2.PostedWrites(address=[0x0A100000], length=[1, 2], data=b"\0")),
    device_pb2.ExitStreamRequest(seq=30, flush=posted((0x0A100004, b"\1\2\3\4"), (0x0A100008, b"\5"))),
    device_pb2.ExitStreamRequest(seq=31, flush=device_pb2.PostedWrites(address=[1], length=[4], data=b"\0")),
    access(32, 0x0A100004, 4),
    device_pb2.ExitStreamRequest(seq=33, hello=device_pb2.StreamHello(protocol_version=1)),  # after the handshake
    access(35, 0x0A000000, 4),  # skips 34
    access(36, 0x0A000000, 4),
    access(35, 0x0A000000, 4),  # a repeat, answered from memory
    access(34, 0x0A000000, 4, ack=35),  # acknowledged: refused
]


def _run_script(address: str) -> list[device_pb2.ExitStreamResponse]:
    s = Stream(stub(address))
    try:
        assert s.hello(session="script").WhichOneof("body") == "welcome"
        out = []
        for request in SCRIPT:
            response = s.exchange(request)
            response.completion.lines.raised_ns = 0  # a clock reading
            out.append(response)
        return out
    finally:
        s.close()


def test_every_status_and_refusal_is_the_python_services(both: tuple[str, str]) -> None:
    python, node = both
    expected, got = _run_script(python), _run_script(node)
    for request, want, have in zip(SCRIPT, expected, got, strict=True):
        assert have == want, f"request {request}"
    # The script covers what it claims to.
    statuses = {r.completion.status for r in got}
    assert statuses == {device_pb2.COMPLETION_STATUS_OK, device_pb2.COMPLETION_STATUS_DEVICE_ERROR,
                        device_pb2.COMPLETION_STATUS_NO_DEVICE, device_pb2.COMPLETION_STATUS_BAD_REQUEST}
    assert [lv.level for r in got for lv in r.completion.lines.levels] == [True, False]
    assert got[27].completion.posted_errors and got[33].completion.error


def test_describe_has_the_python_services_shape(both: tuple[str, str]) -> None:
    python, node = both
    want = stub(python).Describe(device_pb2.DescribeRequest(), timeout=10)
    have = stub(node).Describe(device_pb2.DescribeRequest(), timeout=10)
    assert list(have.devices) == list(want.devices)
    assert have.protocol_version == want.protocol_version == 1
    assert have.clock_id == want.clock_id  # the same host, the same CLOCK_MONOTONIC
    assert len(have.instance_id) == 32 and have.instance_id != want.instance_id
    assert have.service_name == "mmiosplit-devices"


def test_handshake_refusals_are_the_python_services(both: tuple[str, str]) -> None:
    for first in (access(1, 0x0A000000, 4),
                  device_pb2.ExitStreamRequest(hello=device_pb2.StreamHello(protocol_version=2))):
        answers = []
        for address in both:
            s = Stream(stub(address))
            s.send(first)
            with pytest.raises(grpc.RpcError) as err:
                s.receive()
            answers.append((err.value.code(), err.value.details()))
            s.close()
        assert answers[0] == answers[1]
        assert answers[0][0] in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)


def test_a_resumed_session_answers_from_memory_and_applies_nothing_twice(node: NodeService) -> None:
    st = stub(node.address)
    console = st.Console(iter([device_pb2.ConsoleRequest(device="uart0")]))
    dr = 0x09000000
    first = Stream(st)
    welcome = first.hello(session="resume-me").welcome
    assert not welcome.resumed and welcome.applied == 0
    assert welcome.instance_id == st.Describe(device_pb2.DescribeRequest()).instance_id
    one = first.exchange(access(1, dr, 1, WRITE, b"a"))
    two = first.exchange(access(2, dr, 1, WRITE, b"b", ack=1))
    first.close()  # as if the response to 2 was lost with the stream
    again = Stream(st)
    welcome = again.hello(session="resume-me", last_acked=1).welcome
    assert welcome.resumed and welcome.applied == 2
    assert again.exchange(access(2, dr, 1, WRITE, b"b", ack=1)) == two  # from memory, not applied again
    three = again.exchange(access(3, dr, 1, WRITE, b"c", ack=2))
    assert three.completion.status == device_pb2.COMPLETION_STATUS_OK
    refused = again.exchange(access(1, dr, 1, WRITE, b"a", ack=3)).completion
    assert refused.status == device_pb2.COMPLETION_STATUS_BAD_REQUEST
    assert refused.error == ("sequence number 1 from VM test vCPU 0, expected 4: 1 was applied already and its "
                             "response acknowledged")
    again.close()
    assert one.completion.status == device_pb2.COMPLETION_STATUS_OK
    output = b""
    for chunk in console:
        output += chunk.output
        if len(output) >= 3:
            break
    console.cancel()
    assert output == b"abc"
    # Without a session, nothing is resumed and numbering starts again on each stream.
    for _ in range(2):
        s = Stream(st)
        assert not s.hello().welcome.resumed
        assert s.exchange(access(1, 0x0A000000, 4)).completion.status == device_pb2.COMPLETION_STATUS_OK
        s.close()


def test_a_cancel_stops_a_request_waiting_behind_a_slow_access() -> None:
    """One vCPU's access holds the service for a second; another's, cancelled while it waits, is never performed,
    and the first one's own cancel comes too late: it is performed ("performed late")."""
    with node_service(["scratch@0x0a000000,size=0x1000,delay=1000000,name=slow"]) as node:
        st = stub(node.address)
        a, b = Stream(st), Stream(st)
        a.hello(session="a")
        b.hello(session="b")
        a.send(access(1, 0x0A000000, 4, WRITE, b"\1\0\0\0"))
        time.sleep(0.3)  # a's write has the service by now (it holds it for a second)
        b.send(access(1, 0x0A000000, 4, WRITE, b"\2\0\0\0"))
        b.send(device_pb2.ExitStreamRequest(seq=1, cancel=device_pb2.Cancel()))
        a.send(device_pb2.ExitStreamRequest(seq=1, cancel=device_pb2.Cancel()))
        assert a.receive().completion.status == device_pb2.COMPLETION_STATUS_OK
        cancelled = b.receive().completion
        assert cancelled.status == device_pb2.COMPLETION_STATUS_CANCELLED
        assert cancelled.error == "the 4-byte write at 0xa000000 was cancelled before it started: never performed"
        assert a.exchange(access(2, 0x0A000000, 4)).completion.data == b"\1\0\0\0"  # b's write never happened
        a.close()
        b.close()


def _watch(st: device_pb2_grpc.DeviceServiceStub, vm: str) -> tuple[Any, queue.SimpleQueue[Any]]:
    """A Watch for VM ``vm``: the call (the responses' iterator, and what cancels it) and its request queue."""
    requests: queue.SimpleQueue[device_pb2.WatchRequest | None] = queue.SimpleQueue()
    requests.put(device_pb2.WatchRequest(vm_id=vm))
    return st.Watch(iter(requests.get, None)), requests


def test_watch_sends_the_values_first_then_the_changes_no_access_made(node: NodeService) -> None:
    st = stub(node.address)
    call, _ = _watch(st, "watcher")
    s = Stream(st)
    console = None
    try:
        shadows, lines = next(call), next(call)  # every shadow register, then every line
        assert shadows.WhichOneof("event") == "shadow" and lines.WhichOneof("event") == "lines"
        assert {(v.device, v.region, v.offset) for v in shadows.shadow.values} >= {("uart0", "regs", 0x18)}  # FR
        assert [(lv.device, lv.index, lv.level) for lv in lines.lines.levels] == [("uart0", 0, False)]
        s.hello(vm="watcher")
        imsc = s.exchange(access(1, 0x09000038, 4, WRITE, (0x50).to_bytes(4, "little"))).completion  # RX and RT
        assert imsc.status == device_pb2.COMPLETION_STATUS_OK
        assert imsc.shadow.generation > shadows.shadow.generation  # the new IMSC, and all this vCPU was not sent
        # The watch hears every shadow change, the access's too (as the Python service's does).
        assert next(call).shadow.generation == imsc.shadow.generation
        console = st.Console(iter([device_pb2.ConsoleRequest(device="uart0", vm_id="watcher", input=b"x")]))
        # A received byte: no access made the change, so the watch carries it: the line first, then FR, RIS, MIS.
        raised, values = next(call), next(call)
        assert [(lv.device, lv.level) for lv in raised.lines.levels] == [("uart0", True)]
        assert raised.lines.generation > lines.lines.generation and raised.lines.raised_ns > 0
        regs = {v.offset: int.from_bytes(v.data, "little") for v in values.shadow.values}
        assert regs.keys() == {0x18, 0x3C, 0x40}
        assert not regs[0x18] & 0x10 and regs[0x3C] & 0x50 == 0x50 and regs[0x40] == 0x50  # FR, RIS, MIS
        read = s.exchange(access(2, 0x09000000, 4, ack=1)).completion  # DR: the FIFO empties, the line drops
        assert read.data == b"x\0\0\0"
        assert [(lv.device, lv.level) for lv in read.lines.levels] == [("uart0", False)]
        assert read.lines.generation > raised.lines.generation
        regs = {v.offset: int.from_bytes(v.data, "little") for v in read.shadow.values}
        assert regs[0x18] & 0x10 and not regs[0x3C] & 0x50 and regs[0x40] == 0
    finally:
        if console is not None:
            console.cancel()
        call.cancel()
        s.close()


def _reset_when_allowed(st: device_pb2_grpc.DeviceServiceStub, vm: str) -> None:
    """Reset for ``vm``, once the streams other VMs closed have ended in the service too (a moment later)."""
    deadline = time.monotonic() + 5
    while True:
        try:
            st.Reset(device_pb2.ResetRequest(vm_id=vm), timeout=10)
            return
        except grpc.RpcError:
            assert time.monotonic() < deadline, "other VMs stayed attached after their streams ended"
            time.sleep(0.05)


def test_control_rpcs_act_only_for_the_vm_attached(node: NodeService) -> None:
    st = stub(node.address)
    _reset_when_allowed(st, "a")  # nobody attached: allowed
    watch_a, _ = _watch(st, "a")
    next(watch_a)
    st.Reset(device_pb2.ResetRequest(vm_id="a"), timeout=10)
    st.Reset(device_pb2.ResetRequest(), timeout=10)  # the only VM attached
    with pytest.raises(grpc.RpcError) as err:
        st.Reset(device_pb2.ResetRequest(vm_id="b"), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.details() == ("Reset for VM 'b' refused: the devices of mmiosplit-devices are attached to VM 'a' "
                                   "too, whose state it would touch")
    s = Stream(st)
    s.hello(vm="b")  # an exit stream attaches its VM too
    with pytest.raises(grpc.RpcError) as err:
        st.Reset(device_pb2.ResetRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.details() == ("Reset names no VM (vm_id) and VMs 'a', 'b' are attached to mmiosplit-devices: "
                                   "name the VM it acts for")
    with pytest.raises(grpc.RpcError) as err:
        next(st.Console(iter([device_pb2.ConsoleRequest(device="uart0", vm_id="a")])))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "VM 'b'" in (err.value.details() or "")
    with pytest.raises(grpc.RpcError) as err:
        next(st.ReadMirror(device_pb2.ReadMirrorRequest(device="uart0", region="regs", vm_id="b")))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "VM 'a'" in (err.value.details() or "")
    s.close()
    watch_a.cancel()
    _reset_when_allowed(st, "c")
    with pytest.raises(grpc.RpcError) as err:
        next(st.ReadMirror(device_pb2.ReadMirrorRequest(device="uart0", region="regs")))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == "no ROMD region 'regs' on a device named 'uart0'"
    with pytest.raises(grpc.RpcError) as err:
        next(st.Console(iter([device_pb2.ConsoleRequest(device="nope")])))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == "no UART named 'nope'; consoles: uart0"


def test_sigterm_drains_tells_the_watchers_and_exits_0() -> None:
    """NOT_SERVING at once, every watch told and ended, what comes on an open exit stream still completed (and
    marked), and the process gone with status 0 as soon as the last stream ends, long before the grace period."""
    with node_service(DEVICES) as node:
        st = stub(node.address)
        call, _ = _watch(st, "vm")
        assert [next(call).WhichOneof("event") for _ in range(2)] == ["shadow", "lines"]
        s = Stream(st)
        s.hello(vm="vm")
        node.process.send_signal(signal.SIGTERM)
        going = next(call)
        assert going.going_away.reason == "device service mmiosplit-devices is shutting down (SIGTERM)"
        assert going.going_away.grace_seconds == 10
        with pytest.raises(StopIteration):
            next(call)
        assert check_health(node.address, timeout=0.5) != "SERVING"
        late = s.exchange(access(1, 0x0A000000, 4, WRITE, b"late"))
        assert late.completion.status == device_pb2.COMPLETION_STATUS_OK
        assert late.going_away.reason == going.going_away.reason
        s.close()
        started = time.monotonic()
        assert node.process.wait(15) == 0
        assert time.monotonic() - started < 5


def test_console_output_waits_for_the_first_listener() -> None:
    with node_service(DEVICES) as node:
        st = stub(node.address)
        s = Stream(st)
        s.hello()
        for seq, byte in enumerate(b"hi", start=1):
            s.exchange(access(seq, 0x09000000, 1, WRITE, bytes([byte]), ack=seq - 1))
        s.close()
        console = st.Console(iter([device_pb2.ConsoleRequest(device="uart0")]))
        assert next(console).output == b"hi"  # kept while nobody listened
        console.cancel()


def test_garbage_never_takes_the_service_down(node: NodeService) -> None:
    """Bytes that are no message, fields out of every range, streams that end at any point: each call gets an
    answer or an error of its own, and the service goes on serving."""
    channel = grpc.insecure_channel(node.address)
    raw_stream = channel.stream_stream("/mmiosplit.v1.DeviceService/ExitStream", None, None)  # bytes as they are
    raw_unary = channel.unary_unary("/mmiosplit.v1.DeviceService/Reset", None, None)
    raw_console = channel.stream_stream("/mmiosplit.v1.DeviceService/Console", None, None)
    garbage = [b"\xff\xff\xff\xff", b"\x0a\x05abc", b"\x08" + b"\xff" * 11, bytes(range(256))]
    for junk in garbage:
        # protobufjs reads some truncated messages leniently (a string field cut short is read as far as it goes)
        # where Python's protobuf refuses them: either way, an answer or an error for that call alone.
        for call in (raw_stream, raw_console):
            with contextlib.suppress(grpc.RpcError):
                list(call(iter([junk]), timeout=5))
        with contextlib.suppress(grpc.RpcError):
            raw_unary(junk, timeout=5)
    with pytest.raises(grpc.RpcError) as err:
        raw_unary(b"\xff\xff\xff\xff", timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # as the Python service answers (protocol.md)
    assert "malformed request to /mmiosplit.v1.DeviceService/Reset" in str(err.value.details())
    hello = device_pb2.ExitStreamRequest(hello=device_pb2.StreamHello(protocol_version=1, vm_id="junk"))
    with pytest.raises(grpc.RpcError):  # a hello, then garbage
        list(raw_stream(iter([hello.SerializeToString(), b"\xff\xff"]), timeout=5))
    st = stub(node.address)
    (welcome,) = list(st.ExitStream(iter([hello]), timeout=5))  # a hello, then the end: welcomed, then it ends
    assert welcome.WhichOneof("body") == "welcome"
    assert list(st.ExitStream(iter([]), timeout=5)) == []
    assert list(st.Console(iter([]), timeout=5)) == []
    s = Stream(st)
    s.hello(vm="junk")
    top = (1 << 64) - 1
    far = s.exchange(access(1, top, 8)).completion
    assert far.status == device_pb2.COMPLETION_STATUS_NO_DEVICE, far
    assert far.error == "8-byte read at 0xffffffffffffffff: no device there"
    batch = device_pb2.PostedWrites(address=[top, 0x0A000000], length=[4, 1 << 31], data=b"\0" * 4)
    assert s.exchange(access(2, 0x0A000000, 4, posted=batch)).completion.status == \
        device_pb2.COMPLETION_STATUS_BAD_REQUEST
    assert s.exchange(access(top, 0x0A000000, 4)).completion.status == device_pb2.COMPLETION_STATUS_BAD_REQUEST
    s.close()
    assert st.Describe(device_pb2.DescribeRequest(), timeout=5).devices
    assert check_health(node.address) == "SERVING"
    assert node.process.poll() is None
