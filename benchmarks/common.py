"""Shared machinery of the benchmarks: identical database copies, monitored child processes,
data digests, Dagster step timings, tables and a description of the machine.

Nothing here is specific to one patch.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import decimal
import hashlib
import os
import platform
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil
from sqlalchemy import MetaData, create_engine, inspect, select, text
from sqlalchemy.engine import Engine, make_url

from stockrx_patches.tables import STOCKRX_TABLES

REPO_ROOT = Path(__file__).resolve().parents[1]
SEED = 20261129
#: Seeding depends on "today" (expiry dates, timestamps): fixed so every copy is identical.
SEED_TODAY = dt.date(2026, 1, 15)
FRAMEWORK_PREFIX = "data_patch_"
#: A child process reports its result on one stdout line starting with this.
RESULT_MARK = "BENCH_RESULT "


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


def copies_text(res: dict[str, Any]) -> str:
    """How long seeding and the contenders' copies of the seeded data took."""
    text = f" in {res['seed_seconds']:.1f} s" if res.get("seed_seconds") else ""
    copies = res.get("copy_seconds") or []
    if copies:
        text += (f"; {len(copies)} copies of it, {sum(copies):.1f} s in all "
                 f"({min(copies):.1f}–{max(copies):.1f} s each)")
    return text


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


# ---------------------------------------------------------------------------------------------
# Child processes with peak RSS of the whole process tree
# ---------------------------------------------------------------------------------------------


@dataclass
class ProcessResult:
    returncode: int | None  # None: killed at the timeout
    wall_s: float
    peak_rss_mb: float  # sum over the process tree, at its largest
    peak_procs: int  # processes alive in the tree at the RSS peak
    stdout: str
    stderr: str
    cpu_s: float = float("nan")  # user + system CPU of the child and its reaped descendants
    #: peak RSS of each process of the tree (pid → MB), for "any process ≤ N MB" and per op
    peak_rss_by_pid: dict[int, float] = field(default_factory=dict)
    root_pid: int | None = None  # the child itself

    @property
    def largest_process_mb(self) -> float:
        """The peak RSS of the tree's largest single process."""
        return max(self.peak_rss_by_pid.values(), default=0.0)

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def _tree_rss(proc: psutil.Process, peaks: dict[int, float]) -> tuple[float, int]:
    """RSS of a process tree (MB) and its size now; raises ``peaks[pid]`` to each member's."""
    total, n = 0, 0
    try:
        members = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0, 0
    for p in members:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            rss = p.memory_info().rss / (1024 * 1024)
            total += rss
            n += 1
            if rss > peaks.get(p.pid, 0.0):
                peaks[p.pid] = rss
    return total, n


def handle_interrupts() -> None:
    """SIGINT/SIGTERM raise KeyboardInterrupt, so databases, servers and children are cleaned
    up (importing Dagster replaces the SIGINT handler: call again after that)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def server_cpu_seconds(pid: int | None) -> float | None:
    """CPU used so far by a local server process tree (postmaster, backends, exited backends)."""
    if pid is None:
        return None
    try:
        root = psutil.Process(pid)
        t = root.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
        for child in root.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                c = child.cpu_times()
                total += c.user + c.system
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return total


def _kill_tree(pid: int) -> None:
    """Kill a child we started and its descendants (by pid, never by name)."""
    try:
        root = psutil.Process(pid)
        members = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for p in members:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)


def run_monitored(
    cmd: Sequence[str],
    env: dict[str, str] | None = None,
    cwd: Path = REPO_ROOT,
    timeout: float = 900.0,
    poll_s: float = 0.05,
) -> ProcessResult:
    """Run a command; poll the RSS of it and all its descendants; kill it at the timeout. Its
    CPU is the whole tree's, descendants that outlive it (the op fork server) included."""
    adopt_orphans()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.monotonic()
        child = subprocess.Popen(
            list(cmd), cwd=cwd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL
        )
        try:
            return _watch(child, t0, timeout, poll_s, out, err)
        except BaseException:  # interrupted: take the child's process tree down with us
            _kill_tree(child.pid)
            child.wait()
            raise


