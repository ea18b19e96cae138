"""The ARM generic timer of one vCPU, as QEMU models it, as a pure model (no Unicorn).

Unicorn 2.1.4 keeps QEMU's timer registers but compiles out the writes to CNT[PV]_CTL and CNT[PV]_CVAL and the
timer that raises the interrupt (``#if 0`` in ``qemu/target/arm/helper.c``). The vcpu service therefore traps the
guest's system-register accesses (see ``docs/timer-hooks.md``) and answers them from this model, which also says
what level each timer drives onto its PPI and when that level next changes, so a vCPU asleep in WFI knows when
to wake.

Facts followed (QEMU ``target/arm/helper.c`` ``gt_*``, ``target/arm/cpu.c`` ``gt_cntfrq_period_ns``):

- the counter is ``ns // 16`` (``GTIMER_SCALE`` 16 ns, so ``CNTFRQ`` 62.5 MHz), read through an injected clock;
- ``CNTVCT = CNTPCT - CNTVOFF`` (unsigned 64-bit); ``CNTVOFF`` is 0 unless set;
- ``CTL`` writes keep only bits 0-1 (ENABLE, IMASK); ISTATUS (bit 2) is read-only and set only while enabled
  and ``count - offset >= CVAL`` (unsigned 64-bit compare);
- ``TVAL`` reads ``(u32)(CVAL - (count - offset))``; writes set ``CVAL = count - offset + sext32(value)``;
- the output is ``ENABLE and ISTATUS and not IMASK``: PPI 30 (INTID 30) for the physical timer, PPI 27 for the
  virtual one, as on QEMU's ``virt``.

Register names are the AArch64 ones; ``REGISTERS`` maps each to its AArch64 encoding and the AArch32 CP15
encoding of the same register.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

GTIMER_SCALE_NS = 16
"""Nanoseconds per counter tick (QEMU ``GTIMER_SCALE``)."""
CNTFRQ_HZ = 1_000_000_000 // GTIMER_SCALE_NS
"""62.5 MHz, QEMU's reset value of CNTFRQ (``gt_cntfrq_hz``) for the CPUs of ``virt`` (cortex-a15/a57/a53/a72)."""

PHYS_TIMER_INTID = 30
"""Non-secure EL1 physical timer: PPI 30 (the device tree's PPI 14)."""
VIRT_TIMER_INTID = 27
"""Virtual timer: PPI 27 (the device tree's PPI 11)."""

CTL_ENABLE = 1 << 0
CTL_IMASK = 1 << 1
CTL_ISTATUS = 1 << 2

MASK64 = (1 << 64) - 1
MASK32 = (1 << 32) - 1

Clock = Callable[[], int]
"""A time source: returns nanoseconds, never going backwards."""


def host_clock() -> int:
    """Host monotonic nanoseconds: the default, as Unicorn's ``qemu_clock_get_ns`` uses the host clock."""
    return time.monotonic_ns()


class InstructionClock:
    """A deterministic clock for reproducible runs: time is instructions retired times a fixed cost.

    The vCPU loop calls ``advance`` with the instructions it ran; a vCPU asleep in WFI jumps ahead with
    ``advance_to`` to the timer's deadline instead of waiting, so two runs see the same counter values.
    """

    def __init__(self, ns_per_insn: int = 1) -> None:
        if ns_per_insn <= 0:
            raise ValueError("ns_per_insn must be positive")
        self.ns_per_insn = ns_per_insn
        self.instructions = 0
        self._skipped_ns = 0

    def __call__(self) -> int:
        """Nanoseconds so far."""
        return self.instructions * self.ns_per_insn + self._skipped_ns

    def advance(self, instructions: int) -> None:
        """Count instructions that ran."""
        if instructions < 0:
            raise ValueError("the clock never goes backwards")
        self.instructions += instructions

    def advance_to(self, ns: int) -> None:
        """Jump forward to ``ns`` (idle time, as in WFI); no-op if already past it."""
        now = self()
        if ns > now:
            self._skipped_ns += ns - now


def _sext32(value: int) -> int:
    value &= MASK32
    return value - (1 << 32) if value & (1 << 31) else value


