"""MySQL 8 / MariaDB (patch_ops/dialects/mysql.py): sessions, types, where DDL runs, refusals, row
locks, statement limits, bulk rows and the ids of inserted rows.

On the session's throwaway MariaDB (``mysql_url``, AUTO_INCREMENT lock mode 2 as MySQL 8 has it);
the tests of MariaDB's own lock mode (1) and of a server whose time zone is +09:00 use a second
server that this module starts with both settings (``mode1_url``).
"""

from __future__ import annotations

import datetime as dt
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import pandas as pd
import pymysql
import pytest
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    String,
    Table,
    event,
    func,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, OperationalError

from patch_ops import state
from patch_ops.audit import ensure_audit_tables
from patch_ops.database import DatabaseUnavailable, check_connection, get_engine, write_transaction
from patch_ops.dialects import dialect_of, mysql, mysql_rows
from patch_ops.dialects.types import UTCDateTime
from patch_ops.execution import CommitConflict, load_execution
from patch_ops.state import INSERT, UPDATE, mirror_table, targets
from patch_ops.steps.apply import lock_target_rows, staged_inserts
from patch_ops.steps.commit import commit_execution
from patch_ops.work_rows import WorkRows
from stockrx_patches.seed import seed_demo
from stockrx_patches.tables import create_stockrx_schema, inventories, inventory_logs
from tests.support.mysql import MySQLServer, MySQLUnavailable, app_engine, mysql_required
from tests.support.stockrx import (
    PRICE_JOB,
    T0,
    digest,
    failure_description,
    hand_built,
    latest_execution,
    prices,
    run_patch,
    validated_price_run,
)

pytestmark = pytest.mark.mysql

PCT8 = {"adjustment_type": "percentage", "adjustment_value": 8, "dry_run": False}


