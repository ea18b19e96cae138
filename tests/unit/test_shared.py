"""Pure pieces both services share: addresses, PSCI decisions, ITSTATE, event names, stubs."""

from __future__ import annotations

import pytest

from mmiosplit import protogen
from mmiosplit.address import AddressError, parse_address
from mmiosplit.mmio import unpack_posted
from mmiosplit.v1 import device_pb2
from vcpu_service import psci
from vcpu_service.arch import it_advance
from vcpu_service.domain import EventKind
from vcpu_service.events import EventLog


@pytest.mark.parametrize(
    ("text", "target"),
    [("unix:/tmp/a.sock", "unix:/tmp/a.sock"), ("unix:///tmp/a.sock", "unix:/tmp/a.sock"),
     ("127.0.0.1:7000", "127.0.0.1:7000"), ("localhost:0", "localhost:0"), ("[::1]:80", "[::1]:80")],
)
def test_good_addresses(text: str, target: str) -> None:
    assert parse_address(text).target == target


@pytest.mark.parametrize("text", ["", "localhost", "unix:", "host:99999", "tcp://x:1", "a b:1", ":80"])
def test_bad_addresses_name_the_text(text: str) -> None:
    with pytest.raises(AddressError, match="malformed address"):
        parse_address(text)


def test_psci_version_and_features() -> None:
    assert psci.decode_call(psci.PSCI_VERSION, 0, 0, 0, True).result == 0x10001
    assert psci.decode_call(psci.PSCI_FEATURES, psci.SYSTEM_RESET, 0, 0, True).result == psci.SUCCESS
    assert psci.decode_call(psci.PSCI_FEATURES, 0x8400_0010, 0, 0, True).result == psci.NOT_SUPPORTED
    assert psci.decode_call(0x8400_00FF, 0, 0, 0, True).result == psci.NOT_SUPPORTED


def test_psci_cpu_on_arguments() -> None:
    call = psci.decode_call(psci.CPU_ON_64, 1, 0x4008_1000, 7, True)
    assert (call.action, call.target, call.entry, call.context) == (psci.PsciAction.CPU_ON, 1, 0x4008_1000, 7)
    # The 64-bit calling convention is refused on AArch32 (QEMU's arm_handle_psci_call), whatever the function.
    assert psci.decode_call(psci.CPU_ON_64, 1, 0, 0, False).result == psci.NOT_SUPPORTED
    call = psci.decode_call(psci.AFFINITY_INFO_64, 0, 0, 0, False)
    assert (call.action, call.result) == (psci.PsciAction.NONE, psci.NOT_SUPPORTED)
    # Upper bits of x0 are ignored for SMC32 function ids.
    assert psci.decode_call(0xFFFF_FFFF_0000_0000 | psci.SYSTEM_OFF, 0, 0, 0, True).action is psci.PsciAction.SYSTEM_OFF


def test_mpidr_to_vcpu() -> None:
    assert psci.mpidr_to_vcpu(0x8000_0001) == 1
    assert psci.mpidr_to_vcpu(0x0000_0102) == 18


def test_it_advance() -> None:
    # ITT EQ (firstcond=0000, mask=0100 -> IT=0x04): after one instruction IT=0x08, then the block ends.
    cpsr = 0x0000_0030 | (0x04 & 3) << 25 | (0x04 >> 2) << 10
    once = it_advance(cpsr)
    assert ((once >> 25) & 3) | (((once >> 10) & 0x3F) << 2) == 0x08
    assert it_advance(once) & ((3 << 25) | (0x3F << 10)) == 0
    assert it_advance(0x1D3) == 0x1D3  # outside an IT block nothing changes


def test_unpack_posted_checks_the_packing() -> None:
    batch = device_pb2.PostedWrites(address=[0x10, 0x20], length=[4, 1], data=b"\x01\x02\x03\x04\x05")
    assert unpack_posted(batch.address, batch.length, batch.data) == [(0x10, b"\x01\x02\x03\x04"), (0x20, b"\x05")]
    with pytest.raises(ValueError, match="lengths add up to 5 bytes but carry 4"):
        unpack_posted([1, 2], [4, 1], b"1234")
    with pytest.raises(ValueError, match="2 addresses but 1 lengths"):
        unpack_posted([1, 2], [4], b"1234")


def test_event_log_replays_and_stops_at_the_final_event() -> None:
    log = EventLog()
    log.emit(EventKind.RUNNING, reason="go")
    log.emit(EventKind.POWERED_OFF, reason="off")
    log.emit(EventKind.RUNNING, reason="never seen")
    seen = [e.kind.value for e in log.follow(lambda: True)]
    assert seen == ["running", "powered_off"]
    assert [e.seq for e in log.snapshot()] == [1, 2, 3]


def test_generated_stubs_are_fresh() -> None:
    assert protogen.main(["--check"]) == 0
