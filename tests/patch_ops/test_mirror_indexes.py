"""Indexes of the mirror tables (patch_ops.state.mirror_table): a backup mirror has no index on
``dp_source_id`` (its rows have no source; the index only slowed the bulk backup insert), and
one made by an earlier version loses it, its rows kept. On SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

from sqlalchemy import Index, MetaData, Table, func, insert, inspect, select

from patch_ops import state
from patch_ops.database import get_engine
from patch_ops.state import BACKUP, mirror_table, source_index_name
from tests.support.stockrx import seeded


def _index_names(engine, table: Table) -> set[str]:  # type: ignore[no-untyped-def]
    return {ix["name"] for ix in inspect(engine).get_indexes(table.name, schema=table.schema)}


def test_a_backup_mirror_has_no_source_index_and_a_stage_mirror_has(database_url):
    engine = seeded(database_url, items=20)
    state.ensure_framework_tables(engine)
    live = state.reflect_tables(engine, ["inventories"])["inventories"]
    backup = mirror_table(engine, live, "backup")
    stage = mirror_table(engine, live, "stage")
    assert source_index_name("backup", "inventories") not in _index_names(engine, backup)
    assert source_index_name("stage", "inventories") in _index_names(engine, stage)


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
            select(func.lower("e1"), func.lower(BACKUP), live.c.id, *live.c),
        ))
    assert name in _index_names(engine, backup)

    state.forget_mirrors()  # a fresh process of this version
    engine.dispose()
    engine = get_engine(database_url)
    again = mirror_table(engine, live, "backup")

    assert name not in _index_names(engine, again)
    md = MetaData()
    md.reflect(engine, only=[backup.name], schema=backup.schema)
    with engine.connect() as conn:
        kept = conn.execute(select(func.count()).select_from(md.sorted_tables[0])).scalar_one()
    assert kept == 20
