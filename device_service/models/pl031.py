"""ARM PrimeCell Real Time Clock (PL031).

Offsets and names follow the PL031 Technical Reference Manual (ARM DDI 0224);
behaviour follows QEMU's ``hw/rtc/pl031.c`` where firmware can see it:

* the counter runs from reset, counting seconds of host UTC time, and CR reads
  as 1 ("permanently enabled"): writing 1 to start it is accepted, and the
  manual's rule that a started RTC cannot be stopped makes writes of 0 no-ops;
* writing LR moves the counter to that value; it keeps running from there;
* the match interrupt is raised when the counter reaches MR: a timer (QEMU's
  ``pl031_set_alarm``) fires then and drives the interrupt output RTCINTR
  (line 0, "rtcintr", level) to RIS & IMSC, which every register access
  updates too (QEMU's ``pl031_update``). The status is also checked whenever
  RIS or MIS is read, so a clock that jumps ahead is seen at once.

One difference, from the manual: LR reads back the last value written (QEMU
always reads 0 there).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Protocol

from device_service.model import AccessResult, DeviceModel, LineSpec, RegionSpec
from device_service.registers import Register, RegisterBank, primecell_id_registers

CR_START = 1 << 0  # RTCCR: RTC start
INT_ALARM = 1 << 0  # RTCIMSC / RTCRIS / RTCMIS / RTCICR: match interrupt

#: RTCPeriphID0-3 and RTCPCellID0-3 (0xFE0-0xFFC), as QEMU's ``pl031_id``
#: (hw/rtc/pl031.c), so firmware that prints them matches QEMU.
PRIMECELL_ID = (0x31, 0x10, 0x14, 0x00, 0x0D, 0xF0, 0x05, 0xB1)

REGION_SIZE = 0x1000
COUNTER_MASK = 0xFFFF_FFFF
#: The alarm timer sleeps at most this long, then looks again (a match can be 2**32 s away).
MAX_TIMER_S = 86_400.0


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


#: Runs a callable after a delay in seconds on another thread; returns something to cancel it with.
Scheduler = Callable[[float, Callable[[], None]], TimerHandle]


def thread_timer(delay: float, callback: Callable[[], None]) -> TimerHandle:
    """The default scheduler: a daemon ``threading.Timer``."""
    timer = threading.Timer(delay, callback)
    timer.daemon = True
    timer.name = "pl031-alarm"
    timer.start()
    return timer


class Pl031(DeviceModel):
    """A PL031 RTC driven by a clock callable (host UTC seconds) and a scheduler for its alarm, so tests can use
    a fake clock and fire the alarm themselves."""

    type_name = "pl031"
    compatible = ("arm,pl031", "arm,primecell")

    def __init__(self, name: str, base: int, clock: Callable[[], float] = time.time,
                 schedule: Scheduler = thread_timer) -> None:
        super().__init__(name, base)
        self.clock = clock
        self.schedule = schedule
        self._timer: TimerHandle | None = None
        self._timer_token = 0  # bumped whenever the alarm is re-armed or dropped: a stale timer does nothing
        #: The counter is ``loaded_value`` plus the whole seconds since ``loaded_at`` (clock time).
        #: Both are 0 after reset, so the counter is host UTC time; an LR write reloads them.
        self.loaded_value = 0
        self.loaded_at = 0.0
        #: Clock time at which the counter reaches MR, while a match is pending.
        self.alarm_deadline: float | None = None
        self.regs = RegisterBank(
            [
                Register("DR", 0x000, access="ro", on_read=self.count, volatile=True),
                Register("MR", 0x004, on_write=self._write_mr),
                Register("LR", 0x008, on_write=self._write_lr),
                Register("CR", 0x00C, reset=CR_START, mask=CR_START, on_write=self._write_cr),
                Register("IMSC", 0x010, mask=INT_ALARM),
                Register("RIS", 0x014, access="ro", on_read=self._read_ris, volatile=True),
                Register("MIS", 0x018, access="ro", on_read=self._read_mis, volatile=True),
                Register("ICR", 0x01C, access="wo", mask=INT_ALARM, on_write=self._write_icr),
                *primecell_id_registers(PRIMECELL_ID),
            ]
        )

    # --- DeviceModel -----------------------------------------------------------------------

    def regions(self) -> list[RegionSpec]:
        return [RegionSpec("regs", 0, REGION_SIZE, access_sizes=(1, 2, 4))]

    def lines(self) -> list[LineSpec]:
        return [LineSpec(0, "rtcintr")]

    def read(self, offset: int, size: int) -> AccessResult:
        result = self.regs.read(offset, size)
        self._update()
        return result

    def write(self, offset: int, size: int, value: int) -> AccessResult:
        result = self.regs.write(offset, size, value)
        self._update()
        return result

    def reset(self) -> None:
        """Registers to reset values; the counter goes back to host UTC time; no alarm, line low."""
        with self.lock:
            self.regs.reset()
            self.loaded_value = 0
            self.loaded_at = 0.0
            self._set_deadline(None)
            self._update()

    # --- state ---------------------------------------------------------------------------

    def count(self) -> int:
        """The counter (RTCDR): whole seconds, wrapping at 32 bits."""
        return (self.loaded_value + math.floor(self.clock() - self.loaded_at)) & COUNTER_MASK

    # --- the alarm -------------------------------------------------------------------------------

    def _update(self) -> None:
        """Drive RTCINTR to RIS & IMSC (QEMU's ``pl031_update``)."""
        self.irq_lines[0].set(bool(self.regs["RIS"] & self.regs["IMSC"]))

    def _set_deadline(self, deadline: float | None) -> None:
        """Arm the alarm timer for clock time ``deadline`` (None: drop it)."""
        self.alarm_deadline = deadline
        self._timer_token += 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            token = self._timer_token
            delay = min(max(0.0, deadline - self.clock()), MAX_TIMER_S)
            self._timer = self.schedule(delay, lambda: self._on_timer(token))

    def _on_timer(self, token: int) -> None:
        """The alarm timer fired (on its own thread): raise the match if it is due, else sleep again."""
        with self.lock:
            if token != self._timer_token:
                return  # re-armed or dropped meanwhile
            self._timer = None
            self._poll_alarm()
            if self.alarm_deadline is not None:  # woke early (the clocks differ) or a long wait: again
                self._set_deadline(self.alarm_deadline)
            self._update()

    def _arm_alarm(self) -> None:
        """Work out when the counter reaches MR; it wraps, so a match in the past is 2**32 s away."""
        elapsed = math.floor(self.clock() - self.loaded_at)
        ticks = (self.regs["MR"] - self.loaded_value - elapsed) & COUNTER_MASK
        if ticks == 0:
            self._set_deadline(None)
            self.regs["RIS"] |= INT_ALARM
        else:
            self._set_deadline(self.loaded_at + elapsed + ticks)

    def _poll_alarm(self) -> None:
        if self.alarm_deadline is not None and self.clock() >= self.alarm_deadline:
            self._set_deadline(None)
            self.regs["RIS"] |= INT_ALARM

    # --- register behaviour ------------------------------------------------------------------

    def _write_mr(self, old: int, new: int) -> None:
        self._arm_alarm()

    def _write_lr(self, old: int, new: int) -> None:
        self.loaded_value = new
        self.loaded_at = self.clock()
        self._arm_alarm()

    def _write_cr(self, old: int, new: int) -> None:
        self.regs["CR"] = old | new  # once started, only a reset stops the RTC

    def _read_ris(self) -> int:
        self._poll_alarm()
        return self.regs["RIS"]

    def _read_mis(self) -> int:
        return self._read_ris() & self.regs["IMSC"]

    def _write_icr(self, old: int, new: int) -> None:
        self.regs["RIS"] &= ~new
