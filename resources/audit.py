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

Appends serialize on the head row (``SELECT ... FOR UPDATE``; on SQLite a write to the head row,
which takes the database write lock first), and ``seq`` is the primary key, so two writers can
never fork the chain: at worst one append fails (SQLite busy, or a serialization error if the
caller runs REPEATABLE READ). Appends on an Engine retry while SQLite is busy.

Everything works on an Engine (own transaction) or on the caller's Connection (the caller's
transaction: an event commits atomically with the change it records). `AuditLog` wraps the
module functions as a Dagster resource.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from dagster import ConfigurableResource
from pydantic import Field
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection, Dialect, Engine, Row
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.types import TypeDecorator

Bind = Engine | Connection

FORMAT_VERSION = "v1"
GENESIS_HASH = "0" * 64
HEAD_ID = 1
REDACTED = "***"
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
RETENTION_EXECUTION_ID = "audit-retention"

_KEY_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_EVENT_TYPE_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_SECRET_KEY_RE = re.compile(
    r"pass(word|wd|phrase)?|pwd|secret|token|api[_-]?key|private[_-]?key|access[_-]?key"
    r"|credential|authorization|cookie|fernet",
    re.IGNORECASE,
)
# scheme://user:password@host -> scheme://user:***@host
_URL_PASSWORD_RE = re.compile(r"([a-z][a-z0-9+.-]*://[^:/?#@\s]*:)([^@/\s]+)(?=@)", re.IGNORECASE)
_BATCH = 1000


class AuditError(Exception):
    """Base class of the audit trail's errors."""


class AuditConfigError(AuditError, ValueError):
    """The audit key configuration is malformed (the message never contains key material)."""


class AuditKeyMissing(AuditError):
    """No audit key is configured, or the key an event needs is not in the keyring."""


class AuditChainBroken(AuditError):
    """The audit chain does not verify (``report`` lists every problem), or cannot be extended."""

    def __init__(self, message: str, report: VerifyReport | None = None) -> None:
        super().__init__(message)
        self.report = report


# --------------------------------------------------------------------------------------------
# Tables


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes in and out, with microseconds, on every backend."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = _utc(value)
        # Only PostgreSQL stores the offset; elsewhere store naive UTC, never local time.
        return value if dialect.name == "postgresql" else value.replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else _utc(value)


_LongText = Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")

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
    Column("public_json", _LongText, nullable=False),
    Column("key_id", String(64)),
    Column("ciphertext", _LongText),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
)

audit_head = Table(
    "data_patch_audit_head",
    audit_metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
    Column("key_id", String(64)),
    Column("mac", String(64)),
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
)


# --------------------------------------------------------------------------------------------
# Keys


