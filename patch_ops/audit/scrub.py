"""Secret scrubbing: what goes into the audit trail, even encrypted, never holds a secret.

Applied to both the public and the encrypted part of every event before it is stored, so a
password or token passed in a config or message by mistake is replaced by ``***``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

REDACTED = "***"

_SECRET_KEY_RE = re.compile(
    r"pass(word|wd|phrase)?|pwd|secret|token|api[_-]?key|private[_-]?key|access[_-]?key"
    r"|credential|authorization|cookie|fernet",
    re.IGNORECASE,
)
# scheme://user:password@host -> scheme://user:***@host
_URL_PASSWORD_RE = re.compile(r"([a-z][a-z0-9+.-]*://[^:/?#@\s]*:)([^@/\s]+)(?=@)", re.IGNORECASE)


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
