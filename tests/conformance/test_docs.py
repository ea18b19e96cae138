"""docs/conformance.md documents every check by its stable name, and the mutant table matches the mutants."""

from __future__ import annotations

from pathlib import Path

from mmiosplit_cli.conformance.checks import CHECKS
from tests.conformance.mutant_service import MUTANTS

DOC = (Path(__file__).resolve().parents[2] / "docs" / "conformance.md").read_text()


def test_every_check_is_documented_under_its_name() -> None:
    assert [c.name for c in CHECKS if f"* **{c.name}**" not in DOC] == []


def test_check_names_are_unique_and_grouped() -> None:
    names = [c.name for c in CHECKS]
    assert len(set(names)) == len(names)
    assert all("." in name and name == name.lower() for name in names)


def test_every_mutant_is_in_the_table_with_its_check() -> None:
    for mutant, check in MUTANTS.items():
        assert f"| `{mutant}` |" in DOC and f"`{check}`" in DOC
