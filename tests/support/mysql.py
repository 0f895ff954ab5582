"""A throwaway MariaDB (MySQL 8 compatible) server for the test session.

Usage (see tests/conftest.py: fixtures ``mysql_server`` and ``mysql_url``)::

    server = MySQLServer.from_env().start()   # or STOCKRX_TEST_MYSQL_URL
    url = server.create_database()            # mysql+pymysql://t_ab12..:PW@127.0.0.1:PORT/t_ab12..?charset=utf8mb4
    ...
    server.drop_database(url)                 # drops the database and its user
    server.stop()

Each ``create_database()`` makes a fresh utf8mb4 database ``t_<hex>`` and a least-privilege user of
the same name (random password) and returns that user's URL, never root's. The user's grant is the
**framework-schema grant**, what the patch framework needs in its own database (its bookkeeping
tables, TEMPORARY staging tables, indexes, foreign keys)::

    GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, DROP, INDEX, ALTER,
          CREATE TEMPORARY TABLES, LOCK TABLES, REFERENCES ON `<db>`.* TO <user>

The StockRx tables themselves only need SELECT, INSERT, UPDATE, DELETE (the README is to list
both grants). No global privilege is granted, not even PROCESS: ``KILL QUERY`` of the user's own
connections needs none. Tests create the StockRx schema through this user (it has CREATE on its database); a
test that needs an administrator uses ``root_url(database)``.

How the local server is run:
- binaries: ``mariadb-install-db`` and ``mariadbd`` from PATH or /usr/sbin, /usr/bin, else
  ``apt-get install -y mariadb-server`` (root only; scripts/bootstrap.sh normally did it already);
- ``mariadb-install-db --no-defaults`` then ``mariadbd --no-defaults`` (``--user=root`` when running
  as root: mariadbd refuses root otherwise), data directory, Unix socket, binary log, pid file and
  error log, and both programs' ``--tmpdir``, in one temporary directory (``stockrx-mdb-*``), TCP only on 127.0.0.1 on a free port;
- settings: utf8mb4 / utf8mb4_unicode_ci, ``--skip-name-resolve``, binary log ON in ROW format
  (``--log-bin --server-id=1``: MySQL 8's defaults, so statements that binary logging forbids
  fail here as they would in production), AUTO_INCREMENT lock mode 2 (``--innodb-autoinc-lock-mode=2``,
  "interleaved": MySQL 8's default, MariaDB's is 1), ``--local-infile=1``. For speed the test server is less
  durable: ``--innodb-flush-log-at-trx-commit=2 --sync-binlog=0``; ``MySQLServer(durable=True)``
  (benchmarks) sets both to 1 instead, production durability; TLS offered, with a self-signed
  certificate made by ``openssl`` when it is installed (``tls_args``), as MySQL 8 offers it;
- ``stop()`` is SIGTERM (a clean shutdown), then SIGKILL after 30 s, and removes the directory. It
  is registered with ``atexit``; the directory holds ``owner.pid`` (the test process), so a server
  left behind by a session that was killed (SIGKILL) is stopped by the next session's ``start()``.
  Start-up (install-db + ready) takes about 1-3 s; it happens once per session (per xdist worker),
  on first use.

An existing server instead: ``STOCKRX_TEST_MYSQL_URL=mysql+pymysql://root:PW@HOST:3306/`` (any
MySQL 8 / MariaDB user allowed to CREATE DATABASE, CREATE USER and GRANT) makes the tests use that
server and start nothing; the per-test users are then created for host '%'. With CI=true or
STOCKRX_REQUIRE_MYSQL=1, a server that cannot be started or reached fails the tests instead of
skipping them (``mysql_required()``).

Why not pytest-mysql: it would start the server for us, but its client fixture is a mysqlclient
(MySQLdb) connection (a C build that needs libmariadb-dev; we use PyMySQL), it is configured through
pytest.ini/command-line options rather than the environment variables our PostgreSQL server
already uses, it has no per-test least-privilege user, no stale-server cleanup after a killed
session and no skip-or-fail policy. We would wrap it in as much code as this module, while
keeping two different designs for our two servers; starting mariadbd ourselves takes one module
of the same shape as tests/support/postgres.py.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pymysql
from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Engine, make_url

from tests.support.postgres import free_port, pid_alive

ENV_EXTERNAL_URL = "STOCKRX_TEST_MYSQL_URL"
ENV_REQUIRE = "STOCKRX_REQUIRE_MYSQL"
DRIVER = "mysql+pymysql"
DIR_PREFIX = "stockrx-mdb-"
OWNER_FILE = "owner.pid"
PID_FILE = "mysqld.pid"
SOCKET_FILE = "mysqld.sock"
CHARSET = "utf8mb4"
COLLATION = "utf8mb4_unicode_ci"
BIN_DIRS = ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin", "/usr/libexec")

# What the patch user may do in its own database: the framework-schema grant (module docstring).
PATCH_USER_PRIVILEGES = (
    "SELECT, INSERT, UPDATE, DELETE, CREATE, DROP, INDEX, ALTER, "
    "CREATE TEMPORARY TABLES, LOCK TABLES, REFERENCES"
)
# MySQL 8 user names are at most 32 characters.
_NAME_RE = re.compile(r"^[A-Za-z0-9_]{1,32}$")

# Server options for every local server; FAST_ options only when durable=False.
SERVER_OPTIONS: tuple[str, ...] = (
    f"--character-set-server={CHARSET}",
    f"--collation-server={COLLATION}",
    "--skip-name-resolve",
    "--server-id=1",
    "--binlog-format=ROW",
    "--innodb-autoinc-lock-mode=2",  # MySQL 8's default (MariaDB's is 1)
    "--local-infile=1",
    "--max-connections=200",
)
FAST_OPTIONS: tuple[str, ...] = ("--innodb-flush-log-at-trx-commit=2", "--sync-binlog=0")
DURABLE_OPTIONS: tuple[str, ...] = ("--innodb-flush-log-at-trx-commit=1", "--sync-binlog=1")


class MySQLUnavailable(RuntimeError):
    """MariaDB could not be found, installed, started or reached."""


def mysql_required(environ: Mapping[str, str] = os.environ) -> bool:
    """True when a missing MySQL/MariaDB must fail the tests instead of skipping them."""
    ci = environ.get("CI", "").strip().lower() in {"1", "true", "yes"}
    required = environ.get(ENV_REQUIRE, "").strip().lower() in {"1", "true", "yes"}
    return ci or required


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _which(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in BIN_DIRS:  # /usr/sbin is not on a non-root user's PATH
        p = Path(d) / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None


def find_mariadb_binaries() -> tuple[str, str] | None:
    """(mariadb-install-db, mariadbd), or None when either is missing."""
    install_db = _which("mariadb-install-db")
    server = _which("mariadbd")
    return (install_db, server) if install_db and server else None


def install_mariadb() -> None:
    """apt-get install mariadb-server; root only. Raises MySQLUnavailable on failure."""
    if os.geteuid() != 0:
        raise MySQLUnavailable(
            "MariaDB server binaries (mariadb-install-db, mariadbd) not found and not running as "
            "root, so not installing them: install mariadb-server or set "
            f"{ENV_EXTERNAL_URL}=mysql+pymysql://root:PASSWORD@HOST:3306/"
        )
    if not shutil.which("apt-get"):
        raise MySQLUnavailable("MariaDB binaries not found and apt-get is not available")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "mariadb-server"]):
        print(f"[stockrx tests] MariaDB not found; running: {' '.join(cmd)}", flush=True)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
        if res.returncode != 0:
            raise MySQLUnavailable(
                f"`{' '.join(cmd)}` failed (rc {res.returncode}):\n{_tail(res.stdout + res.stderr)}"
            )


def _is_our_server(pid: int, base: Path) -> bool:
    """The process is a mariadbd whose command line names this directory (pid not reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return True  # no /proc: trust the pid file
    return str(base) in cmdline


def _terminate(pid: int, timeout: float = 30.0) -> None:
    """SIGTERM (clean shutdown), then SIGKILL after `timeout` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            if not pid_alive(pid):
                break
            time.sleep(0.05)


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
        with contextlib.suppress(OSError, ValueError):
            pid = int((base / PID_FILE).read_text().split()[0])
            if pid_alive(pid) and _is_our_server(pid, base):
                _terminate(pid, timeout=10.0)
        shutil.rmtree(base, ignore_errors=True)
        reaped.append(base)
    return reaped


def self_signed_certificate(cert: Path, key: Path, name: str, ip: str | None = None) -> None:
    """A self-signed EC certificate ``cert`` (its key: ``key``) for ``name`` and ``ip``, made by
    ``openssl``."""
    san = ["-addext", f"subjectAltName=IP:{ip}"] if ip else []
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "30", "-subj", f"/CN={name}", *san,
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )


def _ident(name: str) -> str:
    """A backtick-quoted MySQL identifier."""
    return "`" + name.replace("`", "``") + "`"


class MySQLServer:
    """A MariaDB server for tests: started here, or an existing one via STOCKRX_TEST_MYSQL_URL."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        external_url: str | None = None,
        durable: bool = False,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.host = host
        self.port: int | None = None
        self.durable = durable
        self.extra_args = list(extra_args)
        self.external_url: URL | None = make_url(external_url) if external_url else None
        self.base_dir: Path | None = None
        self.version: str | None = None
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._started = False
        if self.external_url is not None:
            self.host = self.external_url.host or host
            self.port = self.external_url.port or 3306

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ, **kwargs: Any) -> MySQLServer:
        return cls(external_url=environ.get(ENV_EXTERNAL_URL) or None, **kwargs)

    # ---------------------------------------------------------------- properties

    @property
    def is_external(self) -> bool:
        return self.external_url is not None

    @property
    def data_dir(self) -> Path:
        assert self.base_dir is not None, "server not started"
        return self.base_dir / "data"

    @property
    def socket_path(self) -> Path:
        assert self.base_dir is not None, "server not started"
        return self.base_dir / SOCKET_FILE

    @property
    def log_path(self) -> Path:
        assert self.base_dir is not None, "server not started"
        return self.base_dir / "error.log"

    @property
    def server_pid(self) -> int | None:
        if self._proc is not None:
            return self._proc.pid
        return None

    @property
    def user_host(self) -> str:
        """Host part of the per-test users: the local server sees every client as 127.0.0.1."""
        return "%" if self.is_external else "127.0.0.1"

    def server_args(self) -> list[str]:
        """The mariadbd command line (after the binary) for the local server."""
        assert self.base_dir is not None and self.port is not None
        b = self.base_dir
        args = ["--no-defaults"]
        if os.geteuid() == 0:
            args.append("--user=root")
        args += [
            f"--datadir={self.data_dir}",
            f"--tmpdir={b / 'tmp'}",
            f"--bind-address={self.host}",
            f"--port={self.port}",
            f"--socket={self.socket_path}",
            f"--pid-file={b / PID_FILE}",
            f"--log-error={self.log_path}",
            f"--log-bin={b / 'binlog'}",
            *SERVER_OPTIONS,
            *(DURABLE_OPTIONS if self.durable else FAST_OPTIONS),
            *self.tls_args(),
            *self.extra_args,
        ]
        return args

    def tls_args(self) -> list[str]:
        """TLS offered, as MySQL 8 does by default (its own self-signed certificate): clients
        that prefer TLS (PyMySQL, the Rails app) use it. A certificate of this server's own,
        made with ``openssl`` when it is installed; without it the server offers no TLS."""
        assert self.base_dir is not None
        cert, key = self.base_dir / "tls-cert.pem", self.base_dir / "tls-key.pem"
        if not cert.exists() and shutil.which("openssl"):
            self_signed_certificate(cert, key, "stockrx-test-mariadb", self.host)
        return [f"--ssl-cert={cert}", f"--ssl-key={key}"] if cert.exists() else []

    # ---------------------------------------------------------------- URLs, connections

    def root_url(self, database: str | None = None) -> str:
        """Administrator URL (mysql+pymysql://root@127.0.0.1:PORT/<database>?charset=utf8mb4)."""
        return self._root_url(database).render_as_string(hide_password=False)

    def _root_url(self, database: str | None) -> URL:
        if self.external_url is not None:
            u = self.external_url.set(drivername=DRIVER, database=database)
        else:
            assert self.port is not None, "server not started"
            u = URL.create(
                DRIVER, username="root", host=self.host, port=self.port, database=database
            )
        return u.update_query_dict({"charset": CHARSET})

    @contextlib.contextmanager
    def admin_connection(self, database: str | None = None) -> Iterator[pymysql.Connection[Any]]:
        """An autocommit PyMySQL connection as the administrator."""
        u = self._root_url(database)
        conn = pymysql.connect(
            host=u.host,
            port=u.port or 3306,
            user=u.username or "root",
            password=u.password or "",
            database=u.database,
            charset=CHARSET,
            autocommit=True,
            connect_timeout=10,
        )
        try:
            yield conn
        finally:
            conn.close()

    # ---------------------------------------------------------------- lifecycle

    def __enter__(self) -> MySQLServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> MySQLServer:
        if self._started:
            return self
        t0 = time.monotonic()
        if not self.is_external:
            self._start_local()
        self._check_reachable()
        self.startup_seconds = time.monotonic() - t0
        self._started = True
        return self

    def _check_reachable(self) -> None:
        try:
            with self.admin_connection() as conn, conn.cursor() as cur:
                cur.execute("SELECT VERSION()")
                row = cur.fetchone()
                self.version = str(row[0]) if row else None
        except pymysql.MySQLError as e:
            where = f"{ENV_EXTERNAL_URL} server" if self.is_external else "started server"
            shown = self._root_url(None).render_as_string(hide_password=True)
            if not self.is_external:
                self.stop()
            raise MySQLUnavailable(f"cannot connect to the {where} ({shown}): {e}") from e

    def _start_local(self) -> None:
        binaries = find_mariadb_binaries()
        if binaries is None:
            install_mariadb()
            binaries = find_mariadb_binaries()
            if binaries is None:
                raise MySQLUnavailable("installed mariadb-server but still no mariadbd found")
        install_db, server = binaries

        parent = Path(tempfile.gettempdir())
        if len(str(parent)) > 60:  # a Unix socket path is limited to ~107 bytes
            parent = Path("/tmp")
        reap_stale_servers(parent)
        self.base_dir = Path(tempfile.mkdtemp(prefix=DIR_PREFIX, dir=parent))
        (self.base_dir / OWNER_FILE).write_text(f"{os.getpid()}\n")
        (self.base_dir / "tmp").mkdir()
        atexit.register(self.stop)
        try:
            self._install_db(install_db)
            self._run_server(server)
        except BaseException:
            self.stop()
            raise

    def _install_db(self, install_db: str) -> None:
        args = [install_db, "--no-defaults"]
        if os.geteuid() == 0:
            args.append("--user=root")
        args += [
            f"--datadir={self.data_dir}",
            # Its bootstrap server's temporary files in this server's own directory, as the
            # server's: with the shared /tmp, parallel workers' set-ups failed now and then on a
            # temporary table's file (seen twice in session 15).
            f"--tmpdir={self.base_dir / 'tmp'}",
            "--auth-root-authentication-method=normal",  # root@127.0.0.1 without password
            "--skip-test-db",
            "--skip-name-resolve",
        ]
        try:
            res = subprocess.run(
                args,
                cwd=self.base_dir,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=180,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise MySQLUnavailable("mariadb-install-db timed out after 180 s") from e
        if res.returncode != 0:
            raise MySQLUnavailable(
                f"mariadb-install-db failed (rc {res.returncode}):\n{_tail(res.stdout + res.stderr)}"
            )

    def _run_server(self, server: str, attempts: int = 5, timeout: float = 60.0) -> None:
        assert self.base_dir is not None
        last = ""
        for _ in range(attempts):
            self.port = free_port(self.host)
            with open(self.base_dir / "mariadbd.out", "ab") as out:
                # Own session: a Ctrl-C of pytest reaches pytest only; atexit stops the server.
                self._proc = subprocess.Popen(
                    [server, *self.server_args()],
                    cwd=self.base_dir,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    break
                if self._ping():
                    return
                time.sleep(0.05)
            else:
                self._kill_proc()
                raise MySQLUnavailable(
                    f"mariadbd not ready after {timeout:.0f} s:\n{_tail(self._log_text())}"
                )
            log = self._log_text()
            last = f"mariadbd exited (rc {self._proc.returncode}):\n{_tail(log)}"
            self._proc = None
            if not re.search(r"Address already in use|Can't start server: Bind", log):
                break  # not a port race: retrying will not help
        raise MySQLUnavailable(last)

    def _ping(self) -> bool:
        try:
            conn = pymysql.connect(
                unix_socket=str(self.socket_path), user="root", connect_timeout=2
            )
        except pymysql.MySQLError:
            return False
        conn.close()
        return True

    def _log_text(self) -> str:
        parts = []
        for name in ("mariadbd.out", "error.log"):
            p = self.base_dir / name if self.base_dir else None
            if p is not None and p.exists():
                parts.append(p.read_text(errors="replace"))
        return "\n".join(parts)

    def _kill_proc(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()  # SIGTERM: clean shutdown
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def stop(self) -> None:
        """Stop a locally started server and delete its directory. Idempotent."""
        if self.is_external or self.base_dir is None:
            return
        self._kill_proc()
        shutil.rmtree(self.base_dir, ignore_errors=True)
        self.base_dir = None
        self._started = False
        atexit.unregister(self.stop)

    # ---------------------------------------------------------------- databases

    def create_database(self, prefix: str = "t") -> str:
        """Create a fresh utf8mb4 database and its least-privilege user (same name); return
        mysql+pymysql://<user>:<password>@<host>:<port>/<db>?charset=utf8mb4 for that user."""
        name = f"{prefix}_{secrets.token_hex(6)}"
        if not _NAME_RE.match(name):
            raise ValueError(f"bad database/user name {name!r} (letters, digits, _; <= 32 chars)")
        password = secrets.token_hex(16)
        with self.admin_connection() as conn, conn.cursor() as cur:
            cur.execute(
                f"CREATE DATABASE {_ident(name)} CHARACTER SET {CHARSET} COLLATE {COLLATION}"
            )
            cur.execute("CREATE USER %s@%s IDENTIFIED BY %s", (name, self.user_host, password))
            cur.execute(
                f"GRANT {PATCH_USER_PRIVILEGES} ON {_ident(name)}.* TO %s@%s",
                (name, self.user_host),
            )
        assert self.port is not None
        url = URL.create(
            DRIVER,
            username=name,
            password=password,
            host=self.host,
            port=self.port,
            database=name,
            query={"charset": CHARSET},
        )
        return url.render_as_string(hide_password=False)

    def drop_database(self, url_or_name: str) -> None:
        """Drop a database made by create_database() and its user, killing their connections
        first (an open transaction would otherwise make DROP DATABASE wait for its locks)."""
        if "://" in url_or_name:
            u = make_url(url_or_name)
            name, user = u.database, u.username
        else:
            name = user = url_or_name
        if not name:
            raise ValueError(f"no database name in {url_or_name!r}")
        # Only a user named after its database is ours (never drop root or the external admin).
        own_user = user if user == name else None
        with self.admin_connection() as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT ID FROM information_schema.PROCESSLIST "
                "WHERE (DB = %s OR USER = %s) AND ID <> CONNECTION_ID()",
                (name, own_user or ""),
            )
            for (thread_id,) in cur.fetchall():
                with contextlib.suppress(pymysql.MySQLError):  # 1094: already gone
                    cur.execute(f"KILL {int(thread_id)}")
            cur.execute(f"DROP DATABASE IF EXISTS {_ident(name)}")
            if own_user:
                cur.execute("DROP USER IF EXISTS %s@%s", (own_user, self.user_host))

    def list_databases(self) -> list[str]:
        with self.admin_connection() as conn, conn.cursor() as cur:
            cur.execute("SHOW DATABASES")
            return sorted(str(r[0]) for r in cur.fetchall())

    def list_users(self) -> list[str]:
        with self.admin_connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT User FROM mysql.user")
            return sorted(str(r[0]) for r in cur.fetchall())


def app_engine(url: str) -> Engine:
    """An engine as the application has it: the server's defaults (REPEATABLE READ), short
    lock waits."""
    engine = create_engine(url)

    @event.listens_for(engine, "connect")
    def short_waits(dbapi_conn, _record):  # type: ignore[no-untyped-def]
        cur = dbapi_conn.cursor()
        cur.execute("SET SESSION innodb_lock_wait_timeout = 2")
        cur.close()

    return engine
