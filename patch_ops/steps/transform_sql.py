"""Transform in the database: the patch's SQL change staged with ``INSERT ... SELECT``.

For a patch that declares its change in SQL (``Patch.sql_transform``) and whose pandera checks
all compile to SQL (patch_ops.sql_checks), no row travels through Python: each batch of the
frozen target set (keyset over the backup, as the pandas path reads it) is

1. staged with one ``INSERT ... SELECT`` per written table (updated rows keyed by id, inserted
   rows numbered in the order the pandas transform returns them) that also evaluates the
   table's checks on each row (an updated row whole: its unchanged columns carried up from the
   batch's row when the change keeps those rows one for one, else joined back on id): a
   failing row is staged as ``FAILED``. None is, normally: the batch is then checked and
   staged in one pass. Otherwise (or when the database refuses a row) that pass is rolled
   back to a savepoint, and the batch is
2. checked where it is: one query per written table selects the rows that would be staged and
   fail a check; their source rows are rejected with every change they cause, named in
   ``data_patch_rejects`` exactly as the pandas path names them (the failing values are
   formatted in Python, as pandera writes them), and the rest staged as in 1; the batch after
   one with failing rows starts with this step.
3. committed with its rejects and the cursor in one transaction, so a crashed run resumes at
   the next batch; the window's end pauses at a batch boundary. (On two connections, a batch's
   inserted rows are staged beside its updated rows and committed just before the batch:
   ``_stage_in_one_pass``.)

Batches are sized by duration (``BatchSizer``). The stages equal the pandas path's row for row
and column for column (tests/patch_ops/steps/test_transform_paths.py).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    Select,
    and_,
    case,
    func,
    insert,
    literal,
    not_,
    select,
    union_all,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import ColumnElement, FromClause
from sqlalchemy.sql.elements import Label, Over
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.sql.selectable import Exists, ScalarSelect, Subquery
from sqlalchemy.sql.visitors import replacement_traverse

from patch_ops import state
from patch_ops.database import write_transaction
from patch_ops.dialects import dialect_of
from patch_ops.execution import (
    PatchError,
    config_of,
    load_execution,
    run_context,
    set_execution,
    step_counts,
    utcnow,
)
from patch_ops.patch import Patch, SqlChanges
from patch_ops.sql_checks import UNIQUE, SqlCheck, case_text, compile_schema, failing
from patch_ops.state import BACKUP, INSERT, UPDATE, executions
from patch_ops.steps.batching import (
    MAX_REJECTS_STORED,
    BatchSizer,
    Progress,
    pause_execution,
    paused_message,
    read_columns,
    stage_rows,
    unreadable_sources,
    window_stop,
)
from patch_ops.work_rows import Stages, WorkRows, distinct_tables, work_rows
from resources.memory import MemoryGuard


class _Batch:
    """One batch's relations: the before-images (``before``), what would be staged per written
    table (``checked``: updated rows as whole after-images, inserted rows as declared)."""

    def __init__(self, patch: Patch, changes: SqlChanges, before: dict[str, FromClause],
                 live_cols: dict[str, list[str]]):
        self.checked: dict[str, FromClause] = {}
        self.order: dict[str, tuple[str, ...]] = {}
        for table, sel in changes.updates.items():
            cols = patch.updates.get(table)
            if cols is None:
                raise PatchError(f"patch {patch.name} updated undeclared table {table!r}")
            _expect(patch, table, sel, {"id", "source_id", *cols}, set())
            b = before[table]
            kept = [c for c in live_cols[table] if c not in cols and c != "id"]
            carried = carry_columns(sel, b, kept)
            if carried is not None:
                # Every row is one of the batch's rows with its id, the unchanged columns
                # carried up from it: the whole after-image without a join back to the batch.
                ch = carried.subquery(f"changed_{table}")
                self.checked[table] = select(
                    *[(ch.c[c] if c in cols or c == "id" else ch.c[_KEPT + c]).label(c)
                      for c in live_cols[table]],
                    ch.c.source_id,
                ).subquery(f"checked_{table}")
                continue
            ch = sel.subquery(f"changed_{table}")
            # Joined to the batch's before-images: an id outside the batch stages nothing.
            self.checked[table] = (
                select(*[(ch.c[c] if c in cols else b.c[c]).label(c) for c in live_cols[table]],
                       ch.c.source_id)
                .join_from(ch, b, b.c.id == ch.c.id)
                .subquery(f"checked_{table}")
            )
        for table, sel in changes.inserts.items():
            cols = patch.inserts.get(table)
            if cols is None:
                raise PatchError(f"patch {patch.name} inserted into undeclared table {table!r}")
            order = tuple(changes.insert_order.get(table, ("source_id",)))
            _expect(patch, table, sel, {"source_id", *cols}, set(order))
            self.checked[table] = sel.subquery(f"checked_{table}")
            self.order[table] = order


#: Label prefix of the before-image columns ``carry_columns`` adds to each layer.
_KEPT = "dp_kept_"
#: Aggregates: a layer that calls one outside a window may fold rows together.
_AGGREGATES = frozenset({
    "count", "sum", "min", "max", "avg", "group_concat", "string_agg", "array_agg", "json_agg",
    "jsonb_agg", "json_arrayagg", "json_objectagg", "bool_and", "bool_or", "every", "bit_and",
    "bit_or", "bit_xor", "stddev", "stddev_pop", "stddev_samp", "variance", "var_pop",
    "var_samp", "std", "any_value", "percentile_cont", "percentile_disc", "mode", "median",
    "total", "listagg",
})


def _row_preserving(sel: Select[Any], source: FromClause) -> bool:
    """Whether every row of ``sel`` (whose one FROM is ``source``) is one row of ``source`` with
    ``source``'s ``id``: no grouping, aggregate, DISTINCT or LIMIT."""
    for attr in ("_group_by_clauses", "_having_criteria", "_distinct_on"):
        if getattr(sel, attr, True):  # unknown to this SQLAlchemy: not provably preserving
            return False
    if getattr(sel, "_distinct", True) or any(
        getattr(sel, a, True) is not None
        for a in ("_limit_clause", "_offset_clause", "_fetch_clause")
    ):
        return False
    idc = sel.selected_columns.get("id")
    while isinstance(idc, Label):
        idc = idc.element
    if idc is None or idc is not source.c.get("id"):
        return False
    stack: list[Any] = [*sel.selected_columns, *([sel.whereclause] if sel.whereclause is not None
                                                 else [])]
    while stack:
        el = stack.pop()
        if isinstance(el, Over | ScalarSelect | Exists):
            continue  # a window or a per-row subquery: no rows folded together
        if isinstance(el, FunctionElement) and str(getattr(el, "name", "")).lower() in _AGGREGATES:
            return False
        stack.extend(el.get_children())
    return True


