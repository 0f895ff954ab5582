"""Security: the audit key is required (or explicitly opted out of), secrets stay out of every
record, and hostile run config is rejected or inert."""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import subprocess
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterInstance, DagsterInvalidConfigError, serialize_value
from sqlalchemy import inspect, select, text
from sqlalchemy.engine import make_url

from patch_ops.audit import AuditKeyring, audit_events, read_events
from patch_ops.database import get_engine
from patch_ops.lifecycle import AUDIT
from patch_ops.patch import PatchRunConfig
from patch_ops.state import executions
from resources.audit import AuditLog
from stockrx_patches.cli import main as cli_main
from stockrx_patches.definitions import build_definitions
from stockrx_patches.registry import Registry, default_registry
from stockrx_patches.tables import STOCKRX_TABLES
from tests.conftest import TEST_AUDIT_KEY
from tests.support.fake_slack import FakeSlack
from tests.support.fake_smtp import FakeSmtp
from tests.support.stockrx import (
    PRICE_JOB,
    digest,
    failure_description,
    hand_built,
    latest_execution,
    prices,
    run_patch,
    seeded,
)

REPO = Path(__file__).resolve().parents[2]
PCT8 = {"adjustment_type": "percentage", "adjustment_value": 8}


def _logs(instance: DagsterInstance, run_id: str) -> list[str]:
    return [e.user_message for e in instance.all_logs(run_id)]


# ---------------------------------------------------------------------------------------------
# The audit key
# ---------------------------------------------------------------------------------------------


def test_without_a_key_dry_runs_run_and_real_runs_refuse(sqlite_url, monkeypatch):
    monkeypatch.delenv("STOCKRX_AUDIT_KEYS", raising=False)
    monkeypatch.delenv("STOCKRX_AUDIT_KEY_FILE", raising=False)
    defs = build_definitions(default_registry(), resources={AUDIT: AuditLog()})
    engine = hand_built(sqlite_url, [100, 200])
    before = digest(engine)
    instance = DagsterInstance.ephemeral()

    dry = run_patch(sqlite_url, PRICE_JOB, PCT8, defs=defs, instance=instance)
    assert dry.success
    assert any("audit trail is off for this run" in m for m in _logs(instance, dry.run_id))

    real = run_patch(
        sqlite_url, PRICE_JOB, {**PCT8, "dry_run": False}, defs=defs, instance=instance
    )  # after its dry run: only the key is missing
    assert not real.success
    desc = failure_description(real)
    assert "refused before any write: no audit key configured" in desc
    assert "STOCKRX_AUDIT_KEYS" in desc
    assert digest(engine) == before
    assert "no audit key configured" in latest_execution(engine)["error_message"]
    assert not inspect(engine).has_table(audit_events.name)  # nothing written without a key


def test_a_key_file_inside_the_repository_is_refused_by_the_job(sqlite_url, monkeypatch):
    """The rule held only in the audit CLI: the job accepted var/inrepo.key and committed."""
    key = REPO / "var" / f"inrepo-{secrets.token_hex(4)}.key"  # var/ is gitignored
    key.parent.mkdir(exist_ok=True)
    key.write_text(TEST_AUDIT_KEY + "\n")
    try:
        monkeypatch.delenv("STOCKRX_AUDIT_KEYS", raising=False)
        monkeypatch.setenv("STOCKRX_AUDIT_KEY_FILE", str(key))
        engine = hand_built(sqlite_url, [100, 200])
        before = digest(engine)
        result = run_patch(sqlite_url, PRICE_JOB, {**PCT8, "dry_run": False})
        assert not result.success
        assert "is inside the repository" in failure_description(result)
        assert digest(engine) == before
    finally:
        key.unlink()


def test_log_encryption_false_is_the_explicit_opt_out(sqlite_url, monkeypatch, capsys):
    monkeypatch.delenv("STOCKRX_AUDIT_KEYS", raising=False)
    base = default_registry()
    config = dataclasses.replace(
        base.config, security={**base.config.security, "log_encryption": False}
    )
    defs = build_definitions(Registry(base.patches, config))  # as from data_patches.yml
    engine = hand_built(sqlite_url, [100, 200])
    instance = DagsterInstance.ephemeral()
    result = run_patch(
        sqlite_url, PRICE_JOB, {**PCT8, "dry_run": False}, defs=defs, instance=instance
    )
    assert result.success, failure_description(result)
    assert prices(engine) == {1: 108, 2: 216}
    assert any("audit trail is off for this run" in m for m in _logs(instance, result.run_id))
    assert not inspect(engine).has_table(audit_events.name)
    assert cli_main(["audit", "verify", "--database-url", sqlite_url]) == 1
    assert "audit trail MISSING" in capsys.readouterr().out


