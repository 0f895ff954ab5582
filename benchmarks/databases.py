"""The benchmarks' databases: the seeded data (fixed seed, fixed "today"), identical copies
of it for every contender (SQLite files, PostgreSQL template databases, MySQL/MariaDB
tablespaces or ``INSERT ... SELECT``, or one scratch database wiped and re-seeded), the
baselines' engine with the job's session settings, and what settles a database between a dry
run and its real run.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import shutil
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import MetaData, create_engine, inspect
from sqlalchemy.engine import Engine, make_url

from benchmarks.common import REPO_ROOT, log
from patch_ops.dialects.mysql import GROUP_MEMORY
from stockrx_patches.tables import STOCKRX_TABLES

SEED = 20261129
#: Seeding depends on "today" (expiry dates, timestamps): fixed so every copy is identical.
SEED_TODAY = dt.date(2026, 1, 15)
FRAMEWORK_PREFIX = "data_patch_"


# ---------------------------------------------------------------------------------------------
# Identical copies of one seeded data set
# ---------------------------------------------------------------------------------------------


def seed(url: str, items: int) -> dict[str, int]:
    """Deterministic demo data (same seed, same "today"): every call gives the same rows."""
    from stockrx_patches.seed import seed_demo  # pandas: not imported by the baseline workers

    if is_mysql(url):
        # The framework's sessions (sql_mode, time zone) and its fast bulk load (LOAD DATA LOCAL
        # needs the client's local_infile), as ``stockrx-patches seed-demo`` gets them.
        from patch_ops.dialects import dialect_for_url

        dialect = dialect_for_url(make_url(url))
        engine = create_engine(url, **dialect.engine_options())
        dialect.configure(engine)
    else:
        engine = create_engine(url)
    try:
        return seed_demo(engine, items=items, seed=SEED, today=SEED_TODAY, reset=True)
    finally:
        engine.dispose()


class Copies(Protocol):
    """A source of databases holding identical copies of the seeded data."""

    description: str
    server_pid: int | None  # a local database server whose CPU time can be read, if any
    counts: dict[str, int]  # rows seeded per table
    seed_seconds: float
    copy_seconds: list[float]  # time each fresh() took

    @property
    def seeded_url(self) -> str:
        """The seeded original (read only)."""
        ...

    def fresh(self, label: str) -> str:
        """URL of a database holding a pristine copy of the seeded data."""
        ...

    def discard(self, url: str) -> None: ...

    def close(self) -> None: ...


class SqliteCopies:
    """Seed one SQLite file, then copy the file for every contender."""

    def __init__(self, workdir: Path, items: int):
        self.dir = workdir / "sqlite"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.base = self.dir / "seeded.sqlite"
        self.description = f"SQLite {sqlite3.sqlite_version} (temp files under {self.dir})"
        self.server_pid: int | None = None  # SQLite works inside the client process
        t0 = time.monotonic()
        self.counts = seed(f"sqlite:///{self.base}", items)
        self.seed_seconds = time.monotonic() - t0
        self.copy_seconds: list[float] = []

    @property
    def seeded_url(self) -> str:
        return f"sqlite:///{self.base}"

    def fresh(self, label: str) -> str:
        t0 = time.monotonic()
        path = self.dir / f"{label}.sqlite"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        shutil.copyfile(self.base, path)
        self.copy_seconds.append(time.monotonic() - t0)
        return f"sqlite:///{path}"

    def discard(self, url: str) -> None:
        path = make_url(url).database
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class ServerCopies:
    """What the PostgreSQL and MySQL copies share: a seeded template database on a server, the
    contenders' copies of it (``fresh``, per server), dropped again at the end."""

    server: Any
    owns_server: bool
    template_url: str
    _made: list[str]

    def seed_template(self, items: int) -> None:
        self.template_url = self.server.create_database(prefix="bench_seed")
        t0 = time.monotonic()
        self.counts = seed(self.template_url, items)
        self.seed_seconds = time.monotonic() - t0
        self.copy_seconds: list[float] = []
        self._made = []

    @property
    def seeded_url(self) -> str:
        return self.template_url

    def discard(self, url: str) -> None:
        self.server.drop_database(url)
        with contextlib.suppress(ValueError):
            self._made.remove(url)

    def close(self) -> None:
        for url in list(self._made):
            with contextlib.suppress(Exception):
                self.discard(url)
        with contextlib.suppress(Exception):
            self.server.drop_database(self.template_url)
        if self.owns_server:
            self.server.stop()


