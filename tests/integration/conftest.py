"""Both services as real subprocesses, over a UNIX socket and over TCP loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mmiosplit_cli.launcher import local_services
from tests.integration.client import Services

# The devices every integration test gets: a UART, an RTC, a RAM-like scratch device, and a scratch
# device whose writes are posted.
DEVICES = [
    "pl011@0x09000000,name=uart0",
    "pl031@0x09010000,name=rtc0",
    "scratch@0x0a000000,size=0x1000,name=scratch0",
    "scratch@0x0a100000,size=0x1000,posted=on,name=posted0",
]
ROOT = Path(__file__).resolve().parents[2]


def _start(transport: str) -> Iterator[Services]:
    args = [a for d in DEVICES for a in ("--device", d)]
    with local_services(args, transport=transport) as (vaddr, daddr, handle):
        assert vaddr and daddr
        yield Services(vaddr, daddr, handle)


@pytest.fixture(scope="session", params=["unix", "tcp"])
def services(request: pytest.FixtureRequest) -> Iterator[Services]:
    """Both services, once per transport for the whole session."""
    yield from _start(request.param)


@pytest.fixture(scope="session")
def unix_services() -> Iterator[Services]:
    yield from _start("unix")
