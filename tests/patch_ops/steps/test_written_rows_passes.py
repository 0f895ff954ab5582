"""Reading the written rows fewer times changes no answer: the counter-cache invariants count
only the changed items' rows (``ResultView.table_where``) and get the counts the whole table
gives, before and after commit; post-verification compares the inserted rows with what was
committed in the invariants' pass over them and names the same rows as its own query."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import delete, func, select, update

from patch_ops import state
from patch_ops.execution import load_execution, written_tables
from patch_ops.patch import PatchSettings
from patch_ops.steps.apply import find_conflicts
from patch_ops.steps.backup import take_backup
from patch_ops.steps.commit import commit_execution
from patch_ops.steps.plan import plan_execution
from patch_ops.steps.result import ResultView, invariant_checks
from patch_ops.steps.transform import run_transform
from patch_ops.steps.validate import validate_execution
from patch_ops.steps.verify import MISMATCH_IDS, staged_differences, verify_execution
from resources.memory import MemoryGuard
from stockrx_patches.patches.inventory_price_adjustment import InventoryPriceAdjustment
from stockrx_patches.tables import batches, inventory_logs
from tests.stockrx_patches.patches.test_batch_expiry_update import (
    PATCH,
    REAL,
    SETTINGS,
    build_fixture,
    fixture_engine,
)
from tests.support.stockrx import hand_built

CHILDREN = ("batches", "inventory_logs")  # the counter caches' tables


def _transformed(url: str):  # type: ignore[no-untyped-def]
    engine = fixture_engine(url)
    build_fixture(engine)
    x = plan_execution(engine, PATCH, SETTINGS, PATCH.config_class(**REAL))
    take_backup(engine, x)
    run_transform(engine, PATCH, x, MemoryGuard())
    return engine, x


def _per_item_counts(engine, x: str, committed: bool) -> list[tuple[dict, dict]]:  # type: ignore[no-untyped-def]
    """Per child table, the rows per changed item: (whole table filtered, rows read by item)."""
    with engine.connect() as conn:
        ex = load_execution(conn, x)
    tables = state.reflect_tables(engine, PATCH.tables())
    view = ResultView(engine, tables, x, committed, ex["declaration"], ex)
    items = view.updated("inventories")
    # Every query built before the connection that runs them, as invariant_checks does: a view
    # makes the work rows tables it reads that the plan did not (the updates of a table the
    # execution only inserts into), on a connection of their own, which a SQLite read
    # transaction begun before does not see.
    queries = []
    for t in CHILDREN:
        whole = view.table(t)
        old = select(whole.c.inventory_id, func.count()).where(
            whole.c.inventory_id.in_(select(items.c.id))
        ).group_by(whole.c.inventory_id)
        by_item = view.table_where(t, "inventory_id", select(items.c.id))
        new = select(by_item.c.inventory_id, func.count()).group_by(by_item.c.inventory_id)
        queries.append((old, new))
    with engine.connect() as conn:
        return [(dict(conn.execute(old).all()), dict(conn.execute(new).all()))
                for old, new in queries]


def test_the_changed_items_rows_count_as_in_the_whole_table(database_url):
    engine, x = _transformed(database_url)
    # items 1, 2, 3, 5 change; their lots that stay (C, D, G, L), the rows of items 4 and 6,
    # and each one's receive logs are in the counts as in the whole table
    expected = [{1: 4, 2: 3, 3: 1, 5: 3}, {1: 6, 2: 4, 3: 2, 5: 5}]
    counts = _per_item_counts(engine, x, committed=False)
    assert counts == [(e, e) for e in expected]
    assert validate_execution(engine, PATCH, SETTINGS, x)[0]
    commit_execution(engine, x)
    with engine.begin() as conn:  # the application adds a lot to item 1 since
        conn.execute(batches.insert().values(
            inventory_id=1, lot_code="Z", quantity=1, expires_on=dt.date(2027, 1, 1),
            created_at=dt.datetime(2026, 11, 29), updated_at=dt.datetime(2026, 11, 29)))
    expected[0][1] += 1
    assert _per_item_counts(engine, x, committed=True) == [(e, e) for e in expected]


def _edits_of_inserted_rows_are_named_as_by_their_own_query(engine, patch, x):  # type: ignore[no-untyped-def]
    """After commit: the inserted rows' comparison runs in a pass (an invariant's
    or one of its own: ``Checks.aggregates`` has it); the application then rewrites an inserted
    log row's note (its comparison finds it) and deletes another (the pass's count finds it):
    verification names the rows as find_conflicts's own query does, on one connection or two."""
    checks = invariant_checks(engine, patch, x, committed=True, timeout_s=None,
                              aggregates=staged_differences,
                              shared_only=["updates:inventories"])
    assert "inserts:inventory_logs" in checks.aggregates
    assert verify_execution(engine, patch, x) == []
    with engine.connect() as conn:
        ex = load_execution(conn, x)
        new = ResultView(engine, state.reflect_tables(engine, patch.tables()), x, True,
                         ex["declaration"], ex).inserted("inventory_logs")
        ids = conn.execute(select(new.c.id).order_by(new.c.id)).scalars().all()
    for change, named in (
        (update(inventory_logs).where(inventory_logs.c.id == ids[3]).values(note="edited"),
         [ids[3]]),
        (delete(inventory_logs).where(inventory_logs.c.id == ids[1]), [ids[1], ids[3]]),
    ):
        with engine.begin() as conn:
            conn.execute(change)
        with engine.connect() as conn:
            ex = load_execution(conn, x)
            tables = state.reflect_tables(engine, patch.tables())
            own = find_conflicts(conn, engine, tables, ex, "stage", limit=MISMATCH_IDS)
        assert own == {"inventory_logs": named}
        expected = [f"{t}: live rows differ from what was committed, e.g. ids {own[t]}"
                    for t in written_tables(ex["declaration"]) if t in own]
        for connections in (1, 2):
            problems = verify_execution(engine, patch, x, connections=connections)
            assert [p for p in problems if "live rows differ" in p] == expected


def test_after_commit_inserted_rows_that_differ_are_named_as_by_their_own_query(database_url):
    engine, x = _transformed(database_url)
    assert validate_execution(engine, PATCH, SETTINGS, x)[0]
    commit_execution(engine, x)
    # in the pass of log_quantities_add_up over them
    _edits_of_inserted_rows_are_named_as_by_their_own_query(engine, PATCH, x)


def test_inserted_rows_no_invariant_reads_are_compared_in_a_pass_of_their_own(database_url):
    """The price patch's invariants read its log rows grouped per item only: their comparison
    with what was committed is a pass of its own (find_conflicts's ORDER BY ... LIMIT walked
    them one by one), and names the same rows."""
    engine = hand_built(database_url, [100.0 * i for i in range(1, 9)])
    patch = InventoryPriceAdjustment()
    settings = PatchSettings(description="test", batch_size=3, require_approved_plan=False)
    config = patch.config_class(adjustment_type="percentage", adjustment_value=8, dry_run=False)
    x = plan_execution(engine, patch, settings, config)
    take_backup(engine, x)
    run_transform(engine, patch, x, MemoryGuard())
    assert validate_execution(engine, patch, settings, x)[0]
    commit_execution(engine, x)
    _edits_of_inserted_rows_are_named_as_by_their_own_query(engine, patch, x)
