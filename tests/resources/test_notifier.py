import dagster as dg
import pytest

from resources.notifier import (
    NOT_CONFIGURED,
    DeliveryResult,
    Notifier,
    PatchNotification,
    StockRxSlackResource,
)
from tests.support.fake_slack import FakeSlack
from tests.support.fake_smtp import FakeSmtp

TOKEN = "xoxb-secret-7f3a9c"
PASSWORD = "smtp-pw-Zq81x"


@pytest.fixture
def slack():
    with FakeSlack(token=TOKEN) as fake:
        yield fake


@pytest.fixture
def smtp():
    with FakeSmtp() as fake:
        yield fake


def slack_notifier(slack: FakeSlack, **overrides) -> Notifier:
    config = dict(
        channels=["slack"],
        slack_token=TOKEN,
        slack_base_url=slack.base_url,
        retry_delay_seconds=0.01,
        ui_base_url="http://dagster.local:3000",
    )
    return Notifier(**(config | overrides))


def email_notifier(smtp: FakeSmtp, **overrides) -> Notifier:
    config = dict(
        channels=["email"],
        smtp_host="127.0.0.1",
        smtp_port=smtp.port,
        smtp_sender="patches@stockrx.test",
        smtp_recipients=["ops@stockrx.test", "dev@stockrx.test"],
        smtp_security="none",
        retry_delay_seconds=0.01,
    )
    return Notifier(**(config | overrides))


def completed(dry_run: bool = False, **overrides) -> PatchNotification:
    fields = dict(
        patch_name="fix_negative_stock",
        execution_id="exec-42",
        outcome="completed",
        dry_run=dry_run,
        rows_changed=1234,
        duration_seconds=12.34,
        dagster_run_id="run-abc",
    )
    return PatchNotification(**(fields | overrides))


def subject(mail) -> str:
    # Python folds a long Subject right after the colon; its parser keeps that leading space.
    return str(mail["Subject"]).strip()


def failed(outcome: str = "failed", **overrides) -> PatchNotification:
    fields = dict(reason="invariant broken: stock < 0", rows_changed=0)
    return completed(**(fields | overrides | {"outcome": outcome}))


def test_completed_real_run_posts_normal_slack_message(slack):
    results = slack_notifier(slack).notify(completed(dry_run=False))

    assert results == [DeliveryResult("slack", True, 1)]
    [message] = slack.messages
    assert message["channel"] == "#data-patches"
    text = message["text"]
    assert ":white_check_mark:" in text and ":rotating_light:" not in text
    assert "fix_negative_stock completed (REAL)" in text
    assert "Rows changed: 1,234" in text
    assert "Duration: 12.3 s" in text
    assert "http://dagster.local:3000/runs/run-abc" in text


def test_completed_dry_run_is_labelled_dry_run(slack):
    slack_notifier(slack, slack_channel="#patch-dry-runs").notify(completed(dry_run=True))

    [message] = slack.messages
    assert message["channel"] == "#patch-dry-runs"
    assert "(DRY RUN)" in message["text"] and "REAL" not in message["text"]


def test_no_run_link_without_run_id(slack):
    slack_notifier(slack).notify(completed(dagster_run_id=None))

    assert "/runs/" not in slack.messages[0]["text"]


@pytest.mark.parametrize(
    ("outcome", "title"),
    [("failed", "FAILED"), ("rolled_back", "ROLLED BACK"), ("restored", "RESTORED FROM BACKUP")],
)
def test_failure_outcomes_are_urgent_on_every_channel(slack, smtp, outcome, title):
    notifier = Notifier(
        slack_token=TOKEN,
        slack_base_url=slack.base_url,
        smtp_host="127.0.0.1",
        smtp_port=smtp.port,
        smtp_recipients=["ops@stockrx.test"],
        smtp_security="none",
    )
    results = notifier.notify(failed(outcome))

    assert [(r.channel, r.delivered) for r in results] == [("slack", True), ("email", True)]
    text = slack.messages[0]["text"]
    assert text.startswith(":rotating_light:")
    assert f"fix_negative_stock {title} (REAL)" in text
    assert "Reason: invariant broken: stock < 0" in text
    assert "Execution id: exec-42" in text
    [mail] = smtp.messages
    assert subject(mail) == f"[URGENT] [StockRx] Patch fix_negative_stock {title} (REAL)"
    assert "Reason: invariant broken: stock < 0" in mail.get_content()
    assert "Execution id: exec-42" in mail.get_content()


def test_email_carries_japanese_text(smtp):
    notification = failed(patch_name="在庫数補正", reason="在庫数がマイナスになりました")
    results = email_notifier(smtp).notify(notification)

    assert results == [DeliveryResult("email", True, 1)]
    [mail] = smtp.messages
    assert subject(mail) == "[URGENT] [StockRx] Patch 在庫数補正 FAILED (REAL)"
    assert mail["From"] == "patches@stockrx.test"
    assert mail["To"] == "ops@stockrx.test, dev@stockrx.test"
    assert mail.get_content_charset() == "utf-8"
    assert "Reason: 在庫数がマイナスになりました" in mail.get_content()
    assert smtp.envelopes == [("patches@stockrx.test", ["ops@stockrx.test", "dev@stockrx.test"])]


def test_completed_email_is_not_urgent(smtp):
    email_notifier(smtp).notify(completed(dry_run=True))

    [mail] = smtp.messages
    assert subject(mail) == "[StockRx] Patch fix_negative_stock completed (DRY RUN)"
    assert "Rows that would change: 1,234" in mail.get_content()
    assert "Rows changed" not in mail.get_content()


