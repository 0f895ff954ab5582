"""Where a patch job's time goes: the engine functions that the ops call, one pyinstrument
session per step, plus the SQL time per statement shape (SQLAlchemy cursor events).

The steps run in this process, in the job's order. Between steps the engine is disposed and the
engine's mirror-table cache dropped, as an op starting in a fresh process would find them; the
Dagster overhead itself (process start, event log) is measured by the real job runs instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from benchmarks import common, report


def profile_engine(url: str, outdir: Path, config: dict[str, Any], top: int = 12) -> list[dict]:
    from pyinstrument import Profiler

    from patch_ops import state
    from patch_ops.database import get_engine
    from patch_ops.execution import finish_execution
    from patch_ops.steps.backup import take_backup
    from patch_ops.steps.commit import commit_execution
    from patch_ops.steps.plan import plan_execution
    from patch_ops.steps.transform import run_transform
    from patch_ops.steps.validate import validate_execution
    from patch_ops.steps.verify import verify_execution
    from resources.memory import MemoryGuard
    from stockrx_patches.registry import default_registry

    outdir.mkdir(parents=True, exist_ok=True)
    registry = default_registry()
    patch_name = "inventory_price_adjustment"
    patch, settings = registry.get(patch_name), registry.settings(patch_name)
    cfg = patch.config_class(**config)
    engine = get_engine(url)
    timer = common.StatementTimer()
    timer.attach(engine)
    ids: dict[str, str] = {}

    def plan() -> None:
        ids["x"] = plan_execution(engine, patch, settings, cfg)

    def validate() -> None:
        passed, _ = validate_execution(engine, patch, settings, ids["x"])
        if not passed:
            raise RuntimeError("validation failed in the profiled run")

    def verify() -> None:
        problems = verify_execution(
            engine,
            patch,
            ids["x"],
            timeout_s=settings.query_timeout_seconds,
            connections=settings.check_connections,
        )
        if problems:
            raise RuntimeError(f"verification failed in the profiled run: {problems}")
        finish_execution(engine, ids["x"], "completed", phase="verified")

    steps = [
        ("plan_patch", plan),
        ("take_backup", lambda: take_backup(engine, ids["x"])),
        ("transform_batches", lambda: run_transform(
            engine, patch, ids["x"], MemoryGuard(), batch_seconds=settings.batch_seconds,
            connections=settings.check_connections)),  # as the job's op calls it
        ("validate_changes", validate),
        ("commit_changes", lambda: commit_execution(engine, ids["x"])),
        ("verify_commit", verify),
    ]
    results = []
    for name, fn in steps:
        engine.dispose()
        state.forget_mirrors()  # a fresh op process starts without them
        profiler = Profiler(interval=0.001)
        t0 = time.perf_counter()
        profiler.start()
        try:
            fn()
        finally:
            profiler.stop()
        wall = time.perf_counter() - t0
        statements = timer.take()
        tree = profiler.output_text(unicode=True, color=False, show_all=False)
        flat = profiler.output_text(unicode=True, color=False, flat=True, flat_time="self")
        (outdir / f"{name}.tree.txt").write_text(tree, encoding="utf-8")
        (outdir / f"{name}.flat.txt").write_text(flat, encoding="utf-8")
        (outdir / f"{name}.html").write_text(profiler.output_html(), encoding="utf-8")
        (outdir / f"{name}.sql.txt").write_text(
            "\n".join(f"{s:9.3f} s {n:7d}×  {q}" for q, s, n in statements), encoding="utf-8"
        )
        results.append({
            "step": name,
            "wall_s": wall,
            "cpu_s": profiler.last_session.cpu_time if profiler.last_session else None,
            "sql_s": sum(s for _, s, _ in statements),
            "sql_calls": sum(n for _, _, n in statements),
            "statements": [(q, s, n) for q, s, n in statements[:top]],
            "self_time": _flat_top(flat, top),
            "tree": _tree_top(tree, max_lines=40, min_share=0.01),
        })
        common_log(f"  profiled {name}: {wall:.1f} s")
    engine.dispose()
    return results


def _flat_top(flat: str, n: int) -> list[tuple[float, str]]:
    """(seconds, function) from pyinstrument's flat self-time listing."""
    out = []
    for line in flat.splitlines():
        parts = line.strip().split(None, 1)
        if len(parts) == 2:
            try:
                out.append((float(parts[0]), parts[1]))
            except ValueError:
                continue
        if len(out) >= n:
            break
    return out


def _tree_top(tree: str, max_lines: int, min_share: float) -> str:
    """The call tree without pyinstrument's banner, only frames above min_share of the step."""
    lines = [ln for ln in tree.splitlines() if ln.strip()]
    body = [ln for ln in lines if ln.lstrip(" │├└─").split(" ")[0].replace(".", "").isdigit()]
    if not body:
        return ""
    total = float(body[0].lstrip(" │├└─").split(" ")[0])
    keep = []
    for ln in lines[lines.index(body[0]):]:
        head = ln.lstrip(" │├└─").split(" ")[0]
        try:
            if float(head) < total * min_share:
                continue
        except ValueError:
            continue  # "[n frames hidden]" lines
        keep.append(ln.rstrip())
    return "\n".join(keep[:max_lines])


def common_log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def render_profile(results: list[dict]) -> str:
    lines = [
        "### Profile of the engine steps (in-process, pyinstrument 1 ms; SQL from cursor events)",
        "",
        report.table(
            ["step", "wall s", "CPU s (this process)", "SQL s", "SQL calls", "outside SQL s"],
            [[r["step"], r["wall_s"], r.get("cpu_s"), r["sql_s"], r["sql_calls"],
              r["wall_s"] - r["sql_s"]] for r in results],
        ),
    ]
    for r in results:
        if r.get("tree"):
            lines += ["", f"#### {r['step']}: call tree (frames ≥ 1 % of the step)", "", "```",
                      r["tree"], "```"]
        lines += ["", f"#### {r['step']}: top SQL statements", ""]
        lines.append(report.table(
            ["s", "calls", "statement"],
            [[s, n, q[:150] + ("…" if len(q) > 150 else "")] for q, s, n in r["statements"][:6]],
        ))
        lines += ["", f"#### {r['step']}: top self time (pyinstrument flat)", ""]
        lines.append(report.table(["s", "function"], [[s, f] for s, f in r["self_time"][:8]]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_engine",
                                description="Profile the engine steps of one real run in-process.")
    p.add_argument("--database-url", required=True, help="a seeded scratch database")
    p.add_argument("--out", required=True, help="directory for the reports")
    p.add_argument("--config", required=True, help="the run config (JSON), with dry_run false")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    results = profile_engine(args.database_url, Path(args.out), json.loads(args.config))
    print(common.RESULT_MARK + json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
