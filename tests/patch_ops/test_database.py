"""Engines for the StockRx database (patch_ops.database): bad URLs are one clear line."""

from __future__ import annotations

import pytest

from patch_ops.database import DatabaseUnavailable, get_engine, redact_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("foo://bar", "unknown kind of database 'foo'"),
        ("mssql+pymssql://u:s3cr3t@127.0.0.1/x", "driver for 'mssql+pymssql' is not installed"),
        ("not a url", "invalid database URL"),
    ],
)
def test_a_url_that_cannot_make_an_engine_is_one_clear_line(url: str, expected: str) -> None:
    with pytest.raises(DatabaseUnavailable) as info:
        get_engine(url)
    message = str(info.value)
    assert expected in message and "\n" not in message
    assert "s3cr3t" not in message


def test_the_password_is_masked() -> None:
    assert redact_url("postgresql+psycopg://u:s3cr3t@h/db") == "postgresql+psycopg://u:***@h/db"


def test_a_mysql_url_whose_driver_is_missing_is_one_clear_line() -> None:
    """mysqlclient (mysql+mysqldb) is optional: PyMySQL is the default driver."""
    try:
        import MySQLdb  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("mysqlclient is installed here")
    with pytest.raises(DatabaseUnavailable) as info:
        get_engine("mysql+mysqldb://patcher:s3cr3t@127.0.0.1/stockrx")
    message = str(info.value)
    assert "the database driver for 'mysql+mysqldb' is not installed" in message
    assert "s3cr3t" not in message and "\n" not in message


def test_framework_tables_are_made_while_the_application_writes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """On SQLite, a deferred transaction that looked for a framework table and then created it
    failed at once ("database is locked") when the application committed a write in between
    (a plan failed so in the benchmark with its application stand-in writing). The tables are
    made in a write transaction: the application's write waits for it instead."""
    import sqlite3

    from sqlalchemy import event, inspect

    from patch_ops.database import get_engine
    from patch_ops.state import ensure_framework_tables

    path = tmp_path / "app.sqlite"
    engine = get_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE app_rows (id INTEGER PRIMARY KEY, n INTEGER)")
    app: list[str] = []

    def application_writes(conn, cursor, statement, *_):  # type: ignore[no-untyped-def]
        if app or "data_patch_executions" not in statement:
            return  # once: right after the first look for the executions table
        other = sqlite3.connect(path, timeout=0)
        try:
            other.execute("INSERT INTO app_rows (n) VALUES (1)")
            other.commit()
            app.append("written")
        except sqlite3.OperationalError as exc:
            app.append(str(exc))
        finally:
            other.close()

    event.listen(engine, "after_cursor_execute", application_writes)
    ensure_framework_tables(engine)
    assert app == ["database is locked"]  # the application waits (it has a busy timeout)
    assert inspect(engine).has_table("data_patch_executions")


@pytest.mark.postgres
def test_a_postgres_commit_hashes_in_memory_for_its_transaction_only(pg_url) -> None:  # type: ignore[no-untyped-def]
    """The commit's transaction (its row locks, conflict check and UPDATE ... FROM the stage)
    gets ``COMMIT_WORK_MEM_KB`` of work_mem where the server gives less, set before the locks;
    the next transaction of the pooled connection has the server's again, and a session that
    has more keeps it."""
    from sqlalchemy import event, text

    from patch_ops.dialects.postgresql import COMMIT_WORK_MEM_KB
    from patch_ops.steps.commit import commit_execution
    from tests.support.stockrx import seeded, validated_price_run

    assert COMMIT_WORK_MEM_KB == 64 * 1024
    engine = seeded(pg_url, items=50)
    execution_id, _ = validated_price_run(engine)
    seen: list[str] = []

    def keep(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
        if "inventories" in statement or "work_mem" in statement:
            cursor.execute("SHOW work_mem")  # what the statement about to run gets
            seen.append(f"{cursor.fetchone()[0]} {statement.split()[0]} {'work_mem' in statement}")

    event.listen(engine, "before_cursor_execute", keep)
    try:
        commit_execution(engine, execution_id)
    finally:
        event.remove(engine, "before_cursor_execute", keep)
    # the setting first, then every statement on the items (locks, conflict check, UPDATE)
    assert seen[0].endswith(" True"), seen
    assert {s.split()[0] for s in seen[1:]} == {"64MB"}, seen
    assert len(seen) >= 4 and any(s.split()[1] == "UPDATE" for s in seen), seen
    with engine.connect() as conn:
        assert conn.execute(text("SHOW work_mem")).scalar_one() != "64MB"  # transaction-local
    sep = "&" if "?" in pg_url else "?"
    larger = get_engine(f"{pg_url}{sep}options=-c%20work_mem%3D256MB")
    with larger.begin() as conn:
        from patch_ops.dialects import dialect_of

        dialect_of(conn).update_joined(conn)
        assert conn.execute(text("SHOW work_mem")).scalar_one() == "256MB"
    larger.dispose()
