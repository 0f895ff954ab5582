"""The catalog read once per op (patch_ops.database.Catalog): a second look-up sends nothing,
a table the op makes or drops is seen at once, outside an op every look-up reads afresh, and a
table is read as MetaData.reflect reads its columns, key and options."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import MetaData, Table, event
from sqlalchemy.engine import Engine

from patch_ops import state
from patch_ops.database import catalog_scope, get_engine


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = get_engine(database_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE app_items (id BIGINT PRIMARY KEY, price DECIMAL(10, 2))")
    state.forget_mirrors()
    yield engine
    state.forget_mirrors()
    engine.dispose()


def statements(engine: Engine) -> list[str]:
    sent: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: sent.append(a[2]))
    return sent


def stage_mirror(engine: Engine):  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return state.mirror_by_name(conn, state.mirror_name("stage", "app_items"))


def test_an_op_reads_a_table_once_and_sees_the_tables_it_makes_and_drops(engine: Engine) -> None:
    sent = statements(engine)
    with catalog_scope():
        live = state.reflect_tables(engine, ["app_items"])["app_items"]
        assert sent, "the first look-up reads the catalog"
        sent.clear()
        again = state.reflect_tables(engine, ["app_items"])["app_items"]
        assert again is live and sent == [], "the second one sends nothing"

        assert stage_mirror(engine) is None
        state.mirror_table(engine, live, "stage")  # made inside the op
        made = stage_mirror(engine)
        assert made is not None and set(live.c.keys()) <= set(made.c.keys())

        with engine.begin() as conn:  # dropped inside the op
            conn.exec_driver_sql(f"DROP TABLE {state.mirror_name('stage', 'app_items')}")
        assert stage_mirror(engine) is None


def test_outside_an_op_every_look_up_reads_the_catalog(engine: Engine) -> None:
    first = state.reflect_tables(engine, ["app_items"])["app_items"]
    sent = statements(engine)
    second = state.reflect_tables(engine, ["app_items"])["app_items"]
    assert sent and second is not first


def test_an_op_reads_of_a_table_what_metadata_reflect_reads_of_its_columns(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE app_logs (id BIGINT NOT NULL PRIMARY KEY, item_id BIGINT NOT NULL"
            " REFERENCES app_items (id), note VARCHAR(40) DEFAULT 'none', qty INTEGER NOT NULL"
            " CHECK (qty >= 0), UNIQUE (item_id, note))"
        )
    full = MetaData()
    full.reflect(engine, only=["app_items", "app_logs"])
    with catalog_scope():
        lean = state.reflect_tables(engine, ["app_items", "app_logs"])

    def shape(table: Table) -> list[tuple[object, ...]]:
        return [(c.name, repr(c.type), c.nullable, c.primary_key, c.autoincrement,
                 None if c.server_default is None else str(c.server_default.arg))
                for c in table.columns]

    for name in ("app_items", "app_logs"):
        assert shape(lean[name]) == shape(full.tables[name])
        assert dict(lean[name].kwargs) == dict(full.tables[name].kwargs)  # MySQL: charset
