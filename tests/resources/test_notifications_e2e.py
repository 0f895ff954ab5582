"""Slack (dagster-slack) and email (SMTP) through real patch runs, against a local Slack Web API
and a local SMTP server: what arrives on completion, failure, rollback and restore; an outage
never fails a patch and ends up in the execution history."""

from __future__ import annotations

import pytest

from resources.notifier import Notifier
from stockrx_patches.definitions import build_definitions
from stockrx_patches.registry import Registry, default_registry
from tests.conftest import TEST_NOW_ENV
from tests.support import slow_patches
from tests.support.fake_slack import FakeSlack
from tests.support.fake_smtp import FakeSmtp
from tests.support.stockrx import (
    PRICE_JOB,
    digest,
    failure_description,
    latest_execution,
    run_patch,
    seeded,
)

TOKEN = "xoxb-e2e-5c1d"
UI = "http://dagster.stockrx.test:3000"
REAL = {"dry_run": False, "adjustment_type": "percentage", "adjustment_value": 8}


@pytest.fixture
def slack():
    with FakeSlack(token=TOKEN) as fake:
        yield fake


@pytest.fixture
def smtp():
    with FakeSmtp() as fake:
        yield fake


def defs_for(slack: FakeSlack, smtp: FakeSmtp, **overrides):  # type: ignore[no-untyped-def]
    """The real definitions (+ the misbehaving test patches), notifying the local servers."""
    base = default_registry()
    patches = dict(base.patches)
    settings = dict(base.config.patches)
    for cls in (slow_patches.ForgetfulCounterPatch, slow_patches.FailsAfterCommitPatch):
        patches[cls.name] = cls()
        settings[cls.name] = slow_patches.SETTINGS
    registry = Registry(
        patches, type(base.config)(settings, base.config.security, base.config.scheduling)
    )
    notifier = Notifier(
        **{
            "channels": list(base.config.security["notification_channels"]),
            "slack_token": TOKEN,
            "slack_base_url": slack.base_url,
            "slack_channel": "#data-patches",
            "smtp_host": "127.0.0.1",
            "smtp_port": smtp.port,
            "smtp_sender": "patches@stockrx.test",
            "smtp_recipients": ["ops@stockrx.test"],
            "smtp_security": "none",
            "retry_delay_seconds": 0.01,
            "ui_base_url": UI,
            **overrides,
        }
    )
    return build_definitions(registry, resources={"notifier": notifier})


def num(v: float) -> str:
    return f"{int(v):,}" if float(v).is_integer() else f"{v:,.2f}"


def subject(mail) -> str:  # type: ignore[no-untyped-def]
    return str(mail["Subject"]).strip()


def test_completed_real_run_reports_rows_duration_and_link(sqlite_url, slack, smtp):
    engine = seeded(sqlite_url, items=80)

    result = run_patch(sqlite_url, PRICE_JOB, REAL, defs=defs_for(slack, smtp))

    assert result.success, failure_description(result)
    ex = latest_execution(engine)
    # The approving dry run, then the real run: one message each, on both channels.
    assert len(slack.messages) == len(smtp.messages) == 2
    dry_text, real_text = (m["text"] for m in slack.messages)
    assert "inventory_price_adjustment completed (DRY RUN)" in dry_text
    assert real_text.startswith(
        ":white_check_mark: *[StockRx] Patch inventory_price_adjustment completed (REAL)*"
    )
    assert f"Rows changed: {ex['staged_updates']:,}" in real_text and ex["staged_updates"] > 0
    # The impact summary, not only a link: rows and the sums before and after.
    stats = ex["report"]["updates"]["inventories"]["stats"]["price"]
    assert f"inventories: {ex['staged_updates']:,} rows" in real_text
    sums = f"inventories.price: sum {num(stats['sum_before'])} → {num(stats['sum_after'])}"
    assert sums in real_text
    # A dry run says what would change; it changed nothing.
    assert f"Rows that would change: {ex['staged_updates']:,}" in dry_text
    assert "Rows changed" not in dry_text
    assert f"inventories.price: sum {num(stats['sum_before'])} → " in dry_text
    assert "Duration: " in real_text and " s" in real_text
    assert f"Run: {UI}/runs/{result.run_id}" in real_text
    assert f"Execution id: {ex['execution_id']}" in real_text
    assert "Reason" not in real_text
    assert slack.messages[1]["channel"] == "#data-patches"
    mail = smtp.messages[1]
    assert subject(mail) == "[StockRx] Patch inventory_price_adjustment completed (REAL)"
    body = mail.get_content()
    assert f"Rows changed: {ex['staged_updates']:,}" in body
    assert f"{UI}/runs/{result.run_id}" in body
    assert [(n["channel"], n["delivered"], n["attempts"]) for n in ex["notifications"]] == [
        ("slack", True, 1),
        ("email", True, 1),
    ]


