"""A device that raises its interrupt line when asked (``irq-probe``), for measuring interrupt latency.

Nothing like it exists on a real board. It is the smallest device that speaks first: the guest asks for an
interrupt, and the device raises its line later from a thread of its own, never inside the guest's access. So
the change travels the way a received byte or a finished DMA does (the device-initiated stream over gRPC), and
``mmiosplit loadtest --irq`` can time it from the raise to the guest's handler and to its EOI.

Registers (32-bit, little-endian, aligned), from the device's base:

======  ======  =============================================================================================
0x00    FIRE    write: raise line 0 DELAY microseconds from now, on the device's thread (a FIRE while one is
                waiting replaces it)
0x04    ACK     write: lower line 0
0x08    DELAY   read/write: the delay of FIRE in microseconds, 0-1000000 (default 0: at once)
0x0C    COUNT   read: times the line was raised since reset
0x10    LEVEL   read: 1 while line 0 is high
======  ======  =============================================================================================

Line 0 ("irq") is level-triggered: it stays high until ACK is written.
"""

from __future__ import annotations

import threading
import time

from device_service.model import AccessError, AccessResult, DeviceModel, LineSpec, RegionSpec, check_span

FIRE, ACK, DELAY, COUNT, LEVEL = 0x00, 0x04, 0x08, 0x0C, 0x10
REGION_SIZE = 0x1000
MAX_DELAY_US = 1_000_000
#: The raising thread ends after this long without a FIRE (a new FIRE starts it again).
IDLE_S = 1.0


class IrqProbe(DeviceModel):
    """Raises its line on its own thread, DELAY microseconds after each FIRE; ACK lowers it."""

    type_name = "irq-probe"
    compatible = ("mmiosplit,irq-probe",)

    def __init__(self, name: str, base: int) -> None:
        super().__init__(name, base)
        self.delay_us = 0
        self.count = 0
        self._due: float | None = None  # perf_counter time of the scheduled raise
        self._wake = threading.Condition(self.lock)
        self._thread: threading.Thread | None = None

    def regions(self) -> list[RegionSpec]:
        return [RegionSpec("regs", 0, REGION_SIZE)]

    def lines(self) -> list[LineSpec]:
        return [LineSpec(0, "irq")]

    def reset(self) -> None:
        with self.lock:
            self.delay_us = 0
            self.count = 0
            self._due = None
            self.irq_lines[0].set(False)

    def read(self, offset: int, size: int) -> AccessResult:
        error = self._check(offset, size, "read")
        if error is not None:
            return error
        if offset == DELAY:
            return AccessResult.success(self.delay_us)
        if offset == COUNT:
            return AccessResult.success(self.count & 0xFFFF_FFFF)
        if offset == LEVEL:
            return AccessResult.success(int(self.irq_lines[0].level))
        if offset in (FIRE, ACK):
            return AccessResult.success(0)
        return AccessResult.failure(AccessError.INVALID_REGISTER, f"no register at {offset:#x}")

    def write(self, offset: int, size: int, value: int) -> AccessResult:
        error = self._check(offset, size, "write")
        if error is not None:
            return error
        if offset == FIRE:
            self._fire()
        elif offset == ACK:
            self.irq_lines[0].set(False)
        elif offset == DELAY:
            if value > MAX_DELAY_US:
                return AccessResult.failure(AccessError.DEVICE_FAULT,
                                            f"DELAY {value} us is more than {MAX_DELAY_US} (one second)")
            self.delay_us = value
        elif offset not in (COUNT, LEVEL):
            return AccessResult.failure(AccessError.INVALID_REGISTER, f"no register at {offset:#x}")
        return AccessResult.success()

    @staticmethod
    def _check(offset: int, size: int, what: str) -> AccessResult | None:
        error = check_span(offset, size, REGION_SIZE, what)
        if error is not None:
            return error
        if size != 4 or offset % 4:
            return AccessResult.failure(AccessError.INVALID_ACCESS_SIZE,
                                        f"registers take aligned 4-byte {what}s, not {size} bytes at {offset:#x}")
        return None

    def _fire(self) -> None:
        """Schedule the raise (the caller holds the lock: an access, or a test)."""
        with self.lock:
            self._due = time.perf_counter() + self.delay_us / 1e6
            if self._thread is None:
                self._thread = threading.Thread(target=self._raiser, name=f"{self.name}-irq", daemon=True)
                self._thread.start()
            else:
                self._wake.notify()

    def _raiser(self) -> None:
        """Raise the line when a FIRE is due; end after IDLE_S with nothing to do."""
        with self.lock:
            idle_since = time.perf_counter()
            while True:
                now = time.perf_counter()
                due = self._due
                if due is None:
                    if now - idle_since >= IDLE_S:
                        self._thread = None
                        return
                    self._wake.wait(IDLE_S)
                    continue
                if due > now:
                    self._wake.wait(due - now)
                    continue
                self._due = None
                self.count += 1
                self.irq_lines[0].set(True)
                idle_since = time.perf_counter()
