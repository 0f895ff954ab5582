"""Appending to the hash chain, and its head.

Each event's ``hash`` covers its content and ``prev_hash`` (the event before), and the head row
(the last seq + hash, HMAC-signed with the current key) moves in the same transaction as each
append: deleting the last events, or rewriting the chain without the key, is then detected.

Appends serialize on the head row: ``SELECT ... FOR UPDATE`` where the database has row locks,
else a write to the head row first, which takes the database write lock. At worst one of two
concurrent appends fails (busy, or a serialization error under REPEATABLE READ); appends on an
Engine retry while the database reports itself busy.
"""

from __future__ import annotations

import random
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError

from patch_ops.audit.canonical import canonical_json, event_hash, head_message
from patch_ops.audit.connections import Bind, read_snapshot
from patch_ops.audit.errors import AuditChainBroken, AuditKeyMissing
from patch_ops.audit.keys import NO_KEY_MESSAGE, AuditKeyring
from patch_ops.audit.scrub import scrub_secrets
from patch_ops.audit.tables import HEAD_ID, audit_events, audit_head
from patch_ops.dialects import dialect_of

EVENT_TYPES = (
    "started",
    "plan",
    "backup_taken",
    "validation",
    "commit",
    "rollback",
    "restore",
    "notification",
    "purge",
)

_EVENT_TYPE_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_BUSY_ATTEMPTS = 30

#: Where an event's ``occurred_at`` comes from: a callable returning an aware datetime.
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """The audit trail's default clock: the system's, in UTC."""
    return datetime.now(UTC)


def append_event(
    bind: Bind,
    keyring: AuditKeyring,
    execution_id: str,
    event_type: str,
    actor: str,
    public: Mapping[str, Any],
    secret: Mapping[str, Any] | None = None,
    *,
    known_secrets: Iterable[str] = (),
    clock: Clock | None = None,
) -> int:
    """Append one event; returns its seq.

    On a Connection the event joins the caller's transaction (it commits or rolls back with the
    change it records). On an Engine it gets its own transaction, retried while the database is
    busy. ``public`` and ``secret`` are scrubbed (`scrub_secrets`) before they are stored; the
    DB password and the audit keys are always among the known secrets. ``clock`` gives the
    event's time (default `utc_now`), read once the head is locked.
    """
    if not keyring.has_key:
        raise AuditKeyMissing(NO_KEY_MESSAGE)
    if not execution_id or len(execution_id) > 64:
        raise ValueError("execution_id must be 1 to 64 characters")
    if not _EVENT_TYPE_RE.match(event_type):
        raise ValueError(f"invalid event_type {event_type!r} (lowercase identifier)")
    if not actor or len(actor) > 255:
        raise ValueError("actor must be 1 to 255 characters")

    args = (keyring, execution_id, event_type, actor, public, secret, known_secrets, clock)
    if isinstance(bind, Connection):
        return append_locked(bind, *args)
    dialect = dialect_of(bind)
    delay = 0.02
    for attempt in range(_BUSY_ATTEMPTS):
        try:
            with bind.begin() as conn:
                return append_locked(conn, *args)
        except OperationalError as exc:
            if not dialect.is_busy(exc) or attempt == _BUSY_ATTEMPTS - 1:
                raise
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 1.0)
    raise AssertionError("unreachable")


def lock_head(conn: Connection) -> tuple[int, str]:
    """Lock the head row for this transaction; return the last event's (seq, hash)."""
    if not dialect_of(conn).features.row_locks:
        # No row locks: writing first takes the database write lock (waiting while it is busy),
        # so the head read after it is the latest one and stays so.
        conn.execute(
            update(audit_head).where(audit_head.c.id == HEAD_ID).values(seq=audit_head.c.seq)
        )
    row = conn.execute(
        select(audit_head.c.seq, audit_head.c.hash)
        .where(audit_head.c.id == HEAD_ID)
        .with_for_update()
    ).first()
    if row is None:
        raise AuditChainBroken(
            "the audit head row is missing: run ensure_audit_tables, or the head was deleted"
        )
    return int(row.seq), str(row.hash)


def append_locked(
    conn: Connection,
    keyring: AuditKeyring,
    execution_id: str,
    event_type: str,
    actor: str,
    public: Mapping[str, Any],
    secret: Mapping[str, Any] | None,
    known_secrets: Iterable[str],
    clock: Clock | None = None,
) -> int:
    """Append one event in ``conn``'s transaction (arguments already checked): lock the head,
    insert the event, move the head. Returns the event's seq."""
    secrets = _known_secrets(conn, keyring, known_secrets)
    public_json = canonical_json(scrub_secrets(dict(public), secrets))
    key_id: str | None = None
    ciphertext: str | None = None
    if secret is not None:
        plaintext = canonical_json(scrub_secrets(dict(secret), secrets)).encode("ascii")
        key_id, ciphertext = keyring.encrypt(plaintext)

    head_seq, head_hash = lock_head(conn)
    row: dict[str, Any] = {
        "seq": head_seq + 1,
        "event_id": str(uuid.uuid4()),
        "execution_id": execution_id,
        "event_type": event_type,
        "occurred_at": (clock or utc_now)(),
        "actor": actor,
        "public_json": public_json,
        "key_id": key_id,
        "ciphertext": ciphertext,
        "prev_hash": head_hash,
    }
    row["hash"] = event_hash(row)
    conn.execute(insert(audit_events).values(**row))
    head_key_id, mac = keyring.sign(head_message(row["seq"], row["hash"]))
    moved = conn.execute(
        update(audit_head)
        .where(audit_head.c.id == HEAD_ID, audit_head.c.seq == head_seq)
        .values(seq=row["seq"], hash=row["hash"], key_id=head_key_id, mac=mac)
    )
    if moved.rowcount != 1:
        raise AuditChainBroken("the audit head moved during an append (concurrent writer)")
    return int(row["seq"])


def read_head(bind: Bind) -> tuple[int, str]:
    """(seq, hash) of the last event: worth copying elsewhere (e.g. Dagster run metadata) as an
    external anchor, since a writer with full DB access could otherwise wipe every table."""
    with read_snapshot(bind) as conn:
        row = conn.execute(select(audit_head.c.seq, audit_head.c.hash)).first()
    if row is None:
        raise AuditChainBroken("the audit head row is missing (run ensure_audit_tables)")
    return int(row.seq), str(row.hash)


def _known_secrets(conn: Connection, keyring: AuditKeyring, extra: Iterable[str]) -> list[str]:
    found = [*extra, *keyring.secret_values]
    password = conn.engine.url.password
    if password:
        found.append(str(password))
    return found
