"""GICv2 model: register reset values, banking, lines, acknowledge/EOI, priorities, SGIs, routing, refusals.

Expected values follow QEMU's arm_gic (revision 2, no security extensions) as the virt board builds it.
"""

from __future__ import annotations

import threading

import pytest

from vcpu_service import gic as g
from vcpu_service.gic import Gic, GicAccessError

UART_SPI = 1  # virt: PL011 on SPI 1 -> interrupt ID 33
UART_ID = 33
TIMER_PPI = 30
VTIMER_PPI = 27


def dread(gic: Gic, off: int, cpu: int = 0, size: int = 4) -> int:
    return gic.dist_read(cpu, off, size)


def dwrite(gic: Gic, off: int, value: int, cpu: int = 0, size: int = 4) -> None:
    gic.dist_write(cpu, off, size, value)


def cread(gic: Gic, off: int, cpu: int = 0) -> int:
    return gic.cpu_read(cpu, off, 4)


def cwrite(gic: Gic, off: int, value: int, cpu: int = 0) -> None:
    gic.cpu_write(cpu, off, 4, value)


def enable_all(gic: Gic, pmr: int = 0xFF) -> None:
    """Distributor and every CPU interface on (Group 0 -> IRQ), PMR open."""
    dwrite(gic, g.GICD_CTLR, 1)
    for cpu in range(gic.num_cpu):
        cwrite(gic, g.GICC_CTLR, 1, cpu)
        cwrite(gic, g.GICC_PMR, pmr, cpu)


