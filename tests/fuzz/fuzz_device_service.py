"""Target ``device-service``: the device service's gRPC servicer, in process, over mutated protocol messages.

One ``DeviceServicer`` (``device_service/server.py``) over a bus of real models (PL011, PL031, PL061, posted
scratch, CFI flash, fw_cfg, virtio-mmio, PCIe, dma-probe) is built once per process; each input resets it and
then runs, on one asyncio loop with a fake ``grpc.aio.ServicerContext``, one of: Describe, Reset, ReadMirror,
Console, Watch, or an ExitStream, possibly beside a Watch that answers the devices' DMA requests. Messages are
either parsed from raw fuzz bytes (``ParseFromString``; a ``DecodeError`` is the caller's problem, so such a
message is skipped) or built from valid ones with fields chosen by the provider: wrong sequence numbers, missing
or repeated hellos, unknown protocol versions, directions and lengths, data of the wrong size, inconsistent
posted batches, DMA windows anywhere, DMA answers with wrong ids or lengths.

Checked: every call ends in responses or a clean abort (the fake context's ``abort``, as grpc.aio raises) within
a time limit, never another exception; each ExitStream response answers its request's sequence number with a
known status, a successful read carries exactly its length in bytes, a failure says why; responses serialise;
the host's lock is free soon afterwards. A small separate servicer is told to go away now and then, to run the
draining paths.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import atheris
import grpc
from google.protobuf.message import DecodeError, Message

import device_service.server as server_module
from device_service.bus import DeviceBus
from device_service.config import create_device, parse_device_specs
from device_service.server import DeviceServicer
from mmiosplit.v1 import device_pb2
from mmiosplit.wire import PROTOCOL_VERSION
from tests.fuzz.common import Finding, check, quiet_logs

DEVICES = [
    "pl011@0x09000000,name=uart",
    "pl031@0x09010000,name=rtc",
    "pl061@0x09030000,name=gpio",
    "scratch@0x0a000000,size=0x1000,posted=on,name=scratch",
    "pflash@0x00000000,size=256k,sector=64k,name=flash",
    "fw_cfg@0x09020000,name=fwcfg",
    "virtio-mmio@0x0a001000,slots=2,name=virtio",
    "pcie@0x10000000,size=1M,name=pcie",
    "dma-probe@0x0b000000,name=dma",
]
#: Addresses worth aiming at: each device's base and a few registers past it.
BASES = [0x0900_0000, 0x0901_0000, 0x0903_0000, 0x0A00_0000, 0x0, 0x0902_0000, 0x0A00_1000, 0x1000_0000,
         0x0B00_0000, 0x0B00_0100, 0x0900_0018, 0x0902_0008, 0x0902_0010]
NAMES = ["uart", "rtc", "gpio", "scratch", "flash", "fwcfg", "virtio", "pcie", "dma", "", "nope"]
REGIONS = ["regs", "flash", "mem", "data", "ecam", "slot0", ""]
TIME_LIMIT_S = 5.0
STATUSES = {device_pb2.COMPLETION_STATUS_OK, device_pb2.COMPLETION_STATUS_DEVICE_ERROR,
            device_pb2.COMPLETION_STATUS_NO_DEVICE, device_pb2.COMPLETION_STATUS_BAD_REQUEST}


class Aborted(Exception):  # what grpc.aio's abort raises, by another name
    """The servicer ended the RPC with a status: a clean outcome."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class FakeContext:
    """What the servicer uses of ``grpc.aio.ServicerContext``."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[Any], None]] = []

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        check(isinstance(details, str) and bool(details), f"abort {code} without details")
        raise Aborted(code, details)

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self.callbacks.append(callback)

    def done(self) -> None:
        for callback in self.callbacks:
            callback(self)


def _servicer(specs: list[str]) -> DeviceServicer:
    return DeviceServicer(DeviceBus([create_device(s) for s in parse_device_specs(specs)]), "fuzz-devices")


_state: dict[str, Any] = {}


def _shared() -> tuple[asyncio.AbstractEventLoop, DeviceServicer]:
    if not _state:
        _state["loop"] = asyncio.new_event_loop()
        _state["servicer"] = _servicer(DEVICES)
    return _state["loop"], _state["servicer"]


def _parsed(fdp: atheris.FuzzedDataProvider, cls: type[Message]) -> Message | None:
    """A message parsed from raw fuzz bytes, or None when they are not one."""
    msg = cls()
    try:
        msg.ParseFromString(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64)))
    except (DecodeError, RuntimeError, ValueError):
        return None
    return msg


def _u64(fdp: atheris.FuzzedDataProvider) -> int:
    return fdp.PickValueInList([0, 1, 2, 3, 4, 8, 0xFFFF_FFFF, (1 << 64) - 1, fdp.ConsumeIntInRange(0, (1 << 64) - 1)])


def _address(fdp: atheris.FuzzedDataProvider) -> int:
    if fdp.ConsumeIntInRange(0, 7) == 7:
        return _u64(fdp)
    return fdp.PickValueInList(BASES) + fdp.ConsumeIntInRange(0, 0x40)


def _posted(fdp: atheris.FuzzedDataProvider, batch: device_pb2.PostedWrites) -> None:
    for _ in range(fdp.ConsumeIntInRange(0, 6)):
        length = fdp.PickValueInList([1, 2, 4, 8, 0, 3, 16])
        batch.address.append(_address(fdp) if fdp.ConsumeBool() else 0x0A00_0000 + fdp.ConsumeIntInRange(0, 0xFF8))
        batch.length.append(length)
        batch.data += fdp.ConsumeBytes(length)
    if fdp.ConsumeIntInRange(0, 7) == 7:  # columns that disagree
        batch.data += fdp.ConsumeBytes(3)
    if fdp.ConsumeIntInRange(0, 7) == 7:
        batch.length.append(4)


def _exit_request(fdp: atheris.FuzzedDataProvider, seq: int) -> device_pb2.ExitStreamRequest | None:
    shape = fdp.ConsumeIntInRange(0, 15)
    if shape == 15:
        parsed = _parsed(fdp, device_pb2.ExitStreamRequest)
        return parsed if isinstance(parsed, device_pb2.ExitStreamRequest) else None
    req = device_pb2.ExitStreamRequest(seq=seq if fdp.ConsumeIntInRange(0, 15) < 15 else _u64(fdp))
    if shape == 14:
        req.hello.protocol_version = PROTOCOL_VERSION
        return req
    if shape == 13:
        _posted(fdp, req.flush)
        return req
    ex = req.exit
    ex.vcpu_id = fdp.ConsumeIntInRange(0, 3)
    ex.address = _address(fdp)
    ex.length = fdp.PickValueInList([1, 2, 4, 8, 1, 2, 4, 8, 0, 3, 5, 16, 0xFFFF_FFFF])
    write = fdp.ConsumeBool()
    ex.direction = fdp.PickValueInList([device_pb2.ACCESS_DIRECTION_READ, device_pb2.ACCESS_DIRECTION_WRITE]
                                       if fdp.ConsumeIntInRange(0, 7) < 7 else [0, 3, 77])
    if write:
        ex.direction = device_pb2.ACCESS_DIRECTION_WRITE
    if ex.direction == device_pb2.ACCESS_DIRECTION_WRITE or fdp.ConsumeIntInRange(0, 7) == 7:
        n = ex.length if ex.length <= 16 and fdp.ConsumeIntInRange(0, 7) < 7 else fdp.ConsumeIntInRange(0, 17)
        ex.data = fdp.ConsumeBytes(n)
    if fdp.ConsumeIntInRange(0, 3) == 3:
        _posted(fdp, ex.posted)
    ex.device = fdp.PickValueInList(NAMES)
    ex.syndrome, ex.pc = _u64(fdp), _u64(fdp)
    return req


async def _exit_stream(fdp: atheris.FuzzedDataProvider, servicer: DeviceServicer) -> None:
    first: device_pb2.ExitStreamRequest | None
    if fdp.ConsumeIntInRange(0, 7) < 7:
        first = device_pb2.ExitStreamRequest(seq=fdp.PickValueInList([0, 0, 0, 5, (1 << 64) - 1]))
        first.hello.protocol_version = PROTOCOL_VERSION if fdp.ConsumeIntInRange(0, 7) < 7 else _u64(fdp) & 0xFFFF_FFFF
        first.hello.vm_id = fdp.PickValueInList(["vm-1", "", "x" * 300])
        first.hello.vcpu_id = fdp.ConsumeIntInRange(0, (1 << 32) - 1)
        first.hello.architecture = fdp.ConsumeIntInRange(0, 3)
    else:
        first = _exit_request(fdp, 0)
    requests: list[device_pb2.ExitStreamRequest] = [first] if first is not None else []
    seq = (requests[0].seq + 1) & ((1 << 64) - 1) if requests else 1
    for _ in range(fdp.ConsumeIntInRange(0, 24)):
        req = _exit_request(fdp, seq)
        if req is not None:
            requests.append(req)
            seq = (req.seq + 1) & ((1 << 64) - 1)

    async def feed() -> AsyncIterator[device_pb2.ExitStreamRequest]:
        for r in requests:
            yield r

    context = FakeContext()
    responses = []
    try:
        async for response in servicer.ExitStream(feed(), context):  # type: ignore[arg-type]
            responses.append(response)
    except Aborted:
        pass
    finally:
        context.done()
    if not responses:
        return
    welcome = responses[0]
    check(welcome.WhichOneof("body") == "welcome" and welcome.seq == requests[0].seq, f"first response {welcome}")
    check(len(responses) == len(requests), f"{len(requests)} requests, {len(responses)} responses")
    for req, resp in zip(requests[1:], responses[1:], strict=True):
        check(resp.seq == req.seq, f"response seq {resp.seq} to request seq {req.seq}")
        check(resp.WhichOneof("body") == "completion", f"response {resp} has no completion")
        c = resp.completion
        check(c.status in STATUSES, f"completion status {c.status} for {req}")
        if c.status != device_pb2.COMPLETION_STATUS_OK:
            check(bool(c.error), f"failed completion without an error, for {req}")
        elif req.WhichOneof("body") == "exit" and req.exit.direction != device_pb2.ACCESS_DIRECTION_WRITE:
            check(len(c.data) == req.exit.length, f"read of {req.exit.length} bytes answered {len(c.data)}: {req}")
        resp.SerializeToString()


async def _watch(fdp: atheris.FuzzedDataProvider, servicer: DeviceServicer, until: asyncio.Event) -> None:
    """A Watch stream: a first request (windows anywhere), then answers to the DMA requests it sees."""
    first = device_pb2.WatchRequest(vm_id=fdp.PickValueInList(["vm-1", ""]))
    for _ in range(fdp.ConsumeIntInRange(0, 3)):
        first.dma_windows.add(name=fdp.PickValueInList(["ram", ""]),
                              base=fdp.PickValueInList([0x4000_0000, 0, _u64(fdp)]),
                              size=fdp.PickValueInList([0x1000, 0, 1 << 30, _u64(fdp)]))
    answers: asyncio.Queue[device_pb2.WatchRequest | None] = asyncio.Queue()
    policy = [fdp.ConsumeIntInRange(0, 4) for _ in range(8)]
    raw = _parsed(fdp, device_pb2.WatchRequest)

    async def feed() -> AsyncIterator[device_pb2.WatchRequest]:
        yield first
        if raw is not None:
            yield raw  # type: ignore[misc]
        while (item := await answers.get()) is not None:
            yield item

    context = FakeContext()
    gen: Any = servicer.Watch(feed(), context)  # type: ignore[arg-type]
    served = 0
    try:
        while True:
            next_event = asyncio.ensure_future(gen.__anext__())
            stop = asyncio.ensure_future(until.wait())
            await asyncio.wait({next_event, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not next_event.done():
                next_event.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, Aborted):
                    await next_event
                break
            stop.cancel()
            try:
                response = next_event.result()
            except (StopAsyncIteration, Aborted):
                break
            response.SerializeToString()
            if response.WhichOneof("event") == "dma":
                dma = response.dma
                how = policy[served % len(policy)]
                served += 1
                result = device_pb2.DmaResult(id=dma.id if how != 3 else dma.id + 1000)
                if how == 0:
                    result.data = bytes(dma.length)
                elif how == 1:
                    result.error = "fuzz: refused"
                elif how == 2:
                    result.data = bytes(dma.length + 3)  # the wrong length
                if how != 4:  # 4: never answered (the device's DMA times out)
                    answers.put_nowait(device_pb2.WatchRequest(dma_result=result))
    finally:
        answers.put_nowait(None)
        await gen.aclose()
        await asyncio.sleep(0)


async def _console(fdp: atheris.FuzzedDataProvider, servicer: DeviceServicer) -> None:
    reqs = [device_pb2.ConsoleRequest(device=fdp.PickValueInList(["uart", "uart", "rtc", "", "x"]),
                                      input=fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64)))]
    reqs += [device_pb2.ConsoleRequest(input=fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64)))
             for _ in range(fdp.ConsumeIntInRange(0, 3))]

    async def feed() -> AsyncIterator[device_pb2.ConsoleRequest]:
        for r in reqs:
            yield r

    gen: Any = servicer.Console(feed(), FakeContext())  # type: ignore[arg-type]
    try:
        with contextlib.suppress(TimeoutError, Aborted, StopAsyncIteration):
            await asyncio.wait_for(gen.__anext__(), 0.001)
    finally:
        await gen.aclose()


async def _one(fdp: atheris.FuzzedDataProvider, servicer: DeviceServicer) -> None:
    what = fdp.ConsumeIntInRange(0, 9)
    context = FakeContext()
    request: Any
    if what == 0:
        request = _parsed(fdp, device_pb2.DescribeRequest) or device_pb2.DescribeRequest()
        (await servicer.Describe(request, context)).SerializeToString()  # type: ignore[arg-type]
    elif what == 1:
        request = _parsed(fdp, device_pb2.ResetRequest) or device_pb2.ResetRequest()
        (await servicer.Reset(request, context)).SerializeToString()  # type: ignore[arg-type]
    elif what == 2:
        request = _parsed(fdp, device_pb2.ReadMirrorRequest)
        if request is None or fdp.ConsumeBool():
            request = device_pb2.ReadMirrorRequest(device=fdp.PickValueInList(NAMES),
                                                   region=fdp.PickValueInList(REGIONS))
        try:
            async for chunk in servicer.ReadMirror(request, context):  # type: ignore[arg-type]
                chunk.SerializeToString()
        except Aborted as exc:
            check(exc.code is grpc.StatusCode.NOT_FOUND, f"ReadMirror {request}: {exc}")
    elif what == 3:
        await _console(fdp, servicer)
    elif what == 4:
        until = asyncio.Event()
        until.set()
        await _watch(fdp, servicer, until)
    else:  # an exit stream, half the time beside a watch that serves DMA
        if fdp.ConsumeBool():
            until = asyncio.Event()
            watch = asyncio.ensure_future(_watch(fdp, servicer, until))
            await asyncio.sleep(0)
            try:
                await _exit_stream(fdp, servicer)
            finally:
                until.set()
                await watch
        else:
            await _exit_stream(fdp, servicer)


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    quiet_logs()
    server_module.DMA_TIMEOUT_S = 0.2  # an unanswered DMA fails in 0.2 s here instead of 10
    loop, servicer = _shared()
    if fdp.ConsumeIntInRange(0, 63) == 63:  # now and then, a service that is going away
        servicer = _servicer(["scratch@0x0a000000,size=0x1000,posted=on,name=scratch", "pl011@0x09000000,name=uart"])
        servicer.host.go_away("fuzz: draining", 1.0)
    else:
        servicer.host.reset()
    try:
        loop.run_until_complete(asyncio.wait_for(_one(fdp, servicer), TIME_LIMIT_S))
    except TimeoutError as exc:
        raise Finding(f"no answer within {TIME_LIMIT_S} s") from exc
    # Work the call left behind (a watch's unsubscribe runs on a worker) may hold the lock for a moment.
    check(servicer.host.lock.acquire(timeout=TIME_LIMIT_S),
          f"the host's lock is still held {TIME_LIMIT_S} s after the call")
    servicer.host.lock.release()
