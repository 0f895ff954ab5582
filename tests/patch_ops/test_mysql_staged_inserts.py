"""MySQL/MariaDB staged inserts (patch_ops/dialects/mysql_rows.py), both ways: one INSERT ... SELECT
whose ids are found afterwards (lock mode 2), and multi-row INSERTs whose text the server writes
(modes 0 and 1). Every awkward value arriving exactly at its id, the application's rows committed
or still open among ours, chunks halved to fit a packet, refusals, and the statement watchdog over
them. On the session's throwaway MariaDB (``mysql_url``, lock mode 2; both ways work in any mode,
so each is called by name here)."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from urllib.parse import quote

import pytest
from sqlalchemy import Table, func, insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from patch_ops import state
from patch_ops.database import get_engine, write_transaction
from patch_ops.dialects import dialect_of, mysql_rows
from patch_ops.state import INSERT, mirror_table
from patch_ops.steps.apply import staged_inserts
from patch_ops.work_rows import WorkRows, work_rows
from stockrx_patches.tables import inventory_logs
from tests.support import stockrx as sx
from tests.support.mysql import MySQLServer, app_engine

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


def _things_staging(engine: Engine, ddl: str, values: list[str]) -> tuple[Table, Table]:
    """``things`` altered by ``ddl``, and its stage holding a row per value of ``s`` (dp_seq 1,
    2, ...)."""
    live = _things(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"ALTER TABLE things {ddl}")
    stage = mirror_table(engine, live, "stage")
    with engine.begin() as conn:
        conn.execute(insert(stage), [{"dp_execution_id": "e", "dp_action": INSERT, "dp_seq": seq,
                                      "s": s} for seq, s in enumerate(values, 1)])
    return live, stage


Way = Callable[..., tuple[int, int | None]]
WAYS = {"insert_select": mysql_rows.insert_selected, "insert_values": mysql_rows.insert_values}


@pytest.fixture(params=list(WAYS))
def way(request) -> Way:  # type: ignore[no-untyped-def]
    return WAYS[request.param]


def _insert_staged(
    engine: Engine, live: Table, stage: Table, way: Way = mysql_rows.insert_staged
) -> tuple[int, int | None]:
    with write_transaction(engine) as conn:
        ins = staged_inserts(conn, live, WorkRows(stage, "e", INSERT))
        assert ins is not None
        return way(conn, ins, [c.name for c in live.columns if c.name != "id"])


def test_staged_values_arrive_exactly_at_their_ids(mysql_url, way):
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
    n, offset = _insert_staged(engine, live, stage, way)
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
    n, offset = _insert_staged(engine, live, stage, mysql_rows.insert_values)
    assert n == 6 and offset is not None
    with engine.connect() as conn:
        got = conn.execute(select(live.c.id, live.c.s, func.length(live.c.t))).all()
    assert sorted(got) == [(seq + offset, str(seq), len(big)) for seq in range(1, 7)]


def test_a_staged_insert_the_database_refuses_is_a_data_refusal(mysql_url, way):
    engine = get_engine(mysql_url)
    live, stage = _things_staging(engine, "ADD CONSTRAINT chk_no_bad CHECK (s <> 'bad')",
                                  ["good", "bad"])
    with pytest.raises(OperationalError, match="chk_no_bad") as err:
        _insert_staged(engine, live, stage, way)
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


def test_a_staged_insert_past_the_time_limit_is_cancelled(mysql_url, way):
    """The staged rows go as SQL text: the statement watchdog sees those statements too (here
    the INSERT waits for a row lock the application holds on the same unique value)."""
    engine = get_engine(mysql_url)
    live, stage = _things_staging(engine, "ADD UNIQUE KEY uq_s (s)", ["a"])
    with app_engine(mysql_url).connect() as app:
        app.exec_driver_sql("INSERT INTO things (s) VALUES ('a')")  # not committed
        with pytest.raises(OperationalError) as err, write_transaction(engine) as conn:
            dialect_of(conn).set_statement_timeout(conn, 0.5)
            ins = staged_inserts(conn, live, WorkRows(stage, "e", INSERT))
            assert ins is not None
            way(conn, ins, ["s"])
        app.rollback()
    # cancelled by the watchdog (1317), not ended by our 60 s lock wait limit (1205)
    assert dialect_of(engine).is_statement_timeout(err.value), err.value
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(live)).scalar() == 0


def _lock_waits(server: MySQLServer) -> int:
    """Transactions of the server waiting for a row lock now."""
    with server.admin_connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM information_schema.INNODB_TRX "
                    "WHERE trx_state = 'LOCK WAIT'")
        return int(cur.fetchone()[0])


@pytest.mark.parametrize("committed", [True, False], ids=["committed", "still_open"])
def test_an_application_row_among_ours_is_told_apart(mysql_server, mysql_url, committed):
    """Lock mode 2. The INSERT ... SELECT stops at its 50th row: the application holds the same
    unique value, uncommitted. Meanwhile the application inserts a row, which takes an id among
    ours, and commits it before we look for our ids or only after. Either way every staged row
    is found at its own id, in dp_seq order, and the application's row is not taken for ours."""
    engine = get_engine(mysql_url)
    live, stage = _things_staging(engine, "ADD UNIQUE KEY uq_s (s)",
                                  [f"r{seq}" for seq in range(1, 101)])
    outcome: list[object] = []

    def ours() -> None:
        try:
            outcome.append(_insert_staged(engine, live, stage, mysql_rows.insert_selected))
        except Exception as exc:  # noqa: BLE001 - reported below
            outcome.append(exc)

    app = app_engine(mysql_url)
    with app.connect() as holder, app.connect() as other:
        holder.exec_driver_sql("INSERT INTO things (s) VALUES ('r50')")  # the gate, held open
        worker = threading.Thread(target=ours)
        worker.start()
        deadline = time.monotonic() + 60
        while _lock_waits(mysql_server) == 0:  # our INSERT ... SELECT waits at r50
            assert worker.is_alive() and time.monotonic() < deadline, outcome
            time.sleep(0.01)
        other.exec_driver_sql("INSERT INTO things (s) VALUES ('app')")
        if committed:
            other.commit()
        holder.rollback()  # r50 goes in, and the rest after it
        worker.join(60)
        other.commit()
    app.dispose()
    assert not worker.is_alive() and len(outcome) == 1
    assert isinstance(outcome[0], tuple), outcome[0]
    n, offset = outcome[0]
    assert (n, offset) == (100, None)  # not one block: the ids go to the stage
    with engine.connect() as conn:
        staged = {r[0]: r[1] for r in conn.execute(select(stage.c.dp_seq, stage.c.id))}
        rows = {r[0]: r[1] for r in conn.execute(select(live.c.id, live.c.s))}
    app_id = next(i for i, s in rows.items() if s == "app")
    assert min(staged.values()) < app_id < max(staged.values())  # it took an id among ours
    assert {staged[seq]: f"r{seq}" for seq in staged} == {i: s for i, s in rows.items() if s != "app"}
    assert [staged[seq] for seq in sorted(staged)] == sorted(staged.values())


