"""Durable state of the engine, kept in the StockRx database next to the data it protects.

- ``data_patch_executions``: the execution history (one row per patch, restore or purge run).
- ``data_patch_targets``: the frozen target sets of executions planned by earlier versions
  (table, id); each new execution's are tables of their own (``patch_ops.target_sets``).
- ``data_patch_rejects``: rows whose transform output failed validation.
- ``data_patch_locks``: one row per table while an execution holds it.
- work rows tables built from a live table T's reflected columns (``work_table``): every
  column of T, nullable and unconstrained, plus ``dp_*`` bookkeeping columns. Each new
  execution's are tables of its own (``patch_ops.work_rows`` decides where they are); earlier
  versions' executions keep theirs in the shared mirrors ``data_patch_backup__T``
  (before-images) and ``data_patch_stage__T`` (after-images of updated rows, rows to insert;
  earlier still, fingerprints were copied to ``data_patch_approved__T``).
"""

from __future__ import annotations

import threading
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    false,
    inspect,
    text,
    true,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.schema import CreateColumn
from sqlalchemy.types import TypeEngine, Uuid

from patch_ops.database import catalog, create_tables, write_transaction
from patch_ops.dialects import MissingPrivilege, dialect_of
from patch_ops.dialects.names import FRAMEWORK_SCHEMA, framework_schema, table_sql
from patch_ops.dialects.types import (
    DATETIME_US,
    EXECUTION_KEY,
    LONG_TEXT,
    TABLE_OPTIONS,
    framework_ddl,
    key_string,
    mirror_table_options,
)
from patch_ops.patch import Tables

framework_metadata = MetaData()

executions = Table(
    "data_patch_executions",
    framework_metadata,
    Column("execution_id", key_string(36), primary_key=True),
    Column("patch_name", String(255), nullable=False, index=True),
    Column("kind", String(16), nullable=False, server_default="patch"),  # patch|restore|purge
    Column("status", String(16), nullable=False),  # pending|running|paused|completed|failed
    Column("phase", String(32), nullable=False, server_default="planned"),
    Column("dry_run", Boolean, nullable=False, server_default=true()),
    Column("started_at", DATETIME_US, nullable=False),
    Column("completed_at", DATETIME_US),
    Column("processed_records", BigInteger, nullable=False, server_default=text("0")),
    Column("error_message", LONG_TEXT),
    Column("rollback_performed", Boolean, nullable=False, server_default=false()),
    Column("dagster_run_id", String(64), index=True),
    Column("root_run_id", String(64)),
    Column("launched_by", String(255)),
    Column("config", JSON),
    Column("declaration", JSON),  # the patch's tables/columns, so restore needs no patch code
    Column("run_at", DATETIME_US),
    Column("business_date", String(10)),
    Column("target_count", BigInteger, nullable=False, server_default=text("0")),
    Column("batch_size", Integer),
    Column("memory_limit_mb", Integer),
    Column("cursor", BigInteger),  # last driving id transformed; resume point
    Column("batches_done", Integer, nullable=False, server_default=text("0")),
    Column("staged_updates", BigInteger, nullable=False, server_default=text("0")),
    Column("staged_inserts", BigInteger, nullable=False, server_default=text("0")),
    Column("failed_records", BigInteger, nullable=False, server_default=text("0")),
    Column("peak_rss_mb", Float),
    Column("estimated_seconds", Float),
    Column("report", JSON),
    Column("report_markdown", LONG_TEXT),
    Column("restores_execution_id", key_string(36)),
    Column("restored_by_execution_id", key_string(36)),
    Column("heartbeat_at", DATETIME_US),
    Column("notifications", JSON),  # delivery outcome of every notification sent
    # Approval gate (patch_ops.approval): the plan hash of every patch execution, its parts, and
    # for a real run the dry run whose identical plan approved it.
    Column("plan_hash", String(64)),
    Column("plan", JSON),
    Column("approved_by_execution_id", key_string(36)),
    # Maintenance windows (patch_ops.windows): the transform pauses at the first batch boundary
    # after deadline_at (status 'paused', resumed by a later run) and fails after overrun_at
    # (3x the estimate); paused_seconds is the time spent paused, left out of throughput.
    Column("deadline_at", DATETIME_US),
    Column("overrun_at", DATETIME_US),
    Column("paused_seconds", Float, nullable=False, server_default=text("0")),
    # Where the commit sits in the database's log, for point-in-time recovery: the position
    # read inside the commit transaction ("before": the patch not yet in it) and right after.
    Column("commit_position", JSON),
    # Where the execution's work rows are (patch_ops.target_sets): NULL, the shared tables (an
    # earlier version's execution); 1, its target sets in tables of their own.
    Column("storage", Integer),
    schema=FRAMEWORK_SCHEMA,
    **TABLE_OPTIONS,
)

