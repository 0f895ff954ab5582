"""Tests of the test infrastructure itself: PostgreSQL server, database fixtures, DAGSTER_HOME."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

from stockrx_patches.registry import instance_config_yaml
from tests.support.postgres import (
    PostgresServer,
    pid_alive,
    postgres_required,
    reap_stale_servers,
)

PG_URL_RE = re.compile(r"^postgresql\+psycopg://stockrx@127\.0\.0\.1:\d+/t_[0-9a-f]{12}$")


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
    expected = {"sqlite": "sqlite", "postgres": "postgresql"}[backend]
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
    if len(ids) != 2:
        pytest.skip("needs both database_url cases collected")
    assert ids["test_database_url_both_backends[postgres]"].get_closest_marker("postgres")
    assert not ids["test_database_url_both_backends[sqlite]"].get_closest_marker("postgres")


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
