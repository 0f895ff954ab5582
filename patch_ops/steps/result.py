"""The would-be (or committed) result of an execution as SQL, and the patch's invariants on it.

``ResultView`` gives a patch's invariants the rows it updates and inserts and whole tables as they
would be after commit (from the stage) or are (live, after commit); ``invariant_checks`` counts
the offenders of each invariant, with a sample of them, bounded by the statement timeout:
invariants that filter the same rows in one query (``row_filter``), and invariants that declare a
screen over the same rows (``Invariant.screen``, e.g. several checks over one join), beside the
aggregates the caller needs of those rows (the impact report's, verification's comparison with
the stage), so each row source is read as few times as possible; a screened invariant's own
query runs only when its screen is not 0. Validation and post-verification share them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    BinaryExpression,
    ColumnClause,
    ColumnElement,
    Exists,
    FromClause,
    FunctionElement,
    Integer,
    Join,
    Over,
    ScalarSelect,
    Select,
    SelectBase,
    Subquery,
    case,
    false,
    func,
    literal,
    literal_column,
    select,
    union_all,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.sql import operators, visitors

from patch_ops import state
from patch_ops.dialects import dialect_of
from patch_ops.execution import (
    config_of,
    inserted_id,
    inserted_id_range,
    inserted_offset,
    jsonable,
    load_execution,
)
from patch_ops.patch import Invariant, Patch, Tables
from patch_ops.state import BACKUP, INSERT, UPDATE
from patch_ops.work_rows import WorkRows, work_rows

SAMPLE_ROWS = 10


@dataclass
class ResultView:
    """SQL views of an execution's result, before commit (from staging) or after (live).

    ``updated(t)``: full after-images of the rows the patch updates, plus ``before_<col>`` for
    every column the patch changes (after commit also ``dp_staged_<col>``: the value it
    committed); ``inserted(t)``: rows it inserts (after commit also ``dp_staged_<col>`` for
    every column it declares); ``table(t)``: the whole table as it is
    (committed) or would be (not yet). Every subquery carries ``dp_source_id``.
    """

    engine: Engine
    tables: Tables
    execution_id: str
    committed: bool
    declaration: dict[str, Any]
    execution: dict[str, Any] = field(default_factory=dict)  # its report: ids of inserted rows
    #: table -> the live ids its committed inserts span: read once, however many checks ask
    spans: dict[str, tuple[int, int] | None] = field(default_factory=dict, repr=False)

    def _rows(self, table: str, action: str) -> WorkRows:
        return work_rows(self.engine, self.tables[table], self.execution_id, action)

    def _cols(self, table: str) -> list[str]:
        return [c.name for c in self.tables[table].columns]

    def _none(self, table: str, name: str):  # type: ignore[no-untyped-def]
        """No rows, in the live table's shape: the changes of a kind the patch does not declare
        for ``table`` (no work rows table to read, none made for the asking)."""
        live = self.tables[table]
        return select(*live.c, literal(None, type_=Integer).label("dp_source_id")).where(
            false()).subquery(name)

    def updated(self, table: str):  # type: ignore[no-untyped-def]
        if table not in self.declaration["updates"]:
            return self._none(table, f"updated_{table}")
        st, bk = self._rows(table, UPDATE), self._rows(table, BACKUP)
        live = self.tables[table]
        changed = self.declaration["updates"].get(table, ())
        on_backup = bk.at(st.seq)
        if self.committed:
            # Every staged update has its backup row, so a LEFT JOIN is the same join; but on
            # its primary key it lets PostgreSQL drop the backup from a query that reads no
            # before_ column: one join over every updated row less for each such check.
            joined = st.table.outerjoin(bk.table, on_backup).join(live, live.c.id == st.seq)
            # what was committed beside what is live: verification compares them in the pass
            cols = [live.c[c] for c in self._cols(table)]
            cols += [st.c[c].label(f"dp_staged_{c}") for c in changed]
        else:
            joined = st.table.join(bk.table, on_backup)
            # id from the stage's primary key, so joins on it can use the index
            cols = [
                (st.seq if c == "id" else st.c[c] if c in changed else bk.c[c]).label(c)
                for c in self._cols(table)
            ]
        q = (
            select(*cols, *[bk.c[c].label(f"before_{c}") for c in changed], st.c.dp_source_id)
            .select_from(joined)
            .where(st.mine)
        )
        return q.subquery(f"updated_{table}")

    def inserted(self, table: str):  # type: ignore[no-untyped-def]
        if table not in self.declaration["inserts"]:
            return self._none(table, f"inserted_{table}")
        st, live = self._rows(table, INSERT), self.tables[table]
        if self.committed:
            if table not in self.spans:
                with self.engine.connect() as conn:
                    self.spans[table] = inserted_id_range(conn, st, self.execution, table)
            span = self.spans[table]
            # what was committed beside what is live: verification compares them in the pass
            staged = [st.c[c].label(f"dp_staged_{c}")
                      for c in self.declaration["inserts"].get(table, ())]
            q = select(*live.c, st.c.dp_source_id, *staged)
            offset = inserted_offset(self.execution, table)
            if span is not None and offset is not None:
                # One block of ids, handed out to this execution alone: the live rows in it
                # are the rows it inserted, so the stage is joined only for its columns. As a
                # LEFT JOIN on the stage's key, PostgreSQL and MariaDB leave it out of a check
                # that reads none of them (the invariants: a join over every inserted row less)
                q = q.select_from(live.outerjoin(st.table, st.at(live.c.id - offset)))
                q = q.where(live.c.id.between(*span))
            else:
                q = q.join(st.table, live.c.id == inserted_id(st, self.execution, table))
                q = q.where(st.mine)
                if span is not None:
                    q = q.where(live.c.id.between(*span))
        else:
            q = select(*[st.c[c] for c in self._cols(table)], st.c.dp_source_id).where(st.mine)
        return q.subquery(f"inserted_{table}")

    def table(self, table: str):  # type: ignore[no-untyped-def]
        return self.table_where(table, None, None)

    def table_where(self, table: str, column: str | None, values: Any):  # type: ignore[no-untyped-def]
        """The rows of ``table(t)`` whose ``column`` is in ``values`` (a one-column SELECT):
        the condition in every part, so the database reads the rows by the column's index
        instead of the whole table (and, before commit, its every row against the stage)."""
        live = self.tables[table]

        def where(sel, rows):  # type: ignore[no-untyped-def]
            return sel if column is None else sel.where(rows.c[column].in_(values))

        name = f"all_{table}" if column is None else f"{table}_by_{column}"
        if self.committed:
            return where(
                select(*live.c, literal(None, type_=Integer).label("dp_source_id")), live
            ).subquery(name)
        untouched = select(*live.c, literal(None, type_=Integer).label("dp_source_id"))
        parts = []
        if table in self.declaration["updates"]:
            st = self._rows(table, UPDATE)
            # NOT EXISTS, not NOT IN: PostgreSQL runs NOT IN (subquery) as a nested loop when
            # the subquery does not fit in work_mem (quadratic at a million rows); an anti-join
            # is linear
            untouched = untouched.where(~select(st.seq).where(st.at(live.c.id)).exists())
            upd = self.updated(table)
            parts.append(where(select(*[upd.c[c] for c in self._cols(table)],
                                      upd.c.dp_source_id), upd))
        if table in self.declaration["inserts"]:
            ins = self.inserted(table)
            parts.append(where(select(*ins.c), ins))
        if not parts:
            return where(untouched, live).subquery(name)
        return union_all(where(untouched, live), *parts).subquery(name)


#: The extra aggregates a caller computes in the invariants' passes: key -> (row source, columns)
Aggregates = dict[str, tuple[FromClause, list[ColumnElement[Any]]]]
#: An invariant in a shared pass: (its index, its column there, whether that is its exact count)
Screen = tuple[int, ColumnElement[Any], bool]


@dataclass
class Checks:
    """The invariant checks of one result as calls to run at once (``run_concurrently``).

    Invariants that only filter the rows of one source (``row_filter``) or screen it
    (``Invariant.screen``) share one query per source: a ``COUNT(CASE WHEN ...)`` or the screen
    each, beside the caller's extra aggregates over the same rows. Every call returns
    ``{invariant index: broken or None}``; ``aggregates[key]`` is set to the row of the extra
    aggregates (None: its pass timed out, compute them again).
    """

    invariants: list[Invariant]
    calls: list[Callable[[], dict[int, dict[str, Any] | None]]]
    aggregates: dict[str, Future[Any]]

    def broken(self, results: list[dict[int, dict[str, Any] | None]]) -> list[dict[str, Any]]:
        """The broken invariants, in the order the patch declares them."""
        found: dict[int, dict[str, Any] | None] = {}
        for r in results:
            found.update(r)
        return [b for i in range(len(self.invariants)) if (b := found[i]) is not None]


def row_filter(inv: Invariant, dialect: Any) -> tuple[FromClause, ColumnElement[bool]] | None:
    """(source, condition) when ``inv.offenders`` is exactly ``SELECT <columns> FROM source
    WHERE condition`` with one table or subquery as source (no join, grouping, DISTINCT, LIMIT,
    aggregate or window column, no subquery in the condition: inside a CASE it would run once
    per row); else None."""
    sel, where = inv.offenders, inv.offenders.whereclause
    froms = sel.get_final_froms()
    if where is None or len(froms) != 1 or isinstance(froms[0], Join):
        return None
    if any(isinstance(e, SelectBase | ScalarSelect | Exists) for e in visitors.iterate(where)):
        return None
    for col in sel.selected_columns:
        if any(isinstance(e, FunctionElement | Over) for e in visitors.iterate(col)):
            return None
    plain = select(*sel.selected_columns).select_from(froms[0]).where(where)
    if str(plain.compile(dialect=dialect)) != str(sel.compile(dialect=dialect)):
        return None
    return froms[0], where


def _source_key(source: FromClause, dialect: Any) -> str:
    """The same rows: the same SQL and parameters (two calls of ``ResultView.updated(t)``). A
    join is the same only as the same object: ``_on`` cannot move conditions between two."""
    compiled = select(literal_column("1")).select_from(source).compile(dialect=dialect)
    key = f"{compiled} {sorted(compiled.params.items(), key=lambda kv: kv[0])!r}"
    return f"{key} #{id(source)}" if isinstance(source, Join) else key


def _on(source: FromClause, condition: ColumnElement[bool], other: FromClause):  # type: ignore[no-untyped-def]
    """``condition`` (on ``other``'s columns) on ``source``'s columns of the same names."""
    if other is source:
        return condition

    def swap(e: Any, **_: Any) -> Any:
        if isinstance(e, ColumnClause) and e.table is other:
            return source.c[e.key]
        return None

    return visitors.replacement_traverse(condition, {}, swap)  # type: ignore[call-overload]


def _one_row_per_left_row(source: FromClause, dialect: Any) -> FromClause | None:
    """``source.left`` when ``source`` is ``left LEFT OUTER JOIN (a subquery grouped by one
    column) ON that column = a column of left``: each row of ``left`` meets at most one group,
    so ``source`` has exactly one row per row of ``left`` (aggregates over ``left``'s columns
    are the same over ``source``); else None."""
    if not isinstance(source, Join) or not source.isouter or source.full:
        return None
    right, on = source.right, source.onclause
    if not isinstance(right, Subquery) or not isinstance(on, BinaryExpression):
        return None
    if on.operator is not operators.eq:
        return None
    ends = [on.left, on.right]
    key = next((c for c in ends if isinstance(c, ColumnClause) and c.table is right), None)
    other = next((c for c in ends if c is not key), None)
    if key is None or not isinstance(other, ColumnClause) or other.table is not source.left:
        return None
    grouped = right.element
    if not isinstance(grouped, Select):
        return None
    by = list(grouped.selected_columns)[next(i for i, c in enumerate(right.c) if c is key)]
    only = grouped.group_by(None).group_by(by)
    if str(only.compile(dialect=dialect)) != str(grouped.compile(dialect=dialect)):
        return None
    return source.left


def _join_passes(
    passes: dict[str, tuple[FromClause, list[Screen], Aggregates]], dialect: Any
) -> None:
    """Each pass over the rows of the left side of another pass's one-row-per-left-row join,
    made in that one (its columns taken by name from the left side, in the join's FROM)."""
    for outer in list(passes):
        if outer not in passes or (left := _one_row_per_left_row(passes[outer][0], dialect)) is None:
            continue
        inner = _source_key(left, dialect)
        if inner != outer and inner in passes:
            first, conds, more = passes.pop(inner)
            # the same rows: the columns by name on the join's left side
            passes[outer][1].extend((i, _on(left, c, first), exact) for i, c, exact in conds)
            passes[outer][2].update(
                {name: (left, [_on(left, c, first) for c in cols]) for name, (_, cols) in more.items()}
            )


def invariant_checks(
    engine: Engine,
    patch: Patch,
    execution_id: str,
    committed: bool,
    timeout_s: float | None,
    aggregates: Callable[[ResultView], Aggregates] | None = None,
    shared_only: Collection[str] = (),
    join_passes: bool = False,
    beside: bool = False,
) -> Checks:
    """The checks of every invariant of ``patch`` on the result: each finds the broken
    invariant with a sample of offending rows, or None. ``aggregates(view)``: aggregates the
    caller needs over the view's rows anyway (the impact report's), computed in the same pass
    as the invariants that filter or screen the same rows, or alone (the keys in
    ``shared_only``: only in a pass with invariants; the others are left out of
    ``Checks.aggregates`` for the caller to get as it would without invariants). A screened invariant whose screen is not 0 is then
    counted and sampled by its own ``offenders`` query, on its own connection.

    Where the database can limit a statement's time, each query may run ``timeout_s`` at most: one that
    runs longer counts as broken (``timed_out``), so a bad plan fails the validation, or makes
    post-verification restore, instead of holding the maintenance window and the table locks.
    A shared pass that runs longer marks every invariant in it so.

    ``beside``: the calls will run at once on their own connections; then every pass runs in
    one server process (``DatabaseDialect.one_process``), as one joined onto grouped rows always
    does: the workers of one would take the CPUs the longest pass beside it needs
    (benchmarks/README.md, session 30).
    """
    with engine.connect() as conn:
        ex = load_execution(conn, execution_id)
    config = config_of(patch, ex)
    tables = state.reflect_tables(engine, patch.tables())
    view = ResultView(engine, tables, execution_id, committed, ex["declaration"], ex)
    dialect = dialect_of(engine)
    limit_s = timeout_s if timeout_s and dialect.features.statement_timeout else 0
    invariants = patch.invariants(view, config)
    # key -> (source, [(index, count of offenders or screen, exact)], {aggregate key: columns})
    passes: dict[str, tuple[FromClause, list[Screen], Aggregates]] = {}
    alone: list[int] = []
    for i, inv in enumerate(invariants):
        if inv.screen is not None:
            source, counted, exact = *inv.screen, False
        elif (found := row_filter(inv, engine.dialect)) is not None:
            source, counted, exact = found[0], func.count(case((found[1], 1))), True
        else:
            alone.append(i)
            continue
        key = _source_key(source, engine.dialect)
        first = passes.setdefault(key, (source, [], {}))[0]
        passes[key][1].append((i, _on(first, counted, source), exact))
    extra = aggregates(view) if aggregates else {}
    futures: dict[str, Future[Any]] = {k: Future() for k in extra}
    for name, (source, cols) in extra.items():
        key = _source_key(source, engine.dialect)
        first = passes.setdefault(key, (source, [], {}))[0]
        if first is not source:  # the same rows: the columns by name on the pass's source
            cols = [_on(first, c, source) for c in cols]
        passes[key][2][name] = (first, cols)
    if join_passes:
        _join_passes(passes, engine.dialect)
    for key, (_, conds, more) in list(passes.items()):
        if len(conds) == 1 and not more:  # nothing to share: its own query (an index may help)
            alone.append(conds[0][0])
            del passes[key]
        elif not conds and (alone_only := [n for n in more if n in shared_only]):
            for name in alone_only:
                del futures[name], more[name]
            if not more:
                del passes[key]
    alone.sort()

    def timed_out(inv: Invariant) -> dict[str, Any]:
        return {"name": inv.name, "description": inv.description, "count": None,
                "timed_out": timeout_s, "sample": []}

    def sample(conn: Connection, inv: Invariant, n: int) -> dict[str, Any]:
        rows = conn.execute(select(inv.offenders.subquery()).limit(SAMPLE_ROWS)).mappings()
        return {"name": inv.name, "description": inv.description, "count": n,
                "sample": [{k: jsonable(v) for k, v in r.items()} for r in rows]}

    def check(i: int) -> dict[int, dict[str, Any] | None]:
        inv = invariants[i]
        sub = inv.offenders.subquery()
        with engine.connect() as conn:
            if limit_s:
                dialect.set_statement_timeout(conn, limit_s)
            try:
                n = conn.execute(select(func.count()).select_from(sub)).scalar_one()
                return {i: sample(conn, inv, n) if n else None}
            except OperationalError as exc:
                if not dialect.is_statement_timeout(exc):
                    raise
                return {i: timed_out(inv)}

    def shared(
        source: FromClause, conds: list[Screen], more: Aggregates
    ) -> dict[int, dict[str, Any] | None]:
        cols: list[ColumnElement[Any]] = [c for _, c, _ in conds]
        cols += [c for _, extra_cols in more.values() for c in extra_cols]
        found: dict[int, dict[str, Any] | None] = {}
        screened: list[int] = []  # screens not 0: their own query counts and names the rows
        row: Any = None
        try:
            with engine.connect() as conn:
                if limit_s and conds:
                    dialect.set_statement_timeout(conn, limit_s)
                # a join onto grouped rows: each parallel worker would group them again
                if _one_row_per_left_row(source, engine.dialect) is not None:
                    dialect.group_once(conn)
                elif beside:
                    dialect.one_process(conn)
                try:
                    row = conn.execute(select(*cols).select_from(source)).one()
                    for (i, _, exact), n in zip(conds, row[: len(conds)], strict=True):
                        if exact:  # the count of the offenders itself
                            found[i] = sample(conn, invariants[i], n) if n else None
                        elif n == 0:
                            found[i] = None
                        else:
                            screened.append(i)
                except OperationalError as exc:
                    if not dialect.is_statement_timeout(exc):
                        raise
                    row, screened = None, []
                    found = {i: timed_out(invariants[i]) for i, _, _ in conds}
        except BaseException as exc:
            for name in more:
                futures[name].set_exception(exc)
            raise
        at = len(conds)
        for name, (_, extra_cols) in more.items():
            futures[name].set_result(None if row is None else tuple(row[at : at + len(extra_cols)]))
            at += len(extra_cols)
        for i in screened:
            found.update(check(i))
        return found

    # the shared passes first: the impact report waits for its aggregates
    calls: list[Callable[[], dict[int, dict[str, Any] | None]]] = [
        functools.partial(shared, *p) for p in passes.values()
    ]
    calls += [functools.partial(check, i) for i in alone]
    return Checks(invariants, calls, futures)


def invariant_problem(broken: dict[str, Any], after_commit: bool = False) -> str:
    """One line for a broken invariant (invariant_checks), for the problems list."""
    when = " after commit" if after_commit else ""
    if broken["count"] is None:
        return (
            f"invariant {broken['name']} could not be checked{when}: its query ran longer than "
            f"{broken['timed_out']:g} s (query_timeout_seconds) and was cancelled"
        )
    return f"invariant {broken['name']} broken{when} by {broken['count']:,} row(s): " + (
        broken["description"]
    )

