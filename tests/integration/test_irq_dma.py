"""Interrupt lines and DMA between real processes: a device service and a vcpu service over gRPC.

Console input (a change without an access) reaches the GIC's pending state through the Watch stream; a change
made by an access reaches it on that access's Completion, before the next instruction; a device DMAs into guest
memory inside a write whose vCPU waits for the completion (no deadlock), on its own thread afterwards, and is
refused outside its windows with an error naming the device, the address and the windows.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

import pytest

from mmiosplit.v1 import device_pb2, device_pb2_grpc, vcpu_pb2
from mmiosplit_cli.launcher import local_services
from mmiosplit_cli.runner import channel
from tests.integration.client import RAM_BASE, Services, a64

UART, GICD, PROBE = 0x0900_0000, 0x0800_0000, 0x0A20_0000
DEVICES = ["--device", "pl011@0x09000000,name=uart0", "--device", "pl031@0x09010000,name=rtc0",
           "--device", "dma-probe@0x0a200000,name=dma0"]
RTC = 0x0901_0000
SRC, DST, LATER = RAM_BASE + 0x30_0000, RAM_BASE + 0x30_0800, RAM_BASE + 0x30_0c00


def movz(rd: int, imm16: int, shift: int = 0) -> int:
    return 0xD2800000 | (shift // 16) << 21 | imm16 << 5 | rd


def movk(rd: int, imm16: int, shift: int) -> int:
    return 0xF2800000 | (shift // 16) << 21 | imm16 << 5 | rd


def mov32(rd: int, value: int) -> list[int]:
    return [movz(rd, value & 0xFFFF), movk(rd, value >> 16, 16)]


def str_w(rt: int, rn: int, offset: int) -> int:
    return 0xB9000000 | (offset // 4) << 10 | rn << 5 | rt


def ldr_w(rt: int, rn: int, offset: int) -> int:
    return 0xB9400000 | (offset // 4) << 10 | rn << 5 | rt


def tbz(rt: int, bit: int, words_back: int) -> int:
    return 0x36000000 | bit << 19 | ((-words_back) & 0x3FFF) << 5 | rt


def cbnz_w(rt: int, words_back: int) -> int:
    return 0x35000000 | ((-words_back) & 0x7FFFF) << 5 | rt


OFF = [*mov32(0, 0x8400_0008), 0xD4000002, 0x14000000]  # PSCI SYSTEM_OFF


@pytest.fixture(scope="module")
def services() -> Iterator[Services]:
    with local_services(DEVICES) as (vaddr, daddr, handle):
        assert vaddr and daddr
        yield Services(vaddr, daddr, handle)


def virt(services: Services, words: list[int]) -> vcpu_pb2.VmConfig:
    """A virt VM (so a GIC), with a placeholder at the start of RAM so no device tree is written over the code."""
    cfg = services.config(a64(*words), machine="virt", wall_clock=20)
    cfg.images.add(name="no-dtb", data=b"\0" * 4, load_address=RAM_BASE)
    return cfg


def test_console_input_reaches_the_gics_pending_state_through_the_watch(services: Services) -> None:
    guest = [*mov32(1, UART), *mov32(2, 0x50), str_w(2, 1, 0x38),  # IMSC = RX | RT
             *mov32(3, GICD), ldr_w(4, 3, 0x204), tbz(4, 1, 1),  # spin until ISPENDR1 shows SPI 1 (UART)
             *OFF]
    vm_id = services.create(virt(services, guest))
    outcome: list[vcpu_pb2.VmEvent] = []
    runner = threading.Thread(target=lambda: outcome.append(services.start_and_wait(vm_id, 30)))
    runner.start()
    time.sleep(0.5)  # the guest spins in the GIC (no exit); only the Watch stream can end it now
    with channel(services.devices) as ch:
        console = device_pb2_grpc.DeviceServiceStub(ch).Console(
            iter([device_pb2.ConsoleRequest(device="uart0", input=b"k")]))
        runner.join(30)
        console.cancel()
    try:
        assert outcome and "SYSTEM_OFF" in outcome[0].reason, outcome
        assert services.registers(vm_id, 0, "x4")["x4"] & 1 << 1
    finally:
        services.delete(vm_id)


def test_the_rtc_alarm_fires_on_its_own_and_reaches_the_gic(services: Services) -> None:
    guest = [*mov32(1, RTC), *mov32(2, 1), str_w(2, 1, 0x10),  # IMSC = alarm
             ldr_w(3, 1, 0x00), 0x11000463, str_w(3, 1, 0x04),  # MR = DR + 1: the match in at most a second
             *mov32(5, GICD), ldr_w(4, 5, 0x204), tbz(4, 2, 1),  # spin in the GIC until SPI 2 (the RTC) is pending
             ldr_w(6, 1, 0x18), *OFF]  # MIS
    started = time.monotonic()
    vm_id, final = services.run(virt(services, guest))
    try:
        assert "SYSTEM_OFF" in final.reason, final
        assert time.monotonic() - started < 10
        regs = services.registers(vm_id, 0, "x4", "x6")
        assert regs["x4"] & 1 << 2 and regs["x6"] == 1
    finally:
        services.delete(vm_id)


def test_a_line_changed_by_an_access_travels_on_its_completion(services: Services) -> None:
    guest = [*mov32(1, UART), *mov32(2, 0x20), str_w(2, 1, 0x38),  # IMSC = TX
             str_w(2, 1, 0x00),  # DR: TX raised inside the access
             *mov32(3, GICD), ldr_w(4, 3, 0x204),  # ISPENDR1 at once: no time for a side stream to catch up
             *mov32(2, 0x20), str_w(2, 1, 0x44), ldr_w(5, 3, 0x204),  # ICR: lowered inside that access
             *OFF]
    vm_id, final = services.run(virt(services, guest))
    try:
        assert "SYSTEM_OFF" in final.reason, final
        regs = services.registers(vm_id, 0, "x4", "x5")
        assert regs["x4"] & 1 << 1 and not regs["x5"] & 1 << 1
    finally:
        services.delete(vm_id)


def test_dma_inside_a_write_on_its_own_thread_and_outside_the_windows(services: Services) -> None:
    guest = [*mov32(1, PROBE), *mov32(3, 16), str_w(3, 1, 0x08),  # LEN 16
             *mov32(2, SRC), str_w(2, 1, 0x00), *mov32(4, 1), str_w(4, 1, 0x0C),  # CMD 1: DMA read in the write
             ldr_w(10, 1, 0x10),
             *mov32(2, DST), str_w(2, 1, 0x00), *mov32(4, 2), str_w(4, 1, 0x0C),  # CMD 2: DMA write in the write
             ldr_w(11, 1, 0x10), str_w(4, 1, 0x14),
             *mov32(2, LATER), str_w(2, 1, 0x00), *mov32(4, 3), str_w(4, 1, 0x0C),  # CMD 3: later, own thread
             ldr_w(12, 1, 0x10), cbnz_w(12, 1),  # wait until STATUS says done
             ldr_w(13, 1, 0x14), str_w(4, 1, 0x14),  # DONE was raised (without an access)
             *mov32(2, 0x4800_0000), str_w(2, 1, 0x00), *mov32(4, 2), str_w(4, 1, 0x0C),  # outside the window
             ldr_w(14, 1, 0x10),
             *OFF]
    cfg = services.config(a64(*guest), wall_clock=20)
    cfg.images.add(name="data", data=b"0123456789abcdef", load_address=SRC)
    cfg.dma_grants.add(device_service=services.devices, name="buf", base=SRC, size=0x1000)
    vm_id, final = services.run(cfg)
    try:
        assert "SYSTEM_OFF" in final.reason, final
        regs = services.registers(vm_id, 0, "x10", "x11", "x12", "x13", "x14")
        assert (regs["x10"], regs["x11"], regs["x12"], regs["x13"], regs["x14"]) == (0, 0, 0, 1, 2)
        for address in (DST, LATER):
            memory = services.stub.ReadMemory(vcpu_pb2.ReadMemoryRequest(vm_id=vm_id, address=address, length=16))
            assert memory.data == b"0123456789abcdef"
        stats = services.stats(vm_id)
        assert stats.vcpus[0].external_aborts == 0  # no access failed: nothing waited out its deadline
    finally:
        services.delete(vm_id)
    log = next(p for p in services.handle.processes if p.name == "device service").log_path.read_text()
    assert (f"dma0: DMA write of 16 bytes at 0x48000000 refused: outside every DMA window granted to device "
            f"service {services.devices} (windows: buf 0x{SRC:x}-0x{SRC + 0xFFF:x})") in log, log


def _exit(address: int, value: int | None = None) -> device_pb2.MmioExit:
    if value is None:
        return device_pb2.MmioExit(address=address, length=4, direction=device_pb2.ACCESS_DIRECTION_READ)
    return device_pb2.MmioExit(address=address, length=4, direction=device_pb2.ACCESS_DIRECTION_WRITE,
                               data=value.to_bytes(4, "little"))


def test_the_device_service_keeps_serving_while_a_dma_waits_for_its_answer(services: Services) -> None:
    """Protocol level, the vcpu side played by hand: a DMA inside one vCPU's write is asked on the Watch stream;
    while its answer is held back, another vCPU's UART access arrives (it waits for the host, off the event loop);
    the answer still gets through, and both accesses complete."""
    from tests.integration.test_device_protocol import RawStream

    requests: queue.SimpleQueue[device_pb2.WatchRequest | None] = queue.SimpleQueue()
    requests.put(device_pb2.WatchRequest(vm_id="by-hand", dma_windows=[
        device_pb2.DmaWindow(name="buf", base=SRC, size=0x1000)]))
    with channel(services.devices) as ch:
        watch = device_pb2_grpc.DeviceServiceStub(ch).Watch(iter(requests.get, None))
        one, two = RawStream(services.devices), RawStream(services.devices)
        one.hello()
        two.hello()
        one.send(device_pb2.ExitStreamRequest(seq=1, exit=_exit(PROBE + 0x00, SRC)))
        one.send(device_pb2.ExitStreamRequest(seq=2, exit=_exit(PROBE + 0x08, 4)))
        done: queue.SimpleQueue[tuple[str, device_pb2.ExitStreamResponse]] = queue.SimpleQueue()
        threading.Thread(target=lambda: done.put(("one", one.send(device_pb2.ExitStreamRequest(
            seq=3, exit=_exit(PROBE + 0x0C, 1)))))).start()  # CMD 1: DMA read inside the write
        asked = next(r for r in watch if r.WhichOneof("event") == "dma").dma
        assert (asked.device, asked.address, asked.length) == ("dma0", SRC, 4)
        assert asked.direction == device_pb2.DMA_DIRECTION_READ
        threading.Thread(target=lambda: done.put(("two", two.send(device_pb2.ExitStreamRequest(
            seq=1, exit=_exit(UART + 0x18)))))).start()  # FR, while the host is busy with the DMA
        time.sleep(0.3)
        assert done.empty()  # both wait: one for its DMA, two for the host
        requests.put(device_pb2.WatchRequest(dma_result=device_pb2.DmaResult(id=asked.id, data=b"wxyz")))
        finished = dict(done.get(timeout=5) for _ in range(2))
        assert finished["one"].completion.status == device_pb2.COMPLETION_STATUS_OK
        assert finished["two"].completion.status == device_pb2.COMPLETION_STATUS_OK
        buf = one.send(device_pb2.ExitStreamRequest(seq=4, exit=_exit(PROBE + 0x100)))
        assert buf.completion.data == b"wxyz"
        one.close()
        two.close()
        requests.put(None)
        watch.cancel()
