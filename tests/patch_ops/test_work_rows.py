"""Each new execution's work rows (before-images, staged updates, staged inserts) are tables of
its own (``patch_ops.work_rows``), kept as long as the shared mirrors kept its rows and dropped
where those were deleted; an execution the previous version stored (its work rows in the shared
mirrors, ``storage`` 1) approves, is restored, is purged, and, killed mid-transform, is
abandoned with its rows there (one paused at a window's end resumes there). On SQLite, PostgreSQL and MariaDB (as the least-privilege user there)."""

from __future__ import annotations

from pathlib import Path

import pytest
from dagster import DagsterInstance
from sqlalchemy import func, inspect, select, update
from sqlalchemy.engine import Engine

from patch_ops import state
from patch_ops.database import get_engine
from patch_ops.dialects.names import framework_schema
from patch_ops.state import BACKUP, INSERT, UPDATE
from patch_ops.steps import locks as lock_rules
from patch_ops.target_sets import OWN_TARGETS, own_table_name
from patch_ops.work_rows import OWN_KINDS, OWN_WORK_ROWS, existing_rows
from stockrx_patches.tables import inventories
from tests.conftest import TEST_NOW_ENV
from tests.patch_ops.test_windows import (
    AFTER_SUNDAY_WINDOW,
    REAL,
    SUN_0359,
    WED_0200,
    WindowEndPatch,
    window_defs,
)
from tests.support.faults import ITEMS, FaultPrice, patch_run, restore_run, run_and_kill
from tests.support.stockrx import (
    PRICE_JOB,
    failure_description,
    hand_built,
    latest_execution,
    prices,
    run_patch,
    seeded,
)
from tests.support.storage import as_stored_by, purge_as_expired

PCT8 = {"adjustment_type": "percentage", "adjustment_value": 8}
TABLES = ("inventories", "inventory_logs")


def run(url: str, dry_run: bool) -> dict:  # type: ignore[type-arg]
    result = run_patch(url, PRICE_JOB, {**PCT8, "dry_run": dry_run}, approve=False)
    assert result.success, failure_description(result)
    return latest_execution(get_engine(url))


def own_counts(engine: Engine, execution_id: str) -> dict[tuple[str, str], int]:
    """Rows of each of an execution's tables of its own that stand, by (action, table)."""
    found = {}
    with engine.connect() as conn:
        for table in TABLES:
            for action in OWN_KINDS:
                rows = existing_rows(conn, table, execution_id, action)
                if rows is not None:
                    assert not rows.shared
                    found[(action, table)] = conn.execute(
                        select(func.count()).select_from(rows.table)).scalar_one()
    return found


def shared_counts(engine: Engine, execution_id: str) -> int:
    """Rows of an execution in the shared mirrors."""
    n = 0
    with engine.connect() as conn:
        for table in TABLES:
            for kind in ("backup", "stage"):
                mirror = state.mirror_by_name(conn, state.mirror_name(kind, table))
                if mirror is not None:
                    n += conn.execute(select(func.count()).select_from(mirror).where(
                        mirror.c.dp_execution_id == execution_id)).scalar_one()
    return n


def standing(engine: Engine, execution_id: str) -> set[str]:
    """The names of an execution's tables of its own (work rows) that exist."""
    names = {own_table_name(kind, execution_id, t) for t in TABLES for kind in OWN_KINDS.values()}
    return names & set(inspect(engine).get_table_names(schema=framework_schema(engine)))


def test_a_run_keeps_its_work_rows_in_tables_of_its_own(database_url):
    engine = hand_built(database_url, [100, 200, 300])
    before = prices(engine)
    dry = run(database_url, True)
    d = dry["execution_id"]
    assert dry["storage"] == OWN_WORK_ROWS and shared_counts(engine, d) == 0
    # An approving dry run keeps its fingerprint (its backup and updates of the tables with
    # drift columns); the rest is dropped as it finishes.
    kept = dry["report"]["approval_fingerprint"]["columns"]
    assert set(own_counts(engine, d)) == {(a, t) for t in kept for a in (BACKUP, UPDATE)}
    assert own_counts(engine, d)[(BACKUP, "inventories")] == 3

    real = run(database_url, False)
    x = real["execution_id"]
    assert real["approved_by_execution_id"] == d and real["phase"] == "verified"
    assert shared_counts(engine, x) == 0
    assert own_counts(engine, x) == {
        (BACKUP, "inventories"): 3, (BACKUP, "inventory_logs"): 0,
        (UPDATE, "inventories"): 3, (INSERT, "inventory_logs"): 3,
    }
    # The next dry run drops the fingerprint the real run used: it can approve nothing.
    run(database_url, True)
    assert standing(engine, d) == set()
    assert len(standing(engine, x)) == 4  # a committed run's stay, for restore

    restored = restore_run(database_url, x)
    assert restored.success, failure_description(restored)
    assert prices(engine) == before
    purge_as_expired(engine, x)
    assert standing(engine, x) == set()


