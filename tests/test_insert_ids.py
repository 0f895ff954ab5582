"""Inserted rows get their real ids at commit in the order the patch produced them (dp_seq),
whatever order the database stores or visits the staged rows in."""

from __future__ import annotations

import random

from sqlalchemy import insert, select

from patch_ops import state
from patch_ops.engine import _assign_insert_ids
from patch_ops.state import INSERT, mirror_table
from stockrx_patches.schema import inventory_logs
from tests.support.stockrx import T0, hand_built


def test_insert_ids_ascend_in_dp_seq_order(database_url):
    engine = hand_built(database_url, [100, 200])  # items 1, 2 with one log row each
    state.ensure_framework_tables(engine)
    stage = mirror_table(engine, inventory_logs, "stage")
    order = list(range(1, 301))
    random.Random(7).shuffle(order)  # stored in shuffled order: a plain UPDATE visits them so
    with engine.begin() as conn:
        for seq in order:
            conn.execute(insert(stage).values(
                dp_execution_id="e", dp_action=INSERT, dp_seq=seq, dp_source_id=seq,
                inventory_id=1, delta=-1, operation_type="remove", previous_quantity=seq,
                current_quantity=seq - 1, created_at=T0, updated_at=T0,
            ))
        if engine.dialect.name == "postgresql":
            # what the planner picks on a large stage table: a scan in physical order, not the
            # primary key's (dp_execution_id, dp_action, dp_seq) order
            conn.exec_driver_sql("SET LOCAL enable_indexscan = off")
            conn.exec_driver_sql("SET LOCAL enable_indexonlyscan = off")
        _assign_insert_ids(conn, inventory_logs, stage, "e")
        rows = conn.execute(
            select(stage.c.dp_seq, stage.c.id).where(stage.c.dp_execution_id == "e")
            .order_by(stage.c.dp_seq)
        ).all()
    ids = [r.id for r in rows]
    assert ids == sorted(ids) and len(set(ids)) == 300
    assert ids[0] > 2  # after every id the table has
