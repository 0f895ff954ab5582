"""The transform in the database on two connections (issue 22): a batch's updated rows and its
inserted rows are staged at once, each on its own connection, with the same stage as on one;
a crash between the inserted rows' commit and the batch's stages them once; a stop cancels the
statement on the second connection too, and waits for it."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import event, func, insert, select, text, update
from sqlalchemy.engine import Engine

from patch_ops.dialects import dialect_of
from patch_ops.execution import load_execution
from patch_ops.patch import SQL_PATH
from patch_ops.state import INSERT, UPDATE, executions, locks
from patch_ops.steps.backup import take_backup
from patch_ops.steps.plan import plan_execution
from patch_ops.steps.transform import run_transform
from patch_ops.target_sets import own_table_name
from patch_ops.work_rows import OWN_KINDS, existing_rows
from resources.memory import MemoryGuard
from stockrx_patches.registry import default_registry
from tests.support.stockrx import T0, seeded

PRICE = "inventory_price_adjustment"
CONFIG = {"adjustment_type": "percentage", "adjustment_value": 8}
#: How long a blocked statement may wait before the test lets it go (a safety net: the test
#: then fails instead of hanging; nothing is ordered by it).
SAFETY_SECONDS = 60.0


def two_writers(engine: Engine) -> None:
    if not dialect_of(engine).features.row_locks:
        pytest.skip("one writer at a time here: a batch is staged on one connection")


def planned(engine: Engine, batch_size: int = 40, run_at: Any = None) -> str:
    """A backed-up execution of the price patch (+8 %), ready for its transform."""
    registry = default_registry()
    patch, settings = registry.patches[PRICE], registry.settings(PRICE)
    cfg = patch.config_class(**CONFIG, transform_path=SQL_PATH, batch_size=batch_size)
    execution_id = plan_execution(engine, patch, settings, cfg)
    with engine.begin() as conn:
        if run_at is not None:  # the other run's time: every staged column compares
            conn.execute(update(executions).where(executions.c.execution_id == execution_id)
                         .values(run_at=run_at))
    take_backup(engine, execution_id)
    return execution_id


def transform(engine: Engine, execution_id: str, connections: int) -> None:
    run_transform(engine, default_registry().patches[PRICE], execution_id, MemoryGuard(),
                  connections=connections)


def release(engine: Engine, execution_id: str) -> None:
    """Let the next execution plan the same tables (this one is only compared)."""
    with engine.begin() as conn:
        conn.execute(locks.delete().where(locks.c.execution_id == execution_id))
        conn.execute(update(executions).where(executions.c.execution_id == execution_id)
                     .values(status="failed"))


def execution(engine: Engine, execution_id: str) -> dict[str, Any]:
    with engine.connect() as conn:
        return load_execution(conn, execution_id)


def stage_of(engine: Engine, execution_id: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every stage row of the execution (its inserts, then its updates, each by sequence), every
    column but its bookkeeping, led by its action; and its counts."""
    ex = execution(engine, execution_id)
    out: dict[str, list[tuple[Any, ...]]] = {"counts": [(
        ex["phase"], ex["processed_records"], ex["staged_updates"], ex["staged_inserts"])]}
    with engine.connect() as conn:
        for table in ("inventories", "inventory_logs"):
            found = {a: existing_rows(conn, table, execution_id, a) for a in (INSERT, UPDATE)}
            assert any(found.values()), table
            out[table] = []
            for action, rows in found.items():
                if rows is None:
                    continue
                out[table] += [(action, *r) for r in conn.execute(
                    select(*[c for c in rows.c if c.name not in ("dp_execution_id", "dp_action")])
                    .where(rows.mine).order_by(rows.seq))]
    return out


def own_names(execution_id: str) -> list[str]:
    """The names of the tables an execution of the price patch stages its rows in."""
    return [own_table_name(OWN_KINDS[a], execution_id, t)
            for t in ("inventories", "inventory_logs") for a in (UPDATE, INSERT)]


