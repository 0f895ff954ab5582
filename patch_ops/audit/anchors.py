"""Anchors: the audit head (seq and hash) copied outside the StockRx database, where its database
user cannot reset it, so that erasing the trail (events deleted, head reset to genesis) is seen.

After each op of a run the head is written to two places: a tag of the Dagster run
(``ANCHOR_TAG``, in Dagster's instance storage) and, when ``STOCKRX_AUDIT_ANCHOR_FILE`` names
one, a line appended to that file (make it append-only: ``chattr +a``, or a syslog sink).
``check_anchors`` compares anchors with the chain: an anchored seq past the head means events
were erased; an anchored hash that differs from the event's means the chain was rewritten.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select

from patch_ops.audit.connections import Bind, read_snapshot
from patch_ops.audit.errors import AuditProblem
from patch_ops.audit.tables import HEAD_ID, audit_checkpoints, audit_events, audit_head

ANCHOR_TAG = "stockrx/audit-head"
ANCHOR_FILE_ENV = "STOCKRX_AUDIT_ANCHOR_FILE"


@dataclass(frozen=True)
class Anchor:
    seq: int
    hash: str
    where: str  # e.g. "Dagster run tag" or "anchor file /var/log/..."

    @property
    def tag_value(self) -> str:
        return f"{self.seq}:{self.hash}"


def current_head(bind: Bind) -> Anchor | None:
    """The chain's head now (None: no audit tables or no head row)."""
    with read_snapshot(bind) as conn:
        row = conn.execute(
            select(audit_head.c.seq, audit_head.c.hash).where(audit_head.c.id == HEAD_ID)
        ).first()
    return None if row is None else Anchor(int(row.seq), str(row.hash), "head")


def append_to_file(anchor: Anchor, path: str | None = None) -> None:
    """One JSON line per anchor, appended (the file's own append-only mode keeps it so)."""
    path = path or os.environ.get(ANCHOR_FILE_ENV)
    if not path:
        return
    line = json.dumps({"seq": anchor.seq, "hash": anchor.hash,
                       "at": datetime.now(UTC).isoformat(timespec="seconds")})
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def from_file(path: str) -> list[Anchor]:
    """The anchors of an anchor file (a line that is not an anchor is reported as one with seq
    -1, so a damaged file is seen, not skipped)."""
    anchors = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        try:
            data = json.loads(line)
            anchors.append(Anchor(int(data["seq"]), str(data["hash"]), f"{path}:{n}"))
        except (ValueError, KeyError, TypeError):
            anchors.append(Anchor(-1, line[:80], f"{path}:{n}"))
    return anchors


def from_tag_values(values: Iterable[str]) -> list[Anchor]:
    anchors = []
    for value in values:
        seq, _, digest = value.partition(":")
        anchors.append(Anchor(int(seq) if seq.isdigit() else -1, digest, "Dagster run tag"))
    return anchors


def check_anchors(bind: Bind, anchors: Iterable[Anchor]) -> list[AuditProblem]:
    """Each anchor against the chain: past the head (erased), another hash (rewritten), or
    unreadable. Anchors of events purged by retention are covered by the checkpoint."""
    problems: list[AuditProblem] = []
    with read_snapshot(bind) as conn:
        head = conn.execute(select(audit_head.c.seq).where(audit_head.c.id == HEAD_ID)).scalar()
        purged = conn.execute(select(audit_checkpoints.c.through_seq)
                              .order_by(audit_checkpoints.c.through_seq.desc())).scalar() or 0
        # one check per anchored (seq, hash): the file holds a line per op, the tags one per run
        unique = {(a.seq, a.hash): a for a in sorted(anchors, key=lambda a: a.where, reverse=True)}
        for a in sorted(unique.values(), key=lambda a: (a.seq, a.where)):
            if a.seq < 0:
                problems.append(AuditProblem(None, "bad_anchor", f"{a.where}: not an anchor"))
            elif head is None or a.seq > int(head):
                problems.append(AuditProblem(
                    a.seq, "erased",
                    f"{a.where} says the chain reached seq {a.seq}, the head is at "
                    f"{head if head is not None else 'nothing'}: events were erased"))
            elif a.seq > purged and a.seq > 0:
                found = conn.execute(
                    select(audit_events.c.hash).where(audit_events.c.seq == a.seq)
                ).scalar()
                if found is None:
                    problems.append(AuditProblem(
                        a.seq, "erased", f"{a.where}: event seq {a.seq} is missing"))
                elif found != a.hash:
                    problems.append(AuditProblem(
                        a.seq, "rewritten",
                        f"{a.where}: event seq {a.seq} has another hash than was anchored"))
    return problems
