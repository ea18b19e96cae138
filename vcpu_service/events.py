"""The VM event log: every event is kept, so a client that attaches late still sees the whole run."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

from vcpu_service.domain import ErrorKind, EventKind, VmEvent


class EventLog:
    """Append-only list of VmEvents with a condition variable for streaming readers."""

    def __init__(self) -> None:
        self._events: list[VmEvent] = []
        self._cond = threading.Condition()
        self._t0 = time.monotonic()

    def restart_clock(self) -> None:
        self._t0 = time.monotonic()

    def emit(self, kind: EventKind, reason: str = "", *, vcpu_id: int = 0,
             error_kind: ErrorKind = ErrorKind.UNSPECIFIED, pc: int = 0, fault_address: int = 0, syndrome: int = 0,
             instruction: int = 0, device: str = "") -> VmEvent:
        with self._cond:
            event = VmEvent(len(self._events) + 1, kind, time.monotonic() - self._t0, reason, vcpu_id, error_kind,
                            pc, fault_address, syndrome, instruction, device)
            self._events.append(event)
            self._cond.notify_all()
        return event

    @property
    def final(self) -> VmEvent | None:
        with self._cond:
            for e in reversed(self._events):
                if e.kind.final:
                    return e
        return None

    def wait_final(self, timeout: float) -> VmEvent | None:
        """Block until a final event is emitted (or timeout); returns it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for e in reversed(self._events):
                    if e.kind.final:
                        return e
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def snapshot(self) -> list[VmEvent]:
        with self._cond:
            return list(self._events)

    def follow(self, alive: Callable[[], bool], poll_s: float = 0.25) -> Iterator[VmEvent]:
        """Yield every event from the first, waiting for new ones, until a final event or not alive()."""
        index = 0
        while True:
            with self._cond:
                while index >= len(self._events):
                    if not alive():
                        return
                    self._cond.wait(poll_s)
                batch = self._events[index:]
                index = len(self._events)
            for event in batch:
                yield event
                if event.kind.final:
                    return
