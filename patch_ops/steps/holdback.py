"""Rows the database would refuse: find the driving rows whose changes it refuses, name them,
and hold them back so the rest can be committed.

When a trial apply is refused (a CHECK, NOT NULL, foreign key or unique constraint, a trigger:
also those the patch does not know), ``find_refused`` bisects the staged driving rows, knowing
nothing of the constraint: first in ranges of driving rows sized as the trial's slices (the
patch's ``trial_slice_rows`` and ``trial_slice_seconds``), then halving the refused ones. Each
*attempt* applies the changes of one range of driving rows on the live tables in a transaction
of its own that is always rolled back, every statement bounded by ``attempt_seconds`` (the
statement timeout, which also ends a lock wait), so no attempt holds row locks longer than that,
nor more rows than a range, and the application waits between attempts, never for the whole
search. One transaction per attempt rather than savepoints in one long transaction: InnoDB
keeps the row locks a rolled-back savepoint took until the transaction ends, so a search in one
transaction would hold every row it touched until its end. ``budget_seconds`` bounds the whole
search; ``limit`` stops it once more driving rows are refused than may be held back.

Held-back driving rows are rejected exactly like the rows the pandera schemas reject (a row of
``data_patch_rejects`` each, ``check_name`` ``HELD_BACK``, with the refusal and the row's
before → after values) and their changes leave the stage, so the rest is validated and committed
without them. A held-back row is left as it was: the patch's next run selects it again.
"""

from __future__ import annotations

import hashlib
import struct
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, insert, select, union
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from patch_ops import state
from patch_ops.database import write_transaction
from patch_ops.dialects import dialect_of
from patch_ops.execution import (
    HELD_BACK,
    DatabaseRefused,
    jsonable,
    load_execution,
    set_execution,
    utcnow,
)
from patch_ops.patch import Tables
from patch_ops.state import BACKUP, INSERT, UPDATE, rejects
from patch_ops.steps.apply import SeqRanges, apply_staged
from patch_ops.steps.batching import BatchSizer
from patch_ops.work_rows import WorkRows, distinct_tables, work_rows

#: Driving rows named (with their values) in reports and failure messages.
SAMPLE = 10
#: Ids per ``IN (...)`` list when rows are described, rejected or removed from the stage.
CHUNK = 500


@dataclass(frozen=True)
class Refusal:
    """Why the database refused an attempt: its message and the table it refused."""

    reason: str
    table: str


class AttemptStopped(Exception):
    """An attempt could not say yes or no (it ran past its time limit, or a lock wait ended)."""


@dataclass
class SearchResult:
    """What the search found: ``refused`` (driving row id → refusal), complete or not."""

    refused: dict[int, Refusal] = field(default_factory=dict)
    attempts: int = 0
    complete: bool = True
    #: Driving rows refused at least (``len(refused)`` when complete; more when stopped early).
    at_least: int = 0
    stopped: str | None = None
    #: Longest time one attempt held its transaction (its row locks), and the whole search.
    longest_attempt_seconds: float = 0.0
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "attempts": self.attempts,
            "complete": self.complete,
            "at_least": self.at_least,
            "stopped": self.stopped,
            "longest_attempt_seconds": round(self.longest_attempt_seconds, 4),
            "seconds": round(self.seconds, 3),
            "method": "bisection by trial applies on the live tables, one rolled-back "
            "transaction per attempt",
        }


#: An attempt: apply the changes of driving rows ``ids[i..j]``; the refusal, or None.
Probe = Callable[[int, int], Refusal | None]


