"""Target ``exitpath``: the vcpu service's exit path against a device service whose every answer is fuzzed.

Each input runs a small guest (``tests/exitpath/harness.py``'s layout: A64, A32 or T32, a handful of loads and
stores, with and without base writeback, to a device at ``harness.DEV``) in a ``Vm`` whose only device endpoint is
``FuzzEndpoint``: an in-process ``DeviceEndpoint``/``ExitChannel``/``ServiceWatch`` (like ``device_service.local``)
whose answers come from the fuzz input. Completions are built as wire messages and converted with the gRPC
transport's own ``completion_from_wire``: any status number (unknown ones become the transport's
``TransportError``), data of any length, error text, posted-write errors with any index and address, mirror updates,
shadow updates and line levels for devices, regions and lines that exist or not, with any generation; or the channel
raises ``TransportError``/``DeadlineExceeded``. Half the inputs go through the gRPC transport's own
``GrpcExitChannel`` over a fuzzed stream instead (``FuzzCall``: handshake answers, sequence numbers right or wrong,
the wrong kind of answer, ``going_away``, the stream ending or failing). The watch sends shadow values, line levels,
DMA requests (inside and outside the granted window) and ``GoingAway``, or breaks. Describe offers a plain region, a
posted one, one with shadow registers, or a ROMD region whose mirror chunks are fuzzed too; or, one time in four, a
``DescribeResponse`` from anything (regions anywhere, of any size, kind and access sizes, shadow windows, lines)
read by the gRPC transport's own ``GrpcEndpoint.describe``. Policies are drawn at random.

Checked: the VM reaches a final event within a time limit (no hang); the final event is not an internal error
(``ErrorKind.INTERNAL``, or a reason saying "internal error"); no thread ends with an exception; the watch thread
logs no internal error; a DMA outside the windows is refused with ``DmaError`` and nothing else; ``Vm`` construction
refuses a bad configuration only with ``VmConfigError``. Pure-Python loop by default: every input starts vCPU, watch
and ticker threads, which libFuzzer's in-process model (one call, then the next, exit on the first crash) does not
suit.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import atheris
import grpc

from mmiosplit.mmio import (
    Completion,
    DeadlineExceeded,
    DmaError,
    DmaTarget,
    DmaWindow,
    ExitChannel,
    GoingAway,
    MirrorChange,
    MmioExit,
    RemoteLine,
    RemoteRegion,
    TransportError,
)
from mmiosplit.mmio import WatchEvent as ServiceEvent
from mmiosplit.v1 import device_pb2
from mmiosplit.wire import DEVICE_FEATURES, PROTOCOL_VERSION
from tests.exitpath import harness
from tests.fuzz.common import Finding, check, check_threads, quiet_logs, watch_threads
from vcpu_service.domain import ErrorKind, EventKind, FaultPolicy, Policies, UnmappedPolicy
from vcpu_service.transport import (
    GrpcEndpoint,
    GrpcExitChannel,
    completion_from_wire,
    line_change,
    mirror_changes,
    shadow_change,
)
from vcpu_service.vm import ImageSpec, Vm, VmConfigError, VmSpec

SERVICE = "fuzz"
DEV = harness.DEV
DEV_SIZE = 0x1000
TIME_LIMIT_S = 10.0
STATUSES = [device_pb2.COMPLETION_STATUS_OK] * 6 + [device_pb2.COMPLETION_STATUS_DEVICE_ERROR,
                                                    device_pb2.COMPLETION_STATUS_NO_DEVICE,
                                                    device_pb2.COMPLETION_STATUS_BAD_REQUEST, 0, 9]

# Loads and stores through x0/r0 (= DEV): plain, sign-extending, with base writeback.
BODIES: dict[str, list[Any]] = {
    harness.A64: [0xB9400001, 0xB9000401, 0x39800402, 0xF8408403, 0xB8404401, 0x39000001, 0xF9400C05,
                  0x78C02006, 0xB8BF4C07],
    harness.A32: [0xE5901000, 0xE5801004, 0xE1D020D1, 0xE4903004, 0xE1D040B2, 0xE5C01003, 0xE5B05004],
    harness.T32: [(0x6801,), (0x6041,), (0x7842,), (0x8883,), (0x5C44,), (0xF8D0, 0x5008), (0xF850, 0x3B04)],
}



class _InternalLog(logging.Handler):
    """Internal errors the VM only logs (a watch thread that hit a bug)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "internal error" in text:
            self.records.append(text)


_internal = _InternalLog()


