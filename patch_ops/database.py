"""Engines and transactions for the StockRx database: one engine per URL per process, write
transactions that hold their lock from the first statement, clear password-free errors.

The password is never shown: only ``redact_url``'s form of the URL goes into messages. The URL's
``framework_schema`` parameter (``patch_ops.dialects.names``) is the engine's, not the driver's.
"""

from __future__ import annotations

import functools
import os
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (
    Column,
    Computed,
    DefaultClause,
    Identity,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    create_engine,
    event,
    inspect,
    text,
)
from sqlalchemy.engine import Connection, Engine, Inspector, make_url
from sqlalchemy.engine.interfaces import ReflectedColumn
from sqlalchemy.exc import ArgumentError, InvalidRequestError, NoSuchModuleError, SQLAlchemyError

from patch_ops.dialects import UnsupportedServer, dialect_for_url, dialect_of
from patch_ops.dialects.names import URL_PARAMETER, framework_schema, real_schema, translate_map
from patch_ops.dialects.types import framework_ddl

_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def _forget_pooled_connections() -> None:
    """In a forked child: the parent's pooled connections are the parent's (sharing a socket
    corrupts both); the child opens its own (SQLAlchemy's advice for os.fork)."""
    global _engines_lock
    _engines_lock = threading.Lock()
    for engine in _engines.values():
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_forget_pooled_connections)


class DatabaseUnavailable(RuntimeError):
    """The StockRx database cannot be reached or its URL is malformed."""


def redact_url(url: str) -> str:
    """The URL with its password masked, safe for logs and error messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<malformed database URL>"


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction that will write: on SQLite it holds the write lock from its first statement."""
    with engine.connect() as conn:
        conn.execution_options(sqlite_begin="IMMEDIATE")
        with conn.begin():
            yield conn


def create_tables(engine: Engine, metadata: MetaData) -> None:
    """Create ``metadata``'s missing framework tables (``framework_ddl``: a missing privilege
    is one line) in a write transaction: on SQLite a deferred one that looked for a table and
    then creates it fails at once ("database is locked") when the application wrote between."""
    known = catalog(engine)
    if known.cached and all(table_exists(engine, t) for t in metadata.sorted_tables):
        return  # all there, as this op already read (a table is never dropped by the engine)
    with framework_ddl(engine), write_transaction(engine) as conn:
        metadata.create_all(conn, checkfirst=True)


def get_engine(url: str) -> Engine:
    """One engine per URL per process (ops run in their own processes and rebuild resources)."""
    with _engines_lock:
        engine = _engines.get(url)
        if engine is None:
            try:
                parsed = make_url(url)
            except ArgumentError as exc:
                raise DatabaseUnavailable(f"invalid database URL {redact_url(url)}") from exc
            schema = parsed.query.get(URL_PARAMETER)
            parsed = parsed.difference_update_query([URL_PARAMETER])
            dialect = dialect_for_url(parsed)
            scheme = redact_url(url).split("://", 1)[0]
            if schema is not None and not (
                isinstance(schema, str) and schema.strip() and dialect.features.schemas
            ):
                raise DatabaseUnavailable(
                    f"{URL_PARAMETER} in the URL {redact_url(url)}: "
                    + ("give one schema name" if dialect.features.schemas
                       else f"{scheme} has no schemas (use PostgreSQL or MySQL/MariaDB)")
                )
            try:
                engine = create_engine(parsed, future=True, **dialect.engine_options())
            except NoSuchModuleError:
                raise DatabaseUnavailable(
                    f"unknown kind of database {scheme!r} in the URL "
                    f"{redact_url(url)} (supported: sqlite, postgresql+psycopg, mysql+pymysql)"
                ) from None
            except ImportError as exc:
                raise DatabaseUnavailable(
                    f"the database driver for {scheme!r} is not installed "
                    f"(No module named {exc.name!r}); URL {redact_url(url)}"
                ) from None
            dialect.configure(engine)
            engine = engine.execution_options(schema_translate_map=translate_map(schema))
            _engines[url] = engine
        return engine


def require_database(engine: Engine) -> None:
    """Fail, before anything connects, when the database plainly does not exist: connecting
    would create it (a SQLite file)."""
    problem = dialect_of(engine).missing_database(engine.url)
    if problem:
        raise DatabaseUnavailable(
            f"the StockRx database {engine.url.render_as_string(True)}: {problem}"
        )


