"""Shared fixtures.

Databases:
- ``sqlite_url``: fresh SQLite file per test.
- ``pg_url``: fresh, empty PostgreSQL database per test on the session's throwaway server
  (``pg_server``; or the server in STOCKRX_TEST_PG_URL). Dropped after the test.
- ``mysql_url``: fresh, empty utf8mb4 MariaDB database per test, with its own least-privilege
  user (the URL's user, not root), on the session's throwaway server (``mysql_server``; or the
  server in STOCKRX_TEST_MYSQL_URL). Database and user are dropped after the test. See
  tests/support/mysql.py for the server's settings (binary log on, local_infile on) and the grant.
- ``database_url``: runs the test once per backend, ids ``[sqlite]``, ``[postgres]`` and
  ``[mariadb]``; the postgres case carries ``@pytest.mark.postgres``, the mariadb case
  ``@pytest.mark.mysql`` (deselect with ``-m "not postgres"`` / ``-m "not mysql"``;
  STOCKRX_TEST_MARIADB=0 leaves the mariadb case out).

If PostgreSQL cannot be started, postgres tests are skipped with the reason, except when
CI=true or STOCKRX_REQUIRE_POSTGRES=1: then they fail (errors in setup). The same for MariaDB
(mysql tests) with CI=true or STOCKRX_REQUIRE_MYSQL=1.
"""

from __future__ import annotations

import base64
import gc
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stockrx_patches.registry import instance_config_yaml
from tests.support.mysql import MySQLServer, MySQLUnavailable, mysql_required
from tests.support.postgres import PostgresServer, PostgresUnavailable, postgres_required
from tests.support.testclock import sitecustomize as testclock

# Real runs refuse without an audit key. Tests run with a throwaway key (set before the code
# location is imported; subprocesses inherit it). Tests of the no-key path unset it themselves.
TEST_AUDIT_KEY = "test:" + base64.urlsafe_b64encode(b"stockrx-patches-test-key-32bytes").decode()
os.environ.setdefault("STOCKRX_AUDIT_KEYS", TEST_AUDIT_KEY)
REPO_ROOT = Path(__file__).resolve().parent.parent

# Real runs start only inside a maintenance window (patch_ops.windows). Tests run on a system clock
# frozen inside one (Sunday 02:30 JST; the window ends at 04:00) below the product
# (tests/support/testclock: not STOCKRX_PATCHES_CLOCK, which is an override real runs must
# declare), here and in every Python subprocess: its folder leads their PYTHONPATH. Tests of the
# windows move it (TEST_NOW_ENV).
TEST_CLOCK = "2026-11-29T02:30:00+09:00"
TEST_NOW_ENV = testclock.ENV
os.environ.setdefault(TEST_NOW_ENV, TEST_CLOCK)
testclock.install()
TEST_PYTHONPATH = os.pathsep.join([str(REPO_ROOT / "tests" / "support" / "testclock"),
                                   str(REPO_ROOT)])
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in [TEST_PYTHONPATH, os.environ.get("PYTHONPATH", "")] if p
)

# database_url's backends; STOCKRX_TEST_MARIADB=0 leaves MariaDB out.
MARIADB_IN_DATABASE_URL = os.environ.get("STOCKRX_TEST_MARIADB", "1").strip() != "0"
DATABASE_URL_BACKENDS = [
    "sqlite",
    pytest.param("postgres", marks=pytest.mark.postgres),
    *([pytest.param("mariadb", marks=pytest.mark.mysql)] if MARIADB_IN_DATABASE_URL else []),
]


@pytest.fixture(autouse=True)
def _frozen_heap() -> None:
    """Freeze what the process holds when a test starts (after collecting its garbage).

    Every in-process transform step begins with a full ``gc.collect()`` (the memory guard,
    resources/memory.py); in a test worker that has imported the whole suite it scans ~245,000
    objects (~0.2 s, more as the worker's heap grows), twice per dry+real run, and the
    interpreter's own full collections scan them too. Frozen objects are not scanned, so a
    collection costs what the test itself allocated. The guard then finds the heap already
    frozen and leaves the freeze alone (the branch a pre-forked server takes; tested in
    tests/resources/test_memory_guard.py, whose test of the guard's own freeze unfreezes first).
    Objects frozen here that later become cyclic garbage are not freed: a worker's leftovers.
    """
    gc.collect()
    gc.freeze()


