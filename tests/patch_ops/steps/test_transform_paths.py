"""The two transform paths (issue 22): in the database and in pandas, on the same data, stage
the same rows (every column) and reject the same rows; the SQL path keeps progress and resume
at batch boundaries; a check with no SQL form refuses the in-database path, named: at plan,
before anything is written, when the run asks for that path."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pandas as pd
import pandera.pandas as pa
import pytest
from dagster import DagsterInstance
from pandera.typing import Series
from sqlalchemy import delete, event, func, select, union_all, update

from patch_ops import state
from patch_ops.execution import PatchError, load_execution
from patch_ops.patch import PYTHON_PATH, SQL_PATH
from patch_ops.state import (
    INSERT,
    UPDATE,
    executions,
    locks,
    mirror_by_name,
    mirror_name,
    rejects,
)
from patch_ops.steps.backup import take_backup
from patch_ops.steps.plan import plan_execution
from patch_ops.steps.transform import run_transform, transform_path
from patch_ops.target_sets import existing_tables, own_table_name
from patch_ops.work_rows import OWN_KINDS, existing_rows, work_rows
from resources.memory import MemoryGuard
from stockrx_patches.patches.inventory_price_adjustment import InventoryPriceAdjustment
from stockrx_patches.registry import default_registry
from stockrx_patches.schemas import InventorySchema
from stockrx_patches.tables import batches, inventories
from tests.support.stockrx import (
    PRICE_JOB,
    defs_with,
    digest,
    failure_description,
    hand_built,
    run_patch,
    seeded,
)

PRICE, EXPIRY = "inventory_price_adjustment", "batch_expiry_update"

PRICE_CONFIGS: list[dict[str, Any]] = [
    {"adjustment_type": "percentage", "adjustment_value": 8.5, "min_price": 100},
    {"adjustment_type": "fixed_amount", "adjustment_value": -300.25, "max_price": 5000,
     "before_date": "2026-11-20", "user_id": 7},
    {"adjustment_type": "multiply", "adjustment_value": 1.15},
    {"adjustment_type": "set_value", "adjustment_value": 480, "min_price": 300,
     "max_price": 700},
]


def _transform(engine, name: str, config: dict[str, Any], path: str, **kw: Any) -> str:  # type: ignore[no-untyped-def]
    """Plan, back up and transform one execution on ``path`` (two connections, as the job's
    default ``check_connections``); returns its id."""
    kw.setdefault("connections", 2)
    registry = default_registry()
    patch, settings = kw.pop("patch", registry.patches[name]), registry.settings(name)
    cfg = patch.config_class(**config, transform_path=path, batch_size=kw.pop("batch_size", 40))
    execution_id = plan_execution(engine, patch, settings, cfg)
    if run_at := kw.pop("run_at", None):  # the other path's run time: every column compares
        with engine.begin() as conn:
            conn.execute(update(executions).where(executions.c.execution_id == execution_id)
                         .values(run_at=run_at))
    take_backup(engine, execution_id)
    run_transform(engine, patch, execution_id, MemoryGuard(), **kw)
    return execution_id


def _release(engine, execution_id: str) -> None:  # type: ignore[no-untyped-def]
    """Let the next execution plan the same tables (this one is only compared)."""
    with engine.begin() as conn:
        conn.execute(delete(locks).where(locks.c.execution_id == execution_id))
        conn.execute(update(executions).where(executions.c.execution_id == execution_id)
                     .values(status="failed"))


def _staged(engine, name: str, execution_id: str) -> dict[str, list[tuple[Any, ...]]]:  # type: ignore[no-untyped-def]
    """Every stage row of the execution (its inserts, then its updates, each by sequence), every
    column but its bookkeeping, led by its action, as the driver returns it (no type
    processing: a REAL and an INTEGER differ on SQLite)."""
    patch = default_registry().patches[name]
    out: dict[str, list[tuple[Any, ...]]] = {}
    with engine.connect() as conn:
        for t in patch.written_tables():
            out[t] = []
            for action in (INSERT, UPDATE):
                rows = existing_rows(conn, t, execution_id, action)
                if rows is None:
                    continue
                q = (select(*[c for c in rows.c if c.name not in ("dp_execution_id", "dp_action")])
                     .where(rows.mine).order_by(rows.seq))
                sql = str(q.compile(conn, compile_kwargs={"literal_binds": True}))
                out[t] += [(action, *r) for r in conn.exec_driver_sql(sql)]
    return out


def _rejects(engine, execution_id: str) -> list[tuple[Any, ...]]:  # type: ignore[no-untyped-def]
    cols = [c for c in rejects.c if c.name != "execution_id"]
    with engine.connect() as conn:
        rows = conn.execute(select(*cols).where(rejects.c.execution_id == execution_id))
        return sorted((tuple(r) for r in rows), key=repr)


def _run_at(engine, execution_id: str) -> dt.datetime:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return load_execution(conn, execution_id)["run_at"]


def _counts(engine, execution_id: str) -> tuple[Any, ...]:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        ex = load_execution(conn, execution_id)
    return (ex["phase"], ex["processed_records"], ex["staged_updates"], ex["staged_inserts"],
            ex["failed_records"])


def _both_paths(engine, name: str, config: dict[str, Any], **kw: Any) -> int:  # type: ignore[no-untyped-def]
    """Both paths on the same data; the number of reject rows (equal on both)."""
    py = _transform(engine, name, config, PYTHON_PATH, **kw)
    _release(engine, py)
    sql = _transform(engine, name, config, SQL_PATH, run_at=_run_at(engine, py), **kw)
    _release(engine, sql)
    assert _counts(engine, sql) == _counts(engine, py), config
    expected, got = _staged(engine, name, py), _staged(engine, name, sql)
    assert any(expected.values()), f"{config}: nothing staged, nothing compared"
    for table in expected:
        assert got[table] == expected[table], f"{table} {config}"
    assert _rejects(engine, sql) == _rejects(engine, py), config
    return len(_rejects(engine, py))


def test_price_adjustment_stages_the_same_rows_on_both_paths(database_url):
    engine = seeded(database_url, items=150)
    with engine.begin() as conn:  # rows the schema rejects: a status outside 0/1, an empty name
        conn.execute(update(inventories).where(inventories.c.id.in_([5, 60])).values(status=2))
        conn.execute(update(inventories).where(inventories.c.id == 7).values(name=""))
        conn.execute(update(inventories).where(inventories.c.id == 8).values(price=1250))
    rejected = [_both_paths(engine, PRICE, config) for config in PRICE_CONFIGS]
    assert rejected[2] >= 3  # multiply touches every item: the three bad ones are named


def test_batch_expiry_stages_the_same_rows_on_both_paths(database_url):
    engine = seeded(database_url, items=150)
    with engine.connect() as conn:
        owners = conn.execute(
            select(batches.c.inventory_id).where(
                batches.c.expires_on < dt.date(2026, 11, 29), batches.c.quantity > 0
            ).order_by(batches.c.inventory_id).limit(3)
        ).scalars().all()
    assert owners, "the seed has expired lots"
    with engine.begin() as conn:  # an item holding less than its expired lots: negative stock
        conn.execute(update(inventories).where(inventories.c.id == owners[0]).values(quantity=0))
    configs = ({"business_date": "2026-11-29"},
               {"business_date": "2026-12-20", "grace_days": 3, "user_id": 9})
    assert [_both_paths(engine, EXPIRY, config) for config in configs][0] > 0


def test_rows_the_database_would_refuse_are_rejected_by_name_on_both_paths(database_url):
    """x50,000 takes prices from 2,000 yen past decimal(10,2) (and InventorySchema's le): the
    one-pass stage of the SQL path is refused by the database (SQLite stores them and flags
    them instead), and the batch is checked first and staged without them, as in pandas."""
    engine = seeded(database_url, items=150)
    config = {"adjustment_type": "multiply", "adjustment_value": 50_000}
    assert _both_paths(engine, PRICE, config) > 0


class _DuplicatingPatch(InventoryPriceAdjustment):
    """Updates item 10 twice (a patch bug pandera's unique id check rejects, by name)."""

    def transform(self, batch, config, ctx):  # type: ignore[no-untyped-def]
        changes = super().transform(batch, config, ctx)
        upd = changes.updates.get("inventories")
        if upd is not None:
            changes.updates["inventories"] = pd.concat([upd, upd[upd["id"] == 10]])
        return changes

    def sql_transform(self, batch, config, ctx):  # type: ignore[no-untyped-def]
        changes = super().sql_transform(batch, config, ctx)
        upd = changes.updates["inventories"]
        changes.updates["inventories"] = union_all(upd, upd.where(upd.selected_columns.id == 10))
        return changes


def test_a_duplicate_update_is_rejected_by_name_on_both_paths(database_url):
    engine = seeded(database_url, items=150)
    config = {"adjustment_type": "percentage", "adjustment_value": 8}
    assert _both_paths(engine, PRICE, config, patch=_DuplicatingPatch()) == 2


def test_a_clean_batch_is_checked_in_its_stage_statements_and_the_next_after_a_bad_one_first(
    sqlite_url,
):
    """Batches of 40 items: the second holds a row the schema rejects. The first and fourth
    are checked in the statements that stage them; the second's one-pass stage is undone and
    the batch checked first, as is the third (the batch after one with failing rows)."""
    engine = seeded(sqlite_url, items=160)
    with engine.begin() as conn:
        conn.execute(update(inventories).where(inventories.c.id == 50).values(status=2))
    checks_per_batch: list[int] = []

    def count(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
        if statement.lstrip().startswith("SELECT count(*) AS count_1, max("):  # next keys
            checks_per_batch.append(0)
        elif statement.lstrip().startswith("SELECT checked_"):
            checks_per_batch[-1] += 1

    event.listen(engine, "before_cursor_execute", count)
    try:
        _transform(engine, PRICE, {"adjustment_type": "multiply", "adjustment_value": 1.15},
                   SQL_PATH)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert checks_per_batch == [0, 2, 2, 0, 0]  # the last: no batch left


def test_no_keys_are_probed_after_a_short_batch(database_url):
    """150 items in batches of 40: the fourth batch (30 rows) is the last; no probe for more."""
    engine = seeded(database_url, items=150)
    probes: list[str] = []

    def count(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
        if statement.lstrip().startswith("SELECT count(*) AS count_1, max("):  # next keys
            probes.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        execution_id = _transform(engine, PRICE, {"adjustment_type": "percentage",
                                                  "adjustment_value": 8}, SQL_PATH)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert _counts(engine, execution_id)[:2] == ("transformed", 150)
    assert len(probes) == 4


def test_the_sql_path_resumes_at_the_batch_after_the_last_staged(sqlite_url):
    engine = seeded(sqlite_url, items=200)
    config = {"adjustment_type": "percentage", "adjustment_value": 8}
    whole = _transform(engine, PRICE, config, SQL_PATH, batch_size=30)
    _release(engine, whole)
    run_at = _run_at(engine, whole)

    class Crash(Exception):
        pass

    def crash_after_two(done: int, total: int, eta: float) -> None:
        if done >= 60:
            raise Crash

    with pytest.raises(Crash):
        _transform(engine, PRICE, config, SQL_PATH, batch_size=30, on_progress=crash_after_two,
                   run_at=run_at)
    with engine.connect() as conn:
        crashed = conn.execute(select(executions.c.execution_id, executions.c.batches_done)
                               .order_by(executions.c.started_at.desc())).first()
    assert crashed is not None and crashed.batches_done == 2
    patch = default_registry().patches[PRICE]
    run_transform(engine, patch, crashed.execution_id, MemoryGuard())
    assert _counts(engine, crashed.execution_id) == _counts(engine, whole)
    assert _staged(engine, PRICE, crashed.execution_id) == _staged(engine, PRICE, whole)


class _PandasOnlySchema(InventorySchema):
    @pa.dataframe_check(error="prices end in 0")
    @classmethod
    def round_prices(cls, df):  # type: ignore[no-untyped-def]
        return df["price"] % 10 == 0


class _PandasOnlyColumnSchema(pa.DataFrameModel):
    price: Series[float] = pa.Field(ge=0)

    @pa.check("price")
    @classmethod
    def cheap(cls, s):  # type: ignore[no-untyped-def]
        return s < 10_000


class _PandasCheckedPatch(InventoryPriceAdjustment):
    schemas = {**InventoryPriceAdjustment.schemas, "inventories": _PandasOnlySchema}


class _PandasColumnCheckedPatch(InventoryPriceAdjustment):
    schemas = {**InventoryPriceAdjustment.schemas, "inventories": _PandasOnlyColumnSchema}


@pytest.mark.parametrize(("patch_cls", "named"), [
    (_PandasCheckedPatch, "_PandasOnlySchema.round_prices"),
    (_PandasColumnCheckedPatch, "_PandasOnlyColumnSchema.price: cheap"),
])
def test_a_check_with_no_sql_form_refuses_the_sql_path_by_name(patch_cls, named):
    patch = patch_cls()
    cfg = patch.config_class(adjustment_type="percentage", adjustment_value=8)
    assert transform_path(patch, cfg) == PYTHON_PATH  # the default falls back, saying why
    asked = patch.config_class(adjustment_type="percentage", adjustment_value=8,
                               transform_path=SQL_PATH)
    with pytest.raises(PatchError, match=named.replace(".", r"\.")):
        transform_path(patch, asked)


def test_patches_that_declare_sql_take_it_by_default():
    registry = default_registry()
    for name in (PRICE, EXPIRY):
        patch = registry.patches[name]
        assert transform_path(patch, patch.config_class(**patch.example_config)) == SQL_PATH


def test_the_sql_path_pauses_at_the_window_end_and_continues(sqlite_url):
    engine = seeded(sqlite_url, items=120)
    registry = default_registry()
    patch, settings = registry.patches[PRICE], registry.settings(PRICE)
    cfg = patch.config_class(adjustment_type="percentage", adjustment_value=8, batch_size=50,
                             transform_path=SQL_PATH)
    execution_id = plan_execution(engine, patch, settings, cfg)
    take_backup(engine, execution_id)
    ended = dt.datetime(2026, 11, 28, 17, 0)  # before the tests' clock (17:30 UTC)
    with engine.begin() as conn:
        conn.execute(update(executions).where(executions.c.execution_id == execution_id)
                     .values(deadline_at=ended))
    counts = run_transform(engine, patch, execution_id, MemoryGuard())
    assert counts["paused"] == 1 and counts["processed"] == 0
    with engine.begin() as conn:
        assert load_execution(conn, execution_id)["status"] == "paused"
        conn.execute(update(executions).where(executions.c.execution_id == execution_id)
                     .values(status="running", phase="transforming"))
    counts = run_transform(engine, patch, execution_id, MemoryGuard())
    assert "paused" not in counts and counts["processed"] == 120


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry", "real"])
def test_asking_the_sql_path_of_a_patch_that_cannot_take_it_is_refused_at_plan(
    database_url, dry_run
):
    """Refused by plan_patch in one line naming the check, before the backup or anything else
    is written: the execution row records the refusal (as every plan refusal's does), and that
    is all."""
    engine = hand_built(database_url, [100, 200, 300])
    before = digest(engine)
    patch = _PandasCheckedPatch()
    defs = defs_with((patch, default_registry().settings(PRICE)))
    config = {"adjustment_type": "percentage", "adjustment_value": 8, "dry_run": dry_run,
              "transform_path": SQL_PATH}
    result = run_patch(database_url, PRICE_JOB, config, defs=defs, approve=False)

    assert not result.success
    assert [e.step_key for e in result.all_events if e.is_step_start] == ["plan_patch"]
    assert failure_description(result) == (
        f"{PRICE_JOB} refused before any write: patch {PRICE} cannot take the in-database path "
        "(transform_path: sql): check _PandasOnlySchema.round_prices: prices end in 0 (a "
        "dataframe check with no SQL twin: declare one with sql_twin); leave transform_path "
        "unset to run it in Python"
    )
    assert digest(engine) == before
    with engine.connect() as conn:
        rows = conn.execute(select(executions)).mappings().all()
        assert [(r["status"], r["phase"], r["target_count"]) for r in rows] == [
            ("failed", "planning", 0)
        ]
        assert "_PandasOnlySchema.round_prices" in rows[0]["error_message"]
        assert existing_tables(conn, rows[0]["execution_id"], patch.tables()) == []
        assert conn.execute(select(func.count()).select_from(locks)).scalar_one() == 0
        for table in patch.tables():  # the backup (and stage, target) tables are not even made
            assert mirror_by_name(conn, mirror_name("backup", table)) is None
            assert mirror_by_name(conn, mirror_name("stage", table)) is None
            for kind in OWN_KINDS.values():
                own = own_table_name(kind, rows[0]["execution_id"], table)
                assert mirror_by_name(conn, own) is None, (kind, table)


def test_unasked_a_patch_that_cannot_take_the_sql_path_runs_in_python_saying_why(sqlite_url):
    hand_built(sqlite_url, [100, 200, 300])
    patch = _PandasCheckedPatch()
    defs = defs_with((patch, default_registry().settings(PRICE)))
    instance = DagsterInstance.ephemeral()
    config = {"adjustment_type": "fixed_amount", "adjustment_value": 10}  # prices stay x0
    result = run_patch(sqlite_url, PRICE_JOB, config, defs=defs, instance=instance)

    assert result.success, failure_description(result)
    said = [e.user_message for e in instance.all_logs(result.run_id)
            if e.user_message.startswith("transform in Python")]
    assert said == ["transform in Python: check _PandasOnlySchema.round_prices: prices end in 0 "
                    "(a dataframe check with no SQL twin: declare one with sql_twin)"]


def _stage_update_statements(engine, patch) -> list[str]:  # type: ignore[no-untyped-def]
    """The statements that stage a SQL-path transform's updated items."""
    seen: list[str] = []

    def keep(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
        if statement.lstrip().startswith("INSERT INTO data_patch_update_"):
            seen.append(statement.lstrip())

    event.listen(engine, "before_cursor_execute", keep)
    try:
        execution_id = _transform(engine, PRICE, {"adjustment_type": "percentage",
                                                  "adjustment_value": 8}, SQL_PATH, patch=patch)
    finally:
        event.remove(engine, "before_cursor_execute", keep)
    _release(engine, execution_id)
    items = f"INSERT INTO {own_table_name('update', execution_id, 'inventories')}"
    return [s for s in seen if s.startswith(items)]


def test_updated_rows_derived_from_their_batch_rows_are_checked_without_a_join_back(
    database_url,
):
    """The price change selects each item from its batch row: its unchanged columns are carried
    up to the check and stage statement, which reads the batch once (no join back on id). A
    change that is not provably row for row (here a UNION ALL) is still joined back."""
    engine = seeded(database_url, items=60)
    carried = _stage_update_statements(engine, default_registry().patches[PRICE])
    joined = _stage_update_statements(engine, _DuplicatingPatch())
    assert carried and not any(" JOIN " in s for s in carried)
    assert joined and all(" JOIN " in s for s in joined)


def test_only_changes_that_keep_their_batch_rows_one_for_one_carry_columns():
    """``carry_columns`` refuses whatever could fold, multiply or invent rows or ids."""
    from sqlalchemy import Integer, column, literal, table

    from patch_ops.steps.transform_sql import carry_columns

    batch = select(column("id", Integer), column("price", Integer), column("name"),
                   column("quantity", Integer)).select_from(table("b")).subquery("batch")
    other = table("other", column("id", Integer))
    priced = select(batch.c.id, (batch.c.price * 2).label("new")).subquery("priced")
    kept = carry_columns(
        select(priced.c.id, priced.c.id.label("source_id"), priced.c.new.label("price"))
        .where(priced.c.new > 0), batch, ["name", "quantity"])
    assert kept is not None
    assert list(kept.selected_columns.keys()) == [
        "id", "source_id", "price", "dp_kept_name", "dp_kept_quantity"]
    whole = carry_columns(select(select(priced).subquery("all")), batch, ["name"])
    assert whole is not None and "dp_kept_name" in whole.selected_columns
    refused = {
        "join": select(batch.c.id).join_from(batch, other, other.c.id == batch.c.id),
        "another table": select(batch.c.id).where(other.c.id == batch.c.id),
        "group by": select(batch.c.id).group_by(batch.c.id),
        "aggregate": select(batch.c.id, func.max(batch.c.price).label("price")),
        "distinct": select(batch.c.id).distinct(),
        "limit": select(batch.c.id).limit(5),
        "an id not the batch's": select((batch.c.id + 1).label("id")),
        "a literal id": select(literal(1).label("id")).select_from(batch),
        "below": select(select(priced.c.id).group_by(priced.c.id).subquery("g")),
        "union": union_all(select(batch.c.id), select(batch.c.id)),
    }
    for why, sel in refused.items():
        assert carry_columns(sel, batch, ["name"]) is None, why
    windowed = select(batch.c.id, func.sum(batch.c.price).over().label("total"))
    assert carry_columns(windowed, batch, ["name"]) is not None


@pytest.mark.parametrize("path", [PYTHON_PATH, SQL_PATH])
def test_prices_are_read_at_full_precision_on_both_paths(database_url, path):
    """A batch reads its decimals as doubles. MySQL's ``CAST(x AS FLOAT)`` is single precision
    (7 digits): 32,782.87 read so is 32,782.869140625, and 8 % more rounds to 35,406 instead of
    35,405 (35,405.4996); 20,000,001 reads as 20,000,000. The staged prices and the log rows'
    notes are the decimal results, on every database and both paths."""
    engine = hand_built(database_url, [32782.87, 20000001, 1250])
    execution_id = _transform(
        engine, PRICE, {"adjustment_type": "percentage", "adjustment_value": 8}, path
    )
    tables = state.reflect_tables(engine, ("inventories", "inventory_logs"))
    items = work_rows(engine, tables["inventories"], execution_id, UPDATE)
    logs = work_rows(engine, tables["inventory_logs"], execution_id, INSERT)
    with engine.connect() as conn:
        prices = dict(conn.execute(select(items.seq, items.c.price).where(items.mine)).all())
        notes = conn.execute(
            select(logs.c.note).where(logs.mine)
            .order_by(logs.c.inventory_id)
        ).scalars().all()
    assert {i: float(p) for i, p in prices.items()} == {1: 35405, 2: 21600001, 3: 1350}
    assert [n.split(" (")[0] for n in notes] == [
        "価格調整: 32782.87円 → 35405円", "価格調整: 20000001円 → 21600001円", "価格調整: 1250円 → 1350円"
    ]
