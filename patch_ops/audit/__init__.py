"""Encrypted, tamper-evident audit trail of patch executions, kept in the StockRx database.

Every event is one row of ``data_patch_audit_events``:

- non-sensitive fields go to ``public_json`` (canonical JSON text, scrubbed of secrets);
- the sensitive payload (row samples, before/after values, config) goes to ``ciphertext``,
  a Fernet token made with the newest key of the keyring (``key_id`` says which key);
- ``hash`` = SHA-256 over a canonical serialization of (seq, every field, ciphertext, prev_hash),
  and ``prev_hash`` is the hash of the event before, so the events form one chain.

``data_patch_audit_head`` (one row) holds the seq and hash of the last event, HMAC-signed with the
current key and updated in the same transaction as each append: deleting the last events, or
rewriting the whole chain without the key, is detected. ``data_patch_audit_checkpoints`` records
each retention purge (last purged seq + hash, count, HMAC) so the remaining chain still verifies.

Everything works on an Engine (own transaction) or on the caller's Connection (the caller's
transaction: an event commits atomically with the change it records).
``resources.audit.AuditLog`` wraps these functions as a Dagster resource.

Modules: ``errors`` (exceptions, VerifyReport), ``keys`` (AuditKeyring), ``scrub`` (secret
scrubbing), ``canonical`` (the bytes hashed and signed), ``connections`` (own or caller's
transaction), ``tables`` (table metadata), ``chain`` (append, head), ``read`` (decrypting reads),
``verify`` (verification), ``purge`` (retention). Database differences go through
``patch_ops.dialects``.
"""

from patch_ops.audit.canonical import FORMAT_VERSION, canonical_json, event_hash
from patch_ops.audit.chain import (
    EVENT_TYPES,
    Clock,
    append_event,
    append_locked,
    lock_head,
    read_head,
    utc_now,
)
from patch_ops.audit.connections import Bind
from patch_ops.audit.errors import (
    AuditChainBroken,
    AuditConfigError,
    AuditError,
    AuditKeyMissing,
    AuditProblem,
    VerifyReport,
)
from patch_ops.audit.keys import AuditKeyring
from patch_ops.audit.purge import RETENTION_EXECUTION_ID, PurgeReport, purge_events
from patch_ops.audit.read import read_events
from patch_ops.audit.scrub import REDACTED, scrub_secrets
from patch_ops.audit.tables import (
    GENESIS_HASH,
    HEAD_ID,
    audit_checkpoints,
    audit_events,
    audit_head,
    audit_metadata,
    ensure_audit_tables,
    ensure_head_row,
)
from patch_ops.audit.verify import verify_chain

__all__ = [
    "EVENT_TYPES",
    "FORMAT_VERSION",
    "GENESIS_HASH",
    "HEAD_ID",
    "REDACTED",
    "RETENTION_EXECUTION_ID",
    "AuditChainBroken",
    "AuditConfigError",
    "AuditError",
    "AuditKeyMissing",
    "AuditKeyring",
    "AuditProblem",
    "Bind",
    "Clock",
    "PurgeReport",
    "VerifyReport",
    "append_event",
    "append_locked",
    "audit_checkpoints",
    "audit_events",
    "audit_head",
    "audit_metadata",
    "canonical_json",
    "ensure_audit_tables",
    "ensure_head_row",
    "event_hash",
    "lock_head",
    "purge_events",
    "read_events",
    "read_head",
    "scrub_secrets",
    "utc_now",
    "verify_chain",
]