class AuditKeyring:
    """Named Fernet keys, newest first. New events use the first; any listed key can read.

    Text form: ``key_id:fernet_key`` entries separated by commas or newlines (``#`` comments and
    blank lines ignored). The repr shows key ids only.
    """

    def __init__(self, entries: Iterable[tuple[str, str | bytes]] = ()) -> None:
        self._fernets: dict[str, Fernet] = {}
        self._mac_keys: dict[str, bytes] = {}
        self._materials: list[str] = []
        for key_id, key in entries:
            if not _KEY_ID_RE.match(key_id):
                raise AuditConfigError(f"invalid audit key id {key_id!r} (letters, digits, _.-)")
            if key_id in self._fernets:
                raise AuditConfigError(f"audit key id {key_id!r} is listed twice")
            material = key.decode() if isinstance(key, bytes) else key
            try:
                fernet = Fernet(material)
            except (ValueError, TypeError):
                raise AuditConfigError(f"audit key {key_id!r} is not a valid Fernet key") from None
            self._fernets[key_id] = fernet
            self._mac_keys[key_id] = _derive_mac_key(base64.urlsafe_b64decode(material))
            self._materials.append(material)

    @classmethod
    def parse(cls, text: str | None) -> AuditKeyring:
        entries: list[tuple[str, str]] = []
        for raw in re.split(r"[,\n]", text or ""):
            item = raw.strip()
            if not item or item.startswith("#"):
                continue
            key_id, sep, key = item.partition(":")
            if not sep or not key.strip():
                raise AuditConfigError(
                    "audit keys must be 'key_id:fernet_key' entries; an entry has no key_id"
                    if not sep
                    else f"audit key {key_id.strip()!r} has no key material"
                )
            entries.append((key_id.strip(), key.strip()))
        return cls(entries)

    @classmethod
    def from_config(cls, keys: str | None = None, key_file: str | None = None) -> AuditKeyring:
        """Keys from the ``keys`` string first, then from ``key_file`` (one entry per line)."""
        text = keys or ""
        if key_file:
            path = Path(key_file)
            if not path.is_file():
                raise AuditConfigError(f"audit key file {path} does not exist")
            text = text + "\n" + path.read_text(encoding="utf-8")
        return cls.parse(text)

    @staticmethod
    def new_entry(key_id: str) -> str:
        """A fresh ``key_id:fernet_key`` entry, to put first in STOCKRX_AUDIT_KEYS."""
        if not _KEY_ID_RE.match(key_id):
            raise AuditConfigError(f"invalid audit key id {key_id!r}")
        return f"{key_id}:{Fernet.generate_key().decode()}"

    @property
    def has_key(self) -> bool:
        return bool(self._fernets)

    @property
    def key_ids(self) -> list[str]:
        return list(self._fernets)

    @property
    def current_key_id(self) -> str:
        if not self._fernets:
            raise AuditKeyMissing(
                "no audit key configured: set STOCKRX_AUDIT_KEYS (key_id:fernet_key) or key_file"
            )
        return next(iter(self._fernets))

    @property
    def secret_values(self) -> list[str]:
        """The key material itself, so it can be scrubbed from anything stored in plaintext."""
        return list(self._materials)

    def encrypt(self, data: bytes) -> tuple[str, str]:
        key_id = self.current_key_id
        return key_id, self._fernets[key_id].encrypt(data).decode("ascii")

    def decrypt(self, key_id: str | None, token: str) -> bytes:
        """Raises AuditKeyMissing if the key is gone, cryptography's InvalidToken if tampered."""
        fernet = self._fernets.get(key_id or "")
        if fernet is None:
            raise AuditKeyMissing(f"audit key {key_id!r} is not in the keyring")
        return fernet.decrypt(token.encode("ascii"))

    def sign(self, message: bytes) -> tuple[str, str]:
        key_id = self.current_key_id
        return key_id, hmac.new(self._mac_keys[key_id], message, hashlib.sha256).hexdigest()

    def check(self, key_id: str | None, message: bytes, mac: str) -> bool:
        key = self._mac_keys.get(key_id or "")
        if key is None:
            raise AuditKeyMissing(f"audit key {key_id!r} is not in the keyring")
        expected = hmac.new(key, message, hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, mac)

    def __repr__(self) -> str:
        return f"AuditKeyring(key_ids={self.key_ids!r})"


def _derive_mac_key(raw_key: bytes) -> bytes:
    # A separate key for signatures, so the Fernet key is never used for two purposes.
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"stockrx-audit-mac-v1")
    return hkdf.derive(raw_key)


# --------------------------------------------------------------------------------------------
# Secrets scrubbing and canonical forms


def scrub_secrets(value: Any, known_secrets: Iterable[str] = ()) -> Any:
    """A copy of ``value`` (dicts/lists/strings, nested) that is safe to store in plaintext.

    - values under secret-looking keys (password, token, api_key, secret, ...) become ``***``;
    - every occurrence of a ``known_secrets`` string (the DB password, a token) becomes ``***``;
    - passwords inside URLs (``scheme://user:pw@host``) become ``***``.
    """
    secrets = sorted({s for s in known_secrets if s}, key=len, reverse=True)
    return _scrub(value, secrets)


def _scrub(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, Mapping):
        return {
            str(k): REDACTED
            if _SECRET_KEY_RE.search(str(k)) and v is not None
            else _scrub(v, secrets)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_scrub(v, secrets) for v in value]
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
        return _URL_PASSWORD_RE.sub(r"\1" + REDACTED, value)
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return _iso(value) if value.tzinfo else value.isoformat()
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


def _utc(value: datetime) -> datetime:
    """Aware UTC; a naive datetime is taken to be UTC already (that is how it is stored)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _iso(value: datetime) -> str:
    return _utc(value).isoformat(timespec="microseconds")


def event_hash(row: Mapping[Any, Any]) -> str:
    """SHA-256 over the canonical serialization of one event and its predecessor's hash."""
    payload = [
        FORMAT_VERSION,
        "event",
        int(row["seq"]),
        row["event_id"],
        row["execution_id"],
        row["event_type"],
        _iso(row["occurred_at"]),
        row["actor"],
        row["public_json"],
        row["key_id"],
        row["ciphertext"],
        row["prev_hash"],
    ]
    return hashlib.sha256(canonical_json(payload).encode("ascii")).hexdigest()


