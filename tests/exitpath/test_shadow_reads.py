"""Shadow registers on the exit path: a load of one completes from the VM's copy exactly as a real
completion would (sign, width, endianness, writeback, PC), without an exit; anything else still exits;
and a vCPU never reads a value older than its own last completion from that service."""

from __future__ import annotations

import dataclasses
import struct
import threading

import pytest

from device_service.bus import DeviceBus
from device_service.local import LocalEndpoint
from device_service.model import RegionSpec
from device_service.models.pl011 import FR_RXFE, FR_TXFE, Pl011
from mmiosplit.mmio import DmaTarget, ServiceWatch, ShadowChange, WatchEvent
from tests.exitpath.harness import A32, A64, DEV, T32, Probe, code, run
from tests.exitpath.test_kvm_table import A64_SET_EE
from vcpu_service.vm import ImageSpec, Vm, VmSpec

WINDOWS = ((0x00, 4), (0x08, 8), (0x10, 2), (0x18, 1))


class ShadowProbe(Probe):
    """A Probe whose registers at WINDOWS (in "regs") or at ``posted_windows`` (in "posted") are shadows."""

    def __init__(self, *, shadows: bool = True, posted_windows: tuple[tuple[int, int], ...] = (),
                 **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.shadows = shadows
        self.posted_windows = posted_windows

    def regions(self) -> list[RegionSpec]:
        if not self.shadows:
            return super().regions()
        return [dataclasses.replace(r, shadows=WINDOWS if r.name == "regs" else self.posted_windows)
                for r in super().regions()]

    def peek(self, region: str, offset: int, size: int) -> bytes:
        start = offset + (self.posted_from or 0 if region == "posted" else 0)
        return bytes(self.memory[start:start + size])  # no log entry: a peek is not an access


def probe(shadows: bool) -> ShadowProbe:
    p = ShadowProbe(shadows=shadows)
    p.load(0x00, 0x8000_0001, 4)
    p.load(0x08, 0x8877_6655_4433_2211, 8)
    p.load(0x10, 0x8001, 2)
    p.load(0x18, 0x80, 1)
    return p


CASES = {
    "a64-ldrsw": (A64, (0xB9800001,)),  # ldrsw x1, [x0]
    "a64-ldr-x": (A64, (0xF9400401,)),  # ldr x1, [x0, #8]
    "a64-ldrsh-w": (A64, (0x79C02001,)),  # ldrsh w1, [x0, #0x10]
    "a64-ldrsh-x": (A64, (0x79802001,)),  # ldrsh x1, [x0, #0x10]
    "a64-ldrsb-x": (A64, (0x39806001,)),  # ldrsb x1, [x0, #0x18]
    "a64-post-index": (A64, (0xB8404401,)),  # ldr w1, [x0], #4 (hand-decoded writeback)
    "a64-big-endian": (A64, (*A64_SET_EE, 0x79C02001)),  # SCTLR_EL1.EE=1; ldrsh w1, [x0, #0x10]
    "a32-ldrsh": (A32, (0xE1D011F0,)),  # ldrsh r1, [r0, #16]
    "t16-ldr": (T32, (0x6801,)),  # ldr r1, [r0]
    "t32-ldrsh": (T32, (0xF9B0, 0x1010)),  # ldrsh.w r1, [r0, #16]
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_a_shadow_load_completes_exactly_as_an_exit_would(case: str) -> None:
    isa, units = CASES[case]
    base = "x0" if isa == A64 else "r0"
    results = {}
    for shadows in (False, True):
        device = probe(shadows)
        res = run(isa, code(isa, *units), regs={base: DEV, "x1" if isa == A64 else "r1": 0x5A5A},
                  devices=[device])
        assert res.finished_body, (case, shadows, res.final)
        results[shadows] = res
        if shadows:
            assert device.log == [], case  # the device never saw the read
            assert res.vcpu_stats.shadow_reads == 1 and res.vcpu_stats.exits == 0
            assert [r.outcome for r in res.trace] == ["shadow"]
        else:
            assert len(device.reads) == 1 and res.vcpu_stats.shadow_reads == 0
    plain, shadowed = results[False].regs, results[True].regs
    assert shadowed == plain, case  # every register: Rt, the written-back base, PC, flags


def test_other_sizes_and_offsets_of_a_shadow_register_exit() -> None:
    device = probe(True)
    body = code(A64, 0x39400001, 0xB9400401)  # ldrb w1, [x0] (window is 4 bytes); ldr w1, [x0, #4] (no window)
    res = run(A64, body, regs={"x0": DEV}, devices=[device])
    assert res.finished_body
    assert [(a.offset, a.size) for a in device.reads] == [(0, 1), (4, 4)]
    assert res.vcpu_stats.shadow_reads == 0 and res.vcpu_stats.exits == 2


def test_a_load_after_a_store_to_the_register_sees_the_store() -> None:
    """The store exits; its completion brings the new value before the guest runs on, so the load that
    follows (served from the copy) sees it."""
    device = probe(True)
    body = code(A64, 0xB9000001, 0xB9400002)  # str w1, [x0]; ldr w2, [x0]
    res = run(A64, body, regs={"x0": DEV, "x1": 0x1234_5678}, devices=[device])
    assert res.finished_body
    assert res.regs["x2"] == 0x1234_5678
    assert device.reads == [] and len(device.writes) == 1
    assert res.vcpu_stats.shadow_reads == 1


def test_a_posted_write_waiting_for_the_service_makes_the_read_exit() -> None:
    """The posted store changes the register; the load must see it, so it takes a real exit (which carries
    the queued write first) instead of the copy."""
    device = ShadowProbe(posted_from=0x1000, posted_windows=((0, 4),))
    device.load(0x1000, 0x1111, 4)
    body = code(A64, 0xB9000061, 0xB9400062)  # str w1, [x3] (posted); ldr w2, [x3]
    res = run(A64, body, regs={"x3": DEV + 0x1000, "x1": 0x2222}, devices=[device])
    assert res.finished_body
    assert res.regs["x2"] == 0x2222
    assert [(a.offset, a.is_write) for a in device.log] == [(0x1000, True), (0x1000, False)]
    assert res.vcpu_stats.shadow_reads == 0


class HeldWatch:
    """A watch stream that delivers the first snapshot, then holds every later update until released:
    the vCPU can then only learn of changes from its own completions."""

    def __init__(self, inner: ServiceWatch, release: threading.Event) -> None:
        self._inner = inner
        self._release = release
        self._first = True
        self._cancelled = False
        self.delivered: list[ShadowChange] = []

    def next(self, timeout: float | None = None) -> WatchEvent | None:
        while not self._first and not self._release.wait(0.02):
            if self._cancelled:
                return None
        self._first = False
        change = self._inner.next(timeout)
        if isinstance(change, ShadowChange):
            self.delivered.append(change)
        else:
            self._first = True  # line levels (not held here) do not count as the one event let through
        return change

    def cancel(self) -> None:
        self._cancelled = True
        self._inner.cancel()


class HeldEndpoint(LocalEndpoint):
    def __init__(self, bus: DeviceBus) -> None:
        super().__init__(bus)
        self.release = threading.Event()
        self.watches: list[HeldWatch] = []

    def watch(self, vm_id: str, dma: DmaTarget | None = None) -> ServiceWatch:
        watch = HeldWatch(super().watch(vm_id, dma), self.release)
        self.watches.append(watch)
        return watch


def test_a_vcpu_never_reads_a_shadow_older_than_its_own_last_completion() -> None:
    """A byte waits in the FIFO when the VM starts (the copy of FR says "not empty"). The guest reads DR
    (an exit: the FIFO is empty now) and then FR from the copy: it must say empty, although the watch
    stream is held back and never delivers that change; only the completion can have brought it. Then the
    stream is let go: its older update must not undo the newer value."""
    uart = Pl011("uart0", 0x0900_0000)
    uart.receive(b"a")
    endpoint = HeldEndpoint(DeviceBus([uart]))
    guest = struct.pack("<9I",
                        0xD2A12000,  # mov  x0, #0x09000000
                        0xB9400002,  # ldr  w2, [x0]            (DR: exit)
                        0xB9401803,  # ldr  w3, [x0, #0x18]     (FR: shadow)
                        0xD503201F,  # nop
                        0xB9401804,  # ldr  w4, [x0, #0x18]     (FR: shadow)
                        0xD2800100, 0xF2B08000, 0xD4000002,  # PSCI SYSTEM_OFF
                        0x14000000)
    vm = Vm(VmSpec("aarch64", ram=[(0x4000_0000, 1 << 20)], images=[ImageSpec("t", guest, 0x4000_0000)],
                   entry_point=0x4000_0000), [endpoint], ram_cap=1 << 30)
    try:
        fr = 0x0900_0018
        assert vm.shadows.lookup(fr, 4) == (FR_TXFE | 0x40).to_bytes(4, "little")  # RXFF: one byte, FIFO off
        snapshot_generation = vm.shadows.generation(fr)
        vm.start()
        final = vm.events.wait_final(10)
        assert final is not None and final.reason.startswith("PSCI SYSTEM_OFF"), final
        regs = dict(vm.get_registers(0, ["x2", "x3", "x4"])[0])
        assert regs["x2"] == ord("a")
        assert regs["x3"] == regs["x4"] == FR_TXFE | FR_RXFE
        stats = vm.vcpus[0].exits.stats
        assert stats.shadow_reads == 2 and stats.exits == 1
        (watch,) = endpoint.watches
        assert len(watch.delivered) == 1  # the snapshot only: the change came with the completion
        completed_generation = vm.shadows.generation(fr)
        assert completed_generation > snapshot_generation
        # The held update (the same change) and an older one arriving late leave the newer value alone.
        vm.shadows.apply(ShadowChange("local", snapshot_generation, (("uart0", "regs", 0x18, b"\xc0\0\0\0"),)))
        endpoint.release.set()
        assert vm.shadows.lookup(fr, 4) == (FR_TXFE | FR_RXFE).to_bytes(4, "little")
        assert vm.shadows.generation(fr) == completed_generation
    finally:
        vm.delete()


def test_console_input_reaches_a_guest_that_polls_the_copy() -> None:
    """Input arrives without a guest access: the watch stream carries it to the copy the guest polls."""
    uart = Pl011("uart0", 0x0900_0000)
    endpoint = LocalEndpoint(DeviceBus([uart]))
    guest = struct.pack("<10I", 0xD2A12000, 0xB9401801, 0x3727FFE1, 0xB9400002, 0xB9000002, 0xB9401803,
                        0xD2800100, 0xF2B08000, 0xD4000002, 0x14000000)  # poll FR; echo DR; read FR; off
    vm = Vm(VmSpec("aarch64", ram=[(0x4000_0000, 1 << 20)], images=[ImageSpec("t", guest, 0x4000_0000)],
                   entry_point=0x4000_0000), [endpoint], ram_cap=1 << 30)
    try:
        vm.start()
        deadline = threading.Event()
        while vm.vcpus[0].exits.stats.shadow_reads < 100 and not deadline.wait(0.01):
            pass
        endpoint.console_input("uart0", b"z")
        final = vm.events.wait_final(10)
        assert final is not None and final.reason.startswith("PSCI SYSTEM_OFF"), final
        assert bytes(uart.tx_log) == b"z"
        stats = vm.vcpus[0].exits.stats
        assert stats.shadow_reads > 100 and stats.exits == 2  # the DR read and the echo
        assert dict(vm.get_registers(0, ["x3"])[0])["x3"] == FR_TXFE | FR_RXFE
    finally:
        vm.delete()


RESET_GUEST = struct.pack(
    "<17I",
    0xD2A12000,  # mov  x0, #0x09000000
    0xD2A80025,  # mov  x5, #0x40010000        (a flag in RAM, which a reset keeps)
    0xB94000A6,  # ldr  w6, [x5]
    0x35000126,  # cbnz w6, after_reset
    0x52800026,  # mov  w6, #1
    0xB90000A6,  # str  w6, [x5]
    0xB9401801,  # 1: ldr w1, [x0, #0x18]      (FR, from the copy)
    0x3727FFE1,  # tbnz w1, #4, 1b             (until a byte waits)
    0xD2800120, 0xF2B08000, 0xD4000002,  # PSCI SYSTEM_RESET, leaving the byte in the FIFO
    0x14000000,
    0xB9401803,  # after_reset: ldr w3, [x0, #0x18]   (FR, from the copy: the reset emptied the FIFO)
    0xD2800100, 0xF2B08000, 0xD4000002,  # PSCI SYSTEM_OFF
    0x14000000,
)


def test_a_reset_refreshes_the_copy_before_the_guest_runs_again() -> None:
    """The watch stream is held back from the moment the byte is typed, so the reset's new FR value can
    only come from the snapshot the reset path takes before vCPU 0 starts again."""
    uart = Pl011("uart0", 0x0900_0000)
    endpoint = HeldEndpoint(DeviceBus([uart]))
    endpoint.release.set()
    vm = Vm(VmSpec("aarch64", ram=[(0x4000_0000, 1 << 20)], images=[ImageSpec("t", RESET_GUEST, 0x4000_0000)],
                   entry_point=0x4000_0000), [endpoint], ram_cap=1 << 30)
    try:
        vm.start()
        idle = threading.Event()
        while vm.vcpus[0].exits.stats.shadow_reads < 50 and not idle.wait(0.01):
            pass
        endpoint.release.clear()  # the watcher, already waiting for the next update, delivers the byte, then stops
        endpoint.console_input("uart0", b"r")
        final = vm.events.wait_final(10)
        assert final is not None and final.reason.startswith("PSCI SYSTEM_OFF"), final
        assert dict(vm.get_registers(0, ["x3"])[0])["x3"] == FR_TXFE | FR_RXFE
        assert not uart.rx_fifo
        watcher = endpoint.watches[0]
        assert len(watcher.delivered) == 2  # the snapshot and the byte; not the reset
        assert len(endpoint.watches) == 2  # the reset's snapshot
    finally:
        vm.delete()
