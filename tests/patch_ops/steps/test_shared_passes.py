"""Invariants that filter the same rows, or screen the same join, share one query, with the
impact report's counts and sums: each broken one is still found and named with its own count
and sample, and a shared query past its timeout fails every check in it."""

from __future__ import annotations

from dataclasses import replace

import pandas as pd
import pytest
from sqlalchemy import (
    String,
    case,
    cast,
    column,
    delete,
    event,
    func,
    literal,
    select,
    table,
    update,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Engine

from patch_ops.execution import run_concurrently
from patch_ops.patch import Invariant, PatchSettings
from patch_ops.steps.backup import take_backup
from patch_ops.steps.commit import commit_execution
from patch_ops.steps.plan import plan_execution
from patch_ops.steps.result import invariant_checks, row_filter
from patch_ops.steps.transform import run_transform
from patch_ops.steps.validate import validate_execution
from patch_ops.steps.verify import staged_differences, verify_execution
from resources.memory import MemoryGuard
from stockrx_patches.invariants import screened
from stockrx_patches.patches.inventory_price_adjustment import InventoryPriceAdjustment
from stockrx_patches.tables import batches, inventories, inventory_logs
from tests.support.stockrx import (
    PRICE_JOB,
    failure_description,
    hand_built,
    latest_execution,
    run_patch,
    seeded,
)

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


def _transformed(url: str, patch: InventoryPriceAdjustment, prices=PRICES):  # type: ignore[no-untyped-def]
    engine = hand_built(url, prices)
    x = plan_execution(engine, patch, SETTINGS, patch.config_class(**CONFIG))
    take_backup(engine, x)
    run_transform(engine, patch, x, MemoryGuard())
    return engine, x


def _committed(url: str, patch: InventoryPriceAdjustment, prices=PRICES):  # type: ignore[no-untyped-def]
    engine, x = _transformed(url, patch, prices)
    assert validate_execution(engine, patch, SETTINGS, x)[0]
    commit_execution(engine, x)
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


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "known limitation (session 23 note on issue 22): post-verification reads live rows after "
    "COMMIT, so the application's own writes since the commit fail it and the backup is "
    "restored; a check made at the commit instant would not see them"))
def test_an_application_sale_after_the_commit_does_not_fail_verification(database_url):
    """A sale of a changed item between the commit and post-verification, as Rails writes it
    (quantity down by one, updated_at now): the patch's result at its commit is intact, so
    verification should pass (today it fails: live rows differ, log quantities do not match)."""
    patch = InventoryPriceAdjustment()
    engine, x = _committed(database_url, patch)
    with engine.begin() as conn:
        conn.execute(update(inventories).where(inventories.c.id == 2).values(
            quantity=inventories.c.quantity - 1, updated_at=func.current_timestamp()))
    assert verify_execution(engine, patch, x) == []


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
def validated_past_timeout(pg_url, patch):  # type: ignore[no-untyped-def]
    """Validate a transformed run of ``patch`` with a 0.5 s query limit: (report, broken checks
    by name); the run must not pass."""
    settings = replace(SETTINGS, query_timeout_seconds=0.5)
    engine = hand_built(pg_url, PRICES * 3)
    x = plan_execution(engine, patch, settings, patch.config_class(**CONFIG))
    take_backup(engine, x)
    run_transform(engine, patch, x, MemoryGuard())
    passed, report = validate_execution(engine, patch, settings, x)
    assert not passed
    return report, {b["name"]: b for b in report["validation"]["invariants"]}


def test_a_shared_pass_past_its_timeout_fails_every_check_in_it(pg_url):
    report, broken = validated_past_timeout(pg_url, SlowFilterPatch())
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


# The price patch's three log checks are screened together over one join of the items and
# their log rows: each one still finds its violation and names its rows as on its own.

WITH_UNCHANGED = [*PRICES, 0.0]  # item 10's price stays 0: it is not changed


