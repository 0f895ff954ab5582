"""Validation's trial apply in slices: the staged changes applied on the live tables in
transactions that are always rolled back, so the database's own rules judge them before commit,
while the application's writes wait for one slice's row locks (SQLite: the write lock), never
for the whole stage's, as they would for one transaction: as long as a commit holds them
(measured in benchmarks/README.md, session 27).

Each slice is a ``dp_seq`` range of every (action, table) of the stage, read by the stage's
key. Every staged row meets the database's rules in its slice. A rule between rows of two
slices is checked apart: two staged rows given one value of a unique key
(``shared_unique_value``); a rule the slices cannot show (a statement-level trigger that
sums the whole change) is judged by the commit, which names the rows it refuses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, inspect, select, union_all
from sqlalchemy.engine import Engine

from patch_ops.patch import Tables
from patch_ops.state import BACKUP, INSERT, UPDATE
from patch_ops.steps.batching import BatchSizer
from patch_ops.steps.holdback import Refusal, trial_attempt
from patch_ops.work_rows import work_rows


@dataclass
class Trial:
    """What a trial apply found: the refusal (None: passed), in how many slices, and the longest
    time one slice held its transaction (its row locks)."""

    refusal: Refusal | None = None
    slices: int = 0
    longest_seconds: float = 0.0

    def describe(self) -> str:
        verdict = "refused" if self.refusal is not None else "passed"
        if self.slices <= 1:
            return verdict
        return (f"{verdict} in {self.slices:,} slices of the stage, each its own rolled-back "
                f"transaction (the longest held its row locks {self.longest_seconds:.2f} s)")


def sliced_trial(
    engine: Engine, tables: Tables, ex: dict[str, Any], first_rows: int, slice_seconds: float
) -> Trial:
    """The trial apply of execution ``ex`` in slices of about the same share of each (action,
    table) of its stage: the first has ``first_rows`` rows of the largest, the next are sized
    by ``BatchSizer`` to hold their transaction ``slice_seconds`` (0: every slice
    ``first_rows``). Stops at the first refused slice. A stage of one slice is applied whole;
    one of several is then checked for a unique value two slices share."""
    execution_id, decl = ex["execution_id"], ex["declaration"]
    keys = [(UPDATE, t) for t in decl["updates"]] + [(INSERT, t) for t in decl["inserts"]]
    stages = {key: work_rows(engine, tables[key[1]], execution_id, key[0]) for key in keys}

    counts: dict[tuple[str, str], int] = {}
    after: dict[tuple[str, str], int] = {}  # the last dp_seq tried, per (action, table)
    with engine.connect() as conn:
        for key, st in stages.items():
            n, first = conn.execute(select(func.count(), func.min(st.seq)).where(st.mine)).one()
            if n:
                counts[key], after[key] = int(n), int(first) - 1
    base = max(counts.values(), default=0)
    trial = Trial()
    if base <= first_rows:
        trial.refusal, trial.longest_seconds = trial_attempt(engine, tables, ex)
        trial.slices = 1
        return trial
    sizer = BatchSizer(first_rows, slice_seconds, fixed=not slice_seconds)
    while after:
        size, ranges = sizer.size, {}
        with engine.connect() as conn:
            for key, last in list(after.items()):
                st, rows = stages[key], -(-size * counts[key] // base)  # its share, rounded up
                page = (st.select_seq().where(st.seq > last)
                        .order_by(st.seq).limit(rows).subquery())
                hi = conn.execute(select(func.max(page.c.dp_seq))).scalar()
                if hi is None:
                    del after[key]
                    continue
                ranges[key], after[key] = (last + 1, int(hi)), int(hi)
        if not ranges:
            break
        refusal, took = trial_attempt(engine, tables, ex, seqs=ranges)
        trial.slices += 1
        trial.longest_seconds = max(trial.longest_seconds, took)
        if refusal is not None:
            trial.refusal = refusal
            break
        sizer.record(size, took)
    if trial.refusal is None:
        trial.refusal = shared_unique_value(engine, tables, ex)
    return trial


def unique_keys(engine: Engine, table: str) -> list[tuple[str, list[str]]]:
    """(name, columns) of the unique constraints and unique indexes of live ``table``."""
    insp = inspect(engine)
    found = [(uq.get("name") or "", [str(c) for c in uq["column_names"]])
             for uq in insp.get_unique_constraints(table)]
    found += [(ix.get("name") or "", [str(c) for c in ix["column_names"]])
              for ix in insp.get_indexes(table) if ix.get("unique")]
    return list({tuple(cols): (name, cols) for name, cols in found}.values())


def shared_unique_value(engine: Engine, tables: Tables, ex: dict[str, Any]) -> Refusal | None:
    """A value of a unique key of a written table that two staged rows would share (each
    slice passed alone, so they lie in two slices): the refusal the whole stage would meet.
    Only keys with a column the patch writes; an updated row's other key columns are its
    before-image's, an inserted row's key is checked when the patch writes all of it."""
    execution_id, decl = ex["execution_id"], ex["declaration"]
    for table in {*decl["updates"], *decl["inserts"]}:
        written = {*decl["updates"].get(table, ()), *decl["inserts"].get(table, ())}
        for name, cols in unique_keys(engine, table):
            if not written & set(cols):
                continue
            parts = []
            if table in decl["updates"]:
                st = work_rows(engine, tables[table], execution_id, UPDATE)
                bk = work_rows(engine, tables[table], execution_id, BACKUP)
                wrote = set(decl["updates"][table])
                parts.append(
                    select(*[(st.c[c] if c in wrote else bk.c[c]).label(c) for c in cols])
                    .select_from(st.table.join(bk.table, bk.at(st.seq)))
                    .where(st.mine)
                )
            if set(cols) <= set(decl["inserts"].get(table, ())):
                ins = work_rows(engine, tables[table], execution_id, INSERT)
                parts.append(select(*[ins.c[c] for c in cols]).where(ins.mine))
            if not parts:
                continue
            rows = union_all(*parts).subquery()
            key = [rows.c[c] for c in cols]
            with engine.connect() as conn:
                shared = conn.execute(
                    select(*key).where(*[k.is_not(None) for k in key]).group_by(*key)
                    .having(func.count() > 1).limit(1)
                ).first()
            if shared is not None:
                value = ", ".join(f"{c} = {v!r}" for c, v in zip(cols, shared, strict=True))
                return Refusal(f"two staged {table} rows would share the unique key "
                               f"{name or ', '.join(cols)} ({value})", table)
    return None
