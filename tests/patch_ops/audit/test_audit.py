"""The encrypted, tamper-evident audit trail (patch_ops.audit, and the AuditLog resource), on
SQLite and PostgreSQL."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from sqlalchemy import delete, select, update
from sqlalchemy.engine import Engine

from patch_ops.audit import (
    AuditChainBroken,
    AuditConfigError,
    AuditKeyMissing,
    AuditKeyring,
    append_event,
    audit_checkpoints,
    audit_events,
    audit_head,
    ensure_audit_tables,
    event_hash,
    purge_events,
    read_events,
    read_head,
    scrub_secrets,
    verify_chain,
)
from patch_ops.database import get_engine
from resources.audit import AuditLog

SAMPLE = "LOT-7Q-SECRET-4711"
K1 = AuditKeyring.new_entry("k1")
K2 = AuditKeyring.new_entry("k2")


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    eng = get_engine(database_url)
    ensure_audit_tables(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def keyring() -> AuditKeyring:
    return AuditKeyring.parse(K1)


def _append_n(
    engine: Engine,
    keyring: AuditKeyring,
    n: int,
    execution_id: str = "ex-1",
    at: datetime | None = None,
) -> None:
    """``n`` events; all dated ``at`` when given (a fixed clock), else by the system clock."""
    for i in range(n):
        append_event(
            engine,
            keyring,
            execution_id,
            "validation",
            "release-bot",
            {"step": i, "rows_changed": 10 * i},
            {"sample": [{"lot": SAMPLE, "qty_before": i, "qty_after": i + 1}]},
            clock=None if at is None else lambda: at,
        )


def _run(engine: Engine, *statements: Any) -> None:
    with engine.begin() as conn:
        for stmt in statements:
            conn.execute(stmt)


def _row(engine: Engine, seq: int) -> dict[str, Any]:
    with engine.connect() as conn:
        return dict(
            conn.execute(select(audit_events).where(audit_events.c.seq == seq)).one()._mapping
        )


def _raw_text(engine: Engine) -> str:
    with engine.connect() as conn:
        rows = [
            *conn.execute(select(audit_events)),
            *conn.execute(select(audit_head)),
            *conn.execute(select(audit_checkpoints)),
        ]
    return "\n".join(str(tuple(r)) for r in rows)


# --- writing and reading ---------------------------------------------------------------------


def test_append_read_and_verify(engine: Engine, keyring: AuditKeyring) -> None:
    _append_n(engine, keyring, 3)
    append_event(engine, keyring, "ex-2", "commit", "alice", {"rows": 5})

    events = read_events(engine, keyring, "ex-1")
    assert [e["seq"] for e in events] == [1, 2, 3]
    assert events[1]["public"] == {"step": 1, "rows_changed": 10}
    assert events[1]["secret"]["sample"][0]["lot"] == SAMPLE
    assert events[0]["occurred_at"].tzinfo is not None
    assert all(e["readable"] and e["key_id"] == "k1" for e in events)
    assert read_events(engine, keyring, "ex-2")[0]["secret"] is None
    report = verify_chain(engine, keyring)
    assert report.ok, report.problems
    assert (report.checked, report.head_seq) == (4, 4)
    assert read_head(engine)[0] == 4


def test_sensitive_payload_is_encrypted_at_rest(
    engine: Engine, keyring: AuditKeyring, database_url: str
) -> None:
    _append_n(engine, keyring, 2)
    assert SAMPLE not in _raw_text(engine)
    assert "qty_before" not in _raw_text(engine)
    if database_url.startswith("sqlite"):
        engine.dispose()
        assert SAMPLE.encode() not in Path(engine.url.database or "").read_bytes()


def test_secrets_are_scrubbed_before_storage(engine: Engine, keyring: AuditKeyring) -> None:
    token = "xoxb-9f8e7d6c5b4a"
    append_event(
        engine,
        keyring,
        "ex-1",
        "started",
        "alice",
        {"slack": f"token is {token}", "password": "hunter2", "db": "postgresql://u:pw9@h/db"},
        {"config": {"api_key": "abc-123-key", "note": f"uses {token}"}},
        known_secrets=[token],
    )
    raw = _raw_text(engine)
    for secret in (token, "hunter2", "pw9"):
        assert secret not in raw
    event = read_events(engine, keyring)[0]
    assert event["public"] == {
        "slack": "token is ***",
        "password": "***",
        "db": "postgresql://u:***@h/db",
    }
    assert event["secret"] == {"config": {"api_key": "***", "note": "uses ***"}}


def test_scrub_secrets_helper() -> None:
    data = {"user": "bob", "Auth_Token": "t", "nested": [{"smtp_password": "p"}, "x SEKRIT y"]}
    assert scrub_secrets(data, known_secrets=["SEKRIT"]) == {
        "user": "bob",
        "Auth_Token": "***",
        "nested": [{"smtp_password": "***"}, "x *** y"],
    }


def test_event_commits_and_rolls_back_with_the_callers_transaction(
    engine: Engine, keyring: AuditKeyring
) -> None:
    with engine.connect() as conn:
        with conn.begin():
            append_event(conn, keyring, "ex-1", "commit", "alice", {"rows": 1})
        trans = conn.begin()
        append_event(conn, keyring, "ex-1", "commit", "alice", {"rows": 2})
        trans.rollback()
    assert [e["public"]["rows"] for e in read_events(engine, keyring)] == [1]
    assert read_head(engine)[0] == 1
    assert verify_chain(engine, keyring).ok


# --- tamper detection ------------------------------------------------------------------------


def test_edited_public_field_is_detected(engine: Engine, keyring: AuditKeyring) -> None:
    _append_n(engine, keyring, 5)
    _run(
        engine,
        update(audit_events)
        .where(audit_events.c.seq == 3)
        .values(public_json='{"rows_changed":0,"step":2}'),
    )
    report = verify_chain(engine, keyring)
    assert report.kinds == {"edited"}
    assert report.seqs("edited") == {3}
    with pytest.raises(AuditChainBroken, match="seq 3: edited"):
        report.raise_if_broken()


def test_an_edited_hash_is_reported_as_edited_not_as_a_deleted_successor(
    engine: Engine, keyring: AuditKeyring
) -> None:
    # Changing event 3's hash column once also reported event 4 as "deleted" (its prev_hash
    # pointed to a hash no longer in the table): one edit, one problem.
    _append_n(engine, keyring, 5)
    _run(engine, update(audit_events).where(audit_events.c.seq == 3).values(hash="0" * 64))
    report = verify_chain(engine, keyring)
    assert report.kinds == {"edited"}
    assert report.seqs("edited") == {3}


def test_edited_ciphertext_is_detected(engine: Engine, keyring: AuditKeyring) -> None:
    _append_n(engine, keyring, 5)
    token = _row(engine, 2)["ciphertext"]
    forged = token[:-8] + ("A" if token[-8] != "A" else "B") + token[-7:]
    _run(engine, update(audit_events).where(audit_events.c.seq == 2).values(ciphertext=forged))
    report = verify_chain(engine, keyring)
    assert report.kinds == {"edited"} and report.seqs("edited") == {2}
    event = read_events(engine, keyring)[1]
    assert event["readable"] is False and event["secret"] is None
    assert "authentication" in event["error"]


def test_deleted_middle_event_is_detected(engine: Engine, keyring: AuditKeyring) -> None:
    _append_n(engine, keyring, 5)
    _run(engine, delete(audit_events).where(audit_events.c.seq == 3))
    report = verify_chain(engine, keyring)
    assert report.kinds == {"deleted"} and report.seqs("deleted") == {3}


def test_reordered_events_are_detected(engine: Engine, keyring: AuditKeyring) -> None:
    _append_n(engine, keyring, 5)
    seq = audit_events.c.seq
    _run(
        engine,
        update(audit_events).where(seq == 3).values(seq=-3),
        update(audit_events).where(seq == 4).values(seq=3),
        update(audit_events).where(seq == -3).values(seq=4),
    )
    report = verify_chain(engine, keyring)
    assert "reordered" in report.kinds
    assert report.seqs("reordered") >= {3, 4}
    assert not report.ok


def test_truncated_tail_is_detected(engine: Engine, keyring: AuditKeyring) -> None:
    _append_n(engine, keyring, 5)
    _run(engine, delete(audit_events).where(audit_events.c.seq >= 4))
    report = verify_chain(engine, keyring)
    assert report.kinds == {"truncated"} and report.seqs("truncated") == {4}


def test_truncation_with_rewound_head_is_detected(engine: Engine, keyring: AuditKeyring) -> None:
    _append_n(engine, keyring, 5)
    third = _row(engine, 3)
    _run(
        engine,
        delete(audit_events).where(audit_events.c.seq >= 4),
        update(audit_head).values(seq=3, hash=third["hash"]),
    )
    assert verify_chain(engine, keyring).kinds == {"forged_head"}


def test_rewritten_chain_without_the_key_is_detected(engine: Engine, keyring: AuditKeyring) -> None:
    """An attacker who edits an event and recomputes every later hash still can't sign the head."""
    _append_n(engine, keyring, 5)
    prev = _row(engine, 2)["hash"]
    statements = []
    for seq in range(3, 6):
        row = _row(engine, seq)
        row["prev_hash"] = prev
        if seq == 3:
            row["public_json"] = '{"rows_changed":0,"step":2}'
        row["hash"] = prev = event_hash(row)
        statements.append(update(audit_events).where(audit_events.c.seq == seq).values(**row))
    _run(engine, *statements, update(audit_head).values(hash=prev))
    report = verify_chain(engine, keyring)
    assert report.kinds == {"forged_head"}


