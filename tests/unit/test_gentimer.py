"""The generic-timer model against QEMU's behaviour (target/arm/helper.c gt_*), with a clock the test drives."""

from __future__ import annotations

import pytest

from vcpu_service.gentimer import (
    BY_AA32,
    BY_AA64,
    CNTFRQ_HZ,
    CTL_ENABLE,
    CTL_IMASK,
    CTL_ISTATUS,
    GTIMER_SCALE_NS,
    PHYS_TIMER_INTID,
    REGISTERS,
    VIRT_TIMER_INTID,
    GenericTimer,
    InstructionClock,
    host_clock,
)


class FakeClock:
    """Nanoseconds the test sets; starts at an arbitrary non-zero host time to prove the epoch is subtracted."""

    def __init__(self, ns: int = 5_000_000_007) -> None:
        self.ns = ns

    def __call__(self) -> int:
        return self.ns

    def ticks(self, n: int) -> None:
        self.ns += n * GTIMER_SCALE_NS


@pytest.fixture
def clk() -> FakeClock:
    return FakeClock()


@pytest.fixture
def gt(clk: FakeClock) -> GenericTimer:
    return GenericTimer(clock=clk)


def test_cntfrq_is_qemus_62_5_mhz_and_reads_as_written(gt: GenericTimer, clk: FakeClock) -> None:
    assert CNTFRQ_HZ == 62_500_000
    assert gt.read("CNTFRQ_EL0") == 62_500_000
    gt.write("CNTFRQ_EL0", 1_000_000)
    assert gt.read("CNTFRQ_EL0") == 1_000_000
    before = gt.read("CNTPCT_EL0")
    clk.ticks(10)
    assert gt.read("CNTPCT_EL0") - before == 10  # the rate did not change
    gt.reset()
    assert gt.read("CNTFRQ_EL0") == 62_500_000


def test_counter_is_ns_over_16_from_reset(gt: GenericTimer, clk: FakeClock) -> None:
    assert gt.read("CNTPCT_EL0") == 0
    clk.ns += 15
    assert gt.read("CNTPCT_EL0") == 0  # floor division, as QEMU's gt_get_countervalue
    clk.ns += 1
    assert gt.read("CNTPCT_EL0") == 1
    clk.ns += 1_000_000_000 - 16  # one second after reset
    assert gt.read("CNTPCT_EL0") == 62_500_000


def test_counter_is_read_only(gt: GenericTimer) -> None:
    for name in ("CNTPCT_EL0", "CNTVCT_EL0"):
        with pytest.raises(ValueError):
            gt.write(name, 1)


def test_virtual_counter_subtracts_cntvoff_mod_2_64(gt: GenericTimer, clk: FakeClock) -> None:
    clk.ticks(100)
    assert gt.read("CNTVCT_EL0") == 100
    gt.write("CNTVOFF_EL2", 30)
    assert gt.read("CNTVOFF_EL2") == 30
    assert gt.read("CNTVCT_EL0") == 70
    assert gt.read("CNTPCT_EL0") == 100
    gt.write("CNTVOFF_EL2", 101)
    assert gt.read("CNTVCT_EL0") == (1 << 64) - 1


def test_ctl_keeps_only_enable_and_imask(gt: GenericTimer) -> None:
    gt.write("CNTP_CTL_EL0", 0xFFFF_FFF8 | CTL_IMASK)
    assert gt.read("CNTP_CTL_EL0") == CTL_IMASK
    gt.write("CNTV_CTL_EL0", CTL_ENABLE)
    assert gt.read("CNTV_CTL_EL0") & (CTL_ENABLE | CTL_IMASK) == CTL_ENABLE
    assert gt.read("CNTP_CTL_EL0") == CTL_IMASK  # the two timers are separate


def test_istatus_cannot_be_written(gt: GenericTimer) -> None:
    gt.write("CNTP_CVAL_EL0", 1000)
    gt.write("CNTP_CTL_EL0", CTL_ENABLE | CTL_ISTATUS)
    assert gt.read("CNTP_CTL_EL0") == CTL_ENABLE


