"""The audit trail's three tables, and their creation with the genesis head row.

- ``data_patch_audit_events``: one row per event, ``seq`` the primary key (so two writers can
  never fork the chain), public part as canonical JSON, secret part as a Fernet token;
- ``data_patch_audit_head``: one row, the signed seq + hash of the last event;
- ``data_patch_audit_checkpoints``: one signed row per retention purge.

Column types that differ by database come from ``patch_ops.dialects.types``.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table, insert, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from patch_ops.audit.connections import Bind, transaction
from patch_ops.dialects.names import FRAMEWORK_SCHEMA
from patch_ops.dialects.types import LONG_TEXT, TABLE_OPTIONS, UTCDateTime, framework_ddl

GENESIS_HASH = "0" * 64
HEAD_ID = 1

audit_metadata = MetaData()

audit_events = Table(
    "data_patch_audit_events",
    audit_metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("event_id", String(36), nullable=False, unique=True),
    Column("execution_id", String(64), nullable=False, index=True),
    Column("event_type", String(32), nullable=False),
    Column("occurred_at", UTCDateTime, nullable=False),
    Column("actor", String(255), nullable=False),
    Column("public_json", LONG_TEXT, nullable=False),
    Column("key_id", String(64)),
    Column("ciphertext", LONG_TEXT),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    schema=FRAMEWORK_SCHEMA,
    **TABLE_OPTIONS,
)

audit_head = Table(
    "data_patch_audit_head",
    audit_metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
    Column("key_id", String(64)),
    Column("mac", String(64)),
    schema=FRAMEWORK_SCHEMA,
    **TABLE_OPTIONS,
)

audit_checkpoints = Table(
    "data_patch_audit_checkpoints",
    audit_metadata,
    Column("through_seq", BigInteger, primary_key=True, autoincrement=False),
    Column("through_hash", String(64), nullable=False),
    Column("purged_count", BigInteger, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("key_id", String(64), nullable=False),
    Column("mac", String(64), nullable=False),
    schema=FRAMEWORK_SCHEMA,
    **TABLE_OPTIONS,
)


def ensure_audit_tables(bind: Bind) -> None:
    """Create the audit tables if missing and the head row (seq 0, genesis hash). Idempotent."""
    with framework_ddl(bind), transaction(bind) as conn:
        audit_metadata.create_all(conn, checkfirst=True)
    ensure_head_row(bind)


def ensure_head_row(bind: Bind) -> None:
    """Insert the genesis head row (seq 0, genesis hash) if the head table has none."""
    genesis = {"id": HEAD_ID, "seq": 0, "hash": GENESIS_HASH, "key_id": None, "mac": None}
    try:
        with transaction(bind) as conn:
            exists = conn.scalar(select(audit_head.c.id).where(audit_head.c.id == HEAD_ID))
            if exists is None:
                conn.execute(insert(audit_head).values(**genesis))
    except IntegrityError:
        if isinstance(bind, Connection):
            raise
        # Another process created the head row at the same moment: fine.