@pytest.fixture(scope="module")
def mode1_server() -> Iterator[MySQLServer]:
    """MariaDB with its own AUTO_INCREMENT lock mode (1, consecutive) in Tokyo time."""
    server = MySQLServer(
        extra_args=["--innodb-autoinc-lock-mode=1", "--default-time-zone=+09:00"]
    )
    try:
        server.start()
    except MySQLUnavailable as e:
        if mysql_required():
            pytest.fail(f"MariaDB unavailable: {e}", pytrace=False)
        pytest.skip(f"MariaDB unavailable: {e}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mode1_url(mode1_server: MySQLServer) -> Iterator[str]:
    url = mode1_server.create_database()
    yield url
    mode1_server.drop_database(url)


def show_create(engine: Engine, table: str) -> str:
    with engine.connect() as conn:
        return str(conn.exec_driver_sql(f"SHOW CREATE TABLE `{table}`").one()[1])


# -- connections -----------------------------------------------------------------------------------
def test_every_session_is_set_up_as_the_rails_app_has_it(mysql_url):
    engine = get_engine(mysql_url)
    with engine.connect() as conn:
        mode, zone, charset, lock_wait = conn.exec_driver_sql(
            "SELECT @@session.sql_mode, @@session.time_zone, @@character_set_client, "
            "@@session.innodb_lock_wait_timeout"
        ).one()
        assert conn.get_isolation_level() == "READ COMMITTED"
    assert {"TRADITIONAL", "STRICT_ALL_TABLES", "NO_ZERO_DATE"} <= set(mode.split(","))
    assert (zone, charset, lock_wait) == ("+00:00", "utf8mb4", 60)
    assert engine.pool._pre_ping  # type: ignore[attr-defined]
    # strict: a value the application would refuse is refused, not cut to fit
    create_stockrx_schema(engine)
    with pytest.raises(DataError, match="1406"), engine.begin() as conn:
        conn.execute(insert(inventories).values(
            name="x" * 300, quantity=1, price=1, created_at=T0, updated_at=T0))


def test_naive_utc_on_a_server_in_another_time_zone(mode1_url):
    engine = get_engine(mode1_url)
    md = MetaData()
    stamps = Table("stamps", md, Column("id", Integer, primary_key=True),
                   Column("at", UTCDateTime), Column("made", String(32)))
    md.create_all(engine)
    tokyo = dt.timezone(dt.timedelta(hours=9))
    with engine.begin() as conn:
        assert conn.exec_driver_sql("SELECT @@global.time_zone").scalar() == "+09:00"
        now = conn.exec_driver_sql("SELECT NOW(6)").scalar()
        conn.execute(insert(stamps).values(id=1, at=dt.datetime(2026, 11, 29, 21, 0, 0, 5, tokyo)))
    utc_now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    assert abs((now - utc_now).total_seconds()) < 60  # the session's clock is UTC
    with engine.connect() as conn:
        raw = conn.exec_driver_sql("SELECT `at` FROM stamps").scalar()
        back = conn.execute(select(stamps.c.at)).scalar()
    assert raw == dt.datetime(2026, 11, 29, 12, 0, 0, 5)  # stored naive UTC, microseconds kept
    assert back == dt.datetime(2026, 11, 29, 12, 0, 0, 5, dt.UTC)


def test_the_backup_read_does_not_block_the_application(mysql_url):
    engine = hand_built(mysql_url, [100, 200, 300])
    state.ensure_framework_tables(engine)
    backup = mirror_table(engine, inventories, "backup")
    with engine.begin() as conn:
        conn.execute(insert(targets), [
            {"execution_id": "e", "table_name": "inventories", "row_id": i} for i in (1, 2, 3)])
    ids = select(targets.c.row_id).where(targets.c.execution_id == "e")
    cols = [c.name for c in inventories.columns]

    def copy(execution_id: str):  # type: ignore[no-untyped-def]  # the backup's statement
        return insert(backup).from_select(
            ["dp_execution_id", "dp_action", "dp_seq", *cols],
            select(literal(execution_id), literal("B"), inventories.c.id, *inventories.c)
            .where(inventories.c.id.in_(ids)))

    app = app_engine(mysql_url)

    def app_renames(name: str) -> None:
        with app.begin() as conn:
            conn.execute(update(inventories).where(inventories.c.id == 2).values(name=name))

    with write_transaction(engine) as conn:  # the backup's transaction, still open
        assert conn.execute(copy("e1")).rowcount == 3
        app_renames("renamed while the backup runs")  # not blocked (it would wait 2 s, fail)
    # Under REPEATABLE READ (InnoDB's default) the same copy keeps shared locks on the rows it
    # read until commit: the application's update waits, then fails.
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            assert conn.execute(copy("e2")).rowcount == 3
            with pytest.raises(OperationalError, match="1205"):
                app_renames("blocked")
    app.dispose()


# -- types -----------------------------------------------------------------------------------------
def test_tables_are_innodb_utf8mb4_with_microseconds_and_long_text(mysql_url):
    engine = get_engine(mysql_url)
    create_stockrx_schema(engine)
    state.ensure_framework_tables(engine)
    ensure_audit_tables(engine)
    for table in ("inventories", "inventory_logs", "data_patch_executions",
                  "data_patch_locks", "data_patch_audit_events"):
        ddl = show_create(engine, table)
        assert "ENGINE=InnoDB" in ddl and "CHARSET=utf8mb4" in ddl, ddl
    assert "`created_at` datetime(6) NOT NULL" in show_create(engine, "inventory_logs")
    executions = show_create(engine, "data_patch_executions")
    assert "`started_at` datetime(6) NOT NULL" in executions
    assert "`report_markdown` longtext" in executions and "`error_message` longtext" in executions
    assert "`occurred_at` datetime(6) NOT NULL" in show_create(engine, "data_patch_audit_events")
    # a live table of another collation: its mirror takes that collation and the live types
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE things (id BIGINT AUTO_INCREMENT PRIMARY KEY, code VARCHAR(20), "
            "tag VARCHAR(8) COLLATE utf8mb4_bin, seen DATETIME(6)) "
            "ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci")
    live = state.reflect_tables(engine, ["things"])["things"]
    mirror = show_create(engine, mirror_table(engine, live, "stage").name)
    assert "COLLATE=utf8mb4_unicode_ci" in mirror and "`seen` datetime(6)" in mirror
    assert "`tag` varchar(8) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin" in mirror
    with engine.connect() as conn:  # live and mirror text columns compare
        conn.execute(select(func.count()).where(live.c.code == mirror_table(
            engine, live, "stage").c.code)).scalar_one()


# -- DDL never inside a transaction that writes -----------------------------------------------------
_DDL = re.compile(r"^\s*(CREATE|ALTER|DROP|TRUNCATE|ANALYZE|RENAME)\b", re.I)
_WRITE = re.compile(r"^\s*(INSERT|UPDATE|DELETE|REPLACE|LOAD)\b", re.I)


class DDLWatch:
    """Records DDL issued on a connection whose transaction already wrote (MySQL would commit
    those writes on the spot)."""

    def __init__(self, engine: Engine) -> None:
        self.dirty: set[int] = set()
        self.found: list[str] = []
        event.listen(engine, "before_cursor_execute", self.statement)
        event.listen(engine, "commit", self.end)
        event.listen(engine, "rollback", self.end)

    def statement(self, conn: Connection, _cursor: Any, sql: str, *_: Any) -> None:
        key = id(conn.connection.dbapi_connection)
        if _WRITE.match(sql):
            self.dirty.add(key)
        elif _DDL.match(sql) and key in self.dirty:
            self.found.append(" ".join(sql.split())[:120])

    def end(self, conn: Connection) -> None:
        self.dirty.discard(id(conn.connection.dbapi_connection))


def test_no_ddl_inside_a_transaction_that_wrote(mysql_url):
    """A first real run (dry run, then real run) on a database with no framework or audit
    tables yet: every table, index and column is made outside the transactions that write."""
    engine = hand_built(mysql_url, [100, 200, 300])
    watch = DDLWatch(engine)
    result = run_patch(mysql_url, PRICE_JOB, PCT8)
    assert result.success, failure_description(result)
    assert watch.found == []


def test_a_failure_inside_the_commit_leaves_live_tables_untouched(mysql_url):
    engine = hand_built(mysql_url, [100, 200, 300])
    execution_id, _ = validated_price_run(engine)
    before = digest(engine)

    def boom(conn: Connection, counts: dict[str, int]) -> None:
        assert counts == {"inventories_updated": 3, "inventory_logs_inserted": 3}
        raise RuntimeError("the audit event could not be written")

    with pytest.raises(RuntimeError, match="audit event"):
        commit_execution(engine, execution_id, on_committed=boom)
    assert digest(engine) == before
    with engine.connect() as conn:
        assert load_execution(conn, execution_id)["phase"] == "validated"
    commit_execution(engine, execution_id)  # and the same commit then goes through
    assert prices(engine) == {1: 108.0, 2: 216.0, 3: 324.0}


# -- refusals --------------------------------------------------------------------------------------
def test_a_check_constraint_the_patch_does_not_know_makes_the_dry_run_refuse(mysql_url):
    engine = hand_built(mysql_url, [100, 200, 250])  # +8 %: 270 breaks the cap
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "ALTER TABLE inventories ADD CONSTRAINT chk_price_below_260 CHECK (price < 260)")
    before = digest(engine)
    result = run_patch(mysql_url, PRICE_JOB, {**PCT8, "dry_run": True})
    assert not result.success
    assert digest(engine) == before
    refusal = latest_execution(engine)["report"]["validation"]["database_refusal"]
    assert "update inventories" in refusal and "chk_price_below_260" in refusal, refusal