class Timer:
    """One timer (physical or virtual): CTL, CVAL, TVAL and the level it drives."""

    def __init__(self, owner: GenericTimer, name: str, intid: int, virtual: bool) -> None:
        self._owner = owner
        self.name = name
        self.intid = intid
        self.virtual = virtual
        self.ctl_bits = 0  # ENABLE and IMASK only; ISTATUS is computed
        self.cval = 0

    def _offset(self) -> int:
        return self._owner.cntvoff if self.virtual else 0

    def count(self) -> int:
        """This timer's view of the counter: CNTPCT, or CNTVCT for the virtual timer."""
        return (self._owner.cntpct() - self._offset()) & MASK64

    @property
    def enabled(self) -> bool:
        """CTL.ENABLE."""
        return bool(self.ctl_bits & CTL_ENABLE)

    @property
    def masked(self) -> bool:
        """CTL.IMASK."""
        return bool(self.ctl_bits & CTL_IMASK)

    def istatus(self) -> bool:
        """CTL.ISTATUS: the condition met, and only while enabled (QEMU ``gt_recalc_timer`` clears it when disabled)."""
        return self.enabled and self.count() >= self.cval

    def level(self) -> bool:
        """The output line: ENABLE and ISTATUS and not IMASK."""
        return self.istatus() and not self.masked

    def read_ctl(self) -> int:
        """CNTx_CTL: ENABLE, IMASK and the live ISTATUS."""
        return self.ctl_bits | (CTL_ISTATUS if self.istatus() else 0)

    def write_ctl(self, value: int) -> None:
        """CNTx_CTL: only ENABLE and IMASK are writable (QEMU ``deposit64(old, 0, 2, value)``)."""
        self.ctl_bits = value & (CTL_ENABLE | CTL_IMASK)
        self._owner.update()

    def read_cval(self) -> int:
        """CNTx_CVAL: the 64-bit compare value."""
        return self.cval

    def write_cval(self, value: int) -> None:
        """CNTx_CVAL."""
        self.cval = value & MASK64
        self._owner.update()

    def read_tval(self) -> int:
        """CNTx_TVAL: ``CVAL - count`` truncated to 32 bits (a signed value, returned zero-extended as QEMU does)."""
        return (self.cval - self.count()) & MASK32

    def write_tval(self, value: int) -> None:
        """CNTx_TVAL: ``CVAL = count + sext32(value)``; the count is this timer's (virtual or physical)."""
        self.cval = (self.count() + _sext32(value)) & MASK64
        self._owner.update()

    def next_deadline_ticks(self) -> int | None:
        """The counter value (in the physical count) at which the output next rises, or None if it cannot on its own.

        None when disabled, masked, or already asserted: then only a register write changes the output (QEMU
        arms no timer for the first, and for the last waits for a 64-bit wrap). A masked timer's ISTATUS still
        rises at CVAL, but nothing sleeping on the interrupt cares.

        "Asserted" is the level last reported through ``on_level``, not the condition now: a deadline that passed
        since the last ``update`` is still returned (in the past), so whoever sleeps on it updates at once. Judged
        by the live condition, the clock passing CVAL between an ``update`` and this call left the line low with
        nothing to wait for, and a vCPU in WFI slept forever (EDK2 hung so in CI).
        """
        if not self.enabled or self.masked or self._owner.reported_high(self.intid):
            return None
        return (self.cval + self._offset()) & MASK64


@dataclass(frozen=True)
class RegInfo:
    """Where one timer register lives in both instruction sets.

    ``aa64`` is ``(op0, op1, CRn, CRm, op2)`` for MRS/MSR. ``aa32`` is ``(opc1, CRn, CRm, opc2)`` for MRC/MCR p15,
    or ``(opc1, CRm)`` for MRRC/MCRR p15 when ``aa32_64bit``. ``writable`` is False for the counters.
    """

    name: str
    aa64: tuple[int, int, int, int, int]
    aa32: tuple[int, ...] | None
    aa32_64bit: bool
    writable: bool


