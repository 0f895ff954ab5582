"""What every patch's run config accepts (patch_ops.patch.PatchRunConfig), and how values are
shown in Markdown reports (patch_ops.steps.report)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from patch_ops.patch import MAX_LAUNCHED_BY, PatchRunConfig
from patch_ops.steps.report import markdown_text, md_table

FORGED = ["alice\nbob", "alice\r\n| forged | row |", "alice\tbob", "\u2028", "   ", "a\x1b[31m"]


@pytest.mark.parametrize("name", FORGED, ids=repr)
def test_launched_by_must_be_one_printable_line(name: str) -> None:
    with pytest.raises(ValidationError, match="launched_by must be one line of printable"):
        PatchRunConfig(launched_by=name)


@pytest.mark.parametrize("name", ["alice", "山田 太郎", "ci-bot@release-42", "x" * MAX_LAUNCHED_BY])
def test_launched_by_accepts_names(name: str) -> None:
    assert PatchRunConfig(launched_by=name).launched_by == name


def test_launched_by_is_bounded() -> None:
    with pytest.raises(ValidationError, match="longer than"):
        PatchRunConfig(launched_by="x" * (MAX_LAUNCHED_BY + 1))


def test_markdown_values_stay_in_their_cell_and_row() -> None:
    assert markdown_text("a|b") == "a\\|b"
    assert markdown_text("line1\nline2\t<b>") == "line1\\nline2\\t\\<b\\>"
    assert markdown_text("価格調整: 1250円 → 1350円 (percentage:8)") == (
        "価格調整: 1250円 → 1350円 (percentage:8)"
    )
    table = md_table([{"note": "ok\n| forged | row |", "n": 1}])
    assert len(table) == 3  # header, rule, one row: the newline did not make a second row
    assert table[2] == "| ok\\n\\| forged \\| row \\| | 1 |"