def _error(cls: type[DBAPIError], code: int) -> DBAPIError:
    return cls("UPDATE ...", {}, pymysql.err.OperationalError(code, f"error {code}"))


@pytest.mark.parametrize(("cls", "code", "data", "lock_wait", "timeout"), [
    (OperationalError, 4025, True, False, False),   # MariaDB CHECK
    (OperationalError, 3819, True, False, False),   # MySQL CHECK
    (OperationalError, 1365, True, False, False),   # division by zero (strict)
    (DataError, 1406, True, False, False),          # too long
    (IntegrityError, 1452, True, False, False),     # foreign key
    (OperationalError, 1644, True, False, False),   # a trigger's SIGNAL
    (OperationalError, 1205, False, True, False),   # lock wait timeout
    (OperationalError, 1213, False, False, False),  # deadlock
    (OperationalError, 1317, False, False, True),   # KILL QUERY (the watchdog)
    (OperationalError, 1969, False, False, True),   # MariaDB max_statement_time
    (OperationalError, 3024, False, False, True),   # MySQL MAX_EXECUTION_TIME
    (OperationalError, 2013, False, False, False),  # lost connection
])
def test_error_numbers_tell_refusals_from_trouble(mysql_url, cls, code, data, lock_wait, timeout):
    d = dialect_of(get_engine(mysql_url))
    exc = _error(cls, code)
    assert (d.is_data_refusal(exc), d.is_lock_timeout(exc), d.is_statement_timeout(exc)) == (
        data, lock_wait, timeout)


