"""Patch notifications: a normal message when a patch completes or a dry run fails, an urgent one
when a real run does not complete or anything goes wrong after a commit.

`Notifier.notify` never raises: a notification must not turn a finished patch into a failed run.
The channels are sent side by side, each with a bounded timeout per attempt and bounded retries
(slack_sdk's retry handlers; `backoff` for SMTP), all within `budget_seconds`, so a dead endpoint
adds seconds, not minutes. What is still undelivered is the caller's to keep (patch_ops.outbox).
"""

from __future__ import annotations

import smtplib
import ssl
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.message import EmailMessage
from http.client import HTTPException
from typing import Any, Literal

import backoff
import dagster as dg
from dagster_slack import SlackResource
from pydantic import Field, field_validator
from slack_sdk import WebClient
from slack_sdk.http_retry import HttpRequest, HttpResponse, RetryHandler, RetryState

CHANNELS = ("slack", "email")
OUTCOMES = ("completed", "failed", "rolled_back", "restored", "held", "cancelled")
NOT_CONFIGURED = "not configured"
SMTP_PORTS = {"starttls": 587, "ssl": 465, "none": 25}
#: Slack answers (HTTP 200, ok=false) that are worth another attempt.
SLACK_TRANSIENT = frozenset({"ratelimited", "internal_error", "service_unavailable", "fatal_error",
                             "request_timeout"})

