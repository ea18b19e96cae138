"""The chaos campaign in CI: 100 faults (resets, stalls, duplicated and corrupted bytes, device restarts) under a
guest writing a UART byte per exit; nothing lost, duplicated or wrong. ``python -m tests.chaos`` runs longer."""

from __future__ import annotations

import pytest

from tests.chaos.campaign import report, run_campaign

pytestmark = pytest.mark.integration


def test_a_hundred_faults_lose_duplicate_and_corrupt_nothing() -> None:
    verdict = run_campaign(100, seed=12, writes=800)
    print(report(verdict))
    assert verdict.faults >= 100
    assert verdict.clean, report(verdict)
    assert sum(r.completed for r in verdict.runs) > 0
    # Every run that did not finish ended in a defined error, with its reason.
    assert all(r.ended == "powered off" or r.reason for r in verdict.runs)
