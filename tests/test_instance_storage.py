"""Dagster's own storage on a database server, from the committed instance configs.

dagster.mysql.yaml (MySQL 8 / MariaDB through dagster-mysql) and dagster.postgres.yaml
(PostgreSQL through dagster-postgres) are each proven by a real run: DAGSTER_HOME holds what
`stockrx-patches instance-config --base <file>` prints, its env: variables name a fresh database
on the session's throwaway server, and a dry run of the price patch goes through `dagster job
execute` (the release engineers' path). The run and its events must then be rows in that server's
`runs` and `event_logs` tables, and no SQLite storage may appear under DAGSTER_HOME.

On MariaDB Dagster's database belongs to the least-privilege user that ``create_database()``
makes (the framework-schema grant on that database only, no global privilege): that user creates
Dagster's schema on the first run and `dagster instance migrate` runs as it too. Here that
migrate finds the schema current; a real step was checked by hand with the same grant (back one
revision, then migrate: dagster 1.13.27's last migration, an ALTER of bulk_actions.body to
LONGTEXT, ran as that user).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dagster import DagsterEventType as E
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from stockrx_patches.cli import main as cli_main
from tests.conftest import TEST_PYTHONPATH
from tests.support.stockrx import PRICE_JOB, latest_execution, seeded

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


@dataclass
class Storage:
    """A fresh database for Dagster: the env: variables of the base config, and a SQLAlchemy URL
    (the tests' own driver) to read Dagster's tables back."""

    base: str
    env: dict[str, str]
    url: str


def _mysql_storage(request: pytest.FixtureRequest) -> Iterator[Storage]:
    server = request.getfixturevalue("mysql_server")
    url = server.create_database("dagster")  # its own user, the framework-schema grant
    u = make_url(url)
    env = {
        "DAGSTER_MYSQL_HOST": str(u.host),
        "DAGSTER_MYSQL_PORT": str(u.port),
        "DAGSTER_MYSQL_USER": str(u.username),
        "DAGSTER_MYSQL_PASSWORD": str(u.password),
        "DAGSTER_MYSQL_DB": str(u.database),
    }
    try:
        yield Storage("dagster.mysql.yaml", env, url)
    finally:
        server.drop_database(url)


def _postgres_storage(request: pytest.FixtureRequest) -> Iterator[Storage]:
    server = request.getfixturevalue("pg_server")
    url = server.create_database("dagster")
    u = make_url(url)
    env = {
        "DAGSTER_PG_HOST": str(u.host),
        "DAGSTER_PG_PORT": str(u.port),
        "DAGSTER_PG_USER": str(u.username),
        "DAGSTER_PG_PASSWORD": u.password or "",  # the test server trusts local connections
        "DAGSTER_PG_DB": str(u.database),
    }
    try:
        yield Storage("dagster.postgres.yaml", env, url)
    finally:
        server.drop_database(url)


@pytest.fixture(
    params=[
        pytest.param(_mysql_storage, id="mysql", marks=pytest.mark.mysql),
        pytest.param(_postgres_storage, id="postgres", marks=pytest.mark.postgres),
    ]
)
def storage(request: pytest.FixtureRequest) -> Iterator[Storage]:
    # Only the server of this case is started (getfixturevalue inside the case).
    yield from request.param(request)


def test_a_patch_run_is_stored_in_the_instance_database(storage, sqlite_url, tmp_path, capsys):
    home = tmp_path / "dagster_home"
    home.mkdir()
    assert cli_main(["instance-config", "--base", str(REPO / storage.base)]) == 0
    generated = capsys.readouterr().out
    assert f"from {storage.base}" in generated and "stockrx-table/inventories" in generated
    (home / "dagster.yaml").write_text(generated)

    engine = seeded(sqlite_url, items=50)  # the StockRx database: SQLite, it is not the point
    env = dict(os.environ, **storage.env, DAGSTER_HOME=str(home), STOCKRX_DATABASE_URL=sqlite_url,
               PYTHONPATH=TEST_PYTHONPATH)
    run = subprocess.run(
        [str(BIN / "dagster"), "job", "execute", "-m", "stockrx_patches.definitions",
         "-j", PRICE_JOB, "-c", "config/runs/inventory_price_adjustment.yaml"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "impact report (dry run, nothing committed): " in run.stdout + run.stderr
    run_id = latest_execution(engine)["dagster_run_id"]

    dagster_db = create_engine(storage.url)
    try:
        with dagster_db.connect() as conn:
            stored = conn.execute(
                text("SELECT pipeline_name, status FROM runs WHERE run_id = :id"), {"id": run_id}
            ).one()
            events = conn.execute(
                text("SELECT dagster_event_type, step_key FROM event_logs WHERE run_id = :id"),
                {"id": run_id},
            ).all()
    finally:
        dagster_db.dispose()
    assert tuple(stored) == (PRICE_JOB, "SUCCESS")
    # The stored event type is the enum's value (RUN_START is stored as "PIPELINE_START").
    kinds = [kind for kind, _ in events]
    assert kinds.count(E.RUN_START.value) == 1 and kinds.count(E.RUN_SUCCESS.value) == 1, kinds
    assert E.STEP_FAILURE.value not in kinds
    succeeded = {step for kind, step in events if kind == E.STEP_SUCCESS.value}
    assert "plan_patch" in succeeded and len(succeeded) >= 5, succeeded
    # Nothing went to the default SQLite storage.
    assert not list(home.rglob("*.db")), list(home.rglob("*.db"))

    # The same user runs Dagster's schema migrations (the schema is current: nothing to do).
    migrate = subprocess.run(
        [str(BIN / "dagster"), "instance", "migrate"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert migrate.returncode == 0, migrate.stdout[-3000:] + migrate.stderr[-3000:]
    assert "Storage schema state after migration" in migrate.stdout
