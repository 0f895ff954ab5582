"""Old code against new, each in child processes of its own (``report_verify``,
``read_passes``, ``plan_cost``): their command line, a durable throwaway server, and the worker
that runs one checkout's code.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


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
    import json

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
