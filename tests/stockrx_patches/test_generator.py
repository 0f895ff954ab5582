"""A third patch = one file + one YAML entry + its test: `stockrx-patches new` writes exactly
those into a copy of the repository, and the code location there loads with the new jobs, their
table tags and run-queue limits, while the generated test fails until the patch is filled in."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stockrx_patches.cli import main as cli_main
from tests.conftest import TEST_PYTHONPATH

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# Run in the copy: its stockrx_patches (with the new patches) comes first on the path; patch_ops,
# resources and tests.support are the repository's. Prints what the test checks, as JSON.
PROBE = """
import importlib.util, json, sys
import stockrx_patches
from stockrx_patches.definitions import defs
from stockrx_patches.registry import default_registry, instance_config

out = {"package": stockrx_patches.__file__, "jobs": {}, "tests": {}}
for job in defs.resolve_all_job_defs():
    out["jobs"][job.name] = dict(job.tags)
out["written"] = {n: list(p.written_tables()) for n, p in default_registry().patches.items()}
out["limits"] = instance_config()["concurrency"]["runs"]["tag_concurrency_limits"]
for path in sys.argv[1:]:
    spec = importlib.util.spec_from_file_location("generated_" + path.rsplit("/", 1)[1][:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        module.test_transform_changes_something()
        out["tests"][path] = "passed"
    except AssertionError as exc:
        out["tests"][path] = str(exc)
print(json.dumps(out))
"""


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """The parts of the repository a patch lives in: the package (with its patches), config/ and
    the instance config's base."""
    copy = tmp_path / "repo"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "stockrx_patches", copy / "stockrx_patches", ignore=ignore)
    shutil.copytree(REPO / "config", copy / "config", ignore=ignore)
    shutil.copy(REPO / "dagster.yaml", copy / "dagster.yaml")
    return copy


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _new(root: Path, name: str, table: str, *extra: str) -> int:
    return cli_main(["new", name, "--driving-table", table, "--root", str(root), *extra])


def test_a_new_patch_is_one_file_one_entry_and_its_test(root: Path, capsys) -> None:
    before = _files(root)
    settings = yaml.safe_load((root / "config" / "data_patches.yml").read_text())

    assert _new(root, "archive_idle_items", "inventories") == 0
    assert _new(root, "relabel_lots", "batches", "--description", "Relabel lots: a, b") == 0
    out = capsys.readouterr().out
    assert "wrote stockrx_patches/patches/archive_idle_items.py and tests/stockrx_patches/patches/test_archive_idle_items.py" in out

    after = _files(root)
    assert sorted(set(after) - set(before)) == [
        "stockrx_patches/patches/archive_idle_items.py",
        "stockrx_patches/patches/relabel_lots.py",
        "tests/stockrx_patches/patches/test_archive_idle_items.py",
        "tests/stockrx_patches/patches/test_relabel_lots.py",
    ]
    assert [f for f in before if after[f] != before[f]] == ["config/data_patches.yml"]
    new_settings = yaml.safe_load(after["config/data_patches.yml"])
    assert {k: v for k, v in new_settings.items() if k != "patches"} == {
        k: v for k, v in settings.items() if k != "patches"
    }
    assert list(new_settings["patches"]) == [*settings["patches"], "archive_idle_items",
                                             "relabel_lots"]
    assert new_settings["patches"]["relabel_lots"] == {
        "description": "Relabel lots: a, b",
        "estimated_records": 10000,
        "batch_size": 1000,
        "memory_limit": 512,
    }
    # The old text is kept as it was (comments too): the entries are only inserted.
    old_text = before["config/data_patches.yml"].decode()
    new_text = after["config/data_patches.yml"].decode()
    assert [line for line in new_text.splitlines() if line in old_text.splitlines()] == \
        old_text.splitlines()

    generated = [root / p for p in sorted(set(after) - set(before)) if p.endswith(".py")]
    first_party = "lint.isort.known-first-party = ['patch_ops', 'resources', 'stockrx_patches', 'tests']"
    lint = subprocess.run(
        [str(BIN / "ruff"), "check", "--config", str(REPO / "pyproject.toml"),
         "--config", first_party, *map(str, generated)],
        capture_output=True, text=True,
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr

    # "Fill in" one of them: the transform changes the rows that hold stock.
    relabel = root / "stockrx_patches" / "patches" / "relabel_lots.py"
    text = relabel.read_text()
    assert 'rows[rows["id"] < 0]' in text
    relabel.write_text(text.replace('rows[rows["id"] < 0]', 'rows[rows["quantity"] > 0]'))

    generated = root / "tests" / "stockrx_patches" / "patches"
    tests = [generated / "test_archive_idle_items.py", generated / "test_relabel_lots.py"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), TEST_PYTHONPATH]))
    probe = subprocess.run(
        [sys.executable, "-c", PROBE, *map(str, tests)],
        cwd=root, env=env, capture_output=True, text=True, timeout=120,
    )
    assert probe.returncode == 0, probe.stderr[-4000:]
    seen = json.loads(probe.stdout.splitlines()[-1])

    assert seen["package"] == str(root / "stockrx_patches" / "__init__.py")
    for name, table in (("archive_idle_items", "inventories"), ("relabel_lots", "batches")):
        tags = seen["jobs"][name]
        assert tags["stockrx/patch"] == name
        assert tags["stockrx/tables"] == table
        assert {k for k in tags if k.startswith("stockrx-table/")} == {f"stockrx-table/{table}"}
        assert seen["written"][name] == [table]
    assert {"inventory_price_adjustment", "batch_expiry_update"} <= set(seen["jobs"])
    assert {lim["key"]: lim["limit"] for lim in seen["limits"]} == {
        "stockrx-table/inventories": 1, "stockrx-table/batches": 1, "stockrx-table/inventory_logs": 1
    }
    archive, relabeled = (seen["tests"][str(t)] for t in tests)
    assert archive.startswith(
        "archive_idle_items: transform() changes nothing on the example batch: fill in "
        "stockrx_patches/patches/archive_idle_items.py"
    )
    assert relabeled == "passed"