def carry_columns(sel: Select[Any], before: FromClause, names: list[str]) -> Select[Any] | None:
    """``sel`` with ``before``'s ``names`` columns added (labelled ``dp_kept_<name>``) when each
    of its rows provably is one row of ``before`` with its id, through single-FROM subquery
    layers (``_row_preserving``); else None (the caller joins back on id)."""
    froms = sel.get_final_froms() if isinstance(sel, Select) else []
    if len(froms) != 1:
        return None
    source = froms[0]
    if source is before:
        inner = source
    elif isinstance(source, Subquery) and isinstance(source.element, Select):
        lower = carry_columns(source.element, before, names)
        if lower is None:
            return None
        inner = lower.subquery(source.name)
    else:
        return None
    if not _row_preserving(sel, source):
        return None
    if inner is not source:
        swap = {id(c): inner.c[c.key] for c in source.c}

        def replace(element: Any, **_: Any) -> Any:
            return inner if element is source else swap.get(id(element))

        sel = cast(Select[Any], replacement_traverse(sel, {}, replace))
    kept = []
    for n in names:
        col = inner.c[n] if inner is before else inner.c[_KEPT + n]
        have = sel.selected_columns.get(_KEPT + n)
        if have is None:
            kept.append(col.label(_KEPT + n))
        elif have is not col:  # the name taken by something else: no carrying
            return None
    return sel.add_columns(*kept) if kept else sel


def _expect(patch: Patch, table: str, sel: Select[Any], need: set[str], extra: set[str]) -> None:
    got = set(sel.selected_columns.keys())
    if not need <= got or got - need - extra:
        raise PatchError(
            f"patch {patch.name}: its SQL change of {table} selects {sorted(got)}, "
            f"expected {sorted(need)}" + (f" (+ order columns {sorted(extra)})" if extra else "")
        )