def test_istatus_only_while_enabled_and_count_reaches_cval(gt: GenericTimer, clk: FakeClock) -> None:
    gt.write("CNTP_CVAL_EL0", 10)
    clk.ticks(20)
    assert gt.read("CNTP_CTL_EL0") == 0  # disabled: ISTATUS clear although count >= CVAL (gt_recalc_timer)
    gt.write("CNTP_CTL_EL0", CTL_ENABLE)
    assert gt.read("CNTP_CTL_EL0") == CTL_ENABLE | CTL_ISTATUS
    gt.write("CNTP_CVAL_EL0", 21)
    assert gt.read("CNTP_CTL_EL0") == CTL_ENABLE
    clk.ticks(1)
    assert gt.read("CNTP_CTL_EL0") == CTL_ENABLE | CTL_ISTATUS  # >=, not >


def test_istatus_compare_is_unsigned_64(gt: GenericTimer, clk: FakeClock) -> None:
    clk.ticks(5)
    gt.write("CNTP_CVAL_EL0", 1 << 63)  # negative if signed: must not fire
    gt.write("CNTP_CTL_EL0", CTL_ENABLE)
    assert not gt.phys.istatus()


def test_cval_is_64_bit(gt: GenericTimer) -> None:
    gt.write("CNTV_CVAL_EL0", 0x1_2345_6789_ABCD)
    assert gt.read("CNTV_CVAL_EL0") == 0x1_2345_6789_ABCD
    gt.write("CNTV_CVAL_EL0", (1 << 64) + 7)
    assert gt.read("CNTV_CVAL_EL0") == 7


def test_tval_reads_cval_minus_count_as_32_bits(gt: GenericTimer, clk: FakeClock) -> None:
    clk.ticks(1000)
    gt.write("CNTP_CVAL_EL0", 1500)
    assert gt.read("CNTP_TVAL_EL0") == 500
    clk.ticks(600)  # past CVAL: negative, read zero-extended as QEMU's (uint32_t) cast
    assert gt.read("CNTP_TVAL_EL0") == (-100) & 0xFFFF_FFFF
    gt.write("CNTP_CVAL_EL0", 1600 + (1 << 32) + 3)  # truncated to 32 bits
    assert gt.read("CNTP_TVAL_EL0") == 3


def test_tval_write_sign_extends(gt: GenericTimer, clk: FakeClock) -> None:
    clk.ticks(1000)
    gt.write("CNTP_TVAL_EL0", 250)
    assert gt.read("CNTP_CVAL_EL0") == 1250
    gt.write("CNTP_TVAL_EL0", 0xFFFF_FF9C)  # -100
    assert gt.read("CNTP_CVAL_EL0") == 900
    gt.write("CNTP_TVAL_EL0", 0x1_0000_0005)  # only the low 32 bits count
    assert gt.read("CNTP_CVAL_EL0") == 1005


def test_tval_write_wraps_cval_mod_2_64(gt: GenericTimer, clk: FakeClock) -> None:
    clk.ticks(10)
    gt.write("CNTP_TVAL_EL0", 0x8000_0000)  # most negative 32-bit value
    assert gt.read("CNTP_CVAL_EL0") == (10 - (1 << 31)) & ((1 << 64) - 1)


def test_virtual_tval_uses_the_virtual_count(gt: GenericTimer, clk: FakeClock) -> None:
    clk.ticks(1000)
    gt.write("CNTVOFF_EL2", 400)
    gt.write("CNTV_TVAL_EL0", 50)
    assert gt.read("CNTV_CVAL_EL0") == 650
    assert gt.read("CNTV_TVAL_EL0") == 50
    gt.write("CNTP_TVAL_EL0", 50)
    assert gt.read("CNTP_CVAL_EL0") == 1050


def test_virtual_timer_fires_on_virtual_count(gt: GenericTimer, clk: FakeClock) -> None:
    gt.write("CNTVOFF_EL2", 100)
    clk.ticks(150)
    gt.write("CNTV_CVAL_EL0", 60)
    gt.write("CNTV_CTL_EL0", CTL_ENABLE)
    assert not gt.virt.istatus()  # virtual count 50
    clk.ticks(10)
    assert gt.virt.istatus()
    gt.update()
    assert gt.next_deadline_ticks() is None


def test_output_level_and_imask(gt: GenericTimer, clk: FakeClock) -> None:
    gt.write("CNTP_CVAL_EL0", 5)
    clk.ticks(5)
    assert gt.levels() == {PHYS_TIMER_INTID: False, VIRT_TIMER_INTID: False}
    gt.write("CNTP_CTL_EL0", CTL_ENABLE | CTL_IMASK)
    assert gt.read("CNTP_CTL_EL0") & CTL_ISTATUS  # the condition is still shown
    assert gt.levels()[PHYS_TIMER_INTID] is False  # but masked
    gt.write("CNTP_CTL_EL0", CTL_ENABLE)
    assert gt.levels() == {PHYS_TIMER_INTID: True, VIRT_TIMER_INTID: False}


