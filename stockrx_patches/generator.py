"""`stockrx-patches new NAME --driving-table TABLE`: the three things a new patch is.

It writes ``stockrx_patches/patches/NAME.py`` (a patch that loads and changes nothing, every part
marked with a one-line hint), appends a short entry to ``config/data_patches.yml`` and writes
``tests/stockrx_patches/patches/test_NAME.py`` (the tests mirror the packages), whose first test
fails until the transform changes something. Nothing else: the job, its run-queue tags, the CLI
listing and the history follow from the class.
"""

from __future__ import annotations

import datetime as dt
import json
import keyword
import re
from pathlib import Path

import yaml

from stockrx_patches.tables import STOCKRX_TABLES, metadata

NAME_RE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
#: The pandera schema of each StockRx table (stockrx_patches/schemas.py).
SCHEMA_OF = {
    "inventories": "InventorySchema",
    "batches": "BatchSchema",
    "inventory_logs": "InventoryLogSchema",
}
#: Names the generated module imports or defines besides its classes.
RESERVED = {"Changes", "Invariant", "Patch", "PatchRunConfig", "RunContext", "Tables"}


class GeneratorError(ValueError):
    """The patch cannot be generated (one line, for the command's exit 2)."""


def class_name(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def check_request(name: str, driving_table: str, root: Path) -> None:
    if not NAME_RE.match(name) or keyword.iskeyword(name):
        raise GeneratorError(
            f"patch name {name!r} must be a lowercase snake_case Python identifier that is not "
            "a keyword (e.g. archive_idle_items)"
        )
    if class_name(name) in RESERVED:
        raise GeneratorError(
            f"patch name {name!r} would name its class {class_name(name)}, which the patch module "
            "imports: choose another name"
        )
    if driving_table not in STOCKRX_TABLES:
        raise GeneratorError(
            f"driving table {driving_table!r} is not a StockRx table "
            f"({', '.join(STOCKRX_TABLES)})"
        )
    module, test, config = paths(name, root)
    existing = [str(p.relative_to(root)) for p in (module, test) if p.exists()]
    if not config.is_file():
        raise GeneratorError(f"no patch settings file at {config}")
    entries = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("patches") or {}
    if name in entries:
        existing.append(f"its entry in {config.relative_to(root)}")
    declared = re.compile(rf"^\s+name\s*=\s*['\"]{re.escape(name)}['\"]", re.M)
    for other in sorted(module.parent.glob("*.py")):
        if other != module and declared.search(other.read_text(encoding="utf-8")):
            existing.append(f"a patch named {name!r} in {other.relative_to(root)}")
    if existing:
        raise GeneratorError(f"patch {name!r} already exists: {', '.join(existing)}")


def paths(name: str, root: Path) -> tuple[Path, Path, Path]:
    return (
        root / "stockrx_patches" / "patches" / f"{name}.py",
        root / "tests" / "stockrx_patches" / "patches" / f"test_{name}.py",
        root / "config" / "data_patches.yml",
    )


def generate(name: str, driving_table: str, root: Path, description: str | None = None) -> list[Path]:
    """Write the patch module and its test, add its settings entry; returns what it wrote."""
    check_request(name, driving_table, root)
    module, test, config = paths(name, root)
    description = description or f"TODO: what {name} does, in one line"
    entry = yaml_entry(name, description)
    text = config.read_text(encoding="utf-8")
    new_text = insert_entry(text, entry)
    before = yaml.safe_load(text) or {}
    after = yaml.safe_load(new_text) or {}
    if after.get("patches", {}).get(name) is None or {
        k: v for k, v in after["patches"].items() if k != name
    } != (before.get("patches") or {}):
        raise GeneratorError(f"could not add an entry to {config}: add it by hand:\n{entry}")
    module.write_text(patch_source(name, driving_table, description), encoding="utf-8")
    test.parent.mkdir(parents=True, exist_ok=True)
    test.write_text(test_source(name, driving_table), encoding="utf-8")
    config.write_text(new_text, encoding="utf-8")
    return [module, config, test]


# ---------------------------------------------------------------------------------------------
# config/data_patches.yml
# ---------------------------------------------------------------------------------------------


def yaml_entry(name: str, description: str) -> str:
    desc = yaml.safe_dump(description, default_style=None, width=1000).strip()
    desc = desc.removesuffix("\n...").removesuffix("...").strip()
    return (
        f"  {name}:\n"
        f"    description: {desc}\n"
        "    estimated_records: 10000  # rows of the driving table a run is expected to touch\n"
        "    batch_size: 1000  # driving rows per transform batch\n"
        "    memory_limit: 512  # MB the transform step may add to its process\n"
    )


def insert_entry(text: str, entry: str) -> str:
    """``entry`` at the end of the top-level ``patches:`` mapping (before the blank and comment
    lines that lead to the next top-level key), keeping every other line as it is."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if re.match(r"^patches:\s*(#.*)?$", line)), None)
    if start is None:
        body = "" if not text or text.endswith("\n") else "\n"
        return text + body + "patches:\n" + entry
    end = next(
        (i for i in range(start + 1, len(lines)) if re.match(r"^[^\s#]", lines[i])), len(lines)
    )
    while end > start + 1 and (not lines[end - 1].strip() or lines[end - 1].startswith("#")):
        end -= 1
    if end > 0 and not lines[end - 1].endswith("\n"):
        lines[end - 1] += "\n"
    return "".join(lines[:end]) + entry + "".join(lines[end:])


# ---------------------------------------------------------------------------------------------
# The patch module and its test
# ---------------------------------------------------------------------------------------------

PATCH_TEMPLATE = '''"""{description}.

Why: TODO: why the data needs this patch (ticket), which rows it changes and which it leaves alone.
"""

from __future__ import annotations

from typing import Any, ClassVar

from sqlalchemy import false, select

from patch_ops.patch import (
    Changes,
    Invariant,
    Patch,
    PatchRunConfig,
    RunContext,
    Tables,
    lazy_declaration,
)


class {cls}Config(PatchRunConfig):
    """Run options of {name} (ops.plan_patch.config). dry_run, batch_size and the other
    options every patch has are inherited."""

    # Typed options, each with a description: days: int = Field(default=365, description="...")


class {cls}(Patch):
    """{description}."""

    name = "{name}"
    config_class = {cls}Config
    # The table whose ids are frozen, batched and counted as the run's records.
    driving_table = "{table}"
    # The only columns the patch may change, per table (backed up and restored together).
    updates = {{"{table}": ("updated_at",)}}
    # A valid dry-run config (ops.plan_patch.config without dry_run): tests and config/runs/ use it.
    example_config: ClassVar[dict[str, Any]] = {{}}

    # pandera checks of the rows it writes, per table (stockrx_patches/schemas.py); imported
    # when first read, so loading the patch does not import pandera.
    @lazy_declaration
    def schemas():  # type: ignore[misc]
{schema_import}        return {schemas}

    def targets(self, tables: Tables, config: {cls}Config, ctx: RunContext):
        # Per updated table, a SELECT of the ids the patch may change (SQLAlchemy Core, no raw SQL).
        t = tables["{table}"]
        return {{"{table}": select(t.c.id).where(false())}}  # TODO: the rows to change

    def transform(self, batch, config: {cls}Config, ctx: RunContext) -> Changes:
        # Pure: before-images of one batch in, after-images (id, source_id, updates' columns) out.
        import pandas as pd  # here, not at the top: loading the patch must not import it

        rows = batch["{table}"]
        changed = rows[rows["id"] < 0]  # TODO: the rows of this batch that change, and how
        if changed.empty:
            return Changes()
        after = pd.DataFrame(
            {{"id": changed["id"], "source_id": changed["id"], "updated_at": ctx.run_at}}
        )
        return Changes(updates={{"{table}": after}})

    def invariants(self, result, config: {cls}Config) -> list[Invariant]:
        # Whole-set SQL rules over the would-be result (result.updated/inserted): offending rows.
        return []  # TODO: e.g. Invariant("name", "what must hold", select(...offenders...))
'''

TEST_TEMPLATE = '''"""Tests of the {name} patch (from `stockrx-patches new`: fill them in with the patch)."""

from __future__ import annotations

import datetime as dt

import pandas as pd

from patch_ops.patch import RunContext
from stockrx_patches.patches.{name} import {cls}
from tests.support.stockrx import digest, failure_description, run_patch, seeded

PATCH = {cls}()
CTX = RunContext("test", dt.datetime(2026, 11, 29, 1, 2, 3), dt.date(2026, 11, 29))


def batch() -> dict[str, pd.DataFrame]:
    """Before-images of one batch of {table}, as the transform gets them: edit the rows."""
    return {{
        "{table}": pd.DataFrame(
            {{
{columns}
            }}
        )
    }}


def test_transform_changes_something():
    config = PATCH.config_class(**PATCH.example_config)
    changes = PATCH.transform(batch(), config, CTX)
    frames = [*changes.updates.values(), *changes.inserts.values()]
    assert sum(len(f) for f in frames) > 0, (
        "{name}: transform() changes nothing on the example batch: fill in "
        "stockrx_patches/patches/{name}.py (targets, transform, invariants) and this test"
    )


def test_dry_run_of_the_example_config_changes_no_row(sqlite_url):
    engine = seeded(sqlite_url, items=50)
    before = digest(engine)
    result = run_patch(sqlite_url, PATCH.name, {{**PATCH.example_config, "dry_run": True}})
    assert result.success, failure_description(result)
    assert digest(engine) == before
'''


def patch_source(name: str, table: str, description: str) -> str:
    schema = SCHEMA_OF.get(table)
    return PATCH_TEMPLATE.format(
        name=name,
        cls=class_name(name),
        table=table,
        description=description.rstrip(".").replace("\\", "\\\\").replace('"', '\\"'),
        schema_import=f"        from stockrx_patches.schemas import {schema}\n\n" if schema else "",
        schemas=f'{{"{table}": {schema}}}' if schema else "{}",
    )


def test_source(name: str, table: str) -> str:
    rows = [f'                "{c.name}": {_example_values(c)},' for c in metadata.tables[table].columns]
    return TEST_TEMPLATE.format(name=name, cls=class_name(name), table=table, columns="\n".join(rows))


def _example_values(column) -> str:  # type: ignore[no-untyped-def]
    """Three example values of a column, as Python source."""
    kind = column.type.python_type
    if column.name == "id" or column.name.endswith("_id"):
        return "[1, 2, 3]"
    if kind is int:
        return "[1, 0, 1]"
    if kind is str:
        return json.dumps([f"{column.name} {i}" for i in (1, 2, 3)], ensure_ascii=False)
    if kind is dt.datetime:
        return "[dt.datetime(2026, 11, 1, 9, 0)] * 3"
    if kind is dt.date:
        return "[dt.date(2026, 11, 1), dt.date(2026, 12, 1), None]"
    return "[1250.0, 0.0, 99.5]"  # Numeric
