"""Shadow registers over the real split: a guest polling the PL011's FR costs no exits, typed input still
reaches it, a reset refreshes the copy, and a device service that sends bad shadow values (or loses its
stream) gets a clear error naming the register, never a wrong answer."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from mmiosplit.v1 import device_pb2, device_pb2_grpc, vcpu_pb2
from mmiosplit.wire import PROTOCOL_VERSION
from mmiosplit_cli.launcher import check_health, local_services
from mmiosplit_cli.runner import ConsoleInput, channel, run_vm
from tests.exitpath.test_shadow_reads import RESET_GUEST
from tests.integration.client import Services, a64
from tests.integration.test_device_protocol import RawStream, _exit

pytestmark = pytest.mark.integration

UART = 0x0900_0000
FR = UART + 0x18
SYSTEM_OFF = [0xD2800100, 0xF2B08000, 0xD4000002, 0x14000000]
# x0 = UART; 1: poll FR until RXFE clears; w2 = DR; DR = w2 (echo); w3 = FR; PSCI SYSTEM_OFF
ECHO_ONCE = [0xD2A12000, 0xB9401801, 0x3727FFE1, 0xB9400002, 0xB9000002, 0xB9401803, *SYSTEM_OFF]
# The same, until it echoes a 'q' (cmp w2, #'q'; b.ne 1b)
ECHO_UNTIL_Q = [0xD2A12000, 0xB9401801, 0x3727FFE1, 0xB9400002, 0xB9000002, 0x7101C45F, 0x54FFFF61, *SYSTEM_OFF]


def _reset_devices(devices: str) -> None:
    """The session's device service is shared: start from an empty RX FIFO."""
    with channel(devices) as ch:
        device_pb2_grpc.DeviceServiceStub(ch).Reset(device_pb2.ResetRequest(), timeout=10)


def test_a_guest_polling_fr_costs_no_exits_and_still_gets_typed_input(services: Services) -> None:
    _reset_devices(services.devices)
    inp = ConsoleInput()

    def on_event(event: vcpu_pb2.VmEvent) -> None:
        if event.kind == vcpu_pb2.VM_EVENT_KIND_VCPU_STARTED:
            threading.Timer(0.5, inp.feed, args=(b"k",)).start()  # typed while the guest polls

    result = run_vm(services.vcpu, services.config(a64(*ECHO_ONCE)), console_in=inp, on_event=on_event)
    assert result.final.kind == vcpu_pb2.VM_EVENT_KIND_POWERED_OFF, result.final
    assert result.console == b"k"
    (vcpu,) = result.stats.vcpus
    assert vcpu.shadow_reads > 100, vcpu  # half a second of polling, none of it seen by the device service
    assert result.stats.exits == 2 and vcpu.reads == 1 and vcpu.writes == 1  # the DR read and the echo


def test_a_reset_refreshes_the_copy(unix_services: Services) -> None:
    """The guest resets with a byte in the FIFO; after the reset FR must read empty, from the copy."""
    _reset_devices(unix_services.devices)
    cfg = unix_services.config(RESET_GUEST)
    cfg.images[0].load_address = cfg.entry_point = 0x4000_0000
    vm_id = unix_services.create(cfg)
    typed: list[grpc.Future] = []

    def type_when_polling() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            stats = unix_services.stub.GetStats(vcpu_pb2.GetStatsRequest(vm_id=vm_id, counters_only=True))
            if stats.vcpus and stats.vcpus[0].shadow_reads > 10:
                break
            time.sleep(0.02)
        with channel(unix_services.devices) as ch:
            call = device_pb2_grpc.DeviceServiceStub(ch).Console(
                iter([device_pb2.ConsoleRequest(device="uart0", input=b"r")]))
            typed.append(call)
            time.sleep(0.5)
            call.cancel()

    typist = threading.Thread(target=type_when_polling, daemon=True)
    typist.start()
    try:
        final = unix_services.start_and_wait(vm_id, timeout=30)
        regs = unix_services.registers(vm_id, 0, "x3")
        stats = unix_services.stats(vm_id)
    finally:
        typist.join(30)
        unix_services.delete(vm_id)
    assert final.kind == vcpu_pb2.VM_EVENT_KIND_POWERED_OFF, final
    assert typed
    assert regs["x3"] == 0x90  # TXFE | RXFE: the reset emptied the FIFO, and the copy knew before the guest ran
    assert stats.exits == 0 and stats.vcpus[0].shadow_reads > 10


