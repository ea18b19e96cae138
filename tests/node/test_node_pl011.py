"""The Node PL011 against the Python one, access for access: a seeded random walk over its registers (every
offset, size and direction, valid or not), then typed input drained through DR with the FIFO, trigger levels and
interrupt status checked at every step. Every completion (status, data, error, the shadow values and line levels
it carries, and their generations) must be the same."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any

import pytest

from mmiosplit.v1 import device_pb2
from mmiosplit_cli.launcher import local_services
from tests.node.conftest import node_service
from tests.node.test_node_protocol import READ, WRITE, Stream, access, stub

pytestmark = pytest.mark.node

UART = 0x09000000
OFFSETS = [0x000, 0x004, 0x018, 0x020, 0x024, 0x028, 0x02C, 0x030, 0x034, 0x038, 0x03C, 0x040, 0x044, 0x048,
           0xFE0, 0xFE4, 0xFF0, 0xFFC, 0x001, 0x002, 0x01A, 0x04C, 0x100, 0xFFE]


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[str, str]]:
    devices = ["pl011@0x09000000,name=uart0"]
    with node_service(devices) as node, \
            local_services(["--device", devices[0]], start_vcpu=False, transport="tcp") as (_, python, _):
        assert python is not None
        yield python, node.address


class Side:
    """One service: an exit stream, numbered requests, and the console."""

    def __init__(self, address: str) -> None:
        self.stub = stub(address)
        self.stream = Stream(self.stub)
        self.stream.hello(session=f"pl011-{address}")
        self.seq = 0
        self.consoles: list[Any] = []

    def do(self, offset: int, size: int, write: bool = False, value: int = 0) -> device_pb2.Completion:
        self.seq += 1
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little") if write else b""
        done = self.stream.exchange(access(self.seq, UART + offset, size, WRITE if write else READ, data,
                                           ack=self.seq - 1)).completion
        if done.HasField("lines"):
            done.lines.raised_ns = 0
        return done

    def type(self, text: bytes) -> None:
        self.consoles.append(self.stub.Console(iter([device_pb2.ConsoleRequest(device="uart0", input=text)])))

    def wait_rx(self) -> None:
        """Until FR says the receive FIFO holds something (the input arrived)."""
        deadline = time.monotonic() + 10
        while self.do(0x018, 4).data[0] & 0x10:
            assert time.monotonic() < deadline, "typed input never reached the FIFO"
            time.sleep(0.01)

    def close(self) -> None:
        for call in self.consoles:
            call.cancel()
        self.stream.close()


def _same(python: Side, node: Side, what: str, offset: int, size: int = 4, write: bool = False,
          value: int = 0) -> device_pb2.Completion:
    """The same access on both sides: the Node completion, once it equals the Python one."""
    want, have = python.do(offset, size, write, value), node.do(offset, size, write, value)
    assert have == want, what
    return have


def test_the_node_pl011_answers_as_the_python_one(pair: tuple[str, str]) -> None:
    python, node = Side(pair[0]), Side(pair[1])
    try:
        rng = random.Random(20261207)
        for i in range(600):
            offset, size, write = rng.choice(OFFSETS), rng.choice((1, 2, 4, 4, 4, 8)), rng.random() < 0.5
            value = rng.getrandbits(32) if rng.random() < 0.7 else rng.choice((0, 0x10, 0x50, 0x70, 0x7FF))
            _same(python, node, f"step {i}: {'write' if write else 'read'} of {size} at +{offset:#x} ({value:#x})",
                  offset, size, write, value)
        # Input: FIFO on or off, each trigger level; RX and RT raise the line through IMSC, DR reads lower it.
        levels: list[bool] = []
        for fen, ifls, text in ((0x10, 0x00, b"abc"), (0x10, 0x08, b"0123456789" * 4), (0x00, 0x12, b"xy"),
                                (0x10, 0x20, b"hello, world")):
            for offset, value in ((0x02C, fen), (0x034, ifls), (0x038, 0x50), (0x044, 0x7FF)):
                _same(python, node, f"set +{offset:#x}", offset, 4, True, value)
            for side in (python, node):
                side.type(text)
                side.wait_rx()
            for n in range(len(text) + 2):
                for offset in (0x018, 0x03C, 0x040, 0x000):  # FR, RIS, MIS, then pop DR
                    done = _same(python, node, f"{text!r} byte {n} +{offset:#x}", offset)
                    levels += [lv.level for lv in done.lines.levels]
                if n < len(text):  # a byte left waiting (FIFO full, or one deep) goes in as DR drains it
                    deadline = time.monotonic() + 5
                    while python.do(0x018, 4) != node.do(0x018, 4):
                        assert time.monotonic() < deadline
        assert False in levels  # DR reads lowered the line (typed input raised it, on the watch stream)
    finally:
        python.close()
        node.close()
