"""Plan shapes on PostgreSQL: validation must stay linear in the number of changed rows.

``x NOT IN (SELECT ...)`` is planned as a *hashed* subplan only while the subquery fits in
work_mem; past that PostgreSQL rescans it for every outer row, which made validation of a million
changed items run for hours. Every invariant, its screen and the would-be table views are planned
here with a work_mem far too small for any hash, and no plan may contain a plain (rescanned)
SubPlan.
"""

from __future__ import annotations

import pytest
from sqlalchemy import event, func, select

from patch_ops import state
from patch_ops.execution import config_of, inserted_id_range, load_execution
from patch_ops.state import BACKUP, INSERT
from patch_ops.steps.apply import find_conflicts
from patch_ops.steps.result import ResultView
from patch_ops.work_rows import existing_rows, work_rows
from stockrx_patches.registry import default_registry
from tests.support.stockrx import latest_execution, run_patch, seeded

pytestmark = pytest.mark.postgres

RUNS = {
    "inventory_price_adjustment": {"adjustment_type": "percentage", "adjustment_value": 8},
    "batch_expiry_update": {"business_date": "2026-11-29"},
}


def _plans(engine, patch, execution_id, committed=False):  # type: ignore[no-untyped-def]
    """(what, EXPLAIN text) for every invariant and every table view of the execution."""
    with engine.connect() as conn:
        ex = load_execution(conn, execution_id)
    view = ResultView(
        engine, state.reflect_tables(engine, patch.tables()), execution_id, committed,
        ex["declaration"], ex,
    )
    invariants = patch.invariants(view, config_of(patch, ex))
    queries = {inv.name: inv.offenders for inv in invariants}
    queries |= {f"screen({inv.name})": select(inv.screen[1]).select_from(inv.screen[0])
                for inv in invariants if inv.screen is not None}
    queries |= {f"table({t})": select(view.table(t)) for t in patch.tables()}
    plans = {}
    with engine.begin() as conn:
        conn.exec_driver_sql("SET LOCAL work_mem = '64kB'")
        conn.exec_driver_sql("SET LOCAL enable_hashjoin = off")
        for name, query in queries.items():
            sql = str(query.compile(engine, compile_kwargs={"literal_binds": True}))
            plans[name] = "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + sql))
    return plans


@pytest.mark.parametrize("job", sorted(RUNS))
def test_no_validation_query_rescans_a_subquery_per_row(pg_url, job):
    engine = seeded(pg_url, items=400)
    result = run_patch(pg_url, job, {**RUNS[job], "dry_run": True})
    assert result.success
    ex = latest_execution(engine)
    patch = default_registry().patches[job]
    plans = _plans(engine, patch, ex["execution_id"])
    assert len(plans) >= 4
    for name, plan in plans.items():
        rescans = [
            line for line in plan.splitlines() if "SubPlan" in line and "hashed SubPlan" not in line
        ]
        assert not rescans, f"{name} rescans a subquery for every row:\n{plan}"


def _verified_price_run(pg_url):  # type: ignore[no-untyped-def]
    """(engine, execution row, patch) of a committed and verified price run on 400 items."""
    job = "inventory_price_adjustment"
    engine = seeded(pg_url, items=400)
    assert run_patch(pg_url, job, {**RUNS[job], "dry_run": False}).success
    ex = latest_execution(engine)
    assert ex["phase"] == "verified"
    return engine, ex, default_registry().patches[job]


def test_checks_after_commit_join_the_backup_only_when_they_read_before_values(pg_url):
    """After commit the updated rows are read from the live table; the backup is needed only for
    ``before_`` columns, and PostgreSQL drops it from every other check (a join over every
    updated row less, each)."""
    engine, ex, patch = _verified_price_run(pg_url)
    view = ResultView(
        engine, state.reflect_tables(engine, patch.tables()), ex["execution_id"], True,
        ex["declaration"], ex,
    )
    invariants = patch.invariants(view, config_of(patch, ex))
    # the execution's before-images of inventories: a table of its own, kept after commit
    with engine.connect() as conn:
        kept = existing_rows(conn, "inventories", ex["execution_id"], BACKUP)
    assert kept is not None and not kept.shared
    backup = kept.table.name
    # the two checks of the patch that compare with before_ values (before_inventory_logs_count,
    # before_price); the other three read after-images only
    reads_before = {"inventory_logs_count_incremented", "price_actually_changed"}
    assert len(invariants) == 5
    plans = _plans(engine, patch, ex["execution_id"], committed=True)
    for inv in invariants:
        assert (backup in plans[inv.name]) == (inv.name in reads_before), (
            f"{inv.name}:\n{plans[inv.name]}"
        )


def test_checks_after_commit_read_only_the_inserted_rows_of_the_live_table(pg_url):
    """After commit, the checks on inserted rows (invariants, and verification's comparison with
    what was committed) restrict the live table to the ids the execution inserted, so they read
    those rows by key instead of the whole table with all its history."""
    engine, ex, patch = _verified_price_run(pg_url)
    tables = state.reflect_tables(engine, patch.tables())
    live = tables["inventory_logs"]
    ins = work_rows(engine, live, ex["execution_id"], INSERT)
    with engine.connect() as conn:
        span = inserted_id_range(conn, ins, ex, "inventory_logs")
        staged = conn.execute(
            select(func.count()).select_from(ins.table).where(ins.mine)
        ).scalar_one()
        inserted = conn.execute(
            select(func.count()).select_from(live).where(live.c.created_at == ex["run_at"])
        ).scalar_one()
    assert span is not None and staged == inserted > 0
    lo, hi = span
    assert hi - lo + 1 == staged  # one block here: nobody else inserted meanwhile
    plans = _plans(engine, patch, ex["execution_id"], committed=True)
    reading_logs = [name for name, plan in plans.items() if "on inventory_logs" in plan]
    assert {"one_log_per_changed_item", "log_quantities_match_item"} <= set(reading_logs)
    for name in reading_logs:
        if name.startswith("table("):
            continue  # the whole table, by definition
        assert f"id >= {lo}" in plans[name] and f"id <= {hi}" in plans[name], (
            f"{name} reads inventory_logs beyond the inserted ids {lo}..{hi}:\n{plans[name]}"
        )
    executed: list[tuple[str, dict]] = []

    def keep(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
        executed.append((statement, dict(params or {})))

    event.listen(engine, "before_cursor_execute", keep)
    try:
        with engine.connect() as conn:
            assert find_conflicts(conn, engine, tables, ex, "stage") == {}
    finally:
        event.remove(engine, "before_cursor_execute", keep)
    logs_check = [(q, p) for q, p in executed if "LEFT OUTER JOIN inventory_logs" in q]
    assert logs_check
    for q, p in logs_check:
        assert "BETWEEN" in q and {lo, hi} <= set(p.values()), (q, p)
