"""The exact bytes that are hashed and signed: canonical JSON, event hashes, head and checkpoint
messages.

They must come out the same on every backend and in every version (``FORMAT_VERSION``): any
change here makes every existing chain fail to verify.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from patch_ops.dialects.types import to_utc

FORMAT_VERSION = "v1"


def iso_utc(value: datetime) -> str:
    """ISO 8601 in UTC with microseconds (a naive datetime is taken to be UTC)."""
    return to_utc(value).isoformat(timespec="microseconds")


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso_utc(value) if value.tzinfo else value.isoformat()
    if isinstance(value, date | Decimal | uuid.UUID):
        return str(value)
    raise TypeError(f"audit payload value of type {type(value).__name__} is not JSON-serializable")


def canonical_json(value: Any) -> str:
    """Deterministic JSON: sorted keys, no spaces, ASCII only (same bytes on every backend)."""
    return json.dumps(
        value,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
        allow_nan=False,
        default=_json_default,
    )


def event_hash(row: Mapping[Any, Any]) -> str:
    """SHA-256 over the canonical serialization of one event and its predecessor's hash."""
    payload = [
        FORMAT_VERSION,
        "event",
        int(row["seq"]),
        row["event_id"],
        row["execution_id"],
        row["event_type"],
        iso_utc(row["occurred_at"]),
        row["actor"],
        row["public_json"],
        row["key_id"],
        row["ciphertext"],
        row["prev_hash"],
    ]
    return hashlib.sha256(canonical_json(payload).encode("ascii")).hexdigest()


def head_message(seq: int, hash_: str) -> bytes:
    """What the head's MAC signs: the last event's seq and hash."""
    return canonical_json([FORMAT_VERSION, "head", int(seq), hash_]).encode("ascii")


def checkpoint_message(through_seq: int, through_hash: str, count: int, at: datetime) -> bytes:
    """What a retention checkpoint's MAC signs."""
    payload = [FORMAT_VERSION, "checkpoint", int(through_seq), through_hash, int(count), iso_utc(at)]
    return canonical_json(payload).encode("ascii")
