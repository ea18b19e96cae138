"""The exit trace of a VM: every exit, kept so a reader that attaches late still gets the whole run."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass


@dataclass(slots=True)
class ExitRecord:
    """One exit as the trace shows it."""

    seq: int
    vcpu: int
    pc: int
    isa: str
    instruction: int
    insn_len: int
    address: int
    size: int
    is_write: bool
    srt: int
    sign_extend: bool
    sixty_four: bool
    writeback: str
    value: int
    device: str
    outcome: str
    latency_ns: int
    syndrome: int


class TraceLog:
    """Every exit of a traced VM, in the order they completed."""

    def __init__(self) -> None:
        self._records: list[ExitRecord] = []
        self._cond = threading.Condition()
        self.closed = False

    def append(self, record: ExitRecord) -> None:
        with self._cond:
            record.seq = len(self._records) + 1
            self._records.append(record)
            if len(self._records) % 64 == 1:
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def follow(self, alive: Callable[[], bool], poll_s: float = 0.1) -> Iterator[list[ExitRecord]]:
        """Yield batches of records from the first until the log is closed and drained."""
        index = 0
        while True:
            with self._cond:
                if index >= len(self._records):
                    if self.closed or not alive():
                        return
                    self._cond.wait(poll_s)
                batch = self._records[index:]
                index += len(batch)
            if batch:
                yield batch
