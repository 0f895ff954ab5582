"""Invariants that filter the same rows share one query, with the impact report's counts and
sums: each broken one is still found and named with its own count and sample, and a shared
query past its timeout fails every check in it."""

from __future__ import annotations

from dataclasses import replace

import pytest
from sqlalchemy import String, cast, column, delete, func, literal, select, table, update
from sqlalchemy.dialects import sqlite

from patch_ops.patch import Invariant, PatchSettings
from patch_ops.steps.backup import take_backup
from patch_ops.steps.commit import commit_execution
from patch_ops.steps.plan import plan_execution
from patch_ops.steps.result import row_filter
from patch_ops.steps.transform import run_transform
from patch_ops.steps.validate import validate_execution
from patch_ops.steps.verify import verify_execution
from resources.memory import MemoryGuard
from stockrx_patches.patches.inventory_price_adjustment import InventoryPriceAdjustment
from stockrx_patches.tables import batches, inventories, inventory_logs
from tests.support.stockrx import hand_built

SETTINGS = PatchSettings(description="test patch", estimated_records=100, batch_size=4,
                         require_approved_plan=False)
PRICES = [100.0 * i for i in range(1, 10)]  # items 1..9, every price changes by 8 %
CONFIG = {"adjustment_type": "percentage", "adjustment_value": 8, "dry_run": False,
          "transform_path": "python"}


class TwoBrokenPatch(InventoryPriceAdjustment):
    """Forgets the counter on even items and keeps the old price on items 3, 6, 9: two
    invariants over the same updated rows break at once."""

    name = "two_broken_patch"
    schemas = {}

    def transform(self, batch, config, ctx):  # type: ignore[no-untyped-def]
        changes = super().transform(batch, config, ctx)
        upd = changes.updates["inventories"]
        old = batch["inventories"].set_index("id")["price"]
        upd.loc[upd["id"] % 2 == 0, "inventory_logs_count"] -= 1
        keep = upd["id"] % 3 == 0
        upd.loc[keep, "price"] = upd.loc[keep, "id"].map(old)
        return changes


def _transformed(url: str, patch: InventoryPriceAdjustment):  # type: ignore[no-untyped-def]
    engine = hand_built(url, PRICES)
    x = plan_execution(engine, patch, SETTINGS, patch.config_class(**CONFIG))
    take_backup(engine, x)
    run_transform(engine, patch, x, MemoryGuard())
    return engine, x


def test_two_invariants_broken_in_one_shared_pass_are_both_named(database_url):
    patch = TwoBrokenPatch()
    engine, x = _transformed(database_url, patch)
    passed, report = validate_execution(engine, patch, SETTINGS, x)
    assert not passed
    broken = report["validation"]["invariants"]
    assert [b["name"] for b in broken] == ["inventory_logs_count_incremented",
                                           "price_actually_changed"]
    counter, price = broken
    assert counter["count"] == 4 and {r["id"] for r in counter["sample"]} == {2, 4, 6, 8}
    assert price["count"] == 3 and {r["id"] for r in price["sample"]} == {3, 6, 9}
    problems = report["validation"]["problems"]
    assert any("inventory_logs_count_incremented broken by 4 row(s)" in p for p in problems)
    assert any("price_actually_changed broken by 3 row(s)" in p for p in problems)
    # the report's counts and sums came from the same pass
    items = report["updates"]["inventories"]
    assert items["rows"] == 9
    after = [p if i % 3 == 0 else round(p * 1.08) for i, p in enumerate(PRICES, start=1)]
    assert items["stats"]["price"]["sum_before"] == sum(PRICES)
    assert items["stats"]["price"]["sum_after"] == sum(after)
    assert items["stats"]["price"]["min_change"] == 0
    assert items["stats"]["inventory_logs_count"]["min_change"] == 0
    assert items["stats"]["inventory_logs_count"]["max_change"] == 1
    assert report["inserts"]["inventory_logs"]["rows"] == 9


def test_after_commit_both_invariants_and_the_live_mismatch_are_named(database_url):
    patch = InventoryPriceAdjustment()
    engine, x = _transformed(database_url, patch)
    passed, report = validate_execution(engine, patch, SETTINGS, x)
    assert passed, report["validation"]
    commit_execution(engine, x)
    with engine.begin() as conn:  # the application undoes part of it
        conn.execute(update(inventories).where(inventories.c.id == 2)
                     .values(inventory_logs_count=inventories.c.inventory_logs_count - 1))
        conn.execute(update(inventories).where(inventories.c.id == 3).values(price=300))
    problems = verify_execution(engine, patch, x)
    assert problems[0].startswith("inventories: live rows differ from what was committed")
    assert "[2, 3]" in problems[0]
    assert any("invariant inventory_logs_count_incremented broken after commit by 1 row(s)"
               in p for p in problems)
    assert any("invariant price_actually_changed broken after commit by 1 row(s)" in p
               for p in problems)