def test_no_key_material_in_the_repository():
    """Keys come from the environment or a key file outside the tree, never from the repo."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    fernet = re.compile(rb"[A-Za-z0-9_-]{43}=")
    found = []
    for name in files:
        path = REPO / name
        if path.is_file() and path.stat().st_size < 2_000_000 and ".venv" not in path.parts:
            if fernet.search(path.read_bytes()):
                found.append(name)
    assert found == []
    assert "audit_keys" not in (REPO / "config" / "data_patches.yml").read_text()


# ---------------------------------------------------------------------------------------------
# Secrets never recorded
# ---------------------------------------------------------------------------------------------

DB_PASSWORD = "Db-Pa55w0rd-q7Zx3"
SLACK_TOKEN = "xoxb-SECRET-slack-9f8e7d6c"
SMTP_PASSWORD = "Smtp-Pa55-k3y-Wq1"


def _text_of_instance(instance: DagsterInstance, run_id: str) -> str:
    ser = serialize_value
    run = instance.get_run_by_id(run_id)
    assert run is not None
    parts = [ser(r) for r in instance.all_logs(run_id)]
    parts += [json.dumps(run.run_config, default=str), json.dumps(dict(run.tags))]
    parts.append(ser(instance.get_job_snapshot(run.job_snapshot_id)))
    if run.execution_plan_snapshot_id:
        parts.append(ser(instance.get_execution_plan_snapshot(run.execution_plan_snapshot_id)))
    return "\n".join(parts)


def _failures(result) -> list[str]:  # type: ignore[no-untyped-def]
    out = []
    for event in result.all_events:
        if event.is_step_failure:
            data = event.step_failure_data
            if data.user_failure_data is not None:
                out.append(str(data.user_failure_data.description))
                out.append(repr(data.user_failure_data.metadata))
            err = data.error
            while err is not None:
                out.append(err.message + "".join(err.stack))
                err = err.cause
    return out


def test_no_secret_is_recorded_anywhere(pg_url, dagster_home, monkeypatch, capfd):
    url = make_url(pg_url).set(password=DB_PASSWORD).render_as_string(hide_password=False)
    audit_entry = AuditKeyring.new_entry("sec")
    audit_key = audit_entry.split(":", 1)[1]
    secrets = {
        "database password": DB_PASSWORD,
        "slack token": SLACK_TOKEN,
        "smtp password": SMTP_PASSWORD,
        "audit key": audit_key,
    }
    engine = seeded(url, items=60)
    with FakeSlack(token=SLACK_TOKEN) as slack, FakeSmtp("stockrx", SMTP_PASSWORD) as smtp:
        for name, value in {
            "STOCKRX_AUDIT_KEYS": audit_entry,
            "STOCKRX_SLACK_TOKEN": SLACK_TOKEN,
            "STOCKRX_SLACK_BASE_URL": slack.base_url,
            "STOCKRX_SMTP_HOST": "127.0.0.1",
            "STOCKRX_SMTP_PORT": str(smtp.port),
            "STOCKRX_SMTP_USERNAME": "stockrx",
            "STOCKRX_SMTP_PASSWORD": SMTP_PASSWORD,
            "STOCKRX_SMTP_RECIPIENTS": "ops@example.com",
            "STOCKRX_SMTP_SECURITY": "none",
        }.items():
            monkeypatch.setenv(name, value)
        defs = build_definitions(default_registry())  # resources from the environment
        instance = DagsterInstance.get()
        run_ids = []
        results = []

        def launch(config: dict[str, Any], db_url: str = url, **kw: Any):  # type: ignore[no-untyped-def]
            before = {r.run_id for r in instance.get_runs()}
            result = run_patch(db_url, PRICE_JOB, config, defs=defs, instance=instance, **kw)
            run_ids.extend(r.run_id for r in instance.get_runs() if r.run_id not in before)
            results.append(result)
            return result

        assert launch({**PCT8, "dry_run": False}).success  # dry run, then real run
        refused = launch({**PCT8, "adjustment_value": 9, "dry_run": False}, approve=False)
        assert not refused.success  # no approved dry run: a refusal with its reasons
        closed_port = make_url(url).set(port=1).render_as_string(hide_password=False)
        unreachable = launch({**PCT8, "dry_run": False}, db_url=closed_port)
        assert "cannot connect" in failure_description(unreachable)

        assert len(slack.messages) >= 2 and len(smtp.messages) >= 2  # secrets were in use
        assert smtp.logins and smtp.logins[0] == "stockrx"

    places: dict[str, str] = {}
    for run_id in run_ids:
        places[f"dagster run {run_id} (logs, events, run config, tags, snapshots)"] = (
            _text_of_instance(instance, run_id)
        )
    places["failures raised"] = "\n".join(m for r in results for m in _failures(r))
    files = [p for p in Path(dagster_home).rglob("*") if p.is_file()]
    places["DAGSTER_HOME files"] = "\n".join(
        p.read_bytes().decode("utf-8", "replace") for p in files
    )
    with engine.connect() as conn:
        for table in inspect(engine).get_table_names():
            if table.startswith("data_patch_"):
                rows = conn.execute(text(f'SELECT * FROM "{table}"')).all()
                places[f"table {table}"] = "\n".join(repr(tuple(r)) for r in rows)
        history = conn.execute(select(executions)).mappings().all()
    places["execution history"] = json.dumps([dict(r) for r in history], default=str)
    keyring = AuditKeyring.parse(audit_entry)
    events = read_events(engine, keyring)
    assert events and all(e["readable"] for e in events)
    places["audit trail public parts"] = json.dumps([e["public"] for e in events])
    places["audit trail decrypted parts"] = json.dumps([e["secret"] for e in events], default=str)
    captured = capfd.readouterr()
    places["console output"] = captured.out + captured.err

    assert len(run_ids) == 4  # dry + real, the refused real run, the dry run that can't connect
    assert all(PRICE_JOB in places[k] for k in places if k.startswith("dagster run"))
    leaks = [
        f"{secret} in {place}"
        for place, content in places.items()
        for secret, value in secrets.items()
        if value in content
    ]
    assert leaks == []
    assert sum(len(c) for c in places.values()) > 100_000  # the search had material


# ---------------------------------------------------------------------------------------------
# Hostile run config
# ---------------------------------------------------------------------------------------------

STRINGS = [
    "'; DROP TABLE inventories; --",
    "1 OR 1=1",
    "2026-01-01' OR '1'='1",
    "’; DELETE FROM inventories WHERE ’1’=’1",  # unicode quotes
    "＇ OR ＇1＇=＇1",  # fullwidth quotes
    "x\x00y; DROP TABLE batches",
    'Robert"); DROP TABLE inventory_logs;--' * 200,
]
NUMBERS = [
    float("nan"),
    float("inf"),
    float("-inf"),
    1e308,
    -1e308,
    10**30,
    2**63,
    -(2**63) - 1,
    "1 OR 1=1",
    "'; DROP TABLE inventories; --",
]
# Words that identify a rejection with a reason (ours, or pydantic's naming the field).
CLEAR = re.compile(
    r"refused before any write|must be|out of range|NUL|longer than|not found|"
    r"no execution"
)


#: Run options that never reach SQL (Dagster's and pydantic's types, then Python): tried on SQLite.
RUN_OPTIONS = ("dry_run", "batch_size", "memory_limit_mb", "allow_outside_window", "allow_repeat")


def _fields() -> list[tuple[str, str]]:
    """Each patch's own fields, and the fields every patch shares (PatchRunConfig: one code path)
    once, on the first patch; without the run options."""
    reg = default_registry()
    shared = set(PatchRunConfig.model_fields)
    out = []
    for i, (name, patch) in enumerate(sorted(reg.patches.items())):
        out += [(name, f) for f in patch.config_class.model_fields
                if f not in RUN_OPTIONS and (f not in shared or i == 0)]
    return out


def _messages(result) -> str:  # type: ignore[no-untyped-def]
    return "\n".join(_failures(result))


@pytest.mark.parametrize(("patch_name", "field"), _fields(), ids=lambda v: v)
def test_hostile_config_is_rejected_or_inert(database_url, patch_name, field):
    _hostile_config(database_url, patch_name, field)


@pytest.mark.parametrize("field", RUN_OPTIONS)
def test_hostile_run_options_are_rejected_or_inert(sqlite_url, field):
    _hostile_config(sqlite_url, "inventory_price_adjustment", field)


def _hostile_config(database_url: str, patch_name: str, field: str) -> None:
    patch = default_registry().patches[patch_name]
    engine = seeded(database_url, items=40)
    before = digest(engine)
    annotation = str(patch.config_class.model_fields[field].annotation)
    attempts: list[Any] = STRINGS if "str" in annotation or "enum" in annotation else NUMBERS
    if "bool" in annotation:
        attempts = [*STRINGS[:2], 1, "true; DROP TABLE inventories"]
    outcomes = []
    for value in attempts:
        config = {**patch.example_config, field: value}
        if field != "dry_run":
            config["dry_run"] = True  # a hostile value must not even get a dry run to write
        try:
            result = run_patch(database_url, patch_name, config, approve=False)
        except DagsterInvalidConfigError:
            outcomes.append("typed config")  # rejected by Dagster before any op
            continue
        if result.success:
            ex = latest_execution(engine)
            assert ex["dry_run"] and ex["status"] == "completed"
            if field == "launched_by":  # stored verbatim: a bound parameter, not SQL
                assert ex["launched_by"] == value
            outcomes.append("inert")
        else:
            assert CLEAR.search(_messages(result)), (field, value, _messages(result)[:2000])
            outcomes.append("refused")
        assert digest(engine) == before, (field, value)
        assert set(STOCKRX_TABLES) <= set(inspect(engine).get_table_names())
    assert len(outcomes) == len(attempts)
    if not inspect(engine).has_table(executions.name):
        return  # every attempt was rejected before a run started
    with get_engine(database_url).connect() as conn:
        assert (
            conn.execute(
                select(executions.c.execution_id).where(
                    executions.c.dry_run.is_(False),
                    executions.c.phase.in_(["committed", "verified"]),
                )
            ).first()
            is None
        )