def _head_message(seq: int, hash_: str) -> bytes:
    return canonical_json([FORMAT_VERSION, "head", int(seq), hash_]).encode("ascii")


def _checkpoint_message(through_seq: int, through_hash: str, count: int, at: datetime) -> bytes:
    payload = [FORMAT_VERSION, "checkpoint", int(through_seq), through_hash, int(count), _iso(at)]
    return canonical_json(payload).encode("ascii")


# --------------------------------------------------------------------------------------------
# Connections


@contextmanager
def _transaction(bind: Bind) -> Iterator[Connection]:
    """The caller's connection as is, or a new transaction on the engine (committed on exit)."""
    if isinstance(bind, Engine):
        with bind.begin() as conn:
            yield conn
    else:
        yield bind


@contextmanager
def _snapshot(bind: Bind) -> Iterator[Connection]:
    """For reads: one consistent snapshot where the backend offers it (not SQLite)."""
    if isinstance(bind, Connection):
        yield bind
        return
    with bind.connect() as conn:
        if conn.dialect.name != "sqlite":
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            yield conn


def _is_sqlite_busy(exc: OperationalError) -> bool:
    text = str(exc.orig).lower()
    return "database is locked" in text or "database is busy" in text


def _known_secrets(conn: Connection, keyring: AuditKeyring, extra: Iterable[str]) -> list[str]:
    found = [*extra, *keyring.secret_values]
    password = conn.engine.url.password
    if password:
        found.append(str(password))
    return found


# --------------------------------------------------------------------------------------------
# Public functions


def ensure_audit_tables(bind: Bind) -> None:
    """Create the audit tables if missing and the head row (seq 0, genesis hash). Idempotent."""
    audit_metadata.create_all(bind, checkfirst=True)
    genesis = {"id": HEAD_ID, "seq": 0, "hash": GENESIS_HASH, "key_id": None, "mac": None}
    try:
        with _transaction(bind) as conn:
            exists = conn.scalar(select(audit_head.c.id).where(audit_head.c.id == HEAD_ID))
            if exists is None:
                conn.execute(insert(audit_head).values(**genesis))
    except IntegrityError:
        if isinstance(bind, Connection):
            raise
        # Another process created the head row at the same moment: fine.


def read_head(bind: Bind) -> tuple[int, str]:
    """(seq, hash) of the last event: worth copying elsewhere (e.g. Dagster run metadata) as an
    external anchor, since a writer with full DB access could otherwise wipe every table."""
    with _snapshot(bind) as conn:
        row = conn.execute(select(audit_head.c.seq, audit_head.c.hash)).first()
    if row is None:
        raise AuditChainBroken("the audit head row is missing (run ensure_audit_tables)")
    return int(row.seq), str(row.hash)


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
) -> int:
    """Append one event; returns its seq.

    On a Connection the event joins the caller's transaction (it commits or rolls back with the
    change it records). On an Engine it gets its own transaction, retried while SQLite is busy.
    ``public`` and ``secret`` are scrubbed (`scrub_secrets`) before they are stored; the DB
    password and the audit keys are always among the known secrets.
    """
    if not keyring.has_key:
        raise AuditKeyMissing(
            "no audit key configured: set STOCKRX_AUDIT_KEYS (key_id:fernet_key) or key_file"
        )
    if not execution_id or len(execution_id) > 64:
        raise ValueError("execution_id must be 1 to 64 characters")
    if not _EVENT_TYPE_RE.match(event_type):
        raise ValueError(f"invalid event_type {event_type!r} (lowercase identifier)")
    if not actor or len(actor) > 255:
        raise ValueError("actor must be 1 to 255 characters")

    args = (keyring, execution_id, event_type, actor, public, secret, known_secrets)
    if isinstance(bind, Connection):
        return _append(bind, *args)
    delay = 0.02
    for attempt in range(30):
        try:
            with bind.begin() as conn:
                return _append(conn, *args)
        except OperationalError as exc:
            if bind.dialect.name != "sqlite" or not _is_sqlite_busy(exc) or attempt == 29:
                raise
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 1.0)
    raise AssertionError("unreachable")


def _lock_head(conn: Connection) -> tuple[int, str]:
    """Lock the head row for this transaction; return the last event's (seq, hash)."""
    if conn.dialect.name == "sqlite":
        # No row locks in SQLite: writing first takes the database write lock (waiting for
        # busy_timeout), so the head read after it is the latest one and stays so.
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


