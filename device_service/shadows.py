"""Shadow registers on the device side: the last value sent of every register a model declared in
``RegionSpec.shadows``, and who must hear when one changes.

The vCPU process answers guest reads of those registers from a copy, so a guest polling a status
register costs no round trip. This tracker keeps that copy honest: the device host (``device_service.host``,
under both transports) calls ``refresh`` for the devices a request touched, after a reset, and
whenever a model reports ``shadows_changed`` (input on a console); every change gets a new
``generation`` and goes to every subscriber (the Watch streams). ``since`` gives an exit stream
every value that changed after the last generation it was sent, so a completion brings its vCPU's copy
up to date: a vCPU never reads a shadow value older than its own last completion.

Transport-neutral on purpose, like the models: values are plain tuples, the host names its service on them.
Thread-safe: the local transport refreshes from vCPU threads and from whoever feeds a console. Lock
order is the tracker's lock, then a model's, so models call ``shadows_changed`` without their own.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from device_service.bus import DeviceBus
from device_service.model import DeviceModel

log = logging.getLogger("mmiosplit.devices")

#: One shadow register's value: (device, region, offset inside the region, bytes as a read returns them).
ShadowValue = tuple[str, str, int, bytes]


@dataclass(frozen=True, slots=True)
class ShadowValues:
    """New values of shadow registers, all current as of ``generation``."""

    generation: int
    values: tuple[ShadowValue, ...]


@dataclass(frozen=True, slots=True)
class ShadowFailure:
    """A model's ``peek`` failed: the copies can no longer be kept current, so subscribers must stop trusting
    them (the message names the device, register and error)."""

    message: str


ShadowEvent = ShadowValues | ShadowFailure


@dataclass(slots=True)
class _Window:
    device: DeviceModel
    region: str
    offset: int
    size: int
    data: bytes = b""
    changed: int = 0  # the generation that set `data`

    @property
    def value(self) -> ShadowValue:
        return (self.device.name, self.region, self.offset, self.data)


class ShadowTracker:
    """The shadow registers of one bus. With ``enabled`` False (``--no-shadows``) it declares none."""

    def __init__(self, bus: DeviceBus, enabled: bool = True) -> None:
        self.enabled = enabled
        self.generation = 0
        self.failure: str | None = None
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._subscribers: dict[int, Callable[[ShadowEvent], None]] = {}
        self._windows: list[_Window] = []
        self._by_device: dict[str, list[_Window]] = {}
        if not enabled:
            return
        for device in bus.devices:
            windows = [_Window(device, spec.name, offset, size)
                       for spec in device.regions() for offset, size in spec.shadows]
            if windows:
                self._by_device[device.name] = windows
                self._windows += windows
                device.set_shadow_listener(self._on_model_change)
        if self._windows:
            # A model that cannot peek what it declared fails here, when the service starts.
            self.generation = 1
            for window in self._windows:
                window.data = self._peek(window)
                window.changed = 1

    @property
    def active(self) -> bool:
        """True when there is anything to keep current."""
        return bool(self._windows)

    def windows(self, device: str, region: str) -> list[tuple[int, int]]:
        """The (offset, size) of the shadow registers of one region, as Describe reports them."""
        return [(w.offset, w.size) for w in self._by_device.get(device, ()) if w.region == region]

    def _peek(self, window: _Window) -> bytes:
        device = window.device
        with device.lock:
            data = device.peek(window.region, window.offset, window.size)
        if not isinstance(data, bytes | bytearray) or len(data) != window.size:
            raise ValueError(f"peek returned {data!r}, not {window.size} bytes")
        return bytes(data)

    def _on_model_change(self, device: DeviceModel) -> None:
        self.refresh((device,))

    def refresh(self, devices: Iterable[DeviceModel]) -> None:
        """Peek the shadow registers of ``devices``; what changed gets a new generation and goes to every
        subscriber. A failing peek stops the tracker for good and tells the subscribers why."""
        if not self._by_device:
            return
        with self._lock:
            if self.failure is not None:
                return
            changed: list[tuple[_Window, bytes]] = []
            for device in devices:
                windows = self._by_device.get(device.name)
                if not windows:
                    continue
                # After every access to the device, so one lock for all its windows, and a value is checked
                # only when it differs from the last one (which was checked).
                window = windows[0]
                try:
                    with device.lock:
                        for window in windows:
                            data = device.peek(window.region, window.offset, window.size)
                            if data != window.data:
                                if not isinstance(data, bytes | bytearray) or len(data) != window.size:
                                    raise ValueError(f"peek returned {data!r}, not {window.size} bytes")
                                changed.append((window, bytes(data)))
                except Exception as exc:  # a model bug must not take the service down, nor leave copies wrong
                    self._fail(f"{device.name}: peek of the shadow register at {window.region}+"
                               f"{window.offset:#x} ({window.size} bytes) failed: {type(exc).__name__}: {exc}")
                    return
            if not changed:
                return
            self.generation += 1
            for window, data in changed:
                window.data = data
                window.changed = self.generation
            update = ShadowValues(self.generation, tuple(window.value for window, _ in changed))
            for callback in list(self._subscribers.values()):
                callback(update)

    def refresh_all(self) -> None:
        """Peek every shadow register (after a reset)."""
        self.refresh([windows[0].device for windows in self._by_device.values()])

    def _fail(self, message: str) -> None:
        self.failure = message
        log.error("shadow registers stopped: %s", message)
        for callback in list(self._subscribers.values()):
            callback(ShadowFailure(message))
        self._subscribers.clear()

    def since(self, generation: int) -> ShadowValues | None:
        """Every value that changed after ``generation`` (None when none did), for one exit stream's completion."""
        if generation >= self.generation:
            return None
        with self._lock:
            if self.failure is not None:
                return None
            return ShadowValues(self.generation,
                                tuple(w.value for w in self._windows if w.changed > generation))

    def subscribe(self, callback: Callable[[ShadowEvent], None]) -> Callable[[], None]:
        """Call ``callback`` with every current value now, then with each change; returns the unsubscriber.

        The first call happens under the tracker's lock, so no change can come between it and the next.
        """
        with self._lock:
            if self.failure is not None:
                callback(ShadowFailure(self.failure))
                return lambda: None
            token = next(self._ids)
            callback(ShadowValues(self.generation, tuple(w.value for w in self._windows)))
            self._subscribers[token] = callback

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers.pop(token, None)

        return unsubscribe
