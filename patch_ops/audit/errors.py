"""The audit trail's errors, and the verification report that ``AuditChainBroken`` carries.

``VerifyReport`` lives here rather than in ``verify`` because the two refer to each other: the
error holds the report, and ``VerifyReport.raise_if_broken`` raises the error.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
