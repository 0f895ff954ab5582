"""The price benchmark's report: per round, every contender's row, the safety floor's steps,
the job runs' time per op and the bounds the floors set; with several rounds, their medians
first (``benchmarks.rounds``).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from benchmarks import report
from benchmarks.contenders import Outcome
from benchmarks.price_contenders import FLOORS, fmt_price
from benchmarks.rounds import summary

ORDER = ("bare", "naive", *FLOORS, "dagster", "job_dry", "job_real", "against_dry",
         "against_real", "zero_dry", "zero_real")


def bounds(outs: dict[str, Outcome]) -> list[str]:
    """What the measured floors allow, next to the targets (≥ 100× naive, ≤ 2× bare SQL)."""
    bare, naive, floor, empty = (outs.get(k) for k in ("bare", "naive", "floor", "dagster"))
    if not (bare and bare.ok and bare.work_s):
        return []
    lines = []
    if naive and naive.ok and naive.work_s and naive.rows:
        ratio = (bare.rows / bare.work_s) / (naive.rows / naive.work_s)
        lines.append(
            f"- bare SQL makes the changes at {ratio:.1f}× the naive baseline's rows/min (work): "
            "the most any contender that makes them with set-based SQL can expect (target for "
            "the job: ≥ 100×)."
        )
    if floor and floor.ok and empty and empty.ok:
        least = floor.process.wall_s + empty.process.wall_s
        lines.append(
            f"- safety floor {floor.process.wall_s:.1f} s + Dagster alone "
            f"{empty.process.wall_s:.1f} s = {least:.1f} s = "
            f"{least / bare.process.wall_s:.2f}× bare SQL's wall ({bare.process.wall_s:.1f} s): "
            "the least a real run can take that keeps the safety steps and runs as a Dagster "
            "job on this path (its checks as hand-written SQL; no impact report, history or "
            "audit; target for the job: ≤ 2×)."
        )
    return ["", "### Bounds", "", *lines] if lines else []


def render(res: dict[str, Any]) -> str:
    """The report: with several rounds, their medians first, then each round as run."""
    rounds = res.get("rounds") or [res["outcomes"]]
    if len(rounds) == 1 and not res["args"].get("app_writer"):
        return render_round(res)
    args = res["args"]
    lines = [f"## inventory_price_adjustment (percentage {fmt_price(Decimal(res['percentage']))}), "
             f"{args['items']:,} items, {res['database']}: {len(rounds)} round(s)", "",
             *summary(rounds, ORDER), ""]
    for i, (outs, run_at) in enumerate(zip(rounds, res["run_ats"], strict=True), 1):
        lines += ["", f"## Round {i} of {len(rounds)}", "",
                  render_round(res | {"outcomes": outs, "run_at": run_at})]
    return "\n".join(lines) + "\n"


def render_round(res: dict[str, Any]) -> str:
    args, outs = res["args"], res["outcomes"]
    bare = outs.get("bare")
    lines = [
        f"## inventory_price_adjustment (percentage {fmt_price(Decimal(res['percentage']))}), "
        f"{args['items']:,} items, {res['database']}",
        "",
        f"Seeded {', '.join(f'{n:,} {t}' for t, n in res['seeded'].items())}"
        f"{report.copies_text(res)}. "
        f"Run timestamp of every contender: {res['run_at']} (the job's run_at). "
        f"Job executor: {res['executor']}.",
        "",
    ]
    rows = []
    for key in [k for k in ORDER if k in outs]:
        o = outs[key]
        name, wall, work, tail = report.contender_columns(
            o, bare, f" ({o.rows:,} rows measured, times ×{o.scale:g})"
        )
        rpm = (o.rows * o.scale) / work * 60 if work and o.rows else None
        rows.append([
            name,
            int(o.rows * o.scale) if o.rows else None,
            int(o.rows_changed * o.scale) if o.rows_changed is not None else None,
            wall,
            work,
            rpm,
            *tail,
        ])
    lines.append(report.table(
        ["contender", "rows", "changed", "wall s", "work s", "rows/min (work)", "× bare wall",
         "× bare work", "client CPU s", "DB CPU s", "largest process MB",
         "peak RSS MB (tree)", "procs",
         "final data"],
        rows,
    ))
    lines += [
        "",
        "wall s: the child process from spawn to exit (what a user waits for). work s: bare/naive "
        "= the SQL/ORM work inside the process; job = Dagster RUN_START → RUN_SUCCESS. rows = "
        "items in the target set. client CPU s: user+system CPU of the child process tree "
        "(wait4 rusage); DB CPU s: of the local database server meanwhile (PostgreSQL: its "
        "processes; MariaDB: the mariadbd process; – for SQLite, whose work is in the client); "
        "both far less sensitive to the machine's load "
        "than wall times (naive: ×scale). " + report.RSS_FOOTNOTE,
    ]
    for floor in (outs.get(k) for k in FLOORS):
        if floor and floor.steps:
            lines += ["", f"### {floor.name}: time per step", "",
                      report.table(["step", "s"], floor.steps)]
    for key in [k for k in ORDER if k.startswith(("dagster", "job", "against", "zero")) and k in outs]:
        lines += report.op_timings_section(outs[key])
    lines += bounds(outs)
    if res["profile"]:
        from benchmarks.profile_engine import render_profile

        lines += ["", render_profile(res["profile"])]
    return "\n".join(lines) + "\n"