def test_injected_and_headless_chains_are_detected(engine: Engine, keyring: AuditKeyring) -> None:
    _append_n(engine, keyring, 2)
    extra = _row(engine, 2) | {"seq": 3, "event_id": "00000000-0000-0000-0000-000000000003"}
    _run(engine, audit_events.insert().values(**extra))
    assert verify_chain(engine, keyring).seqs("injected") == {3}

    _run(engine, delete(audit_head))
    assert "head_missing" in verify_chain(engine, keyring).kinds
    with pytest.raises(AuditChainBroken, match="head row is missing"):
        append_event(engine, keyring, "ex-1", "commit", "alice", {})


# --- keys ------------------------------------------------------------------------------------


def test_key_rotation_keeps_old_events_readable(engine: Engine) -> None:
    _append_n(engine, AuditKeyring.parse(K1), 2)
    rotated = AuditKeyring.parse(f"{K2},{K1}")
    _append_n(engine, rotated, 2)

    events = read_events(engine, rotated)
    assert [e["key_id"] for e in events] == ["k1", "k1", "k2", "k2"]
    assert all(e["readable"] and e["secret"]["sample"][0]["lot"] == SAMPLE for e in events)
    assert verify_chain(engine, rotated).ok


def test_missing_key_is_reported_not_raised(engine: Engine) -> None:
    _append_n(engine, AuditKeyring.parse(K1), 2)
    _append_n(engine, AuditKeyring.parse(f"{K2},{K1}"), 1)

    only_new = AuditKeyring.parse(K2)
    events = read_events(engine, only_new)
    assert [e["readable"] for e in events] == [False, False, True]
    assert "'k1' is not in the keyring" in events[0]["error"]
    assert events[0]["public"] == {"step": 0, "rows_changed": 0}
    assert verify_chain(engine, only_new).ok  # the head is signed with k2

    report = verify_chain(engine, AuditKeyring.parse(K1))
    assert report.kinds == {"unverifiable"}


