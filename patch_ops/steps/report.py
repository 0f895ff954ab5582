"""The impact report: counts, before/after sums, the spread of each numeric change, samples,
the patch's own report sections, rendered as Markdown. It is what a dry run exists to show."""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any

from sqlalchemy import Integer, Numeric, case, func, select
from sqlalchemy.engine import Engine

from patch_ops import state
from patch_ops.charts import ChangeSpread, below_edges, change_histogram, histogram_markdown
from patch_ops.execution import HELD_BACK, config_of, jsonable, load_execution, run_context
from patch_ops.patch import Patch
from patch_ops.state import BACKUP, DRIFTED, INSERT, UPDATE
from patch_ops.steps.drift import drift_markdown
from patch_ops.steps.result import SAMPLE_ROWS, Aggregates, ResultView
from patch_ops.work_rows import work_rows

SECTION_ROWS = 1000  # rows of each extra report section kept in the JSON report
SECTION_ROWS_MD = 50  # ... and shown in the Markdown report


def report_sections(engine: Engine, patch: Patch, ex: dict[str, Any]) -> dict[str, Any]:
    """The patch's extra report lists (Patch.report_sections): count and first rows of each."""
    ctx = run_context(ex)
    tables = state.reflect_tables(engine, patch.tables())
    out: dict[str, Any] = {}
    with engine.connect() as conn:
        for title, sel in patch.report_sections(tables, config_of(patch, ex), ctx).items():
            n = conn.execute(
                select(func.count()).select_from(sel.order_by(None).subquery())
            ).scalar_one()
            rows = conn.execute(sel.limit(SECTION_ROWS)).mappings()
            out[title] = {"count": n, "rows": [{k: jsonable(v) for k, v in r.items()} for r in rows]}
    return out


def reject_sample(engine: Engine, execution_id: str) -> list[dict[str, Any]]:
    rj = state.rejects
    with engine.connect() as conn:
        rows = conn.execute(
            select(rj.c.source_id, rj.c.table_name, rj.c.column_name, rj.c.check_name, rj.c.failure_case)
            .where(rj.c.execution_id == execution_id,
                   rj.c.check_name.not_in([HELD_BACK, DRIFTED]))
            .order_by(rj.c.source_id)
            .limit(SAMPLE_ROWS)
        ).mappings()
        return [dict(r) for r in rows]


#: Bucket edges guessed for the histograms of an execution's report: table -> column -> edges.
Edges = Mapping[str, Mapping[str, list[float]]]


def change_aggregates(rows: Any, numeric: list[str], edges: Mapping[str, list[float]]) -> list[Any]:
    """Over the updated rows (``ResultView.updated``): the count, and per numeric column the
    sums before and after, the spread of the change and what its histogram needs of it (so
    the histogram does not pass again for that): with ``edges`` guessed for the column, the
    changes below each (``below_edges``)."""
    aggs: list[Any] = [func.count()]
    for c in numeric:
        change = rows.c[c] - rows.c[f"before_{c}"]
        aggs += [func.sum(rows.c[f"before_{c}"]), func.sum(rows.c[c]), func.min(change),
                 func.max(change), func.count(change), func.count(case((change == 0, 1)))]
        aggs += below_edges(change, edges.get(c, []))
    return aggs


def report_aggregates(view: ResultView, edges: Edges | None = None) -> Aggregates:
    """What the impact report counts and sums over the rows an execution updates and inserts:
    the invariants' passes over the same rows compute it too (``invariant_checks``); with the
    histograms' ``edges`` guessed (``approved_edges``), their counts too."""
    decl = view.declaration
    out: Aggregates = {}
    for table, cols in decl["updates"].items():
        rows = view.updated(table)
        numeric = [c for c in cols if _is_numeric(view.tables[table].c[c])]
        guessed = (edges or {}).get(table, {})
        out[f"updates:{table}"] = (rows, change_aggregates(rows, numeric, guessed))
    for table in decl["inserts"]:
        out[f"inserts:{table}"] = (view.inserted(table), [func.count()])
    return out


