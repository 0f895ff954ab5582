"""What happens when things go wrong: every failure leaves live tables as they were."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import insert, inspect, select, text, update
from sqlalchemy.exc import OperationalError

from patch_ops import state
from patch_ops.execution import (
    CommitConflict,
    load_execution,
    new_execution_id,
    run_concurrently,
)
from patch_ops.state import executions, rejects
from patch_ops.steps.apply import lock_target_rows
from patch_ops.steps.commit import commit_execution
from stockrx_patches.registry import RegistryError, load_project_config
from stockrx_patches.tables import inventories
from tests.support import slow_patches
from tests.support.stockrx import (
    PRICE_JOB,
    digest,
    failure_description,
    hand_built,
    latest_execution,
    prices,
    run_patch,
    seeded,
    validated_price_run,
)

PCT8 = {"adjustment_type": "percentage", "adjustment_value": 8, "dry_run": False}
DEFS = slow_patches.defs


def test_rows_that_break_the_schema_block_the_commit(database_url):
    engine = seeded(database_url, items=120)
    before = digest(engine)
    result = run_patch(database_url, "negative_price_patch", PCT8, defs=DEFS, approve=False)
    assert not result.success
    assert digest(engine) == before
    ex = latest_execution(engine)
    assert ex["status"] == "failed" and ex["phase"] == "rolled_back"
    assert "failed validation" in ex["error_message"]
    assert ex["failed_records"] > 0
    assert "failed validation" in failure_description(result)
    with engine.connect() as conn:
        rows = conn.execute(
            select(rejects).where(rejects.c.execution_id == ex["execution_id"])
        ).mappings().all()
    assert rows and {r["column_name"] for r in rows} == {"price"}
    assert all(r["source_id"] % 3 == 0 for r in rows)


def test_a_broken_invariant_blocks_the_commit_and_names_the_rows(database_url):
    engine = hand_built(database_url, [100, 200, 300])
    before = digest(engine)
    result = run_patch(database_url, "forgetful_counter_patch", PCT8, defs=DEFS, approve=False)
    assert not result.success
    assert digest(engine) == before
    ex = latest_execution(engine)
    broken = ex["report"]["validation"]["invariants"]
    assert [b["name"] for b in broken] == ["inventory_logs_count_incremented"]
    assert sorted(r["id"] for r in broken[0]["sample"]) == [1, 2, 3]
    assert "inventory_logs_count_incremented" in ex["error_message"]


def test_post_verification_failure_restores_the_backup(database_url):
    engine = seeded(database_url, items=150)
    before = digest(engine)
    result = run_patch(database_url, "fails_after_commit_patch", PCT8, defs=DEFS, approve=False)
    assert not result.success
    assert "verification failed, restored from backup" in failure_description(result)
    assert digest(engine) == before
    ex = latest_execution(engine)
    assert ex["status"] == "failed" and ex["rollback_performed"]
    assert "checked_after_commit" in ex["error_message"]


def test_a_row_changed_by_the_app_after_backup_stops_the_commit(database_url):
    engine = hand_built(database_url, [100, 200, 300])
    old_prices = prices(engine)
    result = run_patch(database_url, "concurrent_app_patch", PCT8, defs=DEFS, approve=False)
    assert not result.success
    desc = failure_description(result)
    assert "application changed rows after the backup" in desc and "[2]" in desc
    assert prices(engine) == old_prices  # nothing committed
    with engine.connect() as conn:
        name = conn.execute(select(inventories.c.name).where(inventories.c.id == 2)).scalar_one()
    assert name == "renamed by the app"  # and the app's update is not lost
    ex = latest_execution(engine)
    assert ex["status"] == "failed" and "inventories" in ex["error_message"]


@pytest.mark.postgres
def test_an_app_update_racing_the_commit_is_not_overwritten(pg_url):
    # The application updates item 2 in a transaction that is still open when the commit
    # starts: the commit waits for the row's lock, then finds the row no longer equal to its
    # backup, and commits nothing. A plain UPDATE from the stage would overwrite the change.
    engine = hand_built(pg_url, [100, 200, 300])
    execution_id, _ = validated_price_run(engine)
    old_prices = prices(engine)
    waiting = text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE wait_event_type = 'Lock' AND datname = current_database()"
    )
    with engine.connect() as app, ThreadPoolExecutor(max_workers=1) as pool:
        app_tx = app.begin()
        app.execute(update(inventories).where(inventories.c.id == 2).values(name="app's"))
        commit = pool.submit(commit_execution, engine, execution_id)
        deadline = time.monotonic() + 60
        with engine.connect() as watcher:
            while not watcher.execute(waiting).scalar_one():
                assert not commit.done(), commit.exception()
                assert time.monotonic() < deadline, "the commit never waited for the app's row"
                time.sleep(0.05)
        app_tx.commit()
        with pytest.raises(CommitConflict, match=r"inventories: 1 row\(s\), ids \[2\]"):
            commit.result(timeout=60)
    assert prices(engine) == old_prices  # nothing committed
    with engine.connect() as conn:
        name = conn.execute(select(inventories.c.name).where(inventories.c.id == 2)).scalar_one()
        ex = load_execution(conn, execution_id)
    assert name == "app's"  # the application's update is kept
    assert ex["phase"] == "validated"


@pytest.mark.postgres
def test_the_commit_locks_every_target_row_before_its_conflict_check(pg_url):
    # Locked rows cannot change between the conflict check and the UPDATE (commit and restore):
    # the application waits instead. Here the application gives up at once (NOWAIT).
    engine = hand_built(pg_url, [100, 200, 300])
    state.ensure_framework_tables(engine)
    x = new_execution_id()
    with engine.begin() as conn:
        conn.execute(insert(state.targets), [
            {"execution_id": x, "table_name": "inventories", "row_id": i} for i in (1, 3)
        ])
    tables = state.reflect_tables(engine, ["inventories"])

    def app_can_lock(item_id: int) -> bool:
        with engine.connect() as app, app.begin():
            try:
                app.execute(
                    select(inventories.c.id)
                    .where(inventories.c.id == item_id)
                    .with_for_update(nowait=True)
                )
            except OperationalError as exc:
                assert "could not obtain lock" in str(exc.orig)
                return False
            return True

    with engine.begin() as conn:
        lock_target_rows(conn, tables, x, {"updates": {"inventories": ["price"]}})
        assert [app_can_lock(i) for i in (1, 2, 3)] == [False, True, False]
    assert [app_can_lock(i) for i in (1, 2, 3)] == [True, True, True]  # released at the end


@pytest.mark.postgres
@pytest.mark.parametrize("after_commit", [False, True], ids=["before_commit", "after_commit"])
def test_an_invariant_query_past_its_timeout_is_a_failed_check(pg_url, after_commit, monkeypatch):
    engine = seeded(pg_url, items=50)
    before = digest(engine)
    monkeypatch.setattr(slow_patches.SlowInvariantPatch, "after_commit", after_commit)
    result = run_patch(pg_url, "slow_invariant_patch", PCT8, defs=DEFS, approve=False)
    assert not result.success
    ex = latest_execution(engine)
    assert ex["status"] == "failed"
    assert ex["phase"] == ("restored" if after_commit else "rolled_back")
    when = " after commit" if after_commit else ""
    assert (
        f"invariant slow_check could not be checked{when}: its query ran longer than 0.5 s "
        "(query_timeout_seconds) and was cancelled" in ex["error_message"]
    )
    assert digest(engine) == before  # never committed, or restored from the backup


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"adjustment_type": "percentage", "adjustment_value": 1500}, "in [-100, 1000]"),
        ({"adjustment_type": "multiply", "adjustment_value": 0}, "> 0"),
        ({"adjustment_type": "percentage", "adjustment_value": 5, "min_price": 10, "max_price": 1},
         "min_price is greater"),
        ({"adjustment_type": "percentage", "adjustment_value": 5,
          "before_date": "2026-01-01'; DROP TABLE inventories; --"}, "before_date must be a date"),
        ({"adjustment_type": "percentage", "adjustment_value": 5, "batch_size": 0},
         "batch_size must be positive"),
    ],
)
def test_bad_config_is_refused_before_any_write_and_recorded(sqlite_url, config, message):
    engine = hand_built(sqlite_url, [100, 200])
    before = digest(engine)
    result = run_patch(sqlite_url, PRICE_JOB, {**config, "dry_run": False})
    assert not result.success
    assert "refused before any write" in failure_description(result)
    assert message in failure_description(result)
    assert digest(engine) == before
    ex = latest_execution(engine)
    assert ex["status"] == "failed" and message in ex["error_message"]


@pytest.mark.parametrize(
    "config",
    [
        {"adjustment_type": "percentage; DROP TABLE inventories", "adjustment_value": 5},
        {"adjustment_type": "percentage", "adjustment_value": "8 OR 1=1"},
        {"adjustment_type": "percentage", "adjustment_value": 5, "surprise": 1},
        {"adjustment_value": 5},
    ],
)
def test_wrong_types_are_rejected_by_dagster_before_any_op(sqlite_url, config):
    from dagster import DagsterInvalidConfigError

    engine = hand_built(sqlite_url, [100])
    before = digest(engine)
    with pytest.raises(DagsterInvalidConfigError):
        run_patch(sqlite_url, PRICE_JOB, config)
    assert digest(engine) == before


def test_unreachable_database_gives_a_clear_error_without_the_password():
    url = "postgresql+psycopg://stockrx:s3cret-pw@127.0.0.1:1/nowhere"
    result = run_patch(url, PRICE_JOB, PCT8)
    assert not result.success
    desc = failure_description(result)
    assert "cannot connect to the StockRx database" in desc
    assert "s3cret-pw" not in desc
    for event in result.all_events:
        assert "s3cret-pw" not in str(event)


def test_a_mistyped_sqlite_path_is_refused_without_creating_the_file(tmp_path):
    missing = tmp_path / "stockrx-typo.db"
    result = run_patch(f"sqlite:///{missing}", PRICE_JOB, PCT8)
    assert not result.success
    assert f"the SQLite file {missing} does not exist" in failure_description(result)
    assert not missing.exists()


def test_missing_table_and_missing_column_are_refused(sqlite_url):
    from patch_ops.database import get_engine

    engine = get_engine(sqlite_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE inventories (id INTEGER PRIMARY KEY, name VARCHAR(255), price NUMERIC)"
        )
    result = run_patch(sqlite_url, PRICE_JOB, PCT8)
    assert not result.success
    desc = failure_description(result)
    assert "table(s) not found in the StockRx database" in desc and "inventory_logs" in desc
    assert not [t for t in inspect(engine).get_table_names() if t.startswith("data_patch_")]

    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE inventory_logs (id INTEGER PRIMARY KEY, inventory_id INTEGER)"
        )
    result = run_patch(sqlite_url, PRICE_JOB, PCT8)
    assert not result.success
    desc = failure_description(result)
    assert "column(s) missing in table 'inventories'" in desc and "inventory_logs_count" in desc
    with engine.connect() as conn:
        statuses = conn.execute(select(executions.c.status)).scalars().all()
    assert statuses == ["failed"]  # the missing table was refused before anything was written


def test_checks_run_at_once_keep_their_order_and_raise_after_all_ended():
    # Both calls must be running at the same time to pass the barrier: one after the other,
    # the first would wait in vain (BrokenBarrierError).
    barrier = threading.Barrier(2, timeout=30)
    ended: list[str] = []

    def call(name: str, fail: bool = False) -> str:
        barrier.wait()
        time.sleep(0.05 if fail else 0.2)
        ended.append(name)
        if fail:
            raise ValueError(f"{name} failed")
        return name

    assert run_concurrently([lambda: call("a"), lambda: call("b")], 2) == ["a", "b"]
    ended.clear()
    with pytest.raises(ValueError, match="b failed"):
        run_concurrently([lambda: call("a"), lambda: call("b", fail=True)], 2)
    assert sorted(ended) == ["a", "b"]  # the failure waited for the other check to end
    assert run_concurrently([lambda: "x", lambda: "y"], 1) == ["x", "y"]


def test_check_connections_come_from_the_yaml(tmp_path):
    path = tmp_path / "p.yml"
    entry = "patches:\n  p:\n    description: d\n"
    path.write_text(entry)
    assert load_project_config(path).patches["p"].check_connections == 2
    path.write_text(entry + "    check_connections: 1\n")
    assert load_project_config(path).patches["p"].check_connections == 1
    for bad in ("0", "1.5", "'2'", "true"):
        path.write_text(entry + f"    check_connections: {bad}\n")
        with pytest.raises(RegistryError, match="check_connections must be a whole number"):
            load_project_config(path)


@pytest.mark.parametrize("config", [
    {"adjustment_type": "percentage", "adjustment_value": 8},
    {"adjustment_type": "fixed_amount", "adjustment_value": 5},
    {"adjustment_type": "set_value", "adjustment_value": 500},
], ids=lambda c: c["adjustment_type"])
def test_a_text_price_is_a_rejected_row_with_its_reason_for_every_adjustment(sqlite_url, config):
    """SQLite keeps any value in any column: 'abc' in price was read as 0 (percentage: silently
    skipped) or crashed the report (fixed_amount, set_value)."""
    engine = hand_built(sqlite_url, [100, 200, 300])
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE inventories SET price = 'abc' WHERE id = 1")
    result = run_patch(sqlite_url, PRICE_JOB, {**config, "dry_run": True})
    assert not result.success  # max_failure_ratio is 0: one rejected row fails validation
    assert "1 of 3 rows (33.3%) failed validation" in failure_description(result)
    ex = latest_execution(engine)
    assert (ex["staged_updates"], ex["failed_records"]) == (2, 1)
    with engine.connect() as conn:
        [reject] = conn.execute(select(rejects)).mappings().all()
    assert (reject["source_id"], reject["column_name"], reject["failure_case"]) == (1, "price", "abc")
    assert "a number" in reject["check_name"]