def check_connection(engine: Engine, create: bool = False) -> None:
    """Fail with a clear, password-free message if the database does not exist (unless
    ``create``: seeding a new demo database), cannot be reached, or its server cannot run
    patches safely (``DatabaseDialect.check_server``). Once per op (``Catalog.once``)."""
    catalog(engine).once("connection checked", lambda: _check_connection(engine, create))


def _check_connection(engine: Engine, create: bool) -> None:
    if not create:
        require_database(engine)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            dialect_of(conn).check_server(conn)
            schema = framework_schema(conn)
            if schema and schema not in inspect(conn).get_schema_names():
                raise UnsupportedServer(
                    f"the framework schema {schema!r} ({URL_PARAMETER} in the URL) does not "
                    "exist: create it and grant the patch user its privileges (README, "
                    "'Against MySQL'), or leave the parameter out"
                )
    except UnsupportedServer as exc:
        raise DatabaseUnavailable(
            f"the StockRx database {engine.url.render_as_string(True)}: {exc}"
        ) from None
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        password = engine.url.password
        if password:
            reason = reason.replace(str(password), "***")
        raise DatabaseUnavailable(
            f"cannot connect to the StockRx database {engine.url.render_as_string(True)}: "
            f"{reason}"
        ) from None


# ---------------------------------------------------------------------------------------------
# The catalog, read once per op
# ---------------------------------------------------------------------------------------------

#: A statement that changes the catalog (tables, columns, indexes).
_DDL = re.compile(r"\s*(CREATE|ALTER|DROP|RENAME)\b", re.IGNORECASE)

_catalogs: dict[str, Catalog] = {}
_catalogs_lock = threading.Lock()
_scopes = 0


class Catalog:
    """What the database's catalog says about its tables, for one engine: which exist, their
    columns and indexes (one inspector: SQLAlchemy keeps each answer in it) and reflected tables
    (one MetaData). Inside ``catalog_scope`` (an op) it is read once and kept, so an op asks
    once per table instead of once per step function (a 0-row run's ops sent ~240 catalog
    queries); any DDL statement of this process drops it, and a table missing from it is
    looked for again (another process may have made it). Outside a scope (``cached`` False)
    every call reads the catalog afresh, as before."""

    def __init__(self, engine: Engine, cached: bool):
        self.engine = engine
        self.cached = cached
        self.metadata = MetaData()
        self.found: set[tuple[str | None, str]] = set()
        #: Work done once per scope (e.g. "the audit tables are there").
        self.done: set[str] = set()
        self.lock = threading.RLock()

    def once(self, key: str, work: Callable[[], None]) -> None:
        """Run ``work`` unless this op's catalog has run ``key`` already (outside an op:
        always); a ``work`` that raises is tried again next time."""
        if self.cached and key in self.done:
            return
        work()
        self.done.add(key)

    @functools.cached_property
    def inspector(self) -> Inspector:
        """Made when first asked (making one connects)."""
        return inspect(self.engine)

    def has_table(self, name: str, schema: str | None, bind: Any = None) -> bool:
        """``name`` exists in ``schema``; looked for through ``bind`` (a connection whose own
        transaction may have made it) when this catalog does not know it."""
        with self.lock:
            if (schema, name) in self.found:
                return True
            if self.cached and name in self.inspector.get_table_names(schema):
                self.found.add((schema, name))
                return True
            if inspect(bind if bind is not None else self.engine).has_table(name, schema=schema):
                if self.cached:
                    self.found.add((schema, name))
                return True
            return False

    def tables(self, names: list[str] | tuple[str, ...], schema: str | None = None,
               bind: Any = None) -> dict[str, Table]:
        """``names`` reflected (each once while cached): see ``reflect_columns``."""
        with self.lock:
            md = self.metadata if self.cached else MetaData()
            key = {n: f"{schema}.{n}" if schema else n for n in names}
            missing = [n for n in names if key[n] not in md.tables]
            if missing:
                if self.cached and any(n not in self.inspector.get_table_names(schema)
                                       for n in missing):
                    self.inspector.clear_cache()  # made since it was read
                source = self.inspector if self.cached or bind is None else inspect(bind)
                reflect_columns(source, md, missing, schema)
            return {n: md.tables[key[n]] for n in names}