class BrokenLogsPatch(InventoryPriceAdjustment):
    """Writes the log rows wrong: ``missing`` drops item 2's, ``doubled`` doubles item 3's,
    ``belong`` adds one for item 10 (not changed), ``quantities`` gives item 4's another
    previous_quantity and item 5's another current_quantity."""

    name = "broken_logs_patch"
    schemas = {}
    breaks: tuple[str, ...] = ()

    def transform(self, batch, config, ctx):  # type: ignore[no-untyped-def]
        changes = super().transform(batch, config, ctx)
        logs = changes.inserts["inventory_logs"]
        if "missing" in self.breaks:
            logs = logs[logs["inventory_id"] != 2]
        if "doubled" in self.breaks:
            logs = pd.concat([logs, logs[logs["inventory_id"] == 3]])
        if "belong" in self.breaks and 10 in set(batch["inventories"]["id"]):
            extra = logs.iloc[:1].copy()
            extra[["source_id", "inventory_id"]] = 10
            logs = pd.concat([logs, extra])
        if "quantities" in self.breaks:
            logs.loc[logs["inventory_id"] == 4, "previous_quantity"] += 1
            logs.loc[logs["inventory_id"] == 5, "current_quantity"] += 1
        changes.inserts["inventory_logs"] = logs.reset_index(drop=True)
        return changes


ONE_LOG, BELONG, QUANTITIES = (
    "one_log_per_changed_item", "log_rows_belong_to_changed_items", "log_quantities_match_item"
)
BROKEN_BY = {  # what each break breaks: invariant -> rows named
    "missing": {ONE_LOG: [{"id": 2, "n": None}]},
    "doubled": {ONE_LOG: [{"id": 3, "n": 2}]},
    "belong": {BELONG: [{"inventory_id": 10}]},
    "quantities": {QUANTITIES: [{"inventory_id": 4}, {"inventory_id": 5}]},
}


@pytest.mark.parametrize("breaks", [("missing",), ("doubled",), ("belong",), ("quantities",),
                                    tuple(BROKEN_BY)])
def test_each_log_check_screened_together_finds_and_names_its_rows(database_url, breaks):
    patch = BrokenLogsPatch()
    patch.breaks = breaks
    engine = hand_built(database_url, WITH_UNCHANGED)
    x = plan_execution(engine, patch, SETTINGS, patch.config_class(**CONFIG))
    take_backup(engine, x)
    run_transform(engine, patch, x, MemoryGuard())
    passed, report = validate_execution(engine, patch, SETTINGS, x)
    assert not passed
    expected: dict[str, list[dict]] = {}
    for b in breaks:
        for name, rows in BROKEN_BY[b].items():
            expected[name] = expected.get(name, []) + rows
    broken = report["validation"]["invariants"]
    assert [b["name"] for b in broken] == [n for n in (ONE_LOG, BELONG, QUANTITIES)
                                           if n in expected]
    for b in broken:
        rows = expected[b["name"]]
        key = next(iter(rows[0]))
        assert b["count"] == len(rows)
        assert sorted(b["sample"], key=lambda r: r[key]) == rows
        assert any(f"invariant {b['name']} broken by {len(rows)} row(s)" in p
                   for p in report["validation"]["problems"])


def test_after_commit_each_log_check_screened_together_names_its_rows(database_url):
    """The application breaks all three after commit: a log row deleted (item 2), one moved
    to an item the patch did not change (item 6's, to item 10), one with another quantity."""
    patch = InventoryPriceAdjustment()
    engine = hand_built(database_url, WITH_UNCHANGED)
    x = plan_execution(engine, patch, SETTINGS, patch.config_class(**CONFIG))
    take_backup(engine, x)
    run_transform(engine, patch, x, MemoryGuard())
    assert validate_execution(engine, patch, SETTINGS, x)[0]
    commit_execution(engine, x)
    assert verify_execution(engine, patch, x) == []
    new = (inventory_logs.c.operation_type == "adjust")
    with engine.begin() as conn:
        conn.execute(delete(inventory_logs).where(new, inventory_logs.c.inventory_id == 2))
        conn.execute(update(inventory_logs).where(new, inventory_logs.c.inventory_id == 6)
                     .values(inventory_id=10))
        conn.execute(update(inventory_logs).where(new, inventory_logs.c.inventory_id == 4)
                     .values(previous_quantity=inventory_logs.c.previous_quantity + 1))
    problems = verify_execution(engine, patch, x, connections=2)
    assert problems[0].startswith("inventory_logs: live rows differ from what was committed")
    assert problems[1:] == [
        "invariant one_log_per_changed_item broken after commit by 2 row(s): every changed "
        "item has exactly one adjust log row",
        "invariant log_rows_belong_to_changed_items broken after commit by 1 row(s): every new "
        "log row is for an item whose price changed",
        "invariant log_quantities_match_item broken after commit by 1 row(s): log rows carry "
        "the item's quantity, delta 0",
    ]


