"""Service addresses: ``unix:PATH`` or ``HOST:PORT``, checked once so a typo fails with its own name."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

_HOST_PORT = re.compile(r"^(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.\-_]+):(?P<port>\d{1,5})$")


class AddressError(ValueError):
    """A service address that is neither ``unix:PATH`` nor ``HOST:PORT``."""


@dataclass(frozen=True, slots=True)
class ServiceAddress:
    """A parsed service address; ``target`` is what gRPC channels and servers accept."""

    text: str
    unix_path: str | None = None
    host: str | None = None
    port: int | None = None

    @property
    def target(self) -> str:
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        return f"{self.host}:{self.port}"

    @property
    def is_unix(self) -> bool:
        return self.unix_path is not None

    def __str__(self) -> str:
        return self.target


def parse_address(text: str) -> ServiceAddress:
    """Parse ``unix:PATH`` (also ``unix://PATH``) or ``HOST:PORT``; raise AddressError naming the text."""
    raw = text.strip()
    if raw.startswith("unix:"):
        path = raw[len("unix:"):]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise AddressError(f"malformed address {text!r}: unix: needs a socket path, e.g. unix:/tmp/dev.sock")
        return ServiceAddress(text=text, unix_path=path)
    match = _HOST_PORT.match(raw)
    if not match:
        raise AddressError(
            f"malformed address {text!r}: expected unix:PATH or HOST:PORT (e.g. unix:/tmp/dev.sock, 127.0.0.1:7000)"
        )
    port = int(match.group("port"))
    if port > 65535:
        raise AddressError(f"malformed address {text!r}: port {port} is out of range 0-65535")
    return ServiceAddress(text=text, host=match.group("host"), port=port)


def address_argument(text: str) -> str:
    """An argparse ``type`` for service addresses: the text back, or an argparse error naming the problem."""
    try:
        parse_address(text)
    except AddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text