@pytest.mark.parametrize(
    ("name", "table", "message"),
    [
        ("inventory_price_adjustment", "inventories",
         "patch 'inventory_price_adjustment' already exists: "
         "stockrx_patches/patches/inventory_price_adjustment.py, its entry in "
         "config/data_patches.yml"),
        ("ArchiveItems", "inventories", "must be a lowercase snake_case Python identifier"),
        ("archive-items", "inventories", "must be a lowercase snake_case Python identifier"),
        ("2archive", "inventories", "must be a lowercase snake_case Python identifier"),
        ("archive__items", "inventories", "must be a lowercase snake_case Python identifier"),
        ("class", "inventories", "must be a lowercase snake_case Python identifier"),
        ("patch", "inventories", "would name its class Patch, which the patch module imports"),
        ("archive_items", "users",
         "driving table 'users' is not a StockRx table (inventories, batches, inventory_logs)"),
    ],
)
def test_refusals_write_nothing(root: Path, capsys, name: str, table: str, message: str) -> None:
    before = _files(root)
    assert _new(root, name, table) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert _files(root) == before


def test_a_name_taken_by_a_generated_patch_or_another_class_is_refused(root: Path, capsys) -> None:
    assert _new(root, "archive_idle_items", "inventories") == 0
    before = _files(root)
    assert _new(root, "archive_idle_items", "batches") == 2
    assert "patch 'archive_idle_items' already exists" in capsys.readouterr().err
    # A module of another name whose class declares the name.
    (root / "stockrx_patches" / "patches" / "other.py").write_text(
        'class X:\n    name = "split_items"\n'
    )
    assert _new(root, "split_items", "inventories") == 2
    assert "a patch named 'split_items' in stockrx_patches/patches/other.py" in (
        capsys.readouterr().err
    )
    assert {k: v for k, v in _files(root).items() if not k.endswith("other.py")} == before
