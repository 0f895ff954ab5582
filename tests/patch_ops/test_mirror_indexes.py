"""Indexes of the mirror tables (patch_ops.state.mirror_table): a backup mirror has no index on
``dp_source_id`` (its rows have no source; the index only slowed the bulk backup insert), and
one made by an earlier version loses it at the next plan, its rows kept. A stage mirror has it only while a reader
needs it: the transform drops it (nothing reads it during the batches), the search for refused
rows and the hold-back make it. On SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import dataclasses

from sqlalchemy import Index, MetaData, Table, func, insert, inspect, literal, select

from patch_ops import state
from patch_ops.database import get_engine
from patch_ops.execution import new_execution_id
from patch_ops.state import BACKUP, mirror_table, source_index_name
from patch_ops.steps.backup import take_backup
from patch_ops.steps.plan import plan_execution
from patch_ops.steps.transform import run_transform
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


def test_no_mirror_is_made_with_a_source_index(database_url):
    engine = seeded(database_url, items=20)
    state.ensure_framework_tables(engine)
    live = state.reflect_tables(engine, ["inventories"])["inventories"]
    for kind in ("backup", "stage"):
        made = _index_names(engine, mirror_table(engine, live, kind))
        assert source_index_name(kind, "inventories") not in made


def test_the_transform_drops_the_stage_source_index_a_reader_made(database_url):
    engine = seeded(database_url, items=50)
    registry = default_registry()
    patch = registry.patches[PRICE]
    config = patch.config_class(adjustment_type="percentage", adjustment_value=8,
                                allow_outside_window=True)
    execution_id = plan_execution(engine, patch, registry.settings(PRICE), config)
    take_backup(engine, execution_id)
    tables = state.reflect_tables(engine, patch.tables())
    stages = [mirror_table(engine, tables[t], "stage") for t in ("inventories", "inventory_logs")]
    for stage in stages:  # as an earlier version made them, or a refusal search since
        state.ensure_source_index(engine, stage)
        assert f"ix_{stage.name}_src" in _index_names(engine, stage)

    counts = run_transform(engine, patch, execution_id, MemoryGuard())

    assert counts["staged_updates"] == counts["staged_inserts"] > 0
    for stage in stages:
        assert f"ix_{stage.name}_src" not in _index_names(engine, stage)


def test_the_refusal_search_and_the_hold_back_make_the_stage_source_index(database_url):
    # Each transform drops it; the refusal search makes it (on_refused_rows: fail, the run
    # fails naming the rows), and so does the hold-back (a real run holds back as approved:
    # no search).
    engine, md = production_schema(database_url, price_cap=True)
    expired_items(engine, md, 20, {})
    with engine.begin() as conn:
        inv = md.tables["inventories"]
        conn.execute(inv.update().where(inv.c.id.in_([5, 12])).values(price=250))
    settings = dataclasses.replace(default_registry().settings(PRICE), on_refused_rows="hold_back")
    defs = defs_with((InventoryPriceAdjustment(), settings))
    live = state.reflect_tables(engine, ["inventories", "inventory_logs"])
    stages = [mirror_table(engine, t, "stage") for t in live.values()]

    pct8 = {"adjustment_type": "percentage", "adjustment_value": 8}
    failed = run_patch(database_url, PRICE, {**pct8, "dry_run": True})
    assert not failed.success and "rows 5 (" in failure_description(failed)
    for stage in stages:
        assert f"ix_{stage.name}_src" in _index_names(engine, stage)

    real = run_patch(database_url, PRICE, {**pct8, "dry_run": False}, defs=defs)
    assert real.success, failure_description(real)
    held = latest_execution(engine, PRICE)["report"]["held_back"]
    assert held["policy"] == "as approved" and held["count"] == 2
    for stage in stages:
        assert f"ix_{stage.name}_src" in _index_names(engine, stage)


def test_the_source_index_of_an_earlier_backup_mirror_is_dropped_and_its_rows_kept(
    database_url,
):
    engine = seeded(database_url, items=20)
    state.ensure_framework_tables(engine)
    live = state.reflect_tables(engine, ["inventories"])["inventories"]
    state.forget_mirrors()
    backup = mirror_table(engine, live, "backup")
    name = source_index_name("backup", "inventories")
    Index(name, backup.c.dp_execution_id, backup.c.dp_source_id).create(engine)  # as made before
    with engine.begin() as conn:
        conn.execute(insert(backup).from_select(
            ["dp_execution_id", "dp_action", "dp_seq", *live.c.keys()],
            select(literal(new_execution_id(), backup.c.dp_execution_id.type), func.lower(BACKUP),
                   live.c.id, *live.c),
        ))
    assert name in _index_names(engine, backup)

    state.forget_mirrors()  # a fresh process of this version
    engine.dispose()
    engine = get_engine(database_url)
    again = mirror_table(engine, live, "backup")
    # An op that only reads the mirror leaves it (no catalog query for it): the plan drops it,
    # before the backup it would slow.
    assert name in _index_names(engine, again)
    registry = default_registry()
    patch = registry.patches[PRICE]
    config = patch.config_class(adjustment_type="percentage", adjustment_value=8,
                                allow_outside_window=True)
    plan_execution(engine, patch, registry.settings(PRICE), config)

    assert name not in _index_names(engine, again)
    md = MetaData()
    md.reflect(engine, only=[backup.name], schema=backup.schema)
    with engine.connect() as conn:
        kept = conn.execute(select(func.count()).select_from(md.sorted_tables[0])).scalar_one()
    assert kept == 20