def bisect(
    n: int,
    probe: Probe,
    first: Refusal,
    limit: int | None = None,
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    sample: int = SAMPLE,
    chunks: BatchSizer | None = None,
) -> tuple[dict[int, Refusal], int, str | None, int]:
    """Find the refused items among ``n`` (indexes 0..n-1), all of them refused together with
    ``first``. Level by level: a refused range is halved and its left half tried; a clean left
    half means the right one is refused (not tried), a refused one that the right one is tried
    too. A single item is always tried on its own before it is named (a refusal that needs two
    items together names neither, and the caller's check of the rest finds it).

    About 1.5 log2(n) attempts for one refused item, k times that for k. Stops once more than
    ``limit`` items are known to be refused (disjoint refused ranges count one each; then up to
    ``sample`` of them are named, one per range) or at ``deadline``. ``chunks``: the items are
    first tried in consecutive ranges sized by it (by the time each took), and only the refused
    ones are halved (``first`` is then not used). Returns (index → refusal, attempts, why it
    stopped or None, refused at least).
    """
    found: dict[int, Refusal] = {}
    attempts = 0
    level: list[tuple[int, int, Refusal | None]] = [(0, n - 1, first)] if n else []

    def tried(i: int, j: int) -> Refusal | None:
        nonlocal attempts
        if deadline is not None and clock() > deadline:
            raise AttemptStopped("the search's time budget was spent")
        attempts += 1
        return probe(i, j)

    def one_of(i: int, j: int, refusal: Refusal | None) -> None:
        """Name one refused item of the refused range i..j (depth first)."""
        while i < j:
            mid = (i + j) // 2
            left = tried(i, mid)
            i, j, refusal = (i, mid, left) if left is not None else (mid + 1, j, None)
        refusal = refusal or tried(i, i)
        if refusal is not None:
            found[i] = refusal

    try:
        if chunks is not None and n > chunks.size:
            level, i = [], 0
            while i < n:
                j, started = min(i + chunks.size, n) - 1, clock()
                if (refusal := tried(i, j)) is not None:
                    level.append((i, j, refusal))
                chunks.record(j - i + 1, clock() - started)
                i = j + 1
        while level:
            following: list[tuple[int, int, Refusal | None]] = []
            for done, (i, j, refusal) in enumerate(level):
                known = len(found) + len(following) + len(level) - done
                if limit is not None and known > limit:
                    for pending in [*following, *level[done:]][: max(sample - len(found), 0)]:
                        one_of(*pending)
                    return found, attempts, f"more than {limit:,} refused", known
                if i == j:
                    if refusal is None:
                        refusal = tried(i, i)
                    if refusal is not None:
                        found[i] = refusal
                    continue
                mid = (i + j) // 2
                left = tried(i, mid)
                if left is None:
                    following.append((mid + 1, j, None))
                    continue
                following.append((i, mid, left))
                right = tried(mid + 1, j)
                if right is not None:
                    following.append((mid + 1, j, right))
            level = following
    except AttemptStopped as exc:
        return found, attempts, str(exc), len(found) + len(level)
    return found, attempts, None, len(found)


def staged_rows(engine: Engine, tables: Tables, ex: dict[str, Any]) -> list[WorkRows]:
    """An execution's staged updates and inserts, of every table it writes."""
    decl = ex["declaration"]
    return [work_rows(engine, tables[t], ex["execution_id"], action)
            for action, written in ((UPDATE, decl["updates"]), (INSERT, decl["inserts"]))
            for t in written]


def index_sources(engine: Engine, tables: Tables, ex: dict[str, Any]) -> None:
    """The stage's index by driving row (``state.ensure_source_index``), made if the transform
    dropped it: every attempt below picks a range of driving rows, and the hold-back deletes by
    them. Before any transaction of the caller (DDL commits on MySQL)."""
    for stage in distinct_tables(staged_rows(engine, tables, ex)):
        state.ensure_source_index(engine, stage)


def source_ids(conn: Connection, engine: Engine, tables: Tables, ex: dict[str, Any]) -> array:
    """The distinct driving row ids of an execution's staged changes, ascending (8 bytes each)."""
    parts = [
        select(st.c.dp_source_id.label("s")).where(st.mine, st.c.dp_source_id.is_not(None))
        for st in staged_rows(engine, tables, ex)
    ]
    ids = array("q")
    if not parts:
        return ids
    sub = union(*parts).subquery()
    result = conn.execute(
        select(sub.c.s).order_by(sub.c.s), execution_options={"yield_per": 10_000}
    )
    for chunk in result.partitions():
        ids.extend(int(r[0]) for r in chunk)
    return ids


def trial_attempt(
    engine: Engine,
    tables: Tables,
    ex: dict[str, Any],
    sources: tuple[int, int] | None = None,
    limit_s: float | None = None,
    seqs: SeqRanges | None = None,
) -> tuple[Refusal | None, float]:
    """Apply the staged changes (of driving rows ``sources``, inclusive, or the stage rows in
    the ``seqs`` ranges; None: all) in a transaction that is always rolled back. Returns (the
    refusal or None, seconds the transaction was open). Raises ``AttemptStopped`` when a
    statement ran past ``limit_s``."""
    dialect = dialect_of(engine)
    with engine.connect() as conn:
        conn.execution_options(sqlite_begin="IMMEDIATE")
        opened = time.perf_counter()
        trans = conn.begin()
        try:
            if limit_s and dialect.features.statement_timeout:
                dialect.set_statement_timeout(conn, limit_s)
            apply_staged(
                conn, engine, tables, ex["execution_id"], ex["declaration"], trial=True,
                sources=sources, seqs=seqs,
            )
            dialect.check_deferred_constraints(conn)  # deferred FKs too
        except DatabaseRefused as exc:
            return Refusal(str(exc), str(exc.details.get("table", ""))), _close(trans, opened)
        except DBAPIError as exc:
            if dialect.is_statement_timeout(exc) or dialect.is_lock_timeout(exc):
                _close(trans, opened)
                raise AttemptStopped(
                    f"an attempt ran longer than {limit_s:g} s (refusal_attempt_seconds) or "
                    "waited for rows the application holds"
                ) from None
            raise
        finally:
            if trans.is_active:
                trans.rollback()
        return None, _close(trans, opened)