def test_old_servers_are_refused_at_plan_in_one_line(mysql_url, monkeypatch):
    engine = get_engine(mysql_url)
    check_connection(engine)  # 10.11: fine
    monkeypatch.setattr(engine.dialect, "server_version_info", (10, 1, 48))
    with pytest.raises(DatabaseUnavailable, match=r"MariaDB 10\.1\.48 is not supported") as err:
        check_connection(engine)
    assert "\n" not in str(err.value) and "CHECK" in str(err.value)
    monkeypatch.setattr(engine.dialect, "is_mariadb", False)
    monkeypatch.setattr(engine.dialect, "server_version_info", (8, 0, 15))
    with pytest.raises(DatabaseUnavailable, match=r"MySQL 8\.0\.15 is not supported"):
        check_connection(engine)


# -- locks and limits ------------------------------------------------------------------------------
def test_a_row_the_application_holds_ends_the_commit_lock_in_a_refusal(mysql_url):
    engine = hand_built(mysql_url, [100, 200, 300])
    execution_id, _ = validated_price_run(engine)
    with engine.connect() as conn:
        decl = load_execution(conn, execution_id)["declaration"]
    tables = state.reflect_tables(engine, decl["tables"])
    app = app_engine(mysql_url)
    with app.connect() as app_conn, app_conn.begin():
        app_conn.execute(select(inventories.c.id).where(inventories.c.id == 2).with_for_update())
        with engine.connect() as conn:
            conn.exec_driver_sql("SET SESSION innodb_lock_wait_timeout = 1")
            conn.commit()
            started = time.monotonic()
            with pytest.raises(CommitConflict, match="could not lock the inventories rows"):
                with conn.begin():
                    lock_target_rows(conn, tables, execution_id, decl)
            assert time.monotonic() - started < 10
            conn.exec_driver_sql("SET SESSION innodb_lock_wait_timeout = 60")
            conn.commit()
    app.dispose()


