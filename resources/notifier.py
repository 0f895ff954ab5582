"""Patch notifications: a normal message when a patch completes, an urgent one when it does not.

`Notifier.notify` never raises: a notification must not turn a finished patch into a failed run.
Each channel is retried with backoff and reported as a `DeliveryResult`.
"""

import smtplib
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage

import dagster as dg
from dagster_slack import SlackResource
from pydantic import Field, field_validator
from slack_sdk import WebClient

CHANNELS = ("slack", "email")
OUTCOMES = ("completed", "failed", "rolled_back", "restored")
NOT_CONFIGURED = "not configured"

_OUTCOME_TITLES = {
    "completed": "completed",
    "failed": "FAILED",
    "rolled_back": "ROLLED BACK",
    "restored": "RESTORED FROM BACKUP",
}


class StockRxSlackResource(SlackResource):
    """`SlackResource` that can talk to another Slack Web API endpoint (a local fake in tests)."""

    base_url: str | None = Field(
        default=None,
        description="Slack Web API base URL, e.g. http://127.0.0.1:8080/api/. None: real Slack.",
    )

    def get_client(self) -> WebClient:
        return WebClient(token=self.token, base_url=self.base_url or WebClient.BASE_URL)


@dataclass(frozen=True)
class PatchNotification:
    """What happened to one patch execution."""

    patch_name: str
    execution_id: str
    outcome: str
    dry_run: bool
    rows_changed: int = 0
    duration_seconds: float = 0.0
    dagster_run_id: str | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {self.outcome!r}")

    @property
    def urgent(self) -> bool:
        return self.outcome != "completed"


@dataclass(frozen=True)
class DeliveryResult:
    """Outcome of one channel. `configured=False` means the channel was skipped, not broken."""

    channel: str
    delivered: bool
    attempts: int
    error: str | None = None
    configured: bool = True


class Notifier(dg.ConfigurableResource):
    """Sends patch outcomes to Slack and/or email."""

    channels: list[str] = Field(
        default=list(CHANNELS), description="Channels to use, a subset of ['slack', 'email']."
    )
    slack_token: str | None = Field(
        default=None, description="Slack bot token (bind with EnvVar). None: Slack not configured."
    )
    slack_channel: str = Field(default="#data-patches", description="Slack channel to post to.")
    slack_base_url: str | None = Field(
        default=None, description="Slack Web API base URL. None: the real Slack API."
    )
    smtp_host: str | None = Field(
        default=None, description="SMTP server host. None: email not configured."
    )
    smtp_port: int = Field(default=25, description="SMTP server port.")
    smtp_sender: str = Field(
        default="stockrx-patches@localhost", description="From address of notification emails."
    )
    smtp_recipients: list[str] = Field(
        default=[], description="Email recipients. Empty: email not configured."
    )
    smtp_username: str | None = Field(default=None, description="SMTP login user, if any.")
    smtp_password: str | None = Field(
        default=None, description="SMTP login password (bind with EnvVar)."
    )
    smtp_starttls: bool = Field(default=False, description="Upgrade the connection with STARTTLS.")
    smtp_timeout_seconds: float = Field(default=10.0, description="SMTP socket timeout.")
    retries: int = Field(
        default=3, ge=0, description="Retries per channel after the first failed attempt."
    )
    retry_delay_seconds: float = Field(
        default=0.5, ge=0, description="Delay before the first retry; doubled for each next one."
    )
    ui_base_url: str = Field(
        default="http://127.0.0.1:3000", description="Dagster UI base URL, for links to runs."
    )

    @field_validator("channels")
    @classmethod
    def _known_channels(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(CHANNELS))
        if unknown:
            raise ValueError(f"unknown notification channels {unknown}; known: {list(CHANNELS)}")
        return value

    def notify(self, n: PatchNotification) -> list[DeliveryResult]:
        """Sends `n` to every selected channel. Never raises."""
        senders: dict[str, tuple[bool, Callable[[PatchNotification], None]]] = {
            "slack": (bool(self.slack_token), self._send_slack),
            "email": (bool(self.smtp_host and self.smtp_recipients), self._send_email),
        }
        results = []
        for channel in self.channels:
            configured, send = senders[channel]
            if not configured:
                results.append(DeliveryResult(channel, False, 0, NOT_CONFIGURED, configured=False))
                continue
            result = self._deliver(channel, send, n)
            if not result.delivered:
                dg.get_dagster_logger().warning(
                    f"{channel} notification for {n.patch_name} ({n.execution_id}) not delivered "
                    f"after {result.attempts} attempts: {result.error}"
                )
            results.append(result)
        return results

    def slack_text(self, n: PatchNotification) -> str:
        icon = ":rotating_light:" if n.urgent else ":white_check_mark:"
        return self._scrub("\n".join([f"{icon} *{self._title(n)}*", *self._details(n)]))

    def email_message(self, n: PatchNotification) -> EmailMessage:
        msg = EmailMessage()
        msg["Subject"] = self._scrub(("[URGENT] " if n.urgent else "") + self._title(n))
        msg["From"] = self.smtp_sender
        msg["To"] = ", ".join(self.smtp_recipients)
        msg.set_content(self._scrub("\n".join(self._details(n)) + "\n"))
        return msg

    def _title(self, n: PatchNotification) -> str:
        mode = "DRY RUN" if n.dry_run else "REAL"
        return f"[StockRx] Patch {n.patch_name} {_OUTCOME_TITLES[n.outcome]} ({mode})"

    def _details(self, n: PatchNotification) -> list[str]:
        lines = []
        if n.urgent:
            lines.append(f"Reason: {n.reason or 'unknown'}")
        lines += [
            f"Patch: {n.patch_name}",
            f"Mode: {'DRY RUN' if n.dry_run else 'REAL'}",
            f"Rows changed: {n.rows_changed:,}",
            f"Duration: {n.duration_seconds:.1f} s",
            f"Execution id: {n.execution_id}",
        ]
        if n.dagster_run_id:
            lines.append(f"Run: {self.ui_base_url.rstrip('/')}/runs/{n.dagster_run_id}")
        return lines

    def _send_slack(self, n: PatchNotification) -> None:
        slack = StockRxSlackResource(token=self.slack_token or "", base_url=self.slack_base_url)
        slack.get_client().chat_postMessage(channel=self.slack_channel, text=self.slack_text(n))

    def _send_email(self, n: PatchNotification) -> None:
        with smtplib.SMTP(
            self.smtp_host or "", self.smtp_port, timeout=self.smtp_timeout_seconds
        ) as smtp:
            if self.smtp_starttls:
                smtp.starttls()
            if self.smtp_username:
                smtp.login(self.smtp_username, self.smtp_password or "")
            smtp.send_message(self.email_message(n))

    def _deliver(
        self, channel: str, send: Callable[[PatchNotification], None], n: PatchNotification
    ) -> DeliveryResult:
        error = ""
        for attempt in range(1, self.retries + 2):
            try:
                send(n)
                return DeliveryResult(channel, True, attempt)
            except Exception as exc:  # a notification must never fail the caller
                error = self._scrub(f"{type(exc).__name__}: {exc}")
            if attempt <= self.retries:
                time.sleep(self.retry_delay_seconds * 2 ** (attempt - 1))
        return DeliveryResult(channel, False, self.retries + 1, error)

    def _scrub(self, text: str) -> str:
        for secret in (self.slack_token, self.smtp_password):
            if secret:
                text = text.replace(secret, "***")
        return text
