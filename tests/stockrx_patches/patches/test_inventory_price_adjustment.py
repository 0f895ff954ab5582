"""inventory_price_adjustment: exact prices, filters, log rows, counters, dry run."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pytest
from sqlalchemy import MetaData, String, Table, cast, func, literal, select, update

from patch_ops.patch import RunContext
from patch_ops.state import BACKUP
from patch_ops.work_rows import existing_rows
from stockrx_patches.patches.inventory_price_adjustment import (
    InventoryPriceAdjustment,
    PriceAdjustmentConfig,
)
from stockrx_patches.tables import inventories, inventory_logs
from tests.support.stockrx import (
    PRICE_JOB,
    digest,
    hand_built,
    latest_execution,
    prices,
    run_patch,
    seeded,
)

PATCH = InventoryPriceAdjustment()
CTX = RunContext("e", dt.datetime(2026, 11, 29, 1, 2, 3), dt.date(2026, 11, 29))


def _batch(price_list: list[float]) -> dict[str, pd.DataFrame]:
    n = len(price_list)
    return {
        "inventories": pd.DataFrame(
            {
                "id": range(1, n + 1),
                "name": [f"i{k}" for k in range(n)],
                "quantity": [7] * n,
                "price": price_list,
                "status": [0] * n,
                "batches_count": [1] * n,
                "inventory_logs_count": [3] * n,
            }
        )
    }


@pytest.mark.parametrize(
    ("kind", "value", "before", "after"),
    [
        ("percentage", 8, [1000, 1250, 999.5, 0, 13], [1080, 1350, 1079, 0, 14]),
        ("percentage", -100, [1000, 0], [0, 0]),
        ("percentage", 10, [5, 15], [6, 17]),  # 5.5 → 6 and 16.5 → 17: half up
        ("fixed_amount", -300, [1000, 200, 300], [700, 0, 0]),
        ("fixed_amount", 50.4, [100, 0.5], [150, 51]),
        ("multiply", 1.5, [3, 101], [5, 152]),  # 4.5 → 5, 151.5 → 152
        ("set_value", 480, [100, 480, 479.6], [480, 480, 480]),
    ],
)
def test_transform_prices_round_half_up_to_whole_yen(kind, value, before, after):
    cfg = PriceAdjustmentConfig(adjustment_type=kind, adjustment_value=value)
    changes = PATCH.transform(_batch(before), cfg, CTX)
    expected = {i + 1: a for i, (b, a) in enumerate(zip(before, after, strict=True)) if a != b}
    got = {}
    if "inventories" in changes.updates:
        got = dict(zip(changes.updates["inventories"]["id"], changes.updates["inventories"]["price"], strict=True))
    assert got == expected


def test_transform_log_rows_and_counter():
    cfg = PriceAdjustmentConfig(adjustment_type="percentage", adjustment_value=8)
    changes = PATCH.transform(_batch([1000, 1080.5, 0]), cfg, CTX)
    upd = changes.updates["inventories"]
    assert list(upd["id"]) == [1, 2]  # price 0 stays 0: not touched
    assert list(upd["inventory_logs_count"]) == [4, 4]
    assert set(upd["updated_at"]) == {CTX.run_at}
    logs = changes.inserts["inventory_logs"]
    assert list(logs["note"]) == [
        "価格調整: 1000円 → 1080円 (percentage:8)",
        "価格調整: 1080.50円 → 1167円 (percentage:8)",
    ]
    assert set(logs["operation_type"]) == {"adjust"}
    assert set(logs["delta"]) == {0}
    assert list(logs["previous_quantity"]) == list(logs["current_quantity"]) == [7, 7]


@pytest.mark.parametrize(
    ("kind", "value", "message"),
    [
        ("percentage", 1000.01, "in [-100, 1000]"),
        ("percentage", -101, "in [-100, 1000]"),
        ("multiply", 0, "> 0"),
        ("multiply", -2, "> 0"),
        ("set_value", -1, "in [0, None]"),
    ],
)
def test_config_out_of_range_is_refused(kind, value, message):
    from patch_ops.patch import PatchConfigError

    with pytest.raises(PatchConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        PATCH.check_config(PriceAdjustmentConfig(adjustment_type=kind, adjustment_value=value))


def test_dry_run_changes_nothing_and_reports_what_the_real_run_does(database_url):
    engine = seeded(database_url, items=400)
    before = digest(engine)
    dry = run_patch(database_url, PRICE_JOB, {"adjustment_type": "percentage", "adjustment_value": 8})
    assert dry.success
    assert digest(engine) == before
    ex = latest_execution(engine)
    assert ex["dry_run"] and ex["status"] == "completed"
    report = ex["report"]
    would_change = report["updates"]["inventories"]["rows"]
    assert 0 < would_change <= 400
    assert report["inserts"]["inventory_logs"]["rows"] == would_change
    md = dry.output_for_node("validate_changes", "passed_dry")
    assert md == ex["execution_id"]
    meta = [
        e for e in dry.all_events
        if e.event_type_value == "STEP_OUTPUT" and e.step_key == "validate_changes"
    ][0].event_specific_data.metadata
    assert "DRY RUN" in meta["impact_report"].value
    assert meta["rows_changed"].value == would_change
    old = prices(engine)

    real = run_patch(
        database_url, PRICE_JOB, {"adjustment_type": "percentage", "adjustment_value": 8, "dry_run": False}
    )
    assert real.success
    new = prices(engine)
    changed = {i for i in old if old[i] != new[i]}
    assert len(changed) == would_change
    stats = report["updates"]["inventories"]["stats"]["price"]
    assert stats["sum_before"] == pytest.approx(sum(old[i] for i in changed))
    assert stats["sum_after"] == pytest.approx(sum(new[i] for i in changed))
    real_ex = latest_execution(engine)
    assert real_ex["status"] == "completed" and not real_ex["dry_run"]
    assert real_ex["staged_updates"] == would_change


def test_each_type_and_filter_changes_exactly_the_right_rows(sqlite_url):
    """End to end on SQLite; on PostgreSQL and MariaDB the same types and filters stage the same
    rows in the database as in pandas (tests/patch_ops/steps/test_transform_paths.py), and every
    commit path runs there in the other tests."""
    database_url = sqlite_url
    engine = hand_built(database_url, [100, 200, 300, 400, 500, 1000.5])
    cfg = {
        "adjustment_type": "fixed_amount", "adjustment_value": 10, "dry_run": False,
        "min_price": 200, "max_price": 1000.5, "before_date": "2026-01-15",
    }
    # updated_at = T0 + i days: items 1..4 are before 2026-01-15 (T0 = 2026-01-10).
    result = run_patch(database_url, PRICE_JOB, cfg)
    assert result.success, result
    assert prices(engine) == {1: 100, 2: 210, 3: 310, 4: 410, 5: 500, 6: 1000.5}

    with engine.connect() as conn:
        logs = conn.execute(
            select(inventory_logs).where(inventory_logs.c.operation_type == "adjust")
            .order_by(inventory_logs.c.inventory_id)
        ).mappings().all()
        counts = dict(conn.execute(select(inventories.c.id, inventories.c.inventory_logs_count)).all())
        real_counts = dict(
            conn.execute(
                select(inventory_logs.c.inventory_id, func.count(inventory_logs.c.id))
                .group_by(inventory_logs.c.inventory_id)
            ).all()
        )
    assert [r["inventory_id"] for r in logs] == [2, 3, 4]
    assert [r["note"] for r in logs] == [
        "価格調整: 200円 → 210円 (fixed_amount:10)",
        "価格調整: 300円 → 310円 (fixed_amount:10)",
        "価格調整: 400円 → 410円 (fixed_amount:10)",
    ]
    assert all(r["delta"] == 0 and r["previous_quantity"] == r["current_quantity"] == 5 for r in logs)
    assert counts == real_counts  # counter cache true for every item

    # set_value and multiply on the same data, then percentage: every type through the engine
    for kind, value, expect in [
        ("set_value", 250, {1: 250, 2: 250, 3: 250, 4: 250, 5: 250, 6: 250}),
        ("multiply", 2, {i: 500 for i in range(1, 7)}),
        ("percentage", -10, {i: 450 for i in range(1, 7)}),
    ]:
        r = run_patch(database_url, PRICE_JOB, {"adjustment_type": kind, "adjustment_value": value, "dry_run": False})
        assert r.success
        assert prices(engine) == expect
    with engine.connect() as conn:
        n_adjust = conn.execute(
            select(func.count(inventory_logs.c.id)).where(inventory_logs.c.operation_type == "adjust")
        ).scalar_one()
    assert n_adjust == 3 + 6 + 6 + 6


def test_items_whose_price_does_not_change_get_no_log(database_url):
    engine = hand_built(database_url, [100, 0, 250])
    result = run_patch(
        database_url, PRICE_JOB, {"adjustment_type": "set_value", "adjustment_value": 100, "dry_run": False}
    )
    assert result.success
    with engine.connect() as conn:
        ids = conn.execute(
            select(inventory_logs.c.inventory_id).where(inventory_logs.c.operation_type == "adjust")
        ).scalars().all()
    assert sorted(ids) == [2, 3]
    ex = latest_execution(engine)
    assert ex["target_count"] == 3 and ex["staged_updates"] == 2


def test_a_patch_with_nothing_to_do_succeeds_and_says_so(database_url):
    engine = hand_built(database_url, [100, 200])
    before = digest(engine)
    result = run_patch(
        database_url, PRICE_JOB,
        {"adjustment_type": "percentage", "adjustment_value": 5, "min_price": 10_000, "dry_run": False},
    )
    assert result.success
    assert digest(engine) == before
    ex = latest_execution(engine)
    assert ex["target_count"] == 0 and ex["status"] == "completed"
    assert "rows changed | 0" in ex["report_markdown"]


def test_works_on_a_table_with_more_columns_than_we_know(database_url):
    engine = hand_built(database_url, [100, 200])
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE inventories ADD COLUMN supplier_code VARCHAR(20)")
        live = Table("inventories", MetaData(), autoload_with=conn)
        conn.execute(update(live).values(supplier_code=literal("S-") + cast(live.c.id, String)))
    result = run_patch(
        database_url, PRICE_JOB, {"adjustment_type": "multiply", "adjustment_value": 3, "dry_run": False}
    )
    assert result.success
    assert prices(engine) == {1: 300, 2: 600}
    real = latest_execution(engine)["execution_id"]  # (its approving dry run's rows are there too)
    with engine.connect() as conn:
        codes = conn.exec_driver_sql("SELECT supplier_code FROM inventories ORDER BY id").scalars().all()
        bk = existing_rows(conn, "inventories", real, BACKUP)  # as the database has it
        assert bk is not None
        backup_cols = conn.execute(
            select(bk.c.supplier_code).where(bk.mine).order_by(bk.seq)
        ).scalars().all()
    assert codes == ["S-1", "S-2"]
    assert backup_cols == ["S-1", "S-2"]  # the backup captures every column


def test_updated_at_filter_uses_the_date(database_url):
    engine = hand_built(database_url, [100, 100, 100])
    with engine.begin() as conn:
        conn.execute(update(inventories).where(inventories.c.id == 3).values(updated_at=dt.datetime(2030, 1, 1)))
    result = run_patch(
        database_url, PRICE_JOB,
        {"adjustment_type": "fixed_amount", "adjustment_value": 1, "before_date": "2029-12-31",
         "dry_run": False},
    )
    assert result.success
    assert prices(engine) == {1: 101, 2: 101, 3: 100}