class PostgresCopies(ServerCopies):
    """Seed a template database once; every contender gets ``CREATE DATABASE ... TEMPLATE``.

    ``server`` is a started ``tests.support.postgres.PostgresServer`` (throwaway, or the one
    named by STOCKRX_TEST_PG_URL).
    """

    def __init__(self, server: Any, items: int, owns_server: bool):
        self.server = server
        self.owns_server = owns_server
        self.description = f"PostgreSQL {server.version} on {server.host}:{server.port}" + (
            " (durable: fsync, synchronous_commit, full_page_writes on)"
            if server.durable and not server.is_external else "")
        self.server_pid = server.postmaster_pid
        self.seed_template(items)


    def fresh(self, label: str) -> str:
        from psycopg import sql

        t0 = time.monotonic()
        tpl = str(make_url(self.template_url).database)
        name = f"bench_{label}_{os.getpid()}"
        with self.server.admin_connection() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))
            # FILE_COPY: a plain file copy, much faster than the WAL_LOG default for big data.
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
                    sql.Identifier(name), sql.Identifier(tpl)
                )
            )
        url = self.server.url(name)
        self._made.append(url)
        self.copy_seconds.append(time.monotonic() - t0)
        return url



#: How a MySQL/MariaDB copy is made (``--mysql-copy``): "tablespace" (local server: the InnoDB
#: files, exported and imported) or "insert" (``INSERT ... SELECT``, any server).
MYSQL_COPY_METHODS = ("tablespace", "insert")


def is_mysql(url: str) -> bool:
    """A MySQL or MariaDB URL (``mysql+...`` or ``mariadb+...``)."""
    return make_url(url).get_backend_name() in ("mysql", "mariadb")


