"""Retention: drop the oldest events and leave the rest of the chain verifiable.

A purge deletes a prefix of the chain, writes a signed checkpoint (last purged seq + hash,
count) that verification starts from, and records a ``purge`` event. It refuses a chain that
does not verify: purging must not erase the evidence of tampering.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, insert, select

from patch_ops.audit.canonical import checkpoint_message, iso_utc
from patch_ops.audit.chain import Clock, append_locked, lock_head, utc_now
from patch_ops.audit.connections import Bind, transaction
from patch_ops.audit.errors import AuditKeyMissing
from patch_ops.audit.keys import AuditKeyring
from patch_ops.audit.tables import GENESIS_HASH, audit_checkpoints, audit_events
from patch_ops.audit.verify import verify_connection
from patch_ops.dialects.types import to_utc

RETENTION_EXECUTION_ID = "audit-retention"


@dataclass(frozen=True)
class PurgeReport:
    purged_count: int
    through_seq: int
    through_hash: str
    checkpoint_written: bool


def purge_events(
    bind: Bind,
    keyring: AuditKeyring,
    older_than: datetime,
    *,
    actor: str = "audit-retention",
    clock: Clock | None = None,
) -> PurgeReport:
    """Delete the oldest events (a prefix of the chain, all older than ``older_than``), write a
    signed checkpoint, and record a ``purge`` event. Refuses (AuditChainBroken) if the chain does
    not verify first: purging must not erase the evidence of tampering. ``clock`` dates the
    checkpoint and the purge event (default `utc_now`)."""
    if not keyring.has_key:
        raise AuditKeyMissing("purging needs the current audit key to sign the checkpoint")
    now = clock or utc_now
    cutoff = to_utc(older_than)
    with transaction(bind) as conn:
        lock_head(conn)
        report = verify_connection(conn, keyring)
        report.raise_if_broken()
        start = report.checkpoint_seq
        first_kept = conn.scalar(
            select(func.min(audit_events.c.seq)).where(
                audit_events.c.seq > start, audit_events.c.occurred_at >= cutoff
            )
        )
        through = int(first_kept) - 1 if first_kept is not None else report.head_seq
        if through <= start:
            last_hash = conn.scalar(
                select(audit_checkpoints.c.through_hash).where(
                    audit_checkpoints.c.through_seq == start
                )
            )
            return PurgeReport(0, start, last_hash or GENESIS_HASH, False)
        through_hash = str(
            conn.scalar(select(audit_events.c.hash).where(audit_events.c.seq == through))
        )
        deleted = conn.execute(
            audit_events.delete().where(audit_events.c.seq > start, audit_events.c.seq <= through)
        ).rowcount
        created_at = now()
        key_id, mac = keyring.sign(checkpoint_message(through, through_hash, deleted, created_at))
        conn.execute(
            insert(audit_checkpoints).values(
                through_seq=through,
                through_hash=through_hash,
                purged_count=deleted,
                created_at=created_at,
                key_id=key_id,
                mac=mac,
            )
        )
        append_locked(
            conn,
            keyring,
            RETENTION_EXECUTION_ID,
            "purge",
            actor,
            {"through_seq": through, "purged_count": deleted, "older_than": iso_utc(cutoff)},
            None,
            (),
            now,
        )
    return PurgeReport(int(deleted), through, str(through_hash), True)
