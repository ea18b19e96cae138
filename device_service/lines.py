"""Interrupt lines and DMA on the device side: where a model's ``IrqLine.set`` and ``dma`` calls go.

``LineTracker`` connects every model's lines when the host is built. A change gets the next generation of this
service (one counter for all its devices) and then goes one of two ways:

* made by the thread that is answering an access (between the host's ``begin`` and ``end``): it is kept for that
  access's Completion, so the vCPU applies it before it runs on (QEMU's ``pl011_update`` inside the access);
* made any other way (a console byte, a timer, a model's own thread, a reset): it goes to every subscriber,
  the watch streams, at once.

Both carry levels "current as of generation G", so the vCPU side keeps per line the level of the highest
generation it saw and a late watch event never overrides a newer completion (or the other way round).

``HostDma`` is the handle a model gets as ``DeviceModel.dma`` while a VM grants this service windows: it names
the device on every request and hands it to the ``DmaTarget`` the transport provides (the VM's memory in
process, the watch stream over gRPC).

Thread-safe; lock order is the host's, then a model's, then the tracker's: a model may call ``set`` holding
its own lock, and subscribers are called under the tracker's lock, so they must only queue.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable

from device_service.bus import DeviceBus
from device_service.model import IrqLine
from mmiosplit.mmio import DmaError, DmaTarget, LineChange

LineListener = Callable[[LineChange], None]


class LineTracker:
    """The interrupt lines of one bus, their levels and generations, and who hears about changes."""

    def __init__(self, bus: DeviceBus, service: str) -> None:
        self.service = service
        self.generation = 0
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._subscribers: dict[int, LineListener] = {}
        self._levels: dict[tuple[str, int], bool] = {}
        self._times: dict[tuple[str, int], int] = {}  # line -> CLOCK_MONOTONIC ns of its last change
        # Thread id -> lines changed by the access that thread is answering.
        self._collecting: dict[int, set[tuple[str, int]]] = {}
        for device in bus.devices:
            for line in device.irq_lines:
                self._levels[(device.name, line.spec.index)] = line.level
                line.connect(self._on_change)

    @property
    def active(self) -> bool:
        """True when some device has a line."""
        return bool(self._levels)

    def level(self, device: str, index: int) -> bool:
        return self._levels[(device, index)]

    def _on_change(self, line: IrqLine, level: bool) -> None:
        key = (line.device, line.spec.index)
        now = time.monotonic_ns()
        with self._lock:
            self.generation += 1
            self._levels[key] = level
            self._times[key] = now
            bucket = self._collecting.get(threading.get_ident())
            if bucket is not None:
                bucket.add(key)
                return
            change = LineChange(self.service, self.generation, ((line.device, line.spec.index, level),), now)
            for callback in list(self._subscribers.values()):
                callback(change)

    def begin(self) -> None:
        """The calling thread starts answering an access: keep the changes it makes for that access's
        Completion instead of publishing them, until ``end``."""
        if self._levels:
            with self._lock:
                self._collecting[threading.get_ident()] = set()

    def end(self) -> tuple[LineChange, ...]:
        """Stop collecting for the calling thread: the current level of every line it changed since ``begin``,
        as of the current generation (empty when it changed none)."""
        if not self._levels:
            return ()
        with self._lock:
            changed = self._collecting.pop(threading.get_ident(), None)
            if not changed:
                return ()
            return (LineChange(self.service, self.generation,
                               tuple((d, i, self._levels[(d, i)]) for d, i in sorted(changed)),
                               max(self._times[key] for key in changed)),)

    def subscribe(self, callback: LineListener) -> Callable[[], None]:
        """Call ``callback`` with every line's level now (when there are lines), then with each change not
        made by an access; returns the unsubscriber. No change can come between the snapshot and the next."""
        with self._lock:
            if self._levels:
                callback(LineChange(self.service, self.generation,
                                    tuple((d, i, v) for (d, i), v in sorted(self._levels.items()))))
            token = next(self._ids)
            self._subscribers[token] = callback

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers.pop(token, None)

        return unsubscribe


class HostDma:
    """``DeviceModel.dma`` while a VM grants windows: guest memory as ``target`` lets ``device`` reach it."""

    def __init__(self, device: str, target: DmaTarget) -> None:
        self.device = device
        self.target = target

    def read(self, address: int, length: int) -> bytes:
        if length < 0:
            raise DmaError(f"{self.device}: DMA read of {length} bytes at 0x{address:x}: negative length")
        if length == 0:
            return b""
        data = self.target.dma_read(self.device, address, length)
        if len(data) != length:
            raise DmaError(f"{self.device}: DMA read of {length} bytes at 0x{address:x} returned {len(data)}")
        return data

    def write(self, address: int, data: bytes) -> None:
        if data:
            self.target.dma_write(self.device, address, bytes(data))
