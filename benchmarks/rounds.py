"""Summary of a benchmark's interleaved rounds: medians per contender, the job against its bound
(safety floor + Dagster alone) round by round, the job's ops against the floor's steps, and the
application stand-in's latency per step (``benchmarks.app_writer``)."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

from benchmarks.app_writer import latency_stats
from benchmarks.contenders import Outcome
from benchmarks.report import contender_columns, table

#: The floor's steps are named "<op>: what"; the job's ops, by the same first word.
OP_OF_STEP = {"plan": "plan_patch", "backup": "take_backup", "transform": "transform_batches",
              "validate": "validate_changes", "commit": "commit_changes",
              "verify": "verify_commit"}


def med(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and v == v]
    return statistics.median(vals) if vals else None


def _cell(values: Sequence[float | None], fmt: str = "{:.2f}") -> str:
    """'median (r1, r2, ...)' or '–'."""
    m = med(values)
    if m is None:
        return "–"
    if len(values) == 1:
        return fmt.format(m)
    return fmt.format(m) + " (" + ", ".join("–" if v is None else fmt.format(v)
                                             for v in values) + ")"


def cpu(o: Outcome) -> float | None:
    """Client + database server CPU seconds of a contender."""
    client = o.cpu_s if o.cpu_s is not None else o.process.cpu_s
    if client != client:
        return None
    return client + (o.server_cpu_s or 0.0)


def _ok(rounds: list[dict[str, Outcome]], key: str) -> list[Outcome | None]:
    return [r[key] if key in r and r[key].ok else None for r in rounds]


def _ratio(num: Sequence[float | None], den: Sequence[float | None]) -> list[float | None]:
    return [n / d if n is not None and d else None for n, d in zip(num, den, strict=True)]


def _series(outs: Sequence[Outcome | None], f: Callable[[Outcome], float | None]) -> list[float | None]:
    return [f(o) if o is not None else None for o in outs]


def summary(rounds: list[dict[str, Outcome]], order: Sequence[str]) -> list[str]:
    """Markdown lines: medians over the rounds, bounds, per op against the floor, app writes."""
    n = len(rounds)
    keys = [k for k in order if any(k in r for r in rounds)]
    rows = []
    for key in keys:
        outs = [r.get(key) for r in rounds]
        name = next(o.name for o in outs if o is not None)
        present = [o for o in outs if o is not None]
        failed = [o for o in present if not o.ok]
        if failed:
            name += f" [{len(failed)} FAILED]"
        ok = [o if o is not None and o.ok else None for o in outs]
        rows.append([
            name, len(present),
            _cell(_series(ok, lambda o: contender_columns(o, None, "")[1])),
            _cell(_series(ok, lambda o: contender_columns(o, None, "")[2])),
            _cell(_series(ok, lambda o: o.cpu_s if o.cpu_s is not None else o.process.cpu_s)),
            _cell(_series(ok, lambda o: o.server_cpu_s)),
            _cell(_series(ok, cpu)),
            max((o.process.largest_process_mb for o in present), default=None),
        ])
    lines = [f"### Medians of {n} interleaved round{'s' if n > 1 else ''}", "",
             "Each round runs every contender once, in the order of the table, on its own "
             "identical copy; each cell is the median (the rounds' values in brackets).", "",
             table(["contender", "runs", "wall s", "work s", "client CPU s", "DB CPU s",
                    "CPU s (client + DB)", "largest process MB (max)"], rows)]
    lines += _bounds(rounds)
    lines += _per_op(rounds)
    lines += _writer(rounds, keys)
    return lines


#: The bounds: (floor contender, what the line calls the bound, how it is made)
BOUNDS = (("floor", "bound", "bound = safety floor + Dagster alone, same round; target ≤ 1.3×"),
          ("keyed", "keyed bound", "keyed bound = safety floor on shared keyed tables + "
           "Dagster alone, same round: the job's storage, `benchmarks/floor_storage.py`"),
          ("own", "own-table bound", "own-table bound = safety floor on tables of the "
           "execution's own + Dagster alone, same round: what that storage could reach"),
          ("own_bulk", "own-table bound, bulk path", "the same, the target set and backup "
           "filled on MySQL/MariaDB's empty-table bulk path"))


def _bounds(rounds: list[dict[str, Outcome]]) -> list[str]:
    real, dry, empty, zero = (
        _ok(rounds, k) for k in ("job_real", "job_dry", "dagster", "zero_real"))
    wall = lambda o: o.process.wall_s  # noqa: E731
    out: list[str] = []
    for key, name, how in BOUNDS:
        floor = _ok(rounds, key)
        if not (any(real) and any(floor) and any(empty)):
            continue
        bound = [f + e if f is not None and e is not None else None
                 for f, e in zip(_series(floor, wall), _series(empty, wall), strict=True)]
        bound_cpu = [f + e if f is not None and e is not None else None
                     for f, e in zip(_series(floor, cpu), _series(empty, cpu), strict=True)]
        out.append(f"- **job real / {name}** ({how}): "
                   f"wall {_cell(_ratio(_series(real, wall), bound), '{:.2f}×')}; "
                   f"CPU (client + DB) {_cell(_ratio(_series(real, cpu), bound_cpu), '{:.2f}×')}. "
                   f"{name.capitalize()}: {_cell(bound, '{:.1f} s')}.")
    if any(real) and any(dry):
        out.append(f"- **job dry / job real** (target ≤ 1): "
                   f"{_cell(_ratio(_series(dry, wall), _series(real, wall)), '{:.2f}')}.")
    if any(zero) and any(empty):
        out.append(f"- **fixed cost: job real on 0 rows / Dagster alone** (target ≤ 1.3×): "
                   f"{_cell(_ratio(_series(zero, wall), _series(empty, wall)), '{:.2f}×')}.")
    against = _ok(rounds, "against_real")
    if any(real) and any(against):
        name = next(o.name for o in against if o is not None).removesuffix(" real")
        out.append(f"- **job real / {name} real** (the same job of two code versions, same "
                   f"round): wall {_cell(_ratio(_series(real, wall), _series(against, wall)), '{:.2f}×')}; "
                   f"CPU (client + DB) {_cell(_ratio(_series(real, cpu), _series(against, cpu)), '{:.2f}×')}.")
    bare = _ok(rounds, "bare")
    if any(real) and any(bare):
        out.append(f"- job real / bare SQL: "
                   f"{_cell(_ratio(_series(real, wall), _series(bare, wall)), '{:.2f}×')}.")
    return ["", "### The job against its bound", "", *out] if out else []


def _per_op(rounds: list[dict[str, Outcome]]) -> list[str]:
    """job real's ops (process start, op) against the floors' steps, medians over the rounds."""
    real = _ok(rounds, "job_real")
    if not any(real):
        return []
    ops: list[str] = []
    for o in real:
        for s in (o.timings.steps if o and o.timings else []):
            if s.status == "success" and s.step not in ops:
                ops.append(s.step)

    def op_s(o: Outcome | None, op: str, attr: str) -> float | None:
        steps = [s for s in (o.timings.steps if o and o.timings else []) if s.step == op]
        return getattr(steps[0], attr) if steps and steps[0].status == "success" else None

    def floor_s(o: Outcome | None, op: str) -> float | None:
        if o is None or not o.steps:
            return None
        return sum(s for name, s in o.steps if OP_OF_STEP.get(name.split(":")[0]) == op)

    floors = [(name, outs) for name, outs in (
        (f"{key} floor" if key != "floor" else key, _ok(rounds, key)) for key, _, _ in BOUNDS)
        if any(outs)]
    rows = []
    for op in ops:
        job = [op_s(o, op, "duration_s") for o in real]
        row = [op, med([op_s(o, op, "launch_s") for o in real]), med(job)]
        for _, outs in floors:
            fl = [floor_s(o, op) if op in OP_OF_STEP.values() else None for o in outs]
            row += [med(fl), (med(job) or 0) / med(fl) if med(fl) else None]
        rows.append(row)
    heads = [h for name, _ in floors for h in (f"{name} s", f"op / {name}")]
    return ["", "### job real per op against the safety floors' steps (medians)", "",
            table(["op", "process start s", "op s", *heads], rows)]


def _writer(rounds: list[dict[str, Outcome]], keys: Sequence[str]) -> list[str]:
    """The application stand-in's write latency during each contender (pooled over the rounds)
    and, for the job runs, during each op (its process start included)."""
    rows = []
    for key in keys:
        outs = [r[key] for r in rounds if key in r and getattr(r[key], "writer", None)]
        if not outs:
            continue
        lat = [v for o in outs for _, v in o.writer.samples]
        rows.append([outs[0].name, "whole run", *latency_stats(lat).values()])
        steps: list[str] = []
        for o in outs:
            steps += [s.step for s in (o.timings.steps if o.timings else [])
                      if s.started_at is not None and s.step not in steps]
        for step in steps:
            lat = []
            for o in outs:
                for s in o.timings.steps if o.timings else []:
                    if s.step == step and s.started_at is not None:
                        lat += o.writer.between(s.started_at - s.launch_s,
                                                s.started_at + s.duration_s)
            rows.append(["", step, *latency_stats(lat).values()])
    if not rows:
        return []
    rate = next(r[k].writer.rate for r in rounds for k in keys
                if k in r and getattr(r[k], "writer", None))
    errors = sorted({e for r in rounds for o in r.values() if getattr(o, "writer", None)
                     for e in o.writer.errors})
    lines = ["", f"### The application stand-in: {rate:g} writes/s of random items", "",
             "`benchmarks/app_writer.py`: one connection, one short transaction per write, "
             "latency from each write's scheduled instant; a lock wait is a write slower than "
             "100 ms. Per op: from the op's process start to its end.", "",
             table(["contender", "during", "writes", "p50 ms", "p99 ms", "max ms",
                    "lock waits"], rows)]
    if errors:
        lines += ["", "Writer errors: " + "; ".join(errors[:5])]
    return lines
