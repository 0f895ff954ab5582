"""Indexes of the work rows tables (patch_ops.work_rows): a backup has no index on
``dp_source_id`` (its rows have no source; the index only slowed the bulk backup insert). A
stage has it only while a reader needs it: the transform drops it (nothing reads it during the
batches), the search for refused rows and the hold-back make it. On SQLite, PostgreSQL and
MariaDB."""

from __future__ import annotations

import dataclasses

from sqlalchemy import Table, inspect

from patch_ops import state
from patch_ops.dialects.names import framework_schema
from patch_ops.state import BACKUP, INSERT, UPDATE, mirror_table, source_index_name
from patch_ops.steps.backup import take_backup
from patch_ops.steps.plan import plan_execution
from patch_ops.steps.transform import run_transform
from patch_ops.target_sets import own_table_name
from patch_ops.work_rows import work_rows
from resources.memory import MemoryGuard
from stockrx_patches.patches.inventory_price_adjustment import InventoryPriceAdjustment
from stockrx_patches.registry import default_registry
from tests.support.production import expired_items, production_schema
from tests.support.stockrx import (
    defs_with,
    failure_description,
    latest_execution,
    run_patch,
    seeded,
)

PRICE = "inventory_price_adjustment"


def _index_names(engine, table: Table) -> set[str]:  # type: ignore[no-untyped-def]
    return {ix["name"] for ix in inspect(engine).get_indexes(table.name, schema=table.schema)}


def test_no_work_rows_table_is_made_with_a_source_index(database_url):
    engine = seeded(database_url, items=20)
    state.ensure_framework_tables(engine)
    live = state.reflect_tables(engine, ["inventories"])["inventories"]
    made = [mirror_table(engine, live, kind) for kind in ("backup", "stage")]  # the shared ones
    registry = default_registry()
    patch = registry.patches[PRICE]
    config = patch.config_class(adjustment_type="percentage", adjustment_value=8,
                                allow_outside_window=True)
    execution_id = plan_execution(engine, patch, registry.settings(PRICE), config)
    made += [work_rows(engine, live, execution_id, a).table for a in (BACKUP, UPDATE)]
    assert len({t.name for t in made}) == 4
    for table in made:
        assert source_index_name(table.name) not in _index_names(engine, table)


def test_the_transform_drops_the_stage_source_index_a_reader_made(database_url):
    engine = seeded(database_url, items=50)
    registry = default_registry()
    patch = registry.patches[PRICE]
    config = patch.config_class(adjustment_type="percentage", adjustment_value=8,
                                allow_outside_window=True)
    execution_id = plan_execution(engine, patch, registry.settings(PRICE), config)
    take_backup(engine, execution_id)
    tables = state.reflect_tables(engine, patch.tables())
    stages = [work_rows(engine, tables["inventories"], execution_id, UPDATE).table,
              work_rows(engine, tables["inventory_logs"], execution_id, INSERT).table]
    for stage in stages:  # as an earlier version made them, or a refusal search since
        state.ensure_source_index(engine, stage)
        assert f"ix_{stage.name}_src" in _index_names(engine, stage)

    counts = run_transform(engine, patch, execution_id, MemoryGuard())

    assert counts["staged_updates"] == counts["staged_inserts"] > 0
    for stage in stages:
        assert f"ix_{stage.name}_src" not in _index_names(engine, stage)


def test_the_refusal_search_and_the_hold_back_make_the_stage_source_index(database_url):
    # Each transform drops it; the refusal search makes it (on_refused_rows: fail, the run
    # fails naming the rows; its tables are then dropped), and so does the hold-back (a real
    # run holds back as approved: no search).
    engine, md = production_schema(database_url, price_cap=True)
    expired_items(engine, md, 20, {})
    with engine.begin() as conn:
        inv = md.tables["inventories"]
        conn.execute(inv.update().where(inv.c.id.in_([5, 12])).values(price=250))
    settings = dataclasses.replace(default_registry().settings(PRICE), on_refused_rows="hold_back")
    defs = defs_with((InventoryPriceAdjustment(), settings))
    live = state.reflect_tables(engine, ["inventories", "inventory_logs"])

    def stages(execution_id: str) -> list[Table]:
        return [work_rows(engine, live["inventories"], execution_id, UPDATE).table,
                work_rows(engine, live["inventory_logs"], execution_id, INSERT).table]

    pct8 = {"adjustment_type": "percentage", "adjustment_value": 8}
    failed = run_patch(database_url, PRICE, {**pct8, "dry_run": True})
    assert not failed.success and "rows 5 (" in failure_description(failed)
    dry = latest_execution(engine, PRICE)
    assert dry["report"]["held_back"]["search"]["attempts"] > 1  # on the stage, by driving row
    standing = set(inspect(engine).get_table_names(schema=framework_schema(engine)))
    made = {own_table_name(kind, dry["execution_id"], table)
            for kind, table in (("update", "inventories"), ("insert", "inventory_logs"))}
    assert not made & standing  # dropped when it failed

    real = run_patch(database_url, PRICE, {**pct8, "dry_run": False}, defs=defs)
    assert real.success, failure_description(real)
    ex = latest_execution(engine, PRICE)
    assert ex["report"]["held_back"]["policy"] == "as approved"
    assert ex["report"]["held_back"]["count"] == 2
    for stage in stages(ex["execution_id"]):
        assert f"ix_{stage.name}_src" in _index_names(engine, stage)