class Script:
    """The fuzz input's answers, shared by the channel, the watch and the endpoint; thread-safe."""

    def __init__(self, fdp: atheris.FuzzedDataProvider) -> None:
        self._fdp = fdp
        self.lock = threading.Lock()
        self.errors: list[str] = []  # exceptions the fake saw that are findings (a DMA raising a non-DmaError)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._fdp, name)

        def locked(*args: Any) -> Any:
            with self.lock:
                return method(*args)

        return locked


def _u64(s: Script) -> int:
    return s.PickValueInList([0, 1, 2, 0x100, DEV, DEV + 4, 0x4000_0000, (1 << 64) - 1])


def _shadow_pb(s: Script, pb: device_pb2.ShadowUpdate) -> None:
    pb.generation = s.PickValueInList([1, 2, 3, 0, 1000, (1 << 64) - 1])
    for _ in range(s.ConsumeIntInRange(0, 3)):
        pb.values.add(device=s.PickValueInList(["dev", "dev", "", "other"]),
                      region=s.PickValueInList(["regs", "regs", "flash", ""]),
                      offset=s.PickValueInList([0, 4, 8, 0xFFC, 0x1000, (1 << 64) - 1]),
                      data=s.ConsumeBytes(s.PickValueInList([4, 4, 0, 1, 8])))


def _lines_pb(s: Script, pb: device_pb2.LineUpdate) -> None:
    pb.generation = s.PickValueInList([1, 2, 3, 0, 1000, (1 << 64) - 1])
    pb.raised_ns = s.PickValueInList([0, 1, (1 << 64) - 1])
    for _ in range(s.ConsumeIntInRange(0, 3)):
        pb.levels.add(device=s.PickValueInList(["dev", "", "other"]), index=s.PickValueInList([0, 1, 0xFFFF_FFFF]),
                      level=s.ConsumeBool())


def _mirror_pb(s: Script, pb: device_pb2.MirrorUpdate) -> None:
    pb.device = s.PickValueInList(["dev", "", "other"])
    pb.region = s.PickValueInList(["flash", "regs", ""])
    pb.mirror_enabled = s.ConsumeBool()
    for _ in range(s.ConsumeIntInRange(0, 2)):
        pb.patches.add(offset=s.PickValueInList([0, 0x10, 0xFFC, 0x1000, (1 << 64) - 1]),
                       data=s.ConsumeBytes(s.PickValueInList([4, 1, 0, 16])))


def completion(s: Script, exit: MmioExit | None) -> Completion:
    """A fuzzed answer, as the gRPC transport would hand it to the exit path; may raise TransportError."""
    how = s.ConsumeIntInRange(0, 31)
    if how == 31:
        raise DeadlineExceeded(f"{SERVICE}: fuzz: no completion in time")
    if how == 30:
        raise TransportError(f"{SERVICE}: fuzz: the stream broke")
    length = exit.length if exit is not None and not exit.is_write else 0
    return completion_from_wire(SERVICE, completion_pb(s, length), same_clock=s.ConsumeBool())


def completion_pb(s: Script, length: int) -> device_pb2.Completion:
    """A fuzzed wire completion for a read of ``length`` bytes (0: a write or a flush)."""
    pb = device_pb2.Completion(status=s.PickValueInList(STATUSES))
    pb.data = s.ConsumeBytes(length if s.ConsumeIntInRange(0, 7) < 7 else s.PickValueInList([0, 1, 3, 8, 16]))
    if pb.status != device_pb2.COMPLETION_STATUS_OK or s.ConsumeIntInRange(0, 7) == 7:
        pb.error = s.PickValueInList(["fuzz: refused", "", "\u2603"])
    extras = s.ConsumeIntInRange(0, 15)
    if extras & 1 and extras > 8:
        pb.posted_errors.add(index=s.PickValueInList([0, 1, 0xFFFF_FFFF]), address=_u64(s), error="fuzz")
    if extras & 2 and extras > 8:
        _mirror_pb(s, pb.mirror_updates.add())
    if extras & 4 and extras > 8:
        _shadow_pb(s, pb.shadow)
    if extras & 8 and s.ConsumeBool():
        _lines_pb(s, pb.lines)
    return pb


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        super().__init__(code.name)
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "fuzz: the stream failed"