#: prctl(2) option: orphaned descendants are reparented to this process instead of init.
PR_SET_CHILD_SUBREAPER = 36


def adopt_orphans() -> None:
    """Make this process the child subreaper of its descendants (Linux ``prctl``), so that a
    descendant orphaned by the measured child's exit (Dagster's op fork server: the CLI never
    waits for it) is reparented to us and its CPU, with its reaped op processes', is counted."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _orphans_cpu(pids: set[int], within_s: float = 30.0) -> float:
    """CPU of the descendants in ``pids`` that were orphaned to us, waited for as they exit."""
    cpu, deadline = 0.0, time.monotonic() + within_s
    pending = set(pids)
    while pending and time.monotonic() < deadline:
        for pid in list(pending):
            try:
                done, _, usage = os.wait4(pid, os.WNOHANG)
            except ChildProcessError:  # not ours: reaped by its own parent (an op process)
                pending.discard(pid)
                continue
            if done:
                cpu += usage.ru_utime + usage.ru_stime
                pending.discard(pid)
        if pending:
            time.sleep(0.01)
    if pending:
        log(f"descendants still running {within_s:.0f} s after the run, CPU not counted: {sorted(pending)}")
    return cpu


def _watch(child: subprocess.Popen, t0: float, timeout: float, poll_s: float,
           out: Any, err: Any) -> ProcessResult:
    """Poll the child until it exits (or kill it at the timeout)."""
    ps = psutil.Process(child.pid)
    others = {c.pid for c in psutil.Process().children()} - {child.pid}
    peak, peak_n = 0.0, 0
    peaks: dict[int, float] = {}
    rc: int | None = None
    cpu = float("nan")
    while True:
        rss, n = _tree_rss(ps, peaks)
        if rss > peak:
            peak, peak_n = rss, n
        # wait4, not poll(): its rusage covers the child and every descendant it reaped
        # (Dagster's op processes), i.e. the CPU the whole run used, whatever the load.
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            rc = child.returncode = os.waitstatus_to_exitcode(status)
            # Its orphans are ours by now (reparented at its exit): those seen while polling,
            # and any that appeared between two polls.
            adopted = {c.pid for c in psutil.Process().children()} - others
            cpu = usage.ru_utime + usage.ru_stime + _orphans_cpu((set(peaks) | adopted) - {child.pid})
            break
        if time.monotonic() - t0 > timeout:
            _kill_tree(child.pid)
            child.wait()
            rc = None
            break
        time.sleep(poll_s)
    wall = time.monotonic() - t0
    out.seek(0)
    err.seek(0)
    return ProcessResult(rc, wall, peak, peak_n, out.read(), err.read(), cpu, peaks, child.pid)


# ---------------------------------------------------------------------------------------------
# Digests of the data
# ---------------------------------------------------------------------------------------------


def _canon(v: Any) -> str:
    if v is None:
        return "\\N"
    if isinstance(v, decimal.Decimal | float):
        return f"{decimal.Decimal(str(v)):.2f}"
    if isinstance(v, dt.datetime):
        return v.isoformat(sep=" ", timespec="microseconds")
    return str(v)


#: (table, column naming the item) of the tables the price benchmark compares.
PRICE_TABLES: tuple[tuple[str, str], ...] = (("inventories", "id"), ("inventory_logs", "inventory_id"))
#: Every StockRx table, with the column naming the item each row belongs to.
ALL_TABLES: tuple[tuple[str, str], ...] = (
    ("inventories", "id"), ("batches", "inventory_id"), ("inventory_logs", "inventory_id")
)


@dataclass
class Digest:
    """Hashes of every column of some tables, rows in id order.

    ``subset`` covers only the rows of items ``id <= subset`` (the naive baselines patch only
    those).
    """

    tables: dict[str, str]
    subset_tables: dict[str, str]
    counts: dict[str, int] = field(default_factory=dict)
    #: the rows without their ids, as a set: tells "other ids" from "other rows"
    rows_without_ids: dict[str, str] = field(default_factory=dict)

    @property
    def full(self) -> tuple[str, ...]:
        return tuple(self.tables.values())

    @property
    def subset(self) -> tuple[str, ...]:
        return tuple(self.subset_tables.values())


def same(a: Digest | None, b: Digest | None, part: str) -> str:
    """"identical" / "DIFFERENT" (naming the tables that differ) / "n/a"."""
    if a is None or b is None:
        return "n/a"
    da = a.tables if part == "full" else a.subset_tables
    db = b.tables if part == "full" else b.subset_tables
    diff = [t for t in da if da[t] != db.get(t)]
    if part == "full":  # same rows under other ids? (a different numbering of inserted rows)
        diff = [t + (": same rows, other ids" if a.rows_without_ids.get(t)
                     and a.rows_without_ids.get(t) == b.rows_without_ids.get(t) else "")
                for t in diff]
    return "identical" if not diff else f"DIFFERENT ({', '.join(diff)})"


#: PostgreSQL hashes server-side: md5 of every row's text form, in id order (much faster than
#: reading millions of rows into Python; digests are only compared within one backend).
PG_DIGEST = (
    "SELECT md5(string_agg(md5(t::text), '' ORDER BY t.id)), "
    "md5(string_agg(md5(t::text), '' ORDER BY t.id) FILTER (WHERE t.{item} <= :subset)), "
    "count(*) FROM {table} t"
)
#: The rows without their ids, in the order of their hashes (ids play no part).
PG_ROWS_WITHOUT_IDS = (
    "SELECT md5(string_agg(h, '' ORDER BY h)) FROM "
    "(SELECT md5((to_jsonb(t) - 'id')::text) AS h FROM {table} t) x"
)


def digest(url: str, subset: int, tables: Sequence[tuple[str, str]] = PRICE_TABLES,
           id_free: bool = False) -> Digest:
    """Every column of the given StockRx tables ``(name, item column)``, rows in id order (in
    Python through SQLAlchemy's types, except on PostgreSQL: see PG_DIGEST). ``id_free``: also
    a digest of the rows without their ids, as a set (``Digest.rows_without_ids``).

    MySQL/MariaDB go through Python too: the driver reads DECIMAL as ``Decimal`` and DATETIME(6)
    as ``datetime`` with its microseconds, so ``_canon`` gives every value one exact text
    whichever contender wrote it (a server-side ``MD5(GROUP_CONCAT(...))`` would be bounded
    by ``group_concat_max_len`` and the packet size)."""
    from stockrx_patches import tables as stockrx_tables

    engine = create_engine(url)
    full_h: dict[str, str] = {}
    part_h: dict[str, str] = {}
    counts: dict[str, int] = {}
    no_ids: dict[str, str] = {}
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "postgresql":
                for name, item in tables:
                    full, part, n = conn.execute(
                        text(PG_DIGEST.format(item=item, table=name)), {"subset": subset}
                    ).one()
                    full_h[name], part_h[name], counts[name] = str(full), str(part), n
                    if id_free:
                        no_ids[name] = str(conn.execute(
                            text(PG_ROWS_WITHOUT_IDS.format(table=name))).scalar_one())
                return Digest(full_h, part_h, counts, no_ids)
            for name, item_col in tables:
                tbl = getattr(stockrx_tables, name)
                full, part = hashlib.blake2b(digest_size=16), hashlib.blake2b(digest_size=16)
                n = 0
                result = conn.execution_options(stream_results=True, yield_per=20_000).execute(
                    select(*tbl.c).order_by(tbl.c.id)
                )
                item_idx = list(tbl.c.keys()).index(item_col)
                id_idx = list(tbl.c.keys()).index("id")
                hashes: list[bytes] = []
                for row in result:
                    line = "\x1f".join(_canon(v) for v in row).encode() + b"\x1e"
                    full.update(line)
                    if id_free:
                        hashes.append(hashlib.blake2b(
                            "\x1f".join(_canon(v) for i, v in enumerate(row) if i != id_idx)
                            .encode(), digest_size=16).digest())
                    if row[item_idx] <= subset:
                        part.update(line)
                    n += 1
                full_h[name], part_h[name], counts[name] = full.hexdigest(), part.hexdigest(), n
                if id_free:
                    no_ids[name] = hashlib.blake2b(b"".join(sorted(hashes)),
                                                   digest_size=16).hexdigest()
    finally:
        engine.dispose()
    return Digest(full_h, part_h, counts, no_ids)


# ---------------------------------------------------------------------------------------------
# Dagster: step timings from the run's event log
# ---------------------------------------------------------------------------------------------


@dataclass
class StepTiming:
    step: str
    status: str  # success | failure | skipped
    launch_s: float  # worker process start → STEP_START (process spawn, imports, code load)
    duration_s: float  # STEP_START → STEP_SUCCESS/FAILURE
    error: str | None = None  # first line of the failure, if the step failed
    pid: int | None = None  # the op's process (from its STEP_START event)
    started_at: float | None = None  # STEP_START, epoch seconds (None: never started)


@dataclass
class RunTimings:
    run_id: str
    status: str
    run_s: float  # RUN_START → RUN_SUCCESS/FAILURE
    steps: list[StepTiming]


def dagster_run_timings(dagster_home: Path) -> RunTimings | None:
    """Timings of the (only) run recorded in a DAGSTER_HOME, from its event log."""
    from dagster import DagsterEventType, DagsterInstance

    handle_interrupts()
    instance = DagsterInstance.from_config(str(dagster_home))
    try:
        runs = instance.get_runs()
        if not runs:
            return None
        run = runs[0]
        t: dict[tuple[str, str | None], float] = {}
        steps: list[str] = []
        errors: dict[str, str] = {}
        pids: dict[str, int] = {}
        for entry in instance.all_logs(run.run_id):
            ev = entry.dagster_event
            if ev is None:
                continue
            if ev.event_type_value == DagsterEventType.STEP_START.value and ev.step_key and ev.pid:
                pids[ev.step_key] = ev.pid
            if ev.event_type_value == DagsterEventType.STEP_FAILURE.value and ev.step_key:
                errors[ev.step_key] = _failure_text(ev)
            key = (ev.event_type_value, ev.step_key)
            t.setdefault(key, entry.timestamp)
            if ev.step_key and ev.step_key not in steps:
                steps.append(ev.step_key)
        run_end = t.get((DagsterEventType.RUN_SUCCESS.value, None)) or t.get(
            (DagsterEventType.RUN_FAILURE.value, None)
        )
        run_start = t.get((DagsterEventType.RUN_START.value, None))
        timings = []
        for s in steps:
            start = t.get((DagsterEventType.STEP_START.value, s))
            worker = t.get((DagsterEventType.STEP_WORKER_STARTING.value, s))
            end, status = None, "skipped"
            for ev_type, name in (
                (DagsterEventType.STEP_SUCCESS, "success"),
                (DagsterEventType.STEP_FAILURE, "failure"),
            ):
                if (ev_type.value, s) in t:
                    end, status = t[(ev_type.value, s)], name
            if start is not None and end is None:
                status = "unfinished"  # started, never ended (the run was killed)
            if start is None or end is None:
                timings.append(StepTiming(s, status, 0.0, 0.0, errors.get(s), pids.get(s)))
                continue
            launch = start - worker if worker is not None else 0.0
            timings.append(StepTiming(s, status, launch, end - start, errors.get(s), pids.get(s),
                                      start))
        return RunTimings(
            run.run_id,
            run.status.value,
            (run_end - run_start) if run_end and run_start else float("nan"),
            timings,
        )
    finally:
        instance.dispose()


def _failure_text(ev: Any) -> str:
    data = ev.step_failure_data
    parts = []
    user = getattr(data, "user_failure_data", None)
    if user is not None and user.description:
        parts.append(user.description)
    err = getattr(data, "error", None)
    while err is not None:
        parts.append(err.message.strip().splitlines()[0] if err.message.strip() else "")
        err = err.cause
    return " ← ".join(p for p in parts if p)[:600]


def dagster_cli() -> list[str]:
    """The `dagster` command of this interpreter's environment."""
    script = Path(sys.executable).parent / "dagster"
    return [str(script)] if script.exists() else [sys.executable, "-m", "dagster"]


def new_dagster_home(parent: Path, label: str, code_dir: Path = REPO_ROOT) -> Path:
    """A fresh DAGSTER_HOME holding the measured code's dagster.yaml, its storage already
    created, as a production instance's is: creating the SQLite storages costs a run 1.4-1.9 s
    of CPU, and every contender (the empty job and the patch job) starts from the same state."""
    from dagster import DagsterInstance

    home = parent / f"dagster_home_{label}"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    if (code_dir / "dagster.yaml").is_file():
        shutil.copy(code_dir / "dagster.yaml", home / "dagster.yaml")
    DagsterInstance.from_config(str(home)).dispose()
    return home


# ---------------------------------------------------------------------------------------------
# SQL statement timing (profiling)
# ---------------------------------------------------------------------------------------------


class StatementTimer:
    """Total time and calls per SQL statement shape, from SQLAlchemy cursor events."""

    def __init__(self) -> None:
        self.stats: dict[str, list[float]] = {}
        self._engines: list[Engine] = []
        self._lock = threading.Lock()  # checks run on several connections at once

    @staticmethod
    def shape(statement: str) -> str:
        s = re.sub(r"\s+", " ", statement).strip()
        s = re.sub(r"\bVALUES \(.*", "VALUES (…)", s)
        s = re.sub(r"\bIN \(__\[POSTCOMPILE[^)]*\]\)", "IN (…)", s)
        return s

    def attach(self, engine: Engine) -> None:
        from sqlalchemy import event

        def before(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
            conn.info.setdefault("bench_t0", []).append(time.perf_counter())

        def after(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
            seconds = time.perf_counter() - conn.info["bench_t0"].pop()
            with self._lock:
                entry = self.stats.setdefault(self.shape(statement), [0.0, 0])
                entry[0] += seconds
                entry[1] += 1

        event.listen(engine, "before_cursor_execute", before)
        event.listen(engine, "after_cursor_execute", after)
        self._engines.append(engine)

    def take(self) -> list[tuple[str, float, int]]:
        """(statement, seconds, calls), slowest first; resets the counters."""
        with self._lock:
            stats, self.stats = self.stats, {}
        rows = sorted(((s, v[0], int(v[1])) for s, v in stats.items()), key=lambda r: -r[1])
        return rows


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; numbers right-aligned."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [
        all(_is_num(r[i]) for r in rows) and len(rows) > 0 for i in range(len(headers))
    ]

    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(
            c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric, strict=True)
        ) + " |"

    sep = "|" + "|".join(
        ("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric, strict=True)
    ) + "|"
    return "\n".join([line(cells[0]), sep, *[line(r) for r in cells[1:]]])


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) or v is None


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if v != v:  # NaN
            return "–"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.2f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


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


def code_version() -> str:
    """The commit measured, and whether the engine/patch code had uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "patch_ops", "stockrx_patches", "resources"],
            cwd=REPO_ROOT, capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes in patch_ops/stockrx_patches/resources" if dirty else "")


@dataclass
class Code:
    """The project code a benchmark measures: the working tree, or a commit exported with
    ``git archive`` (other developers edit the working tree while benchmarks run)."""

    dir: Path
    label: str

    def env(self, base: dict[str, str]) -> dict[str, str]:
        """Environment for a child that must import the measured code (and ``benchmarks``)."""
        paths = [str(self.dir)] + ([str(REPO_ROOT)] if self.dir != REPO_ROOT else [])
        old = base.get("PYTHONPATH")
        return dict(base, PYTHONPATH=os.pathsep.join(paths + ([old] if old else [])))


def measured_code(rev: str | None, workdir: Path) -> Code:
    """``None``: the live working tree; ``"snapshot"``: a copy of the working tree as it is now
    (tracked and untracked files, not ignored ones); else a commit, via ``git archive``.
    ``benchmarks/`` itself always comes from this working tree (see ``Code.env``)."""
    if not rev:
        return Code(REPO_ROOT, f"working tree at {code_version()}")
    git = ["git", "-C", str(REPO_ROOT)]
    if rev == "snapshot":
        target = workdir / "code-snapshot"
        files = subprocess.run([*git, "ls-files", "-z", "--cached", "--others",
                                "--exclude-standard"], capture_output=True, check=True).stdout
        for name in filter(None, files.decode().split("\0")):
            src = REPO_ROOT / name
            if src.is_file() and not name.startswith("benchmarks/"):
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target / name)
        diff = subprocess.run([*git, "diff", "HEAD"], capture_output=True, check=True).stdout
        return Code(target, f"snapshot of the working tree at {code_version()} "
                    f"(git diff HEAD sha256 {hashlib.sha256(diff).hexdigest()[:12]}, "
                    f"taken {time.strftime('%H:%M:%S')})")
    sha = subprocess.run([*git, "rev-parse", "--short", rev], capture_output=True, text=True,
                         check=True).stdout.strip()
    target = workdir / f"code-{sha}"
    target.mkdir(parents=True)
    archive = subprocess.run([*git, "archive", sha], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    shutil.rmtree(target / "benchmarks", ignore_errors=True)  # the harness is always this one
    return Code(target, f"commit {sha} (git archive)")


@contextlib.contextmanager
def workdir(keep: bool = False) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="stockrx-bench-"))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


#: The job's MySQL/MariaDB session (patch_ops.dialects.mysql.SESSION_SETUP, less its lock waits)
MYSQL_SESSION = "SET SESSION sql_mode = 'TRADITIONAL', time_zone = '+00:00'"


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


# ---------------------------------------------------------------------------------------------
# Contenders as measured from outside (shared by the patch benchmarks)
# ---------------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Outcome:
    name: str
    rows: int  # driving rows processed (measured)
    process: ProcessResult
    work_s: float | None = None  # time doing the work, without process start-up
    rows_changed: int | None = None
    scale: float = 1.0  # measured on a subset: times are multiplied by this in the table
    timings: RunTimings | None = None
    execution: dict[str, Any] | None = None
    check: str = ""
    digest: Digest | None = None
    server_cpu_s: float | None = None  # CPU of the local database server during the run
    cpu_s: float | None = None  # client CPU as reported (scaled like the times); None: measured
    notes: list[str] = field(default_factory=list)
    steps: list[tuple[str, float]] = field(default_factory=list)  # a baseline's own step times
    writer: Any = None  # the application stand-in's samples meanwhile (benchmarks.app_writer)

    @property
    def ok(self) -> bool:
        return self.process.returncode == 0


#: Run config of the executors the benchmarks can compare. "default" adds none: the jobs' own
#: executor (patch_ops.jobs.patch_executor: one process per op, forked from a fork server that
#: preloads the framework and the code location); "spawn" is Dagster's stock multiprocess.
EXECUTORS: dict[str, dict[str, Any]] = {
    "default": {},
    "spawn": {"multiprocess": {"start_method": {"spawn": {}}}},
    "in_process": {"in_process": {}},
}


#: The throwaway MariaDB's buffer pool: the throwaway PostgreSQL's shared_buffers.
MYSQL_SERVER_ARGS = ("--innodb-buffer-pool-size=256M",)


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
        mserver = MySQLServer.from_env(durable=True, extra_args=MYSQL_SERVER_ARGS).start()
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


def read_execution(url: str, kind: str = "patch") -> dict[str, Any] | None:
    """The newest execution row of a kind (patch, restore) in a database, if the framework
    tables exist."""
    from sqlalchemy import DateTime

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            row = conn.execute(
                text(
                    "SELECT execution_id, status, phase, dry_run, run_at, target_count, "
                    "staged_updates, staged_inserts, batches_done, peak_rss_mb, started_at, "
                    "completed_at, error_message FROM data_patch_executions "
                    "WHERE kind = :kind ORDER BY started_at DESC LIMIT 1"
                ).columns(run_at=DateTime(), started_at=DateTime(), completed_at=DateTime()),
                {"kind": kind},
            ).mappings().first()
    except Exception:  # noqa: BLE001 - no framework tables: the run never got that far
        return None
    finally:
        engine.dispose()
    return dict(row) if row else None


def job_env(url: str, home: Path, code: Code, audit_key: str) -> dict[str, str]:
    """A job's environment: this database, this DAGSTER_HOME, a throwaway audit key (real runs
    refuse without one), and no Slack/SMTP settings, so a benchmark never notifies anyone."""
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("STOCKRX_SLACK_", "STOCKRX_SMTP_", "STOCKRX_AUDIT_"))
    }
    env.update(STOCKRX_DATABASE_URL=url, DAGSTER_HOME=str(home), STOCKRX_AUDIT_KEYS=audit_key)
    return code.env(env)


def run_dagster_job(job: str, name: str, url: str, configs: Sequence[Path], code: Code,
                    workdir: Path, timeout: float, audit_key: str,
                    kind: str = "patch") -> Outcome:
    """``dagster job execute -m stockrx_patches.definitions -j JOB -c ...`` in a fresh
    DAGSTER_HOME, measured; step timings from its event log, its execution row (``kind``)."""
    home = new_dagster_home(workdir, name.replace(" ", "_").replace(",", ""), code.dir)
    args = ["-m", "stockrx_patches.definitions", "-j", job]
    for c in configs:
        args += ["-c", str(c)]
    return execute_dagster_job(name, args, job_env(url, home, code, audit_key), code.dir, home,
                               timeout, url, kind)


def execute_dagster_job(name: str, args: Sequence[str], env: dict[str, str], cwd: Path,
                        home: Path, timeout: float, url: str | None = None,
                        kind: str = "patch") -> Outcome:
    """``dagster job execute ARGS`` with ``env`` (its DAGSTER_HOME: ``home``), measured; step
    timings from its event log; with ``url``, the execution row (``kind``) it left there."""
    proc = run_monitored([*dagster_cli(), "job", "execute", *args], env=env, cwd=cwd,
                         timeout=timeout)
    out = Outcome(name, 0, proc)
    out.timings = dagster_run_timings(home)
    out.execution = read_execution(url, kind) if url else None
    if out.timings is not None and out.timings.run_s == out.timings.run_s:
        out.work_s = out.timings.run_s
    if out.execution:
        out.rows = int(out.execution["target_count"] or 0)
        out.rows_changed = int(out.execution["staged_updates"] or 0)
    if proc.timed_out:
        out.notes.append(f"killed after {timeout:.0f} s")
        if out.execution:
            out.notes.append(
                f"reached phase {out.execution['phase']}, "
                f"{out.execution['batches_done']} batches"
            )
    elif not out.ok:
        failed = [s for s in (out.timings.steps if out.timings else []) if s.error]
        if failed:
            out.notes += [f"{s.step} failed: {s.error}" for s in failed]
        else:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
            out.notes.append("failed: " + " / ".join(tail))
    return out


def op_timings_section(o: Outcome) -> list[str]:
    """Markdown lines: a job run's time per op (from its Dagster event log)."""
    lines = ["", f"### {o.name}: time per op", ""]
    if o.notes:
        lines.append("Notes: " + "; ".join(o.notes))
        lines.append("")
    if o.timings is None:
        lines.append("(no Dagster run recorded)")
        return lines
    t = o.timings
    peaks = o.process.peak_rss_by_pid
    op_rows = [
        [s.step, s.status, s.launch_s, s.duration_s,
         100 * s.duration_s / t.run_s if t.run_s == t.run_s and t.run_s else None,
         peaks.get(s.pid) if s.pid else None]
        for s in t.steps
    ]
    lines.append(table(["op", "status", "process start s", "op s", "% of run",
                        "op process peak RSS MB"], op_rows))
    launch = sum(s.launch_s for s in t.steps)
    in_ops = sum(s.duration_s for s in t.steps)
    if t.run_s != t.run_s:  # the run never ended (killed at the timeout)
        lines += ["", f"Finished ops {in_ops:.2f} s, starting op processes {launch:.2f} s; "
                  f"killed after {o.process.wall_s:.0f} s of CLI wall."]
        return lines
    lines += [
        "",
        f"CLI wall {o.process.wall_s:.2f} s = Dagster run {t.run_s:.2f} s (ops "
        f"{in_ops:.2f} s, starting op processes {launch:.2f} s, other "
        f"{t.run_s - in_ops - launch:.2f} s) + {o.process.wall_s - t.run_s:.2f} s CLI "
        "start-up/code location load/teardown.",
    ]
    if o.execution and o.execution.get("peak_rss_mb"):
        lines[-1] += f" transform_batches peak RSS {o.execution['peak_rss_mb']:.0f} MB."
    lines[-1] += " " + largest_process_text(o)
    return lines


