"""Release requests: how release tooling asks for a patch run without talking to Dagster.

Release tooling inserts one row into ``data_patch_requests`` in the StockRx database (the
database it can already reach). The ``patch_request_sensor`` (stockrx_patches/sensors.py) picks
up each pending row once, checks it and launches the patch job with a ``run_key`` per request,
so a request is never run twice. The row says what became of it:

=========  ==================================================================================
status     meaning
=========  ==================================================================================
pending    inserted, not yet looked at
held       a real run outside the maintenance windows: when the next window opens, a fresh
           dry run re-confirms the approved plan first (the approval is valid 24 hours, windows
           are days apart); held again, with the difference, if the plan changed
reconfirming  that dry run is running; the real run follows if its plan is the approved one
rejected   unknown patch or invalid config; ``reason`` says why (nothing was run)
launched   a run was requested (``run_key``; ``dagster_run_id`` once the run is seen)
succeeded  the run finished successfully (``execution_id``: the patch execution)
failed     the run failed; ``reason`` is the execution's error
=========  ==================================================================================

The insert (``run_config`` is the patch's ``ops.plan_patch.config``; omit ``dry_run`` or set it
true for a dry run, ``"dry_run": false`` for a real run)::

    INSERT INTO data_patch_requests (patch_name, run_config, requested_by, release_tag)
    VALUES ('inventory_price_adjustment',
            '{"dry_run": true, "adjustment_type": "percentage", "adjustment_value": 8}',
            'release-bot', 'v2.14.0');

or ``stockrx-patches request inventory_price_adjustment --set adjustment_type=percentage
--set adjustment_value=8 --requested-by release-bot --release-tag v2.14.0`` (creates the table if
needed). ``status`` defaults to pending and ``requested_at`` to the database's current time in UTC.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine

from patch_ops.database import create_tables, write_transaction
from patch_ops.dialects.names import FRAMEWORK_SCHEMA
from patch_ops.dialects.types import DATETIME_US, TABLE_OPTIONS, UTCNow

PENDING, HELD, REJECTED, LAUNCHED, SUCCEEDED, FAILED, RECONFIRMING = (
    "pending",
    "held",
    "rejected",
    "launched",
    "succeeded",
    "failed",
    "reconfirming",
)
OPEN = (PENDING, HELD)  # still to be launched
RUNNING = (LAUNCHED, RECONFIRMING)  # launched, outcome not recorded yet
#: The reason of a request held because its plan changed since it was approved: it stays held
#: until a person sets it back to pending (or files it again) after reading the new dry run.
PLAN_CHANGED = "held: the plan changed since it was approved"
#: Tag of the re-confirming dry run of a held request (value: the request id).
RECONFIRM_TAG = "stockrx/reconfirms-request"
REQUEST_TAG = "stockrx/request"

metadata = MetaData()

requests = Table(
    "data_patch_requests",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("patch_name", String(255), nullable=False),
    Column("run_config", JSON, nullable=False),  # ops.plan_patch.config of the run
    Column("requested_by", String(255), nullable=False),
    Column("release_tag", String(255)),
    Column("requested_at", DATETIME_US, nullable=False, server_default=UTCNow()),
    Column("status", String(16), nullable=False, server_default=PENDING),
    Column("reason", Text),
    Column("run_key", String(64)),
    Column("dagster_run_id", String(64)),
    Column("execution_id", String(36)),
    Column("updated_at", DATETIME_US),
    Index("ix_data_patch_requests_status", "status"),
    schema=FRAMEWORK_SCHEMA,
    **TABLE_OPTIONS,
)


def ensure_requests_table(engine: Engine) -> None:
    create_tables(engine, metadata)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def run_key(request_id: int) -> str:
    return f"data_patch_request:{request_id}"


def submit_request(
    engine: Engine,
    patch_name: str,
    run_config: Mapping[str, Any],
    requested_by: str,
    release_tag: str | None = None,
) -> int:
    """Insert a pending request (what release tooling does in SQL); returns its id."""
    ensure_requests_table(engine)
    with write_transaction(engine) as conn:
        result = conn.execute(
            insert(requests).values(
                patch_name=patch_name,
                run_config=dict(run_config),
                requested_by=requested_by,
                release_tag=release_tag,
                requested_at=utcnow(),
                status=PENDING,
            )
        )
        key = result.inserted_primary_key
        assert key is not None
        return int(key[0])


def open_requests(conn: Connection, limit: int = 50) -> list[dict[str, Any]]:
    rows = conn.execute(
        select(requests).where(requests.c.status.in_(OPEN)).order_by(requests.c.id).limit(limit)
    ).mappings()
    return [dict(r) for r in rows]


def launched_requests(conn: Connection, limit: int = 200) -> list[dict[str, Any]]:
    rows = conn.execute(
        select(requests).where(requests.c.status.in_(RUNNING)).order_by(requests.c.id).limit(limit)
    ).mappings()
    return [dict(r) for r in rows]


def mark(conn: Connection, request_id: int, status: str, **values: Any) -> None:
    conn.execute(
        update(requests)
        .where(requests.c.id == request_id)
        .values(status=status, updated_at=utcnow(), **values)
    )


def get_request(engine: Engine, request_id: int) -> dict[str, Any] | None:
    with engine.connect() as conn:
        row = conn.execute(select(requests).where(requests.c.id == request_id)).mappings().first()
    return dict(row) if row is not None else None
