"""VmLeases with a hand-driven clock: what holds a lease, what renews it, what expires it."""

from __future__ import annotations

import threading

import pytest

from vcpu_service.leases import VmLeases


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def leases(lease_s: float = 10.0) -> tuple[VmLeases, Clock, list[tuple[str, str]]]:
    clock = Clock()
    expired: list[tuple[str, str]] = []
    return VmLeases(lease_s, lambda vm_id, why: expired.append((vm_id, why)), clock, reaper=False), clock, expired


def test_a_vm_nobody_names_expires_after_the_lease_and_the_reason_says_why() -> None:
    table, clock, expired = leases()
    table.add("vm1")
    clock.now += 9.9
    assert table.reap() == 0
    clock.now += 0.1
    assert table.reap() == 1
    [(vm_id, why)] = expired
    assert vm_id == "vm1"
    assert "no event stream open and no RPC naming it for 10.0 s" in why and "--vm-lease-s" in why
    assert table.reap() == 0  # expired once only


def test_an_rpc_naming_the_vm_renews_its_lease() -> None:
    table, clock, _ = leases()
    table.add("vm1")
    for _ in range(5):
        clock.now += 8
        table.touch("vm1")
        assert table.reap() == 0
    clock.now += 10
    assert table.reap() == 1


def test_an_open_stream_holds_the_lease_however_long_and_its_end_renews_it() -> None:
    table, clock, _ = leases()
    table.add("vm1")
    with table.held("vm1"), table.held("vm1"):
        clock.now += 1000
        assert table.reap() == 0
    clock.now += 9
    assert table.reap() == 0  # the last stream's end counts as the client's last word
    clock.now += 1
    assert table.reap() == 1


def test_one_of_two_streams_ending_keeps_the_lease_held() -> None:
    table, clock, _ = leases()
    table.add("vm1")
    with table.held("vm1"):
        with table.held("vm1"):
            pass
        clock.now += 100
        assert table.reap() == 0


def test_a_deleted_vm_is_forgotten_and_touching_unknown_vms_is_harmless() -> None:
    table, clock, expired = leases()
    table.add("vm1")
    table.forget("vm1")
    table.touch("vm1")
    table.touch("nope")
    with table.held("nope"):
        pass
    clock.now += 100
    assert table.reap() == 0 and expired == []


def test_lease_zero_never_expires_and_starts_no_thread() -> None:
    clock = Clock()
    table = VmLeases(0, lambda vm_id, why: None, clock)
    table.add("vm1")
    clock.now += 1e9
    assert table.reap() == 0 and not table.enabled
    assert table._thread is None


def test_a_failing_expire_does_not_stop_the_others() -> None:
    clock = Clock()
    seen: list[str] = []

    def expire(vm_id: str, why: str) -> None:
        seen.append(vm_id)
        if vm_id == "a":
            raise RuntimeError("boom")

    table = VmLeases(1, expire, clock, reaper=False)
    table.add("a")
    table.add("b")
    clock.now += 2
    assert table.reap() == 2 and seen == ["a", "b"]


def test_the_reaper_thread_expires_on_its_own_and_stops() -> None:
    expired = threading.Event()
    table = VmLeases(0.04, lambda vm_id, why: expired.set())
    table.add("vm1")
    assert expired.wait(2), "the reaper thread did not expire a 40 ms lease within 2 s"
    table.stop()
    assert table._thread is not None and not table._thread.is_alive()


def test_a_negative_lease_is_refused() -> None:
    with pytest.raises(ValueError, match="lease must be >= 0"):
        VmLeases(-1, lambda vm_id, why: None)
