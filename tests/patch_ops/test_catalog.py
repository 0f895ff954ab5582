"""The catalog read once per op (patch_ops.database.Catalog): a second look-up sends nothing,
a table the op makes or drops is seen at once, and outside an op every look-up reads afresh."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import event
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