targets = Table(
    "data_patch_targets",
    framework_metadata,
    Column("execution_id", EXECUTION_KEY, nullable=False),
    Column("table_name", key_string(255), nullable=False),
    Column("row_id", BigInteger, nullable=False),
    PrimaryKeyConstraint("execution_id", "table_name", "row_id"),
    schema=FRAMEWORK_SCHEMA,
    **TABLE_OPTIONS,
)

rejects = Table(
    "data_patch_rejects",
    framework_metadata,
    Column("execution_id", key_string(36), nullable=False, index=True),
    Column("source_id", BigInteger),
    Column("table_name", String(255), nullable=False),
    Column("column_name", String(255)),
    Column("check_name", LONG_TEXT),
    Column("failure_case", LONG_TEXT),
    schema=FRAMEWORK_SCHEMA,
    **TABLE_OPTIONS,
)

locks = Table(
    "data_patch_locks",
    framework_metadata,
    Column("table_name", key_string(255), primary_key=True),
    Column("execution_id", key_string(36), nullable=False),
    Column("dagster_run_id", String(64)),
    Column("hostname", String(255)),
    Column("pid", Integer),
    Column("acquired_at", DATETIME_US, nullable=False),
    schema=FRAMEWORK_SCHEMA,
    **TABLE_OPTIONS,
)


#: ``check_name`` in ``data_patch_rejects`` of a driving row held back because what the patch
#: reads or writes of it changed since the approving dry run (``patch_ops.steps.drift``).
DRIFTED = "drift_since_approval"

MIRROR_COLUMNS = ("dp_execution_id", "dp_action", "dp_seq", "dp_source_id")
#: Mirror kinds: before-images, staged changes.
MIRROR_KINDS = ("backup", "stage")
#: dp_action of mirror rows: a before-image (backup), an updated row, an inserted row (stage).
BACKUP, UPDATE, INSERT = "B", "U", "I"
#: dp_action of a stage row that fails a check, staged by the in-database transform's one-pass
#: write inside a savepoint that is then rolled back: never committed, never read by a step.
FAILED = "F"

_mirror_cache: dict[tuple[str, str | None, str], Table] = {}
_mirror_lock = threading.Lock()


def ensure_framework_tables(engine: Engine) -> None:
    """Create the framework tables if missing, and add the columns added since."""
    create_tables(engine, framework_metadata)
    with framework_ddl(engine):
        _add_missing_columns(engine)


def _add_missing_columns(engine: Engine) -> None:
    """Columns added to the framework tables since a database was set up (never dropped), and
    their execution keys as this version makes them (``narrow_execution_keys``)."""
    schema = framework_schema(engine)
    names = [t.name for t in framework_metadata.sorted_tables]
    # One catalog query for all of them (PostgreSQL), not one per table.
    columns = catalog(engine).inspector.get_multi_columns(schema=schema, filter_names=names)
    for table in framework_metadata.sorted_tables:
        existing = {c["name"]: c["type"] for c in columns.get((schema, table.name), [])}
        narrow_execution_keys(engine, table, existing)
        missing = [c for c in table.columns if c.name not in existing]
        for col in missing:
            ddl = CreateColumn(col).compile(dialect=engine.dialect)
            try:
                with write_transaction(engine) as conn:
                    conn.exec_driver_sql(f"ALTER TABLE {table_sql(conn, table)} ADD COLUMN {ddl}")
            except DBAPIError:
                # Another process added it at the same moment: fine; anything else: raise.
                now = inspect(engine).get_columns(table.name, schema=schema)
                if col.name not in {c["name"] for c in now}:
                    raise


def mirror_name(kind: str, table: str) -> str:
    return f"data_patch_{kind}__{table}"


def mirror_table(engine: Engine, live: Table, kind: str) -> Table:
    """A mirror (``MIRROR_KINDS``) of a live table, created (or widened) to match its columns."""
    assert kind in MIRROR_KINDS
    return work_table(engine, live, mirror_name(kind, live.name), shared=True)