def reflect_columns(insp: Inspector, md: MetaData, names: list[str], schema: str | None) -> None:
    """Put ``names`` into ``md`` with what the steps read of a table: its columns (name, type,
    nullability, default, identity), primary key and table options (MySQL's character set and
    collation, which the mirrors copy). Not its foreign keys, indexes, unique and CHECK
    constraints, comment: no step reads them from a Table (drift's ``schema_of`` reads them
    itself), and on PostgreSQL they cost seven of ``MetaData.reflect``'s eleven catalog queries
    in every op. A table that is not there fails as ``MetaData.reflect`` does."""
    absent = [n for n in names if n not in insp.get_table_names(schema)]
    if absent:
        raise InvalidRequestError(f"Could not reflect: requested table(s) not available "
                                  f"in schema {schema!r}: ({', '.join(absent)})")
    columns = insp.get_multi_columns(schema=schema, filter_names=names)
    keys = insp.get_multi_pk_constraint(schema=schema, filter_names=names)
    options = insp.get_multi_table_options(schema=schema, filter_names=names)
    for name in names:
        pk: dict[str, Any] = dict(keys.get((schema, name)) or {})
        Table(
            name, md,
            *(reflected_column(c) for c in columns[(schema, name)]),
            *([PrimaryKeyConstraint(*pk["constrained_columns"], name=pk.get("name"))]
              if pk.get("constrained_columns") else []),
            schema=schema,
            **options.get((schema, name), {}),
        )


def reflected_column(c: ReflectedColumn) -> Column[Any]:
    """The Column ``MetaData.reflect`` makes of an inspector's column entry."""
    args: list[Any] = []
    default = c.get("default")
    if default is not None:
        args.append(DefaultClause(text(default) if isinstance(default, str) else default))
    if "computed" in c:
        args.append(Computed(**c["computed"]))
    if "identity" in c:
        args.append(Identity(**c["identity"]))
    kw: dict[str, Any] = {k: c[k] for k in ("nullable", "autoincrement", "comment")  # type: ignore[literal-required]
                          if k in c}
    kw.update(c.get("dialect_options") or {})
    return Column(c["name"], c["type"], *args, **kw)


def catalog(bind: Engine | Connection) -> Catalog:
    """The catalog of ``bind``'s engine: kept for the op (``catalog_scope``), else a fresh one."""
    engine = bind.engine
    if not _scopes:
        return Catalog(engine, cached=False)
    key = f"{engine.url!r}|{framework_schema(engine)}"
    with _catalogs_lock:
        found = _catalogs.get(key)
        if found is None or found.engine is not engine:
            found = _catalogs[key] = Catalog(engine, cached=True)
        return found


def table_exists(bind: Engine | Connection, table: Table) -> bool:
    """``table`` exists in the database (in its real schema), as the op's catalog says."""
    return catalog(bind).has_table(table.name, real_schema(bind, table), bind)


def forget_catalogs() -> None:
    """Drop every kept catalog: the database's tables may have changed."""
    with _catalogs_lock:
        _catalogs.clear()


@contextmanager
def catalog_scope() -> Iterator[None]:
    """Within: each engine's catalog is read once and kept (``Catalog``); dropped at the end,
    so the next op (or a re-execution, in a new process) reads it afresh."""
    global _scopes
    with _catalogs_lock:
        _scopes += 1
    try:
        yield
    finally:
        with _catalogs_lock:
            _scopes -= 1
            if not _scopes:
                _catalogs.clear()


@event.listens_for(Engine, "after_cursor_execute")
def _forget_on_ddl(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
    """DDL changes the catalog: forget it now, and again when its transaction ends (rolled
    back, PostgreSQL undoes it; whatever was read inside it meanwhile is gone with it)."""
    if _scopes and _DDL.match(statement):
        conn.info["stockrx_ddl"] = True
        forget_catalogs()


@event.listens_for(Engine, "commit")
@event.listens_for(Engine, "rollback")
def _forget_after_ddl_transaction(conn):  # type: ignore[no-untyped-def]
    # an invalidated connection (a statement cut short by a stop) has no info to read: its
    # rollback must not raise over the stop
    if conn.invalidated or conn.info.pop("stockrx_ddl", False):
        forget_catalogs()