def _mysql_ident(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


class MySQLCopies(ServerCopies):
    """Seed a template database once; every contender gets a database of its own with the
    least-privilege patch user of ``tests.support.mysql`` (``create_database()``), filled as root.

    The copy's tables are made by the template's own ``SHOW CREATE TABLE`` (indexes, foreign keys,
    CHECKs, charset and the AUTO_INCREMENT counter: the new log rows get the same ids), then filled
    (``method``):

    - ``tablespace`` (a local server): ``ALTER TABLE ... DISCARD TABLESPACE``, the template's
      ``.ibd``/``.cfg`` files exported by ``FLUSH TABLES ... FOR EXPORT`` and copied into the new
      database's directory, ``ALTER TABLE ... IMPORT TABLESPACE``: a file copy of the seeded
      pages, as PostgreSQL's ``CREATE DATABASE ... TEMPLATE ... STRATEGY FILE_COPY``;
    - ``insert``: ``INSERT INTO copy.t SELECT * FROM template.t`` (any server, also
      STOCKRX_TEST_MYSQL_URL's).

    Both without foreign key checks (the rows come from a consistent database) and without binary
    logging of the copy (``sql_log_bin = 0``: setting up a contender is not what is measured);
    ``ANALYZE TABLE`` afterwards, as the seed did. Each copy is checked against the template:
    row counts and AUTO_INCREMENT counters.
    """

    def __init__(self, server: Any, items: int, owns_server: bool, method: str = "tablespace"):
        if method not in MYSQL_COPY_METHODS:
            raise ValueError(f"unknown copy method {method!r}")
        if method == "tablespace" and server.is_external:
            method = "insert"  # the files of an external server are out of reach
        self.server = server
        self.owns_server = owns_server
        self.method = method
        version = str(server.version or "?")
        kind = "MariaDB" if "mariadb" in version.lower() else "MySQL"
        self.description = (
            f"{kind} {version.split('-')[0]} on {server.host}:{server.port}"
            + (" (durable: binary log, innodb_flush_log_at_trx_commit=1, sync_binlog=1)"
               if server.durable and not server.is_external else "")
            + f", least-privilege patch user; copies by {method}"
        )
        self.server_pid = server.server_pid
        self.seed_template(items)
        self.template = str(make_url(self.template_url).database)
        with self.server.admin_connection() as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s "
                "AND TABLE_TYPE = 'BASE TABLE' ORDER BY TABLE_NAME", (self.template,))
            self.tables = [str(r[0]) for r in cur.fetchall()]
            self.ddl: dict[str, str] = {}
            for t in self.tables:
                cur.execute(f"SHOW CREATE TABLE {_mysql_ident(self.template)}.{_mysql_ident(t)}")
                self.ddl[t] = str(cur.fetchone()[1])
            cur.execute("SELECT @@innodb_buffer_pool_size, @@innodb_flush_method")
            pool, flush = cur.fetchone()
        self.description += f", buffer pool {int(pool) // 2**20} MB ({flush})"
        self.expected = self._shape(self.template)


    def _shape(self, db: str) -> dict[str, tuple[int, int | None]]:
        """(rows, AUTO_INCREMENT counter) per table of a database."""
        shape = {}
        with self.server.admin_connection() as conn, conn.cursor() as cur:
            for t in self.tables:
                cur.execute(f"SELECT count(*) FROM {_mysql_ident(db)}.{_mysql_ident(t)}")
                n = int(cur.fetchone()[0])
                cur.execute(f"SHOW CREATE TABLE {_mysql_ident(db)}.{_mysql_ident(t)}")
                m = re.search(r"AUTO_INCREMENT=(\d+)", str(cur.fetchone()[1]))
                shape[t] = (n, int(m.group(1)) if m else None)
        return shape

    def fresh(self, label: str) -> str:
        t0 = time.monotonic()
        url = self.server.create_database(prefix=f"b_{label}"[:12])
        self._made.append(url)
        db = str(make_url(url).database)
        q = _mysql_ident
        with self.server.admin_connection(db) as conn, conn.cursor() as cur:
            cur.execute("SET SESSION foreign_key_checks = 0, sql_log_bin = 0")
            for t in self.tables:
                cur.execute(self.ddl[t])
            if self.method == "tablespace":
                for t in self.tables:
                    cur.execute(f"ALTER TABLE {q(t)} DISCARD TABLESPACE")
                src = self.server.data_dir / self.template
                dst = self.server.data_dir / db
                with self.server.admin_connection() as export, export.cursor() as ex:
                    ex.execute("FLUSH TABLES " + ", ".join(
                        f"{q(self.template)}.{q(t)}" for t in self.tables) + " FOR EXPORT")
                    try:
                        for t in self.tables:
                            for ext in (".ibd", ".cfg"):
                                if (src / f"{t}{ext}").exists():
                                    shutil.copyfile(src / f"{t}{ext}", dst / f"{t}{ext}")
                    finally:
                        ex.execute("UNLOCK TABLES")
                for t in self.tables:
                    cur.execute(f"ALTER TABLE {q(t)} IMPORT TABLESPACE")
                for t in self.tables:
                    (dst / f"{t}.cfg").unlink(missing_ok=True)
            else:
                for t in self.tables:
                    cur.execute(f"INSERT INTO {q(t)} SELECT * FROM {q(self.template)}.{q(t)}")
            cur.execute("ANALYZE TABLE " + ", ".join(q(t) for t in self.tables))
            cur.fetchall()
        shape = self._shape(db)
        if shape != self.expected:
            raise RuntimeError(f"copy {db} of {self.template} by {self.method}: (rows, "
                               f"AUTO_INCREMENT) {shape}, expected {self.expected}")
        self.copy_seconds.append(time.monotonic() - t0)
        log(f"  copy for {label} ({self.method}): {self.copy_seconds[-1]:.1f} s")
        return url



class ReseedInPlace:
    """One given database, wiped and re-seeded before every contender.

    Refuses a database holding tables other than StockRx's and the framework's: the benchmark
    drops and recreates them, so it must only ever be pointed at a scratch database.
    """

    def __init__(self, url: str, items: int):
        self.url = url
        self.items = items
        self.server_pid: int | None = None
        self.description = f"{make_url(url).get_backend_name()} at " + make_url(
            url
        ).render_as_string(hide_password=True)
        engine = create_engine(url)
        try:
            names = inspect(engine).get_table_names()
        finally:
            engine.dispose()
        foreign = [
            n for n in names if n not in STOCKRX_TABLES and not n.startswith(FRAMEWORK_PREFIX)
        ]
        if foreign:
            raise SystemExit(
                f"refusing to wipe {self.description}: it has other tables ({foreign[:5]}); "
                "the benchmark drops and re-seeds the database, give it a scratch one"
            )
        t0 = time.monotonic()
        self.counts = self._reseed()
        self.seed_seconds = time.monotonic() - t0
        self.copy_seconds: list[float] = []

    @property
    def seeded_url(self) -> str:
        return self.url

    def _reseed(self) -> dict[str, int]:
        engine = create_engine(self.url)
        try:
            md = MetaData()
            md.reflect(engine)
            ours = [t for n, t in md.tables.items() if n.startswith(FRAMEWORK_PREFIX)]
            md.drop_all(engine, tables=ours)
        finally:
            engine.dispose()
        return seed(self.url, self.items)

    def fresh(self, label: str) -> str:
        t0 = time.monotonic()
        self._reseed()
        self.copy_seconds.append(time.monotonic() - t0)
        return self.url

    def discard(self, url: str) -> None:
        pass

    def close(self) -> None:
        pass


