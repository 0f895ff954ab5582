"""The keys the plan writes under (benchmarks/README.md, session 17): execution ids are
time-ordered UUIDs, so where they lead a shared key (the mirrors that hold the work rows of
executions of earlier versions) each execution's rows go in after every earlier execution's in
the database's own order (appended to the shared keys, not split into their middle), next to
executions with the random ids of earlier versions, whose shared target rows stay; each
execution of this version keeps its work rows in tables of its own; a patch's select of a
table's own key is frozen without a DISTINCT pass, into a target set table of the execution's
own. On SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import time
import uuid

from sqlalchemy import func, insert, select

from patch_ops import state
from patch_ops.execution import finish_execution, new_execution_id
from patch_ops.state import BACKUP, executions, mirror_table, targets
from patch_ops.steps.backup import take_backup
from patch_ops.steps.plan import frozen_ids, plan_execution, reads_primary_key
from patch_ops.target_sets import (
    OWN_TARGETS,
    create_target_tables,
    target_counts,
    target_table_name,
)
from patch_ops.work_rows import work_rows
from stockrx_patches.registry import default_registry
from tests.support.stockrx import seeded
from tests.support.storage import as_stored_by

PRICE = "inventory_price_adjustment"


def test_an_execution_id_is_a_version_7_uuid_ordered_by_its_time():
    ids = []
    for _ in range(4):
        ids.append(new_execution_id())
        time.sleep(0.002)  # the next millisecond
    assert sorted(ids) == ids and len(set(ids)) == 4
    for x in ids:
        u = uuid.UUID(x)
        assert (u.version, u.variant, str(u)) == (7, uuid.RFC_4122, x)
        assert abs(int(x.replace("-", "")[:12], 16) / 1000 - time.time()) < 60
    assert len({new_execution_id() for _ in range(1000)}) == 1000  # 74 random bits


def _plan(engine, registry, **config):  # type: ignore[no-untyped-def]
    patch = registry.patches[PRICE]
    cfg = patch.config_class(adjustment_type="percentage", adjustment_value=8,
                             allow_outside_window=True, **config)
    return plan_execution(engine, patch, registry.settings(PRICE), cfg)


def test_each_execution_keys_its_rows_after_every_earlier_one(database_url):
    engine = seeded(database_url, items=30)
    registry = default_registry()
    state.ensure_framework_tables(engine)
    old = "ffffffff-0000-4000-8000-000000000000"  # an earlier version's random id, kept
    with engine.begin() as conn:
        conn.execute(insert(targets), [
            {"execution_id": old, "table_name": "inventories", "row_id": i} for i in (1, 2)])
    made = []
    for _ in range(3):
        x = _plan(engine, registry, dry_run=True)
        take_backup(engine, x)
        finish_execution(engine, x, "completed")  # work rows kept, as for the retention
        made.append(x)
        time.sleep(0.002)

    live = state.reflect_tables(engine, ["inventories"])["inventories"]
    own = [work_rows(engine, live, x, BACKUP) for x in made]
    assert len({rows.table.name for rows in own}) == 3  # a backup table of each execution's own
    with engine.connect() as conn:
        own_counts = [conn.execute(select(func.count()).select_from(rows.table)
                                   .where(rows.mine)).scalar_one() for rows in own]
    for x in made:  # as the previous version stored them: the backups in the shared mirror
        as_stored_by(engine, x, OWN_TARGETS)
    backup = mirror_table(engine, live, "backup")
    with engine.connect() as conn:
        in_backup = conn.execute(
            select(backup.c.dp_execution_id).distinct().order_by(backup.c.dp_execution_id)
        ).scalars().all()
        by_start = conn.execute(
            select(executions.c.execution_id).order_by(executions.c.started_at)).scalars().all()
        counts = [conn.execute(select(func.count()).where(
            backup.c.dp_execution_id == x, backup.c.dp_action == BACKUP)).scalar_one()
            for x in made]
        old_kept = conn.execute(select(func.count()).where(
            targets.c.execution_id == old)).scalar_one()
        frozen = [target_counts(conn, x, ["inventories"]) for x in made]
    assert own_counts == [30, 30, 30]
    assert in_backup == by_start == made  # the database's order is the time order
    assert counts == [30, 30, 30] and old_kept == 2
    assert frozen == [{target_table_name(x, "inventories"): 30} for x in made]


def test_a_select_of_a_tables_own_key_is_frozen_without_a_distinct_pass():
    from stockrx_patches.tables import batches, inventories

    inv, lots = inventories, batches
    assert reads_primary_key(select(inv.c.id).where(inv.c.price > 1).group_by(inv.c.id))
    for sel in (
        select(lots.c.inventory_id),  # an item per lot: repeats
        select(inv.c.id).join_from(inv, lots, lots.c.inventory_id == inv.c.id),
        select(inv.c.id).select_from(lots),  # a cross join
        select(inv.c.id.label("x")),
        select(inv.c.id).union_all(select(inv.c.id)),
    ):
        assert not reads_primary_key(sel), sel
    for sel, distinct in ((select(inv.c.id), False), (select(lots.c.inventory_id), True)):
        text = str(frozen_ids(sel))
        assert text.startswith("SELECT DISTINCT") == distinct and "ORDER BY" in text


def test_repeated_ids_of_a_join_are_frozen_once(database_url):
    engine = seeded(database_url, items=20)
    state.ensure_framework_tables(engine)
    live = state.reflect_tables(engine, ["inventories", "batches"])
    inv, lots = live["inventories"], live["batches"]
    joined = select(inv.c.id).join_from(inv, lots, lots.c.inventory_id == inv.c.id)
    own = create_target_tables(engine, new_execution_id(), ["inventories"])["inventories"]
    with engine.begin() as conn:  # into the table keyed by the id: a repeat would fail
        lots_n = conn.execute(select(func.count()).select_from(joined.subquery())).scalar_one()
        items_n = conn.execute(
            select(func.count(lots.c.inventory_id.distinct()))).scalar_one()
        conn.execute(insert(own).from_select(["row_id"], frozen_ids(joined)))
        frozen = conn.execute(select(func.count()).select_from(own)).scalar_one()
    assert lots_n > items_n == frozen > 0
