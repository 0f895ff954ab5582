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


def application_write(path) -> str:  # type: ignore[no-untyped-def]
    """One write of the application to SQLite file ``path``, on a connection of its own that
    does not wait: "written", or why it was refused."""
    import sqlite3

    other = sqlite3.connect(path, timeout=0)
    try:
        other.execute("INSERT INTO app_rows (n) VALUES (1)")
        other.commit()
        return "written"
    except sqlite3.OperationalError as exc:
        return str(exc)
    finally:
        other.close()


def test_framework_tables_are_made_while_the_application_writes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """On SQLite, a deferred transaction that looked for a framework table and then created it
    failed at once ("database is locked") when the application committed a write in between
    (a plan failed so in the benchmark with its application stand-in writing). The tables are
    made in a write transaction: the application's write waits for it instead."""

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
        app.append(application_write(path))

    event.listen(engine, "after_cursor_execute", application_writes)
    ensure_framework_tables(engine)
    assert app == ["database is locked"]  # the application waits (it has a busy timeout)
    assert inspect(engine).has_table("data_patch_executions")


def test_an_executions_own_tables_are_made_and_dropped_while_the_application_writes(
    tmp_path,
) -> None:  # type: ignore[no-untyped-def]
    """The same for the tables of an execution's own (target sets, work rows): made at plan,
    dropped when it closes, each in a write transaction (a dry run's report op failed so in
    the benchmark, session 35: its drop looked for the table, the application wrote, the DROP
    was refused)."""

    from sqlalchemy import event, inspect

    from patch_ops.database import get_engine
    from patch_ops.state import ensure_framework_tables
    from patch_ops.target_sets import create_target_tables, target_table_name
    from patch_ops.work_rows import drop_own_tables

    path = tmp_path / "app.sqlite"
    engine = get_engine(f"sqlite:///{path}")
    ensure_framework_tables(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE app_rows (id INTEGER PRIMARY KEY, n INTEGER)")
    name = target_table_name("x", "items")
    app: list[str] = []

    def application_writes(conn, cursor, statement, *_):  # type: ignore[no-untyped-def]
        if name not in statement or statement.lstrip().upper().startswith(("CREATE", "DROP")):
            return  # right after each look for the table, before its CREATE or DROP
        app.append(application_write(path))

    for step, made in ((lambda: create_target_tables(engine, "x", ["items"]), True),
                       (lambda: drop_own_tables(engine, ["x"], ["items"]), False)):
        app.clear()
        event.listen(engine, "after_cursor_execute", application_writes)
        step()
        event.remove(engine, "after_cursor_execute", application_writes)
        assert inspect(engine).has_table(name) == made
        assert app and set(app) == {"database is locked"}  # the application waited each time
