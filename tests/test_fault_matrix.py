"""The fault matrix: a real run killed with SIGKILL at every op boundary, at the first, a middle
and the last transform batch, inside the commit transaction and right after it, and inside a
restore, on SQLite, PostgreSQL and MariaDB.

Each case stops the run exactly at its failpoint (patch_ops/failpoints.py) in a forked child
process and kills it there (no cleanup code runs). Then:

- the live tables are exactly as before the run or exactly as a completed run leaves them;
- the history says which (the execution's phase is committed/verified iff the data changed);
- ``audit verify`` passes (the commit's audit event is in the data's transaction);
- the documented recovery completes: the next run of the patch (it releases the dead run's
  locks as stale, verifies a committed execution, refuses to apply it again) or, for a
  restore, the restore again;
- after it the data is exactly as one application leaves it: never applied twice.

The matrix (cases x databases, pass/fail) is printed at the end of the test session.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from patch_ops.state import executions
from patch_ops.steps import locks as lock_rules
from stockrx_patches.cli import main as cli_main
from tests.support.faults import ITEMS, OP, FaultPrice, patch_run, restore_run, run_and_kill
from tests.support.mysql import MySQLServer
from tests.support.postgres import PostgresServer
from tests.support.stockrx import digest as full_digest
from tests.support.stockrx import (
    failure_description,
    latest_execution,
    seeded,
)

pytestmark = pytest.mark.faults


PATCH_POINTS = [
    f"after:{OP}plan_patch",
    f"after:{OP}take_backup",
    "transform:batch:1",
    "transform:batch:2",
    "transform:batch:4",
    f"after:{OP}transform_batches",
    f"after:{OP}validate_changes",
    "commit:inside",
    "commit:after",
    f"after:{OP}commit_changes",
]
RESTORE_POINTS = ["restore:inside", "after:apply_restore"]
BACKENDS = [
    "sqlite",
    pytest.param("postgres", marks=pytest.mark.postgres),
    pytest.param("mariadb", marks=pytest.mark.mysql),
]
#: Digests before and after one application of the patch, per backend (same seed). Left out:
#: the timestamps a run writes (its own start time) and the ids (a commit killed inside its
#: transaction used up sequence / AUTO_INCREMENT values: the new log rows' ids come after).
REFERENCE: dict[str, tuple[dict[str, str], dict[str, str]]] = {}


def digest(engine: Any) -> dict[str, str]:
    return full_digest(engine, ignore=("id", "created_at", "updated_at"))


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def new_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """A factory of fresh databases of the backend (dropped at the end)."""
    made: list[str] = []
    server: PostgresServer | MySQLServer | None = None
    if backend == "postgres":
        server = request.getfixturevalue("pg_server")
    elif backend == "mariadb":
        server = request.getfixturevalue("mysql_server")

    def make() -> str:
        if server is None:
            url = f"sqlite:///{tmp_path / f'stockrx{len(made)}.sqlite'}"
        else:
            url = server.create_database()
        made.append(url)
        return url

    yield make
    if server is not None:
        for url in made:
            server.drop_database(url)


@pytest.fixture
def grace_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    """A killed run's locks are stale as soon as its process is gone (default grace: 120 s)."""
    monkeypatch.setattr(lock_rules, "LOCK_PID_GRACE_SECONDS", 0.0)


def reference(backend: str, new_url: Any) -> tuple[dict[str, str], dict[str, str]]:
    if backend not in REFERENCE:
        url = new_url()
        engine = seeded(url, items=ITEMS)
        before = digest(engine)
        result = patch_run(url)
        assert result.success, failure_description(result)
        REFERENCE[backend] = (before, digest(engine))
    return REFERENCE[backend]


def start_case(backend: str, new_url: Any, case: str, record_property: Any) -> tuple[Any, ...]:
    """Name the case for the printed matrix; (before, after digests, url, engine) of a freshly
    seeded database."""
    record_property("fault_case", f"{backend}|{case}")
    before, after = reference(backend, new_url)
    url = new_url()
    engine = seeded(url, items=ITEMS)
    assert digest(engine) == before
    return before, after, url, engine


def audit_verifies(url: str) -> bool:
    return cli_main(["audit", "verify", "--database-url", url]) == 0


@pytest.mark.parametrize("point", PATCH_POINTS)
def test_a_patch_killed_at(point, backend, new_url, tmp_path, grace_zero, record_property):
    case = f"{PATCH_POINTS.index(point) + 1:02d} patch killed at {point.replace(OP, '')}"
    before, after, url, engine = start_case(backend, new_url, case, record_property)

    run_and_kill(url, point, tmp_path)
    now = digest(engine)
    assert now in (before, after), "half-applied"
    killed = latest_execution(engine, FaultPrice.name)
    committed = killed["phase"] in ("committed", "verified")
    assert committed == (now == after), f"the history says {killed['phase']}"
    assert audit_verifies(url)

    recovery = patch_run(url)  # the next run
    if committed:  # it verifies the killed execution, then refuses to apply the patch again
        assert "refused as a repeat" in failure_description(recovery)
    else:  # it releases the dead run's locks and applies the patch
        assert recovery.success, failure_description(recovery)
    assert digest(engine) == after  # exactly one application
    with engine.connect() as conn:
        closed = conn.execute(
            select(executions.c.status, executions.c.phase)
            .where(executions.c.execution_id == killed["execution_id"])
        ).one()
    expected = ("completed", "verified") if committed else ("failed", "abandoned")
    assert tuple(closed) == expected
    assert audit_verifies(url)


@pytest.mark.parametrize("point", RESTORE_POINTS)
def test_a_restore_killed_at(point, backend, new_url, tmp_path, grace_zero, record_property):
    case = f"{len(PATCH_POINTS) + RESTORE_POINTS.index(point) + 1:02d} restore killed at {point}"
    before, after, url, engine = start_case(backend, new_url, case, record_property)
    applied = patch_run(url)
    assert applied.success, failure_description(applied)
    assert digest(engine) == after
    execution_id = str(latest_execution(engine, FaultPrice.name)["execution_id"])

    run_and_kill(url, point, tmp_path, restore_of=execution_id)
    assert digest(engine) in (before, after), "half-restored"
    assert audit_verifies(url)

    again = restore_run(url, execution_id)  # the documented recovery: restore again
    assert again.success or "already restored" in failure_description(again), (
        failure_description(again))
    assert digest(engine) == before
    assert audit_verifies(url)