def largest_process_text(o: Outcome) -> str:
    """Which process of a run's tree peaked highest: an op's, the CLI's, or another."""
    peaks = o.process.peak_rss_by_pid
    if not peaks:
        return ""
    pid = max(peaks, key=peaks.__getitem__)
    steps = [s.step for s in (o.timings.steps if o.timings else []) if s.pid == pid]
    role = f"op {steps[0]}" if steps else ("the CLI" if pid == o.process.root_pid else
                                           "a helper process (fork server, compute log)")
    return (f"Largest single process: {peaks[pid]:.0f} MB ({role}); {len(peaks)} processes "
            "seen in the tree.")


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


RSS_FOOTNOTE = (
    "largest process MB: the highest peak RSS of any single process of the child's tree "
    "(per op below); peak RSS MB (tree): the tree's sum at its largest (forked processes share "
    "pages, so the sum counts them more than once); psutil, 50 ms polls, database server not "
    "included."
)


def contender_columns(o: Any, bare: Any, scaled_suffix: str) -> tuple[str, float, float | None, list[Any]]:
    """(name, wall s, work s, the columns after the rate) of one contender's table row.

    A run on a subset has its work scaled to the full set (its start-up is not), and its name
    gets ``scaled_suffix``; failures are marked in the name. The trailing columns are: × bare
    wall, × bare work, client CPU s, DB CPU s, largest process MB, peak RSS MB (tree), procs,
    final data.
    """
    bare_wall = bare.process.wall_s if bare and bare.ok else None
    bare_work = bare.work_s if bare and bare.ok else None
    wall, work, name = o.process.wall_s, o.work_s, o.name
    if o.scale != 1.0:
        startup = wall - (work or 0.0)
        work = (work or 0.0) * o.scale
        wall = startup + work
        name += scaled_suffix
    if not o.ok:
        name += " [FAILED]" if not o.process.timed_out else " [TIMED OUT]"
    tail = [
        wall / bare_wall if bare_wall else None,
        work / bare_work if work and bare_work else None,
        o.cpu_s if o.cpu_s is not None else o.process.cpu_s,
        o.server_cpu_s,
        o.process.largest_process_mb,
        o.process.peak_rss_mb,
        o.process.peak_procs,
        o.check,
    ]
    return name, wall, work, tail


# ---------------------------------------------------------------------------------------------
# Old code against new, each in child processes of its own (report_verify, read_passes)
# ---------------------------------------------------------------------------------------------


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