@pytest.mark.parametrize("mode", ["http_500", "ratelimited"])
def test_slack_outage_is_retried_then_delivered(slack, mode):
    slack.fail_next(2, mode)

    results = slack_notifier(slack, retries=3).notify(completed())

    assert results == [DeliveryResult("slack", True, 3)]
    assert slack.calls == 3
    assert len(slack.messages) == 1


def test_long_slack_outage_is_reported_not_raised(slack):
    slack.fail_next(10, "ratelimited")

    [result] = slack_notifier(slack, retries=2).notify(failed())

    assert not result.delivered and result.configured
    assert result.attempts == 3 and slack.calls == 3
    assert "ratelimited" in result.error
    assert slack.messages == []


def test_unreachable_slack_is_reported_not_raised(slack):
    base_url = slack.base_url
    slack.stop()

    [result] = slack_notifier(slack, slack_base_url=base_url, retries=0).notify(failed())

    assert not result.delivered and result.attempts == 1
    assert result.error


def test_wrong_slack_token_is_undelivered_and_never_echoed(slack):
    wrong = "xoxb-wrong-51bd2e"
    [result] = slack_notifier(slack, slack_token=wrong, retries=1).notify(
        failed(reason=f"crashed while using {wrong}")
    )

    assert not result.delivered and result.attempts == 1  # permanent: not retried
    assert "invalid_auth" in result.error
    assert wrong not in result.error and wrong not in repr(result)


def test_secrets_are_scrubbed_from_messages(slack):
    with FakeSmtp(username="patcher", password=PASSWORD) as auth_smtp:
        notifier = Notifier(
            slack_token=TOKEN,
            slack_base_url=slack.base_url,
            smtp_host="127.0.0.1",
            smtp_port=auth_smtp.port,
            smtp_recipients=["ops@stockrx.test"],
            smtp_security="none",
            smtp_username="patcher",
            smtp_password=PASSWORD,
        )
        results = notifier.notify(failed(reason=f"dsn token={TOKEN} password={PASSWORD}"))

        assert all(r.delivered for r in results)
        assert auth_smtp.logins == ["patcher"]
        body = auth_smtp.messages[0].get_content()
    text = slack.messages[0]["text"]
    for secret in (TOKEN, PASSWORD):
        assert secret not in text and secret not in body
    assert "token=*** password=***" in text


def test_smtp_refusal_is_retried_then_delivered(smtp):
    smtp.refuse_next(1)

    assert email_notifier(smtp).notify(completed()) == [DeliveryResult("email", True, 2)]
    assert len(smtp.messages) == 1


def test_smtp_refusing_is_reported_not_raised(smtp):
    smtp.refuse_next(10)

    [result] = email_notifier(smtp, retries=1).notify(failed())

    assert not result.delivered and result.attempts == 2
    assert "554" in result.error and "refused" in result.error
    assert smtp.messages == []


def test_wrong_smtp_password_is_undelivered_and_never_echoed():
    with FakeSmtp(username="patcher", password="right-password") as smtp:
        [result] = email_notifier(
            smtp, smtp_username="patcher", smtp_password=PASSWORD, retries=0
        ).notify(failed())

    assert not result.delivered
    assert "SMTPAuthenticationError" in result.error
    assert PASSWORD not in repr(result)


def test_unconfigured_channels_are_skipped_not_errors():
    results = Notifier(retry_delay_seconds=0).notify(failed())

    assert results == [
        DeliveryResult("slack", False, 0, NOT_CONFIGURED, configured=False),
        DeliveryResult("email", False, 0, NOT_CONFIGURED, configured=False),
    ]


def test_email_without_recipients_is_not_configured(smtp):
    [result] = email_notifier(smtp, smtp_recipients=[]).notify(completed())

    assert not result.configured and smtp.messages == []


def test_only_selected_channels_are_used(slack, smtp):
    notifier = Notifier(
        channels=["email"],
        slack_token=TOKEN,
        slack_base_url=slack.base_url,
        smtp_host="127.0.0.1",
        smtp_port=smtp.port,
        smtp_recipients=["ops@stockrx.test"],
        smtp_security="none",
    )

    assert [r.channel for r in notifier.notify(completed())] == ["email"]
    assert slack.calls == 0 and len(smtp.messages) == 1


def test_unknown_channel_is_rejected():
    with pytest.raises(ValueError, match="sms"):
        Notifier(channels=["slack", "sms"])


def test_unknown_outcome_is_rejected():
    with pytest.raises(ValueError, match="outcome"):
        completed(outcome="done")


def test_slack_resource_talks_to_base_url(slack):
    client = StockRxSlackResource(token=TOKEN, base_url=slack.base_url).get_client()

    response = client.chat_postMessage(channel="#x", text="hello")

    assert response["ok"] and slack.messages[0]["text"] == "hello"


def test_notifier_as_dagster_resource(slack, smtp, monkeypatch):
    monkeypatch.setenv("STOCKRX_SLACK_TOKEN", TOKEN)

    @dg.op
    def announce(context: dg.OpExecutionContext, notifier: Notifier) -> list[bool]:
        results = notifier.notify(completed(dagster_run_id=context.run_id))
        return [r.delivered for r in results]

    @dg.job
    def announce_job():
        announce()

    notifier = Notifier(
        slack_token=dg.EnvVar("STOCKRX_SLACK_TOKEN"),
        slack_base_url=slack.base_url,
        smtp_host="127.0.0.1",
        smtp_port=smtp.port,
        smtp_recipients=["ops@stockrx.test"],
        smtp_security="none",
    )
    result = announce_job.execute_in_process(resources={"notifier": notifier})

    assert result.success
    assert result.output_for_node("announce") == [True, True]
    assert f"http://127.0.0.1:3000/runs/{result.run_id}" in slack.messages[0]["text"]
    assert result.run_id in smtp.messages[0].get_content()