def test_no_key_configured(engine: Engine) -> None:
    with pytest.raises(AuditKeyMissing, match="no audit key configured"):
        append_event(engine, AuditKeyring(), "ex-1", "started", "alice", {})
    audit = AuditLog()
    assert audit.has_key is False and audit.active is False
    with pytest.raises(AuditKeyMissing):
        audit.append(engine, "ex-1", "started", "alice", {})
    assert AuditLog(enabled=False).append(engine, "ex-1", "started", "alice", {}) is None
    assert read_events(engine, AuditKeyring()) == []


def test_key_config_errors_never_show_key_material(tmp_path: Path) -> None:
    material = K1.split(":", 1)[1]
    with pytest.raises(AuditConfigError) as err:
        AuditKeyring.parse(f"k1:{material[:-4]}")
    assert material[:-4] not in str(err.value)
    with pytest.raises(AuditConfigError, match="listed twice"):
        AuditKeyring.parse(f"{K1},{K1}")
    with pytest.raises(AuditConfigError, match="does not exist"):
        AuditLog(key_file=str(tmp_path / "nope")).keyring()

    key_file = tmp_path / "audit.keys"
    key_file.write_text(f"# newest first\n{K2}\n\n{K1}\n")
    audit = AuditLog(key_file=str(key_file))
    assert audit.keyring().key_ids == ["k2", "k1"]
    assert material not in repr(audit.keyring())
    assert material not in repr(AuditLog(audit_keys=K1))


