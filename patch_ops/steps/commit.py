"""Commit: one transaction that locks the rows, refuses on rows the application changed since
the backup, applies the stage to the live tables and records the execution as committed.

A refusal by the database here rolls the whole commit back; only then, outside it, trial
applies name the driving rows it refused (``steps.holdback``): a refusal validation did not see
(rows it held back are out of the stage) is drift, and the run fails, never commits in part."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Connection, Engine

from patch_ops import state
from patch_ops.database import write_transaction
from patch_ops.execution import (
    CommitConflict,
    DatabaseRefused,
    PatchError,
    load_execution,
    set_execution,
    utcnow,
)
from patch_ops.steps.apply import apply_staged, find_conflicts, lock_target_rows
from patch_ops.steps.holdback import Refusal, find_refused, name_refused


def commit_execution(
    engine: Engine,
    execution_id: str,
    log: Any = None,
    on_committed: Callable[[Connection, dict[str, int]], None] | None = None,
) -> dict[str, int]:
    """Apply the staged changes to the live tables in one transaction, refusing on conflicts.

    The transaction is the *commit unit*: the data, the execution's committed phase and
    ``on_committed(conn, counts)`` (the audit event) commit together or not at all."""
    log = log or logging.getLogger(__name__)
    with engine.connect() as conn:
        ex = load_execution(conn, execution_id)
    if ex["dry_run"]:
        raise PatchError("refusing to commit a dry run")  # safety rule 1, belt and braces
    if ex["phase"] in ("committed", "verified"):
        log.info(f"execution {execution_id} already committed")
        return ex["report"].get("committed", {})
    if ex["phase"] != "validated" or not (ex["report"] or {}).get("validation", {}).get("passed"):
        raise PatchError(f"execution {execution_id} has not passed validation; not committing")
    decl = ex["declaration"]
    tables = state.reflect_tables(engine, decl["tables"])
    try:
        counts = _commit(engine, ex, tables, on_committed)
    except DatabaseRefused as exc:  # rolled back: nothing was committed
        raise name_commit_refusal(engine, ex, exc) from None
    log.info("committed: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    return counts


def _commit(
    engine: Engine,
    ex: dict[str, Any],
    tables: Any,
    on_committed: Callable[[Connection, dict[str, int]], None] | None,
) -> dict[str, int]:
    execution_id, decl = ex["execution_id"], ex["declaration"]
    with write_transaction(engine) as conn:
        lock_target_rows(conn, tables, execution_id, decl)
        conflicts = find_conflicts(conn, engine, tables, ex, "backup", limit=1000)
        if conflicts:
            desc = "; ".join(
                f"{t}: {len(ids)}{'+' if len(ids) >= 1000 else ''} row(s), ids {ids[:20]}"
                for t, ids in conflicts.items()
            )
            raise CommitConflict(
                "the application changed rows after the backup; nothing was committed "
                f"(re-run the patch to plan again): {desc}",
                {"conflicts": conflicts},
            )
        offsets: dict[str, int] = {}
        counts = apply_staged(conn, engine, tables, execution_id, decl, id_offsets=offsets)
        report = dict(ex["report"] or {})
        report["committed"] = counts
        report["insert_id_offsets"] = offsets
        set_execution(conn, execution_id, phase="committed", report=report, heartbeat_at=utcnow())
        if on_committed is not None:
            on_committed(conn, counts)
    return counts


def name_commit_refusal(engine: Engine, ex: dict[str, Any], exc: DatabaseRefused) -> PatchError:
    """After a refused commit (rolled back): the driving rows the database refuses, found by
    trial applies outside the commit, in the report and in the error returned."""
    execution_id = ex["execution_id"]
    limits = (ex["report"] or {}).get("refusal_search") or {}
    found = find_refused(
        engine, execution_id, Refusal(str(exc), str(exc.details.get("table", ""))),
        limit=int(limits.get("limit", 10)), budget_seconds=float(limits.get("budget_seconds", 300)),
        attempt_seconds=limits.get("attempt_seconds"), chunk=limits.get("chunk"),
        chunk_seconds=float(limits.get("chunk_seconds", 0.0)),
    )
    with engine.connect() as conn:
        sample, named, rows = name_refused(conn, engine, ex, found.refused, found.at_least)
    if found.refused:
        named = f"{named}; {rows}"
    else:
        named = f"{exc}; no single driving row named ({found.stopped or 'refused only together'})"
    message = (
        "the database refused the commit, nothing was committed: a refusal its validation did "
        f"not see (drift since the trial apply): {named}"
    )
    with write_transaction(engine) as conn:
        report = dict(load_execution(conn, execution_id)["report"] or {})
        report["commit_refusal"] = {"refusal": str(exc), "sample": sample,
                                    "search": found.summary()}
        set_execution(conn, execution_id, report=report)
    return DatabaseRefused(message, {"sample": sample})
