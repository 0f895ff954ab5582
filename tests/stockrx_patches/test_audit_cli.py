"""`stockrx-patches audit ...` on the trail of real patch runs: encryption at rest, tamper
detection, key rotation, retention purge."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet
from dagster import DagsterInstance
from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Engine

import patch_ops.audit.chain as audit_chain
from patch_ops.audit import AuditKeyring, audit_events, audit_head
from stockrx_patches.cli import main as cli_main
from tests.conftest import TEST_AUDIT_KEY
from tests.support.stockrx import (
    PRICE_JOB,
    failure_description,
    hand_built,
    latest_execution,
    run_patch,
)

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
USER_ID = 987654321  # a sample value: goes into the log rows the patch inserts, and its config
REAL = {
    "adjustment_type": "percentage",
    "adjustment_value": 8,
    "user_id": USER_ID,
    "dry_run": False,
    "launched_by": "release-bot",
}


def audit(url: str, *args: str) -> int:
    return cli_main(["audit", *args, "--database-url", url])


def patched(url: str, config: dict[str, Any] = REAL) -> str:
    """Dry run + real run of the price patch; the real execution's id."""
    result = run_patch(url, PRICE_JOB, config)
    assert result.success, failure_description(result)
    return str(latest_execution(hand_engine(url))["execution_id"])


def hand_engine(url: str) -> Engine:
    from patch_ops.database import get_engine

    return get_engine(url)


def raw_text(engine: Engine) -> str:
    with engine.connect() as conn:
        rows = conn.execute(select(audit_events)).all()
    return "\n".join(repr(tuple(r)) for r in rows)


def test_events_are_encrypted_at_rest_and_readable_with_the_key(database_url, capsys):
    engine = hand_built(database_url, [1234, 2000])
    real_id = patched(database_url)
    raw = raw_text(engine)
    assert raw.count(real_id) >= 6  # started, plan, backup, validation, commit, verified, ...
    note = "価格調整: 1234円 → 1333円"  # a row the patch inserted: in the encrypted report only
    for plain in (str(USER_ID), note, json.dumps(note)[1:-1]):
        assert plain not in raw

    assert audit(database_url, "show", real_id) == 0
    out = capsys.readouterr().out
    assert str(USER_ID) in out and note in out  # decrypted for the key holder
    for kind in (
        "started",
        "plan_approved",
        "plan",
        "backup_taken",
        "validation",
        "commit",
        "verified",
        "notification",
    ):
        assert f"  {kind}  by release-bot" in out
    assert audit(database_url, "show", real_id, "--json") == 0
    events = json.loads(capsys.readouterr().out)
    started = [e for e in events if e["event_type"] == "started"][0]
    assert started["secret"]["config"]["user_id"] == USER_ID
    assert started["public"]["launched_by"] == "release-bot"
    assert audit(database_url, "show", "no-such-execution") == 1


def _snapshot(engine: Engine) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(select(audit_events).order_by("seq"))]
        head = dict(conn.execute(select(audit_head)).one()._mapping)
    return rows, head


def _restore(engine: Engine, snap: tuple[list[dict[str, Any]], dict[str, Any]]) -> None:
    rows, head = snap
    with engine.begin() as conn:
        conn.execute(delete(audit_events))
        conn.execute(insert(audit_events), rows)
        conn.execute(update(audit_head).values(**head))


def _tamper(engine: Engine, kind: str, rows: list[dict[str, Any]]) -> None:
    with engine.begin() as conn:
        if kind == "edited":  # "validation passed" where it did not, say
            row = rows[3]
            conn.execute(
                update(audit_events)
                .where(audit_events.c.seq == row["seq"])
                .values(
                    public_json=row["public_json"]
                    .replace("release-bot", "someone-else")
                    .replace('"patch"', '"patch "')
                )
            )
        elif kind == "deleted":
            conn.execute(delete(audit_events).where(audit_events.c.seq == rows[2]["seq"]))
        elif kind == "reordered":
            a, b = rows[2], rows[3]  # swap two events
            conn.execute(delete(audit_events).where(audit_events.c.seq.in_([a["seq"], b["seq"]])))
            conn.execute(insert(audit_events), [{**a, "seq": b["seq"]}, {**b, "seq": a["seq"]}])
        elif kind == "truncated":
            conn.execute(delete(audit_events).where(audit_events.c.seq >= rows[-2]["seq"]))


