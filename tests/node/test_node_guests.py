"""The bundled hello guests with their console and scratch device served by the Node.js device service."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mmiosplit.v1 import vcpu_pb2
from mmiosplit_cli.demo import GUESTS, Guest
from mmiosplit_cli.launcher import local_services
from mmiosplit_cli.runner import run_vm
from tests.node.conftest import HELLO_DEVICES, node_service

pytestmark = [pytest.mark.node, pytest.mark.integration]

EXPECTED = Path(__file__).resolve().parents[2] / "guests" / "expected"


@pytest.fixture(scope="module", params=["tcp", "unix"])
def split(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """(vcpu service address, Node device service address)."""
    with node_service(HELLO_DEVICES, transport=request.param) as node, \
            local_services(None, transport=request.param) as (vaddr, _, _):
        assert vaddr is not None
        yield vaddr, node.address


@pytest.mark.parametrize("guest", GUESTS, ids=[g.name for g in GUESTS])
@pytest.mark.parametrize("vcpus", [1, 2])
def test_hello_prints_what_it_prints_with_the_python_service(split: tuple[str, str], guest: Guest,
                                                              vcpus: int) -> None:
    vcpu, devices = split
    result = run_vm(vcpu, guest.config(devices, vcpus))
    assert result.final.kind == vcpu_pb2.VM_EVENT_KIND_POWERED_OFF, result.final
    assert result.exit_status == 0
    assert result.console.decode() == (EXPECTED / f"hello-{guest.name}-{vcpus}cpu.txt").read_text()


def test_hello_with_its_scratch_writes_posted(split: tuple[str, str]) -> None:
    """The same guest when the scratch device's writes are posted: they reach Node in batches (exits carrying
    them, and flushes), in order, before every read."""
    posted = ["pl011@0x09000000,name=uart0", "scratch@0x0a000000,size=0x1000,posted=on,name=scratch0"]
    with node_service(posted) as node:
        result = run_vm(split[0], GUESTS[0].config(node.address, 1))
    assert result.final.kind == vcpu_pb2.VM_EVENT_KIND_POWERED_OFF, result.final
    assert result.console.decode() == (EXPECTED / "hello-a64-1cpu.txt").read_text()
    assert result.stats.vcpus[0].posted_writes > 10, result.stats
