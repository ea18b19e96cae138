"""What makes a vCPU's interrupts happen in time: its generic timer behind a lock, and one ticker thread per VM.

The GIC (``gic.py``) decides what each CPU interface signals; the vCPU loop (``vcpu.py``) takes the IRQ at an
instruction boundary. Between them two things need a clock rather than an access:

* a timer's output rises when the counter passes CVAL, with no instruction touching anything; and
* a vCPU whose IRQ is signalled but masked (PSTATE.I / CPSR.I) unmasks it with an instruction no hook sees
  (``MSR DAIFClr``, ``CPSIE``, an exception return), so it must come back to the loop now and then to look.

``Ticker`` does both: it sleeps until the earliest timer deadline of its VM's vCPUs, or a few milliseconds
while some running vCPU has its IRQ signalled, then updates the timers (which drive PPIs 27 and 30 on the
GIC) and kicks such vCPUs, so they stop at the next block boundary and take the interrupt there.
Architecturally an unmasked interrupt need only be taken in finite time (an ISB makes it immediate; an
exit, a WFI or a GIC access brings the vCPU back to the loop at once).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from vcpu_service.gentimer import GenericTimer

#: How often a running vCPU whose IRQ is signalled but masked comes back to the loop to look again.
MASKED_POLL_S = 0.002


class TimerLines(Protocol):
    """Where a timer's outputs go: the GIC's per-CPU PPI inputs."""

    def set_ppi(self, cpu: int, irq: int, level: bool) -> None: ...


class VcpuTimer:
    """One vCPU's generic timer, shared by its thread (MRS/MSR hooks) and the ticker (deadlines).

    Level changes are collected and driven onto the GIC under the timer's lock, in the order they happened."""

    def __init__(self, cpu: int, lines: TimerLines, clock: Callable[[], int], on_change: Callable[[], None]) -> None:
        self.cpu = cpu
        self._lines = lines
        self._lock = threading.Lock()
        self._changes: list[tuple[int, bool]] = []
        self._on_change = on_change  # the ticker's reschedule: a deadline may have moved
        self.model = GenericTimer(clock=clock, on_level=self._collect)

    def _collect(self, intid: int, level: bool) -> None:
        self._changes.append((intid, level))

    def _drive(self) -> None:
        """Deliver collected changes; called with the lock held. Two threads driving one after the other could
        deliver their changes in the wrong order and leave the GIC's line low under a model that says high.
        The GIC and the vCPU it signals never call back into the timer, so this lock nests in nothing."""
        changes, self._changes = self._changes, []
        for intid, level in changes:
            self._lines.set_ppi(self.cpu, intid, level)

    def read(self, name: str) -> int:
        """An MRS/MRC of a timer register (by its AArch64 name)."""
        with self._lock:
            return self.model.read(name)

    def write(self, name: str, value: int) -> None:
        """An MSR/MCR of a timer register; the output may change at once, and the deadline moves."""
        with self._lock:
            self.model.write(name, value)
            self.model.update()
            self._drive()
        self._on_change()

    def poll(self) -> int | None:
        """Time may have passed a deadline: recompute the outputs; returns the next deadline (``deadline_ns``).

        Both under one lock: a deadline read after the time passed it, with no update between, would be None
        (the model counts a fired timer as having nothing to wait for) and the line would never rise."""
        with self._lock:
            self.model.update()
            self._drive()
            return self.model.next_deadline()

    def deadline_ns(self) -> int | None:
        """The clock value at which an output next rises on its own, or None."""
        with self._lock:
            return self.model.next_deadline()

    def reset(self) -> None:
        """A CPU reset (power-on, PSCI CPU_ON, system reset): timers disabled; the counter keeps counting."""
        with self._lock:
            for timer in self.model.timers:
                timer.write_ctl(0)
            self.model.update()  # lowers a line the reset is about to forget it drove
            self._drive()
            epoch = self.model.epoch_ns
            self.model.reset()
            self.model.epoch_ns = epoch  # the system counter is the board's, not the CPU's
            self.model.update()
            self._drive()
        self._on_change()


class Tickable(Protocol):
    """What the ticker needs of a vCPU."""

    @property
    def timer(self) -> VcpuTimer | None: ...

    def needs_irq_poll(self) -> bool:
        """Running with its IRQ signalled (masked, or not yet seen): kick it so the loop looks."""
        ...

    def kick(self) -> None: ...


class Ticker:
    """One thread per VM that fires timer deadlines and brings back vCPUs with a signalled IRQ."""

    def __init__(self, name: str, clock: Callable[[], int]) -> None:
        self._clock = clock
        self._cond = threading.Condition(threading.Lock())
        self._vcpus: Sequence[Tickable] = ()
        self._stopping = False
        self._dirty = False
        self._thread = threading.Thread(target=self._run, name=f"ticker-{name}", daemon=True)

    def start(self, vcpus: Sequence[Tickable]) -> None:
        self._vcpus = tuple(vcpus)
        self._thread.start()

    def reschedule(self) -> None:
        """A deadline moved or an IRQ was signalled: look again now (any thread, no lock held)."""
        with self._cond:
            self._dirty = True
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            deadlines = [d for v in self._vcpus if v.timer is not None and (d := v.timer.poll()) is not None]
            for v in self._vcpus:
                if v.needs_irq_poll():
                    v.kick()
            polling = any(v.needs_irq_poll() for v in self._vcpus)
            now = self._clock()
            timeout: float | None = None
            if deadlines:
                timeout = max(0.0, (min(deadlines) - now) / 1e9)
            if polling:
                timeout = MASKED_POLL_S if timeout is None else min(timeout, MASKED_POLL_S)
            with self._cond:
                if self._stopping:
                    return
                if not self._dirty and (timeout is None or timeout > 0):
                    self._cond.wait(timeout)
                self._dirty = False
                if self._stopping:
                    return