REGISTERS: dict[str, RegInfo] = {
    r.name: r
    for r in (
        RegInfo("CNTFRQ_EL0", (3, 3, 14, 0, 0), (0, 14, 0, 0), False, True),
        RegInfo("CNTPCT_EL0", (3, 3, 14, 0, 1), (0, 14), True, False),
        RegInfo("CNTVCT_EL0", (3, 3, 14, 0, 2), (1, 14), True, False),
        RegInfo("CNTKCTL_EL1", (3, 0, 14, 1, 0), (0, 14, 1, 0), False, True),
        RegInfo("CNTP_TVAL_EL0", (3, 3, 14, 2, 0), (0, 14, 2, 0), False, True),
        RegInfo("CNTP_CTL_EL0", (3, 3, 14, 2, 1), (0, 14, 2, 1), False, True),
        RegInfo("CNTP_CVAL_EL0", (3, 3, 14, 2, 2), (2, 14), True, True),
        RegInfo("CNTV_TVAL_EL0", (3, 3, 14, 3, 0), (0, 14, 3, 0), False, True),
        RegInfo("CNTV_CTL_EL0", (3, 3, 14, 3, 1), (0, 14, 3, 1), False, True),
        RegInfo("CNTV_CVAL_EL0", (3, 3, 14, 3, 2), (3, 14), True, True),
        RegInfo("CNTVOFF_EL2", (3, 4, 14, 0, 3), (4, 14), True, True),
    )
}
"""The registers this model answers, by AArch64 name. AArch32 names drop ``_ELx`` (CNTP_CTL is p15,0,c14,c2,1)."""

BY_AA64: dict[tuple[int, int, int, int, int], str] = {r.aa64: r.name for r in REGISTERS.values()}
"""``(op0, op1, CRn, CRm, op2)`` → name, for an MRS/MSR hook (Unicorn's ``uc_arm64_cp_reg`` carries these)."""
BY_AA32: dict[tuple[int, ...], str] = {r.aa32: r.name for r in REGISTERS.values() if r.aa32 is not None}
"""``(opc1, CRn, CRm, opc2)`` (MRC/MCR) or ``(opc1, CRm)`` (MRRC/MCRR) on p15 → name."""