def enable_irq(gic: Gic, irq: int, cpu: int = 0) -> None:
    dwrite(gic, g.GICD_ISENABLER + 4 * (irq // 32), 1 << (irq % 32), cpu)


def set_prio(gic: Gic, irq: int, prio: int, cpu: int = 0) -> None:
    dwrite(gic, g.GICD_IPRIORITYR + irq, prio, cpu, size=1)


def set_target(gic: Gic, irq: int, mask: int) -> None:
    dwrite(gic, g.GICD_ITARGETSR + irq, mask, size=1)


def set_edge(gic: Gic, irq: int, edge: bool) -> None:
    off = g.GICD_ICFGR + 4 * (irq // 16)
    shift = 2 * (irq % 16) + 1
    value = dread(gic, off) & ~(1 << shift)
    dwrite(gic, off, value | (int(edge) << shift))


@pytest.fixture
def gic2() -> Gic:
    return Gic(num_cpu=2)


# ------------------------------------------------------------------------------------------ reset values


@pytest.mark.parametrize(
    ("region", "offset", "expected"),
    [
        ("d", g.GICD_CTLR, 0),
        ("d", g.GICD_IIDR, 0x43B),
        ("d", g.GICD_ISENABLER, 0x0000FFFF),  # SGIs enabled at reset
        ("d", g.GICD_ISENABLER + 4, 0),
        ("d", g.GICD_ISPENDR, 0),
        ("d", g.GICD_ISACTIVER, 0),
        ("d", g.GICD_IPRIORITYR, 0),
        ("d", g.GICD_ICFGR, 0xAAAAAAAA),  # SGIs edge
        ("d", g.GICD_ICFGR + 4, 0),  # PPIs level at reset
        ("d", g.GICD_ICFGR + 8, 0),  # SPIs level at reset
        ("d", g.GICD_ITARGETSR + 32, 0),  # SPIs target nobody at reset (SMP)
        ("d", g.GICD_IGROUPR, 0),
        ("d", 0xFD0, 0x04),
        ("d", 0xFE0, 0x90),
        ("d", 0xFE4, 0xB4),
        ("d", 0xFE8, 0x2B),
        ("d", 0xFEC, 0x00),
        ("d", 0xFF0, 0x0D),
        ("d", 0xFF4, 0xF0),
        ("d", 0xFF8, 0x05),
        ("d", 0xFFC, 0xB1),
        ("c", g.GICC_CTLR, 0),
        ("c", g.GICC_PMR, 0),
        ("c", g.GICC_BPR, 0),
        ("c", g.GICC_ABPR, 1),
        ("c", g.GICC_RPR, 0xFF),  # idle
        ("c", g.GICC_HPPIR, 1023),
        ("c", g.GICC_IIDR, 0x0002043B),
        ("c", g.GICC_APR0, 0),
        ("c", g.GICC_AIAR, 0),  # not implemented in QEMU's GICv2: RAZ
    ],
)
def test_reset_values(gic2: Gic, region: str, offset: int, expected: int) -> None:
    value = dread(gic2, offset) if region == "d" else cread(gic2, offset)
    assert value == expected


@pytest.mark.parametrize(
    ("num_cpu", "num_irq", "typer"),
    [(1, 288, 0x08), (2, 288, 0x28), (4, 288, 0x68), (8, 288, 0xE8), (2, 64, 0x21), (1, 32, 0x00)],
)
def test_typer_itlines_and_cpus(num_cpu: int, num_irq: int, typer: int) -> None:
    assert dread(Gic(num_cpu, num_irq), g.GICD_TYPER) == typer


def test_virt_constants() -> None:
    assert (g.GICD_BASE, g.GICD_SIZE, g.GICC_BASE, g.GICC_SIZE) == (0x08000000, 0x10000, 0x08010000, 0x10000)
    assert g.VIRT_NUM_IRQ == 288


@pytest.mark.parametrize(("num_cpu", "num_irq"), [(0, 288), (9, 288), (2, 100), (2, 16)])
def test_bad_configuration_refused(num_cpu: int, num_irq: int) -> None:
    with pytest.raises(ValueError):
        Gic(num_cpu, num_irq)


# --------------------------------------------------------------------------------------- distributor


def test_ctlr_keeps_two_group_enable_bits(gic2: Gic) -> None:
    dwrite(gic2, g.GICD_CTLR, 0xFFFFFFFF)
    assert dread(gic2, g.GICD_CTLR) == 3


@pytest.mark.parametrize(
    ("set_off", "clear_off"),
    [(g.GICD_ISENABLER, g.GICD_ICENABLER), (g.GICD_ISACTIVER, g.GICD_ICACTIVER)],
)
def test_set_clear_spi_bits(gic2: Gic, set_off: int, clear_off: int) -> None:
    set_target(gic2, 40, 1)
    dwrite(gic2, set_off + 4, 1 << 8)
    assert dread(gic2, set_off + 4) == 1 << 8
    assert dread(gic2, clear_off + 4) == 1 << 8  # the clear register reads the same state
    assert dread(gic2, set_off + 4, cpu=1) == 1 << 8  # SPIs are not banked
    dwrite(gic2, clear_off + 4, 1 << 8)
    assert dread(gic2, set_off + 4) == 0


def test_set_clear_pending_spi(gic2: Gic) -> None:
    set_target(gic2, 40, 1)
    dwrite(gic2, g.GICD_ISPENDR + 4, 1 << 8)
    assert dread(gic2, g.GICD_ISPENDR + 4) == 1 << 8
    dwrite(gic2, g.GICD_ICPENDR + 4, 1 << 8)
    assert dread(gic2, g.GICD_ISPENDR + 4) == 0


def test_sgi_enables_fixed_and_sgi_pending_not_via_ispendr(gic2: Gic) -> None:
    dwrite(gic2, g.GICD_ICENABLER, 0xFFFFFFFF)
    assert dread(gic2, g.GICD_ISENABLER) == 0x0000FFFF  # SGIs stay enabled, PPIs cleared
    dwrite(gic2, g.GICD_ISPENDR, 0x0000FFFF)
    assert dread(gic2, g.GICD_ISPENDR) == 0


@pytest.mark.parametrize(
    "set_off", [g.GICD_ISENABLER, g.GICD_ISPENDR, g.GICD_ISACTIVER]
)
def test_private_interrupts_banked_per_cpu(gic2: Gic, set_off: int) -> None:
    dwrite(gic2, set_off, 1 << TIMER_PPI, cpu=1)
    assert dread(gic2, set_off, cpu=1) & (1 << TIMER_PPI)
    assert not dread(gic2, set_off, cpu=0) & (1 << TIMER_PPI)


def test_priority_banked_and_byte_accessible(gic2: Gic) -> None:
    set_prio(gic2, TIMER_PPI, 0xA0, cpu=1)
    set_prio(gic2, UART_ID, 0x40, cpu=1)
    assert dread(gic2, g.GICD_IPRIORITYR + TIMER_PPI, cpu=1, size=1) == 0xA0
    assert dread(gic2, g.GICD_IPRIORITYR + TIMER_PPI, cpu=0, size=1) == 0
    assert dread(gic2, g.GICD_IPRIORITYR + UART_ID, cpu=0, size=1) == 0x40
    dwrite(gic2, g.GICD_IPRIORITYR + 32, 0x11223344)
    assert [dread(gic2, g.GICD_IPRIORITYR + 32 + i, size=1) for i in range(4)] == [0x44, 0x33, 0x22, 0x11]


def test_priority_bits_masked() -> None:
    gic = Gic(2, priority_bits=5)
    set_prio(gic, UART_ID, 0xFF)
    assert dread(gic, g.GICD_IPRIORITYR + UART_ID, size=1) == 0xF8
    cwrite(gic, g.GICC_PMR, 0xFF)
    assert cread(gic, g.GICC_PMR) == 0xF8


@pytest.mark.parametrize(("cpu", "own"), [(0, 0x01), (1, 0x02)])
def test_itargetsr_private_read_only_and_own_bit(gic2: Gic, cpu: int, own: int) -> None:
    dwrite(gic2, g.GICD_ITARGETSR + 28, 0xFFFFFFFF, cpu=cpu)
    assert dread(gic2, g.GICD_ITARGETSR + 28, cpu=cpu) == own * 0x01010101
    assert dread(gic2, g.GICD_ITARGETSR, cpu=cpu) == own * 0x01010101


def test_itargetsr_spi_byte_write(gic2: Gic) -> None:
    set_target(gic2, 34, 0x02)
    assert dread(gic2, g.GICD_ITARGETSR + 32) == 0x00020000


def test_itargetsr_uniprocessor_raz_wi() -> None:
    gic = Gic(1)
    set_target(gic, 40, 0x2)
    assert dread(gic, g.GICD_ITARGETSR + 40, size=1) == 0


def test_icfgr_sgis_edge_read_only_ppis_spis_writable(gic2: Gic) -> None:
    dwrite(gic2, g.GICD_ICFGR, 0)
    assert dread(gic2, g.GICD_ICFGR) == 0xAAAAAAAA
    dwrite(gic2, g.GICD_ICFGR + 8, 0x2)  # ID 32 edge
    assert dread(gic2, g.GICD_ICFGR + 8) == 0x2
    dwrite(gic2, g.GICD_ICFGR + 4, 0x2 << 28)  # ID 30 edge (banked storage is not modelled: shared)
    assert dread(gic2, g.GICD_ICFGR + 4) == 0x2 << 28


def test_out_of_range_interrupts_raz_wi() -> None:
    gic = Gic(2, num_irq=64)
    dwrite(gic, g.GICD_ISENABLER + 8, 0xFFFFFFFF)
    assert dread(gic, g.GICD_ISENABLER + 8) == 0
    dwrite(gic, g.GICD_IPRIORITYR + 100, 0xFF, size=1)
    assert dread(gic, g.GICD_IPRIORITYR + 100, size=1) == 0


# ------------------------------------------------------------------------------------ access refusals


@pytest.mark.parametrize(
    ("region", "offset", "size"),
    [
        ("d", 0x0, 8),
        ("d", 0x1, 4),
        ("d", 0x402, 4),
        ("d", 0x1000, 4),  # beyond the distributor page, still inside the virt window
        ("d", 0xFFFC, 4),
        ("c", 0x0, 8),
        ("c", 0x2, 4),
        ("c", 0x2000, 4),
    ],
)
def test_bad_accesses_refused(gic2: Gic, region: str, offset: int, size: int) -> None:
    with pytest.raises(GicAccessError):
        if region == "d":
            gic2.dist_read(0, offset, size)
        else:
            gic2.cpu_read(0, offset, size)
    with pytest.raises(GicAccessError):
        if region == "d":
            gic2.dist_write(0, offset, size, 0)
        else:
            gic2.cpu_write(0, offset, size, 0)


def test_bad_cpu_refused(gic2: Gic) -> None:
    with pytest.raises(ValueError):
        gic2.dist_read(2, 0, 4)


# --------------------------------------------------------------------------------- lines and delivery


def test_spi_level_pending_while_high(gic2: Gic) -> None:
    enable_all(gic2)
    enable_irq(gic2, UART_ID)
    set_target(gic2, UART_ID, 1)
    gic2.set_spi(UART_SPI, True)
    assert gic2.pending_for(0) and not gic2.pending_for(1)
    assert cread(gic2, g.GICC_IAR) == UART_ID
    assert not gic2.pending_for(0)  # active now
    cwrite(gic2, g.GICC_EOIR, UART_ID)
    assert gic2.pending_for(0)  # line still high: pending again
    gic2.set_spi(UART_SPI, False)
    assert not gic2.pending_for(0)
    assert dread(gic2, g.GICD_ISPENDR + 4) == 0


def test_spi_level_latched_by_ispendr(gic2: Gic) -> None:
    enable_all(gic2)
    enable_irq(gic2, UART_ID)
    set_target(gic2, UART_ID, 1)
    dwrite(gic2, g.GICD_ISPENDR + 4, 1 << 1)
    assert gic2.pending_for(0)
    assert cread(gic2, g.GICC_IAR) == UART_ID
    cwrite(gic2, g.GICC_EOIR, UART_ID)
    assert not gic2.pending_for(0)  # line low: the latch was consumed by the acknowledge


def test_spi_edge_latches_on_rising_edge(gic2: Gic) -> None:
    enable_all(gic2)
    enable_irq(gic2, UART_ID)
    set_target(gic2, UART_ID, 1)
    set_edge(gic2, UART_ID, True)
    gic2.set_spi(UART_SPI, True)
    gic2.set_spi(UART_SPI, False)
    assert gic2.pending_for(0)  # latched although the line dropped
    assert cread(gic2, g.GICC_IAR) == UART_ID
    cwrite(gic2, g.GICC_EOIR, UART_ID)
    assert not gic2.pending_for(0)
    gic2.set_spi(UART_SPI, True)
    gic2.set_spi(UART_SPI, True)  # no new edge
    assert cread(gic2, g.GICC_IAR) == UART_ID
    cwrite(gic2, g.GICC_EOIR, UART_ID)
    assert cread(gic2, g.GICC_IAR) == 1023


@pytest.mark.parametrize(("target", "expected"), [(0x1, (True, False)), (0x2, (False, True)), (0x0, (False, False))])
def test_itargetsr_routes_spis(gic2: Gic, target: int, expected: tuple[bool, bool]) -> None:
    enable_all(gic2)
    enable_irq(gic2, UART_ID)
    set_target(gic2, UART_ID, target)
    gic2.set_spi(UART_SPI, True)
    assert (gic2.pending_for(0), gic2.pending_for(1)) == expected


def test_retarget_pending_edge_spi_moves_it(gic2: Gic) -> None:
    enable_all(gic2)
    enable_irq(gic2, UART_ID)
    set_edge(gic2, UART_ID, True)
    set_target(gic2, UART_ID, 1)
    gic2.set_spi(UART_SPI, True)
    set_target(gic2, UART_ID, 2)
    assert (gic2.pending_for(0), gic2.pending_for(1)) == (False, True)


def test_ppi_level_per_cpu(gic2: Gic) -> None:
    enable_all(gic2)
    enable_irq(gic2, TIMER_PPI, cpu=1)
    gic2.set_ppi(1, TIMER_PPI, True)
    assert not gic2.pending_for(0) and gic2.pending_for(1)
    assert dread(gic2, g.GICD_ISPENDR, cpu=1) == 1 << TIMER_PPI
    assert dread(gic2, g.GICD_ISPENDR, cpu=0) == 0
    assert cread(gic2, g.GICC_IAR, cpu=1) == TIMER_PPI
    cwrite(gic2, g.GICC_EOIR, TIMER_PPI, cpu=1)
    assert gic2.pending_for(1)
    gic2.set_ppi(1, TIMER_PPI, False)
    assert not gic2.pending_for(1)


def test_ppi_disabled_not_signalled(gic2: Gic) -> None:
    enable_all(gic2)
    gic2.set_ppi(0, VTIMER_PPI, True)
    assert not gic2.pending_for(0)
    assert dread(gic2, g.GICD_ISPENDR) == 1 << VTIMER_PPI  # pending, just not enabled
    enable_irq(gic2, VTIMER_PPI)
    assert gic2.pending_for(0)


@pytest.mark.parametrize(("spi", "cpu", "irq"), [(256, None, 0), (-1, None, 0), (None, 0, 15), (None, 0, 32)])
def test_bad_lines_refused(gic2: Gic, spi: int | None, cpu: int | None, irq: int) -> None:
    with pytest.raises(ValueError):
        if spi is not None:
            gic2.set_spi(spi, True)
        else:
            gic2.set_ppi(cpu or 0, irq, True)


@pytest.mark.parametrize(
    ("dist", "cpuif"),
    [(0, 1), (1, 0)],
)
def test_disabled_distributor_or_interface_signals_nothing(gic2: Gic, dist: int, cpuif: int) -> None:
    enable_all(gic2)
    dwrite(gic2, g.GICD_CTLR, dist)
    cwrite(gic2, g.GICC_CTLR, cpuif)
    enable_irq(gic2, UART_ID)
    set_target(gic2, UART_ID, 1)
    gic2.set_spi(UART_SPI, True)
    assert not gic2.pending_for(0)
    assert cread(gic2, g.GICC_IAR) == 1023


# ------------------------------------------------------------------------------------ priority logic


@pytest.mark.parametrize(("prio", "pmr", "signalled"), [(0x80, 0x81, True), (0x80, 0x80, False), (0x80, 0x00, False)])
def test_pmr_masks(gic2: Gic, prio: int, pmr: int, signalled: bool) -> None:
    enable_all(gic2, pmr=pmr)
    enable_irq(gic2, UART_ID)
    set_target(gic2, UART_ID, 1)
    set_prio(gic2, UART_ID, prio)
    gic2.set_spi(UART_SPI, True)
    assert gic2.pending_for(0) is signalled
    assert cread(gic2, g.GICC_HPPIR) == (UART_ID if signalled else 1023)
    assert cread(gic2, g.GICC_IAR) == (UART_ID if signalled else 1023)


def test_highest_priority_first_and_lowest_id_on_tie(gic2: Gic) -> None:
    enable_all(gic2)
    for irq, prio in [(40, 0x80), (41, 0x40), (42, 0x40)]:
        enable_irq(gic2, irq)
        set_target(gic2, irq, 1)
        set_prio(gic2, irq, prio)
        gic2.set_spi(irq - 32, True)
    assert cread(gic2, g.GICC_HPPIR) == 41
    assert cread(gic2, g.GICC_IAR) == 41


def test_preemption_by_running_priority_and_eoi_order(gic2: Gic) -> None:
    enable_all(gic2)
    low, high = 40, 41
    for irq, prio in [(low, 0xA0), (high, 0x20)]:
        enable_irq(gic2, irq)
        set_target(gic2, irq, 1)
        set_prio(gic2, irq, prio)
        set_edge(gic2, irq, True)
    gic2.set_spi(low - 32, True)
    assert cread(gic2, g.GICC_IAR) == low
    assert cread(gic2, g.GICC_RPR) == 0xA0
    # An equal-or-lower priority interrupt does not preempt
    set_prio(gic2, 42, 0xA0)
    enable_irq(gic2, 42)
    set_target(gic2, 42, 1)
    set_edge(gic2, 42, True)
    gic2.set_spi(42 - 32, True)
    assert cread(gic2, g.GICC_HPPIR) == 42  # visible above PMR...
    assert not gic2.pending_for(0)  # ...but not signalled
    assert cread(gic2, g.GICC_IAR) == 1023
    # A higher priority one does
    gic2.set_spi(high - 32, True)
    assert gic2.pending_for(0)
    assert cread(gic2, g.GICC_IAR) == high
    assert cread(gic2, g.GICC_RPR) == 0x20
    # preemption levels 0x10 and 0x50: APR0 bit 16 and APR2 bit 16
    assert (cread(gic2, g.GICC_APR0), cread(gic2, g.GICC_APR0 + 8)) == (1 << 16, 1 << 16)
    cwrite(gic2, g.GICC_EOIR, high)
    assert cread(gic2, g.GICC_RPR) == 0xA0
    assert dread(gic2, g.GICD_ISACTIVER + 4) == 1 << (low - 32)
    cwrite(gic2, g.GICC_EOIR, low)
    assert cread(gic2, g.GICC_RPR) == 0xFF
    assert dread(gic2, g.GICD_ISACTIVER + 4) == 0
    assert cread(gic2, g.GICC_IAR) == 42


def test_apr_records_active_priority(gic2: Gic) -> None:
    enable_all(gic2)
    enable_irq(gic2, UART_ID)
    set_target(gic2, UART_ID, 1)
    set_prio(gic2, UART_ID, 0x10)
    gic2.set_spi(UART_SPI, True)
    cread(gic2, g.GICC_IAR)
    assert cread(gic2, g.GICC_APR0) == 1 << (0x10 >> 1)
    cwrite(gic2, g.GICC_EOIR, UART_ID)
    assert cread(gic2, g.GICC_APR0) == 0


def test_binary_point_groups_running_priority(gic2: Gic) -> None:
    enable_all(gic2)
    cwrite(gic2, g.GICC_BPR, 3)  # group priority bits [7:4]
    assert cread(gic2, g.GICC_BPR) == 3
    enable_irq(gic2, UART_ID)
    set_target(gic2, UART_ID, 1)
    set_prio(gic2, UART_ID, 0x5A)
    gic2.set_spi(UART_SPI, True)
    cread(gic2, g.GICC_IAR)
    assert cread(gic2, g.GICC_RPR) == 0x50


def test_abpr_minimum_one(gic2: Gic) -> None:
    cwrite(gic2, g.GICC_ABPR, 0)
    assert cread(gic2, g.GICC_ABPR) == 1
    cwrite(gic2, g.GICC_ABPR, 0xF)
    assert cread(gic2, g.GICC_ABPR) == 7


def test_spurious_and_eoi_of_nothing_ignored(gic2: Gic) -> None:
    enable_all(gic2)
    assert cread(gic2, g.GICC_IAR) == 1023
    cwrite(gic2, g.GICC_EOIR, 1023)
    cwrite(gic2, g.GICC_EOIR, UART_ID)
    assert cread(gic2, g.GICC_RPR) == 0xFF


def test_group1_hidden_without_ackctl(gic2: Gic) -> None:
    enable_all(gic2)
    dwrite(gic2, g.GICD_CTLR, 3)
    cwrite(gic2, g.GICC_CTLR, 3)
    enable_irq(gic2, UART_ID)
    set_target(gic2, UART_ID, 1)
    dwrite(gic2, g.GICD_IGROUPR + 4, 1 << 1)
    gic2.set_spi(UART_SPI, True)
    assert gic2.pending_for(0)
    assert cread(gic2, g.GICC_IAR) == 1022
    cwrite(gic2, g.GICC_CTLR, 3 | g.GICC_CTLR_ACK_CTL)
    assert cread(gic2, g.GICC_IAR) == UART_ID


def test_fiq_for_group0_with_fiqen(gic2: Gic) -> None:
    enable_all(gic2)
    cwrite(gic2, g.GICC_CTLR, 1 | g.GICC_CTLR_FIQ_EN)
    enable_irq(gic2, UART_ID)
    set_target(gic2, UART_ID, 1)
    gic2.set_spi(UART_SPI, True)
    assert gic2.fiq_pending_for(0) and not gic2.pending_for(0)


def test_the_fiq_output_reaches_the_cpu_and_falls_when_acknowledged(gic2: Gic) -> None:
    """The FIQ line is announced like the IRQ line (it was computed and never told: a guest using FIQ slept in
    WFI forever); the IRQ listener hears nothing of it."""
    irq: list[tuple[int, bool]] = []
    fiq: list[tuple[int, bool]] = []
    gic2.on_irq_change = lambda cpu, level: irq.append((cpu, level))
    gic2.on_fiq_change = lambda cpu, level: fiq.append((cpu, level))
    enable_all(gic2)
    cwrite(gic2, g.GICC_CTLR, 1 | g.GICC_CTLR_FIQ_EN, cpu=1)
    enable_irq(gic2, UART_ID)
    set_target(gic2, UART_ID, 2)
    gic2.set_spi(UART_SPI, True)
    assert fiq == [(1, True)] and irq == []
    assert cread(gic2, g.GICC_IAR, cpu=1) == UART_ID
    assert fiq == [(1, True), (1, False)] and irq == []
    cwrite(gic2, g.GICC_CTLR, 1, cpu=1)  # FIQEn off: Group 0 is signalled as IRQ again
    cwrite(gic2, g.GICC_EOIR, UART_ID, cpu=1)
    assert irq == [(1, True)] and fiq[-1] == (1, False)


def test_eoimode_split_priority_drop_and_dir(gic2: Gic) -> None:
    enable_all(gic2)
    cwrite(gic2, g.GICC_CTLR, 1 | g.GICC_CTLR_EOIMODE)
    enable_irq(gic2, UART_ID)
    set_target(gic2, UART_ID, 1)
    set_edge(gic2, UART_ID, True)
    gic2.set_spi(UART_SPI, True)
    assert cread(gic2, g.GICC_IAR) == UART_ID
    cwrite(gic2, g.GICC_EOIR, UART_ID)
    assert cread(gic2, g.GICC_RPR) == 0xFF
    assert dread(gic2, g.GICD_ISACTIVER + 4) == 1 << 1  # still active until DIR
    cwrite(gic2, g.GICC_DIR, UART_ID)
    assert dread(gic2, g.GICD_ISACTIVER + 4) == 0


def test_dir_ignored_without_eoimode(gic2: Gic) -> None:
    dwrite(gic2, g.GICD_ISACTIVER + 4, 1 << 1)
    cwrite(gic2, g.GICC_DIR, UART_ID)
    assert dread(gic2, g.GICD_ISACTIVER + 4) == 1 << 1


def test_active_interrupt_not_reselected(gic2: Gic) -> None:
    enable_all(gic2)
    enable_irq(gic2, UART_ID)
    set_target(gic2, UART_ID, 1)
    dwrite(gic2, g.GICD_ISACTIVER + 4, 1 << 1)
    gic2.set_spi(UART_SPI, True)
    assert not gic2.pending_for(0)
    dwrite(gic2, g.GICD_ICACTIVER + 4, 1 << 1)
    assert gic2.pending_for(0)


# --------------------------------------------------------------------------------------------- SGIs


@pytest.mark.parametrize(
    ("sender", "sgir", "targets"),
    [
        (0, (0 << 24) | (0x2 << 16) | 5, {1}),  # target list
        (0, (0 << 24) | (0x3 << 16) | 5, {0, 1}),
        (0, (0 << 24) | (0x0 << 16) | 5, set()),
        (0, (1 << 24) | 5, {1}),  # all but self
        (1, (1 << 24) | 5, {0}),
        (1, (2 << 24) | 5, {1}),  # self only
        (0, (3 << 24) | 5, {0, 1}),  # reserved filter: QEMU sends to all
    ],
)
def test_sgir_target_filters_and_source_in_iar(gic2: Gic, sender: int, sgir: int, targets: set[int]) -> None:
    enable_all(gic2)
    dwrite(gic2, g.GICD_SGIR, sgir, cpu=sender)
    for cpu in range(2):
        assert gic2.pending_for(cpu) is (cpu in targets)
        expected = (5 | (sender << 10)) if cpu in targets else 1023
        assert cread(gic2, g.GICC_IAR, cpu) == expected


def test_sgi_pending_per_source_cpu() -> None:
    gic = Gic(4)
    enable_all(gic)
    dwrite(gic, g.GICD_SGIR, (1 << 16) | 3, cpu=2)
    dwrite(gic, g.GICD_SGIR, (1 << 16) | 3, cpu=1)
    assert dread(gic, g.GICD_SPENDSGIR, cpu=0) == (0b0110 << 24)  # SGI 3 byte: sources 1 and 2
    assert cread(gic, g.GICC_IAR) == 3 | (1 << 10)  # lowest source first
    cwrite(gic, g.GICC_EOIR, 3 | (1 << 10))
    assert cread(gic, g.GICC_IAR) == 3 | (2 << 10)
    cwrite(gic, g.GICC_EOIR, 3 | (2 << 10))
    assert cread(gic, g.GICC_IAR) == 1023


def test_sgir_byte_write_ignored(gic2: Gic) -> None:
    enable_all(gic2)
    dwrite(gic2, g.GICD_SGIR, 5, size=1)
    assert not gic2.pending_for(0)


def test_spendsgir_cpendsgir(gic2: Gic) -> None:
    enable_all(gic2)
    dwrite(gic2, g.GICD_SPENDSGIR + 4, 0x02, cpu=0, size=1)  # SGI 4 pending from CPU 1
    assert dread(gic2, g.GICD_ISPENDR, cpu=0) == 1 << 4
    assert dread(gic2, g.GICD_CPENDSGIR + 4, cpu=0, size=1) == 0x02
    assert dread(gic2, g.GICD_SPENDSGIR + 4, cpu=1, size=1) == 0
    dwrite(gic2, g.GICD_CPENDSGIR + 4, 0x02, cpu=0, size=1)
    assert dread(gic2, g.GICD_ISPENDR, cpu=0) == 0
    assert not gic2.pending_for(0)


def test_sgi_priority_banked(gic2: Gic) -> None:
    enable_all(gic2, pmr=0x80)
    set_prio(gic2, 1, 0xC0, cpu=1)  # CPU 1 masks SGI 1 via its own priority
    dwrite(gic2, g.GICD_SGIR, (0x3 << 16) | 1)
    assert gic2.pending_for(0) and not gic2.pending_for(1)


# ----------------------------------------------------------------------------------- change hook


def test_on_irq_change_and_generation() -> None:
    seen: list[tuple[int, bool]] = []
    gic = Gic(2, on_irq_change=lambda cpu, level: seen.append((cpu, level)))
    enable_all(gic)
    enable_irq(gic, TIMER_PPI, cpu=1)
    gen = gic.generation
    gic.set_ppi(1, TIMER_PPI, True)
    assert seen == [(1, True)] and gic.generation == gen + 1
    gic.set_ppi(1, TIMER_PPI, True)  # no change, no call
    assert seen == [(1, True)]
    cread(gic, g.GICC_IAR, cpu=1)
    assert seen == [(1, True), (1, False)]


def test_hook_may_call_back_into_gic() -> None:
    answers: list[bool] = []
    gic = Gic(1)
    gic.on_irq_change = lambda cpu, level: answers.append(gic.pending_for(cpu))
    enable_all(gic)
    enable_irq(gic, UART_ID)
    gic.set_spi(UART_SPI, True)
    assert answers == [True]


def test_reset_restores_state() -> None:
    gic = Gic(1)
    enable_all(gic)
    enable_irq(gic, UART_ID)
    gic.set_spi(UART_SPI, True)
    assert gic.pending_for(0)
    gic.reset()
    assert not gic.pending_for(0)
    assert dread(gic, g.GICD_CTLR) == 0 and cread(gic, g.GICC_PMR) == 0


def test_uniprocessor_spis_target_cpu0() -> None:
    gic = Gic(1)
    enable_all(gic)
    enable_irq(gic, UART_ID)
    set_target(gic, UART_ID, 0x2)  # RAZ/WI on a uniprocessor GIC: still routed to CPU 0
    gic.set_spi(UART_SPI, True)
    assert cread(gic, g.GICC_IAR) == UART_ID


def test_concurrent_lines_and_acks_stay_consistent() -> None:
    gic = Gic(2)
    enable_all(gic)
    for irq in range(40, 48):
        enable_irq(gic, irq)
        set_target(gic, irq, 1)
        set_edge(gic, irq, True)
    taken: list[int] = []

    def device() -> None:
        for _ in range(200):
            for irq in range(40, 48):
                gic.set_spi(irq - 32, True)
                gic.set_spi(irq - 32, False)

    def vcpu() -> None:
        for _ in range(2000):
            irq = cread(gic, g.GICC_IAR)
            if irq != 1023:
                taken.append(irq)
                cwrite(gic, g.GICC_EOIR, irq)

    threads = [threading.Thread(target=device), threading.Thread(target=vcpu)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert taken and set(taken) <= set(range(40, 48))
    assert cread(gic, g.GICC_RPR) == 0xFF


def test_an_output_raised_while_a_lowering_is_delivered_reaches_the_cpu_last() -> None:
    """The vCPU thread acknowledges (output falls) and, before it has told the CPU, the ticker raises a timer PPI
    of higher priority (output rises): the CPU must end with the line high, as the GIC has it. Delivered in the
    order computed, it ended low, and EDK2 slept in WFI forever with its timer interrupt pending."""
    seen: list[bool] = []
    raiser: list[threading.Thread] = []

    def listener(cpu: int, level: bool) -> None:
        if not level and not raiser:
            # The acknowledge's lowering is on its way: the timer fires now, from another thread.
            raiser.append(threading.Thread(target=gic.set_ppi, args=(0, TIMER_PPI, True)))
            raiser[0].start()
            raiser[0].join(0.5)  # it must wait for this delivery, or its own would be overtaken by it
        seen.append(level)

    gic = Gic(1)
    enable_all(gic)
    for irq, prio in ((VTIMER_PPI, 0x80), (TIMER_PPI, 0x00)):
        enable_irq(gic, irq)
        set_prio(gic, irq, prio)
    gic.set_ppi(0, VTIMER_PPI, True)
    gic.on_irq_change = listener
    assert cread(gic, g.GICC_IAR) == VTIMER_PPI  # running priority 0x80: the output falls
    raiser[0].join(5)
    assert gic.pending_for(0)
    assert seen and seen[-1] is True, f"deliveries {seen}: the CPU's line is left low under a GIC output that is high"