class FuzzCall:
    """The call object of a fuzzed ExitStream for the gRPC transport's own ``GrpcExitChannel``: each ``next``
    answers the next request the channel sent, with the right or a wrong sequence number, a welcome or a
    completion or nothing, now and then ``going_away``, or ends or breaks the stream."""

    def __init__(self, script: Script, requests: Iterator[device_pb2.ExitStreamRequest]) -> None:
        self._s = script
        self._requests = requests
        self._cancelled = False

    def __iter__(self) -> FuzzCall:
        return self

    def __next__(self) -> device_pb2.ExitStreamResponse:
        s = self._s
        if self._cancelled:
            raise FakeRpcError(grpc.StatusCode.CANCELLED)
        request = next(self._requests)
        how = s.ConsumeIntInRange(0, 31)
        if how == 31:
            raise StopIteration
        if how == 30:
            raise FakeRpcError(s.PickValueInList([grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL]))
        reply = device_pb2.ExitStreamResponse(seq=request.seq if how < 29 else request.seq + 1)
        body = request.WhichOneof("body")
        if s.ConsumeIntInRange(0, 15) == 15:
            body = s.PickValueInList(["hello", "exit", "none"])  # the wrong kind of answer
        if body == "hello":
            reply.welcome.protocol_version = PROTOCOL_VERSION if s.ConsumeIntInRange(0, 15) < 15 else 99
            reply.welcome.service_name = SERVICE
        elif body in ("exit", "flush"):
            exit = request.exit if request.WhichOneof("body") == "exit" else None
            length = exit.length if exit is not None and exit.direction != device_pb2.ACCESS_DIRECTION_WRITE else 0
            reply.completion.CopyFrom(completion_pb(s, length))
        if s.ConsumeIntInRange(0, 15) == 15:
            reply.going_away.reason = "fuzz: going away"
        return reply

    def cancel(self) -> None:
        self._cancelled = True


class FuzzStub:
    """What ``GrpcExitChannel`` uses of a device service's stub."""

    def __init__(self, script: Script) -> None:
        self._s = script

    def ExitStream(self, requests: Iterator[device_pb2.ExitStreamRequest]) -> FuzzCall:
        return FuzzCall(self._s, requests)


class FuzzChannel:
    """An ExitChannel whose answers the script gives."""

    def __init__(self, script: Script) -> None:
        self._s = script
        self._queued = 0

    def access(self, exit: MmioExit) -> Completion:
        self._queued = 0
        return completion(self._s, exit)

    def post(self, address: int, data: bytes) -> Completion | None:
        self._queued += 1
        if self._s.ConsumeIntInRange(0, 7) < 7:
            return None
        self._queued = 0
        return completion(self._s, None)

    def flush(self, wait: bool = True) -> Completion:
        self._queued = 0
        return completion(self._s, None)

    def pending_posted(self) -> int:
        return self._queued

    def broken(self) -> bool:
        return False

    def close(self) -> None:
        pass


class FuzzWatch:
    """A ServiceWatch: a few fuzzed events (shadow values, line levels, DMA served in ``next`` as the gRPC
    transport serves it, going away, a break), then quiet until cancelled."""

    def __init__(self, script: Script, dma: DmaTarget | None, has_shadows: bool) -> None:
        self._s = script
        self._dma = dma
        self._cancelled = threading.Event()
        self._events = script.ConsumeIntInRange(0, 6)
        self._snapshot = has_shadows  # the VM waits for a first shadow value of a service that declares some
        self._gone = False

    def _serve_dma(self) -> None:
        if self._dma is None:
            return
        address = self._s.PickValueInList([harness.RAM_BASE, harness.DATA, harness.RAM_BASE + harness.RAM_SIZE - 4,
                                           0, DEV, (1 << 64) - 1])
        length = self._s.PickValueInList([0, 1, 4, 256, 0x10_0000, 1 << 40])
        try:
            if self._s.ConsumeBool():
                got = self._dma.dma_read("dev", address, length)
                if len(got) != length:
                    self._s.errors.append(f"DMA read of {length} bytes at {address:#x} gave {len(got)}")
            else:
                self._dma.dma_write("dev", address, bytes(min(length, 4096)))
        except DmaError:
            pass
        except Exception as exc:
            self._s.errors.append(f"DMA of {length} bytes at {address:#x} raised {type(exc).__name__}: {exc}")

    def next(self, timeout: float | None = None) -> ServiceEvent | None:
        if self._gone or self._cancelled.is_set():
            return None
        if self._snapshot:
            self._snapshot = False
            pb = device_pb2.ShadowUpdate()
            _shadow_pb(self._s, pb)
            return shadow_change(SERVICE, pb)
        while self._events > 0:
            self._events -= 1
            kind = self._s.ConsumeIntInRange(0, 9)
            if kind <= 2:
                self._serve_dma()
                continue
            if kind <= 4:
                lines = device_pb2.LineUpdate()
                _lines_pb(self._s, lines)
                return line_change(SERVICE, lines, same_clock=self._s.ConsumeBool())
            if kind <= 6:
                pb = device_pb2.ShadowUpdate()
                _shadow_pb(self._s, pb)
                return shadow_change(SERVICE, pb)
            if kind == 7:
                self._gone = True
                return GoingAway(SERVICE, "fuzz: going away", 0.5)
            if kind == 8:
                raise TransportError(f"{SERVICE}: fuzz: the watch broke")
        self._cancelled.wait(timeout)
        if self._cancelled.is_set():
            return None
        raise TransportError(f"{SERVICE}: nothing within {timeout} s")

    def cancel(self) -> None:
        self._cancelled.set()