class SlowJoinPatch(InventoryPriceAdjustment):
    """One more check screened over the join of the three log checks, sleeping 50 ms per row on
    PostgreSQL: their shared pass runs past the 0.5 s allowed."""

    name = "slow_join_patch"

    def invariants(self, result, config):  # type: ignore[no-untyped-def]
        invariants = super().invariants(result, config)
        paired = invariants[0].screen[0]
        slow = cast(func.pg_sleep(0.05), String) == "never"
        return [*invariants, Invariant("slow_join", "sleeps", select(literal(1)).where(slow),
                                       screen=(paired, func.count(case((slow, 1)))))]


@pytest.mark.postgres
def test_a_screened_pass_past_its_timeout_fails_every_check_in_it(pg_url):
    _, broken = validated_past_timeout(pg_url, SlowJoinPatch())
    assert set(broken) == {"one_log_per_changed_item", "log_rows_belong_to_changed_items",
                           "log_quantities_match_item", "slow_join"}
    for b in broken.values():
        assert b["count"] is None and b["timed_out"] == 0.5


def test_a_pass_over_the_items_is_made_in_their_join_with_the_grouped_log_rows(database_url):
    """After commit the row filters over the updated items and verification's comparison are
    counted in the pass over the items joined with their log rows grouped per item (one row
    per item): one query less, the same broken invariants, counts and samples, the same
    aggregates, whichever invariants the application broke."""
    patch = InventoryPriceAdjustment()
    engine, x = _committed(database_url, patch, WITH_UNCHANGED)
    new = inventory_logs.c.operation_type == "adjust"
    with engine.begin() as conn:
        conn.execute(update(inventories).where(inventories.c.id == 2)
                     .values(inventory_logs_count=inventories.c.inventory_logs_count - 1))
        conn.execute(update(inventories).where(inventories.c.id == 3).values(price=300))
        conn.execute(delete(inventory_logs).where(new, inventory_logs.c.inventory_id == 5))
        conn.execute(update(inventory_logs).where(new, inventory_logs.c.inventory_id == 4)
                     .values(previous_quantity=inventory_logs.c.previous_quantity + 1))
    found = {}
    for joined in (False, True):
        checks = invariant_checks(engine, patch, x, committed=True, timeout_s=None,
                                  aggregates=staged_differences,
                                  shared_only=["updates:inventories"], join_passes=joined)
        broken = checks.broken(run_concurrently(checks.calls, 2))
        found[joined] = (len(checks.calls), broken,
                         {k: f.result() for k, f in checks.aggregates.items()})
    assert found[True][0] == found[False][0] - 1
    assert found[True][1:] == found[False][1:]
    assert [b["name"] for b in found[True][1]] == [
        "one_log_per_changed_item", "inventory_logs_count_incremented",
        "log_quantities_match_item", "price_actually_changed"]
    assert found[True][2]["updates:inventories"][1] == 2  # items 2 and 3 differ