def test_ppi_numbers_are_qemu_virts() -> None:
    assert (PHYS_TIMER_INTID, VIRT_TIMER_INTID) == (30, 27)
    g = GenericTimer(clock=FakeClock())
    assert g.phys.intid == 30 and g.virt.intid == 27


def test_on_level_reports_changes_only(clk: FakeClock) -> None:
    seen: list[tuple[int, bool]] = []
    g = GenericTimer(clock=clk, on_level=lambda i, lv: seen.append((i, lv)))
    g.write("CNTV_TVAL_EL0", 10)
    g.write("CNTV_CTL_EL0", CTL_ENABLE)
    assert seen == []
    clk.ticks(9)
    g.update()
    assert seen == []
    clk.ticks(1)
    g.update()
    g.update()
    assert seen == [(VIRT_TIMER_INTID, True)]
    g.write("CNTV_CTL_EL0", CTL_ENABLE | CTL_IMASK)  # a write lowers it at once
    assert seen[-1] == (VIRT_TIMER_INTID, False)
    g.write("CNTV_CTL_EL0", CTL_ENABLE)
    g.write("CNTV_CVAL_EL0", 1 << 40)  # rearm into the future lowers it
    assert seen[-2:] == [(VIRT_TIMER_INTID, True), (VIRT_TIMER_INTID, False)]


def test_cntvoff_write_recomputes_levels(clk: FakeClock) -> None:
    seen: list[tuple[int, bool]] = []
    g = GenericTimer(clock=clk, on_level=lambda i, lv: seen.append((i, lv)))
    clk.ticks(100)
    g.write("CNTV_CVAL_EL0", 90)
    g.write("CNTV_CTL_EL0", CTL_ENABLE)
    assert seen == [(VIRT_TIMER_INTID, True)]
    g.write("CNTVOFF_EL2", 50)
    assert seen[-1] == (VIRT_TIMER_INTID, False)


def test_deadlines(gt: GenericTimer, clk: FakeClock) -> None:
    assert gt.next_deadline() is None  # nothing enabled
    clk.ticks(100)
    gt.write("CNTP_TVAL_EL0", 40)
    gt.write("CNTP_CTL_EL0", CTL_ENABLE)
    gt.write("CNTVOFF_EL2", 10)
    gt.write("CNTV_CVAL_EL0", 100)  # virtual 100 = physical 110
    gt.write("CNTV_CTL_EL0", CTL_ENABLE)
    assert gt.phys.next_deadline_ticks() == 140
    assert gt.virt.next_deadline_ticks() == 110
    assert gt.next_deadline_ticks() == 110
    deadline = gt.next_deadline()
    assert deadline == gt.epoch_ns + 110 * GTIMER_SCALE_NS
    clk.ns = deadline - 1
    assert not gt.virt.level()
    clk.ns = deadline
    assert gt.virt.level()
    assert gt.next_deadline_ticks() == 110  # passed, but nobody was told yet: still something to wake for
    gt.update()
    assert gt.next_deadline_ticks() == 140  # the virtual timer is asserted; only the physical one can change
    gt.write("CNTP_CTL_EL0", CTL_ENABLE | CTL_IMASK)
    assert gt.next_deadline() is None  # a masked timer wakes nobody


def test_instruction_clock_is_deterministic_and_jumps_for_wfi() -> None:
    ic = InstructionClock(ns_per_insn=4)
    g = GenericTimer(clock=ic)
    ic.advance(8)
    assert g.read("CNTPCT_EL0") == 2
    g.write("CNTV_TVAL_EL0", 1000)
    g.write("CNTV_CTL_EL0", CTL_ENABLE)
    deadline = g.next_deadline()
    assert deadline is not None
    ic.advance_to(deadline)
    assert g.read("CNTPCT_EL0") == 1002
    assert g.virt.level()
    ic.advance_to(0)  # never backwards
    assert g.read("CNTPCT_EL0") == 1002
    with pytest.raises(ValueError):
        ic.advance(-1)
    with pytest.raises(ValueError):
        InstructionClock(0)


def test_host_clock_is_monotonic_ns() -> None:
    a = host_clock()
    b = host_clock()
    assert isinstance(a, int) and b >= a


