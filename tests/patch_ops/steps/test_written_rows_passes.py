"""Reading the written rows fewer times changes no answer: post-verification compares the
inserted rows with what was committed in the invariants' pass over them and names the same
rows as its own query."""

from __future__ import annotations

from sqlalchemy import delete, select, update

from patch_ops import state
from patch_ops.execution import load_execution, written_tables
from patch_ops.steps.apply import find_conflicts
from patch_ops.steps.backup import take_backup
from patch_ops.steps.commit import commit_execution
from patch_ops.steps.plan import plan_execution
from patch_ops.steps.result import invariant_checks
from patch_ops.steps.transform import run_transform
from patch_ops.steps.validate import validate_execution
from patch_ops.steps.verify import MISMATCH_IDS, staged_differences, verify_execution
from resources.memory import MemoryGuard
from stockrx_patches.tables import inventory_logs
from tests.stockrx_patches.patches.test_batch_expiry_update import (
    PATCH,
    REAL,
    SETTINGS,
    build_fixture,
    fixture_engine,
)


def _transformed(url: str):  # type: ignore[no-untyped-def]
    engine = fixture_engine(url)
    build_fixture(engine)
    x = plan_execution(engine, PATCH, SETTINGS, PATCH.config_class(**REAL))
    take_backup(engine, x)
    run_transform(engine, PATCH, x, MemoryGuard())
    return engine, x


def test_after_commit_inserted_rows_that_differ_are_named_as_by_their_own_query(database_url):
    engine, x = _transformed(database_url)
    assert validate_execution(engine, PATCH, SETTINGS, x)[0]
    commit_execution(engine, x)
    # the inserted rows' comparison runs in the pass of log_quantities_add_up over them
    checks = invariant_checks(engine, PATCH, x, committed=True, timeout_s=None,
                              aggregates=staged_differences, shared_only=True)
    assert "inserts:inventory_logs" in checks.aggregates
    assert verify_execution(engine, PATCH, x) == []
    removed = inventory_logs.c.operation_type == "remove"
    with engine.connect() as conn:
        ids = conn.execute(select(inventory_logs.c.id).where(removed)
                           .order_by(inventory_logs.c.id)).scalars().all()
    # the application deletes one log row (the pass's count finds it), then rewrites another's
    # note (its comparison finds it)
    for change, named in (
        (delete(inventory_logs).where(inventory_logs.c.id == ids[1]), [ids[1]]),
        (update(inventory_logs).where(inventory_logs.c.id == ids[3]).values(note="edited"),
         [ids[1], ids[3]]),
    ):
        with engine.begin() as conn:
            conn.execute(change)
        with engine.connect() as conn:
            ex = load_execution(conn, x)
            tables = state.reflect_tables(engine, PATCH.tables())
            own = find_conflicts(conn, engine, tables, ex, "stage", limit=MISMATCH_IDS)
        assert own == {"inventory_logs": named}
        expected = [f"{t}: live rows differ from what was committed, e.g. ids {own[t]}"
                    for t in written_tables(ex["declaration"]) if t in own]
        for connections in (1, 2):
            problems = verify_execution(engine, PATCH, x, connections=connections)
            assert [p for p in problems if "live rows differ" in p] == expected