def _failures(
    conn: Connection, table: str, checks: list[SqlCheck], rel: FromClause
) -> tuple[set[int], list[dict[str, Any]]]:
    """The source rows of ``rel`` (one table's would-be stage) that fail a check, and their
    reject rows as pandera names them: one per failing check and column (a dataframe check:
    one per column of the row)."""
    flags = [case((not_(c.passes(rel)), 1), else_=0).label(f"dp_fail_{i}")
             for i, c in enumerate(checks)]
    rows = conn.execute(select(rel, *flags).where(failing(checks, rel))).mappings().all()
    dtypes = {c.column: c.dtype for c in checks if c.column is not None}
    columns = [c.name for c in rel.c]
    bad: set[int] = set()
    found: list[dict[str, Any]] = []
    for r in rows:
        src = int(r["source_id"])
        bad.add(src)
        for i, chk in enumerate(checks):
            if not r[f"dp_fail_{i}"]:
                continue
            for col in [chk.column] if chk.column is not None else columns:
                found.append({"source_id": src, "table_name": table, "column_name": col,
                              "check_name": chk.name,
                              "failure_case": case_text(r[col], dtypes.get(col, ""))})
    return bad, found


def run_sql_transform(
    engine: Engine,
    patch: Patch,
    ex: dict[str, Any],
    sizer: BatchSizer,
    memory: MemoryGuard,
    log: Any = None,
    on_progress: Callable[[int, int, float], None] | None = None,
    connections: int = 1,
) -> dict[str, int]:
    """The transform step in the database (``patch_ops.steps.transform.run_transform`` chooses
    it): the same progress, resume, pause, rejects and counts as the pandas path. The memory
    guard still checks the process and the machine before every batch (the rows stay in the
    database, so it does not size them). With ``connections`` > 1 where a writing transaction
    does not lock the whole database, a batch's inserted rows are staged on a second
    connection while its updated rows are (``_stage_in_one_pass``)."""
    log = log or logging.getLogger(__name__)
    execution_id = str(ex["execution_id"])
    config, ctx = config_of(patch, ex), run_context(ex)
    tables = state.reflect_tables(engine, patch.tables())
    backups = {t: work_rows(engine, tables[t], execution_id, BACKUP) for t in patch.tables()}
    stages = stage_rows(engine, tables, patch, execution_id)
    checks = {t: compile_schema(m) for t, m in patch.schemas.items()}
    live_cols = {t: [c.name for c in tables[t].columns] for t in patch.tables()}
    driving = backups[patch.driving_table]

    cursor = ex["cursor"] if ex["cursor"] is not None else -(2**62)
    done, total = int(ex["processed_records"]), int(ex["target_count"])
    staged_inserts, batch_no = int(ex["staged_inserts"]), int(ex["batches_done"])
    progress_of = Progress(done, total, sizer, on_progress)
    paused, optimistic = False, True
    aside = engine if connections > 1 and dialect_of(engine).features.row_locks else None
    _drop_unfinished_inserts(engine, staged_inserts, [stages[(INSERT, t)] for t in patch.inserts])
    if done:
        log.info(f"resuming transform in the database at id > {cursor} ({done:,}/{total:,} done)")
    last = False  # the last batch read: no probe for more (the target set is frozen)
    with memory.budget(ex["memory_limit_mb"], ex["batch_size"]) as budget:
        while not last:
            budget.next_batch_size(batch_no + 1)  # raises when memory is nearly exhausted
            batch_started = time.monotonic()
            size = sizer.size
            keys = (
                select(driving.seq)
                .where(driving.mine, driving.seq > cursor)
                .order_by(driving.seq)
                .limit(size)
                .subquery()
            )
            # The batch's keys are counted in its own transaction (one transaction a batch,
            # its inserted rows' aside); leaving it before any write stages nothing.
            with write_transaction(engine) as conn:
                n, hi = conn.execute(select(func.count(), func.max(keys.c.dp_seq))).one()
                if not n:
                    break
                if window_stop(ex, done, total):
                    paused = True
                    break
                batch_no += 1
                hi, last = int(hi), n < size  # a short batch: the backup holds no more
                unreadable = unreadable_sources(conn, patch, backups, tables, cursor + 1, hi)
                skip = sorted({int(r["source_id"]) for r in unreadable})
                before = {t: _before(patch, t, backups[t], tables[t], live_cols[t], cursor, hi,
                                     skip)
                          for t in [patch.driving_table, *patch.related]}
                changes = patch.sql_transform(before, config, ctx)
                if changes is None:
                    raise PatchError(f"patch {patch.name} declared no SQL change for this batch")
                batch = _Batch(patch, changes, before, live_cols)
                staged = None
                if optimistic:
                    staged = _stage_in_one_pass(conn, patch, changes, batch, stages, checks,
                                                staged_inserts, aside)
                bad: set[int] = set()
                reject_rows: list[dict[str, Any]] = []
                if staged is None:
                    for table, rel in batch.checked.items():
                        if checks.get(table):
                            b, found = _failures(conn, table, checks[table], rel)
                            bad |= b
                            reject_rows += found
                    failing_sources = None
                    if bad:
                        failing_sources = union_all(*[
                            select(rel.c.source_id).where(failing(checks[t], rel)).correlate(None)
                            for t, rel in batch.checked.items() if checks.get(t)
                        ]).subquery("failing_sources")
                    staged = _stage(conn, patch, changes, batch, stages, staged_inserts,
                                    failing_sources=failing_sources)
                # a batch with failing rows is staged in two passes; so is the next one
                optimistic = not bad
                n_upd, n_ins = staged
                reject_rows = [*reject_rows, *unreadable]
                for r in reject_rows:
                    r["execution_id"] = execution_id
                if reject_rows:
                    conn.execute(insert(state.rejects), reject_rows[:MAX_REJECTS_STORED])
                staged_inserts += n_ins
                cursor = hi
                done += int(n)
                conn.execute(
                    update(executions)
                    .where(executions.c.execution_id == execution_id)
                    .values(
                        phase="transforming", cursor=cursor, processed_records=done,
                        batches_done=batch_no,
                        staged_updates=executions.c.staged_updates + n_upd,
                        staged_inserts=staged_inserts,
                        failed_records=executions.c.failed_records + len(bad | set(skip)),
                        heartbeat_at=utcnow(),
                    )
                )
            if not progress_of.after_batch(int(n), batch_started, done, batch_no):
                continue
            log.info(
                f"batch {batch_no} (in the database): {done:,}/{total:,} rows "
                f"({done / max(total, 1):.0%}), batch size {size}, {progress_of.rate:,.0f} "
                f"rows/s, ETA {progress_of.eta:,.1f}s; next batch {sizer.size} rows"
            )
    if paused:
        ex = pause_execution(engine, execution_id, peak_rss_mb=budget.peak_rss_mb)
        log.warning(paused_message(ex, execution_id, done, total)
                    if ex.get("deadline_at") else f"transform paused after {done:,}/{total:,}")
        return {**step_counts(ex), "paused": 1}
    with write_transaction(engine) as conn:
        set_execution(conn, execution_id, phase="transformed", peak_rss_mb=budget.peak_rss_mb)
        ex = load_execution(conn, execution_id)
    state.analyze(engine, distinct_tables(stages.values()))
    return step_counts(ex)