def approved_edges(engine: Engine, approver: str | None) -> Edges:
    """The bucket edges of the histograms in the report of ``approver``, the dry run that
    approved a real run: the same plan, so most likely the edges of the real run's own
    histograms, which its impact report then counts in its pass over the updated rows
    (``change_histogram`` keeps those counts only if the edges are the ones it picks). Only a
    guess: none when there is no such report."""
    if not approver:
        return {}
    runs = state.executions
    with engine.connect() as conn:
        report = conn.execute(
            select(runs.c.report).where(runs.c.execution_id == approver)
        ).scalar() or {}
    return {
        table: {c: [float(e) for e in h["edges"]]
                for c, h in (upd.get("histograms") or {}).items() if h.get("edges")}
        for table, upd in (report.get("updates") or {}).items()
    }


def build_report(
    engine: Engine,
    execution_id: str,
    computed: Mapping[str, Future[Any]] | None = None,
    edges: Edges | None = None,
) -> dict[str, Any]:
    """Counts, before/after sums and min/max change of every changed numeric column, samples.

    ``computed``: the rows of ``report_aggregates`` (with the histograms' guessed ``edges``)
    the invariants' passes computed (one that is None, or missing, is computed here)."""
    with engine.connect() as conn:
        ex = load_execution(conn, execution_id)
    decl = ex["declaration"]
    tables = state.reflect_tables(engine, decl["tables"])
    edges = edges or {}
    wanted = report_aggregates(ResultView(engine, tables, execution_id, False, decl, ex), edges)
    report: dict[str, Any] = {
        "patch": ex["patch_name"],
        "execution_id": execution_id,
        "dry_run": bool(ex["dry_run"]),
        "targets": (ex["report"] or {}).get("targets", {}),
        "processed_records": int(ex["processed_records"]),
        "failed_records": int(ex["failed_records"]),
        "updates": {},
        "inserts": {},
    }
    with engine.connect() as conn:

        def aggregated(key: str) -> Any:
            row = computed[key].result() if computed and key in computed else None
            if row is None:
                source, cols = wanted[key]
                row = conn.execute(select(*cols).select_from(source)).one()
            return row

        for table, cols in decl["updates"].items():
            live = tables[table]
            st = work_rows(engine, live, execution_id, UPDATE)
            bk = work_rows(engine, live, execution_id, BACKUP)
            joined = st.table.join(bk.table, bk.at(st.seq))
            numeric = [c for c in cols if _is_numeric(live.c[c])]
            rows, *vals = aggregated(f"updates:{table}")
            guessed = edges.get(table, {})
            stats: dict[str, Any] = {}
            spreads: dict[str, ChangeSpread] = {}
            counted: dict[str, tuple[list[float], list[int]]] = {}
            at = 0
            for c in numeric if rows else ():
                s_before, s_after, d_min, d_max, n, unchanged = vals[at : at + 6]
                at += 6
                stats[c] = {
                    "sum_before": _num(s_before),
                    "sum_after": _num(s_after),
                    "min_change": _num(d_min),
                    "max_change": _num(d_max),
                }
                spreads[c] = ChangeSpread(d_min, d_max, n, unchanged)
                if c in guessed:
                    inner = len(guessed[c][1:-1])  # as below_edges counts them
                    counted[c] = (guessed[c], list(vals[at : at + inner]))
                    at += inner
            sample = conn.execute(
                select(st.seq.label("id"), *[bk.c[c].label(f"{c}_before") for c in cols],
                       *[st.c[c].label(f"{c}_after") for c in cols])
                .select_from(joined)
                .where(st.mine)
                .order_by(st.seq)
                .limit(SAMPLE_ROWS)
            ).mappings()
            report["updates"][table] = {
                "rows": rows,
                "columns": list(cols),
                "stats": stats,
                "sample": [{k: jsonable(v) for k, v in r.items()} for r in sample],
                # The distribution of each numeric change that is not the same for every row.
                "histograms": {
                    c: change_histogram(conn, st, bk, c, spread=spreads[c],
                                        counted=counted.get(c)).to_json()
                    for c, s in stats.items()
                    if s["min_change"] != s["max_change"]
                },
            }
        for table, cols in decl["inserts"].items():
            st = work_rows(engine, tables[table], execution_id, INSERT)
            rows = aggregated(f"inserts:{table}")[0]
            sample = conn.execute(
                select(*[st.c[c] for c in cols]).where(st.mine).order_by(st.seq).limit(SAMPLE_ROWS)
            ).mappings()
            report["inserts"][table] = {
                "rows": rows,
                "sample": [{k: jsonable(v) for k, v in r.items()} for r in sample],
            }
    return report


