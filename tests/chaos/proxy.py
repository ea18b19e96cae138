"""A TCP proxy that breaks connections on purpose, for the sessions tests and the chaos campaign.

It listens on 127.0.0.1 and forwards each connection to a target (``HOST:PORT`` or ``unix:PATH``), byte for
byte, on two threads per connection. Faults, each at once on every open connection:

* ``cut()`` resets them (SO_LINGER 0: the peers see a reset, as when a host or a process dies), whatever is in
  flight;
* ``stall(s)`` holds every byte for ``s`` seconds, then lets them through in order (a congested or paused path);
* ``duplicate()`` sends the next chunk twice, and ``garbage()`` slips random bytes in: the HTTP/2 framing breaks,
  so the peers see a protocol error (what a duplicated or corrupted segment does when TCP does not catch it).

Only loopback traffic, to a target the test started itself.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

from mmiosplit.address import parse_address


class ChaosProxy:
    """Forwards 127.0.0.1:``port`` to ``target``; ``cut()`` resets what is open. A context manager."""

    def __init__(self, target: str) -> None:
        self._target = parse_address(target)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closed = False
        self.connections = 0
        self.cuts = 0
        self._flowing = threading.Event()
        self._flowing.set()
        self._duplicate = False
        self._garbage: bytes | None = None
        self._thread = threading.Thread(target=self._accept, name="chaos-proxy", daemon=True)
        self._thread.start()

    def __enter__(self) -> ChaosProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connect(self) -> socket.socket:
        if self._target.is_unix:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(self._target.unix_path or "")
        else:
            s = socket.create_connection((self._target.host or "127.0.0.1", self._target.port or 0))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                upstream = self._connect()
            except OSError:
                _reset(client)
                continue
            with self._lock:
                if self._closed:
                    _reset(client)
                    _reset(upstream)
                    return
                self._open.update((client, upstream))
                self.connections += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), name="chaos-pump", daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                self._flowing.wait()
                with self._lock:
                    twice, self._duplicate = self._duplicate, False
                    garbage, self._garbage = self._garbage, None
                if garbage is not None:
                    dst.sendall(garbage)
                dst.sendall(data)
                if twice:
                    dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            self._drop(s)

    def _drop(self, s: socket.socket) -> None:
        with self._lock:
            known = s in self._open
            self._open.discard(s)
        if known:
            _reset(s)

    def cut(self) -> int:
        """Reset every open connection now; returns how many sockets were reset."""
        with self._lock:
            sockets, self._open = self._open, set()
            if sockets:
                self.cuts += 1
        for s in sockets:
            _reset(s)
        return len(sockets)

    def stall(self, seconds: float) -> None:
        """Hold every byte for ``seconds`` (from now), then let them through in order."""
        self._flowing.clear()
        timer = threading.Timer(seconds, self._flowing.set)
        timer.daemon = True
        timer.start()

    def duplicate(self) -> None:
        """Send the next chunk (either direction) twice."""
        with self._lock:
            self._duplicate = True

    def garbage(self, data: bytes) -> None:
        """Send ``data`` before the next chunk (either direction)."""
        with self._lock:
            self._garbage = data

    def close(self) -> None:
        with self._lock:
            self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        self._flowing.set()
        self.cut()


def _reset(s: socket.socket) -> None:
    """Close with a reset, not a graceful FIN: in-flight bytes are lost, as when the peer dies."""
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        s.close()
