"""The audit trail as a Dagster resource: ``AuditLog`` holds the key configuration and wraps the
functions of ``patch_ops.audit`` (the trail itself: tables, chain, keys, verification, purge).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from dagster import ConfigurableResource
from pydantic import Field

from patch_ops.audit import (
    AuditKeyring,
    Bind,
    PurgeReport,
    VerifyReport,
    append_event,
    ensure_audit_tables,
    purge_events,
    read_events,
    verify_chain,
)

__all__ = ["AuditLog"]


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
