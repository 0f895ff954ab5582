"""The printed reports' pieces: Markdown tables, a contender's row, a job run's time per op and
its largest process, and how long seeding and copying took.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from benchmarks.contenders import Outcome


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; numbers right-aligned."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [
        all(_is_num(r[i]) for r in rows) and len(rows) > 0 for i in range(len(headers))
    ]

    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(
            c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric, strict=True)
        ) + " |"

    sep = "|" + "|".join(
        ("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric, strict=True)
    ) + "|"
    return "\n".join([line(cells[0]), sep, *[line(r) for r in cells[1:]]])


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) or v is None


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if v != v:  # NaN
            return "–"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.2f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def copies_text(res: dict[str, Any]) -> str:
    """How long seeding and the contenders' copies of the seeded data took."""
    text = f" in {res['seed_seconds']:.1f} s" if res.get("seed_seconds") else ""
    copies = res.get("copy_seconds") or []
    if copies:
        text += (f"; {len(copies)} copies of it, {sum(copies):.1f} s in all "
                 f"({min(copies):.1f}–{max(copies):.1f} s each)")
    return text


RSS_FOOTNOTE = (
    "largest process MB: the highest peak RSS of any single process of the child's tree "
    "(per op below); peak RSS MB (tree): the tree's sum at its largest (forked processes share "
    "pages, so the sum counts them more than once); psutil, 50 ms polls, database server not "
    "included."
)


def contender_columns(o: Any, bare: Any, scaled_suffix: str) -> tuple[str, float, float | None, list[Any]]:
    """(name, wall s, work s, the columns after the rate) of one contender's table row.

    A run on a subset has its work scaled to the full set (its start-up is not), and its name
    gets ``scaled_suffix``; failures are marked in the name. The trailing columns are: × bare
    wall, × bare work, client CPU s, DB CPU s, largest process MB, peak RSS MB (tree), procs,
    final data.
    """
    bare_wall = bare.process.wall_s if bare and bare.ok else None
    bare_work = bare.work_s if bare and bare.ok else None
    wall, work, name = o.process.wall_s, o.work_s, o.name
    if o.scale != 1.0:
        startup = wall - (work or 0.0)
        work = (work or 0.0) * o.scale
        wall = startup + work
        name += scaled_suffix
    if not o.ok:
        name += " [FAILED]" if not o.process.timed_out else " [TIMED OUT]"
    tail = [
        wall / bare_wall if bare_wall else None,
        work / bare_work if work and bare_work else None,
        o.cpu_s if o.cpu_s is not None else o.process.cpu_s,
        o.server_cpu_s,
        o.process.largest_process_mb,
        o.process.peak_rss_mb,
        o.process.peak_procs,
        o.check,
    ]
    return name, wall, work, tail


def op_timings_section(o: Outcome) -> list[str]:
    """Markdown lines: a job run's time per op (from its Dagster event log)."""
    lines = ["", f"### {o.name}: time per op", ""]
    if o.notes:
        lines.append("Notes: " + "; ".join(o.notes))
        lines.append("")
    if o.timings is None:
        lines.append("(no Dagster run recorded)")
        return lines
    t = o.timings
    peaks = o.process.peak_rss_by_pid
    op_rows = [
        [s.step, s.status, s.launch_s, s.duration_s,
         100 * s.duration_s / t.run_s if t.run_s == t.run_s and t.run_s else None,
         peaks.get(s.pid) if s.pid else None]
        for s in t.steps
    ]
    lines.append(table(["op", "status", "process start s", "op s", "% of run",
                        "op process peak RSS MB"], op_rows))
    launch = sum(s.launch_s for s in t.steps)
    in_ops = sum(s.duration_s for s in t.steps)
    if t.run_s != t.run_s:  # the run never ended (killed at the timeout)
        lines += ["", f"Finished ops {in_ops:.2f} s, starting op processes {launch:.2f} s; "
                  f"killed after {o.process.wall_s:.0f} s of CLI wall."]
        return lines
    lines += [
        "",
        f"CLI wall {o.process.wall_s:.2f} s = Dagster run {t.run_s:.2f} s (ops "
        f"{in_ops:.2f} s, starting op processes {launch:.2f} s, other "
        f"{t.run_s - in_ops - launch:.2f} s) + {o.process.wall_s - t.run_s:.2f} s CLI "
        "start-up/code location load/teardown.",
    ]
    if o.execution and o.execution.get("peak_rss_mb"):
        lines[-1] += f" transform_batches peak RSS {o.execution['peak_rss_mb']:.0f} MB."
    lines[-1] += " " + largest_process_text(o)
    return lines


def largest_process_text(o: Outcome) -> str:
    """Which process of a run's tree peaked highest: an op's, the CLI's, or another."""
    peaks = o.process.peak_rss_by_pid
    if not peaks:
        return ""
    pid = max(peaks, key=peaks.__getitem__)
    steps = [s.step for s in (o.timings.steps if o.timings else []) if s.pid == pid]
    role = f"op {steps[0]}" if steps else ("the CLI" if pid == o.process.root_pid else
                                           "a helper process (fork server, compute log)")
    return (f"Largest single process: {peaks[pid]:.0f} MB ({role}); {len(peaks)} processes "
            "seen in the tree.")
