"""The parent side of a benchmark command: its work directory, the fields every result starts
with (its arguments, the machine, the code, the database), the report with its header, printed,
appended to ``--output`` and written as ``--json``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

from benchmarks.common import handle_interrupts


def machine_description() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = psutil.virtual_memory().total / 2**30
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return {
        "load": load,
        "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": f"{os.cpu_count()} × {model} (nproc {len(os.sched_getaffinity(0))})",
        "memory": f"{mem:.1f} GiB",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


@contextlib.contextmanager
def workdir(keep: bool = False) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="stockrx-bench-"))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def to_json(res: dict[str, Any]) -> str:
    import json
    from dataclasses import asdict

    def default(o: Any) -> Any:
        if isinstance(o, dt.datetime | dt.date):
            return o.isoformat()
        if hasattr(o, "__dataclass_fields__"):
            return asdict(o)
        return str(o)

    return json.dumps(res, default=default, indent=2, ensure_ascii=False)


def result_fields(args: Any, code: Any, copies: Any) -> dict[str, Any]:
    """The fields every benchmark's result starts with: its arguments, the machine, the measured
    code, the executor and the database with its seeding and copies."""
    return {
        "args": vars(args),
        "machine": machine_description(),
        "code": code.label,
        "executor": args.executor,
        "database": copies.description,
        "seeded": copies.counts,
        "seed_seconds": copies.seed_seconds,
        "copy_seconds": list(getattr(copies, "copy_seconds", [])),
    }


def run_benchmark(
    args: Any,
    benchmark: Callable[[Any, Path], dict[str, Any]],
    render: Callable[[dict[str, Any]], str],
) -> int:
    """The parent side of a benchmark command: run it in a work directory, print the report with
    its machine header, append it to ``--output``, write ``--json``. Exit 1 if a contender
    failed or its final data differs."""
    warnings.simplefilter("ignore")
    handle_interrupts()
    load_before = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    with workdir(keep=args.keep) as wd:
        res = benchmark(args, wd)
    machine = res["machine"]
    header = (
        f"# benchmark {machine['date']}: {machine['cpu']}, {machine['memory']}, "
        f"{machine['os']}, Python {machine['python']}\n\n"
        f"Code: {res['code']}. Total {res['total_s']:.0f} s. Load average (1/5/15 min) "
        f"{load_before} at start, {machine['load']} at end.\n\n"
    )
    report = header + render(res)
    print(report)
    if args.output:
        with open(args.output, "a", encoding="utf-8") as f:
            f.write(report + "\n")
    if args.json:
        Path(args.json).write_text(to_json(res), encoding="utf-8")
    outs = res["outcomes"]
    bad = [k for k, o in outs.items() if not o.ok or "DIFFERENT" in o.check]
    return 1 if bad else 0
