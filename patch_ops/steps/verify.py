"""Verify: post-execution checks on live data, sharing the invariants of validation: the live
rows hold what was committed, and every invariant still holds.

The comparison with what was committed is a count of rows that differ and of rows still there
(``invariant_checks``): for the inserted rows always (in the pass of invariants over them, or
in one of its own), for the updated rows where invariants pass over them. Only when it finds a
difference does a second query name the rows."""

from __future__ import annotations

from typing import Any

from sqlalchemy import case, func, or_
from sqlalchemy.engine import Engine

from patch_ops import state
from patch_ops.dialects.functions import values_differ
from patch_ops.execution import load_execution, run_concurrently, written_tables
from patch_ops.patch import Patch
from patch_ops.steps.apply import find_conflicts
from patch_ops.steps.result import Aggregates, ResultView, invariant_checks, invariant_problem

MISMATCH_IDS = 20  # ids named per table whose live rows differ
#: The written rows of a table: (declaration key, ResultView method, committed report's count)
WRITTEN = (("updates", "updated", "updated"), ("inserts", "inserted", "inserted"))


def staged_differences(view: ResultView) -> Aggregates:
    """Per updated and per inserted table (``updates:<t>``, ``inserts:<t>``), over the rows it
    committed: how many are still there and how many hold a value other than the one committed
    in a column the patch wrote."""
    out: Aggregates = {}
    for kind, rows_of, _ in WRITTEN:
        for table, cols in view.declaration[kind].items():
            rows, live = getattr(view, rows_of)(table), view.tables[table]
            differs = or_(*[values_differ(rows.c[c], rows.c[f"dp_staged_{c}"], live.c[c])
                            for c in cols])
            out[f"{kind}:{table}"] = (rows, [func.count(), func.count(case((differs, 1)))])
    return out


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
    decl = ex["declaration"]
    tables = state.reflect_tables(engine, decl["tables"])
    committed = (ex["report"] or {}).get("committed") or {}

    def live_differs(updates: dict[str, Any], inserts: dict[str, Any]) -> dict[str, list[int]]:
        part = dict(ex, declaration={**decl, "updates": updates, "inserts": inserts})
        with engine.connect() as conn:
            return find_conflicts(conn, engine, tables, part, "stage", limit=MISMATCH_IDS)

    # The updated rows' counts only where invariants pass over the same rows: else
    # find_conflicts's own query is cheaper (it needs no join to the backup). The inserted
    # rows' always: find_conflicts's ORDER BY ... LIMIT over them walks the stage's key and
    # probes the live rows one by one (a nested loop over every row when none differs)
    checks = invariant_checks(
        engine, patch, execution_id, committed=True, timeout_s=timeout_s,
        aggregates=staged_differences, shared_only=[f"updates:{t}" for t in decl["updates"]],
        join_passes=True,  # nothing here waits on one pass's aggregates
        beside=connections > 1,
    )
    on_own = {kind: {t: c for t, c in decl[kind].items() if f"{kind}:{t}" not in checks.aggregates}
              for kind, _, _ in WRITTEN}
    separate, *found = run_concurrently(
        [lambda: live_differs(on_own["updates"], on_own["inserts"]), *checks.calls], connections
    )
    # per table as find_conflicts lists them: the updated rows' ids, then the inserted rows'
    shared: dict[str, dict[str, list[int]]] = {}
    for kind, _, count in WRITTEN:
        shared[kind] = {}
        for table, cols in decl[kind].items():
            if table in on_own[kind]:
                continue
            row = checks.aggregates[f"{kind}:{table}"].result()  # None: its pass timed out
            expected = committed.get(f"{table}_{count}")
            if row is None or expected is None or row[0] != expected or row[1]:
                args = ({table: cols}, {}) if kind == "updates" else ({}, {table: cols})
                shared[kind].update(live_differs(*args))
    mismatched = {
        table: ids
        for table in written_tables(decl)
        if (ids := shared["updates"].get(table, []) + separate.get(table, [])
            + shared["inserts"].get(table, []))
    }
    problems = [
        f"{table}: live rows differ from what was committed, e.g. ids {mismatched[table]}"
        for table in written_tables(decl)
        if table in mismatched
    ]
    return problems + [invariant_problem(b, after_commit=True) for b in checks.broken(found)]
