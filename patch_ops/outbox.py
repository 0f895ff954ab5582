"""The notification outbox: a message a channel could not take (Slack down, SMTP unreachable) is
kept in ``data_patch_outbox`` in the StockRx database and sent again later, by the next
execution's notification or by the outbox sensor, so it is delayed, never lost.

A flush sends what is due, oldest first, one attempt each within the notifier's budget; a channel
that fails is not tried again in the same flush (a dead endpoint costs one timeout, not one per
message), and its messages wait longer each time (``RETRY_AFTER`` doubled, at most ``MAX_WAIT``).
The times here are the wall clock, not the patch clock (``STOCKRX_PATCHES_CLOCK``): they say
when to try the network again.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Integer, MetaData, String, Table, select, update
from sqlalchemy.engine import Engine

from patch_ops.database import create_tables, write_transaction
from patch_ops.dialects.names import FRAMEWORK_SCHEMA
from patch_ops.dialects.types import DATETIME_US, LONG_TEXT, TABLE_OPTIONS
from resources.notifier import DeliveryResult, Notifier, PatchNotification

RETRY_AFTER = dt.timedelta(seconds=60)
MAX_WAIT = dt.timedelta(hours=1)
#: Messages one flush may send at most (the rest wait for the next one).
FLUSH_LIMIT = 50

outbox_metadata = MetaData()

outbox = Table(
    "data_patch_outbox",
    outbox_metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
    Column("channel", String(16), nullable=False),
    Column("execution_id", String(64), nullable=False, index=True),
    Column("notification", JSON, nullable=False),  # PatchNotification's fields
    Column("created_at", DATETIME_US, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("last_error", LONG_TEXT),
    Column("next_attempt_at", DATETIME_US, nullable=False, index=True),
    Column("delivered_at", DATETIME_US),
    schema=FRAMEWORK_SCHEMA,
    **TABLE_OPTIONS,
)


def wall_now() -> dt.datetime:
    """Naive UTC now, from the wall clock."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def ensure_outbox(engine: Engine) -> None:
    create_tables(engine, outbox_metadata)


def keep(engine: Engine, n: PatchNotification, undelivered: list[DeliveryResult]) -> int:
    """Keep ``n`` for every configured channel that did not take it; returns how many."""
    failed = [r for r in undelivered if r.configured and not r.delivered]
    if not failed:
        return 0
    ensure_outbox(engine)
    now = wall_now()
    payload = dataclasses.asdict(n)
    payload["first_attempt_at"] = n.first_attempt_at or f"{now:%Y-%m-%d %H:%M:%S} UTC"
    payload["impact"] = list(n.impact)
    with write_transaction(engine) as conn:
        for r in failed:
            conn.execute(outbox.insert().values(
                channel=r.channel, execution_id=n.execution_id, notification=payload,
                created_at=now, attempts=r.attempts, last_error=r.error,
                next_attempt_at=now + RETRY_AFTER,
            ))
    return len(failed)


def pending(engine: Engine) -> list[dict[str, Any]]:
    """Messages not delivered yet, oldest first."""
    ensure_outbox(engine)
    with engine.connect() as conn:
        rows = conn.execute(
            select(outbox).where(outbox.c.delivered_at.is_(None)).order_by(outbox.c.id)
        ).mappings()
        return [dict(r) for r in rows]


def flush(
    engine: Engine, notifier: Notifier, *, due_only: bool = True, deadline: float | None = None
) -> list[dict[str, Any]]:
    """Send the kept messages (``due_only``: those whose wait is over), oldest first, one attempt
    each, until ``deadline`` (a ``time.monotonic()`` value; default: the notifier's budget). A
    channel that fails is not tried again in this flush. Returns what happened to each message
    tried (id, channel, execution_id, delivered, error). Never raises on a delivery failure."""
    ensure_outbox(engine)
    now = wall_now()
    query = select(outbox).where(outbox.c.delivered_at.is_(None))
    if due_only:
        query = query.where(outbox.c.next_attempt_at <= now)
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(query.order_by(outbox.c.id).limit(FLUSH_LIMIT))
                .mappings()]
    if deadline is None:
        deadline = time.monotonic() + notifier.budget_seconds
    dead: set[str] = set()
    tried = []
    for row in rows:
        if row["channel"] in dead or row["channel"] not in notifier.channels:
            continue
        if time.monotonic() >= deadline:
            break
        stored = row["notification"]
        n = PatchNotification(**{**stored, "impact": tuple(stored.get("impact") or ())})
        result = notifier.deliver(row["channel"], n, deadline, 0)
        attempts = row["attempts"] + result.attempts
        values: dict[str, Any] = {"attempts": attempts}
        if result.delivered:
            values["delivered_at"] = wall_now()
        else:
            dead.add(row["channel"])
            wait = min(MAX_WAIT, RETRY_AFTER * 2 ** min(attempts, 10))
            values.update(last_error=result.error, next_attempt_at=wall_now() + wait)
        with write_transaction(engine) as conn:
            conn.execute(update(outbox).where(outbox.c.id == row["id"]).values(**values))
        tried.append({"id": row["id"], "channel": row["channel"],
                      "execution_id": row["execution_id"], "delivered": result.delivered,
                      "error": result.error})
    return tried


def down_channels(tried: list[dict[str, Any]]) -> dict[str, str]:
    """Channels that failed in a flush, with their last error."""
    return {t["channel"]: t["error"] or "undelivered" for t in tried if not t["delivered"]}