def test_after_commit_a_deleted_row_is_named(database_url):
    """The pass counts the committed rows still there: one the application deleted is named,
    with the log row the patch wrote for it."""
    patch = InventoryPriceAdjustment()
    engine, x = _transformed(database_url, patch)
    assert validate_execution(engine, patch, SETTINGS, x)[0]
    commit_execution(engine, x)
    with engine.begin() as conn:
        logs = conn.execute(select(inventory_logs.c.id).where(inventory_logs.c.inventory_id == 4)
                            .order_by(inventory_logs.c.id)).scalars().all()
        for t in (inventory_logs, batches):
            conn.execute(delete(t).where(t.c.inventory_id == 4))
        conn.execute(delete(inventories).where(inventories.c.id == 4))
    problems = verify_execution(engine, patch, x, connections=2)
    assert problems[:2] == [
        "inventories: live rows differ from what was committed, e.g. ids [4]",
        f"inventory_logs: live rows differ from what was committed, e.g. ids [{logs[-1]}]",
    ]


class NoInvariantsPatch(InventoryPriceAdjustment):
    """No invariant passes over the updated rows: verification compares them on its own."""

    name = "no_invariants_patch"

    def invariants(self, result, config):  # type: ignore[no-untyped-def]
        return []


def test_after_commit_without_invariants_the_live_mismatch_is_named(database_url):
    patch = NoInvariantsPatch()
    engine, x = _transformed(database_url, patch)
    assert validate_execution(engine, patch, SETTINGS, x)[0]
    commit_execution(engine, x)
    assert verify_execution(engine, patch, x) == []
    with engine.begin() as conn:
        conn.execute(update(inventories).where(inventories.c.id == 5).values(price=1))
    assert verify_execution(engine, patch, x, connections=2) == [
        "inventories: live rows differ from what was committed, e.g. ids [5]"
    ]


class SlowFilterPatch(InventoryPriceAdjustment):
    """Two row filters whose condition sleeps 50 ms per row on PostgreSQL: their shared pass
    runs past the 0.5 s allowed."""

    name = "slow_filter_patch"

    def invariants(self, result, config):  # type: ignore[no-untyped-def]
        items = result.updated("inventories")
        slow = cast(func.pg_sleep(0.05), String) == "never"
        return [
            *super().invariants(result, config),
            Invariant("slow_a", "sleeps", select(items.c.id).where(slow)),
            Invariant("slow_b", "sleeps too", select(items.c.id).where(slow, items.c.id > 0)),
        ]


@pytest.mark.postgres
def test_a_shared_pass_past_its_timeout_fails_every_check_in_it(pg_url):
    patch = SlowFilterPatch()
    settings = replace(SETTINGS, query_timeout_seconds=0.5)
    engine = hand_built(pg_url, PRICES * 3)
    x = plan_execution(engine, patch, settings, patch.config_class(**CONFIG))
    take_backup(engine, x)
    run_transform(engine, patch, x, MemoryGuard())
    passed, report = validate_execution(engine, patch, settings, x)
    assert not passed
    broken = {b["name"]: b for b in report["validation"]["invariants"]}
    # the patch's own row filters share the pass: they could not be checked either
    assert {"slow_a", "slow_b", "inventory_logs_count_incremented",
            "price_actually_changed"} <= set(broken)
    for name in ("slow_a", "slow_b"):
        assert broken[name]["count"] is None and broken[name]["timed_out"] == 0.5
        assert any(f"invariant {name} could not be checked" in p
                   for p in report["validation"]["problems"])
    assert report["updates"]["inventories"]["rows"] == 27  # computed again without the pass


def test_only_plain_row_filters_share_a_pass():
    t = table("t", column("id"), column("n"), column("k"))
    u = table("u", column("id"))
    dialect = sqlite.dialect()

    def shares(sel) -> bool:  # type: ignore[no-untyped-def]
        return row_filter(Invariant("x", "x", sel), dialect) is not None

    assert shares(select(t.c.id).where(t.c.n < 0))
    assert shares(select(t.c.id, (t.c.n + 1).label("m")).where(t.c.n < 0, t.c.k == 1))
    assert not shares(select(t.c.id))  # no filter
    assert not shares(select(t.c.id).join(u, u.c.id == t.c.id).where(t.c.n < 0))
    assert not shares(select(t.c.k).where(t.c.n < 0).group_by(t.c.k))
    assert not shares(select(t.c.k).where(t.c.n < 0).distinct())
    assert not shares(select(t.c.id).where(t.c.n < 0).limit(3))
    assert not shares(select(func.count()).select_from(t).where(t.c.n < 0))
    assert not shares(select(t.c.id).where(~select(u.c.id).where(u.c.id == t.c.id).exists()))
    assert not shares(select(t.c.id).where(t.c.k.in_(select(u.c.id))))
    assert not shares(select(literal(1)).where(t.c.n < 0, u.c.id == 1))  # two sources
