"""The audit keyring: named Fernet keys, parsed from ``key_id:fernet_key`` text or a key file.

New events are encrypted and the head/checkpoints signed with the newest key; every listed key
can still read and check, so keys rotate without losing old events. Signatures use a key derived
from each Fernet key (HKDF), never the Fernet key itself. No message or repr shows key material.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Iterable
from pathlib import Path

from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from patch_ops.audit.errors import AuditConfigError, AuditKeyMissing

_KEY_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

NO_KEY_MESSAGE = "no audit key configured: set STOCKRX_AUDIT_KEYS (key_id:fernet_key) or key_file"
#: The project's checkout: key files inside it are refused (keys never live next to the code).
REPOSITORY = Path(__file__).resolve().parents[2]


class KeyFileRefused(AuditConfigError):
    """A key file inside the repository."""


def check_key_file(path: str | Path) -> Path:
    """The key file's resolved path; refused if it lies inside the project's repository, for
    every caller that loads keys (jobs, sensors, the audit CLI)."""
    resolved = Path(path).expanduser().resolve()
    if resolved == REPOSITORY or REPOSITORY in resolved.parents:
        raise KeyFileRefused(
            f"audit key file {path} is inside the repository ({REPOSITORY}): keep keys out of "
            "the code tree (e.g. /etc/stockrx/audit.keys, mode 600), never next to it"
        )
    return resolved


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
            path = check_key_file(key_file)
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
            raise AuditKeyMissing(NO_KEY_MESSAGE)
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
