"""A throwaway PostgreSQL server for the test session.

Usage (see tests/conftest.py)::

    server = PostgresServer.from_env().start()   # or STOCKRX_TEST_PG_URL
    url = server.create_database()               # postgresql+psycopg://stockrx@127.0.0.1:PORT/t_ab12cd
    ...
    server.drop_database(url)
    server.stop()

How the local server is run:
- binaries: ``initdb``/``pg_ctl`` from PATH, else /usr/lib/postgresql/*/bin (15 preferred), else
  ``apt-get install -y postgresql`` (root only) and look again;
- ``initdb`` refuses to run as root: as root, every server command runs as the ``postgres`` OS
  user and the temporary directory is chowned to it;
- data directory and Unix socket live in one temporary directory; TCP only on 127.0.0.1 on a
  free port; durability is switched off (fsync, synchronous_commit, full_page_writes), except
  with ``durable=True`` (the benchmarks: production durability);
- ``stop()`` is ``pg_ctl -m fast stop``, then ``-m immediate``, then SIGKILL by pid, and removes
  the directory. It is also registered with ``atexit``; a server left behind by a test session
  that was killed (SIGKILL) is stopped by the next session's ``start()``.

If ``STOCKRX_TEST_PG_URL`` is set (any SQLAlchemy/libpq URL of a user allowed to CREATE
DATABASE), that server is used and nothing is started or stopped.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy.engine import URL, make_url

ENV_EXTERNAL_URL = "STOCKRX_TEST_PG_URL"
ENV_REQUIRE = "STOCKRX_REQUIRE_POSTGRES"
DRIVER = "postgresql+psycopg"
DIR_PREFIX = "stockrx-pg-"
OWNER_FILE = "owner.pid"
PREFERRED_MAJOR = "15"

# Settings for a disposable test server: speed over durability.
TEST_SETTINGS: dict[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "100",
    "shared_buffers": "256MB",
    "max_wal_size": "1GB",
    "log_min_messages": "warning",
    "log_line_prefix": "'%m [%p] %d '",
}

#: Production durability (the benchmarks): every commit flushed and synced, full-page writes.
DURABLE_SETTINGS: dict[str, str] = {
    **TEST_SETTINGS, "fsync": "on", "synchronous_commit": "on", "full_page_writes": "on",
}


class PostgresUnavailable(RuntimeError):
    """PostgreSQL could not be found, installed, started or reached."""


def postgres_required(environ: Mapping[str, str] = os.environ) -> bool:
    """True when a missing PostgreSQL must fail the tests instead of skipping them."""
    ci = environ.get("CI", "").strip().lower() in {"1", "true", "yes"}
    required = environ.get(ENV_REQUIRE, "").strip().lower() in {"1", "true", "yes"}
    return ci or required


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (dead, not yet reaped, e.g. when PID 1 of a container does not reap) is dead.
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
        return stat_line.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _world_traversable(path: Path) -> bool:
    """Every directory from / to path can be entered by another user (o+x)."""
    for p in [path, *path.parents]:
        try:
            if not os.stat(p).st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
    return True


def find_pg_bin_dir() -> Path | None:
    """Directory holding initdb + pg_ctl + postgres: PATH first, then /usr/lib/postgresql."""
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        # /usr/local/bin/initdb is a symlink into /usr/lib/postgresql/15/bin: use the real dir,
        # where pg_ctl also finds its `postgres`.
        real = Path(initdb).resolve().parent
        if all((real / b).exists() for b in ("initdb", "pg_ctl", "postgres")):
            return real
    candidates = [Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")]

    def rank(p: Path) -> tuple[int, int]:
        major = p.parent.name
        return (major == PREFERRED_MAJOR, int(major) if major.isdigit() else 0)

    for d in sorted(candidates, key=rank, reverse=True):
        if all((d / b).exists() for b in ("initdb", "pg_ctl", "postgres")):
            return d
    return None


def install_postgres() -> None:
    """apt-get install postgresql; root only. Raises PostgresUnavailable on failure."""
    if os.geteuid() != 0:
        raise PostgresUnavailable(
            "PostgreSQL server binaries (initdb, pg_ctl) not found and not running as root, "
            "so not installing them: install PostgreSQL 15 or set "
            f"{ENV_EXTERNAL_URL}=postgresql://USER@HOST:PORT/postgres"
        )
    if not shutil.which("apt-get"):
        raise PostgresUnavailable("PostgreSQL binaries not found and apt-get is not available")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "postgresql"]):
        print(f"[stockrx tests] PostgreSQL not found; running: {' '.join(cmd)}", flush=True)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
        if res.returncode != 0:
            raise PostgresUnavailable(
                f"`{' '.join(cmd)}` failed (rc {res.returncode}):\n{_tail(res.stdout + res.stderr)}"
            )


def reap_stale_servers(parent: Path) -> list[Path]:
    """Stop and delete servers whose owning test process is gone (e.g. pytest was SIGKILLed)."""
    reaped = []
    for base in parent.glob(DIR_PREFIX + "*"):
        try:
            owner = int((base / OWNER_FILE).read_text().strip())
        except (OSError, ValueError):
            continue
        if pid_alive(owner):
            continue
        pidfile = base / "data" / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().splitlines()[0])
            if pid_alive(pid):
                os.kill(pid, signal.SIGQUIT)  # immediate shutdown
                for _ in range(50):
                    if not pid_alive(pid):
                        break
                    time.sleep(0.1)
                else:
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)
        reaped.append(base)
    return reaped


class PostgresServer:
    """A PostgreSQL server for tests: started here, or an existing one via STOCKRX_TEST_PG_URL."""

    def __init__(
        self,
        *,
        user: str = "stockrx",
        host: str = "127.0.0.1",
        external_url: str | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.user = user
        self.host = host
        self.port: int | None = None
        self.settings = dict(TEST_SETTINGS if settings is None else settings)
        self.external_url: URL | None = make_url(external_url) if external_url else None
        self.base_dir: Path | None = None
        self.bin_dir: Path | None = None
        self.version: str | None = None
        self.startup_seconds: float | None = None
        self._run_as: pwd.struct_passwd | None = None
        self._started = False
        if self.external_url is not None:
            u = self.external_url
            self.user = u.username or user
            self.host = u.host or host
            self.port = u.port or 5432

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] = os.environ, durable: bool = False
    ) -> PostgresServer:
        return cls(external_url=environ.get(ENV_EXTERNAL_URL) or None,
                   settings=DURABLE_SETTINGS if durable else None)

    @property
    def durable(self) -> bool:
        return all(self.settings.get(k) == "on"
                   for k in ("fsync", "synchronous_commit", "full_page_writes"))

    # ---------------------------------------------------------------- properties

    @property
    def is_external(self) -> bool:
        return self.external_url is not None

    @property
    def data_dir(self) -> Path:
        assert self.base_dir is not None, "server not started"
        return self.base_dir / "data"

    @property
    def log_path(self) -> Path:
        assert self.base_dir is not None, "server not started"
        return self.base_dir / "server.log"

    @property
    def postmaster_pid(self) -> int | None:
        if self.base_dir is None:
            return None
        try:
            return int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL (postgresql+psycopg://...) of `database` on this server."""
        return self._url(database).render_as_string(hide_password=False)

    def _url(self, database: str) -> URL:
        if self.external_url is not None:
            return self.external_url.set(drivername=DRIVER, database=database)
        assert self.port is not None, "server not started"
        return URL.create(
            DRIVER, username=self.user, host=self.host, port=self.port, database=database
        )

    def _admin_database(self) -> str:
        if self.external_url is not None and self.external_url.database:
            return self.external_url.database
        return "postgres"

    @contextlib.contextmanager
    def admin_connection(self) -> Iterator[psycopg.Connection[Any]]:
        """An autocommit psycopg connection to the maintenance database."""
        u = self._url(self._admin_database())
        params: dict[str, Any] = {
            "host": u.host,
            "port": u.port,
            "user": u.username,
            "password": u.password,
            "dbname": u.database,
            "connect_timeout": 10,
        }
        params.update({k: v for k, v in u.query.items() if isinstance(v, str)})
        conn = psycopg.connect(
            **{k: v for k, v in params.items() if v is not None}, autocommit=True
        )
        try:
            yield conn
        finally:
            conn.close()

    # ---------------------------------------------------------------- lifecycle

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> PostgresServer:
        if self._started:
            return self
        t0 = time.monotonic()
        if self.is_external:
            self._check_reachable()
        else:
            self._start_local()
            self._check_reachable()
        self.startup_seconds = time.monotonic() - t0
        self._started = True
        return self

    def _check_reachable(self) -> None:
        try:
            with self.admin_connection() as conn:
                row = conn.execute("SHOW server_version").fetchone()
                self.version = str(row[0]) if row else None
        except psycopg.Error as e:
            where = "STOCKRX_TEST_PG_URL server" if self.is_external else "started server"
            raise PostgresUnavailable(f"cannot connect to the {where} ({self.url()}): {e}") from e

    def _start_local(self) -> None:
        self.bin_dir = find_pg_bin_dir()
        if self.bin_dir is None:
            install_postgres()
            self.bin_dir = find_pg_bin_dir()
            if self.bin_dir is None:
                raise PostgresUnavailable("installed postgresql but still no initdb/pg_ctl found")

        if os.geteuid() == 0:
            try:
                self._run_as = pwd.getpwnam("postgres")
            except KeyError as e:
                raise PostgresUnavailable(
                    "running as root but there is no `postgres` OS user to run initdb as"
                ) from e

        parent = Path(tempfile.gettempdir())
        # The postgres user must be able to reach the directory, and a Unix socket path is
        # limited to ~107 bytes.
        if (self._run_as and not _world_traversable(parent)) or len(str(parent)) > 60:
            parent = Path("/tmp")
        reap_stale_servers(parent)
        self.base_dir = Path(tempfile.mkdtemp(prefix=DIR_PREFIX, dir=parent))
        (self.base_dir / OWNER_FILE).write_text(f"{os.getpid()}\n")
        if self._run_as:
            os.chown(self.base_dir, self._run_as.pw_uid, self._run_as.pw_gid)
        atexit.register(self.stop)

        try:
            self._initdb()
            self._pg_ctl_start()
        except BaseException:
            self.stop()
            raise

    def _run(self, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, Any] = {}
        env = dict(os.environ, LC_ALL="C")
        if self._run_as:
            kwargs = {"user": self._run_as.pw_uid, "group": self._run_as.pw_gid, "extra_groups": []}
            env["HOME"] = self._run_as.pw_dir
        return subprocess.run(
            args,
            cwd=self.base_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **kwargs,
        )

    def _initdb(self) -> None:
        assert self.bin_dir is not None
        res = self._run(
            [
                str(self.bin_dir / "initdb"),
                "-D",
                str(self.data_dir),
                "--auth=trust",
                "-U",
                self.user,
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            timeout=180,
        )
        if res.returncode != 0:
            raise PostgresUnavailable(
                f"initdb failed (rc {res.returncode}):\n{_tail(res.stdout + res.stderr)}"
            )
        with open(self.data_dir / "postgresql.conf", "a") as f:
            f.write("\n# stockrx test settings\n")
            for k, v in self.settings.items():
                f.write(f"{k} = {v}\n")

    def _pg_ctl_start(self, attempts: int = 5) -> None:
        assert self.bin_dir is not None and self.base_dir is not None
        last = ""
        for _ in range(attempts):
            self.port = free_port(self.host)
            opts = f"-p {self.port} -h {self.host} -k {self.base_dir}"
            res = self._run(
                [
                    str(self.bin_dir / "pg_ctl"),
                    "-D",
                    str(self.data_dir),
                    "-l",
                    str(self.log_path),
                    "-o",
                    opts,
                    "-w",
                    "-t",
                    "60",
                    "start",
                ],
                timeout=90,
            )
            if res.returncode == 0:
                return
            log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
            last = _tail(res.stdout + res.stderr + "\n" + log)
            if not re.search(r"could not bind|already in use", log):
                break  # not a port race: retrying will not help
        raise PostgresUnavailable(f"pg_ctl start failed:\n{last}")

    def stop(self) -> None:
        """Stop a locally started server and delete its directory. Idempotent."""
        if self.is_external or self.base_dir is None:
            return
        pid = self.postmaster_pid
        if pid is not None and self.bin_dir is not None:
            for mode in ("fast", "immediate"):
                try:
                    res = self._run(
                        [
                            str(self.bin_dir / "pg_ctl"),
                            "-D",
                            str(self.data_dir),
                            "-m",
                            mode,
                            "-w",
                            "-t",
                            "30",
                            "stop",
                        ],
                        timeout=45,
                    )
                except subprocess.TimeoutExpired:
                    continue
                if res.returncode == 0 or not pid_alive(pid):
                    break
        if pid is not None and pid_alive(pid):  # last resort
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            for _ in range(50):
                if not pid_alive(pid):
                    break
                time.sleep(0.1)
        shutil.rmtree(self.base_dir, ignore_errors=True)
        self.base_dir = None
        self._started = False
        atexit.unregister(self.stop)

    # ---------------------------------------------------------------- databases

    def create_database(self, prefix: str = "t") -> str:
        """Create a fresh empty database; return its postgresql+psycopg:// URL."""
        name = f"{prefix}_{secrets.token_hex(6)}"
        with self.admin_connection() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, url_or_name: str) -> None:
        """Drop a database, terminating its open connections first."""
        name = make_url(url_or_name).database if "://" in url_or_name else url_or_name
        if not name:
            raise ValueError(f"no database name in {url_or_name!r}")
        with self.admin_connection() as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    def list_databases(self) -> list[str]:
        with self.admin_connection() as conn:
            rows = conn.execute(
                "SELECT datname FROM pg_database WHERE NOT datistemplate ORDER BY 1"
            ).fetchall()
        return [r[0] for r in rows]
