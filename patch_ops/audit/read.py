"""Reading the trail back: events in chain order, with the encrypted part decrypted.

Events are read in keyset pages (flat memory, whatever the trail's length). An event whose key
is gone or whose ciphertext was tampered with is returned unreadable, never raised: the rest of
the trail stays readable.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from cryptography.fernet import InvalidToken
from sqlalchemy import select
from sqlalchemy.engine import Connection, Row

from patch_ops.audit.connections import Bind, read_snapshot
from patch_ops.audit.errors import AuditKeyMissing
from patch_ops.audit.keys import AuditKeyring
from patch_ops.audit.tables import audit_events

_PAGE = 1000


def iter_events(
    conn: Connection, after: int, upto: int | None = None, execution_id: str | None = None
) -> Iterator[Row[Any]]:
    """Events with seq > after (<= upto) in seq order, by keyset pages: flat memory."""
    last = after
    while True:
        stmt = select(audit_events).where(audit_events.c.seq > last)
        if upto is not None:
            stmt = stmt.where(audit_events.c.seq <= upto)
        if execution_id is not None:
            stmt = stmt.where(audit_events.c.execution_id == execution_id)
        rows = conn.execute(stmt.order_by(audit_events.c.seq).limit(_PAGE)).all()
        yield from rows
        if len(rows) < _PAGE:
            return
        last = int(rows[-1].seq)


def read_events(
    bind: Bind, keyring: AuditKeyring, execution_id: str | None = None
) -> list[dict[str, Any]]:
    """Events of one execution (all if None), in chain order, with the secret part decrypted.

    Each dict: seq, event_id, execution_id, event_type, occurred_at, actor, public, secret,
    key_id, readable, error. An event whose key is not in the keyring, or whose ciphertext fails
    authentication, has ``readable`` False, ``secret`` None and ``error`` saying why.
    """
    out: list[dict[str, Any]] = []
    with read_snapshot(bind) as conn:
        for row in iter_events(conn, after=0, execution_id=execution_id):
            secret: Any = None
            error: str | None = None
            if row.ciphertext is not None:
                try:
                    secret = json.loads(keyring.decrypt(row.key_id, row.ciphertext))
                except AuditKeyMissing as exc:
                    error = str(exc)
                except InvalidToken:
                    error = "ciphertext failed authentication (tampered, or wrong key)"
            out.append(
                {
                    "seq": int(row.seq),
                    "event_id": row.event_id,
                    "execution_id": row.execution_id,
                    "event_type": row.event_type,
                    "occurred_at": row.occurred_at,
                    "actor": row.actor,
                    "public": json.loads(row.public_json),
                    "secret": secret,
                    "key_id": row.key_id,
                    "readable": error is None,
                    "error": error,
                }
            )
    return out
