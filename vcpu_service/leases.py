"""VM leases: a VM nobody drives any more is deleted, so a vcpu service does not run orphaned guests.

A client that dies (killed, its terminal closed, its host gone) cannot send DeleteVm; its guest would
spin on a vCPU thread until the service stops. So every VM has a lease: it is *held* while a stream that
follows the VM (StreamVmEvents, StreamExitTrace) is open, and *renewed* by every RPC that names the VM.
When no stream is open and no RPC came for ``lease_s`` seconds, one reaper thread hands the VM to
``expire`` (the servicer deletes it and logs why). A client that follows its VM's events, as ``mmiosplit
run`` and the load tester do, keeps it for as long as it likes, paused or not. No gRPC here: the servicer
calls ``add``/``touch``/``held``/``forget``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

log = logging.getLogger("mmiosplit.vcpu")

DEFAULT_LEASE_S = 10.0


@dataclass
class _Lease:
    renewed: float  # clock() of the last RPC naming the VM, or of the last stream's end
    streams: int = 0  # open streams following the VM


class VmLeases:
    """The lease of every live VM and the one thread that expires them; ``lease_s`` 0 never expires any."""

    def __init__(self, lease_s: float, expire: Callable[[str, str], None],
                 clock: Callable[[], float] = time.monotonic, *, reaper: bool = True) -> None:
        """``reaper`` False: no thread, whoever owns the table calls ``reap`` (the unit tests)."""
        if lease_s < 0:
            raise ValueError(f"VM lease must be >= 0 seconds (0: never expire), got {lease_s:g}")
        self.lease_s = lease_s
        self._expire = expire
        self._clock = clock
        self._leases: dict[str, _Lease] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reaper = reaper

    @property
    def enabled(self) -> bool:
        return self.lease_s > 0

    def add(self, vm_id: str) -> None:
        """A new VM: its lease runs from now (the reaper starts with the first VM)."""
        if not self.enabled:
            return
        with self._lock:
            self._leases[vm_id] = _Lease(self._clock())
            if self._thread is None and self._reaper:
                self._thread = threading.Thread(target=self._reap, name="vm-leases", daemon=True)
                self._thread.start()

    def touch(self, vm_id: str) -> None:
        """An RPC named the VM: renew its lease (nothing for an unknown or expired VM)."""
        with self._lock:
            lease = self._leases.get(vm_id)
            if lease is not None:
                lease.renewed = self._clock()

    @contextlib.contextmanager
    def held(self, vm_id: str) -> Iterator[None]:
        """Hold the lease while a stream follows the VM; its end renews the lease (the client may act on it)."""
        with self._lock:
            lease = self._leases.get(vm_id)
            if lease is not None:
                lease.streams += 1
        try:
            yield
        finally:
            with self._lock:
                if lease is not None:
                    lease.streams -= 1
                    lease.renewed = self._clock()

    def forget(self, vm_id: str) -> None:
        """The VM is being deleted by someone else: no lease to keep."""
        with self._lock:
            self._leases.pop(vm_id, None)

    def expired(self) -> list[tuple[str, float]]:
        """Take the VMs whose lease ran out off the table: (vm id, seconds since it was last renewed)."""
        if not self.enabled:
            return []
        now = self._clock()
        with self._lock:
            gone = [(vm_id, now - lease.renewed) for vm_id, lease in self._leases.items()
                    if lease.streams == 0 and now - lease.renewed >= self.lease_s]
            for vm_id, _ in gone:
                del self._leases[vm_id]
        return gone

    def reap(self) -> int:
        """Expire every VM whose lease ran out; returns how many. The reaper thread calls this."""
        gone = self.expired()
        for vm_id, idle in gone:
            why = (f"lease expired: no event stream open and no RPC naming it for {idle:.1f} s (lease "
                   f"{self.lease_s:g} s; serve-vcpu --vm-lease-s): its client is gone")
            try:
                self._expire(vm_id, why)
            except Exception:
                log.exception("deleting VM %s after its lease expired failed", vm_id)
        return len(gone)

    def _reap(self) -> None:
        interval = min(1.0, self.lease_s / 4)
        while not self._stop.wait(interval):
            self.reap()

    def stop(self) -> None:
        """Stop the reaper thread (the service is shutting down)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)