def _stage(
    conn: Connection, patch: Patch, changes: SqlChanges, batch: _Batch, stages: Stages,
    staged_inserts: int, failing_sources: FromClause | None = None,
    marks: dict[str, list[SqlCheck]] | None = None, only: Collection[str] | None = None,
) -> tuple[int, int]:
    """Stage the batch (its tables in ``only``, else all) with one ``INSERT ... SELECT`` per
    written table; returns (updated rows of the driving table, inserted rows). The rows of
    ``failing_sources`` are left out; a row that fails one of its table's ``marks`` is staged
    marked failing (``WorkRows.fill``)."""
    n_upd = n_ins = 0
    for table, rel in batch.checked.items():
        if only is not None and table not in only:
            continue
        updated = table in changes.updates
        if updated:
            cols = ["id", *patch.updates[table]]
            src: FromClause = rel
            seq: ColumnElement[Any] = rel.c.id
        else:
            cols = list(patch.inserts[table])
            numbered = select(rel, func.row_number().over(
                order_by=[rel.c[k] for k in batch.order[table]]).label("dp_rn"))
            if failing_sources is not None:
                numbered = numbered.where(_kept(rel, failing_sources))
            src = numbered.subquery(f"numbered_{table}")
            seq = src.c.dp_rn + literal(staged_inserts + n_ins, BigInteger)
        rows = stages[(UPDATE if updated else INSERT, table)]
        q = select(src.c.source_id, *[src.c[c] for c in cols])
        if failing_sources is not None and updated:
            q = q.where(_kept(rel, failing_sources))
        fails = failing(marks[table], src) if marks and marks.get(table) else None
        res = conn.execute(rows.fill(seq, ["dp_source_id", *cols], q, fails),
                           execution_options={"preserve_rowcount": True})
        if not updated:
            n_ins += res.rowcount
        elif table == patch.driving_table:
            n_upd += res.rowcount
    return n_upd, n_ins


