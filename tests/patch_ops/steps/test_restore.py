"""restore_patch and purge_expired_backups: undo any committed patch from its backup, conflicts
in both modes, linkage and double-restore refusal, retention purge, the CLIs."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from dagster import ExecuteInProcessResult
from sqlalchemy import func, select, text, update

from patch_ops.audit import AuditKeyring, read_events, verify_chain
from patch_ops.lifecycle import AUDIT
from patch_ops.patch import Changes, Patch, PatchSettings
from patch_ops.state import BACKUP, INSERT, UPDATE, executions
from patch_ops.target_sets import target_counts
from patch_ops.work_rows import existing_rows
from resources.audit import AuditLog
from stockrx_patches.cli import main as cli_main
from stockrx_patches.definitions import build_definitions
from stockrx_patches.registry import default_registry
from stockrx_patches.tables import batches, inventories, inventory_logs
from tests.conftest import TEST_AUDIT_KEY
from tests.stockrx_patches.patches.test_batch_expiry_update import (
    JOB,
    REAL,
    build_fixture,
    fixture_engine,
    state,
)
from tests.support.stockrx import (
    PRICE_JOB,
    defs_with,
    digest,
    failure_description,
    latest_execution,
    run_job,
    run_patch,
    seeded,
)

PCT8 = {"adjustment_type": "percentage", "adjustment_value": 8, "dry_run": False}
PATCH_RUNS = {PRICE_JOB: PCT8, JOB: REAL}


def restore(url: str, execution_id: str, **cfg: Any) -> ExecuteInProcessResult:
    return run_job(url, "restore_patch", "plan_restore", {"execution_id": execution_id, **cfg})


def purge(url: str, **cfg: Any) -> ExecuteInProcessResult:
    return run_job(url, "purge_expired_backups", "purge_backups", cfg)


def execution(engine, execution_id: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return dict(
            conn.execute(select(executions).where(executions.c.execution_id == execution_id))
            .mappings().one()
        )


def committed(url: str, job: str = JOB, defs=None) -> str:  # type: ignore[no-untyped-def]
    result = run_patch(url, job, PATCH_RUNS.get(job, {"dry_run": False}), defs=defs)
    assert result.success, failure_description(result)
    ex = latest_execution(fixture_engine(url))
    assert ex["phase"] == "verified"
    return str(ex["execution_id"])


# ---------------------------------------------------------------------------------------------
# patch → restore = before, for both patches
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("job", [PRICE_JOB, JOB])
def test_patch_then_restore_gives_the_before_digest(database_url, job):
    engine = seeded(database_url, items=300)
    before = digest(engine)
    patched_id = committed(database_url, job)
    after_patch = digest(engine)
    assert after_patch != before
    counts = execution(engine, patched_id)["report"]["committed"]

    dry = restore(database_url, patched_id)  # dry run by default
    assert dry.success, failure_description(dry)
    assert digest(engine) == after_patch
    dry_ex = latest_execution(engine)
    assert dry_ex["kind"] == "restore" and dry_ex["dry_run"] and dry_ex["status"] == "completed"
    assert dry_ex["restores_execution_id"] == patched_id
    would = dry_ex["report"]["would_restore"]
    assert {f"{t}_updated": n for t, n in would["updated"].items()} | {
        f"{t}_inserted": n for t, n in would["deleted"].items()} == counts
    assert "DRY RUN" in dry_ex["report_markdown"]
    assert execution(engine, patched_id)["restored_by_execution_id"] is None

    real = restore(database_url, patched_id, dry_run=False)
    assert real.success, failure_description(real)
    assert digest(engine) == before  # every table identical to before the patch
    restore_ex = latest_execution(engine)
    assert restore_ex["status"] == "completed" and restore_ex["phase"] == "restored"
    assert restore_ex["restores_execution_id"] == patched_id and not restore_ex["dry_run"]
    assert restore_ex["processed_records"] == sum(counts.values())
    assert execution(engine, patched_id)["restored_by_execution_id"] == restore_ex["execution_id"]
    with engine.connect() as conn:
        assert not conn.execute(text("SELECT count(*) FROM data_patch_locks")).scalar()

    again = restore(database_url, patched_id, dry_run=False)
    assert not again.success
    assert "restoring it twice is refused" in failure_description(again)
    assert digest(engine) == before
    refused = latest_execution(engine)
    assert refused["kind"] == "restore" and refused["status"] == "failed"
    assert restore_ex["execution_id"] in refused["error_message"]


def test_restore_refuses_what_cannot_be_restored(database_url):
    engine = seeded(database_url, items=50)
    dry = run_patch(database_url, PRICE_JOB, {**PCT8, "dry_run": True})
    assert dry.success
    dry_id = latest_execution(engine)["execution_id"]
    bad = run_patch(  # a real run refused at plan (value out of range)
        database_url, PRICE_JOB, {**PCT8, "adjustment_value": 5000}, approve=False
    )
    assert not bad.success
    bad_id = latest_execution(engine)["execution_id"]
    assert not latest_execution(engine)["dry_run"]
    before = digest(engine)
    cases = {
        dry_id: "was a dry run",
        bad_id: "never committed",
        "8f9c2b4e-0000-4000-8000-000000000000": "unknown execution",
        "x'; DROP TABLE inventories; --": "not an execution id",
    }
    for execution_id, message in cases.items():
        result = restore(database_url, execution_id, dry_run=False)
        assert not result.success
        assert message in failure_description(result), failure_description(result)
        assert "restore refused, nothing changed" in failure_description(result)
    assert digest(engine) == before


# ---------------------------------------------------------------------------------------------
# Conflicts: rows the application changed after the patch
# ---------------------------------------------------------------------------------------------


def _app_changes_after_patch(engine) -> None:  # type: ignore[no-untyped-def]
    """Item 1 sold 5 units; a lot of item 2 was corrected; a log row of item 3 was annotated."""
    with engine.begin() as conn:
        conn.execute(update(inventories).where(inventories.c.id == 1).values(
            quantity=inventories.c.quantity - 5, updated_at=dt.datetime(2026, 11, 30, 9)))
        conn.execute(update(batches).where(batches.c.lot_code == "E").values(quantity=1))
        conn.execute(update(inventory_logs).where(
            inventory_logs.c.inventory_id == 3, inventory_logs.c.operation_type == "remove"
        ).values(note="checked by the pharmacist"))


def test_conflicts_refuse_by_default_and_are_skipped_on_request(database_url):
    engine = fixture_engine(database_url)
    build_fixture(engine)
    before_patch = state(engine)
    patched_id = committed(database_url)
    _app_changes_after_patch(engine)
    after_app = digest(engine)
    items_app, lots_app, logs_app, _ = state(engine)

    for dry_run in (True, False):
        refused = restore(database_url, patched_id, dry_run=dry_run)
        assert not refused.success
        desc = failure_description(refused)
        assert "changed 3 row(s) after the patch; restore refused" in desc, desc
        assert digest(engine) == after_app
        ex = latest_execution(engine)
        assert ex["status"] == "failed" and ex["kind"] == "restore"
        conflicts = ex["report"]["conflicts"]
        assert {t: c["count"] for t, c in conflicts.items()} == {
            "inventories": 1, "batches": 1, "inventory_logs": 1}
        assert conflicts["inventories"]["ids"] == [1]
        assert conflicts["inventories"]["sample"][0]["quantity"] == "50 → 45"
        md = ex["report_markdown"]
        assert "### Conflicts in inventories: 1" in md and "**Refused**" in md
    assert execution(engine, patched_id)["restored_by_execution_id"] is None

    partial = restore(database_url, patched_id, dry_run=False, skip_conflicts=True)
    assert partial.success, failure_description(partial)
    items, lots, logs, _ = state(engine)  # counter caches still true
    # items 1, 2, 3 keep every change (their own and the app's); item 5 is fully restored
    assert {i: items[i] for i in (1, 2, 3)} == {i: items_app[i] for i in (1, 2, 3)}
    assert items[5] == before_patch[0][5] == 11
    assert (lots["J"], lots["K"]) == (4, 6) and lots["E"] == 1 and lots["B"] == 0
    assert logs == [row for row in logs_app if row[0] != 5]
    ex = latest_execution(engine)
    assert ex["phase"] == "restored" and ex["report"]["skipped_sources"] == 3
    assert ex["report"]["restored"] == {
        "updated": {"inventories": 1, "batches": 2}, "deleted": {"inventory_logs": 2}}
    assert execution(engine, patched_id)["restored_by_execution_id"] == ex["execution_id"]


class SplitItems(Patch):
    """Test patch that updates and inserts into the same table: each item keeps half of its
    stock and a new item row gets the other half."""

    name = "split_items"
    driving_table = "inventories"
    example_config: dict[str, object] = {}
    updates = {"inventories": ("quantity", "updated_at")}
    inserts = {"inventories": ("name", "quantity", "price", "status", "batches_count",
                               "inventory_logs_count", "shipments_count", "receipts_count",
                               "created_at", "updated_at")}

    def targets(self, tables, config, ctx):  # type: ignore[no-untyped-def]
        inv = tables["inventories"]
        return {"inventories": select(inv.c.id).where(inv.c.quantity >= 2)}

    def transform(self, batch, config, ctx):  # type: ignore[no-untyped-def]
        inv = batch["inventories"]
        keep = inv["quantity"] // 2
        upd = pd.DataFrame({"id": inv["id"], "source_id": inv["id"], "quantity": keep,
                            "updated_at": ctx.run_at})
        new = pd.DataFrame({"source_id": inv["id"], "name": inv["name"] + " (split)",
                            "quantity": inv["quantity"] - keep, "price": inv["price"],
                            "status": inv["status"], "batches_count": 0,
                            "inventory_logs_count": 0, "shipments_count": 0, "receipts_count": 0,
                            "created_at": ctx.run_at, "updated_at": ctx.run_at})
        return Changes(updates={"inventories": upd}, inserts={"inventories": new})


def test_conflict_on_a_row_inserted_into_an_updated_table(database_url):
    engine = fixture_engine(database_url)
    build_fixture(engine, lots={i: [("X", 100, 10 * i)] for i in range(1, 5)})
    before = digest(engine)
    defs = defs_with((SplitItems(), PatchSettings("split")))
    patched_id = committed(database_url, "split_items", defs=defs)
    with engine.begin() as conn:  # the app renames the new row split off item 3
        conn.execute(update(inventories).where(inventories.c.name == "item 3 (split)")
                     .values(name="item 3 bis"))
    result = restore(database_url, patched_id, dry_run=False, skip_conflicts=True)
    assert result.success, failure_description(result)
    with engine.connect() as conn:
        rows = dict(conn.execute(select(inventories.c.name, inventories.c.quantity)).all())
    # item 3's source is left whole (its half and the renamed new row); the others are undone
    assert rows == {"item 1": 10, "item 2": 20, "item 3": 15, "item 3 bis": 15, "item 4": 40}
    assert latest_execution(engine)["report"]["skipped_sources"] == 1
    assert digest(engine) != before


# ---------------------------------------------------------------------------------------------
# Retention
# ---------------------------------------------------------------------------------------------


def _work_rows(engine, execution_id: str) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """The execution's work rows (backup, updates, inserts) and frozen ids, by the table that
    holds them: its tables of its own, empty ones too (the purge drops them all)."""
    counts: dict[str, int] = {}
    tables = ["inventories", "batches", "inventory_logs"]
    with engine.connect() as conn:
        for t in tables:
            for action in (BACKUP, UPDATE, INSERT):
                rows = existing_rows(conn, t, execution_id, action)
                if rows is not None:
                    n = conn.execute(
                        select(func.count()).select_from(rows.table).where(rows.mine)
                    ).scalar_one()
                    counts[rows.table.name] = counts.get(rows.table.name, 0) + n
        counts.update(target_counts(conn, execution_id, tables))
    return counts


def test_purge_expired_backups(database_url):
    engine = fixture_engine(database_url)
    build_fixture(engine)
    old_id = committed(database_url)
    recent_id = committed(database_url, PRICE_JOB)
    long_ago = dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(days=91)
    with engine.begin() as conn:
        conn.execute(update(executions).where(executions.c.execution_id == old_id)
                     .values(started_at=long_ago, completed_at=long_ago))
    old_tables, recent_tables = _work_rows(engine, old_id), _work_rows(engine, recent_id)
    old_rows, recent_rows = sum(old_tables.values()), sum(recent_tables.values())
    assert old_rows and recent_rows

    dry = purge(database_url)  # dry run, 90 days from data_patches.yml
    assert dry.success, failure_description(dry)
    ex = latest_execution(engine)
    assert ex["kind"] == "purge" and ex["dry_run"] and ex["status"] == "completed"
    assert [e["execution_id"] for e in ex["report"]["executions"]] == [old_id]
    assert ex["report"]["rows"] == old_rows and ex["report"]["retention_days"] == 90
    assert ex["report"]["executions"][0]["rows"] == old_tables  # every table it would drop
    assert _work_rows(engine, old_id) == old_tables  # nothing removed

    real = purge(database_url, dry_run=False)
    assert real.success, failure_description(real)
    purge_ex = latest_execution(engine)
    assert purge_ex["kind"] == "purge" and not purge_ex["dry_run"]
    assert purge_ex["processed_records"] == 1 and purge_ex["report"]["rows"] == old_rows
    assert f"Removed: {old_rows:,} rows of 1 execution(s)" in purge_ex["report_markdown"]
    # the old execution's tables of its own are gone; the recent one's are untouched
    assert _work_rows(engine, old_id) == {} and _work_rows(engine, recent_id) == recent_tables
    assert execution(engine, old_id)["report"]["backup_purged"]["by"] == purge_ex["execution_id"]

    refused = restore(database_url, old_id, dry_run=False)
    assert not refused.success and "was purged" in failure_description(refused)

    assert purge(database_url, dry_run=False).success  # nothing left to do
    assert latest_execution(engine)["report"]["executions"] == []
    assert not purge(database_url, retention_days=0).success


# ---------------------------------------------------------------------------------------------
# Audit trail
# ---------------------------------------------------------------------------------------------


# On SQLite: the key check is Python and an audit event is the same append on every database
# (tests/patch_ops/audit/test_audit.py runs the audit chain on all three; the fault matrix's
# restore cases verify the chain after a restore on PostgreSQL and MariaDB).
def test_restore_and_purge_are_audited_and_need_the_audit_key(sqlite_url, monkeypatch):
    database_url = sqlite_url
    engine = fixture_engine(database_url)
    build_fixture(engine)
    patched_id = committed(database_url)
    after_patch = digest(engine)

    monkeypatch.delenv("STOCKRX_AUDIT_KEYS", raising=False)
    monkeypatch.delenv("STOCKRX_AUDIT_KEY_FILE", raising=False)
    keyless = build_definitions(default_registry(), resources={AUDIT: AuditLog()})
    cfg = {"execution_id": patched_id, "dry_run": False}
    refused = run_job(database_url, "restore_patch", "plan_restore", cfg, defs=keyless)
    assert not refused.success
    assert "no audit key configured: a real restore" in failure_description(refused)
    assert digest(engine) == after_patch
    assert run_job(database_url, "restore_patch", "plan_restore", {**cfg, "dry_run": True},
                   defs=keyless).success  # a dry run needs no key
    assert not run_job(database_url, "purge_expired_backups", "purge_backups",
                       {"dry_run": False}, defs=keyless).success
    monkeypatch.undo()

    assert restore(database_url, patched_id, dry_run=False).success
    restore_id = latest_execution(engine)["execution_id"]
    assert purge(database_url, dry_run=False).success
    purge_id = latest_execution(engine)["execution_id"]
    keyring = AuditKeyring.parse(TEST_AUDIT_KEY)
    events = [e for e in read_events(engine, keyring, restore_id) if e["event_type"] == "restore"]
    assert [e["public"]["stage"] for e in events] == ["planned", "applied"]
    applied = events[1]["public"]
    assert applied["restores"] == patched_id and applied["conflicts"] == {}
    assert applied["rows"] == {"updated": {"inventories": 4, "batches": 6},
                               "deleted": {"inventory_logs": 6}}
    assert "purge" in [e["event_type"] for e in read_events(engine, keyring, purge_id)]
    assert verify_chain(engine, keyring).ok


# ---------------------------------------------------------------------------------------------
# The CLIs
# ---------------------------------------------------------------------------------------------


# On SQLite: the commands only launch restore_patch / purge_expired_backups and print their
# reports; what the restore does on PostgreSQL and MariaDB, conflicts included, is
# test_patch_then_restore_gives_the_before_digest and
# test_conflicts_refuse_by_default_and_are_skipped_on_request.
def test_stockrx_patches_restore_and_purge_commands(sqlite_url, capsys):
    database_url = sqlite_url
    engine = fixture_engine(database_url)
    build_fixture(engine)
    before = digest(engine)
    patched_id = committed(database_url)
    db = ["--database-url", database_url]
    assert cli_main(["restore", patched_id, *db]) == 0
    out = capsys.readouterr().out
    assert "DRY RUN" in out and "inventory_logs rows inserted by the patch would be deleted | 6" in out
    _app_changes_after_patch(engine)
    assert cli_main(["restore", patched_id, "--apply", *db]) == 1
    captured = capsys.readouterr()
    assert "restore refused" in captured.err and "### Conflicts in batches: 1" in captured.out
    assert cli_main(["restore", patched_id, "--apply", "--skip-conflicts", *db]) == 0
    assert "restored: restore execution" in capsys.readouterr().out
    assert cli_main(["restore", patched_id, "--apply", *db]) == 1
    assert "restoring it twice is refused" in capsys.readouterr().err
    assert cli_main(["purge-backups", *db]) == 0
    assert "Would remove: 0 rows of 0 execution(s)" in capsys.readouterr().out
    assert digest(engine) != before  # the conflicting items kept their changes


# The multiprocess/CLI run of restore_patch, on SQLite (in-process tests cover PostgreSQL too).
@pytest.mark.slow
def test_dagster_cli_restores_a_committed_patch(sqlite_url, dagster_home, repo_root: Path,
                                                tmp_path):
    engine = seeded(sqlite_url, items=200)
    before = digest(engine)
    patched_id = committed(sqlite_url)
    assert digest(engine) != before
    cfg = tmp_path / "restore.yaml"
    shipped = yaml.safe_load((repo_root / "config/runs/restore_patch.real.yaml").read_text())
    shipped["ops"]["plan_restore"]["config"]["execution_id"] = patched_id
    cfg.write_text(yaml.safe_dump(shipped))
    env = {**os.environ, "STOCKRX_DATABASE_URL": sqlite_url, "DAGSTER_HOME": str(dagster_home)}
    res = subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), "job", "execute", "-m",
         "stockrx_patches.definitions", "-j", "restore_patch", "-c", str(cfg)],
        cwd=repo_root, env=env, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert digest(engine) == before
    assert execution(engine, patched_id)["restored_by_execution_id"] is not None
    with engine.connect() as conn:
        kinds = conn.execute(select(executions.c.kind, func.count()).group_by(executions.c.kind)).all()
    assert dict(kinds)["restore"] == 1  # patch: the real run and the dry run approving it