def test_resource_in_a_dagster_job(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STOCKRX_AUDIT_KEYS", f"{K2},{K1}")

    @dg.op
    def record(audit: AuditLog) -> int | None:
        eng = get_engine(sqlite_url)
        audit.ensure_tables(eng)
        with eng.begin() as conn:
            seq = audit.append(conn, "ex-1", "plan", "release-bot", {"targets": 3}, {"ids": [1]})
        assert audit.verify(eng).ok
        eng.dispose()
        return seq

    @dg.job(resource_defs={"audit": AuditLog(audit_keys=dg.EnvVar("STOCKRX_AUDIT_KEYS"))})
    def audited() -> None:
        record()

    result = audited.execute_in_process()
    assert result.success and result.output_for_node("record") == 1


# --- retention -------------------------------------------------------------------------------


# A fixed clock (microseconds included: they must survive the round trip on every backend).
OLD_AT = datetime(2024, 5, 1, 9, 30, 0, 123456, tzinfo=UTC)
CUTOFF = OLD_AT + timedelta(microseconds=1)
NEW_AT = CUTOFF + timedelta(microseconds=1)
PURGED_AT = NEW_AT + timedelta(hours=1)


def _old_and_new(engine: Engine, keyring: AuditKeyring) -> datetime:
    """4 events ("ex-old") just before the cutoff it returns, 3 ("ex-new") just after."""
    _append_n(engine, keyring, 4, "ex-old", at=OLD_AT)
    _append_n(engine, keyring, 3, "ex-new", at=NEW_AT)
    return CUTOFF


def test_events_are_dated_by_the_clock(engine: Engine, keyring: AuditKeyring) -> None:
    _old_and_new(engine, keyring)
    dates = {e["execution_id"]: e["occurred_at"] for e in read_events(engine, keyring)}
    assert dates == {"ex-old": OLD_AT, "ex-new": NEW_AT}
    assert verify_chain(engine, keyring).ok


def test_purge_keeps_the_rest_verifiable(engine: Engine, keyring: AuditKeyring) -> None:
    cutoff = _old_and_new(engine, keyring)
    report = purge_events(engine, keyring, cutoff, clock=lambda: PURGED_AT)
    assert (report.purged_count, report.through_seq, report.checkpoint_written) == (4, 4, True)

    assert read_events(engine, keyring, "ex-old") == []
    assert [e["seq"] for e in read_events(engine, keyring, "ex-new")] == [5, 6, 7]
    purge_event = read_events(engine, keyring, "audit-retention")[0]
    assert purge_event["public"]["purged_count"] == 4
    assert purge_event["occurred_at"] == PURGED_AT
    with engine.connect() as conn:
        assert conn.execute(select(audit_checkpoints.c.created_at)).scalar_one() == PURGED_AT
    verified = verify_chain(engine, keyring)
    assert verified.ok, verified.problems
    assert verified.checkpoint_seq == 4

    again = purge_events(engine, keyring, cutoff)
    assert (again.purged_count, again.checkpoint_written) == (0, False)
    _append_n(engine, keyring, 1, "ex-new")
    assert verify_chain(engine, keyring).ok


def test_forged_or_deleted_checkpoint_is_detected(engine: Engine, keyring: AuditKeyring) -> None:
    purge_events(engine, keyring, _old_and_new(engine, keyring))
    _run(engine, update(audit_checkpoints).values(purged_count=1))
    assert verify_chain(engine, keyring).kinds == {"forged_checkpoint"}

    # A forger who deletes more events and moves the checkpoint forward can't sign it either.
    fifth = _row(engine, 5)
    _run(
        engine,
        update(audit_checkpoints).values(purged_count=4, through_seq=5, through_hash=fifth["hash"]),
        delete(audit_events).where(audit_events.c.seq == 5),
    )
    assert verify_chain(engine, keyring).kinds == {"forged_checkpoint"}

    _run(engine, delete(audit_checkpoints))
    report = verify_chain(engine, keyring)
    assert report.kinds == {"deleted"} and report.seqs("deleted") == {1}


def test_purge_refuses_a_broken_chain(engine: Engine, keyring: AuditKeyring) -> None:
    cutoff = _old_and_new(engine, keyring)
    _run(engine, delete(audit_events).where(audit_events.c.seq == 2))
    with pytest.raises(AuditChainBroken, match="seq 2: deleted") as err:
        purge_events(engine, keyring, cutoff)
    assert err.value.report is not None and not err.value.report.ok
    assert len(read_events(engine, keyring)) == 6


# --- concurrency -----------------------------------------------------------------------------


def _append_worker(url: str, keys: str, tag: str, n: int, start: Any) -> None:
    eng = get_engine(url)
    keyring = AuditKeyring.parse(keys)
    start.wait(30)
    for i in range(n):
        append_event(eng, keyring, f"ex-{tag}", "validation", tag, {"i": i}, {"row": i})
    eng.dispose()


@pytest.mark.slow
def test_two_processes_appending_make_one_chain(
    engine: Engine, keyring: AuditKeyring, database_url: str
) -> None:
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    workers = [
        ctx.Process(target=_append_worker, args=(database_url, K1, tag, 200, start))
        for tag in ("a", "b")
    ]
    for w in workers:
        w.start()
    start.set()
    for w in workers:
        w.join(240)
    assert [w.exitcode for w in workers] == [0, 0]

    report = verify_chain(engine, keyring)
    assert report.ok, report.problems[:5]
    assert report.checked == 400 and read_head(engine)[0] == 400
    events = read_events(engine, keyring)
    assert [e["seq"] for e in events] == list(range(1, 401))
    by_actor = {tag: [e["public"]["i"] for e in events if e["actor"] == tag] for tag in "ab"}
    assert by_actor == {"a": list(range(200)), "b": list(range(200))}


ORDINARY_KEYS = ("passed", "passes", "bypass", "compass", "passenger", "tokenizer", "keyword",
                 "monkey", "secretary", "rows_passed",
                 "skip_key", "primary_key", "keys", "api", "access_count")
SECRET_KEYS = ("password", "db_password", "DB_PASSWORD", "dbPassword", "passwd", "passphrase",
               "pwd", "secret", "client_secret", "token", "slack_token", "accessToken", "api_key",
               "api-key", "apiKey", "API_KEY", "private_key", "access_key", "credentials",
               "authorization", "cookie", "fernet_key", "smtp_password")


def test_redaction_matches_secret_names_not_parts_of_ordinary_words() -> None:
    # "passed" once matched pass(word)?: the validation result was stored as "***".
    scrubbed = scrub_secrets({k: "v" for k in (*ORDINARY_KEYS, *SECRET_KEYS)})
    assert {k: v for k, v in scrubbed.items() if k in ORDINARY_KEYS} == dict.fromkeys(
        ORDINARY_KEYS, "v"
    )
    assert {k: v for k, v in scrubbed.items() if k in SECRET_KEYS} == dict.fromkeys(
        SECRET_KEYS, "***"
    )
    assert scrub_secrets({"validation": {"passed": True, "problems": []}}) == {
        "validation": {"passed": True, "problems": []}
    }
