"""A run that stops right after its commit: the record says the data changed, the next run
verifies it first, and the patch is not applied a second time."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import update

from patch_ops.database import get_engine
from patch_ops.execution import load_execution
from patch_ops.state import executions
from patch_ops.steps.backup import take_backup
from patch_ops.steps.commit import commit_execution
from patch_ops.steps.plan import plan_execution
from patch_ops.steps.transform import run_transform
from patch_ops.steps.validate import validate_execution
from resources.memory import MemoryGuard
from stockrx_patches.registry import default_registry
from tests.support.stockrx import failure_description, prices, run_patch, seeded

PRICE_JOB = "inventory_price_adjustment"
PCT8 = {"adjustment_type": "percentage", "adjustment_value": 8, "dry_run": False}


def commit_then_die(url: str) -> str:
    """The steps of a real run up to its commit, then nothing: as if the process was killed
    right after the commit (locks held, status running, no post-verification); its heartbeat
    is old, so the lock is stale for the next run."""
    engine = get_engine(url)
    registry = default_registry()
    patch, settings = registry.patches[PRICE_JOB], registry.settings(PRICE_JOB)
    config = patch.config_class(**PCT8)
    execution_id = plan_execution(engine, patch, settings, config)
    take_backup(engine, execution_id)
    run_transform(engine, patch, execution_id, MemoryGuard())
    assert validate_execution(engine, patch, settings, execution_id)[0]
    commit_execution(engine, execution_id)
    with engine.begin() as conn:
        conn.execute(
            update(executions)
            .where(executions.c.execution_id == execution_id)
            .values(heartbeat_at=dt.datetime(2000, 1, 1))
        )
    return execution_id


def test_a_run_killed_after_its_commit_is_verified_by_the_next_one_never_applied_twice(
    database_url: str,
) -> None:
    engine = seeded(database_url, items=60)
    before = prices(engine)
    crashed = commit_then_die(database_url)
    once = prices(engine)
    assert once != before
    with engine.connect() as conn:
        ex = load_execution(conn, crashed)
    assert (ex["status"], ex["phase"]) == ("running", "committed")

    # The next run's dry run releases the dead run's locks before it looks at the history: the
    # execution is unverified, not failed, and that run verifies it at once.
    assert run_patch(database_url, PRICE_JOB, {**PCT8, "dry_run": True}).success
    with engine.connect() as conn:
        ex = load_execution(conn, crashed)
    assert (ex["status"], ex["phase"]) == ("completed", "verified")

    # Its real run verifies the crashed execution first, then refuses to apply +8 % again.
    second = run_patch(database_url, PRICE_JOB, PCT8)
    assert not second.success
    assert "refused as a repeat" in failure_description(second)
    with engine.connect() as conn:
        ex = load_execution(conn, crashed)
    assert (ex["status"], ex["phase"]) == ("completed", "verified")
    assert prices(engine) == once