def test_a_statement_past_its_time_limit_is_cancelled(mysql_url):
    engine = get_engine(mysql_url)
    d = dialect_of(engine)
    assert d.features.statement_timeout
    with engine.connect() as conn:
        d.set_statement_timeout(conn, 0.5)
        assert conn.exec_driver_sql("SELECT SLEEP(0.1)").scalar() == 0  # under the limit
        started = time.monotonic()
        with pytest.raises(OperationalError) as err:
            conn.exec_driver_sql("SELECT SLEEP(5)")
        assert time.monotonic() - started < 2
        assert d.is_statement_timeout(err.value), err.value
        assert conn.exec_driver_sql("SELECT 1").scalar() == 1  # the connection lives on
        conn.rollback()
        assert conn.exec_driver_sql("SELECT SLEEP(0.8)").scalar() == 0  # limit gone with it


@pytest.mark.parametrize("hook", ["group_once", "update_joined"])
def test_a_big_join_keeps_its_temporary_table_in_memory_then_the_session_limits_return(
    mysql_url, hook
):
    """group_once before the invariants' shared pass (a join onto grouped rows), update_joined
    before the commit's UPDATE joined to the stage: the statement's internal temporary table
    stays in memory (on disk, a million items took 2-6x as long on MariaDB); the session's own
    limits are back when the connection returns to the pool."""
    engine = get_engine(mysql_url)
    d = dialect_of(engine)
    md = MetaData()
    t = Table(f"big_{hook}", md, Column("id", Integer, primary_key=True), Column("k", Integer))
    s = Table(f"big_{hook}_stage", md, Column("seq", Integer, primary_key=True),
              Column("k", Integer), Column("tag", String(8), index=True))
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(t), [{"id": i, "k": i} for i in range(1, 20_001)])
        conn.execute(insert(s), [{"seq": i, "k": -i, "tag": "x"} for i in range(1, 20_001)])
    g = select(t.c.k, func.count().label("n")).group_by(t.c.k).subquery("g")
    grouped = select(func.count(), func.sum(g.c.n)).select_from(t.outerjoin(g, g.c.k == t.c.id))
    joined = update(t).where(t.c.id == s.c.seq, s.c.tag == "x").values(k=s.c.k)

    def run(conn: Connection) -> None:
        if hook == "group_once":
            assert tuple(conn.execute(grouped).one()) == (20_000, 20_000)
        else:
            conn.execute(joined)
            assert conn.execute(select(func.sum(t.c.k))).scalar() == -200_010_000

    def disk_tables(conn: Connection) -> int:
        return int(conn.exec_driver_sql(
            "SHOW SESSION STATUS LIKE 'Created_tmp_disk_tables'").one()[1])

    def limits(conn: Connection) -> tuple[int, int]:
        row = conn.exec_driver_sql(
            "SELECT @@session.tmp_table_size, @@session.max_heap_table_size").one()
        return int(row[0]), int(row[1])

    with engine.connect() as conn:
        conn.exec_driver_sql("SET SESSION tmp_table_size = 16384, max_heap_table_size = 16384")
        before = disk_tables(conn)
        run(conn)
        assert disk_tables(conn) > before  # 20,000 rows do not fit in 16 kB: on disk
        conn.rollback()
        getattr(d, hook)(conn)
        assert limits(conn) == (mysql.GROUP_MEMORY, mysql.GROUP_MEMORY)
        before = disk_tables(conn)
        run(conn)
        assert disk_tables(conn) == before  # in memory
        pooled = conn.connection.dbapi_connection
    with engine.connect() as conn:
        assert conn.connection.dbapi_connection is pooled
        assert limits(conn) == (16384, 16384)


# -- rows ------------------------------------------------------------------------------------------
def _frame(n: int, note: str = "ok") -> pd.DataFrame:
    return pd.DataFrame({
        "dp_execution_id": "e", "dp_action": INSERT, "dp_seq": range(1, n + 1),
        "dp_source_id": range(1, n + 1), "inventory_id": 1, "delta": -1,
        "operation_type": "remove", "previous_quantity": range(1, n + 1),
        "current_quantity": range(0, n), "note": note, "user_id": None,
        "created_at": pd.Timestamp("2026-11-29 01:02:03.456789"),
        "updated_at": pd.Timestamp("2026-11-29 01:02:03.456789"),
    })