#: The throwaway MariaDB's buffer pool: the throwaway PostgreSQL's shared_buffers. InnoDB reads
#: around the OS page cache (O_DIRECT) where PostgreSQL reads through it, so at 1M items this pool
#: holds less of the data than PostgreSQL can; ``--mysql-buffer-pool`` measures another size.
MYSQL_BUFFER_POOL = "256M"


def mysql_server_args(buffer_pool: str = MYSQL_BUFFER_POOL) -> tuple[str, ...]:
    """The throwaway MariaDB's options beyond ``tests.support.mysql``'s."""
    return (f"--innodb-buffer-pool-size={buffer_pool}",)


def make_copies(args: Any, workdir: Path) -> Copies:
    """The copies named by ``--database-url`` / ``--sqlite`` / ``--mysql`` / ``--postgres`` (the
    default)."""
    if args.database_url:
        return ReseedInPlace(args.database_url, args.items)
    if args.sqlite:
        return SqliteCopies(workdir, args.items)
    sys.path.insert(0, str(REPO_ROOT))
    if getattr(args, "mysql", False):
        from tests.support.mysql import MySQLServer

        # Production durability: binary log on, innodb_flush_log_at_trx_commit=1, sync_binlog=1.
        pool = getattr(args, "mysql_buffer_pool", MYSQL_BUFFER_POOL)
        mserver = MySQLServer.from_env(durable=True, extra_args=mysql_server_args(pool)).start()
        try:
            return MySQLCopies(mserver, args.items, owns_server=not mserver.is_external,
                               method=getattr(args, "mysql_copy", "tablespace"))
        except BaseException:
            mserver.stop()
            raise
    from tests.support.postgres import PostgresServer

    # Production durability: fsync, synchronous_commit and full_page_writes on.
    server = PostgresServer.from_env(durable=True).start()
    try:
        return PostgresCopies(server, args.items, owns_server=not server.is_external)
    except BaseException:
        server.stop()
        raise


# ---------------------------------------------------------------------------------------------
# The baselines' engine; between the dry run and the real run
# ---------------------------------------------------------------------------------------------


#: The job's MySQL/MariaDB session (patch_ops.dialects.mysql.SESSION_SETUP, less its lock
#: waits), with the in-memory temporary tables its grouped checks get (GROUP_MEMORY: without
#: them the safety floor's grouped check spills to disk at 1M items, 28 s on MariaDB)
MYSQL_SESSION = ("SET SESSION sql_mode = 'TRADITIONAL', time_zone = '+00:00', "
                 f"tmp_table_size = {GROUP_MEMORY}, max_heap_table_size = {GROUP_MEMORY}")


def baseline_engine(url: str) -> Engine:
    """An engine for the baselines, with the job's SQLite settings (WAL, synchronous NORMAL) and
    its MySQL/MariaDB session (sql_mode TRADITIONAL, UTC, READ COMMITTED), without importing the
    framework (so the baselines' process start-up stays minimal)."""
    if is_mysql(url):
        return create_engine(url, isolation_level="READ COMMITTED",
                             connect_args={"init_command": MYSQL_SESSION})
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        from sqlalchemy import event

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys = ON")
            cur.execute("PRAGMA journal_mode = WAL")
            cur.execute("PRAGMA synchronous = NORMAL")
            cur.close()

    return engine


def settle(url: str) -> None:
    """What the hours between an approving dry run and its real run do to a PostgreSQL
    database: VACUUM (ANALYZE). The dry run's trial apply leaves a dead row for every row it
    changed; back to back, autovacuum would clean them up in the middle of the real run, at a
    moment that differs from run to run (same code at 1M rows: real run 191.6 s and 193.9 s of
    DB CPU back to back, 166.8 s and 163.1 s after this). Untimed and logged; nothing to do on
    SQLite, whose rollback leaves no dead rows."""
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        if engine.dialect.name != "postgresql":
            return
        t0 = time.monotonic()
        with engine.connect() as conn:
            conn.exec_driver_sql("VACUUM (ANALYZE)")
        took = time.monotonic() - t0
        log(f"  VACUUM (ANALYZE) after the dry run, before the real run: {took:.1f} s")
    finally:
        engine.dispose()
