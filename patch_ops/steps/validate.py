"""Validate: whole-set checks on the would-be result before anything reaches live tables.

The failure ratio of the batch rejects, the patch's invariants, and a trial apply (the staged
changes applied in a transaction that is always rolled back, so the database's own rules judge
them), run at once on their own connections beside the impact report.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from sqlalchemy.engine import Engine

from patch_ops import state
from patch_ops.database import write_transaction
from patch_ops.dialects import dialect_of
from patch_ops.execution import (
    DatabaseRefused,
    PatchError,
    load_execution,
    run_concurrently,
    set_execution,
    utcnow,
)
from patch_ops.patch import Patch, PatchSettings
from patch_ops.steps.apply import apply_staged
from patch_ops.steps.report import build_report, reject_sample, render_markdown, report_sections
from patch_ops.steps.result import invariant_checks, invariant_problem


def validate_execution(
    engine: Engine,
    patch: Patch,
    settings: PatchSettings,
    execution_id: str,
    log: Any = None,
) -> tuple[bool, dict[str, Any]]:
    """Whole-set checks on the would-be result; build the impact report. Returns (passed, report)."""
    log = log or logging.getLogger(__name__)
    with engine.connect() as conn:
        ex = load_execution(conn, execution_id)
    if ex["phase"] not in ("transformed", "validated"):
        raise PatchError(f"execution {execution_id} is in phase {ex['phase']}, not transformed")
    ratio_allowed = (
        settings.max_failure_ratio
        if settings.max_failure_ratio is not None
        else patch.max_failure_ratio
    )
    total = max(int(ex["target_count"]), 1)
    failed = int(ex["failed_records"])
    problems: list[str] = []
    if failed and failed / total > ratio_allowed:
        problems.append(
            f"{failed:,} of {total:,} rows ({failed / total:.1%}) failed validation "
            f"(allowed: {ratio_allowed:.1%})"
        )
    approver = None if ex["dry_run"] else ex.get("approved_by_execution_id")
    # Its approving dry run passed the trial apply on the same plan (patch code, config, target
    # set), and the commit is one all-or-nothing transaction: a refusal there still changes
    # nothing. Applying everything twice would double the cost of the commit.
    trials = [] if approver else [functools.partial(trial_apply, engine, execution_id)]
    checks = invariant_checks(
        engine, patch, execution_id, committed=False, timeout_s=settings.query_timeout_seconds
    )
    # Read-only queries on their own connections, beside the trial (first: the longest)
    results = run_concurrently(
        [
            *trials,
            *checks,
            functools.partial(build_report, engine, execution_id),
            functools.partial(report_sections, engine, patch, ex),
            functools.partial(reject_sample, engine, execution_id),
        ],
        settings.check_connections,
    )
    refusal = results.pop(0) if trials else None
    broken = [b for b in results[: len(checks)] if b is not None]
    report, sections, rejects = results[len(checks) :]
    problems += [invariant_problem(b) for b in broken]
    if refusal:
        problems.append(f"the database would refuse the changes: {refusal}")
    if approver:
        trial = f"skipped: approving dry run {approver} passed it on the same plan"
    else:
        trial = "refused" if refusal else "passed"
    report["sections"] = sections
    report["validation"] = {
        "passed": not problems,
        "problems": problems,
        "invariants": broken,
        "database_refusal": refusal,
        "trial_apply": trial,
        "rejects": rejects,
    }
    markdown = render_markdown(ex, report)
    with write_transaction(engine) as conn:
        merged = dict(ex["report"] or {})
        merged.update(report)
        set_execution(
            conn,
            execution_id,
            phase="validated",
            report=merged,
            report_markdown=markdown,
            heartbeat_at=utcnow(),
        )
    return not problems, merged


def trial_apply(engine: Engine, execution_id: str) -> str | None:
    """Apply the staged changes in a transaction that is always rolled back, so the database's
    own rules (CHECK, NOT NULL, unique and foreign keys, triggers: also those of columns and
    constraints the patch does not know) judge them before commit. Returns the refusal or None.

    Inserted rows get ids ``-dp_seq`` here: no sequence value is used up and no id can collide
    with a row the application inserts meanwhile.
    """
    with engine.connect() as conn:
        decl = load_execution(conn, execution_id)["declaration"]
    tables = state.reflect_tables(engine, decl["tables"])
    with engine.connect() as conn:
        conn.execution_options(sqlite_begin="IMMEDIATE")
        trans = conn.begin()
        try:
            apply_staged(conn, engine, tables, execution_id, decl, trial=True)
            dialect_of(conn).check_deferred_constraints(conn)  # deferred FKs too
        except DatabaseRefused as exc:
            return str(exc)
        finally:
            trans.rollback()
    return None