def test_bulk_rows_by_load_data_equal_those_by_insert(mysql_url):
    engine = hand_built(mysql_url, [100])
    state.ensure_framework_tables(engine)
    stage = mirror_table(engine, inventory_logs, "stage")
    df = _frame(4)
    df["note"] = ["tab\there", "line\nbreak \\N back\\slash", "日本語 ✓", None]
    df["user_id"] = [7, None, 2**40, None]
    read = select(stage).order_by(stage.c.dp_execution_id, stage.c.dp_seq)
    with engine.begin() as conn:
        assert mysql_rows.local_infile_ready(conn)
        assert mysql_rows.load_data(conn, stage, df)
        loaded = conn.execute(read).all()
        conn.execute(stage.delete())
        mysql_rows.insert_rows(conn, stage, df)
        inserted = conn.execute(read).all()
    assert loaded == inserted
    assert [r.note for r in loaded] == list(df["note"])
    assert loaded[0].created_at == dt.datetime(2026, 11, 29, 1, 2, 3, 456789)


def test_a_value_load_data_would_cut_is_refused_instead(mysql_url):
    engine = hand_built(mysql_url, [100])
    state.ensure_framework_tables(engine)
    stage = mirror_table(engine, inventory_logs, "stage")
    df = _frame(3)
    df["operation_type"] = ["remove", "x" * 300, "remove"]  # VARCHAR(255)
    with pytest.raises(DataError, match="1406"), engine.begin() as conn:
        dialect_of(conn).bulk_insert(conn, stage, df)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(stage)).scalar() == 0


def test_update_from_the_stage_counts_rows_left_as_they_were(mysql_url):
    engine = hand_built(mysql_url, [100, 200, 300])
    state.ensure_framework_tables(engine)
    st = mirror_table(engine, inventories, "stage")
    with engine.begin() as conn:
        conn.execute(insert(st), [{"dp_execution_id": "e", "dp_action": UPDATE, "dp_seq": i,
                                   "price": p} for i, p in ((1, 100), (2, 250), (3, 300))])
        stmt = update(inventories).where(
            inventories.c.id == st.c.dp_seq, st.c.dp_execution_id == "e",
            st.c.dp_action == UPDATE).values(price=st.c.price)
        assert str(stmt.compile(conn)).startswith(f"UPDATE inventories, {st.name} SET")
        assert conn.execute(stmt).rowcount == 3  # matched rows (CLIENT.FOUND_ROWS), not changed
    assert prices(engine) == {1: 100.0, 2: 250.0, 3: 300.0}


def test_demo_data_loads_and_ids_continue_after_it(mysql_url):
    engine = get_engine(mysql_url)
    counts = seed_demo(engine, items=300, today=dt.date(2026, 11, 29))
    with engine.begin() as conn:
        top = conn.execute(select(func.max(inventory_logs.c.id))).scalar_one()
        new = conn.execute(insert(inventory_logs).values(
            inventory_id=1, delta=1, operation_type="add", previous_quantity=0,
            current_quantity=1, created_at=T0, updated_at=T0)).inserted_primary_key[0]
    # after the largest loaded id (LOAD DATA, a "bulk insert", may leave the counter further on:
    # InnoDB reserves values for it in doubling blocks, so 590 rows can end at 1023)
    assert counts["inventory_logs"] == top and new > top


