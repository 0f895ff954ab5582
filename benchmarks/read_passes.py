"""Plan, backup, validate and verify of an approved real run, old code against new (issue 22).

    python -m benchmarks.read_passes --postgres --items 200000 --old /tmp/base [--rounds 3]
    python -m benchmarks.read_passes --mysql --items 200000 --old /tmp/base

The price patch's data seeded once on a durable throwaway server; per round, each code version
(old, new; the order swaps every round) gets its own copy and runs in a child process of its
own the job's engine steps in the job's order, in-process: a dry run (plan with the job's plan
checks, backup, transform, validate, its report: the approval fingerprint kept, work rows
dropped) and the real run it approves (plan: the plan hash and the drift check, backup,
transform, validate, commit, verify). Every step is timed (wall, this process's CPU, the
server's CPU) with its SQL per statement (cursor events), as a fresh op process would start it
(engine disposed, caches dropped). Prints per step the medians, the ratios, the statement counts
and the slowest statements, and whether both versions reported the same (reports, the
Markdown, verification's problems, the final data), execution ids and times aside.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import sys
import time
import warnings
from typing import Any

CONFIG: dict[str, Any] = {
    "adjustment_type": "percentage", "adjustment_value": 8, "allow_outside_window": True
}
#: Report fields that differ from run to run whatever the code (times, clocks, estimates).
VOLATILE = re.compile(r"_at$|^clock|^timing|estimated_seconds|^deadline|^overrun|^search$")
#: ... and within a text: the sliced trial apply's slices are sized by their time.
VOLATILE_TEXT = re.compile(r"in [\d,]+ slices of the stage, .*? held its row locks [\d.]+ s\)")


def _scrub(value: Any, ids: dict[str, str]) -> Any:
    """``value`` with execution ids named by their role and volatile fields left out."""
    if isinstance(value, dict):
        return {k: _scrub(v, ids) for k, v in value.items() if not VOLATILE.search(str(k))}
    if isinstance(value, list):
        return [_scrub(v, ids) for v in value]
    if isinstance(value, str):
        value = VOLATILE_TEXT.sub("in slices", value)
        for x, role in ids.items():
            value = value.replace(x, role)
        return value
    return value


def worker(url: str, server_pid: str) -> dict[str, Any]:
    """The dry run and the real run it approves, step by step, in this process."""
    from sqlalchemy import text

    from benchmarks.common import StatementTimer, server_cpu_seconds
    from patch_ops import state
    from patch_ops.database import catalog_scope, get_engine
    from patch_ops.execution import finish_execution, load_execution
    from patch_ops.jobs import DEFAULT_PLAN_CHECKS
    from patch_ops.steps.backup import take_backup
    from patch_ops.steps.commit import commit_execution
    from patch_ops.steps.drift import keep_fingerprint
    from patch_ops.steps.plan import plan_execution
    from patch_ops.steps.transform import run_transform
    from patch_ops.steps.validate import validate_execution
    from patch_ops.steps.verify import verify_execution
    from resources.memory import MemoryGuard
    from stockrx_patches.registry import default_registry

    registry = default_registry()
    name = "inventory_price_adjustment"
    patch, settings = registry.get(name), registry.settings(name)
    engine = get_engine(url)
    timer = StatementTimer()
    timer.attach(engine)
    pid = int(server_pid) if server_pid != "-" else None
    steps: list[dict[str, Any]] = []
    ids: dict[str, str] = {}
    out: dict[str, Any] = {}

    def step(label: str, fn: Any) -> Any:
        engine.dispose()
        state.forget_mirrors()  # a fresh op process starts without them
        s0, c0, t0 = server_cpu_seconds(pid), time.process_time(), time.perf_counter()
        with catalog_scope():
            result = fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        s1 = server_cpu_seconds(pid)
        sql = timer.take()
        steps.append({
            "step": label, "wall": wall, "cpu": cpu,
            "server_cpu": None if s0 is None or s1 is None else s1 - s0,
            "statements": sum(n for _, _, n in sql), "sql_s": sum(s for _, s, _ in sql),
            "top": [(round(s, 3), n, q[:220]) for q, s, n in sql[:12]],
        })
        return result

    # the transform's connections as the job gives them (code before session 29 took none)
    job_like = ({"connections": settings.check_connections}
                if "connections" in inspect.signature(run_transform).parameters else {})
    for kind in ("dry", "real"):
        dry = kind == "dry"
        cfg = patch.config_class(**CONFIG, dry_run=dry)
        x = step(f"{kind} plan", lambda cfg=cfg: plan_execution(
            engine, patch, settings, cfg, checks=DEFAULT_PLAN_CHECKS))
        ids[x] = kind.upper()
        step(f"{kind} backup", lambda x=x: take_backup(engine, x))
        step(f"{kind} transform", lambda x=x: run_transform(
            engine, patch, x, MemoryGuard(), batch_seconds=settings.batch_seconds, **job_like))
        passed, _ = step(f"{kind} validate", lambda x=x: validate_execution(
            engine, patch, settings, x))
        assert passed, f"{kind} run failed validation"
        if dry:
            def report(x: str = x) -> None:
                keep_fingerprint(engine, patch, settings, x)
                finish_execution(engine, x, "completed", keep_work_tables=False,
                                 phase="dry_run_reported")
            step("dry report", report)
        else:
            step("real commit", lambda x=x: commit_execution(engine, x))

            def verify(x: str = x) -> list[str]:
                problems = verify_execution(engine, patch, x,
                                            timeout_s=settings.query_timeout_seconds,
                                            connections=settings.check_connections)
                finish_execution(engine, x, "completed", phase="verified")
                return problems
            out["problems"] = step("real verify", verify)
        with engine.connect() as conn:
            ex = load_execution(conn, x)
        ids[f"{ex['run_at']:%Y-%m-%d %H:%M:%S}"] = f"{kind.upper()}_RUN_AT"
        out[kind] = {"report": ex["report"], "markdown": ex["report_markdown"],
                     "plan": ex.get("plan"), "status": ex["status"], "phase": ex["phase"]}
    with engine.connect() as conn:
        h = hashlib.sha256()
        for q in ("SELECT id, price, inventory_logs_count FROM inventories ORDER BY id",
                  "SELECT inventory_id, note, previous_quantity FROM inventory_logs ORDER BY id"):
            for row in conn.execute(text(q)):
                h.update(repr(tuple(row)).encode())
        out["data"] = h.hexdigest()
    engine.dispose()
    result = _scrub(out, ids)
    text_out = json.dumps(result, sort_keys=True, default=str)
    return {"steps": steps, "digest": hashlib.sha256(text_out.encode()).hexdigest()[:16],
            "result": result}


def main() -> int:
    warnings.simplefilter("ignore")
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(*sys.argv[2:4]), default=str))
        return 0
    from benchmarks.ab import ab_arguments, ab_parse, run_ab

    args = ab_parse(ab_arguments(__doc__.splitlines()[0]))
    return run_ab(__file__, args, [], lambda res: f"result {res['digest']}; " + ", ".join(
        f"{s['step']} {s['wall']:.2f} s" for s in res["steps"]), report)


def report(runs: dict[str, list[dict[str, Any]]]) -> None:
    from benchmarks.ab import cpu_and_server, step_median

    names = [s["step"] for s in runs["old"][0]["steps"]]
    print("\n| step | old wall s | new wall s | ratio (rounds) | old CPU+server s | new CPU+server s"
          " | ratio | statements old → new |")
    print("|---|---:|---:|---|---:|---:|---:|---|")
    for i, name in enumerate(names):
        def med(label: str, f: Any, i: int = i) -> float:
            return step_median(runs, label, i, f)

        rounds = [n["steps"][i]["wall"] / o["steps"][i]["wall"]
                  for o, n in zip(runs["old"], runs["new"], strict=True)]
        ow, nw = med("old", lambda s: s["wall"]), med("new", lambda s: s["wall"])
        oc, nc = med("old", cpu_and_server), med("new", cpu_and_server)
        print(f"| {name} | {ow:.2f} | {nw:.2f} | {nw / ow:.2f} ("
              + ", ".join(f"{x:.2f}" for x in rounds) + f") | {oc:.2f} | {nc:.2f} | "
              f"{nc / oc:.2f} | {runs['old'][0]['steps'][i]['statements']} → "
              f"{runs['new'][0]['steps'][i]['statements']} |")
    digests = {label: {r["digest"] for r in rs} for label, rs in runs.items()}
    print(f"\nresults: old {sorted(digests['old'])}, new {sorted(digests['new'])}; same: "
          f"{digests['old'] == digests['new'] and len(digests['old']) == 1}")
    for label in ("old", "new"):
        for s in runs[label][0]["steps"]:
            print(f"\n{label} {s['step']}: {s['wall']:.2f} s, sql {s['sql_s']:.2f} s, "
                  f"{s['statements']} statements")
            for sec, n, q in s["top"][:8]:
                print(f"    {sec:8.3f} s {n:4d}x {q}")


if __name__ == "__main__":
    sys.exit(main())
