"""What every patch's run config accepts (patch_ops.patch.PatchRunConfig), and how values are
shown in Markdown reports (patch_ops.steps.report)."""

from __future__ import annotations

import pytest

from patch_ops.patch import MAX_LAUNCHED_BY, PatchRunConfig
from patch_ops.steps.report import markdown_text, md_table

FORGED = ["alice\nbob", "alice\r\n| forged | row |", "alice\tbob", "\u2028", "   ", "a\x1b[31m"]


@pytest.mark.parametrize("name", FORGED, ids=repr)
def test_launched_by_must_be_one_printable_line(name: str) -> None:
    problem = PatchRunConfig(launched_by=name).value_problem()
    assert problem and problem.startswith("launched_by must be one line of printable")


@pytest.mark.parametrize("name", ["alice", "山田 太郎", "ci-bot@release-42", "x" * MAX_LAUNCHED_BY])
def test_launched_by_accepts_names(name: str) -> None:
    assert PatchRunConfig(launched_by=name).value_problem() is None


def test_launched_by_is_bounded() -> None:
    problem = PatchRunConfig(launched_by="x" * (MAX_LAUNCHED_BY + 1)).value_problem()
    assert problem == f"launched_by is longer than {MAX_LAUNCHED_BY} characters"


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ({"batch_size": 2**31}, "batch_size is out of range"),
        ({"launched_by": "a\x00b"}, "launched_by must not contain NUL characters"),
        ({"release": "v1\nv2"}, "release must be one line of printable characters"),
    ],
)
def test_values_a_database_would_refuse_are_named(values: dict, problem: str) -> None:
    found = PatchRunConfig(**values).value_problem()
    assert found is not None and found.startswith(problem)


def test_markdown_values_stay_in_their_cell_and_row() -> None:
    assert markdown_text("a|b") == "a\\|b"
    assert markdown_text("line1\nline2\t<b>") == "line1\\nline2\\t\\<b\\>"
    assert markdown_text("価格調整: 1250円 → 1350円 (percentage:8)") == (
        "価格調整: 1250円 → 1350円 (percentage:8)"
    )
    table = md_table([{"note": "ok\n| forged | row |", "n": 1}])
    assert len(table) == 3  # header, rule, one row: the newline did not make a second row
    assert table[2] == "| ok\\n\\| forged \\| row \\| | 1 |"