# -- the ids of inserted rows ----------------------------------------------------------------------
def test_staged_inserts_get_known_ids_while_the_application_inserts(mysql_url):
    """Lock mode 2 (interleaved), three application threads inserting log rows throughout: every
    staged row is at the id the commit recorded for it, none of the application's rows is."""
    engine = hand_built(mysql_url, [100, 200])
    state.ensure_framework_tables(engine)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT @@innodb_autoinc_lock_mode").scalar() == 2
    stage = mirror_table(engine, inventory_logs, "stage")
    n = 20_000
    with engine.begin() as conn:
        dialect_of(conn).bulk_insert(conn, stage, _frame(n, note="ours"))
    app = app_engine(mysql_url)
    stop = threading.Event()
    app_rows = [0]

    def application() -> None:
        with app.connect() as conn:
            while not stop.is_set():
                rows = [{"inventory_id": 2, "delta": 1, "operation_type": "add",
                         "previous_quantity": 0, "current_quantity": 1, "note": "app",
                         "created_at": T0, "updated_at": T0}] * (1 + app_rows[0] % 3)
                conn.execute(insert(inventory_logs).values(rows))
                conn.commit()
                app_rows[0] += len(rows)

    threads = [threading.Thread(target=application) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.2)
        with write_transaction(engine) as conn:
            ins = staged_inserts(conn, inventory_logs, WorkRows(stage, "e", INSERT))
            assert ins is not None
            inserted, offset = dialect_of(conn).insert_staged(conn, ins, [
                c.name for c in inventory_logs.columns if c.name != "id"])
    finally:
        stop.set()
        for t in threads:
            t.join()
    app.dispose()
    assert inserted == n and app_rows[0] > 0
    new_id = stage.c.dp_seq + offset if offset is not None else stage.c.id
    live = inventory_logs
    with engine.connect() as conn:
        same = conn.execute(
            select(func.count()).select_from(stage).join(live, live.c.id == new_id).where(
                live.c.note == "ours", live.c.previous_quantity == stage.c.dp_seq,
                live.c.current_quantity == stage.c.current_quantity)
        ).scalar_one()
        ours = conn.execute(select(func.count()).where(live.c.note == "ours")).scalar_one()
        ids = [r[0] for r in conn.execute(select(new_id).order_by(stage.c.dp_seq))]
    assert same == ours == n  # every staged row at its recorded id, and no other row of ours
    assert ids == sorted(ids) and len(set(ids)) == n  # ascending in dp_seq order


@pytest.mark.parametrize(("lock_mode", "by_select"), [(2, True), (1, False)],
                         ids=["mode2_insert_select", "mode1_insert_values"])
def test_staged_inserts_take_the_way_the_servers_lock_mode_allows(request, lock_mode, by_select):
    """Mode 2: one INSERT ... SELECT (no table lock); modes 0/1 would hold the table's AUTO-INC
    lock for the whole statement, so multi-row INSERT ... VALUES there."""
    url = request.getfixturevalue("mysql_url" if lock_mode == 2 else "mode1_url")
    engine = hand_built(url, [100])
    state.ensure_framework_tables(engine)
    stage = mirror_table(engine, inventory_logs, "stage")
    with engine.begin() as conn:
        dialect_of(conn).bulk_insert(conn, stage, _frame(30, note="ours"))
    sent: list[str] = []
    event.listen(engine, "before_cursor_execute",
                 lambda _c, _cur, sql, *_: sent.append(" ".join(sql.split())))
    with write_transaction(engine) as conn:
        assert mysql_rows.autoinc_lock_mode(conn) == lock_mode
        ins = staged_inserts(conn, inventory_logs, WorkRows(stage, "e", INSERT))
        assert ins is not None
        assert dialect_of(conn).insert_staged(conn, ins, [
            c.name for c in inventory_logs.columns if c.name != "id"])[0] == 30
    into = [q for q in sent if q.startswith("INSERT INTO inventory_logs")]
    assert len(into) == 1 and (" SELECT " in into[0]) is by_select
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).where(inventory_logs.c.note == "ours")).scalar() == 30


def test_insert_ids_come_from_the_insert_itself(mysql_url):
    d = dialect_of(get_engine(mysql_url))
    assert not d.features.ids_before_insert
    with pytest.raises(NotImplementedError, match="insert_staged"):
        d.reserve_insert_ids(None, None)  # type: ignore[arg-type]
