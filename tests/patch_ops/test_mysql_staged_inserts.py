"""MySQL/MariaDB staged inserts (patch_ops/dialects/mysql_rows.py): rows from the stage into a
live table by multi-row INSERTs whose text the server writes, every awkward value arriving exactly
at its id, chunks halved to fit a packet, refusals, and the statement watchdog over them. On the
session's throwaway MariaDB (``mysql_url``)."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal

import pytest
from sqlalchemy import Table, func, insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from patch_ops import state
from patch_ops.database import get_engine, write_transaction
from patch_ops.dialects import dialect_of, mysql_rows
from patch_ops.state import INSERT, mirror_table
from patch_ops.steps.apply import staged_inserts
from tests.support.mysql import app_engine

pytestmark = pytest.mark.mysql


def _things(engine: Engine) -> Table:
    """A live table with the awkward types: every value must arrive exactly."""
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE things (id BIGINT AUTO_INCREMENT PRIMARY KEY, s VARCHAR(50), "
            "t LONGTEXT, d DECIMAL(12,4), f DOUBLE, at DATETIME(6), b VARBINARY(16), "
            "flags BIT(8), j JSON, old VARCHAR(10) CHARACTER SET latin1) "
            "ENGINE=InnoDB DEFAULT CHARSET=utf8mb4")
    state.ensure_framework_tables(engine)
    return state.reflect_tables(engine, ["things"])["things"]


def _insert_staged(engine: Engine, live: Table, stage: Table) -> tuple[int, int | None]:
    with write_transaction(engine) as conn:
        ins = staged_inserts(conn, live, stage, "e")
        assert ins is not None
        return dialect_of(conn).insert_staged(
            conn, ins, [c.name for c in live.columns if c.name != "id"])


def test_staged_values_arrive_exactly_at_their_ids(mysql_url):
    engine = get_engine(mysql_url)
    live = _things(engine)
    stage = mirror_table(engine, live, "stage")
    awkward = ["it's \\ \"q\" \x00 \n\t ✓ 🍣", "", None, "NULL", "a\\'b", "%s %(x)s"]
    rows = [
        {"dp_execution_id": "e", "dp_action": INSERT, "dp_seq": seq, "s": s,
         "t": (s or "") * 3, "d": Decimal("-12345678.0001") if s else None, "f": 0.1 + seq,
         "at": dt.datetime(2026, 11, 29, 1, 2, 3, seq), "b": bytes([0, 39, 92, seq]),
         "flags": seq, "j": json.dumps({"k": s, "n": [1, 2]}), "old": "café"}
        for seq, s in zip((1, 2, 5, 9, 10, 11), awkward, strict=True)  # dp_seq with gaps
    ]
    with engine.begin() as conn:
        conn.execute(insert(stage), rows)
    n, offset = _insert_staged(engine, live, stage)
    assert (n, offset) == (6, None)  # gaps in dp_seq: the ids go to the stage
    cols = [c.name for c in live.columns if c.name != "id"]
    with engine.connect() as conn:
        staged = conn.execute(select(stage.c.id, *[stage.c[c] for c in cols])
                              .order_by(stage.c.dp_seq)).all()
        got = {r.id: tuple(r) for r in conn.execute(select(live.c.id, *[live.c[c] for c in cols]))}
    assert [got[r.id] for r in staged] == [tuple(r) for r in staged]
    assert [r.id for r in staged] == sorted(got)  # ascending in dp_seq order


def test_a_chunk_too_big_for_one_statement_is_halved(mysql_url, monkeypatch):
    engine = get_engine(mysql_url)
    live = _things(engine)
    stage = mirror_table(engine, live, "stage")
    with engine.connect() as conn:
        packet = conn.exec_driver_sql("SELECT @@max_allowed_packet").scalar()
    big = "x" * (packet // 4)  # six of them: 1.5 packets
    with engine.begin() as conn:
        for seq in range(1, 7):
            conn.execute(insert(stage).values(dp_execution_id="e", dp_action=INSERT,
                                              dp_seq=seq, t=big, s=str(seq)))
    monkeypatch.setattr(mysql_rows, "CHUNK_ROWS", 6)
    n, offset = _insert_staged(engine, live, stage)
    assert n == 6 and offset is not None
    with engine.connect() as conn:
        got = conn.execute(select(live.c.id, live.c.s, func.length(live.c.t))).all()
    assert sorted(got) == [(seq + offset, str(seq), len(big)) for seq in range(1, 7)]


def test_a_staged_insert_the_database_refuses_is_a_data_refusal(mysql_url):
    engine = get_engine(mysql_url)
    live = _things(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE things ADD CONSTRAINT chk_no_bad CHECK (s <> 'bad')")
    stage = mirror_table(engine, live, "stage")
    with engine.begin() as conn:
        conn.execute(insert(stage), [{"dp_execution_id": "e", "dp_action": INSERT, "dp_seq": i,
                                      "s": s} for i, s in ((1, "good"), (2, "bad"))])
    with pytest.raises(OperationalError, match="chk_no_bad") as err:
        _insert_staged(engine, live, stage)
    assert dialect_of(engine).is_data_refusal(err.value)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(live)).scalar() == 0


def test_a_statement_that_outlives_its_limit_fails_even_if_the_kill_missed_it(
    mysql_url, monkeypatch
):
    """MySQL 8 lets an interrupted SLEEP() return 1 instead of failing; whatever reached the
    limit fails all the same (here the kill itself is made to miss)."""
    engine = get_engine(mysql_url)
    d = dialect_of(engine)

    class Missed:
        def cursor(self):  # type: ignore[no-untyped-def]
            return self

        def execute(self, _sql: str) -> None:
            pass

        def close(self) -> None:
            pass

    with engine.connect() as conn:
        d.set_statement_timeout(conn, 0.3)
        monkeypatch.setattr(engine, "raw_connection", Missed)
        with pytest.raises(OperationalError, match="statement time limit of 0.3 s") as err:
            conn.exec_driver_sql("SELECT SLEEP(1)")
        assert d.is_statement_timeout(err.value)


def test_a_staged_insert_past_the_time_limit_is_cancelled(mysql_url):
    """The staged rows go as SQL text: the statement watchdog sees those statements too (here
    the INSERT waits for a row lock the application holds on the same unique value)."""
    engine = get_engine(mysql_url)
    live = _things(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE things ADD UNIQUE KEY uq_s (s)")
    stage = mirror_table(engine, live, "stage")
    with engine.begin() as conn:
        conn.execute(insert(stage).values(dp_execution_id="e", dp_action=INSERT, dp_seq=1, s="a"))
    with app_engine(mysql_url).connect() as app:
        app.exec_driver_sql("INSERT INTO things (s) VALUES ('a')")  # not committed
        with pytest.raises(OperationalError) as err, write_transaction(engine) as conn:
            dialect_of(conn).set_statement_timeout(conn, 0.5)
            ins = staged_inserts(conn, live, stage, "e")
            assert ins is not None
            dialect_of(conn).insert_staged(conn, ins, ["s"])
        app.rollback()
    # cancelled by the watchdog (1317), not ended by our 60 s lock wait limit (1205)
    assert dialect_of(engine).is_statement_timeout(err.value), err.value
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(live)).scalar() == 0
