"""Verify: post-execution checks on live data, sharing the invariants of validation: the live
rows hold what was committed, and every invariant still holds."""

from __future__ import annotations

from sqlalchemy.engine import Engine

from patch_ops import state
from patch_ops.execution import load_execution, run_concurrently
from patch_ops.patch import Patch
from patch_ops.steps.apply import find_conflicts
from patch_ops.steps.result import invariant_checks, invariant_problem


def verify_execution(
    engine: Engine,
    patch: Patch,
    execution_id: str,
    timeout_s: float | None = None,
    connections: int = 1,
) -> list[str]:
    """Post-execution checks on live data. Returns the problems (empty = verified).

    Up to ``connections`` of its queries run at once, each on its own connection."""
    with engine.connect() as conn:
        ex = load_execution(conn, execution_id)
    tables = state.reflect_tables(engine, ex["declaration"]["tables"])

    def live_differs() -> dict[str, list[int]]:
        with engine.connect() as conn:
            return find_conflicts(conn, engine, tables, ex, "stage", limit=20)

    checks = invariant_checks(engine, patch, execution_id, committed=True, timeout_s=timeout_s)
    mismatched, *found = run_concurrently([live_differs, *checks.calls], connections)
    problems = [
        f"{table}: live rows differ from what was committed, e.g. ids {ids}"
        for table, ids in mismatched.items()
    ]
    return problems + [invariant_problem(b, after_commit=True) for b in checks.broken(found)]
