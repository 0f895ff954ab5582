"""Notification outages through real patch runs: a dead endpoint (accepts, never answers) costs
seconds, not minutes; what a channel could not take is kept in the outbox and sent by the next
run or by the outbox sensor; SMTP over STARTTLS (the default) and SSL, from the environment."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from dagster import DagsterInstance, build_sensor_context
from sqlalchemy import update

from patch_ops import outbox
from patch_ops.database import write_transaction
from resources.database import StockRxDatabase
from stockrx_patches.definitions import build_definitions
from stockrx_patches.outbox_sensor import OUTBOX_SENSOR
from stockrx_patches.registry import default_registry
from tests.resources.test_notifications_e2e import TOKEN, defs_for, subject
from tests.support.fake_slack import FakeSlack
from tests.support.fake_smtp import FakeSmtp
from tests.support.stockrx import PRICE_JOB, latest_execution, run_patch, seeded

DRY = {"dry_run": True, "adjustment_type": "percentage", "adjustment_value": 8}


class DeadEndpoint:
    """A TCP port that accepts connections (the kernel's backlog) and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]

    def __enter__(self) -> DeadEndpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


class TlsSmtp(FakeSmtp):
    """FakeSmtp that speaks STARTTLS (required before MAIL) or SSL from the first byte."""

    def __init__(self, cert: Path, key: Path, mode: str) -> None:
        super().__init__()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        tls = {"tls_context": context, "require_starttls": True} if mode == "starttls" else {
            "ssl_context": context}
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port,
                                      ready_timeout=10, **tls)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (the client trusts it through SSL_CERT_FILE)."""
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(
            ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    d = tmp_path_factory.mktemp("tls")
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return d / "cert.pem", d / "key.pem"


@pytest.fixture
def slack() -> Iterator[FakeSlack]:
    with FakeSlack(token=TOKEN) as fake:
        yield fake


@pytest.fixture
def smtp() -> Iterator[FakeSmtp]:
    with FakeSmtp() as fake:
        yield fake


def test_dead_endpoints_add_seconds_not_minutes_and_the_message_is_kept(sqlite_url, slack, smtp):
    engine = seeded(sqlite_url, items=20)
    with DeadEndpoint() as dead_slack, DeadEndpoint() as dead_smtp:
        defs = defs_for(
            slack, smtp, slack_base_url=f"http://127.0.0.1:{dead_slack.port}/api/",
            smtp_port=dead_smtp.port, slack_timeout_seconds=1.0, smtp_timeout_seconds=1.0,
            retries=2, retry_delay_seconds=0.1, budget_seconds=3.0,
        )
        started = time.monotonic()
        result = run_patch(sqlite_url, PRICE_JOB, DRY, defs=defs)
        took = time.monotonic() - started

    assert result.success
    # Both channels side by side, within the 3 s budget (a run of this size takes ~2 s; before,
    # slack_sdk's 30 s timeout times 4 attempts made it minutes).
    assert took < 15, f"the run took {took:.1f} s with dead notification endpoints"
    ex = latest_execution(engine)
    assert [(n["channel"], n["delivered"], n.get("kept_in_outbox")) for n in ex["notifications"]] \
        == [("slack", False, True), ("email", False, True)]
    assert all("timed out" in n["error"] for n in ex["notifications"]), ex["notifications"]
    kept = outbox.pending(engine)
    assert [(k["channel"], k["execution_id"]) for k in kept] == [
        ("slack", ex["execution_id"]), ("email", ex["execution_id"])]


def test_undelivered_message_is_sent_by_the_next_run(sqlite_url, slack, smtp):
    engine = seeded(sqlite_url, items=20)
    slack.fail_next(100, "http_500")
    smtp.refuse_next(100)
    first = run_patch(sqlite_url, PRICE_JOB, DRY, defs=defs_for(slack, smtp, retries=1))
    assert first.success
    first_ex = latest_execution(engine)
    assert len(outbox.pending(engine)) == 2 and slack.messages == [] and smtp.messages == []

    slack.fail_next(0)
    smtp.refuse_next(0)
    second = run_patch(sqlite_url, PRICE_JOB, {**DRY, "adjustment_value": 9},
                       defs=defs_for(slack, smtp))

    assert second.success
    # The kept message first (marked delayed), then the second run's own.
    assert [first_ex["execution_id"] in m["text"] for m in slack.messages] == [True, False]
    assert "Delayed: could not be delivered at " in slack.messages[0]["text"]
    assert "Rows that would change: " in slack.messages[0]["text"]
    assert [first_ex["execution_id"] in m.get_content() for m in smtp.messages] == [True, False]
    assert outbox.pending(engine) == []


def test_outbox_sensor_sends_what_is_due(sqlite_url, slack, smtp, monkeypatch):
    engine = seeded(sqlite_url, items=20)
    slack.fail_next(100, "http_500")
    run_patch(sqlite_url, PRICE_JOB, DRY, defs=defs_for(slack, smtp, retries=0))
    [kept] = outbox.pending(engine)
    slack.fail_next(0)
    defs = defs_for(slack, smtp)
    sensor = defs.resolve_sensor_def(OUTBOX_SENSOR)
    resources = {"stockrx_db": StockRxDatabase(url=sqlite_url),
                 "notifier": defs_for(slack, smtp).resources["notifier"]}

    with build_sensor_context(resources=resources) as ctx:
        early = sensor.evaluate_tick(ctx)
    assert early.skip_message == "nothing due in the outbox" and slack.messages == []

    with write_transaction(engine) as conn:  # its wait is over
        conn.execute(update(outbox.outbox).values(next_attempt_at=outbox.wall_now()))
    # A preview (`dagster sensor preview`, the UI's "Test sensor": no daemon tick behind its log
    # key) sends nothing and leaves the message as it was.
    with DagsterInstance.ephemeral() as instance, build_sensor_context(
        instance=instance, repository_name="__repository__", sensor_name=OUTBOX_SENSOR,
        resources=resources,
    ) as ctx:
        preview = sensor.evaluate_tick(ctx)
    assert preview.skip_message == "preview, nothing sent: 1 message(s) kept"
    assert slack.messages == [] and outbox.pending(engine) == [
        {**kept, "next_attempt_at": outbox.pending(engine)[0]["next_attempt_at"]}]
    with build_sensor_context(resources=resources) as ctx:
        due = sensor.evaluate_tick(ctx)

    assert due.skip_message == "outbox: 1 of 1 message(s) delivered"
    [message] = slack.messages
    assert kept["execution_id"] in message["text"]
    assert outbox.pending(engine) == []


@pytest.mark.parametrize("mode", ["starttls", "ssl"])
def test_smtp_security_and_port_come_from_the_environment(
    sqlite_url, certificate, monkeypatch, mode
):
    cert, key = certificate
    engine = seeded(sqlite_url, items=20)
    server = TlsSmtp(cert, key, mode).start()
    try:
        for name in ("STOCKRX_SLACK_TOKEN", "STOCKRX_SMTP_USERNAME", "STOCKRX_SMTP_PASSWORD"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        monkeypatch.setenv("STOCKRX_SMTP_HOST", "127.0.0.1")
        monkeypatch.setenv("STOCKRX_SMTP_PORT", str(server.port))
        monkeypatch.setenv("STOCKRX_SMTP_RECIPIENTS", "ops@stockrx.test, dev@stockrx.test")
        if mode == "ssl":
            monkeypatch.setenv("STOCKRX_SMTP_SECURITY", "ssl")
        else:
            monkeypatch.delenv("STOCKRX_SMTP_SECURITY", raising=False)  # the default
        defs = build_definitions(default_registry())

        result = run_patch(sqlite_url, PRICE_JOB, DRY, defs=defs)
    finally:
        server.stop()

    assert result.success
    [mail] = server.messages
    assert subject(mail) == "[StockRx] Patch inventory_price_adjustment completed (DRY RUN)"
    assert server.envelopes[0][1] == ["ops@stockrx.test", "dev@stockrx.test"]
    email_n = latest_execution(engine)["notifications"][-1]
    assert (email_n["channel"], email_n["delivered"]) == ("email", True)


def test_plain_smtp_server_is_refused_without_tls_by_default(sqlite_url, smtp, monkeypatch):
    engine = seeded(sqlite_url, items=20)
    monkeypatch.delenv("STOCKRX_SMTP_SECURITY", raising=False)
    monkeypatch.delenv("STOCKRX_SLACK_TOKEN", raising=False)
    monkeypatch.setenv("STOCKRX_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("STOCKRX_SMTP_PORT", str(smtp.port))
    monkeypatch.setenv("STOCKRX_SMTP_RECIPIENTS", "ops@stockrx.test")
    monkeypatch.setenv("STOCKRX_NOTIFY_RETRIES", "0")

    result = run_patch(sqlite_url, PRICE_JOB, DRY, defs=build_definitions(default_registry()))

    assert result.success and smtp.messages == []  # never sent in clear text
    email_n = latest_execution(engine)["notifications"][-1]
    assert not email_n["delivered"] and "STARTTLS" in email_n["error"]
