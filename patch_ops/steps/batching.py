"""What both transform paths share (patch_ops.steps.transform in pandas batches,
patch_ops.steps.transform_sql in the database): the batch read's columns, rows the patch cannot
read, the window's pause and time budget at batch boundaries, and duration-sized batches.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from sqlalchemy import Integer, Numeric, Text, delete, or_, select, type_coerce
from sqlalchemy.engine import Connection, Engine

from patch_ops.database import write_transaction
from patch_ops.dialects import dialect_of
from patch_ops.dialects.functions import as_double
from patch_ops.execution import (
    PAUSED_PHASE,
    PatchError,
    load_execution,
    set_execution,
    utcnow,
)
from patch_ops.failpoints import failpoint
from patch_ops.patch import Patch
from patch_ops.state import INSERT, UPDATE, drop_source_index, locks
from patch_ops.windows import now_naive as clock_now
from patch_ops.work_rows import Stages, WorkRows, distinct_tables, work_rows

#: Reject rows stored per batch at most (each names its source row, check and value).
MAX_REJECTS_STORED = 1000
#: The transform logs its progress line (one Dagster event each) at most this often, and for the
#: first and last batch; the executions row gets every batch's progress regardless.
PROGRESS_LOG_SECONDS = 5.0


class Progress:
    """After each batch: feed the batch sizer, report progress (done, total, ETA) and say
    whether to log the progress line (first and last batch, else every PROGRESS_LOG_SECONDS)."""

    def __init__(self, done: int, total: int, sizer: Any,
                 on_progress: Callable[[int, int, float], None] | None):
        self.started = time.monotonic()
        self.done_at_start, self.total = done, total
        self.sizer, self.on_progress = sizer, on_progress
        self.logged_at = -PROGRESS_LOG_SECONDS
        self.rate, self.eta = 0.0, float("nan")

    def after_batch(self, rows: int, batch_started: float, done: int, batch_no: int) -> bool:
        now_s = time.monotonic()
        self.sizer.record(rows, now_s - batch_started)
        elapsed = now_s - self.started
        self.rate = (done - self.done_at_start) / elapsed if elapsed > 0 else 0.0
        self.eta = (self.total - done) / self.rate if self.rate > 0 else float("nan")
        if self.on_progress is not None:
            self.on_progress(done, self.total, self.eta)
        failpoint(f"transform:batch:{batch_no}")
        if now_s - self.logged_at < PROGRESS_LOG_SECONDS and done < self.total:
            return False
        self.logged_at = now_s
        return True


def stage_rows(engine: Engine, tables: Any, patch: Patch,
               execution_id: str) -> Stages:
    """The execution's stage rows by (action, table): ``UPDATE`` of each table the patch updates,
    ``INSERT`` of each it inserts into; their tables without the ``dp_source_id`` index:
    nothing reads it during the batches, and kept up it was a third of the staging inserts'
    time. The readers that need it make it again, whenever this ran or was killed
    (``state.ensure_source_index``)."""
    wanted = [(UPDATE, t) for t in patch.updates] + [(INSERT, t) for t in patch.inserts]
    stages = {(a, t): work_rows(engine, tables[t], execution_id, a) for a, t in wanted}
    for stage in distinct_tables(stages.values()):
        drop_source_index(engine, stage)
    return stages


def fractional(col) -> bool:  # type: ignore[no-untyped-def]
    return isinstance(col.type, Numeric) and not isinstance(col.type, Integer)


def read_columns(mirror, live, columns: list[str]) -> list[Any]:  # type: ignore[no-untyped-def]
    """A mirror's columns for a batch read: decimals come as doubles from the database (the
    frames hold them as float64 anyway), not as one Decimal object per value. Doubles, not
    SQLAlchemy's Float: MySQL's ``CAST(x AS FLOAT)`` is single precision (32,782.87 read as
    32,782.869140625; 20,000,001 as 20,000,000)."""
    return [
        as_double(mirror.c[c]).label(c) if fractional(live.c[c]) else mirror.c[c]
        for c in columns
    ]


def unreadable_sources(
    conn: Connection, patch: Patch, backups: dict[str, WorkRows], tables: Any, lo: int, hi: int,
) -> list[dict[str, Any]]:
    """Reject rows for the batch's source rows (driving ids ``lo``..``hi``) whose numeric
    columns hold something that is not a number (SQLite stores any value in any column): the
    patch cannot read such a row, so it is rejected with its reason instead of being read as 0
    or NaN and silently skipped or mis-changed, whatever the patch does with it."""
    dialect = dialect_of(conn)
    found: list[dict[str, Any]] = []
    for name, key in [(patch.driving_table, "id"), *patch.related.items()]:
        b = backups[name]
        tests = {
            c.name: test for c in tables[name].columns
            if isinstance(c.type, Numeric | Integer)
            and (test := dialect.not_a_number(b.c[c.name])) is not None
        }
        if not tests:
            continue
        # the driving table's dp_seq is its id: the primary key's range, as the batch read
        ranged = b.seq if name == patch.driving_table else b.c[key]
        rows = conn.execute(
            select(b.c[key].label("src"),
                   *[type_coerce(b.c[c], Text).label(f"value_{c}") for c in tests],
                   *[t.label(f"bad_{c}") for c, t in tests.items()])
            .where(b.mine, ranged.between(lo, hi), or_(*tests.values()))
        ).mappings().all()
        found += [
            {"execution_id": b.execution_id, "source_id": int(r["src"]), "table_name": name,
             "column_name": c, "check_name": "a number (the column's type)",
             "failure_case": str(r[f"value_{c}"])}
            for r in rows for c in tests if r[f"bad_{c}"]
        ]
    return found



def pause_execution(engine: Engine, execution_id: str, **values: Any) -> dict[str, Any]:
    """Stop an execution until a later run continues it: progress, backup and staging kept;
    table locks released (a paused execution writes nothing; commit still checks conflicts)."""
    with write_transaction(engine) as conn:
        set_execution(
            conn,
            execution_id,
            status="paused",
            phase=PAUSED_PHASE,
            heartbeat_at=utcnow(),
            deadline_at=None,
            overrun_at=None,
            **values,
        )
        conn.execute(delete(locks).where(locks.c.execution_id == execution_id))
        return load_execution(conn, execution_id)


def window_stop(ex: dict[str, Any], done: int, total: int) -> bool:
    """Between batches: True when the maintenance window has ended (pause: progress is kept, so
    this comes first); PatchError when the step is over its time budget (3x the estimate)."""
    deadline_at, overrun_at = ex.get("deadline_at"), ex.get("overrun_at")
    if deadline_at is None and overrun_at is None:
        return False
    now = clock_now()
    if deadline_at is not None and now >= deadline_at:
        return True
    if overrun_at is not None and now > overrun_at:
        raise PatchError(
            f"over 3x its estimate ({ex['estimated_seconds'] or 0:,.0f} s): "
            f"stopped at a batch boundary after {done:,}/{total:,} rows; nothing "
            "reached the live tables",
            {"time_budget": {"overrun_at": str(overrun_at), "processed": done}},
        )
    return False


def paused_message(ex: dict[str, Any], execution_id: str, done: int, total: int) -> str:
    deadline_at: dt.datetime = ex["deadline_at"]
    return (
        f"maintenance window ends at {deadline_at:%Y-%m-%d %H:%M:%S} UTC: transform paused "
        f"at a batch boundary after {done:,}/{total:,} rows; execution {execution_id} "
        "continues in the next window"
    )


class BatchSizer:
    """Batch sizes by duration, as GitLab's batched background migrations size theirs: aim at
    ``target_seconds`` per batch, from the mean rows/second of the last few batches, moving at
    most 2x (up) or 0.5x (down) from one batch to the next, within [``min_rows``, ``max_rows``].
    ``fixed``: always ``size`` (a run config that sets batch_size asks for exactly that)."""

    def __init__(
        self,
        size: int,
        target_seconds: float,
        fixed: bool = False,
        min_rows: int = 100,
        max_rows: int = 1_000_000,
    ):
        self.size = max(1, int(size))
        self.target_seconds = target_seconds
        self.fixed = fixed
        self.min_rows = min(min_rows, self.size)
        self.max_rows = max(max_rows, self.size)
        self._recent: deque[tuple[int, float]] = deque(maxlen=3)

    def record(self, rows: int, seconds: float) -> int:
        """The size of the next batch after a batch of ``rows`` took ``seconds``."""
        if self.fixed or rows <= 0:
            return self.size
        self._recent.append((rows, max(seconds, 1e-3)))
        rate = sum(r for r, _ in self._recent) / sum(s for _, s in self._recent)
        wanted = rate * self.target_seconds
        wanted = min(max(wanted, self.size * 0.5), self.size * 2.0)
        self.size = int(min(max(wanted, self.min_rows), self.max_rows))
        return self.size

    def cap(self, rows: int) -> None:
        """Never above ``rows`` again (the memory guard shrank the batch)."""
        self.max_rows = max(self.min_rows, rows)
        self.size = min(self.size, self.max_rows)