_OUTCOME_TITLES = {
    "completed": "completed",
    "failed": "FAILED",
    "rolled_back": "ROLLED BACK",
    "restored": "RESTORED FROM BACKUP",
    "held": "HELD, not run",
    "cancelled": "STOPPED (cancelled on request)",
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
    #: The live tables were changed (the commit happened), whatever came after.
    committed: bool = False
    #: The impact summary, one line each (rows, sums before/after).
    impact: tuple[str, ...] = ()
    #: Set when the message comes from the outbox: when it was first meant to go out.
    first_attempt_at: str | None = None

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {self.outcome!r}")
        object.__setattr__(self, "impact", tuple(self.impact))

    @property
    def urgent(self) -> bool:
        """Urgent (pages): a real run that did not complete, or anything after a commit. A dry run
        that fails (a mistyped value, a killed run) changed nothing: an ordinary message; so
        does a run stopped on request (Ctrl-C, Terminate) before its commit."""
        if self.outcome == "held":  # nothing ran: the requester is told, nobody is paged
            return False
        if self.outcome == "cancelled":  # someone stopped it: paged only if data had changed
            return self.committed
        return self.outcome != "completed" and (not self.dry_run or self.committed)

    @property
    def rows_line(self) -> str:
        n = f"{self.rows_changed:,}"
        if self.outcome == "completed":
            return f"Rows that would change: {n}" if self.dry_run else f"Rows changed: {n}"
        if self.dry_run:
            return "Rows changed: none (a dry run commits nothing)"
        if not self.committed:
            return "Rows changed: none (nothing was committed)"
        if self.outcome in ("rolled_back", "restored"):
            return f"Rows changed: {n} committed, then restored from the backup"
        return f"Rows changed: {n} (committed, not verified)"


@dataclass(frozen=True)
class DeliveryResult:
    """Outcome of one channel. `configured=False` means the channel was skipped, not broken."""

    channel: str
    delivered: bool
    attempts: int
    error: str | None = None
    configured: bool = True


class SlackRetry(RetryHandler):
    """slack_sdk retry handler: connection errors and timeouts, HTTP 429/5xx and Slack's
    transient answers (ok=false, e.g. ratelimited) are retried, with doubling delays, never more
    than ``max_retry_count`` times nor past ``deadline``; each attempt's timeout is cut to what
    is left. Counts the attempts."""

    def __init__(self, client: WebClient, retries: int, delay: float, deadline: float, timeout: float):
        super().__init__(max_retry_count=retries)
        self.client, self.delay, self.deadline, self.timeout = client, delay, deadline, timeout
        self.attempts = 1

    def _wait(self, state: RetryState) -> float:
        return self.delay * 2**state.current_attempt

    def _can_retry(
        self,
        *,
        state: RetryState,
        request: HttpRequest,
        response: HttpResponse | None = None,
        error: Exception | None = None,
    ) -> bool:
        if time.monotonic() + self._wait(state) >= self.deadline:
            return False
        if response is not None:
            body = response.body if isinstance(response.body, dict) else {}
            return response.status_code in (429, 500, 502, 503, 504) or (
                body.get("ok") is False and body.get("error") in SLACK_TRANSIENT
            )
        return isinstance(error, OSError | HTTPException)  # URLError, timeouts, resets

    def prepare_for_next_attempt(
        self,
        *,
        state: RetryState,
        request: HttpRequest,
        response: HttpResponse | None = None,
        error: Exception | None = None,
    ) -> None:
        state.next_attempt_requested = True
        time.sleep(self._wait(state))
        state.increment_current_attempt()
        self.attempts += 1
        self.client.timeout = max(0.1, min(self.timeout, self.deadline - time.monotonic()))  # type: ignore[assignment]  # urllib takes a float


class Notifier(dg.ConfigurableResource):
    """Sends patch outcomes to Slack and/or email."""

    channels: list[str] = Field(
        default=list(CHANNELS), description="Channels to use, a subset of ['slack', 'email']."
    )
    slack_token: str | None = Field(
        default=None, description="Slack bot token (STOCKRX_SLACK_TOKEN). None: no Slack."
    )
    slack_channel: str = Field(default="#data-patches", description="Slack channel to post to.")
    slack_base_url: str | None = Field(
        default=None,
        description="Slack Web API base URL (STOCKRX_SLACK_BASE_URL). None: the real Slack API.",
    )
    slack_timeout_seconds: float = Field(
        default=5.0, gt=0, description="Longest one Slack request may wait for its answer."
    )
    smtp_host: str | None = Field(
        default=None, description="SMTP server host. None: email not configured."
    )
    smtp_security: Literal["starttls", "ssl", "none"] = Field(
        default="starttls",
        description="starttls (upgrade the connection, default), ssl (TLS from the first byte, "
        "SMTPS) or none (plain text: a local relay only).",
    )
    smtp_port: int | None = Field(
        default=None, description="SMTP server port. None: 587 (starttls), 465 (ssl), 25 (none)."
    )
    smtp_sender: str = Field(
        default="stockrx-patches@localhost", description="From address of notification emails."
    )
    smtp_recipients: list[str] = Field(
        default=[], description="Email recipients. Empty: email not configured."
    )
    smtp_username: str | None = Field(default=None, description="SMTP login user, if any.")
    smtp_password: str | None = Field(
        default=None, description="SMTP login password (STOCKRX_SMTP_PASSWORD)."
    )
    smtp_timeout_seconds: float = Field(
        default=5.0, gt=0, description="Longest one SMTP connection or command may wait."
    )
    retries: int = Field(
        default=2, ge=0, description="Retries per channel after the first failed attempt."
    )
    retry_delay_seconds: float = Field(
        default=0.5, ge=0, description="Delay before the first retry; doubled for each next one."
    )
    budget_seconds: float = Field(
        default=15.0,
        gt=0,
        description="Longest one notification may take, every channel and retry included (the "
        "channels go side by side); what is not delivered by then is kept in the outbox.",
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

    def configured(self, channel: str) -> bool:
        if channel == "slack":
            return bool(self.slack_token)
        return bool(self.smtp_host and self.smtp_recipients)

    def notify(
        self, n: PatchNotification, down: dict[str, str] | None = None,
        deadline: float | None = None,
    ) -> list[DeliveryResult]:
        """Sends `n` to every channel, side by side, within the budget (or until `deadline`, a
        `time.monotonic()` value). A channel in `down` (channel → error, e.g. it just failed to
        send an older message) is not tried: reported undelivered with that error. Never raises."""
        down = down or {}
        deadline = time.monotonic() + self.budget_seconds if deadline is None else deadline
        with ThreadPoolExecutor(max_workers=max(1, len(self.channels))) as pool:
            futures = [
                pool.submit(self.deliver, c, n, deadline, self.retries) for c in self.channels
                if c not in down or not self.configured(c)
            ]
            results = [f.result() for f in futures]
        results += [DeliveryResult(c, False, 0, f"not tried, the channel is down: {down[c]}")
                    for c in self.channels if c in down and self.configured(c)]
        results.sort(key=lambda r: self.channels.index(r.channel))
        for r in results:
            if r.configured and not r.delivered:
                dg.get_dagster_logger().warning(
                    f"{r.channel} notification for {n.patch_name} ({n.execution_id}) not delivered "
                    f"after {r.attempts} attempts: {r.error}"
                )
        return results

    def deliver(
        self, channel: str, n: PatchNotification, deadline: float, retries: int
    ) -> DeliveryResult:
        """One channel, retried until delivered, out of retries or out of time. Never raises."""
        if not self.configured(channel):
            return DeliveryResult(channel, False, 0, NOT_CONFIGURED, configured=False)
        send: Callable[..., int] = self._send_slack if channel == "slack" else self._send_email
        try:
            return DeliveryResult(channel, True, send(n, deadline, retries))
        except _Undelivered as exc:
            error = " ".join(exc.error.split())  # one line
            return DeliveryResult(channel, False, exc.attempts, self._scrub(error))

    def slack_text(self, n: PatchNotification) -> str:
        icon = ":rotating_light:" if n.urgent else (
            ":white_check_mark:" if n.outcome == "completed" else ":warning:")
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
        if n.outcome != "completed":
            lines.append(f"Reason: {n.reason or 'unknown'}")
        elif n.reason:  # a completed run with something to say (held for approval)
            lines.append(f"Note: {n.reason}")
        lines += [
            f"Patch: {n.patch_name}",
            f"Mode: {'DRY RUN' if n.dry_run else 'REAL'}",
            n.rows_line,
            *[f"  {line}" for line in n.impact],
            f"Duration: {n.duration_seconds:.1f} s",
            f"Execution id: {n.execution_id}",
        ]
        if n.dagster_run_id:
            lines.append(f"Run: {self.ui_base_url.rstrip('/')}/runs/{n.dagster_run_id}")
        if n.first_attempt_at:
            lines.append(f"Delayed: could not be delivered at {n.first_attempt_at} (from the outbox)")
        return lines

    def _send_slack(self, n: PatchNotification, deadline: float, retries: int) -> int:
        timeout = max(0.1, min(self.slack_timeout_seconds, deadline - time.monotonic()))
        client = StockRxSlackResource(
            token=self.slack_token or "", base_url=self.slack_base_url
        ).get_client()
        client.timeout = timeout  # type: ignore[assignment]  # urllib takes a float
        handler = SlackRetry(client, retries, self.retry_delay_seconds, deadline,
                             self.slack_timeout_seconds)
        client.retry_handlers = [handler]
        try:
            client.chat_postMessage(channel=self.slack_channel, text=self.slack_text(n))
        except Exception as exc:  # noqa: BLE001 - a notification must never fail the caller
            raise _Undelivered(handler.attempts, f"{type(exc).__name__}: {exc}") from exc
        return handler.attempts

    def _send_email(self, n: PatchNotification, deadline: float, retries: int) -> int:
        attempts = 0

        @backoff.on_exception(
            backoff.expo, (smtplib.SMTPException, OSError), max_tries=retries + 1,
            max_time=lambda: max(0.0, deadline - time.monotonic()), jitter=None,
            factor=self.retry_delay_seconds or 1e-3, logger=None,
        )
        def attempt() -> None:
            nonlocal attempts
            attempts += 1
            self._smtp_once(n, max(0.1, min(self.smtp_timeout_seconds, deadline - time.monotonic())))

        try:
            attempt()
        except Exception as exc:  # noqa: BLE001 - a notification must never fail the caller
            raise _Undelivered(attempts, f"{type(exc).__name__}: {exc}") from exc
        return attempts

    def _smtp_once(self, n: PatchNotification, timeout: float) -> None:
        host = self.smtp_host or ""
        port = self.smtp_port or SMTP_PORTS[self.smtp_security]
        context = ssl.create_default_context()
        smtp: smtplib.SMTP
        if self.smtp_security == "ssl":
            smtp = smtplib.SMTP_SSL(host, port, timeout=timeout, context=context)
        else:
            smtp = smtplib.SMTP(host, port, timeout=timeout)
        with smtp:
            if self.smtp_security == "starttls":
                smtp.starttls(context=context)
            if self.smtp_username:
                smtp.login(self.smtp_username, self.smtp_password or "")
            smtp.send_message(self.email_message(n))

    def _scrub(self, text: str) -> str:
        for secret in (self.slack_token, self.smtp_password):
            if secret:
                text = text.replace(secret, "***")
        return text


class _Undelivered(Exception):
    def __init__(self, attempts: int, error: str):
        super().__init__(error)
        self.attempts, self.error = attempts, error


def notifier_from_env(env: Any, channels: list[str]) -> Notifier:
    """The Notifier the environment describes (README, "Notifications"): read when a run or a
    sensor starts, so nothing of it (least of all a secret) is in the launchpad or run config."""

    def number(name: str, default: float) -> float:
        return float(env.get(name) or default)

    security = (env.get("STOCKRX_SMTP_SECURITY") or "starttls").strip().lower()
    if security not in SMTP_PORTS:
        raise ValueError(f"STOCKRX_SMTP_SECURITY must be starttls, ssl or none, got {security!r}")
    port = env.get("STOCKRX_SMTP_PORT")
    return Notifier(
        channels=channels,
        slack_token=env.get("STOCKRX_SLACK_TOKEN") or None,
        slack_channel=env.get("STOCKRX_SLACK_CHANNEL") or "#data-patches",
        slack_base_url=env.get("STOCKRX_SLACK_BASE_URL") or None,
        slack_timeout_seconds=number("STOCKRX_NOTIFY_TIMEOUT_SECONDS", 5.0),
        smtp_host=env.get("STOCKRX_SMTP_HOST") or None,
        smtp_security=security,  # type: ignore[arg-type]  # checked above
        smtp_port=int(port) if port else None,
        smtp_sender=env.get("STOCKRX_SMTP_SENDER") or "stockrx-patches@localhost",
        smtp_recipients=[r.strip() for r in (env.get("STOCKRX_SMTP_RECIPIENTS") or "").split(",")
                         if r.strip()],
        smtp_username=env.get("STOCKRX_SMTP_USERNAME") or None,
        smtp_password=env.get("STOCKRX_SMTP_PASSWORD") or None,
        smtp_timeout_seconds=number("STOCKRX_NOTIFY_TIMEOUT_SECONDS", 5.0),
        retries=int(number("STOCKRX_NOTIFY_RETRIES", 2)),
        budget_seconds=number("STOCKRX_NOTIFY_BUDGET_SECONDS", 15.0),
        ui_base_url=env.get("STOCKRX_UI_BASE_URL") or "http://127.0.0.1:3000",
    )