def test_a_batch_stages_its_updated_and_inserted_rows_at_once_on_two_connections(database_url):
    """Each statement that stages a batch's rows waits at a gate for the other: both get
    through only if they run at the same time, each on its own connection. The stage equals
    the one a single connection makes."""
    engine = seeded(database_url, items=120)
    two_writers(engine)
    one = planned(engine)
    transform(engine, one, connections=1)
    release(engine, one)
    gate, met = threading.Barrier(2, timeout=30), []

    two = planned(engine, run_at=execution(engine, one)["run_at"])
    stages = tuple(f"INSERT INTO {name}" for name in own_names(two))

    def meet(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
        if statement.startswith(stages):
            met.append((gate.wait(), id(conn)))  # raises BrokenBarrierError if alone

    event.listen(engine, "before_cursor_execute", meet)
    try:
        transform(engine, two, connections=2)
    finally:
        event.remove(engine, "before_cursor_execute", meet)
    assert len(met) == 6 and len({c for _, c in met[:2]}) == 2  # 3 batches, 2 connections
    assert stage_of(engine, two) == stage_of(engine, one)


def test_inserted_rows_staged_before_a_crash_kept_their_batch_from_committing_are_staged_once(
    database_url,
):
    """The third batch's log rows are committed on their own connection; then the batch's own
    transaction fails before it commits. The step's next start drops those rows and stages
    the batch again: the stage equals an uninterrupted run's."""
    engine = seeded(database_url, items=200)
    two_writers(engine)
    whole = planned(engine, batch_size=30)
    transform(engine, whole, connections=2)
    release(engine, whole)

    class Crash(Exception):
        pass

    cursors: list[str] = []

    def crash_at_third_cursor(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
        if statement.startswith("UPDATE") and "SET phase" in statement and "cursor" in statement:
            cursors.append(statement)
            if len(cursors) == 3:
                raise Crash

    crashed = planned(engine, batch_size=30, run_at=execution(engine, whole)["run_at"])
    event.listen(engine, "before_cursor_execute", crash_at_third_cursor)
    try:
        with pytest.raises(Crash):
            transform(engine, crashed, connections=2)
    finally:
        event.remove(engine, "before_cursor_execute", crash_at_third_cursor)
    ex = execution(engine, crashed)
    with engine.connect() as conn:
        logs = existing_rows(conn, "inventory_logs", crashed, INSERT)
        assert logs is not None
        beyond = conn.execute(select(func.count()).select_from(logs.table).where(
            logs.mine, logs.seq > ex["staged_inserts"])).scalar_one()
    assert ex["batches_done"] == 2 and beyond > 0  # the third batch's, left behind
    transform(engine, crashed, connections=2)
    assert stage_of(engine, crashed) == stage_of(engine, whole)


def running_inserts(engine: Engine, execution_id: str) -> int:
    """Statements staging the execution's log rows that the server runs now (this user's
    sessions)."""
    staging = f"INSERT INTO {own_table_name('insert', execution_id, 'inventory_logs')}"
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            return int(conn.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                "AND query LIKE :staging"), {"staging": f"{staging}%"}).scalar_one())
        return sum(1 for r in conn.exec_driver_sql("SHOW FULL PROCESSLIST")
                   if str(r.Info or "").startswith(staging))


def test_a_stop_cancels_the_statement_on_the_second_connection_and_waits_for_it(database_url):
    """The first batch's log rows wait on a row lock (another transaction holds their first
    key); the step is stopped (KeyboardInterrupt, as the stop signal raises it) once its own
    statement is done and the other one runs. The stop cancels that statement, waits for it,
    and leaves nothing staged, while the lock is still held: it did not wait for the lock."""
    engine = seeded(database_url, items=120)
    two_writers(engine)
    x = planned(engine)
    logs_name = own_table_name("insert", x, "inventory_logs")
    items_name = own_table_name("update", x, "inventories")
    blocker = engine.connect()
    blocker.begin()
    released = threading.Event()

    def let_go() -> None:
        released.set()
        blocker.rollback()

    safety = threading.Timer(SAFETY_SECONDS, let_go)

    def hold_first_key(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
        # after the step's start has dropped unfinished rows: take the first key's lock
        if statement.startswith(f"DELETE FROM {logs_name}"):
            logs = existing_rows(blocker, "inventory_logs", x, INSERT)
            assert logs is not None
            blocker.execute(insert(logs.table).values(
                **logs.values(), dp_seq=1, inventory_id=1, delta=0,
                operation_type="adjust", previous_quantity=0, current_quantity=0,
                created_at=T0, updated_at=T0))
            safety.start()

    def stop_after_own_statement(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
        if statement.startswith(f"INSERT INTO {items_name}"):
            while not running_inserts(engine, x):  # the other statement reached the server
                assert not released.is_set(), "the log rows' statement never ran"
            raise KeyboardInterrupt("stopped by SIGINT")

    event.listen(engine, "after_cursor_execute", hold_first_key)
    event.listen(engine, "after_cursor_execute", stop_after_own_statement)
    try:
        with pytest.raises(KeyboardInterrupt):
            transform(engine, x, connections=2)
        assert not released.is_set(), "the stop waited for the row lock"
        assert running_inserts(engine, x) == 0
    finally:
        event.remove(engine, "after_cursor_execute", hold_first_key)
        event.remove(engine, "after_cursor_execute", stop_after_own_statement)
        safety.cancel()
        if not released.is_set():
            blocker.rollback()
        blocker.close()
    staged = stage_of(engine, x)
    assert staged["inventories"] == [] and staged["inventory_logs"] == []
    assert execution(engine, x)["batches_done"] == 0
