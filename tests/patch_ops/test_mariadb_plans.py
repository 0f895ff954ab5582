"""MariaDB's plans for the invariants' shared passes (patch_ops/dialects/mysql.py ``group_once``)
and for the commit's row locks (``locking_join``), on the session's throwaway MariaDB
(``mysql_url``)."""

from __future__ import annotations

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, func, insert, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError

from patch_ops import state
from patch_ops.database import get_engine
from patch_ops.dialects import dialect_of
from patch_ops.target_sets import create_target_tables
from tests.support.stockrx import seeded


def test_the_grouped_rows_of_a_shared_pass_are_grouped_once_not_once_per_outer_row(mysql_url):
    """MariaDB may make the grouped side of a join a "lateral derived" table, grouped again for
    every outer row, when its statistics say the outer rows are few (verification's pass at a
    million items: 10-12 s against 7 s). group_once turns that choice off for the pass, and the
    session's own optimizer_switch is back when the connection returns to the pool."""
    engine = get_engine(mysql_url)
    with engine.connect() as conn:  # the dialect knows the server once it has connected
        if not conn.dialect.is_mariadb:
            pytest.skip("MariaDB's optimizer choice: MySQL 8 has no split materialization")
    d = dialect_of(engine)
    md = MetaData()
    outer = Table("lateral_outer", md, Column("id", Integer, primary_key=True))
    rows = Table("lateral_rows", md, Column("id", Integer, primary_key=True),
                 Column("k", Integer, index=True))
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(outer), [{"id": i} for i in range(1, 11)])
        conn.execute(insert(rows), [{"id": i, "k": i % 2_000} for i in range(1, 20_001)])
    with engine.connect() as conn:
        conn.exec_driver_sql("ANALYZE TABLE lateral_outer, lateral_rows").all()
    g = select(rows.c.k, func.count().label("n")).group_by(rows.c.k).subquery("g")
    pass_ = select(func.count(), func.sum(g.c.n)).select_from(outer.outerjoin(g, g.c.k == outer.c.id))

    def lateral(conn: Connection) -> bool:
        sql = str(pass_.compile(conn, compile_kwargs={"literal_binds": True}))
        return any("LATERAL" in str(r[1]) for r in conn.exec_driver_sql("EXPLAIN " + sql))

    def switch(conn: Connection) -> str:
        return str(conn.exec_driver_sql("SELECT @@session.optimizer_switch").scalar())

    with engine.connect() as conn:
        own = switch(conn)
        assert "split_materialized=on" in own
        assert lateral(conn)  # the plan chosen for 10 outer rows
        d.group_once(conn)
        assert not lateral(conn)
        assert tuple(conn.execute(pass_).one()) == (10, 100)
        pooled = conn.connection.dbapi_connection
    with engine.connect() as conn:
        assert conn.connection.dbapi_connection is pooled
        assert switch(conn) == own
        assert lateral(conn)


def test_the_commit_locks_the_target_rows_through_the_primary_key(mysql_url):
    """The commit's row locks (``lock_rows``) read the target set first and each live row by
    its primary key, so they lock exactly the target rows: ``id IN (targets)`` over most of
    the table was read through the secondary index on ``name``, locked in both (1.9x; it is,
    here, at 20,000 items)."""
    engine = seeded(mysql_url, items=20_000)
    state.ensure_framework_tables(engine)
    live = state.reflect_tables(engine, ["inventories"])["inventories"]
    own = create_target_tables(engine, "x", ["inventories"])["inventories"]
    with engine.begin() as conn:
        conn.execute(insert(own).from_select(["row_id"], select(live.c.id).where(live.c.id <= 19_990)))
    with engine.connect() as conn:
        conn.exec_driver_sql(f"ANALYZE TABLE inventories, {own.name}").all()
    d = dialect_of(engine)
    ids = select(own.c.row_id)
    with engine.connect() as conn:
        sql = str(d.locking_join(live, ids).compile(conn))  # type: ignore[attr-defined]
        plan = {r[2]: (r[3], r[5]) for r in conn.exec_driver_sql("EXPLAIN " + sql)}
    assert plan["inventories"] == ("eq_ref", "PRIMARY"), plan
    with engine.begin() as conn:
        d.lock_rows(conn, live, ids)
        with engine.connect() as other:
            other.exec_driver_sql("SET SESSION innodb_lock_wait_timeout = 1")
            other.exec_driver_sql("UPDATE inventories SET quantity = quantity WHERE id = 19995")
            other.commit()  # not a target: not locked
            with pytest.raises(OperationalError, match="Lock wait timeout"):
                other.exec_driver_sql("UPDATE inventories SET quantity = quantity WHERE id = 7")