class _DescribeStub:
    """The one call of a device service's stub that ``GrpcEndpoint.describe`` makes."""

    def __init__(self, response: device_pb2.DescribeResponse) -> None:
        self.response = response

    def Describe(self, request: device_pb2.DescribeRequest, timeout: float) -> device_pb2.DescribeResponse:
        return self.response


def described(s: Script) -> tuple[list[RemoteRegion], list[RemoteLine]]:
    """A fuzzed DescribeResponse, read by the gRPC transport's own ``GrpcEndpoint.describe`` (its checks
    included); TransportError when the transport refuses it."""
    resp = device_pb2.DescribeResponse(service_name=SERVICE, protocol_version=PROTOCOL_VERSION)
    for d in range(s.ConsumeIntInRange(1, 2)):
        dev = resp.devices.add(name=s.PickValueInList(["dev", "dev2", ""]) if d else "dev", type="fuzz",
                               has_console=s.ConsumeBool())
        for _ in range(s.ConsumeIntInRange(1, 2)):
            region = dev.regions.add(
                name=s.PickValueInList(["regs", "flash", ""]),
                base=s.PickValueInList([DEV, DEV + 0x800, DEV + 0x1000, 0, harness.RAM_BASE, 0xFFFF_F000,
                                        (1 << 64) - 0x1000, (1 << 64) - 1]),
                size=s.PickValueInList([DEV_SIZE, 0x100, 8, 1, 0, 0x10_0000, (1 << 64) - 1]),
                kind=s.PickValueInList([device_pb2.REGION_KIND_MMIO, device_pb2.REGION_KIND_ROMD, 0, 7]),
                posted=s.ConsumeBool(),
                access_sizes=s.PickValueInList([[], [4], [1, 2, 4], [1, 2, 4, 8], [3], [0], [16], [8, 8]]))
            for _ in range(s.ConsumeIntInRange(0, 2)):
                region.shadows.add(offset=s.PickValueInList([0, 4, 8, DEV_SIZE - 4, DEV_SIZE]),
                                   size=s.PickValueInList([4, 8, 1, 0]))
        for _ in range(s.ConsumeIntInRange(0, 2)):
            dev.lines.add(index=s.PickValueInList([0, 1, 0xFFFF_FFFF]), name="irq",
                          trigger=s.PickValueInList([0, 1, 2, 9]))
    endpoint = GrpcEndpoint.__new__(GrpcEndpoint)  # no channel: only Describe's reading of the answer
    endpoint.name = SERVICE
    endpoint._connect_timeout_s = 1.0
    endpoint._lines = None
    endpoint.same_clock = False
    endpoint.instance_id = ""
    endpoint.features = frozenset()
    endpoint.stub = _DescribeStub(resp)  # type: ignore[assignment]
    return endpoint.describe(), endpoint.interrupt_lines()


