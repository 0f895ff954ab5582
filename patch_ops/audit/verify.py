"""Verification: every remaining event, the head and the checkpoints, checked in one pass.

Tampering is reported, never raised: the ``VerifyReport`` lists each problem with its seq
(edited, deleted, reordered, truncated, injected, forged head or checkpoint, unverifiable), so
one pass shows everything that was done. Hashes need no key; signatures need the signing key.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from patch_ops.audit.canonical import checkpoint_message, event_hash, head_message
from patch_ops.audit.connections import Bind, read_snapshot
from patch_ops.audit.errors import AuditKeyMissing, AuditProblem, VerifyReport
from patch_ops.audit.keys import AuditKeyring
from patch_ops.audit.read import iter_events
from patch_ops.audit.tables import (
    GENESIS_HASH,
    HEAD_ID,
    audit_checkpoints,
    audit_events,
    audit_head,
)


def verify_chain(bind: Bind, keyring: AuditKeyring) -> VerifyReport:
    """Check every remaining event, the head and the checkpoints. Never raises on tampering:
    the report lists each problem with its seq (see `VerifyReport.raise_if_broken`)."""
    with read_snapshot(bind) as conn:
        return verify_connection(conn, keyring)


def _check_mac(
    keyring: AuditKeyring, seq: int, what: str, key_id: str | None, message: bytes, mac: str
) -> AuditProblem | None:
    try:
        if keyring.check(key_id, message, mac):
            return None
    except AuditKeyMissing:
        return AuditProblem(
            seq, "unverifiable", f"{what} is signed with key {key_id!r}, not in the keyring"
        )
    return AuditProblem(seq, f"forged_{what}", f"{what} signature does not match (forged)")


def verify_connection(conn: Connection, keyring: AuditKeyring) -> VerifyReport:
    """`verify_chain` in ``conn``'s transaction (e.g. with the head locked, before a purge)."""
    problems: list[AuditProblem] = []
    head = conn.execute(select(audit_head).where(audit_head.c.id == HEAD_ID)).first()
    checkpoints = conn.execute(
        select(audit_checkpoints).order_by(audit_checkpoints.c.through_seq)
    ).all()

    for cp in checkpoints:
        msg = checkpoint_message(cp.through_seq, cp.through_hash, cp.purged_count, cp.created_at)
        problem = _check_mac(keyring, int(cp.through_seq), "checkpoint", cp.key_id, msg, cp.mac)
        if problem:
            problems.append(problem)

    start_seq, last_hash = 0, GENESIS_HASH
    if checkpoints:
        start_seq, last_hash = int(checkpoints[-1].through_seq), checkpoints[-1].through_hash
    leftover = conn.scalar(
        select(func.count()).select_from(audit_events).where(audit_events.c.seq <= start_seq)
    )
    if leftover:
        problems.append(
            AuditProblem(
                start_seq,
                "injected",
                f"{leftover} event(s) at or below "
                f"checkpoint seq {start_seq} are still (or again) present",
            )
        )

    expected, last_seq, checked = start_seq + 1, start_seq, 0
    # The previous event's stored hash and the hash of its content: if only its hash column
    # was changed, it is reported as edited, and its successor still links to its content.
    last_hashes = {last_hash}
    upto = int(head.seq) if head is not None else None
    for row in iter_events(conn, after=start_seq, upto=upto):
        seq = int(row.seq)
        checked += 1
        if seq != expected:
            span = f"{expected}..{seq - 1}" if seq - 1 > expected else str(expected)
            problems.append(AuditProblem(expected, "deleted", f"event(s) {span} missing"))
        elif row.prev_hash not in last_hashes:
            follows = conn.scalar(
                select(audit_events.c.seq).where(audit_events.c.hash == row.prev_hash).limit(1)
            )
            if follows is None:
                problems.append(
                    AuditProblem(
                        seq,
                        "deleted",
                        "prev_hash points to an event that is no longer in the table",
                    )
                )
            else:
                problems.append(
                    AuditProblem(
                        seq, "reordered", f"follows event {follows} instead of event {seq - 1}"
                    )
                )
        computed = event_hash(row._mapping)
        if computed != row.hash:
            problems.append(AuditProblem(seq, "edited", "content does not match its hash"))
        expected, last_seq, last_hash = seq + 1, seq, row.hash
        last_hashes = {row.hash, computed}

    if head is None:
        problems.append(AuditProblem(None, "head_missing", "the audit head row is missing"))
        return VerifyReport(problems, checked, start_seq, 0)

    head_seq = int(head.seq)
    if head_seq > last_seq:
        span = f"{last_seq + 1}..{head_seq}" if head_seq > last_seq + 1 else str(head_seq)
        problems.append(
            AuditProblem(last_seq + 1, "truncated", f"event(s) {span} missing at the tail")
        )
    elif head.hash != last_hash:
        problems.append(
            AuditProblem(head_seq, "forged_head", "head hash does not match the last event")
        )
    if head.mac is None:
        if head_seq != 0 or head.hash != GENESIS_HASH or checkpoints:
            problems.append(AuditProblem(head_seq, "forged_head", "the head is not signed"))
    else:
        msg = head_message(head_seq, head.hash)
        problem = _check_mac(keyring, head_seq, "head", head.key_id, msg, head.mac)
        if problem:
            problems.append(problem)

    beyond = list(
        conn.scalars(
            select(audit_events.c.seq)
            .where(audit_events.c.seq > head_seq)
            .order_by(audit_events.c.seq)
        )
    )
    if beyond:
        # Without a snapshot (SQLite), these may be appends that committed during the scan: an
        # append moves the head in the same transaction, so only events past the head *now*
        # were injected.
        now = conn.scalar(select(audit_head.c.seq).where(audit_head.c.id == HEAD_ID)) or 0
        for seq in (s for s in beyond if s > now):
            problems.append(AuditProblem(int(seq), "injected", "event after the signed head"))
    return VerifyReport(problems, checked, start_seq, head_seq)