def test_the_device_service_describes_watches_and_completes_with_shadows() -> None:
    with local_services(["--device", "pl011@0x09000000,name=uart0"], start_vcpu=False) as (_, devices, _h):
        assert devices is not None
        with channel(devices) as ch:
            stub = device_pb2_grpc.DeviceServiceStub(ch)
            (region,) = stub.Describe(device_pb2.DescribeRequest()).devices[0].regions
            windows = {(w.offset, w.size) for w in region.shadows}
            assert (0x18, 4) in windows and {(0xFE0 + 4 * i, 4) for i in range(8)} <= windows
            assert not any(offset == 0 for offset, _ in windows)  # DR: its read pops the FIFO
            watch = stub.Watch(iter([device_pb2.WatchRequest(vm_id="test")]))
            snapshot = next(watch).shadow
            lines = next(watch).lines  # then the level of every interrupt line
            assert [(v.device, v.index, v.level) for v in lines.levels] == [("uart0", 0, False)]
            assert len(snapshot.values) == len(windows)
            values = {v.offset: bytes(v.data) for v in snapshot.values}
            assert values[0x18] == b"\x90\0\0\0" and values[0xFE0] == b"\x11\0\0\0"
            console = stub.Console(iter([device_pb2.ConsoleRequest(device="uart0", input=b"x")]))
            typed = next(watch).shadow  # the byte arrived without any guest access
            assert typed.generation > snapshot.generation
            assert {v.offset: bytes(v.data) for v in typed.values}[0x18] == b"\xc0\0\0\0"
            stream = RawStream(devices)
            stream.hello()
            # The first completion of a stream brings everything; the read popped the byte, so FR changed.
            first = stream.send(device_pb2.ExitStreamRequest(seq=1, exit=_exit(UART, 4)))
            assert first.completion.data == b"x\0\0\0"
            carried = {v.offset: bytes(v.data) for v in first.completion.shadow.values}
            assert carried[0x18] == b"\x90\0\0\0" and len(carried) == len(windows)
            assert first.completion.shadow.generation > typed.generation
            popped = next(watch).shadow
            assert popped.generation == first.completion.shadow.generation
            # Nothing changed since: the next completion carries nothing.
            second = stream.send(device_pb2.ExitStreamRequest(seq=2, exit=_exit(UART + 0xFE0, 4)))
            assert not second.completion.HasField("shadow")
            stream.close()
            console.cancel()
            watch.cancel()