def _close(trans: Any, opened: float) -> float:
    if trans.is_active:
        trans.rollback()
    return time.perf_counter() - opened


def find_refused(
    engine: Engine,
    execution_id: str,
    first: Refusal,
    limit: int | None,
    budget_seconds: float,
    attempt_seconds: float | None,
    chunk: int | None = None,
    chunk_seconds: float = 0.0,
) -> SearchResult:
    """The driving rows whose staged changes the database refuses (``first``: the refusal of the
    whole stage), found by ``bisect`` with ``trial_attempt`` (module docstring), first in ranges
    of ``chunk`` driving rows if given, the next sized to take ``chunk_seconds`` (0: all
    ``chunk``)."""
    started = time.monotonic()
    with engine.connect() as conn:
        ex = load_execution(conn, execution_id)
    tables = state.reflect_tables(engine, ex["declaration"]["tables"])
    index_sources(engine, tables, ex)
    with engine.connect() as conn:
        ids = source_ids(conn, engine, tables, ex)
    result = SearchResult()

    def probe(i: int, j: int) -> Refusal | None:
        refusal, took = trial_attempt(engine, tables, ex, (ids[i], ids[j]), attempt_seconds)
        result.longest_attempt_seconds = max(result.longest_attempt_seconds, took)
        return refusal

    found, result.attempts, result.stopped, result.at_least = bisect(
        len(ids), probe, first, limit, deadline=started + budget_seconds,
        chunks=BatchSizer(chunk, chunk_seconds, fixed=not chunk_seconds) if chunk else None,
    )
    result.refused = {ids[i]: r for i, r in found.items()}
    result.complete = result.stopped is None
    result.seconds = time.monotonic() - started
    return result


def describe_sources(
    conn: Connection, engine: Engine, tables: Tables, ex: dict[str, Any], ids: Sequence[int]
) -> dict[int, str]:
    """Per driving row: what its staged changes would do, ``table id: col before → after`` for
    every updated column that changes, and the rows it would insert."""
    decl, execution_id = ex["declaration"], ex["execution_id"]
    parts: dict[int, list[str]] = {int(i): [] for i in ids}
    for start in range(0, len(ids), CHUNK):
        chunk = [int(i) for i in ids[start : start + CHUNK]]
        for table, cols in decl["updates"].items():
            live = tables[table]
            st = work_rows(engine, live, execution_id, UPDATE)
            bk = work_rows(engine, live, execution_id, BACKUP)
            q = (
                select(st.c.dp_source_id, st.seq, *[bk.c[c] for c in cols],
                       *[st.c[c] for c in cols])
                .select_from(st.table.join(bk.table, bk.at(st.seq)))
                .where(st.mine, st.c.dp_source_id.in_(chunk))
                .order_by(st.c.dp_source_id, st.seq)
            )
            for row in conn.execute(q):
                before, after = row[2 : 2 + len(cols)], row[2 + len(cols) :]
                changed = [
                    f"{c} {jsonable(b)} → {jsonable(a)}"
                    for c, b, a in zip(cols, before, after, strict=True)
                    if jsonable(b) != jsonable(a) and c != "updated_at"
                ]
                parts[int(row[0])].append(f"{table} {row[1]}: " + ", ".join(changed))
        for table in decl["inserts"]:
            st = work_rows(engine, tables[table], execution_id, INSERT)
            q = (
                select(st.c.dp_source_id, func.count())
                .where(st.mine, st.c.dp_source_id.in_(chunk))
                .group_by(st.c.dp_source_id)
            )
            for source, n in conn.execute(q):
                parts[int(source)].append(f"{n} new {table} row(s)")
    return {i: "; ".join(p) for i, p in parts.items()}


