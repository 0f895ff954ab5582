"""After commit, when the inserted rows' ids are one block handed out to the execution alone
(the offset its commit recorded), the checks that read none of the stage's columns read the
inserted rows by the live table's key only: the database leaves the stage's join out
(``ResultView.inserted``; PostgreSQL and MariaDB always, SQLite in some queries). Checks that
compare with what was committed still join it, and a change the application made after the
commit is still found."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.engine import Engine

from patch_ops import state
from patch_ops.execution import config_of, inserted_offset, load_execution
from patch_ops.state import INSERT
from patch_ops.steps.commit import commit_execution
from patch_ops.steps.result import ResultView
from patch_ops.steps.verify import verify_execution
from patch_ops.work_rows import work_rows
from tests.support.stockrx import seeded, validated_price_run


def _plan(engine: Engine, query: Any) -> str:
    """The database's plan of ``query`` as text (the tables it reads are named in it)."""
    sql = str(query.compile(engine, compile_kwargs={"literal_binds": True}))
    explain = "EXPLAIN QUERY PLAN " if engine.dialect.name == "sqlite" else "EXPLAIN "
    with engine.connect() as conn:
        return "\n".join(" ".join(str(v) for v in row) for row in conn.exec_driver_sql(explain + sql))


def _committed(url: str) -> tuple[Engine, dict[str, Any], Any, ResultView]:
    engine = seeded(url, items=200)
    execution_id, patch = validated_price_run(engine)
    commit_execution(engine, execution_id)
    with engine.connect() as conn:
        ex = load_execution(conn, execution_id)
    tables = state.reflect_tables(engine, patch.tables())
    return engine, ex, patch, ResultView(engine, tables, execution_id, True, ex["declaration"], ex)


def test_checks_of_one_block_of_inserted_rows_read_them_by_key_alone(database_url):
    engine, ex, patch, view = _committed(database_url)
    assert inserted_offset(ex, "inventory_logs") is not None  # one block: nobody else inserted
    logs = view.inserted("inventory_logs")
    # the execution's staged inserts of inventory_logs: a table of its own
    stage = work_rows(engine, view.tables["inventory_logs"], ex["execution_id"], INSERT).table.name
    invariants = {inv.name: inv for inv in patch.invariants(view, config_of(patch, ex))}
    reading_logs = [invariants[n].offenders for n in (
        "one_log_per_changed_item", "log_rows_belong_to_changed_items", "log_quantities_match_item"
    )]
    for query in [select(func.count()).select_from(logs), *reading_logs]:
        plan = _plan(engine, query)
        assert "inventory_logs" in plan, plan
        if engine.dialect.name != "sqlite":  # SQLite leaves it out of some queries only
            assert stage not in plan, plan
    compared = select(func.count()).where(logs.c.note != logs.c.dp_staged_note)
    assert stage in _plan(engine, compared)  # what was committed: from the stage
    with engine.connect() as conn:
        n, staged = conn.execute(select(func.count(), func.count(logs.c.dp_source_id))).one()
        differ = conn.execute(compared).scalar_one()
    assert n == staged == ex["report"]["committed"]["inventory_logs_inserted"] > 0
    assert differ == 0
    assert verify_execution(engine, patch, ex["execution_id"]) == []


def test_an_inserted_row_the_application_changed_or_deleted_is_still_named(database_url):
    engine, ex, patch, view = _committed(database_url)
    logs = state.reflect_tables(engine, ["inventory_logs"])["inventory_logs"]
    with engine.begin() as conn:
        first, second = conn.execute(
            select(logs.c.id).where(logs.c.created_at == ex["run_at"]).order_by(logs.c.id).limit(2)
        ).scalars()
        conn.execute(update(logs).where(logs.c.id == first).values(note="edited by the app"))
        conn.execute(delete(logs).where(logs.c.id == second))
    problems = verify_execution(engine, patch, ex["execution_id"])
    assert any(p.startswith("inventory_logs: live rows differ") and str(first) in p
               for p in problems), problems
    # the deleted row leaves its item without its log row
    assert any("one_log_per_changed_item broken after commit by 1 row" in p for p in problems), (
        problems
    )
