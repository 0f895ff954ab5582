"""The stage's ``dp_source_id`` index: what the transform pays for it and what its readers pay
(issue 22, session 16). Old code against new, interleaved on one seeded database.

    python -m benchmarks.stage_index --postgres --items 200000 --rounds 3 \\
        --code before=/path/to/old/checkout --code after=.
    python -m benchmarks.stage_index --mysql ...

Per round and code version, in turn, a child process with that version on its PYTHONPATH runs
on the shared database: plan a real run of ``inventory_price_adjustment`` (+8 %, approval not
required), back it up, then times ``run_transform`` (and its stage inserts and statements, by
SQLAlchemy cursor events), ``validate_execution``, the refusal search for one row refused by a
CHECK added for it (``find_refused``) and its ``hold_back`` (the index's readers), the commit,
and the restore's statements in a transaction that is rolled back. Every execution's mirror rows
stay, as a production database keeps them for its retention period.
"""

from __future__ import annotations

import json
import os
import tempfile

MARK = "STAGE_INDEX "


def child(url: str) -> None:
    import dataclasses
    import time

    from sqlalchemy import delete, text, update

    from benchmarks.common import StatementTimer, server_cpu_seconds
    from patch_ops.database import get_engine
    from patch_ops.execution import load_execution
    from patch_ops.state import executions, forget_mirrors, locks
    from patch_ops.steps.backup import take_backup
    from patch_ops.steps.commit import commit_execution
    from patch_ops.steps.holdback import Refusal, find_refused, hold_back
    from patch_ops.steps.plan import plan_execution
    from patch_ops.steps.restore import restore_rows
    from patch_ops.steps.transform import run_transform
    from patch_ops.steps.validate import validate_execution
    from resources.memory import MemoryGuard
    from stockrx_patches.registry import default_registry

    name = "inventory_price_adjustment"
    registry = default_registry()
    patch = registry.patches[name]
    settings = dataclasses.replace(registry.settings(name), require_approved_plan=False)
    engine = get_engine(url)
    timer = StatementTimer()
    timer.attach(engine)
    cfg = patch.config_class(adjustment_type="percentage", adjustment_value=8,
                             allow_outside_window=True, dry_run=False)
    out: dict[str, object] = {}

    server_pid = int(os.environ["STAGE_INDEX_SERVER_PID"])

    def timed(key: str, fn):  # type: ignore[no-untyped-def]
        forget_mirrors()
        engine.dispose()
        timer.take()
        server0, client0 = server_cpu_seconds(server_pid) or 0.0, time.process_time()
        t0 = time.perf_counter()
        value = fn()
        out[key] = time.perf_counter() - t0
        out[f"{key}_cpu"] = (server_cpu_seconds(server_pid) or 0.0) - server0 + (
            time.process_time() - client0)
        stats = timer.take()
        out[f"{key}_statements"] = sum(n for _, _, n in stats)
        return value, stats

    xid = plan_execution(engine, patch, settings, cfg)
    take_backup(engine, xid)
    postgres = engine.dialect.name == "postgresql"
    if postgres:  # the transform's WAL: a per-row cost that load does not blur
        with engine.connect() as conn:
            wal0 = conn.execute(text("SELECT pg_current_wal_lsn()")).scalar_one()
    _, stats = timed("transform", lambda: run_transform(
        engine, patch, xid, MemoryGuard(), batch_seconds=settings.batch_seconds))
    inserts = [(s, n) for st, s, n in stats if st.startswith("INSERT INTO data_patch_stage__")]
    out["stage_insert"] = sum(s for s, _ in inserts)
    out["stage_insert_statements"] = sum(n for _, n in inserts)
    with engine.connect() as conn:
        out["batches"] = int(load_execution(conn, xid)["batches_done"])
        if postgres:
            out["transform_wal_mb"] = float(conn.execute(text(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), :a)"), {"a": wal0}).scalar_one()
            ) / 2**20
    timed("validate", lambda: validate_execution(engine, patch, settings, xid))
    inv = "inventories"
    with engine.begin() as conn:  # one row the database will refuse: its new price
        third = int(conn.execute(text(f"SELECT max(id) FROM {inv}")).scalar_one()) // 3
        victim, price = conn.execute(text(
            f"SELECT name, price FROM {inv} WHERE id >= {third} ORDER BY id LIMIT 1")).one()
        conn.execute(text(f"ALTER TABLE {inv} ADD CONSTRAINT bench_refuse "  # not on id: MariaDB
                          f"CHECK (name <> '{victim.replace(chr(39), chr(39) * 2)}' "
                          f"OR price <= {float(price)})"))
    found, _ = timed("refusal_search", lambda: find_refused(
        engine, xid, Refusal("bench", inv), limit=10, budget_seconds=600, attempt_seconds=None))
    out["refused"] = sorted(found.refused)
    out["attempts"] = found.attempts
    timed("hold_back", lambda: hold_back(engine, xid, found.refused))
    with engine.begin() as conn:
        conn.execute(text(f"ALTER TABLE {inv} DROP CONSTRAINT bench_refuse"))
    timed("commit", lambda: commit_execution(engine, xid))

    def restore() -> None:
        with engine.connect() as conn:
            trans = conn.begin()
            restore_rows(conn, engine, xid, skip_conflicts=False, apply=True)
            trans.rollback()

    timed("restore", restore)
    with engine.begin() as conn:
        conn.execute(delete(locks).where(locks.c.execution_id == xid))
        conn.execute(update(executions).where(executions.c.execution_id == xid)
                     .values(status="completed"))
        out["stage_rows"] = conn.execute(text(
            "SELECT count(*) FROM data_patch_stage__inventories")).scalar_one()
    print(MARK + json.dumps(out), flush=True)


def main() -> None:
    from benchmarks.ab import labelled_arguments, run_labelled

    args = labelled_arguments(__doc__.splitlines()[0]).parse_args()
    if args.child_url:
        child(args.child_url)
        return
    run_labelled(args, "benchmarks.stage_index", "STAGE_INDEX_SERVER_PID", MARK)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory():
        main()
