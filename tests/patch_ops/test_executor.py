"""The jobs' executor: Dagster's multi_or_in_process run config, op processes from a fork server
(whose preloaded heap, with pandas, pandera and the patches' schemas, they start with frozen),
and a fresh spawn where a reused fork server would carry a stale environment."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

from dagster import instance_for_test, reconstructable

from patch_ops import executor
from stockrx_patches.definitions import defs
from tests.conftest import REPO_ROOT, TEST_PYTHONPATH
from tests.support import slow_patches


def test_every_job_uses_the_forkserver_executor():
    names = [j.name for j in defs.resolve_all_job_defs()]
    assert {"inventory_price_adjustment", "batch_expiry_update", "restore_patch"} <= set(names)
    for name in names:
        if not name.startswith("__"):
            assert defs.resolve_job_def(name).executor_def is executor.patch_executor, name


def test_fork_server_preloads_the_code_location_until_the_environment_changes(monkeypatch):
    monkeypatch.setenv(executor.DATABASE_URL_ENV, "mysql+pymysql://u@db/stockrx")
    choose = executor.StartMethodChooser()
    with instance_for_test() as instance:  # (it sets DAGSTER_HOME while it lasts)
        context = SimpleNamespace(job=reconstructable(slow_patches.slow_job), instance=instance)
        first = choose(context)  # type: ignore[arg-type]
        preload = first["forkserver"]["preload_modules"]
        assert preload[: len(executor.PRELOAD_MODULES)] == list(executor.PRELOAD_MODULES)
        # what the op processes' instance is made of (here SQLite storages), imported once
        assert {"dagster._core.storage.runs", "dagster._core.storage.event_log"} <= set(preload)
        assert "pymysql" in preload and "psycopg" not in preload  # the StockRx database's driver
        assert preload[-2:] == ["tests.support.slow_patches", executor.FREEZE_MODULE]
        # the garbage collector paused from the first preload to the last (GC_PAUSE below)
        assert preload[:2] == [executor.PRELOAD_MODULES[0], "dagster._core.executor.multiprocess"]
        assert executor.PRELOAD_MODULES[0] == "patch_ops.forkserver_gc_pause"
        assert choose(context) == first  # type: ignore[arg-type]

        # This process's fork server would fork op processes with the old STOCKRX_DATABASE_URL.
        monkeypatch.setenv("STOCKRX_DATABASE_URL", "sqlite:////tmp/another.sqlite")
        assert choose(context) == {"spawn": {}}  # type: ignore[arg-type]


#: Runs gc_probe in a process of its own and prints the op's and the run worker's freeze counts.
PROBE = """
import gc
from dagster import execute_job, instance_for_test, reconstructable
from tests.support.fork_probe import gc_probe
with instance_for_test() as instance, execute_job(reconstructable(gc_probe), instance=instance) as r:
    assert r.success
    print(r.output_for_node("frozen_drivers"))
    print(r.output_for_node("preloaded"))
    print(r.output_for_node("freeze_count"), gc.get_freeze_count())
"""


def test_op_processes_start_with_the_preloaded_heap_frozen():
    """The fork server imports FREEZE_MODULE last, so an op process's garbage collection walks
    (and copies) only what the op makes, not the ~1M objects it shares with the fork server.
    In a fresh process: a fork server lives as long as the process that started it, and one
    started in this test worker would fork later tests' op processes with this test's
    environment."""
    env = dict(os.environ, PYTHONPATH=TEST_PYTHONPATH,
               STOCKRX_DATABASE_URL="mysql+pymysql://probe@127.0.0.1:1/never_connected")
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         cwd=REPO_ROOT, env=env, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    in_op, in_worker = map(int, out.stdout.split()[-2:])
    assert in_op > 100_000
    assert in_worker == 0  # the run worker is left alone
    # what the ops need was imported once, in the fork server, not by each op process
    assert out.stdout.splitlines()[-2] == (
        "gc-enabled=True schemas-made=True pandas pandera stockrx_patches.schemas"
    )
    # and the StockRx database's driver only (here pymysql), and what Dagster imports in every
    # op process (upath.core), so the op processes share them instead of importing them each
    assert out.stdout.splitlines()[-3] == "upath.core=frozen pymysql=frozen psycopg=absent"


#: What the fork server does with the first and the last of its preloads, in a fresh process.
GC_PAUSE = """
import gc, os, sys
import patch_ops.forkserver_gc_pause
paused = not gc.isenabled()
collections = gc.get_stats()[2]["collections"]
import dagster, pandas, patch_ops.jobs, stockrx_patches.definitions  # ~400k objects
uncollected = gc.get_stats()[2]["collections"] == collections
pid = os.fork()
if pid == 0:  # a process forked from it has its collector on even before FREEZE_MODULE
    os._exit(0 if gc.isenabled() else 3)
child_ok = os.waitpid(pid, 0)[1] == 0
import patch_ops.forkserver_gc
print(paused, uncollected, child_ok, gc.isenabled(), gc.get_freeze_count() > 100_000,
      os.environ.get("STOCKRX_GC_FROZEN") == "1")  # for the op processes' memory budgets
"""


def test_the_fork_server_preloads_with_its_garbage_collector_paused():
    """No collection walks the preloaded objects while they are made (they live as long as the
    fork server); the freeze module turns the collector back on, and a forked op process has
    it on whatever happened to the preloads."""
    out = subprocess.run([sys.executable, "-c", GC_PAUSE], capture_output=True, text=True,
                         cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=TEST_PYTHONPATH),
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["True"] * 6


def test_the_fork_server_preloads_the_driver_the_database_url_names():
    url = executor.DATABASE_URL_ENV
    assert executor.database_driver({url: "postgresql://u:secret@db/stockrx"}) == ["psycopg"]
    assert executor.database_driver({url: "postgresql+psycopg2://u@db/stockrx"}) == ["psycopg2"]
    assert executor.database_driver({url: "mysql+pymysql://u@db/stockrx"}) == [
        "pymysql", "patch_ops.dialects.mysql_tls_preload"]
    assert executor.database_driver({}) == []
    assert executor.database_driver({url: "not a url"}) == []  # the resource reports it
    assert executor.database_driver({url: "nosuchdb://u@db/x"}) == []
