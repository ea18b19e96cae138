"""The device service's session table: resume by id, the unacknowledged window, expiry."""

from __future__ import annotations

import pytest

from device_service import sessions
from device_service.bus import DeviceBus
from device_service.host import DeviceHost
from device_service.sessions import SessionTable


@pytest.fixture
def table() -> SessionTable:
    return SessionTable(DeviceHost(DeviceBus([]), "devs").session)


def test_a_known_id_resumes_the_same_session_and_an_empty_one_never_does(table: SessionTable) -> None:
    s1, resumed = table.attach("abc")
    assert not resumed
    s1.record(1, "r1", keep=True)
    table.detach(s1)
    s2, resumed = table.attach("abc")
    assert resumed and s2 is s1 and s2.applied == 1 and s2.responses == {1: "r1"}
    anon1, r1 = table.attach("")
    anon2, r2 = table.attach("")
    assert anon1 is not anon2 and not r1 and not r2 and len(table) == 1


def test_acknowledged_responses_are_forgotten_and_the_window_is_capped(table: SessionTable,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    s, _ = table.attach("w")
    for seq in range(1, 6):
        s.record(seq, f"r{seq}", keep=True)
    s.acknowledge(3)
    assert sorted(s.responses) == [4, 5] and s.applied == 5
    monkeypatch.setattr(sessions, "MAX_UNACKED", 3)
    for seq in range(6, 9):
        s.record(seq, f"r{seq}", keep=True)
    assert sorted(s.responses) == [6, 7, 8]  # a client that never acknowledges cannot grow it without bound


def test_idle_sessions_expire_and_the_table_is_bounded(table: SessionTable, monkeypatch: pytest.MonkeyPatch) -> None:
    s, _ = table.attach("old")
    table.detach(s)
    s.idle_since -= sessions.IDLE_S + 1
    busy, _ = table.attach("busy")  # attaching expires the idle one
    assert len(table) == 1
    _, resumed = table.attach("old")
    assert not resumed
    monkeypatch.setattr(sessions, "MAX_SESSIONS", 2)
    table.detach(busy)
    table.attach("third")
    assert len(table) <= 2