def _append(
    conn: Connection,
    keyring: AuditKeyring,
    execution_id: str,
    event_type: str,
    actor: str,
    public: Mapping[str, Any],
    secret: Mapping[str, Any] | None,
    known_secrets: Iterable[str],
) -> int:
    secrets = _known_secrets(conn, keyring, known_secrets)
    public_json = canonical_json(scrub_secrets(dict(public), secrets))
    key_id: str | None = None
    ciphertext: str | None = None
    if secret is not None:
        plaintext = canonical_json(scrub_secrets(dict(secret), secrets)).encode("ascii")
        key_id, ciphertext = keyring.encrypt(plaintext)

    head_seq, head_hash = _lock_head(conn)
    row: dict[str, Any] = {
        "seq": head_seq + 1,
        "event_id": str(uuid.uuid4()),
        "execution_id": execution_id,
        "event_type": event_type,
        "occurred_at": datetime.now(UTC),
        "actor": actor,
        "public_json": public_json,
        "key_id": key_id,
        "ciphertext": ciphertext,
        "prev_hash": head_hash,
    }
    row["hash"] = event_hash(row)
    conn.execute(insert(audit_events).values(**row))
    head_key_id, mac = keyring.sign(_head_message(row["seq"], row["hash"]))
    moved = conn.execute(
        update(audit_head)
        .where(audit_head.c.id == HEAD_ID, audit_head.c.seq == head_seq)
        .values(seq=row["seq"], hash=row["hash"], key_id=head_key_id, mac=mac)
    )
    if moved.rowcount != 1:
        raise AuditChainBroken("the audit head moved during an append (concurrent writer)")
    return int(row["seq"])


def _iter_events(
    conn: Connection, after: int, upto: int | None = None, execution_id: str | None = None
) -> Iterator[Row]:
    """Events with seq > after (<= upto) in seq order, by keyset pages: flat memory."""
    last = after
    while True:
        stmt = select(audit_events).where(audit_events.c.seq > last)
        if upto is not None:
            stmt = stmt.where(audit_events.c.seq <= upto)
        if execution_id is not None:
            stmt = stmt.where(audit_events.c.execution_id == execution_id)
        rows = conn.execute(stmt.order_by(audit_events.c.seq).limit(_BATCH)).all()
        yield from rows
        if len(rows) < _BATCH:
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
    with _snapshot(bind) as conn:
        for row in _iter_events(conn, after=0, execution_id=execution_id):
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


# --------------------------------------------------------------------------------------------
# Verification


@dataclass(frozen=True)
class AuditProblem:
    """One finding. kind: edited, deleted, reordered, truncated, injected, forged_head,
    head_missing, forged_checkpoint, unverifiable."""

    seq: int | None
    kind: str
    detail: str


@dataclass(frozen=True)
class VerifyReport:
    problems: list[AuditProblem] = field(default_factory=list)
    checked: int = 0
    checkpoint_seq: int = 0
    head_seq: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def kinds(self) -> set[str]:
        return {p.kind for p in self.problems}

    def seqs(self, kind: str) -> set[int]:
        return {p.seq for p in self.problems if p.kind == kind and p.seq is not None}

    def raise_if_broken(self) -> None:
        if self.problems:
            lines = "; ".join(f"seq {p.seq}: {p.kind}: {p.detail}" for p in self.problems[:10])
            more = f" (+{len(self.problems) - 10} more)" if len(self.problems) > 10 else ""
            raise AuditChainBroken(f"audit chain does not verify: {lines}{more}", self)


def verify_chain(bind: Bind, keyring: AuditKeyring) -> VerifyReport:
    """Check every remaining event, the head and the checkpoints. Never raises on tampering:
    the report lists each problem with its seq (see `VerifyReport.raise_if_broken`)."""
    with _snapshot(bind) as conn:
        return _verify(conn, keyring)


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


