"""The conformance suite against the built-in device service (every check passes, none is skipped) and against
mutants of it, each with one bug planted (each fails the check named for its bug, and only related ones)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from mmiosplit_cli.cli import main
from mmiosplit_cli.conformance.checks import CHECKS
from mmiosplit_cli.conformance.runner import Result, run_suite
from tests.conformance.mutant_service import MUTANTS
from tests.conformance.services import device_service

pytestmark = pytest.mark.integration

#: Checks a mutant may fail besides its own: they look at the same bug from another side.
RELATED = {
    # They check the seq of a flush's response too.
    "wrong_seq": {"status.malformed_posted", "deadline.flush_not_cancelled"},
    "repeat_twice": {"seq.acked_repeat_refused"},  # the acknowledged repeat is applied again too
    "drop_interrupt": {"irq.device_thread"},  # the probe's raise is dropped from Watch too
}

def _by_status(results: list[Result], status: str) -> dict[str, str]:
    return {r.name: r.reason for r in results if r.status == status}


@pytest.fixture(scope="module")
def builtin() -> Iterator[str]:
    with device_service() as address:
        yield address


def test_the_builtin_service_passes_every_check(builtin: str) -> None:
    results = run_suite(builtin, timeout=5.0)
    assert [r.name for r in results] == [c.name for c in CHECKS]
    assert _by_status(results, "FAIL") == {}
    assert _by_status(results, "SKIP") == {}


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_each_mutant_fails_the_check_named_for_its_bug(mutant: str) -> None:
    with device_service(mutant) as address:
        results = run_suite(address, timeout=3.0)
    failed = _by_status(results, "FAIL")
    assert MUTANTS[mutant] in failed, f"{mutant} passed {MUTANTS[mutant]}; results: {results}"
    assert set(failed) <= {MUTANTS[mutant], *RELATED.get(mutant, ())}, failed
    assert _by_status(results, "SKIP") == {}


def test_the_command_prints_a_line_per_check_and_writes_json(builtin: str, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.json"
    assert main(["conformance", builtin, "--only", "seq", "handshake.welcome", "--json", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = ["handshake.welcome"] + [c.name for c in CHECKS if c.name.startswith("seq.")]
    assert lines[:-1] == [f"PASS {name}" for name in names]
    assert lines[-1] == f"{len(names)} passed, 0 failed, 0 skipped"
    report = json.loads(out.read_text())
    assert [(c["name"], c["status"]) for c in report["checks"]] == [(n, "PASS") for n in names]
    assert all(c["doc"] for c in report["checks"])


def test_a_failing_check_makes_the_command_fail(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.json"
    with device_service("ignore_cancel") as address:
        status = main(["conformance", address, "--only", "deadline", "--timeout", "3", "--json", str(out)])
    assert status == 1
    printed = capsys.readouterr().out
    assert "FAIL deadline.cancel_before_start: a write cancelled while it waited behind a slow one got " \
           "COMPLETION_STATUS_OK, expected CANCELLED" in printed
    assert "PASS deadline.cancel_after_done" in printed and "PASS deadline.flush_not_cancelled" in printed
    report = json.loads(out.read_text())
    deadline_checks = sum(c.name.startswith("deadline.") for c in CHECKS)
    assert report["failed"] == 1 and report["passed"] == deadline_checks - 1


def test_an_unknown_check_name_is_refused(builtin: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conformance", builtin, "--only", "seq.nonsense"]) == 2
    assert "unknown check seq.nonsense" in capsys.readouterr().err
