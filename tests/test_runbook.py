"""docs/runbook.md: every procedure names the tests that run it, and each named test exists (so
the runbook cannot point at a test that was renamed or removed)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNBOOK = ROOT / "docs" / "runbook.md"
TEST_ID = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def functions_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_every_procedure_names_tests_that_exist() -> None:
    text = RUNBOOK.read_text(encoding="utf-8")
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    assert len(sections) >= 15
    missing = []
    for section in sections:
        title = section.splitlines()[0]
        ids = TEST_ID.findall(section)
        assert ids, f"runbook section {title!r} names no test"
        for file, name in ids:
            path = ROOT / file
            if not path.is_file() or name not in functions_in(path):
                missing.append(f"{title}: {file}::{name}")
    assert missing == []


def test_the_readme_links_the_runbook() -> None:
    assert "docs/runbook.md" in (ROOT / "README.md").read_text(encoding="utf-8")