def digest(ids: Sequence[int]) -> str:
    """SHA-256 of a set of driving row ids (sorted), to compare held-back sets."""
    ordered = sorted(int(i) for i in ids)
    return hashlib.sha256(struct.pack(f">{len(ordered)}q", *ordered)).hexdigest()


def hold_back(engine: Engine, execution_id: str, refused: dict[int, Refusal]) -> list[dict[str, Any]]:
    """Reject the driving rows ``refused`` (a ``data_patch_rejects`` row each, with the refusal
    and their values) and take their changes out of the stage, in one transaction. Returns the
    rejects written, in id order."""
    with engine.connect() as conn:
        ex = load_execution(conn, execution_id)
    decl = ex["declaration"]
    tables = state.reflect_tables(engine, decl["tables"])
    index_sources(engine, tables, ex)
    ids = sorted(refused)
    with write_transaction(engine) as conn:
        values = describe_sources(conn, engine, tables, ex, ids)
        rows = [
            {"execution_id": execution_id, "source_id": i, "table_name": refused[i].table,
             "column_name": None, "check_name": HELD_BACK,
             "failure_case": f"{refused[i].reason} | {values.get(i) or 'no staged change'}"}
            for i in ids
        ]
        for start in range(0, len(rows), CHUNK):
            conn.execute(insert(rejects), rows[start : start + CHUNK])
        for st in staged_rows(engine, tables, ex):
            for start in range(0, len(ids), CHUNK):
                conn.execute(st.delete(st.c.dp_source_id.in_(ids[start : start + CHUNK])))
        driving = work_rows(engine, tables[decl["driving_table"]], execution_id, UPDATE)
        left = conn.execute(
            select(func.count()).select_from(driving.table).where(driving.mine)
        ).scalar_one()
        set_execution(conn, execution_id, staged_updates=left, heartbeat_at=utcnow())
    return rows


def held_back_rows(
    conn: Connection, execution_id: str, limit: int | None = None
) -> list[dict[str, Any]]:
    """The driving rows an execution held back, in id order: source_id, table, refusal, values."""
    q = (
        select(rejects.c.source_id, rejects.c.table_name, rejects.c.failure_case)
        .where(rejects.c.execution_id == execution_id, rejects.c.check_name == HELD_BACK)
        .order_by(rejects.c.source_id)
        .limit(limit)
    )
    out = []
    for r in conn.execute(q):
        reason, _, values = str(r.failure_case).partition(" | ")
        out.append({"source_id": int(r.source_id), "table": r.table_name, "refusal": reason,
                    "values": values})
    return out


def held_back_count(conn: Connection, execution_id: str) -> int:
    return int(
        conn.execute(
            select(func.count()).where(
                rejects.c.execution_id == execution_id, rejects.c.check_name == HELD_BACK
            )
        ).scalar_one()
    )


def approved_refusals(conn: Connection, approver_id: str) -> dict[int, Refusal]:
    """The driving rows the approving dry run held back, with its refusals: a real run holds
    back the same ones (its approval covers them)."""
    return {
        r["source_id"]: Refusal(f"held back as in approving dry run {approver_id}: {r['refusal']}",
                                r["table"])
        for r in held_back_rows(conn, approver_id)
    }


def name_refused(
    conn: Connection, engine: Engine, ex: dict[str, Any], refused: dict[int, Refusal],
    at_least: int | None = None,
) -> tuple[list[dict[str, Any]], str, str]:
    """A sample of refused driving rows with their values; one line with the count and the
    refusals (``at_least``: the search stopped before it found them all); one naming the rows."""
    tables = state.reflect_tables(engine, ex["declaration"]["tables"])
    ids = sorted(refused)[:SAMPLE]
    values = describe_sources(conn, engine, tables, ex, ids)
    sample = [{"source_id": i, "table": refused[i].table, "refusal": refused[i].reason,
               "values": values.get(i, "")} for i in ids]
    count = max(len(refused), at_least or 0)
    many = f"at least {count:,}" if at_least and at_least > len(refused) else f"{count:,}"
    # The refusal without the row it quotes (PostgreSQL's DETAIL: Failing row contains ...)
    kinds = list(dict.fromkeys(r.reason.split(" DETAIL:")[0] for r in refused.values()))
    reasons = " / ".join(kinds[:3]) + (f" / {len(kinds) - 3} more" if len(kinds) > 3 else "")
    line = f"{many} {ex['declaration']['driving_table']} row(s) refused ({reasons})"
    rows = "rows " + ", ".join(f"{s['source_id']} ({s['values']})" for s in sample)
    if count > len(sample):
        rows += f", … {count - len(sample):,} more"
    return sample, line, rows