def test_ids_written_to_the_stage_serve_verify_and_restore(mysql_url):
    """Every session's ids two apart (``auto_increment_increment = 2``, as on a multi-primary
    cluster): the price patch's log rows are not ``dp_seq + offset``, so the commit writes each
    id to the stage (by ranges); verify and restore find the rows by them."""
    url = f"{mysql_url}&init_command={quote('SET SESSION auto_increment_increment = 2')}"
    engine = sx.seeded(url, items=300)
    before = sx.digest(engine)
    result = sx.run_patch(url, sx.PRICE_JOB, {"adjustment_type": "percentage", "adjustment_value": 8,
                                        "dry_run": False})
    assert result.success, sx.failure_description(result)
    ex = sx.latest_execution(engine, sx.PRICE_JOB)
    assert ex["phase"] == "verified"
    assert "inventory_logs" not in (ex["report"].get("insert_id_offsets") or {})
    stage = work_rows(engine, inventory_logs, ex["execution_id"], INSERT)
    with engine.connect() as conn:
        ids = list(conn.execute(select(stage.c.id).where(stage.mine)
                                .order_by(stage.seq)).scalars())
    assert len(ids) > 100 and all(b - a == 2 for a, b in zip(ids, ids[1:], strict=False))
    restored = sx.run_job(url, "restore_patch", "plan_restore",
                       {"execution_id": ex["execution_id"], "dry_run": False})
    assert restored.success, sx.failure_description(restored)
    assert sx.digest(engine) == before
