"""Drift since approval: what a real run commits is what its approving dry run showed.

Drift is defined once, on what the patch reads and writes, not on whole rows:

- **Values**: per table, the patch's *drift columns* (``drift_columns``): what it declares in
  ``Patch.drift_columns``, else every column it updates but the application's own bookkeeping
  (``created_at``/``updated_at`` and the ``*_count`` counter caches, which Rails moves on every
  stock movement), plus a related table's link to its driving row. For the price patch that is
  ``inventories.price``: quantities (and the log counter and timestamp they move) change hourly
  and do not stop it; a price changed since approval does. What the selection reads is covered
  already: the plan hash has the frozen target ids.
- **Schema** (``schema_of``): columns (type, nullability, default), primary and foreign keys,
  unique constraints and indexes, CHECK constraints of every table the patch touches. It is part
  of the plan hash (``patch_ops.approval``): a migration after approval is a new plan, refused
  naming what changed.

A dry run of a patch that needs approval keeps, when it completes, what it read (its backup
rows: action ``B``) and what it would write (its staged updates: ``U``) of the tables with drift
columns, as its fingerprint (``keep_fingerprint``); its other work rows are dropped as before.
Copying them elsewhere and deleting the originals cost a dry run as much as its whole commit
(benchmarks/README.md, session 22). A real run approved by it compares, at plan time in the
freezing transaction, its live target rows with those values, null-safe and set-based
(``hold_back_drift``): drifted driving rows leave the target set (neither backed up nor
transformed: left as they are, the next dry run shows them again) and are rejected
(``data_patch_rejects``, check ``DRIFTED``) with their before / approved / now values; above
``max_drift_percent`` of the target set the run is refused before any write. Fingerprints go
once they can approve nothing (a later dry run of the patch drops those used by a commit or
older than ``plan_valid_hours``) and with the purge.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

from sqlalchemy import (
    delete,
    func,
    insert,
    inspect,
    literal,
    or_,
    select,
    union,
)
from sqlalchemy.engine import Connection, Engine

from patch_ops import state
from patch_ops.database import catalog, write_transaction
from patch_ops.dialects.functions import values_differ
from patch_ops.execution import (
    ROWCOUNT,
    PlanRefused,
    jsonable,
    load_execution,
    set_execution,
    utcnow,
)
from patch_ops.patch import Patch, PatchSettings
from patch_ops.state import (
    BACKUP,
    DRIFTED,
    UPDATE,
    executions,
    mirror_name,
    rejects,
)
from patch_ops.target_sets import TargetSet, target_sets
from patch_ops.work_rows import (
    OWN_WORK_ROWS,
    WorkRows,
    delete_work_rows,
    drop_own_tables,
    existing_rows,
)

#: The mirror kind earlier versions kept fingerprints in: still dropped with them (the purge).
APPROVED = "approved"
#: Where an approving dry run's fingerprint is (``approval_fingerprint.kept_in`` of its report):
#: its own backup rows and staged updates. Earlier versions copied them to ``APPROVED``.
KEPT_IN = "work rows"
#: Columns the application keeps moving by itself (Rails timestamps); with ``*_count`` counter
#: caches they are not drift unless a patch declares them.
BOOKKEEPING = ("created_at", "updated_at")
#: Drifted driving rows named in reports and refusals; driving rows per page when held back.
SAMPLE, PAGE = 10, 500
#: Phases of a real run whose changes reached the live tables: its approval is used up.
USED_PHASES = ("committed", "verified", "restored")


def drift_columns(patch: Patch) -> dict[str, tuple[str, ...]]:
    """Per table, the columns whose change since approval is drift (module docstring)."""
    if patch.drift_columns is not None:
        return {t: tuple(c) for t, c in patch.drift_columns.items() if c}
    out: dict[str, tuple[str, ...]] = {}
    for table, cols in patch.updates.items():
        keep = [c for c in cols if c not in BOOKKEEPING and not c.endswith("_count")]
        fk = patch.related.get(table)
        if keep and fk and fk not in keep:
            keep.append(fk)
        if keep:
            out[table] = tuple(keep)
    return out


def _source_of(patch: Patch, table: str, mirror: WorkRows) -> Any:
    """The driving row id of a row of ``table`` (None: it cannot be traced to one)."""
    if table == patch.driving_table:
        return mirror.seq
    fk = patch.related.get(table)
    return mirror.c[fk] if fk else literal(None)


# ---------------------------------------------------------------------------------------------
# The dry run: keep what it read and would write
# ---------------------------------------------------------------------------------------------


def keep_fingerprint(
    engine: Engine, patch: Patch, settings: PatchSettings, execution_id: str
) -> list[str]:
    """At the end of a dry run: record that its backup rows and staged updates of the tables
    with drift columns stay as its fingerprint (idempotent), and drop the work rows of the
    patch's dry runs that can approve nothing any more. Returns those tables, for
    ``finish_execution``: none for a patch that needs no approval (everything is dropped)."""
    if not settings.require_approved_plan:
        return []
    cols = drift_columns(patch)
    live = state.reflect_tables(engine, patch.tables())
    for table, names in cols.items():
        missing = sorted(set(names) - set(live[table].c.keys()))
        if missing:
            raise PlanRefused(f"drift column(s) missing in table {table!r}: {', '.join(missing)}")
    with write_transaction(engine) as conn:
        ex = load_execution(conn, execution_id)
        own = _forget_unusable(conn, patch, execution_id, settings.plan_valid_hours)
        backed_up = (ex["report"] or {}).get("backup") or {}
        report = dict(ex["report"] or {})
        report["approval_fingerprint"] = {
            "columns": {t: list(c) for t, c in cols.items()},
            "rows": {t: int(backed_up.get(t, 0)) for t in cols},
            "kept_in": KEPT_IN,
        }
        set_execution(conn, execution_id, report=report)
    drop_own_tables(engine, own, patch.tables())  # after that commit (DDL commits on MySQL)
    return list(cols)


def _forget_unusable(conn: Connection, patch: Patch, current: str, valid_hours: float) -> list[str]:
    """Drop the fingerprints of this patch's earlier dry runs that can approve nothing: not
    completed, older than ``valid_hours``, or used by a real run that committed (a cancelled
    one's work rows stay: a run with its config continues it). Their ids are read first and
    deleted by key (``delete_work_rows``). Returns those whose work rows are tables of their
    own that still stand, for the caller to drop after its transaction."""
    real = executions.alias("real")
    used = (
        select(real.c.execution_id)
        .where(real.c.approved_by_execution_id == executions.c.execution_id,
               real.c.phase.in_(USED_PHASES))
        .exists()
    )
    gone = conn.execute(select(executions.c.execution_id, executions.c.status,
                               executions.c.storage).where(
        executions.c.patch_name == patch.name,
        executions.c.dry_run.is_(True),  # only a dry run keeps a fingerprint
        executions.c.execution_id != current,
        executions.c.completed_at.is_not(None),
        or_(
            executions.c.status != "completed",
            executions.c.completed_at < utcnow() - dt.timedelta(hours=valid_hours),
            used,
        ),
    )).all()
    kept = [(i, (storage or 0) >= OWN_WORK_ROWS) for i, status, storage in gone
            if status == "completed"]
    legacy = [i for i, *_ in gone]
    for table in patch.tables():
        delete_work_rows(conn, table, [i for i, own in kept if not own])
        mirror = state.mirror_by_name(conn, mirror_name(APPROVED, table)) if legacy else None
        if mirror is not None:
            for at in range(0, len(legacy), PAGE):
                page = legacy[at : at + PAGE]
                conn.execute(delete(mirror).where(mirror.c.dp_execution_id.in_(page)))
    return [i for i, own in kept if own]


def drop_fingerprint(conn: Connection, execution_id: str, tables: list[str]) -> int:
    """Remove an execution's fingerprint (the purge); returns the rows removed."""
    n = 0
    for table in tables:
        fp = state.mirror_by_name(conn, mirror_name(APPROVED, table))
        if fp is not None:
            n += conn.execute(
                delete(fp).where(fp.c.dp_execution_id == execution_id),
                execution_options=ROWCOUNT,
            ).rowcount
    return n


# ---------------------------------------------------------------------------------------------
# The real run: compare, hold back, or refuse
# ---------------------------------------------------------------------------------------------


class _Compare:
    """The drift queries of one real run against its approving dry run's fingerprint: that run's
    backup rows (what it read) and staged updates (what it would write)."""

    def __init__(self, conn: Connection, patch: Patch, execution_id: str, approver: str):
        self.patch, self.execution_id, self.approver = patch, execution_id, approver
        self.cols = drift_columns(patch)
        self.live = dict(state.reflect_tables(conn, patch.tables()))
        self.fps: dict[str, WorkRows] = {}
        self.staged: dict[str, WorkRows] = {}
        self.frozen: dict[str, TargetSet] = target_sets(conn, execution_id, patch.tables())
        for table, names in self.cols.items():
            missing = sorted(set(names) - set(self.live[table].c.keys()))
            if missing:
                raise PlanRefused(
                    f"drift column(s) missing in table {table!r}: {', '.join(missing)}"
                )
            fp = existing_rows(conn, table, approver, BACKUP)
            st = existing_rows(conn, table, approver, UPDATE)
            if fp is None or st is None or not set(names) <= set(fp.c.keys()):
                raise PlanRefused(f"approving dry run {approver} kept no record of its values")
            self.fps[table], self.staged[table] = fp, st

    def source(self, table: str, b: Any) -> Any:
        """The driving row id of fingerprint row ``b`` of ``table`` (None: none)."""
        return _source_of(self.patch, table, b)

    def drifted(self, table: str, *extra: Any) -> Any:
        """SELECT ``extra`` from the target rows of ``table`` that drifted (live vs before).

        The driving table's are read from the fingerprint and the live rows alone: the approving
        dry run's plan hash has this run's target ids (``patch_ops.approval``), so its backup
        rows there are this run's targets, and a driving row leaves the targets only with its
        own page of drifted rows (``_leave_targets``). Joining the target set as well read every
        target a third time. A related table's rows may leave with another driving row's page
        (their link drifted): those still go through the target set."""
        live, fp = self.live[table], self.fps[table]
        b = fp.alias("b")
        changed = [values_differ(live.c[c], b.c[c], live.c[c]) for c in self.cols[table]]
        if table == self.patch.driving_table:
            return (
                select(*extra)
                .select_from(b.table.join(live, live.c.id == b.seq))
                .where(b.mine, or_(*changed))
            ), b
        frozen = self.frozen[table]
        return (
            select(*extra)
            .select_from(
                frozen.table.join(live, live.c.id == frozen.row_id).join(
                    b.table, b.at(live.c.id),
                )
            )
            .where(frozen.mine, or_(*changed))
        ), b

    def sources(self) -> Any:
        """The distinct driving row ids of every drifted row, as a subquery (column ``s``)."""
        parts = []
        for table in self.cols:
            q, b = self.drifted(table)
            parts.append(q.add_columns(self.source(table, b).label("s")))
        return union(*parts).subquery()

    def describe(self, conn: Connection, ids: list[int]) -> dict[int, str]:
        """Per driving row: ``table id: col before X, approved Y, now Z`` of each drifted row."""
        out: dict[int, list[str]] = {i: [] for i in ids}
        for table, names in self.cols.items():
            live = self.live[table]
            q, b = self.drifted(table)
            u = self.staged[table].alias("u")
            src = self.source(table, b)
            q = (
                q.add_columns(src, live.c.id, *[live.c[c] for c in names],
                              *[b.c[c] for c in names], *[u.c[c] for c in names],
                              u.seq.label("staged"))
                .outerjoin(u.table, u.at(live.c.id))
                .where(src.in_(ids))
                .order_by(src, live.c.id)
            )
            k = len(names)
            for row in conn.execute(q):
                now, before, after = row[2 : 2 + k], row[2 + k : 2 + 2 * k], row[2 + 2 * k : -1]
                staged = row[-1] is not None
                cells = [
                    f"{c} before {jsonable(bv)}, approved "
                    f"{jsonable(av if staged and c in self.patch.updates.get(table, ()) else bv)}"
                    f", now {jsonable(nv)}"
                    for c, nv, bv, av in zip(names, now, before, after, strict=True)
                    if jsonable(nv) != jsonable(bv)
                ]
                out.setdefault(int(row[0]), []).append(f"{table} {row[1]}: " + ", ".join(cells))
        return {i: "; ".join(v) for i, v in out.items()}


def hold_back_drift(
    conn: Connection, patch: Patch, settings: PatchSettings, execution_id: str, approver: str
) -> dict[str, Any]:
    """In the real run's freezing transaction: find its target rows whose drift columns changed
    since approving dry run ``approver``; hold back their driving rows (rejected with before /
    approved / now, out of the target set), or refuse above ``max_drift_percent``. Returns the
    report's ``drift`` section."""
    ex = load_execution(conn, execution_id)
    dry = load_execution(conn, approver)
    cols = drift_columns(patch)
    kept = (dry.get("report") or {}).get("approval_fingerprint") or {}
    if kept.get("columns") != {t: list(c) for t, c in cols.items()} or (
        kept.get("kept_in") != KEPT_IN
    ):
        raise PlanRefused(
            f"approving dry run {approver} kept no record of the values it read and would write "
            f"in the drift columns ({_columns(cols)}), so drift since approval cannot be "
            "measured: run a new dry run, read its report, then the real run"
        )
    total = int(ex["target_count"])
    allowed = math.floor(total * settings.max_drift_percent / 100 + 1e-9)
    section: dict[str, Any] = {
        "approved_by": approver, "columns": {t: list(c) for t, c in cols.items()}, "count": 0,
        "targets": total, "percent": 0.0, "max_percent": settings.max_drift_percent,
        "sample": [],
    }
    if not cols:
        return section
    cmp = _Compare(conn, patch, execution_id, approver)
    src = cmp.sources()
    count = int(conn.execute(select(func.count()).select_from(src)).scalar_one())
    if not count:
        return section
    first = [r[0] for r in conn.execute(select(src.c.s).order_by(src.c.s).limit(SAMPLE))]
    if None in first:
        raise PlanRefused(
            f"rows changed since approving dry run {approver} in {_columns(cols)} that belong to "
            "no driving row, so they cannot be held back; nothing was written: run a new dry run"
        )
    values = cmp.describe(conn, [int(i) for i in first])
    sample = [{"source_id": int(i), "values": values.get(int(i), "")} for i in first]
    percent = round(100 * count / max(total, 1), 2)
    section.update(count=count, percent=percent, sample=sample)
    driving = patch.driving_table
    rows = ", ".join(f"{s['source_id']} ({s['values']})" for s in sample)
    if count > len(sample):
        rows += f", … {count - len(sample):,} more"
    if count > allowed:
        raise PlanRefused(
            f"{count:,} of {total:,} {driving} rows ({percent:g} %) changed since approving dry "
            f"run {approver} in what the patch reads or writes ({_columns(cols)}), more than "
            f"max_drift_percent ({settings.max_drift_percent:g} % of {total:,}: {allowed:,} "
            f"rows); nothing was written: rows {rows}: run a new dry run, read its report, then "
            "the real run",
            {"report": {"drift": section}},
        )
    last: int | None = None
    while True:
        q = select(src.c.s).order_by(src.c.s).limit(PAGE)
        if last is not None:
            q = q.where(src.c.s > last)
        page = [int(r[0]) for r in conn.execute(q)]
        if not page:
            break
        last = page[-1]
        described = cmp.describe(conn, page)
        conn.execute(insert(rejects), [
            {"execution_id": execution_id, "source_id": i, "table_name": driving,
             "column_name": None, "check_name": DRIFTED,
             "failure_case": f"changed since approving dry run {approver} | {described[i]}"}
            for i in page
        ])
        _leave_targets(conn, cmp, page)
    report = dict(ex["report"] or {})
    report["targets"] = {
        t: int(conn.execute(select(func.count()).select_from(cmp.frozen[t].ids().subquery()))
               .scalar_one())
        for t in (report.get("targets") or {})
    }
    report["drift"] = section
    set_execution(conn, execution_id, target_count=total - count, report=report)
    return section


def _leave_targets(conn: Connection, cmp: _Compare, page: list[int]) -> None:
    """Take driving rows ``page`` and their related rows out of the real run's target set."""
    patch = cmp.patch
    driving = cmp.frozen[patch.driving_table]
    conn.execute(delete(driving.table).where(driving.mine, driving.row_id.in_(page)))
    for table, fk in patch.related.items():
        live = cmp.live[table]
        ids: Any = select(live.c.id).where(live.c[fk].in_(page))
        fp = cmp.fps.get(table)
        if fp is not None:  # also where the link itself drifted: the dry run's
            ids = union(ids, fp.select_seq().where(cmp.source(table, fp).in_(page)))
        frozen = cmp.frozen[table]
        conn.execute(delete(frozen.table).where(frozen.mine, frozen.row_id.in_(ids)))


def _columns(cols: dict[str, tuple[str, ...]]) -> str:
    return ", ".join(f"{t}.{c}" for t, names in cols.items() for c in names) or "none"


def drift_markdown(drift: dict[str, Any] | None) -> list[str]:
    """The impact report's section of the rows held back as drifted since approval."""
    if not drift or not drift.get("count"):
        return []
    n = drift["count"]
    lines = [
        "", f"### Changed since approval: {n:,} row(s) held back (not changed)", "",
        f"**Warning**: what the patch reads or writes of them ({_columns(drift['columns'])}) "
        f"changed since approving dry run {drift['approved_by']} ({drift['percent']:g} % of "
        f"{drift['targets']:,} rows; at most {drift['max_percent']:g} % may be). They are left "
        f"as they are; a new dry run shows their current values. All of them: "
        f"data_patch_rejects, check_name '{DRIFTED}'.",
        "", "| source_id | before, approved, now |", "|---|---|",
        *[f"| {s['source_id']} | {s['values']} |" for s in drift["sample"]],
    ]
    if n > len(drift["sample"]):
        lines += ["", f"… and {n - len(drift['sample']):,} more"]
    return lines


# ---------------------------------------------------------------------------------------------
# The schema of the touched tables
# ---------------------------------------------------------------------------------------------


def schema_of(conn: Connection, names: list[str] | tuple[str, ...]) -> dict[str, dict[str, str]]:
    """Per table, what of its reflected schema decides what a write does: ``label →
    definition`` for every column, the keys, unique constraints and indexes, CHECKs. Read
    through the op's catalog (one inspector), one catalog query per kind for all the tables."""
    known = catalog(conn)
    insp = known.inspector if known.cached else inspect(conn)
    tables = sorted(set(names))
    columns = insp.get_multi_columns(filter_names=tables)
    present = [n for n in tables if (None, n) in columns]
    if not present:
        return {}
    keys = insp.get_multi_pk_constraint(filter_names=present)
    foreign = insp.get_multi_foreign_keys(filter_names=present)
    unique = _optional(insp.get_multi_unique_constraints, present)
    checks = _optional(insp.get_multi_check_constraints, present)
    indexes = insp.get_multi_indexes(filter_names=present)
    out: dict[str, dict[str, str]] = {}
    for name in present:
        at = (None, name)
        items: dict[str, str] = {}
        for c in columns[at]:
            default = f" DEFAULT {c['default']}" if c.get("default") is not None else ""
            null = "NULL" if c.get("nullable", True) else "NOT NULL"
            items[f"column {c['name']}"] = f"{_type(c['type'], conn)} {null}{default}"
        pk: dict[str, Any] = dict(keys.get(at) or {})
        if pk.get("constrained_columns"):
            items["primary key"] = ", ".join(pk["constrained_columns"])
        for fk in foreign.get(at, []):
            cols = ", ".join(fk["constrained_columns"])
            ref = f"{fk['referred_table']} ({', '.join(fk['referred_columns'])})"
            opts = " ".join(f"{k} {v}" for k, v in sorted((fk.get("options") or {}).items()))
            items[f"foreign key {fk.get('name') or cols}"] = f"({cols}) → {ref} {opts}".strip()
        for uq in unique.get(at, []):
            cols = ", ".join(str(c) for c in uq["column_names"])
            items[f"unique constraint {uq.get('name') or cols}"] = f"({cols})"
        for ck in checks.get(at, []):
            text = " ".join(str(ck["sqltext"]).split())
            items[f"check constraint {ck.get('name') or text}"] = text
        for ix in indexes.get(at, []):
            if ix.get("unique"):
                cols = ", ".join(str(c) for c in ix["column_names"])
                items[f"unique index {ix.get('name') or cols}"] = f"({cols})"
        out[name] = dict(sorted(items.items()))
    return out


def _type(t: Any, conn: Connection) -> str:
    try:
        return str(t.compile(dialect=conn.dialect))
    except Exception:  # noqa: BLE001 - a type SQLAlchemy reflects but cannot render
        return type(t).__name__


def _optional(getter: Any, names: list[str]) -> dict[Any, list[dict[str, Any]]]:
    try:
        return dict(getter(filter_names=names))
    except NotImplementedError:
        return {}


def schema_changes(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """What changed between two ``schema_of`` entries of one table, one phrase each."""
    out = [f"{k} added" for k in new if k not in old]
    out += [f"{k} removed" for k in old if k not in new]
    out += [f"{k} changed ({old[k]} → {new[k]})" for k in new if k in old and old[k] != new[k]]
    return out
