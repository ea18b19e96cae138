"""The device service faced with a client that breaks the protocol: clear answers, and it stays up."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from mmiosplit.v1 import device_pb2, device_pb2_grpc, vcpu_pb2, vcpu_pb2_grpc
from mmiosplit.wire import PROTOCOL_VERSION
from mmiosplit_cli.launcher import check_health, local_services
from mmiosplit_cli.runner import channel
from tests.integration.client import Services, a64

pytestmark = pytest.mark.integration

SCRATCH = 0x0A00_0000
OK = device_pb2.COMPLETION_STATUS_OK
BAD = device_pb2.COMPLETION_STATUS_BAD_REQUEST


class RawStream:
    """A hand-driven ExitStream, as a buggy vcpu-side client would use it."""

    def __init__(self, address: str) -> None:
        self._channel = channel(address)
        self._q: queue.SimpleQueue[device_pb2.ExitStreamRequest | None] = queue.SimpleQueue()
        self._call: Iterator[device_pb2.ExitStreamResponse] = device_pb2_grpc.DeviceServiceStub(
            self._channel).ExitStream(iter(self._q.get, None))

    def send(self, req: device_pb2.ExitStreamRequest) -> device_pb2.ExitStreamResponse:
        self._q.put(req)
        return next(self._call)

    def hello(self, vm_id: str = "test") -> None:
        welcome = self.send(device_pb2.ExitStreamRequest(seq=0, hello=device_pb2.StreamHello(
            protocol_version=PROTOCOL_VERSION, vm_id=vm_id, vcpu_id=0)))
        assert welcome.WhichOneof("body") == "welcome"

    def close(self) -> None:
        self._q.put(None)
        self._channel.close()


def _exit(address: int, length: int, write: bool = False, data: bytes = b"") -> device_pb2.MmioExit:
    return device_pb2.MmioExit(address=address, length=length, data=data, direction=(
        device_pb2.ACCESS_DIRECTION_WRITE if write else device_pb2.ACCESS_DIRECTION_READ))


def test_first_message_must_be_a_hello(unix_services: Services) -> None:
    stream = RawStream(unix_services.devices)
    with pytest.raises(grpc.RpcError) as info:
        stream.send(device_pb2.ExitStreamRequest(seq=1, exit=_exit(SCRATCH, 4)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "must be a hello" in info.value.details()
    stream.close()


def test_wrong_protocol_version_is_refused(unix_services: Services) -> None:
    stream = RawStream(unix_services.devices)
    with pytest.raises(grpc.RpcError) as info:
        stream.send(device_pb2.ExitStreamRequest(seq=0, hello=device_pb2.StreamHello(protocol_version=99)))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "protocol version 99" in info.value.details()
    stream.close()


def test_bad_requests_get_bad_request_completions(unix_services: Services) -> None:
    stream = RawStream(unix_services.devices)
    stream.hello()
    cases = [
        (device_pb2.ExitStreamRequest(seq=5, exit=_exit(SCRATCH, 4)),
         "sequence number 5 from VM test vCPU 0, expected 1"),
        (device_pb2.ExitStreamRequest(seq=6, exit=_exit(SCRATCH, 3)), "access length 3"),
        (device_pb2.ExitStreamRequest(seq=7, exit=_exit(SCRATCH, 4, True, b"\1\2")), "carries 2 data bytes"),
        (device_pb2.ExitStreamRequest(seq=8, flush=device_pb2.PostedWrites(address=[SCRATCH], length=[4], data=b"1")),
         "lengths add up to 4 bytes but carry 1"),
        (device_pb2.ExitStreamRequest(seq=9), "unexpected None"),
    ]
    for req, needle in cases:
        reply = stream.send(req)
        assert reply.seq == req.seq
        assert reply.completion.status == BAD, reply
        assert needle in reply.completion.error
    # An address no device owns, and a device refusing an access.
    nobody = stream.send(device_pb2.ExitStreamRequest(seq=10, exit=_exit(0x7000_0000, 4)))
    assert nobody.completion.status == device_pb2.COMPLETION_STATUS_NO_DEVICE
    assert "0x70000000" in nobody.completion.error
    refused = stream.send(device_pb2.ExitStreamRequest(seq=11, exit=_exit(0x0900_0001, 4)))
    assert refused.completion.status == device_pb2.COMPLETION_STATUS_DEVICE_ERROR
    assert "uart0" in refused.completion.error
    # The stream still works, and posted writes that fail are reported, never dropped silently.
    write = stream.send(device_pb2.ExitStreamRequest(seq=12, exit=_exit(SCRATCH, 4, True, b"\x78\x56\x34\x12")))
    assert write.completion.status == OK
    flush = stream.send(device_pb2.ExitStreamRequest(seq=13, flush=device_pb2.PostedWrites(
        address=[SCRATCH + 4, 0x7000_0000], length=[1, 1], data=b"\xaa\xbb")))
    assert flush.completion.status == OK
    assert [(e.index, e.address) for e in flush.completion.posted_errors] == [(1, 0x7000_0000)]
    read = stream.send(device_pb2.ExitStreamRequest(seq=14, exit=_exit(SCRATCH, 8)))
    assert read.completion.data == b"\x78\x56\x34\x12\xaa\x00\x00\x00"
    stream.close()
    assert check_health(unix_services.devices) == "SERVING"


def _session_hello(stream: RawStream, session: str, last_acked: int = 0) -> device_pb2.StreamWelcome:
    reply = stream.send(device_pb2.ExitStreamRequest(seq=0, hello=device_pb2.StreamHello(
        protocol_version=PROTOCOL_VERSION, vm_id="test", vcpu_id=0, session_id=session, last_acked=last_acked)))
    return reply.welcome


def test_a_resumed_session_answers_repeats_from_memory_and_never_applies_them_twice(
        unix_services: Services) -> None:
    session = f"resume-{id(unix_services)}"
    first = RawStream(unix_services.devices)
    welcome = _session_hello(first, session)
    assert not welcome.resumed and welcome.instance_id and welcome.applied == 0
    a = first.send(device_pb2.ExitStreamRequest(seq=1, exit=_exit(SCRATCH + 0x40, 4, True, b"AAAA")))
    b = first.send(device_pb2.ExitStreamRequest(seq=2, ack=1, exit=_exit(SCRATCH + 0x40, 4, True, b"BBBB")))
    assert a.completion.status == OK and b.completion.status == OK
    first.close()  # the stream breaks; the client never saw response 2, it says it has 1
    again = RawStream(unix_services.devices)
    welcome = _session_hello(again, session, last_acked=1)
    assert welcome.resumed and welcome.applied == 2
    repeat = again.send(device_pb2.ExitStreamRequest(seq=2, ack=1, exit=_exit(SCRATCH + 0x40, 4, True, b"BBBB")))
    assert repeat == b  # the response kept, not a second write
    stale = again.send(device_pb2.ExitStreamRequest(seq=1, ack=2, exit=_exit(SCRATCH + 0x40, 4, True, b"AAAA")))
    assert stale.completion.status == BAD and "applied already and its response acknowledged" in stale.completion.error
    read = again.send(device_pb2.ExitStreamRequest(seq=3, ack=2, exit=_exit(SCRATCH + 0x40, 4)))
    assert read.completion.data == b"BBBB"  # the repeat of 1 after 2 did not write AAAA again
    again.close()
    # Another session, or none, starts from 1 and resumes nothing.
    other = RawStream(unix_services.devices)
    assert not _session_hello(other, session + "-other").resumed
    assert other.send(device_pb2.ExitStreamRequest(seq=1, exit=_exit(SCRATCH + 0x40, 4))).completion.data == b"BBBB"
    other.close()


def test_console_of_an_unknown_uart(unix_services: Services) -> None:
    with channel(unix_services.devices) as ch:
        call = device_pb2_grpc.DeviceServiceStub(ch).Console(iter([device_pb2.ConsoleRequest(device="uart9")]))
        with pytest.raises(grpc.RpcError) as info:
            next(call)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "uart9" in info.value.details() and "uart0" in info.value.details()


@pytest.mark.parametrize("which", ["vcpu", "devices"])
def test_reflection_lists_the_services(unix_services: Services, which: str) -> None:
    address = getattr(unix_services, which)
    with channel(address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    expected = "mmiosplit.v1.VcpuService" if which == "vcpu" else "mmiosplit.v1.DeviceService"
    assert {expected, "grpc.health.v1.Health"} <= names


def test_set_registers_and_write_memory_before_start(unix_services: Services) -> None:
    services = unix_services
    vm_id = services.create(services.config(a64(0x14000000)))  # b .
    code = a64(0x91000442, 0xD2800100, 0xF2B08000, 0xD4000002)  # add x2,x2,#1; PSCI SYSTEM_OFF
    services.stub.WriteMemory(vcpu_pb2.WriteMemoryRequest(vm_id=vm_id, address=0x4008_0000, data=code))
    services.stub.SetRegisters(vcpu_pb2.SetRegistersRequest(vm_id=vm_id, vcpu_id=0,
                                                            registers=[vcpu_pb2.Register(name="x2", value=41)]))
    final = services.start_and_wait(vm_id)
    regs = services.registers(vm_id, 0, "x2")
    mem = services.stub.ReadMemory(vcpu_pb2.ReadMemoryRequest(vm_id=vm_id, address=0x4008_0000, length=4))
    services.delete(vm_id)
    assert final.kind == vcpu_pb2.VM_EVENT_KIND_POWERED_OFF
    assert regs["x2"] == 42 and mem.data == code[:4]
    with pytest.raises(grpc.RpcError) as info:
        vcpu_pb2_grpc.VcpuServiceStub(channel(services.vcpu)).ReadMemory(
            vcpu_pb2.ReadMemoryRequest(vm_id=vm_id, address=0, length=4))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_romd_mirror_updates_ride_on_completions(tmp_path: Path) -> None:
    image = tmp_path / "flash.bin"
    image.write_bytes(bytes(range(256)) * 16)
    args = ["--device", f"pflash@0x0,name=flash0,size=0x40000,sector=0x40000,file={image}"]
    with local_services(args, start_vcpu=False) as (_, devices, _h):
        assert devices is not None
        with channel(devices) as ch:
            stub = device_pb2_grpc.DeviceServiceStub(ch)
            desc = stub.Describe(device_pb2.DescribeRequest())
            region = desc.devices[0].regions[0]
            assert region.kind == device_pb2.REGION_KIND_ROMD and region.size == 0x40000
            chunks = list(stub.ReadMirror(device_pb2.ReadMirrorRequest(device="flash0", region=region.name)))
            assert chunks[0].mirror_enabled and chunks[0].offset == 0
            mirror = bytearray(region.size)  # bytes not sent are zero
            for c in chunks:
                mirror[c.offset:c.offset + len(c.data)] = c.data
            assert mirror[:4096] == image.read_bytes() and mirror[4096:] == bytes(0x40000 - 4096)
        stream = RawStream(devices)
        stream.hello()
        # Read ID (0x90) switches the flash out of array mode: reads must now exit.
        to_id = stream.send(device_pb2.ExitStreamRequest(seq=1, exit=_exit(0, 4, True, b"\x90\x00\x90\x00")))
        assert [(u.device, u.mirror_enabled) for u in to_id.completion.mirror_updates] == [("flash0", False)]
        # Back to read array (0xff): the mirror may serve reads again.
        back = stream.send(device_pb2.ExitStreamRequest(seq=2, exit=_exit(0, 4, True, b"\xff\x00\xff\x00")))
        assert [u.mirror_enabled for u in back.completion.mirror_updates] == [True]
        stream.close()
        with channel(devices) as ch:
            with pytest.raises(grpc.RpcError) as info:
                list(device_pb2_grpc.DeviceServiceStub(ch).ReadMirror(
                    device_pb2.ReadMirrorRequest(device="flash9", region="flash")))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND


def _refused(call: Callable[[], object]) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value.details()
    return str(info.value.details())


def _until(check: Callable[[], object], what: str) -> None:
    """Stream ends reach the service a moment after the client closes them."""
    deadline = time.monotonic() + 5
    while True:
        try:
            check()
            return
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise AssertionError(f"still refused: {what}") from None
            time.sleep(0.02)


def test_control_rpcs_act_only_for_the_vm_attached(tmp_path: Path) -> None:
    """Reset, Console and ReadMirror name their VM; while another VM is attached (an open exit or watch stream)
    the service refuses them, so one VM never resets, reads or types into devices another one uses."""
    image = tmp_path / "flash.bin"
    image.write_bytes(bytes(4096))
    args = ["--device", f"pflash@0x0,name=flash0,size=0x40000,sector=0x40000,file={image}",
            "--device", "pl011@0x09000000,name=uart0"]
    with local_services(args, start_vcpu=False) as (_, devices, _h), channel(devices) as ch:
        assert devices is not None
        stub = device_pb2_grpc.DeviceServiceStub(ch)

        def reset(vm_id: str = "") -> object:
            return stub.Reset(device_pb2.ResetRequest(vm_id=vm_id), timeout=10)

        def mirror(vm_id: str) -> object:
            return list(stub.ReadMirror(device_pb2.ReadMirrorRequest(vm_id=vm_id, device="flash0", region="flash"),
                                        timeout=10))

        def console(vm_id: str) -> object:
            call = stub.Console(iter([device_pb2.ConsoleRequest(vm_id=vm_id, device="uart0", input=b"x")]),
                               timeout=10)
            return next(call)

        reset(), reset("a"), mirror("b")  # nobody attached: anyone may
        a = RawStream(devices)
        a.hello("a")
        reset("a"), reset(), mirror("a")  # the only VM attached, named or not
        assert "attached to VM 'a'" in _refused(lambda: reset("b"))
        assert "VM 'a'" in _refused(lambda: mirror("b"))
        assert "Console for VM 'b' refused" in _refused(lambda: console("b"))
        b = RawStream(devices)
        b.hello("b")
        assert "VM 'b'" in _refused(lambda: reset("a"))
        assert "names no VM" in _refused(reset) and "VMs 'a', 'b'" in _refused(reset)
        b.close()
        _until(lambda: reset("a"), "Reset for VM a after VM b left")
        # A watch stream attaches its VM as well.
        watch_q: queue.SimpleQueue[device_pb2.WatchRequest | None] = queue.SimpleQueue()
        watch_q.put(device_pb2.WatchRequest(vm_id="c"))
        watch = stub.Watch(iter(watch_q.get, None))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the watch reaches the service a moment after it is opened
            try:
                reset("a")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION and "VM 'c'" in str(exc.details())
                break
            time.sleep(0.02)
        else:
            raise AssertionError("Reset for VM a still allowed while VM c watches")
        watch.cancel()
        watch_q.put(None)
        a.close()
        _until(lambda: reset("b"), "Reset for VM b after everyone left")