def work_table(engine: Engine, live: Table, name: str, shared: bool) -> Table:
    """Table ``name`` of work rows of live table ``live``, created (or widened) to match its
    columns: ``dp_seq``, ``dp_source_id`` and every column of ``live``, nullable and
    unconstrained. A ``shared`` mirror holds every execution's rows, keyed by (``dp_execution_id``,
    ``dp_action``, ``dp_seq``); a table of one execution's rows of one action is keyed by
    ``dp_seq`` alone (``patch_ops.work_rows``)."""
    schema = framework_schema(engine)
    key = (str(engine.url), schema, name)
    with _mirror_lock:
        cached = _mirror_cache.get(key)
        if cached is not None and set(live.c.keys()) <= set(cached.c.keys()):
            return cached
        for col in live.c.keys():
            if col in MIRROR_COLUMNS:
                raise ValueError(f"{live.name}.{col} collides with the engine's bookkeeping columns")
        md = MetaData()
        owner: list[Column[Any]] = [
            Column("dp_execution_id", EXECUTION_KEY, nullable=False),
            Column("dp_action", key_string(1), nullable=False),
        ] if shared else []
        cols: list[Column[Any]] = [
            *owner,
            Column("dp_seq", BigInteger, nullable=False, autoincrement=False),
            Column("dp_source_id", BigInteger),
        ]
        cols += [Column(c.name, c.type, nullable=True) for c in live.columns]
        # No dp_source_id index: backup rows have no source (dp_source_id is NULL), and kept up
        # during the transform's inserts the stage's cost a third of their time; its readers
        # (the search for refused rows and their hold-back) make it first (``ensure_source_index``)
        # and the transform drops it (``drop_source_index``).
        table = Table(
            name,
            md,
            *cols,
            PrimaryKeyConstraint(*[c.name for c in owner], "dp_seq"),
            schema=schema,
            **mirror_table_options(live),
        )
        with framework_ddl(engine):
            widen_or_create_mirror(engine, live, table)
        _mirror_cache[key] = table
        return table


def source_index_name(table: str) -> str:
    """The name of the ``dp_source_id`` index of work rows table ``table``."""
    return f"ix_{table}_src"


def drop_source_index(engine: Engine, stage: Table) -> None:
    """Before the transform's inserts: drop the stage's ``dp_source_id`` index if a reader made
    it (``ensure_source_index``). An index only, never a constraint: the rows are the same."""
    _source_index_ddl(engine, stage, present=False)


def ensure_source_index(engine: Engine, stage: Table) -> None:
    """Before a reader that picks stage rows by driving row (the refusal search, the hold-back):
    make the stage's ``dp_source_id`` index (after ``dp_execution_id`` on a shared mirror) if it is missing (one sort of
    the stage; a transform killed or dropped it since, it is made again here). On a connection
    of its own, outside any transaction: DDL commits on MySQL."""
    _source_index_ddl(engine, stage, present=True)


def _owned_index(mirror: Table, column: str) -> list[Any]:
    """An index's columns on ``column`` of a work rows table: after the execution on a shared
    mirror, alone on a table of one execution's rows."""
    return [*([mirror.c.dp_execution_id] if "dp_execution_id" in mirror.c else []),
            mirror.c[column]]


def _source_index_ddl(engine: Engine, mirror: Table, present: bool) -> None:
    """Make (``present``) or drop the ``dp_source_id`` index of ``mirror``, unless it already
    is so."""
    name = source_index_name(mirror.name)
    made = catalog(engine).inspector.get_indexes(mirror.name, schema=mirror.schema)
    if (name in {ix["name"] for ix in made}) == present:
        return
    index = Index(name, *_owned_index(mirror, "dp_source_id"))
    try:
        (index.create if present else index.drop)(engine)
    except DBAPIError as exc:
        dialect = dialect_of(engine)
        if dialect.is_privilege_error(exc) or dialect.is_lock_timeout(exc):
            return  # a user who may not change it, or a session in the way: slower, not wrong
        # Another process did it at the same moment: fine; anything else: raise.
        now = inspect(engine).get_indexes(mirror.name, schema=mirror.schema)
        if (name in {ix["name"] for ix in now}) != present:
            raise


def widen_or_create_mirror(engine: Engine, live: Table, table: Table) -> None:
    """Create the mirror ``table`` of ``live``, or add the columns ``live`` gained since (a
    mirror is widened, never narrowed)."""
    known = catalog(engine)
    if not known.has_table(table.name, table.schema):
        with write_transaction(engine) as conn:
            table.metadata.create_all(conn)
        return
    existing = {c["name"]: c["type"]
                for c in known.inspector.get_columns(table.name, schema=table.schema)}
    narrow_execution_keys(engine, table, existing)
    missing = [c for c in live.columns if c.name not in existing]
    if missing:
        q = engine.dialect.identifier_preparer
        with write_transaction(engine) as conn:
            for c in missing:
                ddl = c.type.compile(dialect=engine.dialect)
                conn.exec_driver_sql(
                    f"ALTER TABLE {table_sql(conn, table)} ADD COLUMN {q.quote(c.name)} {ddl}"
                )


