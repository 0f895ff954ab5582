"""Old code against new, each in child processes of its own: the command lines, a durable
throwaway server, the interleaved rounds, and the child that runs one checkout's code, either
this script's worker on that checkout's PYTHONPATH (``report_verify``, ``read_passes``,
``plan_cost``) or that checkout's own copy of the script (``stage_index``, ``transform_cost``).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def ab_arguments(description: str) -> Any:
    """The command line of an old-against-new benchmark: the database, items, rounds, the
    checkout of the old code, where to write the raw results."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    db = ap.add_mutually_exclusive_group(required=True)
    db.add_argument("--postgres", action="store_true")
    db.add_argument("--mysql", action="store_true")
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--old", required=True, help="checkout of the code to compare with")
    ap.add_argument("--out", help="write the raw results (JSON) here")
    return ap


def run_code_worker(script: str, code: Path, args: Sequence[str]) -> dict[str, Any]:
    """``script --worker *args`` in a child process running ``code`` (its PYTHONPATH and
    directory); its result is the JSON on the last line of its output."""
    env = dict(os.environ, PYTHONPATH=str(code))
    out = subprocess.run(
        [sys.executable, str(Path(script).resolve()), "--worker", *args],
        env=env, cwd=code, capture_output=True, text=True, check=False,
    )
    if out.returncode:
        raise RuntimeError(f"worker failed ({code}, {' '.join(args)}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def ab_parse(ap: Any) -> Any:
    """The parsed command line of ``ab_arguments``: at most 300,000 items (a shared machine)."""
    args = ap.parse_args()
    if args.items > 300_000:
        ap.error("at most 300,000 items")
    return args


def durable_server(postgres: bool) -> Any:
    """A started throwaway PostgreSQL (else MariaDB) server, as durable as production."""
    if postgres:
        from tests.support.postgres import PostgresServer

        server: Any = PostgresServer.from_env(durable=True)
    else:
        from tests.support.mysql import MySQLServer

        server = MySQLServer.from_env(durable=True)
    server.start()
    return server


def server_pid(server: Any) -> int | None:
    """The process id of a started ``durable_server`` (its CPU time is read from it)."""
    return getattr(server, "postmaster_pid", None) or getattr(server, "server_pid", None)


def interleaved(rounds: int, labels: Sequence[T]) -> Iterator[tuple[int, T]]:
    """(round, label) for each round and label, the labels' order reversed every other round:
    a shared machine's drift falls on every side alike."""
    for r in range(rounds):
        yield from ((r, label) for label in (labels if r % 2 == 0 else labels[::-1]))


def ab_rounds(script: str, copies: Any, codes: dict[str, Path], rounds: int,
              args: Sequence[str], summary: Callable[[dict[str, Any]], str],
              runs: dict[str, list[dict[str, Any]]]) -> None:
    """Each code's ``run_code_worker`` result per interleaved round, each on a fresh copy of the
    seeded database (its url and server pid come first in the worker's arguments), appended
    to ``runs[label]`` as it comes: a failed round keeps the ones before it."""
    for r, label in interleaved(rounds, list(codes)):
        url = copies.fresh(label)
        res = run_code_worker(script, codes[label], [url, str(copies.server_pid or "-"), *args])
        copies.discard(url)
        runs.setdefault(label, []).append(res)
        print(f"round {r + 1} {label}: {summary(res)}", flush=True)


def step_median(runs: dict[str, list[dict[str, Any]]], label: str, i: int,
                value: Callable[[dict[str, Any]], float]) -> float:
    """The median over ``label``'s rounds of ``value`` of its ``i``-th step."""
    return statistics.median(value(r["steps"][i]) for r in runs[label])


def cpu_and_server(step: dict[str, Any]) -> float:
    """A step's client CPU plus its database server's (when read)."""
    return step["cpu"] + (step["server_cpu"] or 0.0)


def labelled_arguments(description: str, items: int = 200_000) -> Any:
    """The command line of a benchmark whose child is each checkout's own copy of the script:
    the database (or ``--child-url``: be that child), items, rounds, ``--code label=dir``."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    db = ap.add_mutually_exclusive_group(required=True)
    db.add_argument("--postgres", action="store_true")
    db.add_argument("--mysql", action="store_true")
    db.add_argument("--child-url")
    ap.add_argument("--items", type=int, default=items)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--code", action="append", default=[], help="label=checkout directory")
    return ap


def labelled_rounds(module: str, codes: dict[str, str], rounds: int, args: Sequence[str],
                    env: dict[str, str], mark: str, *, echo: bool = False) -> dict[str, list[dict[str, Any]]]:
    """Per interleaved round, ``python -m module *args`` run from each code's checkout (its
    PYTHONPATH and directory, ``env`` added); its result is the JSON after ``mark`` in its
    output. ``echo``: its standard error is printed after each round's line."""
    results: dict[str, list[dict[str, Any]]] = {label: [] for label in codes}
    for r, label in interleaved(rounds, list(codes)):
        path = str(Path(codes[label]).resolve())
        res = subprocess.run([sys.executable, "-m", module, *args], cwd=path,
                             env={**os.environ, **env, "PYTHONPATH": path},
                             capture_output=True, text=True, check=False)
        line = next((ln for ln in res.stdout.splitlines() if ln.startswith(mark)), None)
        if line is None:
            sys.exit(f"{label} failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
        got = json.loads(line[len(mark):])
        results[label].append(got)
        print(f"round {r + 1} {label}: " + json.dumps(
            {k: round(v, 3) if isinstance(v, float) else v for k, v in got.items()}), flush=True)
        if echo:
            print(res.stderr.rstrip(), flush=True)
    return results


def print_medians(results: dict[str, list[dict[str, Any]]], width: int, fmt: str) -> None:
    """Per numeric key, each code's median over its rounds and the last code's ratio to the
    first's."""
    labels = list(results)
    for k, v in results[labels[0]][0].items():
        if not isinstance(v, int | float) or isinstance(v, bool):
            continue
        med = {label: statistics.median(x[k] for x in rs) for label, rs in results.items()}
        first, last = med[labels[0]], med[labels[-1]]
        print(f"{k:{width}}" + "".join(f"  {label} {m:{fmt}}" for label, m in med.items())
              + (f"  ratio {last / first:.2f}" if first else ""))


def run_labelled(args: Any, module: str, env_name: str, mark: str, child_args: Sequence[str] = (),
                 *, echo: bool = False, width: int = 26, fmt: str = "8.3f") -> None:
    """The parent side of a ``labelled_arguments`` benchmark: a durable throwaway server, one
    seeded database, ``labelled_rounds`` of ``module``'s child (``--child-url`` and
    ``child_args``; the server's pid in ``env_name``) for each ``--code`` (default: this
    checkout), then the medians."""
    from benchmarks.databases import seed

    server = durable_server(args.postgres)
    codes = dict(c.split("=", 1) for c in args.code) or {"here": "."}
    try:
        url = server.create_database()
        seed(url, args.items)
        results = labelled_rounds(module, codes, args.rounds, ["--child-url", url, *child_args],
                                  {env_name: str(server_pid(server))}, mark, echo=echo)
        print_medians(results, width, fmt)
    finally:
        server.stop()


def run_ab(script: str, args: Any, worker_args: Sequence[str],
           summary: Callable[[dict[str, Any]], str],
           report: Callable[[dict[str, list[dict[str, Any]]]], None]) -> int:
    """The parent side of an ``ab_arguments`` benchmark: a durable throwaway server seeded once,
    ``ab_rounds`` of ``script``'s worker for the old checkout and this one, then ``report``; the
    raw results (as far as they got) to ``--out``."""
    from benchmarks.databases import MySQLCopies, PostgresCopies

    new, old = Path(script).resolve().parents[1], Path(args.old).resolve()
    server = durable_server(args.postgres)
    kind = PostgresCopies if args.postgres else MySQLCopies
    copies: Any = kind(server, args.items, owns_server=True)
    print(f"seeded {args.items:,} items in {copies.seed_seconds:.0f} s", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {}
    try:
        ab_rounds(script, copies, {"old": old, "new": new}, args.rounds, worker_args, summary,
                  runs)
        report(runs)
    finally:
        copies.close()
        if args.out:
            Path(args.out).write_text(json.dumps(runs, default=str))
    return 0