def test_reset_clears_timers_and_restarts_counter(gt: GenericTimer, clk: FakeClock) -> None:
    clk.ticks(50)
    gt.write("CNTP_CVAL_EL0", 3)
    gt.write("CNTP_CTL_EL0", CTL_ENABLE)
    gt.write("CNTVOFF_EL2", 9)
    gt.write("CNTKCTL_EL1", 3)
    gt.reset()
    assert gt.read("CNTPCT_EL0") == 0
    assert gt.read("CNTP_CTL_EL0") == 0 and gt.read("CNTP_CVAL_EL0") == 0
    assert gt.read("CNTVOFF_EL2") == 0 and gt.read("CNTKCTL_EL1") == 0


def test_unknown_register(gt: GenericTimer) -> None:
    with pytest.raises(KeyError):
        gt.read("CNTHP_CTL_EL2")
    with pytest.raises(KeyError):
        gt.write("CNTHP_CTL_EL2", 0)


@pytest.mark.parametrize(
    ("name", "aa64", "aa32"),
    [
        ("CNTFRQ_EL0", (3, 3, 14, 0, 0), (0, 14, 0, 0)),
        ("CNTPCT_EL0", (3, 3, 14, 0, 1), (0, 14)),
        ("CNTVCT_EL0", (3, 3, 14, 0, 2), (1, 14)),
        ("CNTKCTL_EL1", (3, 0, 14, 1, 0), (0, 14, 1, 0)),
        ("CNTP_TVAL_EL0", (3, 3, 14, 2, 0), (0, 14, 2, 0)),
        ("CNTP_CTL_EL0", (3, 3, 14, 2, 1), (0, 14, 2, 1)),
        ("CNTP_CVAL_EL0", (3, 3, 14, 2, 2), (2, 14)),
        ("CNTV_TVAL_EL0", (3, 3, 14, 3, 0), (0, 14, 3, 0)),
        ("CNTV_CTL_EL0", (3, 3, 14, 3, 1), (0, 14, 3, 1)),
        ("CNTV_CVAL_EL0", (3, 3, 14, 3, 2), (3, 14)),
        ("CNTVOFF_EL2", (3, 4, 14, 0, 3), (4, 14)),
    ],
)
def test_encodings(name: str, aa64: tuple[int, int, int, int, int], aa32: tuple[int, ...]) -> None:
    assert REGISTERS[name].aa64 == aa64 and REGISTERS[name].aa32 == aa32
    assert GenericTimer.name_aa64(*aa64) == name
    if len(aa32) == 2:
        assert REGISTERS[name].aa32_64bit
        assert GenericTimer.name_aa32_64(*aa32) == name
    else:
        assert not REGISTERS[name].aa32_64bit
        assert GenericTimer.name_aa32(*aa32) == name


def test_encoding_tables_are_complete_and_unambiguous() -> None:
    assert len(BY_AA64) == len(REGISTERS) == len(BY_AA32)
    assert GenericTimer.name_aa64(3, 0, 1, 0, 0) is None  # SCTLR_EL1 is not ours
    assert GenericTimer.name_aa32(0, 1, 0, 0) is None


def test_32_bit_registers_truncate(gt: GenericTimer) -> None:
    gt.write("CNTKCTL_EL1", (1 << 40) | 5)
    assert gt.read("CNTKCTL_EL1") == 5
    gt.write("CNTFRQ_EL0", (1 << 33) | 7)
    assert gt.read("CNTFRQ_EL0") == 7


def test_a_deadline_passed_since_the_last_update_is_still_a_deadline(clk: FakeClock) -> None:
    """The ticker updates (the line still low), then the clock passes CVAL before it asks for the deadline: the
    answer must still be that deadline (now in the past), so the ticker updates again at once. It was None (the
    live condition said "already asserted"), the ticker slept with no timeout, and EDK2 stayed in WFI forever."""
    seen: list[tuple[int, bool]] = []
    g = GenericTimer(clock=clk, on_level=lambda i, lv: seen.append((i, lv)))
    g.write("CNTV_CVAL_EL0", 10)
    g.write("CNTV_CTL_EL0", CTL_ENABLE)
    clk.ticks(9)
    g.update()
    clk.ticks(1)
    assert g.next_deadline_ticks() == 10
    assert g.next_deadline() is not None and g.next_deadline() <= clk()
    g.update()
    assert seen == [(VIRT_TIMER_INTID, True)]
    assert g.next_deadline_ticks() is None