def _verify(conn: Connection, keyring: AuditKeyring) -> VerifyReport:
    problems: list[AuditProblem] = []
    head = conn.execute(select(audit_head).where(audit_head.c.id == HEAD_ID)).first()
    checkpoints = conn.execute(
        select(audit_checkpoints).order_by(audit_checkpoints.c.through_seq)
    ).all()

    for cp in checkpoints:
        msg = _checkpoint_message(cp.through_seq, cp.through_hash, cp.purged_count, cp.created_at)
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
    upto = int(head.seq) if head is not None else None
    for row in _iter_events(conn, after=start_seq, upto=upto):
        seq = int(row.seq)
        checked += 1
        if seq != expected:
            span = f"{expected}..{seq - 1}" if seq - 1 > expected else str(expected)
            problems.append(AuditProblem(expected, "deleted", f"event(s) {span} missing"))
        elif row.prev_hash != last_hash:
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
        if event_hash(row._mapping) != row.hash:
            problems.append(AuditProblem(seq, "edited", "content does not match its hash"))
        expected, last_seq, last_hash = seq + 1, seq, row.hash

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
        msg = _head_message(head_seq, head.hash)
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


# --------------------------------------------------------------------------------------------
# Retention


@dataclass(frozen=True)
class PurgeReport:
    purged_count: int
    through_seq: int
    through_hash: str
    checkpoint_written: bool


def purge_events(
    bind: Bind, keyring: AuditKeyring, older_than: datetime, *, actor: str = "audit-retention"
) -> PurgeReport:
    """Delete the oldest events (a prefix of the chain, all older than ``older_than``), write a
    signed checkpoint, and record a ``purge`` event. Refuses (AuditChainBroken) if the chain does
    not verify first: purging must not erase the evidence of tampering."""
    if not keyring.has_key:
        raise AuditKeyMissing("purging needs the current audit key to sign the checkpoint")
    cutoff = _utc(older_than)
    with _transaction(bind) as conn:
        _lock_head(conn)
        report = _verify(conn, keyring)
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
        created_at = datetime.now(UTC)
        key_id, mac = keyring.sign(_checkpoint_message(through, through_hash, deleted, created_at))
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
        _append(
            conn,
            keyring,
            RETENTION_EXECUTION_ID,
            "purge",
            actor,
            {"through_seq": through, "purged_count": deleted, "older_than": _iso(cutoff)},
            None,
            (),
        )
    return PurgeReport(int(deleted), through, str(through_hash), True)


# --------------------------------------------------------------------------------------------
# Dagster resource


class AuditLog(ConfigurableResource):
    """The encrypted, tamper-evident audit trail of patch executions (in the StockRx database).

    Without a key, ``has_key`` is False and ``append`` raises AuditKeyMissing: real runs must
    refuse; dry runs may run with the audit off. ``enabled=False`` makes every write a no-op.
    """

    enabled: bool = Field(
        default=True,
        description="Write the audit trail (log_encryption). False: append/purge do nothing.",
    )
    # Not named `keys`: Dagster builds the config dict with dict(self), which calls .keys().
    audit_keys: str | None = Field(
        default=None,
        description="Comma-separated 'key_id:fernet_key' entries, newest first (new events use "
        "the first; older ones stay readable). Bind with EnvVar('STOCKRX_AUDIT_KEYS').",
        repr=False,
    )
    key_file: str | None = Field(
        default=None,
        description="Path of a file with one 'key_id:fernet_key' entry per line, newest first; "
        "read after `audit_keys`.",
    )

    def keyring(self) -> AuditKeyring:
        return AuditKeyring.from_config(self.audit_keys, self.key_file)

    @property
    def has_key(self) -> bool:
        return self.keyring().has_key

    @property
    def active(self) -> bool:
        """True when events will actually be written."""
        return self.enabled and self.has_key

    def ensure_tables(self, bind: Bind) -> None:
        ensure_audit_tables(bind)

    def append(
        self,
        bind: Bind,
        execution_id: str,
        event_type: str,
        actor: str,
        public: Mapping[str, Any],
        secret: Mapping[str, Any] | None = None,
        *,
        known_secrets: Iterable[str] = (),
    ) -> int | None:
        """`append_event` with this resource's keys; None (nothing written) when disabled."""
        if not self.enabled:
            return None
        return append_event(
            bind,
            self.keyring(),
            execution_id,
            event_type,
            actor,
            public,
            secret,
            known_secrets=known_secrets,
        )

    def read(self, bind: Bind, execution_id: str | None = None) -> list[dict[str, Any]]:
        return read_events(bind, self.keyring(), execution_id)

    def verify(self, bind: Bind) -> VerifyReport:
        return verify_chain(bind, self.keyring())

    def purge(self, bind: Bind, older_than: datetime) -> PurgeReport | None:
        if not self.enabled:
            return None
        return purge_events(bind, self.keyring(), older_than)
