"""Secret scrubbing: what goes into the audit trail, even encrypted, never holds a secret.

Applied to both the public and the encrypted part of every event before it is stored, so a
password or token passed in a config or message by mistake is replaced by ``***``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

REDACTED = "***"

#: Key names whose values are secrets, as whole words of the key (``db_password``,
#: ``slackToken``, ``API-Key``), never as parts of other words: ``passed``, ``bypass`` and
#: ``secretary`` are ordinary keys.
SECRET_WORDS = frozenset({
    "password", "passwd", "passphrase", "pwd", "secret", "secrets", "token", "tokens",
    "apikey", "credential", "credentials", "authorization", "cookie", "cookies", "fernet",
})
#: Two-word secret names (``api_key``, ``private-key``, ``accessKey``).
SECRET_PAIRS = frozenset({("api", "key"), ("private", "key"), ("access", "key")})
_WORD_RE = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
# scheme://user:password@host -> scheme://user:***@host
_URL_PASSWORD_RE = re.compile(r"([a-z][a-z0-9+.-]*://[^:/?#@\s]*:)([^@/\s]+)(?=@)", re.IGNORECASE)


def is_secret_key(key: str) -> bool:
    """The key names a secret: one of its words (snake, kebab or camel case) is a secret's
    name, or two adjacent words are."""
    words = [w.lower() for w in _WORD_RE.findall(key)]
    return any(w in SECRET_WORDS for w in words) or any(
        pair in SECRET_PAIRS for pair in zip(words, words[1:], strict=False)
    )


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
            if is_secret_key(str(k)) and v is not None
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
