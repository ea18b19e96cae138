"""Bad input from a client, a config, a guest or a device service: a clear error, nothing crashes or hangs."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from mmiosplit.v1 import device_pb2, vcpu_pb2
from mmiosplit.wire import PROTOCOL_VERSION
from mmiosplit_cli.launcher import check_health
from tests.integration.client import LOAD, Services, a64, a64_with_vectors
from tests.integration.rogue_device import BASE, RogueServer

pytestmark = pytest.mark.integration

SYSTEM_OFF = [0xD2800100, 0xF2B08000, 0xD4000002]  # mov x0,#8; movk x0,#0x8400,lsl#16; hvc #0
LOAD_W1 = [0xD2A14000, 0xB9400001, *SYSTEM_OFF]  # mov x0,#0x0a000000; ldr w1,[x0]; system off


def _create_error(services: Services, cfg: vcpu_pb2.VmConfig) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        services.create(cfg)
    return info.value


def _assert_alive(services: Services) -> None:
    assert check_health(services.vcpu) == "SERVING"
    assert check_health(services.devices) == "SERVING"
    vm_id, final = services.run(services.config(a64(*LOAD_W1)))
    services.delete(vm_id)
    assert final.kind == vcpu_pb2.VM_EVENT_KIND_POWERED_OFF, final


def test_image_that_does_not_fit(unix_services: Services) -> None:
    cfg = unix_services.config(b"\0" * 4096)
    cfg.images[0].load_address = 0x4000_0000 + 16 * 2**20 - 100
    err = _create_error(unix_services, cfg)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image 'test'" in err.details() and "does not fit in RAM" in err.details()
    _assert_alive(unix_services)


def test_ram_over_cap(unix_services: Services) -> None:
    cfg = unix_services.config(a64(*LOAD_W1))
    cfg.ram[0].size = 64 * 2**30
    err = _create_error(unix_services, cfg)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "over this service's cap" in err.details()


def test_overlapping_ram_regions(unix_services: Services) -> None:
    cfg = unix_services.config(a64(*LOAD_W1))
    cfg.ram.add(base=0x4080_0000, size=0x10_0000)
    err = _create_error(unix_services, cfg)
    assert "overlap" in err.details() and "0x40800000" in err.details()


def test_device_region_overlapping_ram(unix_services: Services) -> None:
    cfg = unix_services.config(a64(*LOAD_W1))
    cfg.ram.add(base=0x0A00_0000, size=0x1000)
    err = _create_error(unix_services, cfg)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "scratch0" in err.details() and "overlaps RAM" in err.details()


def test_overlapping_regions_across_device_services(unix_services: Services) -> None:
    cfg = unix_services.config(a64(*LOAD_W1))
    cfg.device_services.append(unix_services.devices)  # the same devices twice
    err = _create_error(unix_services, cfg)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "device regions overlap" in err.details() and "uart0" in err.details()


def test_malformed_device_service_address(unix_services: Services) -> None:
    cfg = unix_services.config(a64(*LOAD_W1))
    cfg.device_services[:] = ["not an address"]
    err = _create_error(unix_services, cfg)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed address 'not an address'" in err.details()


def test_unreachable_device_service(unix_services: Services, tmp_path: Path) -> None:
    cfg = unix_services.config(a64(*LOAD_W1))
    cfg.device_services[:] = [f"unix:{tmp_path / 'nobody.sock'}"]
    err = _create_error(unix_services, cfg)
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "nobody.sock is not reachable" in err.details()
    _assert_alive(unix_services)


def test_unknown_cpu_model(unix_services: Services) -> None:
    cfg = unix_services.config(a64(*LOAD_W1), cpu_model="pentium")
    err = _create_error(unix_services, cfg)
    assert "unknown CPU model 'pentium'" in err.details()


def test_unknown_vm_id(unix_services: Services) -> None:
    with pytest.raises(grpc.RpcError) as info:
        unix_services.stub.StartVm(vcpu_pb2.StartVmRequest(vm_id="nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def _serve_devices(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mmiosplit_cli", "serve-devices", "--listen", "127.0.0.1:1", *args],
                          capture_output=True, text=True, timeout=60)


def test_unknown_device_type_is_refused_at_startup() -> None:
    proc = _serve_devices("--device", "pl999@0x09000000")
    assert proc.returncode == 2
    assert "pl999" in proc.stderr and "pl011" in proc.stderr


def test_overlapping_devices_are_refused_at_startup() -> None:
    proc = _serve_devices("--device", "pl011@0x09000000,name=uart_a", "--device", "scratch@0x09000800,name=ram_b")
    assert proc.returncode == 2
    assert "uart_a" in proc.stderr and "ram_b" in proc.stderr and "overlaps" in proc.stderr, proc.stderr


def test_malformed_address_on_the_command_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "mmiosplit_cli", "serve-vcpu", "--listen", "localhost"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "malformed address 'localhost'" in proc.stderr


@pytest.mark.parametrize(
    ("mode", "kind", "needle"),
    [
        ("short", vcpu_pb2.VM_ERROR_KIND_DEVICE_SERVICE, "with 1 bytes"),
        ("badseq", vcpu_pb2.VM_ERROR_KIND_DEVICE_SERVICE, "answered sequence number 8 to request 1"),
        ("error", vcpu_pb2.VM_ERROR_KIND_DEVICE_ERROR, "register 0x0 is on fire"),
        ("badstatus", vcpu_pb2.VM_ERROR_KIND_DEVICE_SERVICE, "status 99"),
        ("die", vcpu_pb2.VM_ERROR_KIND_DEVICE_SERVICE, "rogue device crashed"),
        ("empty", vcpu_pb2.VM_ERROR_KIND_DEVICE_SERVICE, "where a completion was due"),
        ("unsolicited", vcpu_pb2.VM_ERROR_KIND_DEVICE_SERVICE, "answered sequence number 2 to request 1"),
        ("hang", vcpu_pb2.VM_ERROR_KIND_DEADLINE, "no completion"),
    ],
)
def test_misbehaving_device_service(unix_services: Services, tmp_path: Path, mode: str, kind: int,
                                    needle: str) -> None:
    rogue = RogueServer(mode, tmp_path)
    try:
        cfg = unix_services.config(a64(*LOAD_W1), exit_deadline_ms=300, stop_on=("device_error", "deadline"))
        cfg.device_services[:] = [rogue.address]
        vm_id, final = unix_services.run(cfg, timeout=30)
        regs = unix_services.registers(vm_id, 0, "pc", "x1")
        unix_services.delete(vm_id)
    finally:
        rogue.stop()
    assert final.kind == vcpu_pb2.VM_EVENT_KIND_ERROR, final
    assert final.error_kind == kind, final
    assert needle in final.reason, final.reason
    assert f"0x{BASE:x}" in final.reason
    # Nothing retired: the load was not completed and PC is still on it.
    assert final.pc == LOAD + 4 and regs["pc"] == LOAD + 4 and regs["x1"] == 0
    _assert_alive(unix_services)


def test_an_interrupt_storm_with_garbage_lines_leaves_the_guest_and_the_service_running(
        unix_services: Services, tmp_path: Path) -> None:
    rogue = RogueServer("storm", tmp_path)
    # A loop of 2000 loads from the stormy device, then PSCI SYSTEM_OFF; its line is wired to SPI 20 of virt's GIC
    # (the guest never enables it, so the storm only churns the GIC's pending state).
    body = [0xD2A14000, 0xD280FA03, 0xB9400002, 0xF1000463, 0x54FFFFC1, 0xD2800100, 0xF2B08000, 0xD4000002]
    try:
        cfg = unix_services.config(a64(*body), exit_deadline_ms=5000, machine="virt")
        cfg.images[0].load_address = cfg.entry_point = 0x4020_0000  # clear of the board's 1 MiB device tree
        cfg.device_services[:] = [rogue.address]
        cfg.irq_routes.add(device="rogue0", spi=20)
        t0 = time.monotonic()
        vm_id, final = unix_services.run(cfg, timeout=120)
        took = time.monotonic() - t0
        unix_services.delete(vm_id)
    finally:
        rogue.stop()
    assert final.kind == vcpu_pb2.VM_EVENT_KIND_POWERED_OFF, final
    assert took < 60, took
    _assert_alive(unix_services)


def test_replies_that_come_twice_complete_each_access_once(unix_services: Services, tmp_path: Path) -> None:
    rogue = RogueServer("twice", tmp_path)
    # x0 = 0x0a000000; x1 = 0; ldr w2, [x0]; add x1, x1, x2; ldr w2, [x0]; add x1, x1, x2; PSCI SYSTEM_OFF
    body = [0xD2A14000, 0xD2800001, 0xB9400002, 0x8B020021, 0xB9400002, 0x8B020021, 0xD2800100, 0xF2B08000,
            0xD4000002]
    try:
        cfg = unix_services.config(a64(*body), exit_deadline_ms=2000)
        cfg.device_services[:] = [rogue.address]
        vm_id, final = unix_services.run(cfg, timeout=30)
        regs = unix_services.registers(vm_id, 0, "x1")
        unix_services.delete(vm_id)
    finally:
        rogue.stop()
    assert final.kind == vcpu_pb2.VM_EVENT_KIND_POWERED_OFF, final
    assert regs["x1"] == 2 * 0x5A  # two loads, each completed once by its own reply; the copies were dropped


def test_a_device_service_that_aborts_its_stream_ends_the_run_by_default(unix_services: Services,
                                                                         tmp_path: Path) -> None:
    # A stream that breaks is resumed; a service that does not know the session then (this one keeps none) is
    # lost: whether the access was performed is unknown, so the run ends instead of faking a bus error.
    rogue = RogueServer("die", tmp_path)
    try:
        cfg = unix_services.config(a64_with_vectors(0xD2A14000, 0xD2800EE1, 0xB9400001), exit_deadline_ms=300)
        cfg.device_services[:] = [rogue.address]
        vm_id, final = unix_services.run(cfg, timeout=30)
        unix_services.delete(vm_id)
    finally:
        rogue.stop()
    assert final.kind == vcpu_pb2.VM_EVENT_KIND_ERROR and final.error_kind == vcpu_pb2.VM_ERROR_KIND_DEVICE_SERVICE
    assert "rogue device crashed" in final.reason and "session" in final.reason and "0xa000000" in final.reason
    _assert_alive(unix_services)


@pytest.mark.parametrize("mode", ["error", "hang", "short"])
def test_misbehaving_device_service_gets_a_precise_external_abort_by_default(
        unix_services: Services, tmp_path: Path, mode: str) -> None:
    rogue = RogueServer(mode, tmp_path)
    body = [0xD2A14000, 0xD2800EE1, 0xB9400001]  # x0 = 0x0a000000; x1 = 0x77; ldr w1, [x0]
    try:
        cfg = unix_services.config(a64_with_vectors(*body), exit_deadline_ms=300)
        cfg.device_services[:] = [rogue.address]
        vm_id = unix_services.create(cfg)
        final = unix_services.start_and_wait(vm_id, timeout=30)
        regs = unix_services.registers(vm_id, 0, "x1", "x10", "x11", "x12", "x13")
        events = [r.event for r in unix_services.stub.StreamVmEvents(vcpu_pb2.StreamVmEventsRequest(vm_id=vm_id))]
        unix_services.delete(vm_id)
    finally:
        rogue.stop()
    assert final.kind == vcpu_pb2.VM_EVENT_KIND_POWERED_OFF, final
    esr = regs["x10"]
    assert esr >> 26 == 0x25 and esr & (1 << 25) and esr & 0x3F == 0x10, hex(esr)  # DABT_CUR, IL, SEA
    assert regs["x11"] == 0x0A00_0000  # FAR
    assert regs["x12"] == LOAD + 0x14  # ELR: the load itself, which did not retire
    assert regs["x13"] & 0x3FF == 0x3C5  # SPSR: the PSTATE before the abort, EL1h with DAIF masked
    assert regs["x1"] == 0x77  # Rt untouched
    aborts = [e for e in events if e.kind == vcpu_pb2.VM_EVENT_KIND_EXTERNAL_ABORT]
    assert len(aborts) == 1 and "0xa000000" in aborts[0].reason and aborts[0].pc == LOAD + 0x14


# ----- messages a client should never send -----------------------------------------------------------------

_LIMIT = 256 * 1024 * 1024  # mmiosplit.wire: both services' receive limit


def _raw_channel(address: str) -> grpc.Channel:
    """A channel that sends whatever it is given: larger than the services accept, and no credentials (the test
    services listen on a UNIX socket, where none are needed)."""
    return grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 2 * _LIMIT)])


@pytest.mark.parametrize("method", ["/mmiosplit.v1.VcpuService/CreateVm", "/mmiosplit.v1.VcpuService/StreamVmEvents",
                                    "/mmiosplit.v1.DeviceService/Describe", "/mmiosplit.v1.DeviceService/Reset",
                                    "/mmiosplit.v1.DeviceService/ReadMirror"])
def test_a_message_that_is_not_protobuf_is_refused(unix_services: Services, method: str) -> None:
    address = unix_services.vcpu if "Vcpu" in method else unix_services.devices
    streaming = method.endswith(("StreamVmEvents", "ReadMirror"))
    with _raw_channel(address) as ch, pytest.raises(grpc.RpcError) as info:
        if streaming:
            list(ch.unary_stream(method)(b"\xff\xff\xff\xff\x0f garbage", timeout=10))
        else:
            ch.unary_unary(method)(b"\xff\xff\xff\xff\x0f garbage", timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
    assert f"malformed request to {method}" in str(info.value.details()), info.value.details()
    _assert_alive(unix_services)


@pytest.mark.slow
def test_an_oversized_message_is_refused_and_the_services_stay_up(unix_services: Services) -> None:
    # An image just over the limit: the service refuses it before decoding, and both services go on serving.
    cfg = unix_services.config(b"\0" * 4096)
    cfg.images[0].data = b"\0" * (_LIMIT + 1)
    payload = vcpu_pb2.CreateVmRequest(config=cfg).SerializeToString()
    del cfg
    with _raw_channel(unix_services.vcpu) as ch, pytest.raises(grpc.RpcError) as info:
        ch.unary_unary("/mmiosplit.v1.VcpuService/CreateVm")(payload, timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value
    with _raw_channel(unix_services.devices) as ch, pytest.raises(grpc.RpcError) as info:
        ch.unary_unary("/mmiosplit.v1.DeviceService/Describe")(payload, timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value
    del payload
    _assert_alive(unix_services)


def test_a_malformed_message_inside_an_exit_stream_ends_it_with_invalid_argument(unix_services: Services) -> None:
    # The hello is well-formed; the next message is not: the requests before it were answered, the stream ends
    # with INVALID_ARGUMENT, and the service goes on.
    hello = device_pb2.ExitStreamRequest(seq=0, hello=device_pb2.StreamHello(protocol_version=PROTOCOL_VERSION,
                                                                            vm_id="bad", vcpu_id=0))
    with _raw_channel(unix_services.devices) as ch:
        call = ch.stream_stream("/mmiosplit.v1.DeviceService/ExitStream")(
            iter([hello.SerializeToString(), b"\xff\xff\xff\xff\x0f garbage"]), timeout=10)
        welcome = device_pb2.ExitStreamResponse.FromString(next(call))
        assert welcome.WhichOneof("body") == "welcome"
        with pytest.raises(grpc.RpcError) as info:
            next(call)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
    assert "malformed request to /mmiosplit.v1.DeviceService/ExitStream" in str(info.value.details())
    _assert_alive(unix_services)


# ----- a minimal device service: Describe and ExitStream, no optional feature --------------------------------

def test_a_minimal_device_service_runs_a_guest_and_is_never_watched(unix_services: Services,
                                                                   tmp_path: Path) -> None:
    rogue = RogueServer("minimal", tmp_path)
    try:
        cfg = unix_services.config(a64(*LOAD_W1), exit_deadline_ms=2000)
        cfg.device_services[:] = [rogue.address]
        vm_id, final = unix_services.run(cfg, timeout=30)
        unix_services.delete(vm_id)
    finally:
        rogue.stop()
    assert final.kind == vcpu_pb2.VM_EVENT_KIND_POWERED_OFF, final
    assert rogue.servicer.watches == 0  # it lists no "watch" feature


def test_a_service_without_cancel_is_sent_none(unix_services: Services, tmp_path: Path) -> None:
    # Its access never completes: the deadline policy acts without a Cancel (the service did not say it takes
    # one), and the event says whether the access was performed is unknown.
    rogue = RogueServer("minimal-hang", tmp_path)
    try:
        cfg = unix_services.config(a64(*LOAD_W1), exit_deadline_ms=300, stop_on=("deadline",))
        cfg.device_services[:] = [rogue.address]
        vm_id, final = unix_services.run(cfg, timeout=30)
        unix_services.delete(vm_id)
    finally:
        rogue.stop()
    assert final.error_kind == vcpu_pb2.VM_ERROR_KIND_DEADLINE, final
    assert "unknown" in final.reason and "takes no Cancel" in final.reason, final.reason
    assert rogue.servicer.cancels == 0


def test_interrupt_lines_of_a_service_without_watch_are_refused(unix_services: Services, tmp_path: Path) -> None:
    rogue = RogueServer("minimal-lines", tmp_path)
    try:
        cfg = unix_services.config(a64(*LOAD_W1), machine="virt")
        cfg.images[0].load_address = cfg.entry_point = 0x4020_0000
        cfg.device_services[:] = [rogue.address]
        cfg.irq_routes.add(device="rogue0", spi=20)
        err = _create_error(unix_services, cfg)
    finally:
        rogue.stop()
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert "does not implement Watch" in str(err.details()) and "interrupt lines" in str(err.details())
