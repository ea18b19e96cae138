"""ARM PrimeCell Real Time Clock (PL031).

Offsets and names follow the PL031 Technical Reference Manual (ARM DDI 0224);
behaviour follows QEMU's ``hw/rtc/pl031.c`` where firmware can see it:

* the counter runs from reset, counting seconds of host UTC time, and CR reads
  as 1 ("permanently enabled"): writing 1 to start it is accepted, and the
  manual's rule that a started RTC cannot be stopped makes writes of 0 no-ops;
* writing LR moves the counter to that value; it keeps running from there;
* the match interrupt is raised when the counter reaches MR (checked whenever
  RIS, MIS or ``irq_level`` is read, since there is no timer thread).

One difference, from the manual: LR reads back the last value written (QEMU
always reads 0 there).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from device_service.model import AccessResult, DeviceModel, RegionSpec
from device_service.registers import Register, RegisterBank, primecell_id_registers

CR_START = 1 << 0  # RTCCR: RTC start
INT_ALARM = 1 << 0  # RTCIMSC / RTCRIS / RTCMIS / RTCICR: match interrupt

#: RTCPeriphID0-3 and RTCPCellID0-3 (0xFE0-0xFFC), as QEMU's ``pl031_id``
#: (hw/rtc/pl031.c), so firmware that prints them matches QEMU.
PRIMECELL_ID = (0x31, 0x10, 0x14, 0x00, 0x0D, 0xF0, 0x05, 0xB1)

REGION_SIZE = 0x1000
COUNTER_MASK = 0xFFFF_FFFF


class Pl031(DeviceModel):
    """A PL031 RTC driven by a clock callable (host UTC seconds), so tests can use a fake clock."""

    type_name = "pl031"
    compatible = ("arm,pl031", "arm,primecell")

    def __init__(self, name: str, base: int, clock: Callable[[], float] = time.time) -> None:
        super().__init__(name, base)
        self.clock = clock
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

    def read(self, offset: int, size: int) -> AccessResult:
        return self.regs.read(offset, size)

    def write(self, offset: int, size: int, value: int) -> AccessResult:
        return self.regs.write(offset, size, value)

    def reset(self) -> None:
        """Registers to reset values; the counter goes back to host UTC time."""
        self.regs.reset()
        self.loaded_value = 0
        self.loaded_at = 0.0
        self.alarm_deadline = None

    # --- state ---------------------------------------------------------------------------

    def count(self) -> int:
        """The counter (RTCDR): whole seconds, wrapping at 32 bits."""
        return (self.loaded_value + math.floor(self.clock() - self.loaded_at)) & COUNTER_MASK

    def irq_level(self) -> bool:
        """The interrupt output RTCINTR."""
        return bool(self._read_mis())

    # --- register behaviour ------------------------------------------------------------------

    def _arm_alarm(self) -> None:
        """Work out when the counter reaches MR; it wraps, so a match in the past is 2**32 s away."""
        elapsed = math.floor(self.clock() - self.loaded_at)
        ticks = (self.regs["MR"] - self.loaded_value - elapsed) & COUNTER_MASK
        if ticks == 0:
            self.alarm_deadline = None
            self.regs["RIS"] |= INT_ALARM
        else:
            self.alarm_deadline = self.loaded_at + elapsed + ticks

    def _poll_alarm(self) -> None:
        if self.alarm_deadline is not None and self.clock() >= self.alarm_deadline:
            self.alarm_deadline = None
            self.regs["RIS"] |= INT_ALARM

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