def narrow_execution_keys(engine: Engine, table: Table, found: dict[str, TypeEngine[Any]]) -> None:
    """``table``'s execution-id key columns (``EXECUTION_KEY``) made as this version makes them,
    where an earlier version made them text and this database's key is not (PostgreSQL's
    ``uuid``): converted once, their rows kept (``found``: the columns as they are)."""
    d = dialect_of(engine)
    for col in table.columns:
        if (col.type is not EXECUTION_KEY or col.name not in found
                or isinstance(found[col.name], Uuid)
                or not isinstance(col.type.dialect_impl(engine.dialect), Uuid)):
            continue
        try:
            with write_transaction(engine) as conn:
                d.narrow_key(conn, table, col.name)
        except DBAPIError as exc:
            reason = str(exc.orig).strip().splitlines()[0]
            what = f"{table.name}.{col.name} holds execution ids as text (an earlier version's)"
            if d.is_privilege_error(exc):
                raise MissingPrivilege(
                    f"{what}: converting it to uuid needs the table's owner ({reason}); run one "
                    "patch as the owner of the framework's tables, then as this user again"
                ) from None
            raise ValueError(f"{what}: it could not be converted to uuid ({reason})") from None


def ensure_mirror_index(engine: Engine, mirror: Table, column: str) -> None:
    """An index on (``dp_execution_id``, ``column``) of a mirror table, made on a connection of
    its own: DDL commits implicitly on MySQL, so it never runs inside a transaction whose
    atomicity matters (the backup's)."""
    name = f"ix_{mirror.name}_{column}"[:60]
    index = next((ix for ix in mirror.indexes if ix.name == name), None)
    if index is None:
        index = Index(name, *_owned_index(mirror, column))
    try:
        index.create(engine, checkfirst=True)
    except DBAPIError:
        # Another process made it at the same moment: fine; anything else: raise.
        made = inspect(engine).get_indexes(mirror.name, schema=mirror.schema)
        if name not in {ix["name"] for ix in made}:
            raise


def forget_mirrors() -> None:
    """Drop this process's cache of mirror tables (what a fresh op process starts with)."""
    with _mirror_lock:
        _mirror_cache.clear()


def drop_work_table(engine: Engine, name: str) -> None:
    """Drop work rows table ``name`` if it exists, and this process's record of it."""
    schema = framework_schema(engine)
    with _mirror_lock:
        _mirror_cache.pop((str(engine.url), schema, name), None)
    # In a write transaction: on SQLite a deferred one that looked for the table and then
    # dropped it fails at once ("database is locked") when the application wrote between.
    with write_transaction(engine) as conn:
        Table(name, MetaData(), schema=schema).drop(conn, checkfirst=True)


def require_tables(bind: Engine | Connection, names: tuple[str, ...] | list[str]) -> None:
    """A clear error, before anything is written (the framework's tables included), when the
    database lacks a StockRx table: most likely the URL names another database."""
    known = catalog(bind)
    missing = [n for n in names if not known.has_table(n, None, bind)]
    if missing:
        shown = bind.engine.url.render_as_string(hide_password=True)
        raise LookupError(
            f"table(s) not found in the StockRx database {shown}: {', '.join(missing)} "
            "(is this the StockRx database?)"
        )


def reflect_tables(bind: Engine | Connection, names: tuple[str, ...] | list[str]) -> Tables:
    """Live tables by name, reflected (once per op: ``patch_ops.database.Catalog``); a missing
    table is a clear error before any write."""
    require_tables(bind, names)
    return Tables(catalog(bind).tables(list(names), bind=bind))


def analyze(engine: Engine, tables: list[Table] | tuple[Table, ...]) -> None:
    """Fresh planner statistics after a bulk load, where the database needs them."""
    dialect_of(engine).analyze(engine, tables)


def mirror_by_name(conn: Connection, name: str) -> Table | None:
    """An existing mirror table as it is in the database (None: there is none)."""
    schema = framework_schema(conn)
    known = catalog(conn)
    if not known.has_table(name, schema, conn):
        return None
    return known.tables([name], schema=schema, bind=conn)[name]