def _stage_in_one_pass(
    conn: Connection, patch: Patch, changes: SqlChanges, batch: _Batch, stages: Stages,
    checks: dict[str, list[SqlCheck]], staged_inserts: int, aside: Engine | None = None,
) -> tuple[int, int] | None:
    """Stage the batch in one pass, its checks evaluated in the same statements: a failing row
    is staged as ``FAILED``. When none is (the usual case) the batch is staged, its checks
    done; when one is, or the database refused a row (a value outside its column's type, a
    duplicate id), the pass is undone (a savepoint) and None returned: the batch is then
    checked first and staged without its failing sources, the rejects named. An updated
    table's ``unique`` id check is the stage's primary key here (dp_seq is the id).

    Given ``aside``, a batch that both updates and inserts stages its inserted rows at the same
    time on a connection of its own, in a transaction committed just before the batch's: a
    crash between the two leaves them after the execution's ``staged_inserts``, where the
    step's next start drops them (``_drop_unfinished_inserts``)."""
    marks = {t: [c for c in cs if not (t in changes.updates and c.name == UNIQUE
                                       and c.column == "id")]
             for t, cs in checks.items()}

    def staged(on: Connection, tables: Collection[str]) -> tuple[int, int] | None:
        counts = _stage(on, patch, changes, batch, stages, staged_inserts, marks=marks,
                        only=tables)
        failed = [st.first_failed() for (_, t), st in stages.items()
                  if t in tables and marks.get(t)]
        return None if any(on.execute(q).first() is not None for q in failed) else counts

    inserted = [t for t in batch.checked if t not in changes.updates]
    updated = [t for t in batch.checked if t in changes.updates]
    savepoint = conn.begin_nested()
    with aside.connect() if aside and inserted and updated else contextlib.nullcontext() as other:
        try:
            if other is None:
                results = [staged(conn, list(batch.checked))]
            else:  # left uncommitted, the connection's close rolls it back
                other.begin()
                results = _beside(lambda: staged(conn, updated), other,
                                  lambda: staged(other, inserted))
                if None not in results:
                    other.commit()
        except DBAPIError as exc:
            if exc.connection_invalidated:
                raise
            try:
                savepoint.rollback()
            except DBAPIError:
                raise exc from None  # the whole transaction is gone (e.g. a deadlock): its error
            return None
    done = [r for r in results if r is not None]
    if len(done) < len(results):
        savepoint.rollback()
        return None
    savepoint.commit()
    return sum(r[0] for r in done), sum(r[1] for r in done)


def _beside(here: Callable[[], Any], other: Connection, there: Callable[[], Any]) -> list[Any]:
    """[``here()``, ``there()``]: ``there`` (on ``other``) in a thread of its own while ``here``
    runs in this one, where a stop signal cancels its statement. Whatever ends
    ``here`` or the wait early (an error, a stop) cancels ``there``'s statement and waits for
    it first: ``other`` is never closed while in use."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage") as pool:
        future = pool.submit(there)
        try:
            return [here(), future.result()]
        except BaseException:
            if not future.done():
                dialect_of(other).interrupt(other)
            wait([future])
            raise


def _drop_unfinished_inserts(engine: Engine, staged_inserts: int,
                             inserts: list[WorkRows]) -> None:
    """Drop the execution's inserted rows staged after its ``staged_inserts``: a batch's,
    committed on their own connection just before a crash kept the batch from committing
    (``_stage_in_one_pass``); it is staged again."""
    with write_transaction(engine) as conn:
        for ins in inserts:
            conn.execute(ins.delete(ins.seq > staged_inserts))


def _kept(rel: FromClause, failing_sources: FromClause) -> ColumnElement[bool]:
    """Rows of ``rel`` whose source row fails no check (all its changes are staged)."""
    return rel.c.source_id.not_in(select(failing_sources.c.source_id))


def _before(
    patch: Patch, table: str, backup: WorkRows, live: Any, columns: list[str], cursor: int,
    hi: int, skip: list[int],
) -> FromClause:
    """The batch's before-images of ``table`` (driving ids in (``cursor``, ``hi``]), with the
    live columns as the pandas path reads them, without the ``skip``ped (unreadable) sources."""
    b = backup
    if table == patch.driving_table:
        key = b.c.id
        where: list[ColumnElement[bool]] = [b.mine, b.seq > cursor, b.seq <= hi]
    else:
        key = b.c[patch.related[table]]
        where = [b.mine, key > cursor, key <= hi]
    if skip:
        where.append(key.not_in(skip))
    # ``id`` as dp_seq (a backup's dp_seq is the row's id): joins on id are primary-key lookups
    # (SQLite joined two such subqueries on the unindexed id column row by row: quadratic).
    cols = [b.seq.label("id") if c == "id" else c for c in columns]
    read = [c if not isinstance(c, str) else read_columns(b, live, [c])[0] for c in cols]
    return select(*read).where(and_(*where)).subquery(f"batch_{table}")
