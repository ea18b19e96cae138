"""Exit-stream sessions: what lets a vCPU reconnect after a broken stream without an access applied twice.

A session belongs to one vCPU of one VM and outlives its streams. It holds the host's per-vCPU state (the
``HostSession``), the highest sequence number applied, and the responses the client has not acknowledged yet.
A request whose number was already applied is answered from those responses, never applied again; the client
acknowledges with every request (``ack``: the highest response it received), so only the unacknowledged window
is kept: one synchronous exit and the posted-write batches in flight.

A session with no stream is forgotten after ``IDLE_S``; at most ``MAX_SESSIONS`` are kept (the longest idle goes
first). Transport-free: the responses are whatever the server stores.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from device_service.host import HostSession

#: A session with no stream for this long is forgotten (its vCPU can no longer resume it).
IDLE_S = 120.0
MAX_SESSIONS = 4096
#: More unacknowledged responses than this means the client does not acknowledge: the oldest are dropped.
MAX_UNACKED = 4096


class ExitSession:
    """One vCPU's session with this service: applied up to ``applied``; ``responses`` by seq, not yet acknowledged."""

    def __init__(self, session_id: str, host_session: HostSession) -> None:
        self.session_id = session_id
        self.host_session = host_session
        self.applied = 0
        self.responses: dict[int, Any] = {}
        #: Held while a request is checked, applied and recorded: a resumed stream's repeat of a request the
        #: old stream is still applying waits for it, then is answered from memory.
        self.lock = asyncio.Lock()
        self.streams = 0
        self.idle_since = time.monotonic()
        #: Requests the client cancelled before they were answered (a Cancel is read ahead of them).
        self.cancelled: set[int] = set()

    def acknowledge(self, ack: int) -> None:
        """The client received every response up to ``ack``: forget them."""
        if self.responses and ack:
            for seq in [s for s in self.responses if s <= ack]:
                del self.responses[seq]

    def record(self, seq: int, response: Any, keep: bool) -> None:
        """``seq`` was applied (or refused) and answered with ``response``; ``keep`` it for a repeat."""
        self.applied = max(self.applied, seq)
        self.cancelled.discard(seq)
        if keep:
            self.responses[seq] = response
            if len(self.responses) > MAX_UNACKED:
                del self.responses[min(self.responses)]


class SessionTable:
    """The sessions of one device service, by id."""

    def __init__(self, new_host_session: Callable[[], HostSession]) -> None:
        self._new = new_host_session
        self._sessions: dict[str, ExitSession] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def attach(self, session_id: str) -> tuple[ExitSession, bool]:
        """The session ``session_id`` (new, or known: resumed) with one more stream on it. An empty id gets a
        session of its own that nothing can resume."""
        self._expire()
        session = self._sessions.get(session_id) if session_id else None
        resumed = session is not None
        if session is None:
            session = ExitSession(session_id, self._new())
            if session_id:
                self._sessions[session_id] = session
        session.streams += 1
        return session, resumed

    def detach(self, session: ExitSession) -> None:
        """A stream of ``session`` ended."""
        session.streams -= 1
        if session.streams <= 0:
            session.idle_since = time.monotonic()

    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [s for s, v in self._sessions.items() if v.streams <= 0 and now - v.idle_since > IDLE_S]:
            del self._sessions[sid]
        while len(self._sessions) >= MAX_SESSIONS:
            idle = [v for v in self._sessions.values() if v.streams <= 0]
            if not idle:
                break
            del self._sessions[min(idle, key=lambda v: v.idle_since).session_id]
