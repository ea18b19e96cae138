"""The VM event log: every event is kept, so a client that attaches late still sees the whole run."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

from mmiosplit.v1 import vcpu_pb2

FINAL_KINDS = frozenset({
    vcpu_pb2.VM_EVENT_KIND_HALTED,
    vcpu_pb2.VM_EVENT_KIND_POWERED_OFF,
    vcpu_pb2.VM_EVENT_KIND_ERROR,
    vcpu_pb2.VM_EVENT_KIND_BUDGET_EXHAUSTED,
    vcpu_pb2.VM_EVENT_KIND_TIMED_OUT,
    vcpu_pb2.VM_EVENT_KIND_STOPPED,
})


def kind_name(kind: int) -> str:
    """``VM_EVENT_KIND_POWERED_OFF`` -> ``powered_off``."""
    return str(vcpu_pb2.VmEventKind.Name(kind)).removeprefix("VM_EVENT_KIND_").lower()  # type: ignore[arg-type]


class EventLog:
    """Append-only list of VmEvents with a condition variable for streaming readers."""

    def __init__(self) -> None:
        self._events: list[vcpu_pb2.VmEvent] = []
        self._cond = threading.Condition()
        self._t0 = time.monotonic()

    def restart_clock(self) -> None:
        self._t0 = time.monotonic()

    def emit(self, kind: int, **fields: object) -> vcpu_pb2.VmEvent:
        with self._cond:
            event = vcpu_pb2.VmEvent(seq=len(self._events) + 1, kind=kind,  # type: ignore[arg-type]
                                     time=time.monotonic() - self._t0, **fields)  # type: ignore[arg-type]
            self._events.append(event)
            self._cond.notify_all()
        return event

    @property
    def final(self) -> vcpu_pb2.VmEvent | None:
        with self._cond:
            for e in reversed(self._events):
                if e.kind in FINAL_KINDS:
                    return e
        return None

    def wait_final(self, timeout: float) -> vcpu_pb2.VmEvent | None:
        """Block until a final event is emitted (or timeout); returns it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for e in reversed(self._events):
                    if e.kind in FINAL_KINDS:
                        return e
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def snapshot(self) -> list[vcpu_pb2.VmEvent]:
        with self._cond:
            return list(self._events)

    def follow(self, alive: Callable[[], bool], poll_s: float = 0.25) -> Iterator[vcpu_pb2.VmEvent]:
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
                if event.kind in FINAL_KINDS:
                    return

