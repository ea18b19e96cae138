"""PL031 RTC with a fake clock: counting, loading, match interrupt, IDs."""

from __future__ import annotations

import pytest

from device_service.model import AccessError
from device_service.models.pl031 import Pl031

DR, MR, LR, CR, IMSC, RIS, MIS, ICR = 0x00, 0x04, 0x08, 0x0C, 0x10, 0x14, 0x18, 0x1C


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def read(rtc: Pl031, offset: int, size: int = 4) -> int:
    result = rtc.read(offset, size)
    assert result.ok, result.message
    return result.value


def write(rtc: Pl031, offset: int, value: int) -> None:
    result = rtc.write(offset, 4, value)
    assert result.ok, result.message


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_700_000_000.25)


@pytest.fixture
def rtc(clock: FakeClock) -> Pl031:
    return Pl031("rtc0", 0x0901_0000, clock=clock)


def test_dr_counts_host_seconds_from_reset(rtc: Pl031, clock: FakeClock) -> None:
    assert read(rtc, DR) == 1_700_000_000
    clock.now += 0.74
    assert read(rtc, DR) == 1_700_000_000
    clock.now += 0.01
    assert read(rtc, DR) == 1_700_000_001
    clock.now += 3600
    assert read(rtc, DR) == 1_700_003_601


def test_default_clock_is_wall_time() -> None:
    import time

    before = int(time.time())
    value = Pl031("rtc0", 0).read(DR, 4).value
    assert before <= value <= int(time.time()) + 1


def test_lr_write_sets_the_counter_which_keeps_running(rtc: Pl031, clock: FakeClock) -> None:
    write(rtc, LR, 1000)
    assert read(rtc, DR) == 1000
    assert read(rtc, LR) == 1000
    clock.now += 0.999
    assert read(rtc, DR) == 1000
    clock.now += 0.001
    assert read(rtc, DR) == 1001
    clock.now += 59
    assert read(rtc, DR) == 1060


def test_counter_wraps_at_32_bits(rtc: Pl031, clock: FakeClock) -> None:
    write(rtc, LR, 0xFFFF_FFFF)
    clock.now += 1
    assert read(rtc, DR) == 0


def test_reset_goes_back_to_host_time(rtc: Pl031, clock: FakeClock) -> None:
    write(rtc, LR, 5)
    write(rtc, IMSC, 1)
    rtc.reset()
    assert read(rtc, DR) == int(clock.now)
    assert (read(rtc, MR), read(rtc, LR), read(rtc, IMSC), read(rtc, RIS)) == (0, 0, 0, 0)


def test_cr_reads_started_and_cannot_be_stopped(rtc: Pl031, clock: FakeClock) -> None:
    assert read(rtc, CR) == 1
    write(rtc, CR, 0)
    assert read(rtc, CR) == 1
    clock.now += 2
    assert read(rtc, DR) == 1_700_000_002


def test_match_interrupt_when_counter_reaches_mr(rtc: Pl031, clock: FakeClock) -> None:
    write(rtc, LR, 100)
    write(rtc, MR, 103)
    write(rtc, IMSC, 1)
    clock.now += 2.9
    assert read(rtc, RIS) == 0
    assert not rtc.irq_lines[0].level
    clock.now += 0.1
    assert read(rtc, RIS) == 1
    assert read(rtc, MIS) == 1
    assert rtc.irq_lines[0].level
    write(rtc, ICR, 1)
    assert read(rtc, RIS) == 0
    clock.now += 10
    assert read(rtc, RIS) == 0  # one-shot until MR or LR is written again


def test_match_now_fires_immediately_and_mask_gates_mis(rtc: Pl031) -> None:
    write(rtc, MR, read(rtc, DR))
    assert read(rtc, RIS) == 1
    assert read(rtc, MIS) == 0
    assert read(rtc, ICR) == 0


def test_dr_is_read_only(rtc: Pl031) -> None:
    write(rtc, DR, 5)
    assert read(rtc, DR) == 1_700_000_000


def test_ids_match_qemu(rtc: Pl031) -> None:
    ids = [read(rtc, 0xFE0 + 4 * i) for i in range(8)]
    assert ids == [0x31, 0x10, 0x14, 0x00, 0x0D, 0xF0, 0x05, 0xB1]


def test_unknown_register(rtc: Pl031) -> None:
    assert rtc.read(0x20, 4).error is AccessError.INVALID_REGISTER


# --- the alarm timer and RTCINTR ---------------------------------------------------------------


class FakeScheduler:
    """Collects (delay, callback) pairs; the test fires them."""

    def __init__(self) -> None:
        self.timers: list[FakeTimer] = []

    def __call__(self, delay: float, callback: object) -> FakeTimer:
        timer = FakeTimer(delay, callback)
        self.timers.append(timer)
        return timer

    @property
    def live(self) -> list[FakeTimer]:
        return [t for t in self.timers if not (t.cancelled or t.fired)]


class FakeTimer:
    def __init__(self, delay: float, callback: object) -> None:
        self.delay = delay
        self.callback = callback
        self.cancelled = False
        self.fired = False

    def cancel(self) -> None:
        self.cancelled = True

    def fire(self) -> None:
        assert callable(self.callback)
        self.fired = True
        self.callback()


def test_alarm_timer_fires_the_line_at_the_match(clock: FakeClock) -> None:
    scheduler = FakeScheduler()
    rtc = Pl031("rtc0", 0, clock=clock, schedule=scheduler)
    changes: list[bool] = []
    rtc.irq_lines[0].connect(lambda _line, level: changes.append(level))
    write(rtc, LR, 100)
    write(rtc, IMSC, 1)
    write(rtc, MR, 105)
    (timer,) = scheduler.live
    assert timer.delay == pytest.approx(5.0)
    clock.now += 5
    timer.fire()  # on the timer's thread, no access
    assert changes == [True]
    assert read(rtc, RIS) == 1
    write(rtc, ICR, 1)
    assert changes == [True, False]


def test_early_timer_rearms_for_the_rest(clock: FakeClock) -> None:
    scheduler = FakeScheduler()
    rtc = Pl031("rtc0", 0, clock=clock, schedule=scheduler)
    write(rtc, IMSC, 1)
    write(rtc, MR, read(rtc, DR) + 10)
    first = scheduler.live[0]
    clock.now += 4
    first.fire()
    assert not rtc.irq_lines[0].level
    (second,) = scheduler.live
    assert second is not first and second.delay == pytest.approx(5.75)  # to the next whole second at +10


def test_rewriting_mr_or_reset_cancels_the_timer(clock: FakeClock) -> None:
    scheduler = FakeScheduler()
    rtc = Pl031("rtc0", 0, clock=clock, schedule=scheduler)
    write(rtc, MR, read(rtc, DR) + 10)
    old = scheduler.live[0]
    write(rtc, MR, read(rtc, DR) + 20)
    assert old.cancelled and len(scheduler.live) == 1
    old.fire()  # a stale timer that fires anyway changes nothing
    assert read(rtc, RIS) == 0
    rtc.reset()
    assert scheduler.live == []


def test_real_timer_raises_the_line() -> None:
    import threading
    import time

    rtc = Pl031("rtc0", 0)
    raised = threading.Event()
    rtc.irq_lines[0].connect(lambda _line, level: level and raised.set())
    with rtc.lock:
        write(rtc, IMSC, 1)
        now = time.time()
        write(rtc, MR, (int(now) + 1) & 0xFFFF_FFFF)
    assert raised.wait(3.0)
    assert read(rtc, MIS) == 1