def test_run_no_shadows_makes_every_poll_exit(tmp_path: Path) -> None:
    image = tmp_path / "echo.bin"
    image.write_bytes(a64(*ECHO_UNTIL_Q))
    exits = {}
    for flag in ([], ["--no-shadows"]):
        proc = subprocess.run([sys.executable, "-m", "mmiosplit_cli", "run", str(image), "--device", "pl011@0x09000000",
                               *flag], input="hi q", capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "hi q"
        match = re.search(r"; (\d+) exits", proc.stderr)
        assert match, proc.stderr
        exits[bool(flag)] = int(match.group(1))
    assert exits[False] == 8  # a DR read and an echo per byte
    assert exits[True] > 8
    proc = subprocess.run([sys.executable, "-m", "mmiosplit_cli", "run", str(image), "--no-shadows",
                           "--device-service", "unix:/nonexistent.sock"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--no-shadows" in proc.stderr


# ----- a device service that gets shadows wrong -------------------------------------------------------------------

BASE = 0x0A00_0000
OK = device_pb2.COMPLETION_STATUS_OK


class ShadowRogue(device_pb2_grpc.DeviceServiceServicer):
    """Declares one shadow register (+0x18, 4 bytes) and breaks the rules in one way, chosen by ``mode``."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def Describe(self, request: device_pb2.DescribeRequest,
                 context: grpc.ServicerContext) -> device_pb2.DescribeResponse:
        resp = device_pb2.DescribeResponse(service_name=f"shadow-rogue-{self.mode}", protocol_version=PROTOCOL_VERSION,
                                           features=["watch"])
        dev = resp.devices.add(name="rogue0", type="rogue")
        size = 8 if self.mode == "wide-window" else 4
        dev.regions.add(name="regs", base=BASE, size=0x1000, kind=device_pb2.REGION_KIND_MMIO, access_sizes=[1, 2, 4],
                        shadows=[device_pb2.ShadowWindow(offset=0x18, size=size)])
        return resp

    def _value(self, generation: int, offset: int = 0x18, data: bytes = b"\0\0\0\0") -> device_pb2.ShadowUpdate:
        return device_pb2.ShadowUpdate(generation=generation, values=[
            device_pb2.ShadowValue(device="rogue0", region="regs", offset=offset, data=data)])

    def Watch(self, request: device_pb2.WatchRequest,
              context: grpc.ServicerContext) -> Iterator[device_pb2.WatchResponse]:
        if self.mode == "short-snapshot":
            yield device_pb2.WatchResponse(shadow=self._value(1, data=b"\0\0"))
        elif self.mode == "unknown-snapshot":
            yield device_pb2.WatchResponse(shadow=self._value(1, offset=0x1C))
        else:
            # FR-like: bit 4 clear... the guest below polls bit 4 set, so it spins
            yield device_pb2.WatchResponse(shadow=self._value(1))
        if self.mode == "broken-watch":
            time.sleep(0.5)
            context.abort(grpc.StatusCode.INTERNAL, "rogue went away")
        time.sleep(30)

    def ExitStream(self, request_iterator: Iterator[device_pb2.ExitStreamRequest],
                   context: grpc.ServicerContext) -> Iterator[device_pb2.ExitStreamResponse]:
        for req in request_iterator:
            if req.WhichOneof("body") == "hello":
                yield device_pb2.ExitStreamResponse(
                    seq=req.seq, welcome=device_pb2.StreamWelcome(protocol_version=PROTOCOL_VERSION,
                                                                 features=["watch"]))
                continue
            data = b"\x10" + bytes(req.exit.length - 1) if self.mode == "broken-watch" else bytes(req.exit.length)
            completion = device_pb2.Completion(status=OK, data=data)
            if self.mode == "bad-completion":
                completion.shadow.CopyFrom(self._value(2, data=b"\x01"))
            yield device_pb2.ExitStreamResponse(seq=req.seq, completion=completion)

    def Reset(self, request: device_pb2.ResetRequest, context: grpc.ServicerContext) -> device_pb2.ResetResponse:
        return device_pb2.ResetResponse()


class ShadowRogueServer:
    def __init__(self, mode: str, workdir: Path) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        device_pb2_grpc.add_DeviceServiceServicer_to_server(ShadowRogue(mode), self.server)
        self.address = f"unix:{workdir / f'shadow-rogue-{mode}.sock'}"
        self.server.add_insecure_port(self.address)
        self.server.start()

    def stop(self) -> None:
        self.server.stop(0)


@pytest.mark.parametrize(("mode", "needle"), [
    ("wide-window", "rogue0/regs: shadow register at +0x18 (8 bytes): the region takes 1/2/4-byte"),
    ("short-snapshot", "sent 2 bytes for the 4-byte shadow register rogue0/regs+0x18"),
    ("unknown-snapshot", "sent a shadow value for rogue0/regs+0x1c, which is not a shadow register it described"),
])
def test_bad_shadow_declarations_and_snapshots_are_refused_by_name(unix_services: Services, tmp_path: Path,
                                                                    mode: str, needle: str) -> None:
    rogue = ShadowRogueServer(mode, tmp_path)
    try:
        cfg = unix_services.config(a64(*SYSTEM_OFF))
        cfg.device_services[:] = [rogue.address]
        with pytest.raises(grpc.RpcError) as info:
            unix_services.create(cfg)
    finally:
        rogue.stop()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (info.value.details() or "")
    assert check_health(unix_services.vcpu) == "SERVING"


# x0 = BASE; ldr w1, [x0, #0x20] (an exit, whose completion carries a bad shadow value)
LOAD_0X20 = [0xD2A14000, 0xB9402001, *SYSTEM_OFF]
# x0 = BASE; 1: ldr w1, [x0, #0x18] (the shadow); tbz w1, #4, 1b: spins on the copy, never exits
SPIN_ON_SHADOW = [0xD2A14000, 0xB9401801, 0x3627FFE1, *SYSTEM_OFF]


@pytest.mark.parametrize(("mode", "body", "needle"), [
    ("bad-completion", LOAD_0X20, "sent 1 bytes for the 4-byte shadow register rogue0/regs+0x18"),
])
def test_bad_shadow_updates_while_running_end_the_run_by_name(unix_services: Services, tmp_path: Path, mode: str,
                                                              body: list[int], needle: str) -> None:
    rogue = ShadowRogueServer(mode, tmp_path)
    try:
        cfg = unix_services.config(a64(*body), stop_on=("device_error",))
        cfg.device_services[:] = [rogue.address]
        vm_id, final = unix_services.run(cfg, timeout=30)
        unix_services.stats(vm_id)
        unix_services.delete(vm_id)
    finally:
        rogue.stop()
    assert final.kind == vcpu_pb2.VM_EVENT_KIND_ERROR, final
    assert final.error_kind == vcpu_pb2.VM_ERROR_KIND_DEVICE_SERVICE, final
    assert needle in final.reason, final.reason
    assert check_health(unix_services.vcpu) == "SERVING"


def test_a_broken_watch_drops_the_shadows_and_their_reads_exit(unix_services: Services, tmp_path: Path) -> None:
    """A side stream breaking does not end the run: the guest spinning on a shadow register goes on with reads that
    exit (here the device answers them with bit 4 set, so it powers off); a dead service would fail that exit with
    an error naming the access."""
    rogue = ShadowRogueServer("broken-watch", tmp_path)
    try:
        cfg = unix_services.config(a64(*SPIN_ON_SHADOW), stop_on=("device_error",))
        cfg.device_services[:] = [rogue.address]
        vm_id, final = unix_services.run(cfg, timeout=30)
        stats = unix_services.stats(vm_id)
        unix_services.delete(vm_id)
    finally:
        rogue.stop()
    assert final.kind == vcpu_pb2.VM_EVENT_KIND_POWERED_OFF, final
    assert stats.vcpus[0].shadow_reads > 0 and stats.exits > 0