def test_the_previous_versions_executions_approve_restore_and_purge(database_url):
    engine = hand_built(database_url, [100, 200, 300])
    before = prices(engine)
    dry = run(database_url, True)
    as_stored_by(engine, dry["execution_id"], OWN_TARGETS)  # approved across the upgrade
    assert shared_counts(engine, dry["execution_id"]) > 0
    assert standing(engine, dry["execution_id"]) == set()
    # Its fingerprint is read there: a price the application changed since is drift (1 of 3:
    # refused), and with the price back the real run it approved goes ahead.
    with engine.begin() as conn:
        conn.execute(update(inventories).where(inventories.c.id == 2).values(price=250))
    refused = run_patch(database_url, PRICE_JOB, {**PCT8, "dry_run": False}, approve=False)
    assert not refused.success
    assert "changed since approving dry run" in failure_description(refused)
    assert "2 (inventories 2: price before 200, approved 216, now 250)" in failure_description(
        refused)
    with engine.begin() as conn:
        conn.execute(update(inventories).where(inventories.c.id == 2).values(price=200))
    real = run(database_url, False)
    x = real["execution_id"]
    assert real["approved_by_execution_id"] == dry["execution_id"]
    as_stored_by(engine, x, OWN_TARGETS)
    assert shared_counts(engine, x) == 3 + 3 + 3 and standing(engine, x) == set()
    restored = restore_run(database_url, x)
    assert restored.success, failure_description(restored)
    assert prices(engine) == before
    purge_as_expired(engine, x)
    assert shared_counts(engine, x) == 0


def test_a_run_of_the_previous_version_killed_mid_transform_is_abandoned_with_its_rows(
    database_url, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(lock_rules, "LOCK_PID_GRACE_SECONDS", 0.0)  # stale once its pid is gone
    engine = seeded(database_url, items=ITEMS)
    before = prices(engine)
    run_and_kill(database_url, "transform:batch:2", tmp_path)
    killed = latest_execution(engine, FaultPrice.name)
    dead = killed["execution_id"]
    as_stored_by(engine, dead, OWN_TARGETS)
    assert killed["batches_done"] == 2 and killed["staged_updates"] > 0
    staged = killed["staged_updates"] + killed["staged_inserts"]
    assert shared_counts(engine, dead) == ITEMS + staged  # before-images, 2 batches staged

    again = patch_run(database_url)  # releases the dead run's locks, plans afresh
    assert again.success, failure_description(again)
    done = latest_execution(engine, FaultPrice.name)
    assert done["execution_id"] != dead and done["phase"] == "verified"
    assert shared_counts(engine, dead) == 0  # nothing of it reached the live tables
    assert shared_counts(engine, done["execution_id"]) == 0
    assert own_counts(engine, done["execution_id"])[(UPDATE, "inventories")] == done["staged_updates"] > 0
    now = prices(engine)  # applied once: whole yen, +8 %
    assert set(now) == set(before)
    assert all(abs(now[i] - before[i] * 1.08) <= 0.5 for i in before)


def test_a_run_the_previous_version_paused_resumes_in_the_shared_mirrors(
    database_url, monkeypatch: pytest.MonkeyPatch, dagster_home
):
    """An execution paused at a window's end by the previous version (its work rows in the
    shared mirrors: storage 1) continues there in the next window: its stage is read and
    written where its first batches are, nothing in tables of its own."""
    engine = seeded(database_url, items=200)  # 10 batches of 20
    old = prices(engine)
    defs = window_defs(WindowEndPatch)
    WindowEndPatch.calls, WindowEndPatch.moves = 0, {3: AFTER_SUNDAY_WINDOW}
    monkeypatch.setenv(TEST_NOW_ENV, SUN_0359)  # the fixed clock: a minute of the window left
    instance = DagsterInstance.get()
    first = run_patch(
        database_url, WindowEndPatch.name, REAL, defs=defs, instance=instance, approve=False
    )
    assert first.success, failure_description(first)
    paused = latest_execution(engine)
    assert (paused["status"], paused["batches_done"]) == ("paused", 3)
    as_stored_by(engine, paused["execution_id"], OWN_TARGETS)

    monkeypatch.setenv(TEST_NOW_ENV, WED_0200)  # the next window
    second = run_patch(
        database_url, WindowEndPatch.name, REAL, defs=defs, instance=instance, approve=False
    )

    assert second.success, failure_description(second)
    done = latest_execution(engine)
    assert done["execution_id"] == paused["execution_id"]
    assert (done["phase"], done["batches_done"], done["storage"]) == ("verified", 10, OWN_TARGETS)
    with engine.connect() as conn:
        live = state.reflect_tables(conn, ["inventories", "inventory_logs"])
        rows = {a: existing_rows(conn, t, done["execution_id"], a)
                for a, t in ((BACKUP, "inventories"), (UPDATE, "inventories"),
                             (INSERT, "inventory_logs"))}
        assert all(r is not None and r.shared for r in rows.values())
        counts = {a: conn.execute(select(func.count()).select_from(r.table).where(r.mine))
                  .scalar_one() for a, r in rows.items()}
    assert counts == {BACKUP: 200, UPDATE: done["staged_updates"],
                      INSERT: done["staged_inserts"]}
    assert not {own_table_name(k, done["execution_id"], t) for t in live
                for k in OWN_KINDS.values()} & set(inspect(engine).get_table_names(
                    schema=framework_schema(engine)))
    new = prices(engine)
    assert all(new[i] == int(old[i] * 1.08 + 0.5 + 1e-7) for i in old)