def test_tampering_is_found_by_audit_verify(database_url, capsys):
    engine = hand_built(database_url, [100, 200])
    patched(database_url)
    assert audit(database_url, "verify") == 0
    assert "audit chain OK" in capsys.readouterr().out
    snap = _snapshot(engine)
    rows = snap[0]
    expected = {
        "edited": f"seq {rows[3]['seq']}: edited",
        "deleted": f"seq {rows[2]['seq']}: deleted",
        "reordered": f"seq {rows[2]['seq']}: reordered",
        "truncated": f"seq {rows[-2]['seq']}: truncated",
    }
    for kind, line in expected.items():
        _tamper(engine, kind, rows)
        assert audit(database_url, "verify") == 1, kind
        out = capsys.readouterr().out
        assert "audit chain BROKEN" in out and line in out, (kind, out)
        _restore(engine, snap)
        assert audit(database_url, "verify") == 0, kind
        capsys.readouterr()

    _tamper(engine, "edited", rows)  # and through the installed command
    run = subprocess.run(
        [str(BIN / "stockrx-patches"), "audit", "verify", "--database-url", database_url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1 and expected["edited"] in run.stdout


def test_key_rotation_through_the_cli(sqlite_url, monkeypatch, capsys, tmp_path):
    old_id, old_key = TEST_AUDIT_KEY.split(":", 1)
    engine = hand_built(sqlite_url, [100, 200])
    first = patched(sqlite_url)

    assert cli_main(["audit", "new-key", "k2"]) == 0
    new_entry = capsys.readouterr().out.strip()
    assert re.fullmatch(r"k2:[A-Za-z0-9_-]{43}=", new_entry)
    monkeypatch.setenv("STOCKRX_AUDIT_KEYS", f"{new_entry},{TEST_AUDIT_KEY}")
    second = patched(sqlite_url, {**REAL, "adjustment_value": 1})
    with engine.connect() as conn:
        key_ids = dict(
            conn.execute(
                select(audit_events.c.execution_id, audit_events.c.key_id).where(
                    audit_events.c.key_id.is_not(None)
                )
            ).all()
        )
    assert (key_ids[first], key_ids[second]) == (old_id, "k2")

    for execution_id in (first, second):  # old events stay readable after the rotation
        assert audit(sqlite_url, "show", execution_id) == 0
        assert "NOT READABLE" not in capsys.readouterr().out
    assert audit(sqlite_url, "verify") == 0

    monkeypatch.setenv("STOCKRX_AUDIT_KEYS", new_entry)  # the old key dropped too early
    assert audit(sqlite_url, "show", first) == 3
    captured = capsys.readouterr()
    assert f"NOT READABLE: audit key '{old_id}' is not in the keyring" in captured.out
    assert "keep old keys after the new one" in captured.err
    assert audit(sqlite_url, "verify") == 0  # hashes need no key; the head is signed with k2

    monkeypatch.setenv("STOCKRX_AUDIT_KEYS", TEST_AUDIT_KEY)  # only the old key
    assert audit(sqlite_url, "verify") == 1
    assert "unverifiable: head is signed with key 'k2'" in capsys.readouterr().out

    key_file = tmp_path / "audit.keys"  # keys from a file (outside the repository)
    key_file.write_text(f"# newest first\n{new_entry}\n{TEST_AUDIT_KEY}\n")
    monkeypatch.delenv("STOCKRX_AUDIT_KEYS")
    monkeypatch.setenv("STOCKRX_AUDIT_KEY_FILE", str(key_file))
    assert audit(sqlite_url, "show", first) == 0
    assert audit(sqlite_url, "verify") == 0
    capsys.readouterr()
    inside = REPO / "config" / "audit.keys"
    assert audit(sqlite_url, "verify", "--key-file", str(inside)) == 1
    assert "is inside the repository" in capsys.readouterr().err
    assert not inside.exists()


def test_new_key_prints_a_usable_line(capsys):
    assert cli_main(["audit", "new-key"]) == 0
    first = capsys.readouterr().out.strip()
    key_id, key = first.split(":", 1)
    assert re.fullmatch(r"k\d{14}", key_id)
    Fernet(key)  # a valid key
    assert AuditKeyring.parse(first).key_ids == [key_id]
    assert cli_main(["audit", "new-key", "k2"]) == 0
    assert capsys.readouterr().out.split(":", 1)[1] != key
    assert cli_main(["audit", "new-key", "bad key!"]) == 1
    run = subprocess.run(
        [str(BIN / "stockrx-patches"), "audit", "new-key", "demo"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0 and re.fullmatch(r"demo:[A-Za-z0-9_-]{43}=\n", run.stdout)


def hundred_days_ago() -> dt.datetime:
    """The audit trail's clock, set back 100 days."""
    return dt.datetime.now(dt.UTC) - dt.timedelta(days=100)


def _event_count(engine: Engine, *execution_ids: str) -> int:
    with engine.connect() as conn:
        return len(
            conn.execute(
                select(audit_events.c.seq).where(audit_events.c.execution_id.in_(execution_ids))
            ).all()
        )


def test_retention_purge_keeps_the_chain_verifiable(database_url, monkeypatch, capsys):
    from patch_ops.state import executions

    engine = hand_built(database_url, [100, 200])
    with monkeypatch.context() as m:  # a dry run + real run 100 days ago (as the trail sees it)
        m.setattr(audit_chain, "utc_now", hundred_days_ago)
        old = patched(database_url)
    new = patched(database_url, {**REAL, "adjustment_value": 1})
    with engine.connect() as conn:
        old_dry = conn.execute(
            select(executions.c.approved_by_execution_id).where(executions.c.execution_id == old)
        ).scalar_one()
    n_old = _event_count(engine, old, old_dry)
    assert n_old >= 8

    assert audit(database_url, "purge", "--older-than-days", "90", "--dry-run") == 0
    assert f"would purge {n_old:,} event(s) older than 90 days" in capsys.readouterr().out
    assert _event_count(engine, old) > 0

    snap = _snapshot(engine)
    _tamper(engine, "edited", snap[0])  # a broken chain is never purged: it is the evidence
    assert audit(database_url, "purge") == 1
    assert "purge refused" in capsys.readouterr().err
    _restore(engine, snap)

    assert audit(database_url, "purge") == 0  # default: security.audit_retention_days (90)
    out = capsys.readouterr().out
    assert f"purged {n_old:,} event(s) older than 90 days" in out and "chain verifies" in out
    assert audit(database_url, "verify") == 0
    assert f"purged through seq {n_old}" in capsys.readouterr().out
    assert audit(database_url, "show", old) == 1  # gone
    assert audit(database_url, "show", new) == 0  # kept, readable
    assert audit(database_url, "show", "audit-retention") == 0  # the purge is an event too
    capsys.readouterr()
    assert audit(database_url, "purge", "--older-than-days", "90") == 0
    assert "purged 0 event(s)" in capsys.readouterr().out
    assert audit(database_url, "verify") == 0
    assert audit(database_url, "purge", "--older-than-days", "0") == 1


# --- anchors outside the database ------------------------------------------------------------


def erase(engine: Engine, history_too: bool) -> None:
    """What the StockRx database's own user can do without the key: delete every event, reset
    the head to the unsigned genesis (and delete the history rows as well)."""
    with engine.begin() as conn:
        conn.execute(delete(audit_events))
        conn.execute(update(audit_head).values(seq=0, hash="0" * 64, key_id=None, mac=None))
        if history_too:
            conn.exec_driver_sql("DELETE FROM data_patch_executions")


def test_an_erased_trail_is_caught_by_the_history_and_the_anchors_outside(
    sqlite_url, dagster_home, tmp_path, monkeypatch, capsys
):
    anchors = tmp_path / "audit-anchors.log"
    monkeypatch.setenv("STOCKRX_AUDIT_ANCHOR_FILE", str(anchors))
    instance = DagsterInstance.get()
    engine = hand_built(sqlite_url, [100, 200])
    result = run_patch(sqlite_url, PRICE_JOB, REAL, instance=instance)
    assert result.success, failure_description(result)
    assert audit(sqlite_url, "verify") == 0
    head = int(anchors.read_text().splitlines()[-1].split('"seq": ')[1].split(",")[0])
    assert head > 0
    capsys.readouterr()

    erase(engine, history_too=False)  # "chain OK: 0 event(s)" before the anchors
    monkeypatch.delenv("STOCKRX_AUDIT_ANCHOR_FILE")
    monkeypatch.delenv("DAGSTER_HOME")
    assert audit(sqlite_url, "verify") == 1  # the history alone: real executions, no events
    assert "missing_events" in capsys.readouterr().out

    erase(engine, history_too=True)  # the history gone too: only the anchors outside remain
    assert audit(sqlite_url, "verify", "--anchor-file", str(anchors)) == 1
    out = capsys.readouterr().out
    assert "erased" in out and f"reached seq {head}" in out
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))  # the Dagster run tags alone
    assert audit(sqlite_url, "verify") == 1
    assert "Dagster run tag says the chain reached seq" in capsys.readouterr().out
