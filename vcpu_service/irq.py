"""Device interrupt lines into the VM's GIC: which line drives which SPI, and the last level of each line.

A device service reports line levels in ``LineChange``s, on a completion (the access changed them) or on its
watch stream (they changed by themselves). Both are ordered by the service's generation: the router keeps,
per line, the level of the highest generation it saw, so a late watch event never overrides a newer
completion, nor the other way round. An equal generation carries the same state and is applied again
harmlessly.

Routes come from the machine profile (``machines.virt.line_routes``: QEMU's numbers) and the VM configuration
(``VmSpec.irq_routes``), never from a device's type name. Several lines may share an SPI (wired-OR, as QEMU's
``qemu_irq`` splitters would): the SPI is high while any of them is. A level-triggered line drives the SPI to
its level; an edge-triggered one sets the SPI pending on a rising change (as a write of GICD_ISPENDR does, so it
is latched however the guest configured the SPI) and its falling change does nothing. A line with no route is
logged once and ignored.

Pure: no Unicorn, no gRPC. Lock order: the router's, then the GIC's (``Gic.set_spi`` takes its own lock and
calls its IRQ listener after releasing it, so that listener must not call back into the router).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from mmiosplit.mmio import LineChange
from vcpu_service.gic import Gic

log = logging.getLogger("mmiosplit.vcpu")

#: (device service, device, line index)
LineKey = tuple[str, str, int]


@dataclass(frozen=True, slots=True)
class Route:
    """Where one line goes: SPI ``spi`` (GIC interrupt ID 32 + spi), and whether the line signals edges."""

    spi: int
    edge: bool = False


class IrqRouter:
    """The line levels of one VM and the GIC they drive (``gic`` None: the machine has no interrupt
    controller, so every change is only recorded)."""

    def __init__(self, gic: Gic | None, routes: dict[LineKey, Route], vm_id: str = "",
                 declared: Collection[LineKey] | None = None) -> None:
        self.gic = gic
        self.routes = dict(routes)
        #: The lines the services described (None: any): levels of others are dropped, not kept, so a service
        #: that names lines it never declared cannot make this table grow.
        self._declared = None if declared is None else frozenset(declared)
        self._undeclared_logged: set[str] = set()
        self._vm = vm_id
        self._lock = threading.Lock()
        self._held: dict[LineKey, tuple[int, bool]] = {}  # line -> (generation, level)
        self._high: dict[int, set[LineKey]] = {}  # SPI -> level lines now high on it
        self._unrouted_logged: set[LineKey] = set()
        #: Changes applied and changes ignored as older than what was held (for tests and inspection).
        self.applied = 0
        self.stale = 0
        self.undeclared = 0

    def level(self, service: str, device: str, index: int) -> bool:
        """The last level applied for a line (False before any)."""
        held = self._held.get((service, device, index))
        return held is not None and held[1]

    def generation(self, service: str, device: str, index: int) -> int:
        held = self._held.get((service, device, index))
        return 0 if held is None else held[0]

    def apply(self, change: LineChange) -> None:
        """Apply the levels of ``change`` that are not older than what is held, driving the GIC for those
        that changed."""
        with self._lock:
            for device, index, level in change.levels:
                key = (change.service, device, index)
                if self._declared is not None and key not in self._declared:
                    self.undeclared += 1
                    if change.service not in self._undeclared_logged:
                        self._undeclared_logged.add(change.service)
                        log.warning("VM %s: device service %s sent a level for line %d of %r, which it never "
                                    "described; such levels are ignored", self._vm, change.service, index, device)
                    continue
                held = self._held.get(key)
                if held is not None and change.generation < held[0]:
                    self.stale += 1
                    continue
                self._held[key] = (change.generation, level)
                self.applied += 1
                if (held[1] if held is not None else False) != level:
                    self._drive(key, level, change.time_ns)

    def apply_all(self, changes: Iterable[LineChange]) -> None:
        for change in changes:
            self.apply(change)

    def _drive(self, key: LineKey, level: bool, since_ns: int = 0) -> None:
        route = self.routes.get(key)
        if route is None:
            if key not in self._unrouted_logged and self.gic is not None:
                self._unrouted_logged.add(key)
                service, device, index = key
                log.info("VM %s: interrupt line %d of %s on %s is not wired to any GIC interrupt; its changes are "
                         "ignored (map it with an irq route, mmiosplit run --irq %s.%d=SPI)", self._vm, index,
                         device, service, device, index)
            return
        gic = self.gic
        if route.edge:
            if level and gic is not None:
                gic.pend_spi(route.spi, since_ns)
            return
        high = self._high.setdefault(route.spi, set())
        was = bool(high)
        if level:
            high.add(key)
        else:
            high.discard(key)
        if bool(high) != was and gic is not None:
            gic.set_spi(route.spi, bool(high), since_ns)

    def forget(self, service: str) -> None:
        """``service`` restarted: its lines drop (as the device's reset would lower them) and the generations held
        for them go, since the new instance counts from the start; its watch snapshot raises what is high."""
        with self._lock:
            for key in [k for k in self._held if k[0] == service]:
                _, level = self._held.pop(key)
                if level:
                    self._drive(key, False)

    def resync(self) -> None:
        """Drive every SPI a high level line holds again (after the GIC was reset)."""
        with self._lock:
            if self.gic is None:
                return
            for spi, high in self._high.items():
                if high:
                    self.gic.set_spi(spi, True)
