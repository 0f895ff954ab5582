"""Validation's checks + impact report and post-verification, old code against new (issue 22).

    python -m benchmarks.report_verify --postgres --items 200000 --old /work/main [--rounds 3]
    python -m benchmarks.report_verify --mysql --items 200000 --old /work/main
    ... --patches inventory_price_adjustment --steps checks    # one patch, one step

One seeded database per patch (the benchmarks' seed), on a durable throwaway server. With the
code of this checkout, per patch: a real run planned, backed up, transformed, validated,
committed (kept: post-verification reads it) and a dry run planned, backed up and transformed
(kept: validation's checks read its stage). Then, per round, each step timed in a child process
of each code version in turn (old, new; the order swaps every round): ``run_checks`` of the dry
run without the trial apply (the invariants, the impact report, its sections, the reject
sample) and ``verify_execution`` of the real run. Prints seconds, statements, the medians, and
whether both versions returned the same result (report, broken invariants, problems).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

PATCHES = {
    "inventory_price_adjustment": {"adjustment_type": "percentage", "adjustment_value": 8},
    "batch_expiry_update": {"business_date": "2026-01-15"},
}
STEPS = ("checks", "verify")


def _settings(registry: Any, name: str) -> Any:
    return dataclasses.replace(registry.settings(name), require_approved_plan=False)


def prepare(url: str, name: str, kind: str) -> str:
    """A transformed dry run (``kind`` "dry": its locks released) or a committed real run of
    ``name`` (its execution id)."""
    from sqlalchemy import delete, update

    from patch_ops.database import get_engine
    from patch_ops.execution import finish_execution
    from patch_ops.state import executions, locks
    from patch_ops.steps.backup import take_backup
    from patch_ops.steps.commit import commit_execution
    from patch_ops.steps.plan import plan_execution
    from patch_ops.steps.transform import run_transform
    from patch_ops.steps.validate import validate_execution
    from patch_ops.steps.verify import verify_execution
    from resources.memory import MemoryGuard
    from stockrx_patches.registry import default_registry

    registry = default_registry()
    patch, settings = registry.get(name), _settings(registry, name)
    engine = get_engine(url)
    dry = kind == "dry"
    cfg = patch.config_class(**PATCHES[name], dry_run=dry, allow_outside_window=True)
    x = plan_execution(engine, patch, settings, cfg)
    take_backup(engine, x)
    run_transform(engine, patch, x, MemoryGuard(), batch_seconds=settings.batch_seconds)
    if dry:
        with engine.begin() as conn:
            conn.execute(delete(locks).where(locks.c.execution_id == x))
            conn.execute(update(executions).where(executions.c.execution_id == x)
                         .values(status="failed"))
    else:
        passed, report = validate_execution(engine, patch, settings, x)
        assert passed, report["validation"]
        commit_execution(engine, x)
        assert verify_execution(engine, patch, x) == []
        finish_execution(engine, x, "completed", phase="verified")
    engine.dispose()
    return x


def worker(
    url: str, name: str, step: str, execution_id: str, server_pid: str = "-"
) -> dict[str, Any]:
    """One timed step in this process (the code on PYTHONPATH): seconds, CPU here and in the
    local server (``server_pid``, "-": not read), statements, result."""
    from benchmarks.common import StatementTimer, server_cpu_seconds
    from patch_ops.database import get_engine
    from patch_ops.execution import load_execution
    from patch_ops.steps.validate import run_checks
    from patch_ops.steps.verify import verify_execution
    from stockrx_patches.registry import default_registry

    registry = default_registry()
    patch, settings = registry.get(name), _settings(registry, name)
    engine = get_engine(url)
    timer = StatementTimer()
    timer.attach(engine)
    pid = int(server_pid) if server_pid != "-" else None
    s0, t0, c0 = server_cpu_seconds(pid), time.perf_counter(), time.process_time()
    if step == "checks":
        with engine.connect() as conn:
            ex = load_execution(conn, execution_id)
        _, broken, report, sections, rejects = run_checks(engine, patch, settings, ex, trial=False)
        result: Any = {"broken": broken, "report": report, "sections": sections,
                       "rejects": rejects}
    else:
        result = verify_execution(engine, patch, execution_id,
                                  timeout_s=settings.query_timeout_seconds,
                                  connections=settings.check_connections)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    s1 = server_cpu_seconds(pid)
    statements = timer.take()
    engine.dispose()
    text = json.dumps(result, sort_keys=True, default=str)
    return {
        "seconds": seconds, "cpu": cpu,
        "server_cpu": None if s0 is None or s1 is None else s1 - s0, "statements": sum(n for _, _, n in statements),
        "sql_s": sum(s for _, s, _ in statements),
        "top": [(round(s, 3), n, q[:160]) for q, s, n in statements[:8]],
        "digest": hashlib.sha256(text.encode()).hexdigest()[:16], "result": result,
    }


def run_worker(
    code: Path, url: str, name: str, step: str, execution_id: str, server_pid: int | None
) -> dict[str, Any]:
    from benchmarks.ab import run_code_worker

    return run_code_worker(__file__, code, [url, name, step, execution_id, str(server_pid or "-")])


def main() -> int:
    warnings.simplefilter("ignore")
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(*sys.argv[2:7]), default=str))
        return 0
    from benchmarks.ab import ab_arguments, ab_parse, durable_server, interleaved, server_pid
    from benchmarks.databases import seed

    ap = ab_arguments("Validation's checks and post-verification, old code against new.")
    ap.add_argument("--patches", default=",".join(PATCHES))
    ap.add_argument("--steps", default=",".join(STEPS), help="checks, verify or both")
    args = ab_parse(ap)
    new, old = Path(__file__).resolve().parents[1], Path(args.old).resolve()
    server = durable_server(args.postgres)
    pid = server_pid(server)
    raw: dict[str, Any] = {}
    try:
        for name in args.patches.split(","):
            url = server.create_database()
            t0 = time.perf_counter()
            seed(url, args.items)
            print(f"{name}: seeded in {time.perf_counter() - t0:.0f} s", flush=True)
            for step in [s for s in STEPS if s in args.steps.split(",")]:  # dry run first
                x = prepare(url, name, "dry" if step == "checks" else "real")
                runs: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
                for r, (label, code) in interleaved(args.rounds, [("old", old), ("new", new)]):
                    res = run_worker(code, url, name, step, x, pid)
                    runs[label].append(res)
                    print(f"  {name} {step} round {r + 1} {label}: {res['seconds']:.2f} s, "
                          f"cpu {res['cpu']:.2f} s, server cpu {res['server_cpu'] or 0:.2f} s, "
                          f"sql {res['sql_s']:.2f} s, {res['statements']} statements, "
                          f"result {res['digest']}", flush=True)
                med = {k: statistics.median(v["seconds"] for v in runs[k]) for k in runs}
                srv = {k: statistics.median(v["server_cpu"] or 0.0 for v in runs[k]) for k in runs}
                same = runs["old"][0]["digest"] == runs["new"][0]["digest"]
                per_round = [n["seconds"] / o["seconds"]
                             for o, n in zip(runs["old"], runs["new"], strict=True)]
                print(f"{name} {step}: old {med['old']:.2f} s, new {med['new']:.2f} s, "
                      f"ratio {med['new'] / med['old']:.2f} (rounds "
                      f"{', '.join(f'{p:.2f}' for p in per_round)}); statements "
                      f"{runs['old'][0]['statements']} -> {runs['new'][0]['statements']}; "
                      f"server cpu {srv['old']:.2f} -> {srv['new']:.2f} s; "
                      f"same result: {same}", flush=True)
                for label in ("old", "new"):
                    for s, n, q in runs[label][0]["top"]:
                        print(f"    {label} {s:8.3f} s {n:4d}x {q}")
                if not same:
                    print("    old result:", json.dumps(runs["old"][0]["result"], default=str)[:3000])
                    print("    new result:", json.dumps(runs["new"][0]["result"], default=str)[:3000])
                raw[f"{name}:{step}"] = runs
            server.drop_database(url)
    finally:
        server.stop()
        if args.out:
            Path(args.out).write_text(json.dumps(raw, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