def _is_numeric(col) -> bool:  # type: ignore[no-untyped-def]
    try:
        return col.type.python_type in (int, float) or isinstance(col.type, Numeric | Integer)
    except NotImplementedError:
        return False


def _num(v: Any) -> float | int | None:
    if v is None:
        return None
    f = float(v)
    return int(f) if f.is_integer() else round(f, 2)


def render_markdown(ex: dict[str, Any], report: dict[str, Any]) -> str:
    mode = "DRY RUN, nothing committed" if ex["dry_run"] else "REAL RUN"
    lines = [
        f"## {ex['patch_name']}: impact report, {mode}",
        "",
        f"Execution `{ex['execution_id']}`",
        "",
        "| measure | value |",
        "|---|---|",
    ]
    if report.get("targets") is not None and not any(report["targets"].values()):
        lines[2:2] = ["**Nothing to do**: no row matches the patch's selection.", ""]
    for table, n in report.get("targets", {}).items():
        lines.append(f"| {table} rows selected | {n:,} |")
    for table, u in report["updates"].items():
        lines.append(f"| {table} rows changed | {u['rows']:,} |")
        for col, s in u["stats"].items():
            lines.append(f"| sum of {col} before | {_fmt(s['sum_before'])} |")
            lines.append(f"| sum of {col} after | {_fmt(s['sum_after'])} |")
            lines.append(f"| min / max change of {col} | {_fmt(s['min_change'])} / {_fmt(s['max_change'])} |")
    for table, i in report["inserts"].items():
        lines.append(f"| {table} rows inserted | {i['rows']:,} |")
    lines.append(f"| rows rejected by validation | {report.get('failed_records', 0):,} |")
    held = report.get("held_back") or {}
    if held.get("count"):
        lines.append(f"| rows held back (the database would refuse them) | {held['count']:,} |")
    drift = report.get("drift") or (ex.get("report") or {}).get("drift") or {}
    if drift.get("count"):
        lines.append(f"| rows held back (changed since approval) | {drift['count']:,} |")
    v = report.get("validation")
    if v is not None:
        lines.append(f"| validation | {'passed' if v['passed'] else 'FAILED'} |")
    for table, u in report["updates"].items():
        if not u["sample"]:
            continue
        cols = u["columns"]
        lines += ["", f"### Sample of changed {table} rows", ""]
        lines.append("| id | " + " | ".join(cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        for r in u["sample"]:
            cells = [f"{_fmt(r[f'{c}_before'])} → {_fmt(r[f'{c}_after'])}" for c in cols]
            lines.append(f"| {r['id']} | " + " | ".join(cells) + " |")
    for table, i in report["inserts"].items():
        if i["sample"]:
            lines += ["", f"### Sample of {table} rows to insert", ""]
            cols = list(i["sample"][0])
            lines.append("| " + " | ".join(cols) + " |")
            lines.append("|" + "---|" * len(cols))
            for r in i["sample"]:
                lines.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    for u in report["updates"].values():
        for col, hist in u.get("histograms", {}).items():
            lines += ["", histogram_markdown(hist, title=f"Distribution of {col} changes").rstrip()]
    if v is not None and v["problems"]:
        lines += ["", "### Validation problems", ""] + [f"- {p}" for p in v["problems"]]
        for b in v.get("invariants", []):
            if b["count"] is not None:
                lines += ["", f"#### Rows breaking {b['name']} (first {len(b['sample'])} of "
                          f"{b['count']:,})", "", *md_table(b["sample"])]
        if held.get("sample") and not held.get("count"):
            lines += ["", f"#### Rows the database refuses (first {len(held['sample'])} of "
                      f"{'at least ' if not held['search']['complete'] else ''}"
                      f"{held['refused']:,})", "", *md_table(held["sample"])]
        if v.get("rejects"):
            lines += ["", "#### Rows rejected by the schemas (first "
                      f"{len(v['rejects'])})", "", *md_table(v["rejects"])]
    lines += held_back_markdown(held)
    lines += drift_markdown(drift)
    for title, sec in report.get("sections", {}).items():
        lines += ["", f"### {title}: {sec['count']:,}"]
        if sec["rows"]:
            lines += ["", *md_table(sec["rows"][:SECTION_ROWS_MD])]
        if sec["count"] > SECTION_ROWS_MD:
            lines += ["", f"… and {sec['count'] - SECTION_ROWS_MD:,} more (the JSON report "
                      f"keeps the first {min(sec['count'], SECTION_ROWS):,})"]
    return "\n".join(lines) + "\n"


def held_back_markdown(held: dict[str, Any]) -> list[str]:
    """The report's "held back" section: driving rows left unchanged because the database would
    refuse their changes (``patch_ops.steps.holdback``)."""
    if not held.get("count"):
        return []
    n = held["count"]
    why = (f"as approving dry run {held['approved_by']} held them back"
           if held.get("approved_by") else
           f"{held['percent']:g} % of {held['targets']:,} driving rows; at most "
           f"{held.get('max_percent', 0):g} % may be held back")
    lines = [
        "", f"### Held back: {n:,} row(s) the database would refuse (not changed)", "",
        f"**Warning**: {why}. They are rejected like the schemas' rejects and left as they "
        f"are; the next run of the patch tries them again. `{held['list']}` lists them all.",
        "", *md_table(held["sample"]),
    ]
    if n > len(held["sample"]):
        lines += ["", f"… and {n - len(held['sample']):,} more"]
    return lines


def md_table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    cols = list(rows[0])
    return [
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
        *["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows],
    ]


def _fmt(v: Any) -> str:
    """A value for a Markdown cell: a number as in messages, text escaped."""
    if v is None or (isinstance(v, int | float) and not isinstance(v, bool)):
        return _plain(v)
    return markdown_text(str(v))


#: Characters that would break a Markdown table cell out of its cell or its row, or turn into
#: HTML where the report is rendered (Dagster's UI).
MARKDOWN_SPECIAL = frozenset("\\|<>`")


def markdown_text(text: str) -> str:
    """A value as literal text in a Markdown table cell: cell-breaking characters escaped, and
    newlines, tabs and other control characters shown as escapes (one value, one line)."""
    out = []
    for c in text:
        if c in MARKDOWN_SPECIAL:
            out.append("\\" + c)
        elif not c.isprintable():
            out.append(c.encode("unicode_escape").decode("ascii"))
        else:
            out.append(c)
    return "".join(out)



def impact_lines(report: dict[str, Any] | None) -> list[str]:
    """The impact report in a few plain lines, for messages: rows per table and the sums of
    every changed numeric column before and after."""
    if not isinstance(report, dict):
        return []
    lines = []
    for table, u in (report.get("updates") or {}).items():
        if not isinstance(u, dict) or "rows" not in u:
            continue  # another kind of report (restore, purge)
        lines.append(f"{table}: {u['rows']:,} rows")
        for col, s in (u.get("stats") or {}).items():
            lines.append(f"{table}.{col}: sum {_plain(s['sum_before'])} → {_plain(s['sum_after'])}"
                         f" (change {_plain(s['min_change'])} to {_plain(s['max_change'])} per row)")
    for table, i in (report.get("inserts") or {}).items():
        if isinstance(i, dict) and "rows" in i:
            lines.append(f"{table}: {i['rows']:,} rows inserted")
    failed = report.get("failed_records")
    if failed:
        lines.append(f"rejected by validation: {failed:,} rows")
    held = report.get("held_back") or {}
    if isinstance(held, dict) and held.get("count"):
        lines.append(f"held back (the database would refuse them, not changed): "
                     f"{held['count']:,} rows; list: {held.get('list')}")
    drift = report.get("drift") or {}
    if isinstance(drift, dict) and drift.get("count"):
        lines.append(f"held back (changed since approving dry run {drift.get('approved_by')}, "
                     f"not changed): {drift['count']:,} rows")
    return lines


def _plain(v: Any) -> str:
    """A number for a plain-text message (no Markdown escapes)."""
    if v is None:
        return "∅"
    if isinstance(v, float):
        return f"{int(v):,}" if v.is_integer() else f"{v:,.2f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def log_summary(ex: dict[str, Any]) -> str:
    """One event-log line for an execution's impact report: the event log shows text, not
    Markdown; the rendered report is the step's ``impact_report`` metadata."""
    mode = "dry run, nothing committed" if ex["dry_run"] else "real run"
    lines = impact_lines(ex.get("report"))
    body = "; ".join(lines) if lines else "nothing to change"
    return f"impact report ({mode}): {body} (the full report: impact_report in the metadata)"