class GenericTimer:
    """The generic timer of one vCPU: the counters, the physical and virtual timers, their PPI levels.

    ``on_level(intid, level)`` is called whenever an output changes, seen at a register write or at ``update``;
    the vCPU loop calls ``update`` when time may have passed a deadline (between slices, on waking from WFI).
    """

    def __init__(
        self,
        clock: Clock = host_clock,
        on_level: Callable[[int, bool], None] | None = None,
        cntfrq: int = CNTFRQ_HZ,
    ) -> None:
        self.clock = clock
        self.on_level = on_level
        self.reset_cntfrq = cntfrq & MASK32
        self.phys = Timer(self, "CNTP", PHYS_TIMER_INTID, virtual=False)
        self.virt = Timer(self, "CNTV", VIRT_TIMER_INTID, virtual=True)
        self.reset()

    def reset(self) -> None:
        """Counter back to 0 (QEMU's virtual clock starts with the machine), timers disabled, CNTVOFF 0."""
        self.epoch_ns = self.clock()
        self.cntfrq = self.reset_cntfrq
        self.cntkctl = 0
        self.cntvoff = 0
        for t in (self.phys, self.virt):
            t.ctl_bits = 0
            t.cval = 0
        self._levels = {PHYS_TIMER_INTID: False, VIRT_TIMER_INTID: False}
        self.update()

    @property
    def timers(self) -> tuple[Timer, Timer]:
        """Physical, then virtual."""
        return (self.phys, self.virt)

    # ----- the counters -------------------------------------------------------------------------------------
    def cntpct(self) -> int:
        """CNTPCT: elapsed ns since reset divided by 16, as QEMU's ``gt_get_countervalue``."""
        return ((self.clock() - self.epoch_ns) // GTIMER_SCALE_NS) & MASK64

    def cntvct(self) -> int:
        """CNTVCT = CNTPCT - CNTVOFF (``gt_virt_cnt_read``; the EL2 E2H/TGE cases are not modelled)."""
        return (self.cntpct() - self.cntvoff) & MASK64

    def ticks_to_ns(self, ticks: int) -> int:
        """The clock value at which the physical counter reaches ``ticks`` (the first ns of that tick)."""
        return self.epoch_ns + ticks * GTIMER_SCALE_NS

    # ----- levels and deadlines -----------------------------------------------------------------------------
    def levels(self) -> dict[int, bool]:
        """The output of each timer by INTID, as of now."""
        return {t.intid: t.level() for t in self.timers}

    def reported_high(self, intid: int) -> bool:
        """Whether the output of ``intid`` was last reported high (through ``on_level``, or to ``update``'s caller)."""
        return self._levels.get(intid, False)

    def update(self) -> dict[int, bool]:
        """Recompute the outputs and report the ones that changed through ``on_level``; returns all levels."""
        now = self.levels()
        for intid, level in now.items():
            if self._levels.get(intid) != level:
                self._levels[intid] = level
                if self.on_level is not None:
                    self.on_level(intid, level)
        return now

    def next_deadline_ticks(self) -> int | None:
        """The physical count at which some output next rises on its own, or None: what a WFI sleeper waits for."""
        ticks = [d for d in (t.next_deadline_ticks() for t in self.timers) if d is not None]
        return min(ticks) if ticks else None

    def next_deadline(self) -> int | None:
        """The clock value (ns) of ``next_deadline_ticks``, or None: for a sleep or ``InstructionClock.advance_to``."""
        ticks = self.next_deadline_ticks()
        return None if ticks is None else self.ticks_to_ns(ticks)

    # ----- register access by name and by encoding ----------------------------------------------------------
    def read(self, name: str) -> int:
        """Read a register by its AArch64 name (see ``REGISTERS``)."""
        match name:
            case "CNTFRQ_EL0":
                return self.cntfrq
            case "CNTPCT_EL0":
                return self.cntpct()
            case "CNTVCT_EL0":
                return self.cntvct()
            case "CNTKCTL_EL1":
                return self.cntkctl
            case "CNTVOFF_EL2":
                return self.cntvoff
        timer, field = self._split(name)
        if field == "CTL":
            return timer.read_ctl()
        if field == "CVAL":
            return timer.read_cval()
        return timer.read_tval()

    def write(self, name: str, value: int) -> None:
        """Write a register by its AArch64 name; writes to the counters are refused (they are read-only)."""
        info = REGISTERS.get(name)
        if info is None:
            raise KeyError(name)
        if not info.writable:
            raise ValueError(f"{name} is read-only")
        match name:
            case "CNTFRQ_EL0":
                # Reads-as-written for software; the tick rate does not change (QEMU's comment on CNTFRQ).
                self.cntfrq = value & MASK32
                return
            case "CNTKCTL_EL1":
                self.cntkctl = value & MASK32
                return
            case "CNTVOFF_EL2":
                self.cntvoff = value & MASK64
                self.update()
                return
        timer, field = self._split(name)
        if field == "CTL":
            timer.write_ctl(value)
        elif field == "CVAL":
            timer.write_cval(value)
        else:
            timer.write_tval(value)

    def _split(self, name: str) -> tuple[Timer, str]:
        if name not in REGISTERS:
            raise KeyError(name)
        prefix, field, _el = name.split("_")
        return (self.phys if prefix == "CNTP" else self.virt), field

    @staticmethod
    def name_aa64(op0: int, op1: int, crn: int, crm: int, op2: int) -> str | None:
        """The register an MRS/MSR names, or None if it is not a timer register this model answers."""
        return BY_AA64.get((op0, op1, crn, crm, op2))

    @staticmethod
    def name_aa32(opc1: int, crn: int, crm: int, opc2: int) -> str | None:
        """The register an MRC/MCR p15 names (32-bit view), or None."""
        return BY_AA32.get((opc1, crn, crm, opc2))

    @staticmethod
    def name_aa32_64(opc1: int, crm: int) -> str | None:
        """The register an MRRC/MCRR p15 names (64-bit view), or None."""
        return BY_AA32.get((opc1, crm))
