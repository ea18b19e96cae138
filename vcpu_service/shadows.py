"""The VM's copy of the shadow registers: reads of them are answered here, without an exit.

A device service declares registers whose reads have no side effects (``RemoteRegion.shadows``) and
keeps this copy current: with the values on every completion, and on its Watch stream when
state changes by itself (a byte arrives on a console). Updates can arrive out of order (the stream
runs on its own thread and may lag a completion), so each register keeps the value of the highest
generation seen: a vCPU never reads a value older than its own last completion from that service.

Reads (``lookup``, on every vCPU's exit path) take no lock: a dict lookup of an immutable tuple is
atomic. Writers serialise on one lock so the generation check and the store go together.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from mmiosplit.mmio import RemoteRegion, ShadowChange, TransportError


class ShadowTable:
    """Shadow register values of one VM, by absolute guest address: (size, bytes, generation)."""

    def __init__(self, regions: Iterable[RemoteRegion]) -> None:
        # (service, device, region) -> (base, {offset: size}), for checking and placing what arrives.
        self._windows: dict[tuple[str, str, str], tuple[int, dict[int, int]]] = {}
        for r in regions:
            if r.shadows:
                self._windows[(r.service, r.device, r.name)] = (r.base, dict(r.shadows))
        self._values: dict[int, tuple[int, bytes, int]] = {}
        self._disabled: set[str] = set()
        self._lock = threading.Lock()

    @property
    def services(self) -> set[str]:
        """The device services that declared shadow registers."""
        return {service for service, _, _ in self._windows}

    def lookup(self, address: int, size: int) -> bytes | None:
        """The bytes a ``size``-byte read at ``address`` returns, or None when it must exit."""
        entry = self._values.get(address)
        if entry is None or entry[0] != size:
            return None
        return entry[1]

    def generation(self, address: int) -> int:
        """The generation of the value held for ``address`` (0 when none), for tests and inspection."""
        entry = self._values.get(address)
        return 0 if entry is None else entry[2]

    def apply(self, change: ShadowChange) -> None:
        """Store each value unless a newer one (higher generation) is already held.

        A value for a register the service did not declare, or of the wrong size, is a broken device
        service: nothing of the update is applied, the service's registers are no longer served from
        here (its reads exit again), and TransportError names the register.
        """
        with self._lock:
            if change.service in self._disabled:
                return
            placed: list[tuple[int, int, bytes]] = []
            for device, region, offset, data in change.values:
                window = self._windows.get((change.service, device, region))
                size = window[1].get(offset) if window is not None else None
                if window is None or size is None:
                    self._disable(change.service)
                    raise TransportError(
                        f"device service {change.service} sent a shadow value for {device}/{region}+0x{offset:x}, "
                        "which is not a shadow register it described; its shadow registers are no longer used")
                if len(data) != size:
                    self._disable(change.service)
                    raise TransportError(
                        f"device service {change.service} sent {len(data)} bytes for the {size}-byte shadow "
                        f"register {device}/{region}+0x{offset:x}; its shadow registers are no longer used")
                placed.append((window[0] + offset, size, data))
            generation = change.generation
            for address, size, data in placed:
                held = self._values.get(address)
                if held is None or generation >= held[2]:
                    self._values[address] = (size, data, generation)

    def reset(self, service: str) -> None:
        """``service`` restarted: forget its values and their generations (the new instance counts from the
        start) and take its updates again."""
        with self._lock:
            self._disable(service)
            self._disabled.discard(service)

    def disable(self, service: str) -> None:
        """Stop answering reads of ``service``'s registers from here (its updates can no longer be trusted)."""
        with self._lock:
            self._disable(service)

    def _disable(self, service: str) -> None:
        self._disabled.add(service)
        addresses = {base + offset for (s, _, _), (base, offsets) in self._windows.items() if s == service
                     for offset in offsets}
        self._values = {a: v for a, v in self._values.items() if a not in addresses}
