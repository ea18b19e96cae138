"""The vCPU's timer behind its lock, and the ticker that fires deadlines and brings back vCPUs with an IRQ."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from tests.unit.test_gic import cread, cwrite, enable_all, enable_irq
from vcpu_service import gic as g
from vcpu_service.gentimer import CTL_ENABLE, CTL_IMASK, PHYS_TIMER_INTID, VIRT_TIMER_INTID
from vcpu_service.gic import Gic
from vcpu_service.interrupts import Ticker, TimerLines, VcpuTimer


class _Lines:
    def __init__(self) -> None:
        self.changes: list[tuple[int, int, bool]] = []
        self.event = threading.Event()

    def set_ppi(self, cpu: int, irq: int, level: bool) -> None:
        self.changes.append((cpu, irq, level))
        self.event.set()


class _Clock:
    def __init__(self) -> None:
        self.ns = 0

    def __call__(self) -> int:
        return self.ns


def test_a_write_drives_the_ppi_at_once_and_moves_the_deadline() -> None:
    lines, clock, moved = _Lines(), _Clock(), []
    timer = VcpuTimer(1, lines, clock, lambda: moved.append(1))
    timer.write("CNTV_CVAL_EL0", 100)
    timer.write("CNTV_CTL_EL0", CTL_ENABLE)
    assert lines.changes == []
    assert timer.deadline_ns() == 100 * 16
    clock.ns = 100 * 16
    timer.poll()
    assert lines.changes == [(1, VIRT_TIMER_INTID, True)]
    assert timer.deadline_ns() is None  # fired: nothing more to wait for
    timer.write("CNTV_CTL_EL0", CTL_ENABLE | CTL_IMASK)
    assert lines.changes[-1] == (1, VIRT_TIMER_INTID, False)
    assert len(moved) == 3


def test_reset_disables_the_timers_but_the_counter_keeps_counting() -> None:
    lines, clock = _Lines(), _Clock()
    timer = VcpuTimer(0, lines, clock, lambda: None)
    clock.ns = 1600
    timer.write("CNTP_TVAL_EL0", 0)
    timer.write("CNTP_CTL_EL0", CTL_ENABLE)
    assert lines.changes == [(0, PHYS_TIMER_INTID, True)]
    clock.ns = 3200
    timer.reset()
    assert lines.changes[-1] == (0, PHYS_TIMER_INTID, False)
    assert timer.read("CNTPCT_EL0") == 200
    assert timer.read("CNTP_CTL_EL0") == 0


class _Vcpu:
    def __init__(self, timer: VcpuTimer | None) -> None:
        self.timer = timer
        self.poll = False
        self.kicks = 0

    def needs_irq_poll(self) -> bool:
        return self.poll

    def kick(self) -> None:
        self.kicks += 1
        if self.kicks >= 3:
            self.poll = False


@contextlib.contextmanager
def _ticking(lines: TimerLines) -> Iterator[VcpuTimer]:
    """CPU 0's timer driving ``lines``, on the host clock, with a running ticker for it."""
    epoch = time.monotonic_ns()

    def clock() -> int:
        return time.monotonic_ns() - epoch

    ticker = Ticker("test", clock)
    timer = VcpuTimer(0, lines, clock, ticker.reschedule)
    ticker.start([_Vcpu(timer)])
    try:
        yield timer
    finally:
        ticker.stop()


def test_the_ticker_fires_a_deadline_on_the_host_clock() -> None:
    lines = _Lines()
    with _ticking(lines) as timer:
        timer.write("CNTV_TVAL_EL0", 20_000_000 // 16)  # 20 ms
        timer.write("CNTV_CTL_EL0", CTL_ENABLE)
        started = time.monotonic()
        assert lines.event.wait(5)
        waited = time.monotonic() - started
        assert lines.changes == [(0, VIRT_TIMER_INTID, True)]
        assert 0.015 <= waited < 2


def test_the_ticker_kicks_a_vcpu_with_a_signalled_irq_until_it_is_taken() -> None:
    ticker = Ticker("test", time.monotonic_ns)
    vcpu = _Vcpu(None)
    ticker.start([vcpu])
    try:
        vcpu.poll = True
        ticker.reschedule()
        deadline = time.monotonic() + 5
        while vcpu.poll and time.monotonic() < deadline:
            time.sleep(0.001)
        assert vcpu.kicks == 3 and not vcpu.poll
    finally:
        ticker.stop()


def test_a_guest_that_rearms_its_timer_from_each_tick_never_loses_one() -> None:
    """EDK2's timer loop, thousands of times over: arm the virtual timer a few microseconds ahead, sleep until its
    PPI reaches the CPU through the GIC, acknowledge it, rearm, EOI. A lost wakeup (a deadline the ticker stops
    waiting for, a GIC delivery overtaken by an older one) shows as a tick that never comes: before the fix of the
    ticker's deadline, within 50 ticks every run, stuck as EDK2 was (CTL 0x5, GIC output low, no deadline)."""
    signalled = threading.Condition()
    line = [False]

    def on_irq(cpu: int, level: bool) -> None:
        with signalled:
            line[0] = level
            signalled.notify_all()

    gic = Gic(1, on_irq_change=on_irq)
    enable_all(gic)
    enable_irq(gic, VIRT_TIMER_INTID)
    ticks = 0
    with _ticking(gic) as timer:
        timer.write("CNTV_TVAL_EL0", 2)
        timer.write("CNTV_CTL_EL0", CTL_ENABLE)
        stop = time.monotonic() + 1.5
        while time.monotonic() < stop:
            with signalled:
                assert signalled.wait_for(lambda: line[0], 2), (
                    f"tick {ticks + 1} never came: timer CTL {timer.read('CNTV_CTL_EL0'):#x}, GIC output "
                    f"{gic.pending_for(0)}, next deadline {timer.deadline_ns()}")
            irq = cread(gic, g.GICC_IAR)
            assert irq == VIRT_TIMER_INTID
            # 0 to 150 us ahead, spread over the ticker's own wake-up time: the deadline races its polls.
            timer.write("CNTV_TVAL_EL0", (ticks * 37 % 151) * 1000 // 16)
            cwrite(gic, g.GICC_EOIR, irq)
            ticks += 1
    assert ticks > 100