class InnerJoinPatch(InventoryPriceAdjustment):
    """The row filters over the items, and a check screened over the items JOIN (not LEFT JOIN)
    their grouped log rows: an item whose log row is gone is not in that join, so the items'
    own pass is not made in it."""

    name = "inner_join_patch"

    def invariants(self, result, config):  # type: ignore[no-untyped-def]
        items, logs = result.updated("inventories"), result.inserted("inventory_logs")
        per_item = (select(logs.c.inventory_id, func.count().label("n"))
                    .group_by(logs.c.inventory_id).subquery())
        joined = items.join(per_item, per_item.c.inventory_id == items.c.id)
        extra = Invariant("logged_items_changed", "never broken",
                          select(items.c.id).select_from(joined).where(per_item.c.n < 0))
        plain = [i for i in super().invariants(result, config) if i.screen is None]
        return [*plain, *screened(joined, (extra, func.count(case((per_item.c.n < 0, 1)))))]


def test_a_pass_over_the_items_is_not_made_in_a_join_that_drops_items(database_url):
    patch = InnerJoinPatch()
    engine, x = _committed(database_url, patch)
    new = inventory_logs.c.operation_type == "adjust"
    with engine.begin() as conn:  # item 5 loses its log row, then its price
        conn.execute(delete(inventory_logs).where(new, inventory_logs.c.inventory_id == 5))
        conn.execute(update(inventories).where(inventories.c.id == 5).values(price=500))
    problems = verify_execution(engine, patch, x)
    assert "invariant price_actually_changed broken after commit by 1 row(s): no item is " \
           "touched whose price stays the same" in problems


@pytest.mark.postgres
@pytest.mark.parametrize("beside", [False, True])
def test_a_pass_over_a_join_with_grouped_rows_runs_in_one_postgres_process(pg_url, beside):
    """PostgreSQL's parallel workers would each group the log rows again: the pass over the
    items joined with their grouped log rows runs without them, and only that transaction
    (the pooled connection plans in parallel again after it). Passes that run beside each
    other on their own connections (validate's, verify's) all run without them: the workers of
    one would take the CPUs the other needs."""
    patch = InventoryPriceAdjustment()
    engine, x = _transformed(pg_url, patch)
    seen: dict[str, str] = {}

    @event.listens_for(engine, "after_cursor_execute")
    def workers(conn, cursor, statement, *args):  # type: ignore[no-untyped-def]
        if "max_parallel" not in statement:
            key = "grouped" if "logs_of_item" in statement else "other"
            seen[key] = conn.exec_driver_sql("SHOW max_parallel_workers_per_gather").scalar()

    checks = invariant_checks(engine, patch, x, committed=False, timeout_s=None, beside=beside)
    assert checks.broken(run_concurrently(checks.calls, 2 if beside else 1)) == []
    event.remove(engine, "after_cursor_execute", workers)
    with engine.connect() as conn:
        default = conn.exec_driver_sql("SHOW max_parallel_workers_per_gather").scalar()
    assert default != "0" and seen["grouped"] == "0"
    assert seen["other"] == ("0" if beside else default)


def test_an_approved_real_run_counts_its_histogram_in_its_pass_over_the_items(database_url):
    """A real run's validation guesses the bucket edges its approving dry run's histograms have
    (the same plan): its impact report counts the histogram in the pass over the updated items
    that sums their changes. No bucketing query: the histogram the dry run showed, all the
    same."""
    engine = seeded(database_url)
    config = {"adjustment_type": "percentage", "adjustment_value": 8}
    dry = run_patch(database_url, PRICE_JOB, {**config, "dry_run": True}, approve=False)
    assert dry.success, failure_description(dry)
    shown = latest_execution(engine, PRICE_JOB)["report"]["updates"]["inventories"]["histograms"]
    assert len(shown["price"]["counts"]) > 2
    seen: list[str] = []

    def statement(conn, cursor, sql, *args):  # type: ignore[no-untyped-def]
        seen.append(sql)

    event.listen(Engine, "before_cursor_execute", statement)
    try:
        real = run_patch(database_url, PRICE_JOB, {**config, "dry_run": False}, approve=False)
    finally:
        event.remove(Engine, "before_cursor_execute", statement)
    assert real.success, failure_description(real)
    ex = latest_execution(engine, PRICE_JOB)
    assert ex["approved_by_execution_id"] and not ex["dry_run"]
    assert ex["report"]["updates"]["inventories"]["histograms"] == shown
    assert not [s for s in seen if "bucketed" in s]
