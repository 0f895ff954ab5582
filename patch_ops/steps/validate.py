"""Validate: whole-set checks on the would-be result before anything reaches live tables.

The failure ratio of the batch rejects, the patch's invariants, and a trial apply (the staged
changes applied in a transaction that is always rolled back, so the database's own rules judge
them), run at once on their own connections beside the impact report. A refused trial apply
names the driving rows the database refuses and, where the patch's ``on_refused_rows`` says
``hold_back``, holds them back and checks the rest again (``steps.holdback``).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

from sqlalchemy.engine import Engine

from patch_ops import state
from patch_ops.database import write_transaction
from patch_ops.execution import (
    PatchError,
    load_execution,
    run_concurrently,
    set_execution,
    utcnow,
)
from patch_ops.patch import FAIL, Patch, PatchSettings
from patch_ops.steps.holdback import (
    Refusal,
    approved_refusals,
    digest,
    find_refused,
    held_back_count,
    held_back_rows,
    hold_back,
    name_refused,
)
from patch_ops.steps.report import (
    approved_edges,
    build_report,
    reject_sample,
    render_markdown,
    report_aggregates,
    report_sections,
)
from patch_ops.steps.result import SAMPLE_ROWS, invariant_checks, invariant_problem
from patch_ops.steps.trial import Trial, sliced_trial


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
    approver = approving_dry_run(ex)
    held: dict[str, Any] = {}
    if approver:
        # The approval covers the rows its dry run held back: the same ones are held back here.
        # Its dry run passed the trial apply on the same plan without them, and the commit is
        # one all-or-nothing transaction: a new refusal there changes nothing and is named
        # (drift). Applying everything twice would double the cost of the commit.
        held = hold_back_as_approved(engine, execution_id, approver, log)
    tried, broken, report, sections, rejects = run_checks(
        engine, patch, settings, ex, trial=not approver
    )
    refusal = tried.refusal if tried is not None else None
    trial = (f"skipped: approving dry run {approver} passed it on the same plan" if tried is None
             else tried.describe())
    refused = None
    if refusal is not None:
        held, refused = settle_refusal(engine, settings, ex, refusal, log)
        if not refused:
            trial = f"passed with {held['count']:,} driving row(s) held back"
            _, broken, report, sections, rejects = run_checks(
                engine, patch, settings, ex, trial=False
            )
    if not held and not refused:
        held = earlier_hold_back(engine, settings, ex)
    problems += [invariant_problem(b) for b in broken]
    if refused:
        problems.append(refused)
    report["sections"] = sections
    report["held_back"] = held or None
    # What a refusal at commit may spend naming the rows (the commit has no settings of its own)
    report["refusal_search"] = {
        "budget_seconds": settings.refusal_search_seconds,
        "attempt_seconds": settings.refusal_attempt_seconds,
        "limit": max(allowed_held_back(settings, ex), SAMPLE_ROWS),
        "chunk": settings.trial_slice_rows,
        "chunk_seconds": settings.trial_slice_seconds,
    }
    report["validation"] = {
        "passed": not problems,
        "problems": problems,
        "invariants": broken,
        "database_refusal": refusal.reason if refusal is not None and problems else None,
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


def approving_dry_run(ex: dict[str, Any]) -> str | None:
    """The dry run whose plan approved real run ``ex`` (None: a dry run, or not approved)."""
    return None if ex["dry_run"] else ex.get("approved_by_execution_id")


def run_checks(
    engine: Engine, patch: Patch, settings: PatchSettings, ex: dict[str, Any], trial: bool
) -> tuple[Trial | None, list[dict[str, Any]], dict[str, Any], dict[str, Any], list[Any]]:
    """The checks of the would-be result, at once on their own connections: (the trial apply
    if ``trial``, the broken invariants, the impact report, its sections, the reject sample).
    The invariants' passes compute the report's counts and sums over the same rows; in a real
    run that a dry run approved, also its histograms' counts over the dry run's bucket edges
    (kept when they are this run's too): no bucketing pass after them. The pass over the
    updated rows is not made in the longer one over their join with the grouped log rows
    (``join_passes``): on two connections, the two at once end sooner (benchmarks/README.md)."""
    execution_id = ex["execution_id"]
    approver = approving_dry_run(ex)
    edges = approved_edges(engine, approver)
    trials = [functools.partial(trial_apply, engine, settings, execution_id)] if trial else []
    checks = invariant_checks(
        engine, patch, execution_id, committed=False, timeout_s=settings.query_timeout_seconds,
        aggregates=functools.partial(report_aggregates, edges=edges),
        beside=settings.check_connections > 1,
    )
    results = run_concurrently(
        [
            *trials,  # first: the longest
            *checks.calls,
            functools.partial(report_sections, engine, patch, ex),
            functools.partial(reject_sample, engine, execution_id),
            # last: it waits for its aggregates from the passes above, started before it
            functools.partial(build_report, engine, execution_id, checks.aggregates, edges),
        ],
        settings.check_connections,
    )
    tried = results.pop(0) if trial else None
    n = len(checks.calls)
    sections, rejects, report = results[n:]
    return tried, checks.broken(results[:n]), report, sections, rejects


def trial_apply(engine: Engine, settings: PatchSettings, execution_id: str) -> Trial:
    """Apply the staged changes in transactions that are always rolled back, so the database's
    own rules (CHECK, NOT NULL, unique and foreign keys, triggers: also those of columns and
    constraints the patch does not know) judge them before commit: in slices that each hold
    their row locks about ``trial_slice_seconds`` (``patch_ops.steps.trial``), so the application's
    writes wait for one slice, not for the whole stage.

    Inserted rows get ids ``-dp_seq`` here: no sequence value is used up and no id can collide
    with a row the application inserts meanwhile.
    """
    with engine.connect() as conn:
        ex = load_execution(conn, execution_id)
    tables = state.reflect_tables(engine, ex["declaration"]["tables"])
    return sliced_trial(engine, tables, ex, settings.trial_slice_rows, settings.trial_slice_seconds)


def allowed_held_back(settings: PatchSettings, ex: dict[str, Any]) -> int:
    """How many driving rows may be held back: ``max_held_back_percent`` of the targets."""
    return math.floor(int(ex["target_count"]) * settings.max_held_back_percent / 100 + 1e-9)


def settle_refusal(
    engine: Engine, settings: PatchSettings, ex: dict[str, Any], refusal: Refusal, log: Any
) -> tuple[dict[str, Any], str | None]:
    """The trial apply was refused: find the driving rows, then hold them back (the rest passes
    a trial apply again) or say why not. Returns (the report's held_back section, problem)."""
    execution_id, policy = ex["execution_id"], settings.refused_rows_policy()
    allowed = allowed_held_back(settings, ex)
    found = find_refused(
        engine, execution_id, refusal, limit=max(allowed, SAMPLE_ROWS),
        budget_seconds=settings.refusal_search_seconds,
        attempt_seconds=settings.refusal_attempt_seconds, chunk=settings.trial_slice_rows,
        chunk_seconds=settings.trial_slice_seconds,
    )
    with engine.connect() as conn:
        sample, named, rows = name_refused(conn, engine, ex, found.refused, found.at_least)
    count = max(len(found.refused), found.at_least)
    total = int(ex["target_count"])
    info: dict[str, Any] = {
        "policy": policy, "count": 0, "refused": count, "targets": total,
        "max_percent": settings.max_held_back_percent, "sample": sample,
        "search": found.summary(),
    }
    head = "the database would refuse the changes"
    if not found.refused and found.complete:
        return info, (f"{head}: {refusal.reason} (no single driving row is refused on its own: "
                      "the refusal comes from several together)")
    if not found.complete and not found.stopped.startswith("more than"):  # type: ignore[union-attr]
        return info, (f"{head}: {refusal.reason}; the search for the rows stopped "
                      f"({found.stopped}) having found {named}; {rows}")
    if policy == FAIL:
        return info, f"{head}: {named} (on_refused_rows: fail; nothing committed); {rows}"
    if count > allowed:
        return info, (f"{head}: {named}, more than max_held_back_percent "
                      f"({settings.max_held_back_percent:g} % of {total:,}: {allowed:,} rows), "
                      f"so nothing is held back or committed; {rows}")
    hold_back(engine, execution_id, found.refused)
    again = trial_apply(engine, settings, execution_id).refusal
    if again is not None:
        return info, (f"{head}: {again.reason} (also without the {named}; {rows})")
    info.update(held_back_section(engine, execution_id, settings, total))
    info["search"] = found.summary()
    log.warning(
        f"held back {named} (on_refused_rows: hold_back); the rest passes; "
        f"`stockrx-patches held {execution_id}` lists them, the next run retries them; {rows}"
    )
    return info, None


def hold_back_as_approved(
    engine: Engine, execution_id: str, approver: str, log: Any
) -> dict[str, Any]:
    """A real run holds back exactly the rows its approving dry run held back."""
    with engine.connect() as conn:
        refused = approved_refusals(conn, approver)
        done = held_back_count(conn, execution_id)
    if not refused:
        return {}
    if not done:  # not already (a re-executed validation)
        hold_back(engine, execution_id, refused)
    with engine.connect() as conn:
        ex = load_execution(conn, execution_id)
    info = held_back_section(engine, execution_id, None, int(ex["target_count"]))
    info.update(policy="as approved", approved_by=approver)
    log.warning(f"held back the {info['count']:,} driving row(s) approving dry run {approver} "
                f"held back; `stockrx-patches held {execution_id}` lists them")
    return info


def earlier_hold_back(engine: Engine, settings: PatchSettings, ex: dict[str, Any]) -> dict[str, Any]:
    """The rows an earlier attempt of this validation held back (it is re-executed), if any:
    they are out of the stage, so this attempt's trial apply passed without them."""
    with engine.connect() as conn:
        if not held_back_count(conn, ex["execution_id"]):
            return {}
    return held_back_section(engine, ex["execution_id"], settings, int(ex["target_count"]))


def held_back_section(
    engine: Engine, execution_id: str, settings: PatchSettings | None, total: int
) -> dict[str, Any]:
    """What the report says of the rows an execution held back (from data_patch_rejects)."""
    with engine.connect() as conn:
        count = held_back_count(conn, execution_id)
        sample = held_back_rows(conn, execution_id, limit=SAMPLE_ROWS)
        ids = [r["source_id"] for r in held_back_rows(conn, execution_id)]
    out: dict[str, Any] = {
        "count": count, "targets": total, "percent": round(100 * count / max(total, 1), 2),
        "sample": sample, "sha256": digest(ids), "list": f"stockrx-patches held {execution_id}",
    }
    if settings is not None:
        out["max_percent"] = settings.max_held_back_percent
    return out