@pytest.fixture
def unfrozen() -> Iterator[None]:
    """Nothing frozen during the test (for tests of who freezes what; ``_frozen_heap`` freezes
    before every other test)."""
    gc.unfreeze()
    yield
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


def serve(server: Any, unavailable: type[Exception], required: bool, name: str, env: str):  # type: ignore[no-untyped-def]
    """Start a session's throwaway server and stop it at the end; if it cannot start, skip its
    tests, or fail them where the server is required (CI=true or ``env``=1)."""
    try:
        server.start()
    except unavailable as e:
        msg = f"{name} unavailable: {e}"
        if required:
            pytest.fail(
                msg + f"\n(CI=true or {env}=1: failing instead of skipping)", pytrace=False
            )
        pytest.skip(msg)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server (started lazily, on first use)."""
    yield from serve(PostgresServer.from_env(), PostgresUnavailable, postgres_required(),
                     "PostgreSQL", "STOCKRX_REQUIRE_POSTGRES")


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> Iterator[str]:
    """URL of a fresh empty database: postgresql+psycopg://stockrx@127.0.0.1:PORT/t_xxxx."""
    url = pg_server.create_database()
    yield url
    pg_server.drop_database(url)


@pytest.fixture(scope="session")
def mysql_server() -> Iterator[MySQLServer]:
    """The session's MariaDB server (started lazily, on first use)."""
    yield from serve(MySQLServer.from_env(), MySQLUnavailable, mysql_required(), "MariaDB",
                     "STOCKRX_REQUIRE_MYSQL")


@pytest.fixture
def mysql_url(mysql_server: MySQLServer) -> Iterator[str]:
    """URL of a fresh empty database and its own user:
    mysql+pymysql://t_xxxx:PASSWORD@127.0.0.1:PORT/t_xxxx?charset=utf8mb4."""
    url = mysql_server.create_database()
    yield url
    mysql_server.drop_database(url)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """URL of a fresh SQLite file: sqlite:////tmp/.../stockrx.sqlite."""
    return f"sqlite:///{tmp_path / 'stockrx.sqlite'}"


@pytest.fixture(params=DATABASE_URL_BACKENDS)
def database_url(request: pytest.FixtureRequest) -> str:
    """A fresh database URL, once per backend. ``request.param`` is "sqlite", "postgres" or
    "mariadb"."""
    fixture = {"sqlite": "sqlite_url", "postgres": "pg_url", "mariadb": "mysql_url"}[request.param]
    return str(request.getfixturevalue(fixture))


@pytest.fixture
def dagster_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, repo_root: Path) -> Path:
    """A fresh DAGSTER_HOME (env var set for the test) with the instance config that
    ``stockrx-patches instance-config`` installs (the repo's dagster.yaml + table limits)."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(instance_config_yaml())
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The fault matrix (tests/test_fault_matrix.py) as a table: case x database, pass/fail."""
    cells: dict[str, dict[str, str]] = {}
    for outcome in ("passed", "failed", "error"):
        for report in terminalreporter.stats.get(outcome, []):
            case = dict(getattr(report, "user_properties", ())).get("fault_case")
            if case and getattr(report, "when", "call") in ("call", "setup"):
                backend, what = str(case).split("|", 1)
                mark = "pass" if outcome == "passed" else "FAIL"
                if cells.setdefault(what, {}).get(backend) != "FAIL":
                    cells[what][backend] = mark
    if not cells:
        return
    backends = [b for b in ("sqlite", "postgres", "mariadb") if any(b in r for r in cells.values())]
    width = max(len(w) for w in cells)
    terminalreporter.write_sep("=", "fault matrix (SIGKILL at each failpoint)")
    terminalreporter.write_line(f"{'case':<{width}}  " + "  ".join(f"{b:<8}" for b in backends))
    for what in sorted(cells):
        row = "  ".join(f"{cells[what].get(b, '-'):<8}" for b in backends)
        terminalreporter.write_line(f"{what:<{width}}  {row}")