def test_dry_run_failing_validation_is_an_ordinary_message_with_its_reason(sqlite_url, slack, smtp):
    # Urgent is for real runs and anything after a commit: a dry run changed nothing.
    engine = seeded(sqlite_url, items=40)
    before = digest(engine)

    result = run_patch(
        sqlite_url, "forgetful_counter_patch", {**REAL, "dry_run": True}, defs=defs_for(slack, smtp)
    )

    assert not result.success and digest(engine) == before
    ex = latest_execution(engine)
    [message], [mail] = slack.messages, smtp.messages
    text = message["text"]
    assert text.startswith(":warning:") and ":rotating_light:" not in text
    assert "forgetful_counter_patch ROLLED BACK (DRY RUN)" in text
    assert "Reason: validation failed: invariant inventory_logs_count" in text
    assert "Rows changed: none (a dry run commits nothing)" in text
    assert f"Execution id: {ex['execution_id']}" in text
    assert subject(mail) == "[StockRx] Patch forgetful_counter_patch ROLLED BACK (DRY RUN)"
    assert ex["execution_id"] in mail.get_content()
    assert "validation failed" in mail.get_content()


def test_mistyped_value_in_a_dry_run_is_not_urgent_in_a_real_run_it_is(sqlite_url, slack, smtp):
    seeded(sqlite_url, items=20)
    mistyped = {"adjustment_type": "percentage", "adjustment_value": 5000}

    dry = run_patch(sqlite_url, PRICE_JOB, {**mistyped, "dry_run": True},
                    defs=defs_for(slack, smtp), approve=False)
    real = run_patch(sqlite_url, PRICE_JOB, {**mistyped, "dry_run": False},
                     defs=defs_for(slack, smtp), approve=False)

    assert not dry.success and not real.success
    dry_text, real_text = (m["text"] for m in slack.messages)
    assert dry_text.startswith(":warning: *[StockRx] Patch inventory_price_adjustment FAILED (DRY")
    assert "got 5000" in dry_text and "Rows changed: none" in dry_text
    assert real_text.startswith(":rotating_light:")
    assert "Rows changed: none (nothing was committed)" in real_text
    assert [subject(m).startswith("[URGENT]") for m in smtp.messages] == [False, True]


def test_restore_after_failed_verification_is_urgent(sqlite_url, slack, smtp):
    seeded(sqlite_url, items=40)

    result = run_patch(
        sqlite_url, "fails_after_commit_patch", REAL, defs=defs_for(slack, smtp), approve=False
    )

    assert not result.success
    text = slack.messages[-1]["text"]
    assert "fails_after_commit_patch ROLLED BACK (REAL)" in text
    assert "Reason: post-verification failed" in text
    assert subject(smtp.messages[-1]).startswith("[URGENT]")


def test_refused_run_is_urgent_with_the_refusal(sqlite_url, slack, smtp, monkeypatch):
    engine = seeded(sqlite_url, items=20)
    monkeypatch.setenv(TEST_NOW_ENV, "2026-11-30T10:00:00+09:00")  # Monday: no window

    result = run_patch(sqlite_url, PRICE_JOB, REAL, defs=defs_for(slack, smtp), approve=False)

    assert not result.success
    ex = latest_execution(engine)
    text = slack.messages[-1]["text"]
    assert "inventory_price_adjustment FAILED (REAL)" in text
    assert "Reason: PlanRefused: outside the maintenance windows" in text
    assert f"Execution id: {ex['execution_id']}" in text
    assert "outside the maintenance windows" in smtp.messages[-1].get_content()


def test_notification_outage_never_fails_the_patch_and_is_recorded(sqlite_url, slack, smtp):
    engine = seeded(sqlite_url, items=40)
    slack.fail_next(100, "http_500")
    smtp.refuse_next(100)

    result = run_patch(
        sqlite_url, PRICE_JOB, {**REAL, "dry_run": True}, defs=defs_for(slack, smtp, retries=2)
    )

    assert result.success
    ex = latest_execution(engine)
    assert ex["status"] == "completed"
    slack_n, email_n = ex["notifications"]
    assert (slack_n["channel"], slack_n["delivered"], slack_n["attempts"]) == ("slack", False, 3)
    assert "internal_error" in slack_n["error"] or "500" in slack_n["error"]
    assert (email_n["channel"], email_n["delivered"], email_n["attempts"]) == ("email", False, 3)
    assert "554" in email_n["error"]
    assert slack.calls == 3 and slack.messages == [] and smtp.messages == []


def test_unreachable_servers_on_a_failing_run_still_fail_for_the_patch_reason(sqlite_url):
    engine = seeded(sqlite_url, items=20)
    with FakeSlack(token=TOKEN) as slack, FakeSmtp() as smtp:
        defs = defs_for(slack, smtp, retries=1)
    # Both servers are gone now: connections are refused.

    result = run_patch(sqlite_url, "forgetful_counter_patch", {**REAL, "dry_run": True}, defs=defs)

    assert not result.success
    assert "validation failed" in failure_description(result)
    ex = latest_execution(engine)
    assert ex["phase"] == "rolled_back"
    assert [(n["channel"], n["delivered"], n["attempts"]) for n in ex["notifications"]] == [
        ("slack", False, 2),
        ("email", False, 2),
    ]
    assert all("refused" in n["error"] for n in ex["notifications"])


def test_slack_recovering_after_retries_is_delivered_once(sqlite_url, slack, smtp):
    engine = seeded(sqlite_url, items=20)
    slack.fail_next(2, "ratelimited")

    result = run_patch(sqlite_url, PRICE_JOB, {**REAL, "dry_run": True}, defs=defs_for(slack, smtp))

    assert result.success
    assert len(slack.messages) == 1 and slack.calls == 3
    assert latest_execution(engine)["notifications"][0]["attempts"] == 3
