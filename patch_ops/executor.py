"""The executor of every patch, restore and purge job.

By default every op still gets its own process, but forked from a fork server that has already
imported Dagster, pandas, pandera, SQLAlchemy, the StockRx database's driver, the code location
and the Dagster instance's modules (``start_method: forkserver``, PRELOAD_MODULES), instead of a
fresh interpreter per op (``spawn``, Dagster's default), which costs ~5 s of CPU per op before
it does any work; the fork server imports them with its garbage collector paused, and what it
preloaded is then frozen out of the op processes' garbage collection (FREEZE_MODULE). A run can
still choose, in its run config, ``execution: {config: {in_process: {}}}`` or
``{multiprocess: {start_method: {spawn: {}}}}``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from dagster import (
    DagsterInstance,
    Executor,
    ExecutorDefinition,
    InitExecutorContext,
    multi_or_in_process_executor,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

#: What the fork server imports before forking op processes: first the module that pauses its
#: garbage collector until FREEZE_MODULE (then Dagster's executor, which Dagster would otherwise
#: put first), the framework (which brings Dagster and SQLAlchemy), what the ops import that
#: loading the code location does not (pandas and pandera, which only the ops' functions import:
#: the CLI, webserver and daemon do without them), dagster-postgres's driver, Dagster's command
#: line (every op process re-runs the parent's main script, ``dagster``, which imports it: 0.45 s
#: of each op's start otherwise) and ``upath.core``, which every op process's instance (its
#: ``defs_state_storage``) and Dagster's filesystem IO manager import (0.07-0.1 s of each op's
#: start otherwise); the StockRx database's driver (``database_driver``) and the code location's
#: own module are added per run.
PRELOAD_MODULES = (
    "patch_ops.forkserver_gc_pause", "dagster._core.executor.multiprocess", "patch_ops.jobs",
    "patch_ops.restore_jobs", "pandas", "pandera.pandas", "pandera.errors", "psycopg2",
    "dagster._cli", "upath.core",
)
#: The variable naming the StockRx database (definitions.py builds the database resource from it).
DATABASE_URL_ENV = "STOCKRX_DATABASE_URL"
#: What the fork server imports after a database driver, for its op processes to share.
DRIVER_PRELOADS = {"pymysql": ("patch_ops.dialects.mysql_tls_preload",)}
#: Imported by the fork server after every other preload: reads the patches' lazy declarations
#: (their pandera schemas) and freezes the preloaded objects, so an op process's garbage
#: collection does not walk (and copy) them (``patch_ops.forkserver_gc``).
FREEZE_MODULE = "patch_ops.forkserver_gc"


def instance_modules(instance: DagsterInstance) -> list[str]:
    """The modules of the Dagster instance's parts (run, event log and schedule storage, compute
    log manager, run coordinator...), as dagster.yaml names them. Every op process first builds
    the instance from its ref, and importing these there took ~0.5 s of each op's start (the
    SQLite storages bring alembic, mako, rich, pygments, watchdog)."""
    if instance.is_ephemeral:  # it has no ref: it cannot run ops in other processes anyway
        return []
    ref = instance.get_ref()
    names = (getattr(part, "module_name", None) for part in ref)  # ConfigurableClassData
    return list(dict.fromkeys(n for n in names if isinstance(n, str)))


def database_driver(environ: Mapping[str, str]) -> list[str]:
    """The DBAPI module every op imports to connect to the StockRx database (psycopg, pymysql),
    named by the URL's driver without importing it (the run worker never connects). Only that
    one: a MariaDB run's fork server no longer imports psycopg (0.1-0.27 s), and its op
    processes no longer import pymysql each. A driver whose module is named otherwise (mysqldb:
    MySQLdb) or none (pysqlite) is skipped by the fork server, which ignores a preload it cannot
    import; the op then imports it as before. PyMySQL's comes with the module that makes its
    TLS context once for every op process (``patch_ops.dialects.mysql_tls_preload``)."""
    url = environ.get(DATABASE_URL_ENV)
    if not url:
        return []
    try:
        driver = make_url(url).get_driver_name()
    except ArgumentError:  # a bad URL, or an unknown database: the database resource says so
        return []
    return [driver, *DRIVER_PRELOADS.get(driver, ())]


class StartMethodChooser:
    """forkserver, unless this process's fork server was started under another environment.

    A fork server lives as long as the process that started it, and every op process forked
    from it gets *its* environment (STOCKRX_DATABASE_URL, secrets), not the caller's current one.
    A run worker (``dagster job execute``, the daemon's runs) runs one job and exits, so this only
    matters in a long-lived process that executes several runs (``execute_job`` in a script or a
    test): there, once the environment has changed, op processes are spawned afresh.
    """

    def __init__(self) -> None:
        #: The environment when the fork server was first chosen (None: not yet).
        self.environ: frozenset[tuple[str, str]] | None = None

    def __call__(self, init_context: InitExecutorContext) -> dict[str, Any]:
        environ = frozenset(os.environ.items())
        if self.environ is None:
            self.environ = environ
        elif self.environ != environ:
            return {"spawn": {}}
        preload = [*PRELOAD_MODULES, *database_driver(os.environ),
                   *instance_modules(init_context.instance)]
        origin = init_context.job.get_python_origin()  # type: ignore[attr-defined]
        pointer = origin.get_repo_pointer()
        if getattr(pointer, "module", None):  # -m stockrx_patches.definitions, workspace.yaml
            preload.append(pointer.module)
        preload.append(FREEZE_MODULE)
        return {"forkserver": {"preload_modules": preload}}


#: This process's choice (one fork server per process).
default_start_method = StartMethodChooser()


def _forkserver_by_default(init_context: InitExecutorContext) -> Executor:
    config = dict(init_context.executor_config)
    multiprocess = config.get("multiprocess")
    if isinstance(multiprocess, dict) and not multiprocess.get("start_method"):
        start = default_start_method(init_context)
        config = {"multiprocess": {**multiprocess, "start_method": start}}
    create = multi_or_in_process_executor.executor_creation_fn
    assert create is not None
    return create(init_context._replace(executor_config=config))


#: Dagster's default executor (same run config: ``multiprocess`` or ``in_process``), except that
#: op processes start with ``forkserver`` (preloading PRELOAD_MODULES and the code location's
#: module) unless the run config names a start method.
patch_executor = ExecutorDefinition(
    name="multi_or_in_process_executor",
    config_schema=multi_or_in_process_executor.config_schema,  # type: ignore[arg-type]
    executor_creation_fn=_forkserver_by_default,
    requirements=multi_or_in_process_executor.get_requirements,
    description="One process per op, forked from a preloaded fork server (or in_process).",
)
