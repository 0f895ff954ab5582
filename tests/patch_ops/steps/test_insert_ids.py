"""Inserted rows get their real ids at commit in the order the patch produced them (dp_seq),
whatever order the database stores or visits the staged rows in."""

from __future__ import annotations

import random

import pytest
from sqlalchemy import insert, select

from patch_ops import state
from patch_ops.dialects import dialect_of
from patch_ops.execution import new_execution_id
from patch_ops.state import INSERT, mirror_table
from patch_ops.steps.apply import assign_insert_ids
from patch_ops.work_rows import WorkRows
from stockrx_patches.tables import inventory_logs
from tests.support.stockrx import T0, hand_built

E = new_execution_id()  # an execution id as the engine makes them (a uuid key on PostgreSQL)


def ids_before_insert(engine) -> None:  # type: ignore[no-untyped-def]
    """These tests are about handing out ids before inserting; MySQL's AUTO_INCREMENT gives them
    only while inserting (its staged inserts: tests/patch_ops/test_mysql_dialect.py)."""
    if not dialect_of(engine).features.ids_before_insert:
        pytest.skip("ids only while inserting here: test_mysql_dialect.py covers them")


def _staged(database_url: str):  # type: ignore[no-untyped-def]
    engine = hand_built(database_url, [100, 200])  # items 1, 2 with one log row each
    state.ensure_framework_tables(engine)
    stage = mirror_table(engine, inventory_logs, "stage")
    order = list(range(1, 301))
    random.Random(7).shuffle(order)  # stored in shuffled order: a plain UPDATE visits them so
    with engine.begin() as conn:
        for seq in order:
            conn.execute(insert(stage).values(
                dp_execution_id=E, dp_action=INSERT, dp_seq=seq, dp_source_id=seq,
                inventory_id=1, delta=-1, operation_type="remove", previous_quantity=seq,
                current_quantity=seq - 1, created_at=T0, updated_at=T0,
            ))
    return engine, stage


def _physical_order_scans(conn) -> None:  # type: ignore[no-untyped-def]
    if conn.dialect.name == "postgresql":
        # what the planner picks on a large stage table: a scan in physical order, not the
        # primary key's (dp_execution_id, dp_action, dp_seq) order
        conn.exec_driver_sql("SET LOCAL enable_indexscan = off")
        conn.exec_driver_sql("SET LOCAL enable_indexonlyscan = off")


def test_insert_ids_are_one_block_in_dp_seq_order(database_url):
    engine, stage = _staged(database_url)
    ids_before_insert(engine)
    with engine.begin() as conn:
        _physical_order_scans(conn)
        offset = assign_insert_ids(conn, inventory_logs, WorkRows(stage, E, INSERT))
        staged_ids = conn.execute(select(stage.c.id).where(stage.c.dp_execution_id == E)).scalars()
        assert set(staged_ids) == {None}  # the stage is not rewritten
    assert offset is not None
    ids = [seq + offset for seq in range(1, 301)]
    assert ids[0] > 2  # after every id the table has
    if engine.dialect.name == "postgresql":  # the values really came from the sequence
        with engine.connect() as conn:
            assert conn.exec_driver_sql(
                "SELECT last_value FROM inventory_logs_id_seq"
            ).scalar_one() == ids[-1]


@pytest.mark.postgres
def test_ids_from_a_broken_block_go_to_the_stage_in_dp_seq_order(pg_url):
    """Values of the sequence that are not one unbroken block (other sessions took some, or the
    sequence steps by more than 1): the k-th smallest goes to the k-th row by dp_seq."""
    engine, stage = _staged(pg_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER SEQUENCE inventory_logs_id_seq INCREMENT BY 2")
    with engine.begin() as conn:
        _physical_order_scans(conn)
        assert assign_insert_ids(conn, inventory_logs, WorkRows(stage, E, INSERT)) is None
        rows = conn.execute(
            select(stage.c.dp_seq, stage.c.id).where(stage.c.dp_execution_id == E)
            .order_by(stage.c.dp_seq)
        ).all()
    ids = [r.id for r in rows]
    assert ids == sorted(ids) and len(set(ids)) == 300 and None not in ids
    assert ids[0] > 2  # after every id the table has


@pytest.mark.postgres
def test_a_live_table_without_an_id_sequence_is_named(pg_url):
    """No sequence owns the live ``id`` (a plain bigint column): the commit says so, in one line,
    instead of failing on the NULL that ``nextval`` would draw."""
    engine, stage = _staged(pg_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE inventory_logs ALTER COLUMN id DROP DEFAULT")
        conn.exec_driver_sql("ALTER SEQUENCE inventory_logs_id_seq OWNED BY NONE")
    with engine.begin() as conn, pytest.raises(ValueError, match=(
            r"^inventory_logs\.id has no sequence to draw new ids from: make it a serial or "
            r"identity column$")):
        assign_insert_ids(conn, inventory_logs, WorkRows(stage, E, INSERT))