class FuzzEndpoint:
    """A DeviceEndpoint with one device ("dev") whose region layout the script picks."""

    def __init__(self, script: Script) -> None:
        self.name = SERVICE
        self.leaving: GoingAway | None = None
        self.same_clock = script.ConsumeBool()
        self.instance_id = ""
        self.features = frozenset(DEVICE_FEATURES)
        self._s = script
        layout = script.ConsumeIntInRange(0, 3)
        base = dict(service=SERVICE, device="dev", device_type="fuzz", base=DEV, size=DEV_SIZE, romd=False,
                    posted=False, access_sizes=(1, 2, 4, 8), has_console=False)
        if layout == 1:
            base.update(posted=True)
        elif layout == 2:
            base.update(shadows=frozenset({(0, 4), (8, 8)}))
        elif layout == 3:
            base.update(romd=True, name="flash")
        base.setdefault("name", "regs")
        self._regions = [RemoteRegion(**base)]  # type: ignore[arg-type]
        self._lines = [RemoteLine(SERVICE, "dev", 0, "irq", script.PickValueInList(["level", "edge"]), "fuzz")]
        self._refused: TransportError | None = None
        if script.ConsumeIntInRange(0, 3) == 3:  # a Describe answer from anything, through the transport
            try:
                self._regions, self._lines = described(script)
            except TransportError as exc:
                self._refused = exc
        self.has_shadows = any(r.shadows for r in self._regions)
        self.wire = script.ConsumeBool()  # exits through GrpcExitChannel and a fuzzed stream, or FuzzChannel
        self.stub = FuzzStub(script)

    def describe(self) -> list[RemoteRegion]:
        if self._refused is not None:
            raise self._refused
        return list(self._regions)

    def interrupt_lines(self) -> list[RemoteLine]:
        return list(self._lines)

    def watch(self, vm_id: str, dma: DmaTarget | None = None) -> FuzzWatch:
        return FuzzWatch(self._s, dma, self.has_shadows)

    def open_exit_channel(self, vm_id: str, vcpu_id: int, architecture: str) -> ExitChannel:
        if self.wire:  # the gRPC transport's own channel over a fuzzed stream (handshake included)
            return GrpcExitChannel(self, vm_id, vcpu_id, architecture, 0.5)  # type: ignore[arg-type]
        return FuzzChannel(self._s)

    def read_mirror(self, vm_id: str, device: str, region: str) -> tuple[list[tuple[int, bytes]], bool]:
        if self._s.ConsumeIntInRange(0, 15) == 15:
            raise TransportError(f"{SERVICE}: fuzz: no mirror")
        chunks = [(self._s.PickValueInList([0, 0, 0x800, DEV_SIZE - 4, DEV_SIZE]),
                   self._s.ConsumeBytes(self._s.PickValueInList([16, 4, 0, 8])))
                  for _ in range(self._s.ConsumeIntInRange(0, 2))]
        return chunks, self._s.ConsumeBool()

    def reset(self, vm_id: str) -> tuple[MirrorChange, ...]:
        pb = device_pb2.MirrorUpdate()
        _mirror_pb(self._s, pb)
        return mirror_changes(SERVICE, [pb])

    def close(self) -> None:
        pass


def _policies(s: Script) -> Policies:
    fault = [FaultPolicy.ABORT, FaultPolicy.STOP]
    return Policies(s.PickValueInList(list(UnmappedPolicy)), s.PickValueInList(fault), s.PickValueInList(fault),
                    s.PickValueInList(fault))


def TestOneInput(data: bytes) -> None:
    quiet_logs(_internal)  # the services' warnings go only to _internal, which keeps the internal errors
    watch_threads()
    check_threads()
    _internal.records.clear()
    s = Script(atheris.FuzzedDataProvider(data))
    isa = s.PickValueInList(list(harness.ISAS))
    picks = [s.PickValueInList(BODIES[isa]) for _ in range(s.ConsumeIntInRange(1, 8))]
    units = [u for pick in picks for u in pick] if isa == harness.T32 else picks  # T32: halfwords
    body = harness.code(isa, *units)
    endpoint = FuzzEndpoint(s)
    image = harness.build_image(isa, body, DEV)
    grants = [(SERVICE, DmaWindow("ram", harness.RAM_BASE, 0x1000))] if s.ConsumeBool() else []
    spec = VmSpec(harness.architecture(isa), vcpu_count=s.PickValueInList([1, 1, 2]),
                  ram=[(harness.RAM_BASE, harness.RAM_SIZE)], images=[ImageSpec("fuzz", image, harness.LOAD)],
                  entry_point=harness.entry_point(isa), policies=_policies(s), strict_kvm=s.ConsumeBool(),
                  trace_exits=s.ConsumeBool(), exit_deadline_ms=200, instruction_budget=100_000,
                  dma_grants=grants)
    try:
        vm = Vm(spec, [endpoint], ram_cap=harness.RAM_SIZE)
    except VmConfigError:
        check_threads()
        return
    except Exception as exc:
        raise Finding(f"Vm() raised {type(exc).__name__}: {exc}") from exc
    try:
        if isa == harness.A64:
            vm.set_registers(0, [("vbar_el1", harness.VBAR)])
        vm.start()
        final = vm.events.wait_final(TIME_LIMIT_S)
        check(final is not None, f"no final event within {TIME_LIMIT_S} s: {vm.events.snapshot()[-5:]}")
        assert final is not None
        check(final.kind.final and final.kind is not EventKind.STOPPED, f"final event {final}")
        check(final.error_kind is not ErrorKind.INTERNAL and "internal error" not in final.reason,
              f"internal error: {final}")
    finally:
        vm.delete()
    check(not s.errors, "; ".join(s.errors))
    check(not _internal.records, f"logged: {_internal.records}")
    check_threads()
