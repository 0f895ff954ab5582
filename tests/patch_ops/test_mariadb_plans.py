"""MariaDB's plans for the invariants' shared passes (patch_ops/dialects/mysql.py ``group_once``),
on the session's throwaway MariaDB (``mysql_url``)."""

from __future__ import annotations

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, func, insert, select
from sqlalchemy.engine import Connection

from patch_ops.database import get_engine
from patch_ops.dialects import dialect_of


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
