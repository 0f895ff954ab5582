"""Tests of the test infrastructure itself: PostgreSQL and MariaDB servers, database fixtures,
DAGSTER_HOME.

The mysql tests run on the session's throwaway MariaDB (tests/support/mysql.py). To run them
against an existing MySQL 8 / MariaDB server instead, give an administrator URL (a user allowed to
CREATE DATABASE, CREATE USER and GRANT); nothing is started and each test still gets its own
database and least-privilege user::

    STOCKRX_TEST_MYSQL_URL='mysql+pymysql://root:PW@db.example:3306/' .venv/bin/pytest -m mysql
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import psycopg
import pymysql
import pytest
import sqlalchemy as sa

from stockrx_patches.registry import instance_config_yaml
from tests.support import mysql as mysql_support
from tests.support.mysql import MySQLServer, mysql_required
from tests.support.postgres import (
    PostgresServer,
    pid_alive,
    postgres_required,
    reap_stale_servers,
)

PG_URL_RE = re.compile(r"^postgresql\+psycopg://stockrx@127\.0\.0\.1:\d+/t_[0-9a-f]{12}$")
MYSQL_URL_RE = re.compile(
    r"^mysql\+pymysql://(t_[0-9a-f]{12}):[0-9a-f]{32}@127\.0\.0\.1:\d+/(t_[0-9a-f]{12})"
    r"\?charset=utf8mb4$"
)
EXTERNAL_MYSQL = bool(os.environ.get("STOCKRX_TEST_MYSQL_URL"))


def _roundtrip(url: str) -> list[tuple[int, str]]:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE item (id INTEGER PRIMARY KEY, name TEXT NOT NULL)"))
            conn.execute(
                sa.text("INSERT INTO item VALUES (:id, :name)"),
                [{"id": 1, "name": "aspirin"}, {"id": 2, "name": "ibuprofen"}],
            )
        with engine.connect() as conn:
            return [
                tuple(r) for r in conn.execute(sa.text("SELECT id, name FROM item ORDER BY id"))
            ]
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_pg_url_roundtrip(pg_url: str) -> None:
    if not os.environ.get("STOCKRX_TEST_PG_URL"):
        assert PG_URL_RE.match(pg_url), pg_url
    assert _tables(pg_url) == set()  # fresh and empty
    assert _roundtrip(pg_url) == [(1, "aspirin"), (2, "ibuprofen")]


@pytest.mark.postgres
def test_pg_server_is_tuned_for_tests(pg_server: PostgresServer, pg_url: str) -> None:
    engine = sa.create_engine(pg_url)
    try:
        with engine.connect() as conn:
            assert (
                conn.execute(sa.text("SELECT current_database()")).scalar()
                == sa.engine.make_url(pg_url).database
            )
            if not pg_server.is_external:
                assert str(conn.execute(sa.text("SHOW server_version_num")).scalar()).startswith(
                    "15"
                )
                for name in ("fsync", "synchronous_commit", "full_page_writes"):
                    assert conn.execute(sa.text(f"SHOW {name}")).scalar() == "off"
                assert conn.execute(sa.text("SHOW max_connections")).scalar() == "100"
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_pg_databases_are_isolated_and_dropped(pg_server: PostgresServer) -> None:
    a, b = pg_server.create_database(), pg_server.create_database()
    try:
        assert a != b
        _roundtrip(a)
        assert _tables(a) == {"item"}
        assert _tables(b) == set()
    finally:
        pg_server.drop_database(a)
        pg_server.drop_database(b)
    names = pg_server.list_databases()
    assert sa.engine.make_url(a).database not in names
    assert sa.engine.make_url(b).database not in names


@pytest.mark.postgres
def test_pg_drop_terminates_open_connections(pg_server: PostgresServer) -> None:
    url = pg_server.create_database()
    engine = sa.create_engine(url)
    conn = engine.connect()
    conn.execute(sa.text("SELECT 1"))  # a pooled connection left open, as a buggy test would
    pg_server.drop_database(url)
    assert sa.engine.make_url(url).database not in pg_server.list_databases()
    with pytest.raises(sa.exc.DBAPIError):
        conn.execute(sa.text("SELECT 1"))
    conn.invalidate()
    engine.dispose()


def test_database_url_both_backends(database_url: str, request: pytest.FixtureRequest) -> None:
    backend = request.node.callspec.params["database_url"]
    expected = {"sqlite": "sqlite", "postgres": "postgresql", "mariadb": "mysql"}[backend]
    assert sa.engine.make_url(database_url).get_backend_name() == expected
    assert _tables(database_url) == set()
    assert _roundtrip(database_url) == [(1, "aspirin"), (2, "ibuprofen")]


def test_database_url_postgres_case_is_marked(request: pytest.FixtureRequest) -> None:
    session_items = request.session.items
    ids = {
        item.name: item
        for item in session_items
        if item.name.startswith("test_database_url_both_backends[")
    }
    if not {"sqlite", "postgres"} <= {name.split("[")[1].rstrip("]") for name in ids}:
        pytest.skip("needs both database_url cases collected")
    assert ids["test_database_url_both_backends[postgres]"].get_closest_marker("postgres")
    assert not ids["test_database_url_both_backends[sqlite]"].get_closest_marker("postgres")
    for name in ids:
        assert bool(ids[name].get_closest_marker("mysql")) == name.endswith("[mariadb]"), name
    # The mariadb case is collected unless STOCKRX_TEST_MARIADB=0.
    mariadb_on = os.environ.get("STOCKRX_TEST_MARIADB", "1").strip() != "0"
    assert ("test_database_url_both_backends[mariadb]" in ids) == mariadb_on


def test_sqlite_url_is_fresh_file(sqlite_url: str, tmp_path: Path) -> None:
    path = Path(sa.engine.make_url(sqlite_url).database or "")
    assert path.parent == tmp_path and not path.exists()
    _roundtrip(sqlite_url)
    assert path.exists()


def test_dagster_home(dagster_home: Path, repo_root: Path) -> None:
    assert os.environ["DAGSTER_HOME"] == str(dagster_home)
    assert dagster_home.is_dir()
    assert (dagster_home / "dagster.yaml").read_text() == instance_config_yaml()


@pytest.mark.parametrize(
    ("env", "required"),
    [
        ({}, False),
        ({"CI": "true"}, True),
        ({"CI": "false"}, False),
        ({"STOCKRX_REQUIRE_POSTGRES": "1"}, True),
        ({"STOCKRX_REQUIRE_POSTGRES": "0"}, False),
    ],
)
def test_postgres_required_policy(env: dict[str, str], required: bool) -> None:
    assert postgres_required(env) is required


def _start_inner_pytest(env_overrides: dict[str, str]) -> subprocess.Popen[str]:
    """Run one postgres test in a child pytest, with a PostgreSQL that cannot be reached."""
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "STOCKRX_REQUIRE_POSTGRES")}
    env["STOCKRX_TEST_PG_URL"] = "postgresql://stockrx@127.0.0.1:1/postgres"  # nothing listens
    env.update(env_overrides)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            f"{Path(__file__)}::test_pg_url_roundtrip",
        ],
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow
def test_unavailable_postgres_skips_locally_but_fails_in_ci() -> None:
    # CI=true is covered by test_postgres_required_policy; .ci/run sets STOCKRX_REQUIRE_POSTGRES.
    local = _start_inner_pytest({})
    required = _start_inner_pytest({"STOCKRX_REQUIRE_POSTGRES": "1"})
    local_out, _ = local.communicate(timeout=120)
    required_out, _ = required.communicate(timeout=120)

    assert local.returncode == 0, local_out
    assert "1 skipped" in local_out and "PostgreSQL unavailable" in local_out, local_out

    assert required.returncode == 1, required_out
    assert "1 error" in required_out and "PostgreSQL unavailable" in required_out, required_out


@pytest.mark.postgres
@pytest.mark.slow
def test_stale_server_of_killed_session_is_reaped(tmp_path: Path) -> None:
    """A session killed before teardown leaves a server; the next start() stops it."""
    if os.environ.get("STOCKRX_TEST_PG_URL"):
        pytest.skip("uses a local server")
    code = textwrap.dedent("""
        import os
        from tests.support.postgres import PostgresServer
        s = PostgresServer().start()
        print(s.base_dir, s.postmaster_pid, flush=True)
        os._exit(0)  # no atexit, no stop(): like a SIGKILLed pytest
    """)
    res = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    base, pid = res.stdout.split()
    assert Path(base).is_dir() and pid_alive(int(pid))
    try:
        with psycopg.connect(host=base, port=_port_of(base), user="stockrx", dbname="postgres"):
            pass
    finally:
        reaped = reap_stale_servers(Path(base).parent)
    assert Path(base) in reaped
    assert not Path(base).exists()
    assert not pid_alive(int(pid))


def _port_of(base: str) -> int:
    # postmaster.pid line 4 is the port
    return int((Path(base) / "data" / "postmaster.pid").read_text().splitlines()[3])


# ------------------------------------------------------------------------------- MariaDB / MySQL


def _mysql_scalar(url: str, query: str) -> object:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(query)).scalar()
    finally:
        engine.dispose()


def _mysql_error_code(exc: sa.exc.DBAPIError) -> int:
    return int(exc.orig.args[0])  # type: ignore[union-attr]


@pytest.mark.mysql
def test_mysql_url_roundtrip(mysql_url: str) -> None:
    if not EXTERNAL_MYSQL:
        m = MYSQL_URL_RE.match(mysql_url)
        assert m, mysql_url
        assert m.group(1) == m.group(2)  # the user is named after its database
    assert _tables(mysql_url) == set()  # fresh and empty
    assert _roundtrip(mysql_url) == [(1, "aspirin"), (2, "ibuprofen")]


@pytest.mark.mysql
def test_mysql_server_settings(mysql_server: MySQLServer, mysql_url: str) -> None:
    engine = sa.create_engine(mysql_url)
    try:
        with engine.connect() as conn:
            row = conn.execute(
                sa.text(
                    "SELECT DATABASE(), @@character_set_database, @@collation_database, "
                    "@@character_set_connection, @@log_bin, @@local_infile, @@binlog_format, "
                    "@@innodb_flush_log_at_trx_commit, @@sync_binlog, @@version"
                )
            ).one()
    finally:
        engine.dispose()
    assert row[0] == sa.engine.make_url(mysql_url).database
    assert row[1:4] == ("utf8mb4", "utf8mb4_unicode_ci", "utf8mb4")
    if not mysql_server.is_external:
        assert "MariaDB" in row[9]
        assert row[4:7] == (1, 1, "ROW")  # binary log on, as on MySQL 8; LOAD DATA LOCAL allowed
        assert row[7:9] == (2, 0)  # test speed: less durable (durable=True: 1, 1)


def test_mysql_durable_option_sets_production_durability(tmp_path: Path) -> None:
    def args(**kw: bool) -> list[str]:
        server = MySQLServer(**kw)
        server.base_dir, server.port = tmp_path, 3307
        return server.server_args()

    fast, durable = args(), args(durable=True)
    for a in (fast, durable):
        assert "--no-defaults" == a[0]
        assert f"--log-bin={tmp_path / 'binlog'}" in a and "--server-id=1" in a
        assert "--local-infile=1" in a and "--skip-name-resolve" in a
        assert "--character-set-server=utf8mb4" in a
        assert "--collation-server=utf8mb4_unicode_ci" in a
    assert {"--innodb-flush-log-at-trx-commit=2", "--sync-binlog=0"} <= set(fast)
    assert {"--innodb-flush-log-at-trx-commit=1", "--sync-binlog=1"} <= set(durable)
    assert "--sync-binlog=0" not in durable
    assert "--innodb-flush-log-at-trx-commit=2" not in durable


@pytest.mark.mysql
def test_mysql_url_user_is_least_privilege(mysql_url: str) -> None:
    user = sa.engine.make_url(mysql_url).username
    assert user and user != "root"
    engine = sa.create_engine(mysql_url)
    try:
        with engine.connect() as conn:
            current = conn.execute(sa.text("SELECT CURRENT_USER()")).scalar()
            assert str(current).split("@")[0] == user
            grants = [str(r[0]) for r in conn.execute(sa.text("SHOW GRANTS"))]
            # Nothing global (no PROCESS, no CREATE USER...): only USAGE on *.*.
            assert any(g.startswith("GRANT USAGE ON *.*") for g in grants), grants
            assert not any(" ON *.* " in g and not g.startswith("GRANT USAGE") for g in grants)
            # Its own database: DDL the framework needs works.
            conn.execute(sa.text("CREATE TABLE t1 (id INT PRIMARY KEY, v VARCHAR(10))"))
            conn.execute(sa.text("CREATE INDEX ix_t1_v ON t1 (v)"))
            conn.execute(sa.text("ALTER TABLE t1 ADD COLUMN w INT"))
            conn.execute(sa.text("CREATE TEMPORARY TABLE stage (id INT PRIMARY KEY)"))
            conn.execute(sa.text("DROP TEMPORARY TABLE stage"))
            conn.execute(sa.text("DROP TABLE t1"))
            # Outside it: denied.
            with pytest.raises(sa.exc.OperationalError) as denied:
                conn.execute(sa.text("CREATE DATABASE other"))
            assert _mysql_error_code(denied.value) == 1044  # access denied to database
            assert "Access denied" in str(denied.value)
            with pytest.raises(sa.exc.DBAPIError) as denied_table:
                conn.execute(sa.text("CREATE TABLE mysql.evil (id INT)"))
            assert _mysql_error_code(denied_table.value) in (1044, 1142)
    finally:
        engine.dispose()
    assert _tables(mysql_url) == set()


@pytest.mark.mysql
def test_mysql_databases_are_isolated_and_dropped(mysql_server: MySQLServer) -> None:
    a, b = mysql_server.create_database(), mysql_server.create_database()
    try:
        assert a != b
        ua, ub = sa.engine.make_url(a), sa.engine.make_url(b)
        assert ua.database != ub.database and ua.username != ub.username
        _roundtrip(a)
        assert _tables(a) == {"item"}
        assert _tables(b) == set()
        # b's user cannot read a's database.
        with pytest.raises(sa.exc.DBAPIError) as denied:
            _mysql_scalar(b, f"SELECT COUNT(*) FROM `{ua.database}`.item")
        assert _mysql_error_code(denied.value) in (1044, 1142)
    finally:
        mysql_server.drop_database(a)
        mysql_server.drop_database(b)
    names, users = mysql_server.list_databases(), mysql_server.list_users()
    for u in (ua, ub):
        assert u.database not in names
        assert u.username not in users
    with pytest.raises(sa.exc.OperationalError) as gone:
        _mysql_scalar(a, "SELECT 1")
    assert _mysql_error_code(gone.value) == 1045  # the user no longer exists


@pytest.mark.mysql
def test_mysql_drop_kills_open_connections(mysql_server: MySQLServer) -> None:
    url = mysql_server.create_database()
    engine = sa.create_engine(url)
    conn = engine.connect()
    conn.execute(sa.text("CREATE TABLE item (id INT PRIMARY KEY)"))
    conn.execute(sa.text("INSERT INTO item VALUES (1)"))  # open transaction: holds a lock
    mysql_server.drop_database(url)  # does not wait for it
    assert sa.engine.make_url(url).database not in mysql_server.list_databases()
    with pytest.raises(sa.exc.DBAPIError):
        conn.execute(sa.text("SELECT 1"))
    conn.invalidate()
    engine.dispose()


@pytest.mark.mysql
def test_mysql_root_url_is_admin(mysql_server: MySQLServer, mysql_url: str) -> None:
    db = sa.engine.make_url(mysql_url).database
    assert db is not None
    root = mysql_server.root_url(db)
    assert sa.engine.make_url(root).database == db
    engine = sa.create_engine(root)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE made_by_admin (id INT PRIMARY KEY)"))
    finally:
        engine.dispose()
    assert _tables(mysql_url) == {"made_by_admin"}  # visible to the patch user


@pytest.mark.parametrize(
    ("env", "required"),
    [
        ({}, False),
        ({"CI": "true"}, True),
        ({"CI": "false"}, False),
        ({"STOCKRX_REQUIRE_MYSQL": "1"}, True),
        ({"STOCKRX_REQUIRE_MYSQL": "0"}, False),
        ({"STOCKRX_REQUIRE_POSTGRES": "1"}, False),
    ],
)
def test_mysql_required_policy(env: dict[str, str], required: bool) -> None:
    assert mysql_required(env) is required


def test_ci_requires_mysql(repo_root: Path) -> None:
    assert "export STOCKRX_REQUIRE_MYSQL=1" in (repo_root / ".ci" / "run").read_text()


def _start_inner_mysql_pytest(env_overrides: dict[str, str]) -> subprocess.Popen[str]:
    """Run one mysql test in a child pytest, with a MariaDB that cannot be reached."""
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "STOCKRX_REQUIRE_MYSQL")}
    env["STOCKRX_TEST_MYSQL_URL"] = "mysql+pymysql://root@127.0.0.1:1/"  # nothing listens
    env.update(env_overrides)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            f"{Path(__file__)}::test_mysql_url_roundtrip",
        ],
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow
def test_unavailable_mysql_skips_locally_but_fails_in_ci() -> None:
    local = _start_inner_mysql_pytest({})
    required = _start_inner_mysql_pytest({"STOCKRX_REQUIRE_MYSQL": "1"})
    local_out, _ = local.communicate(timeout=120)
    required_out, _ = required.communicate(timeout=120)

    assert local.returncode == 0, local_out
    assert "1 skipped" in local_out and "MariaDB unavailable" in local_out, local_out

    assert required.returncode == 1, required_out
    assert "1 error" in required_out and "MariaDB unavailable" in required_out, required_out


@pytest.mark.mysql
@pytest.mark.slow
def test_mysql_stale_server_of_killed_session_is_reaped() -> None:
    """A session killed before teardown leaves a server; the next start() stops it."""
    if EXTERNAL_MYSQL:
        pytest.skip("uses a local server")
    if mysql_support.find_mariadb_binaries() is None:
        pytest.skip("MariaDB binaries not installed")
    code = textwrap.dedent("""
        import os
        from tests.support.mysql import MySQLServer
        s = MySQLServer().start()
        print(s.base_dir, s.server_pid, s.socket_path, flush=True)
        os._exit(0)  # no atexit, no stop(): like a SIGKILLed pytest
    """)
    res = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    base, pid, sock = res.stdout.split()
    assert Path(base).is_dir() and pid_alive(int(pid))
    try:
        pymysql.connect(unix_socket=sock, user="root").close()  # still serving
    finally:
        reaped = mysql_support.reap_stale_servers(Path(base).parent)
    assert Path(base) in reaped
    assert not Path(base).exists()
    assert not pid_alive(int(pid))
