"""Approve the plan: a real run needs a recent completed dry run with the same plan hash."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from dagster import DagsterInstance, Definitions
from sqlalchemy import insert, select, update

from patch_ops import approval
from patch_ops.audit import AuditKeyring, read_events
from patch_ops.database import get_engine
from patch_ops.dialects import base as dialect_base
from patch_ops.dialects import dialect_of
from patch_ops.execution import new_execution_id
from patch_ops.state import ensure_framework_tables, executions, targets
from stockrx_patches.cli import main as cli_main
from stockrx_patches.definitions import build_definitions
from stockrx_patches.patches.inventory_price_adjustment import (
    InventoryPriceAdjustment,
    PriceAdjustmentConfig,
)
from stockrx_patches.registry import (
    Registry,
    RegistryError,
    default_registry,
    load_project_config,
)
from stockrx_patches.tables import inventories
from tests.conftest import TEST_AUDIT_KEY, TEST_PYTHONPATH
from tests.support import slow_patches
from tests.support.stockrx import (
    PRICE_JOB,
    digest,
    failure_description,
    hand_built,
    latest_execution,
    prices,
    run_patch,
    starved_defs,
)

PCT8 = {"adjustment_type": "percentage", "adjustment_value": 8}
REAL = {**PCT8, "dry_run": False}
REPO = Path(__file__).resolve().parents[2]


def dry(url: str, config: dict, **kw) -> dict:  # type: ignore[type-arg]
    result = run_patch(url, PRICE_JOB, {**config, "dry_run": True}, approve=False, **kw)
    assert result.success, failure_description(result)
    return latest_execution(get_engine(url))


def real(url: str, config: dict, **kw):  # type: ignore[no-untyped-def, type-arg]
    return run_patch(url, PRICE_JOB, {**config, "dry_run": False}, approve=False, **kw)


def defs_with_settings(**changes: object) -> Definitions:
    """The real code location with the price patch's settings changed."""
    base = default_registry()
    settings = dict(base.config.patches)
    settings[PRICE_JOB] = dataclasses.replace(settings[PRICE_JOB], **changes)  # type: ignore[arg-type]
    config = dataclasses.replace(base.config, patches=settings)
    return build_definitions(Registry(base.patches, config))


def test_a_real_run_without_a_dry_run_is_refused_before_any_write(database_url):
    engine = hand_built(database_url, [100, 200, 300])
    before = digest(engine)
    result = real(database_url, PCT8)
    assert not result.success
    desc = failure_description(result)
    assert "refused before any write" in desc and "no approved dry run" in desc
    assert "has no completed dry run" in desc
    assert digest(engine) == before
    ex = latest_execution(engine)
    assert ex["status"] == "failed" and "no approved dry run" in ex["error_message"]
    assert ex["approved_by_execution_id"] is None


def test_a_matching_dry_run_approves_and_the_history_says_who(database_url, capsys):
    engine = hand_built(database_url, [100, 200, 300])
    old = prices(engine)
    dry_ex = dry(database_url, {**PCT8, "launched_by": "alice"})
    assert dry_ex["plan_hash"] and len(dry_ex["plan_hash"]) == 64
    assert dry_ex["plan"]["targets"]["inventories"]["count"] == 3
    assert set(dry_ex["plan"]["config"]) & set(approval.EXCLUDED_CONFIG) == set()

    instance = DagsterInstance.ephemeral()
    # Who launched it and how it is batched are not part of the plan.
    result = real(
        database_url,
        {**PCT8, "launched_by": "bob", "batch_size": 1, "memory_limit_mb": 2048},
        instance=instance,
    )
    assert result.success, failure_description(result)
    assert prices(engine) == {i: round(p * 1.08) for i, p in old.items()}
    real_ex = latest_execution(engine)
    assert real_ex["plan_hash"] == dry_ex["plan_hash"]
    assert real_ex["approved_by_execution_id"] == dry_ex["execution_id"]
    assert (dry_ex["launched_by"], real_ex["launched_by"]) == ("alice", "bob")
    assert real_ex["plan"]["approval"]["launched_by"] == "alice"
    # The database's own rules judged the changes in the dry run; the real run does not apply
    # everything twice (its commit is all-or-nothing anyway).
    assert dry_ex["report"]["validation"]["trial_apply"] == "passed"
    assert real_ex["report"]["validation"]["trial_apply"] == (
        f"skipped: approving dry run {dry_ex['execution_id']} passed it on the same plan"
    )
    logs = [e.user_message for e in instance.all_logs(result.run_id)]
    assert any(f"approved by dry run {dry_ex['execution_id']}" in m for m in logs)

    events = read_events(engine, AuditKeyring.parse(TEST_AUDIT_KEY), real_ex["execution_id"])
    approved = [e for e in events if e["event_type"] == "plan_approved"]
    assert approved[0]["public"]["approved_by_execution_id"] == dry_ex["execution_id"]
    assert approved[0]["public"]["approved_by"] == "alice" and approved[0]["actor"] == "bob"

    assert cli_main(["report", real_ex["execution_id"], "--database-url", database_url]) == 0
    out = capsys.readouterr().out
    assert f"plan hash: {dry_ex['plan_hash']}; launched by bob" in out
    assert f"approved by dry run {dry_ex['execution_id']} (launched by alice)" in out


def test_a_stale_dry_run_is_refused_and_plan_valid_hours_is_per_patch(sqlite_url):
    engine = hand_built(sqlite_url, [100, 200])
    dry_ex = dry(sqlite_url, PCT8)
    with engine.begin() as conn:
        conn.execute(
            update(executions)
            .where(executions.c.execution_id == dry_ex["execution_id"])
            .values(completed_at=dry_ex["completed_at"] - dt.timedelta(hours=25))
        )
    before = digest(engine)
    result = real(sqlite_url, PCT8)
    assert not result.success
    desc = failure_description(result)
    assert f"dry run {dry_ex['execution_id']} of this plan completed" in desc
    assert "25.0 hours ago" in desc and "valid for 24 hours (plan_valid_hours)" in desc
    assert digest(engine) == before

    result = real(sqlite_url, PCT8, defs=defs_with_settings(plan_valid_hours=48))
    assert result.success, failure_description(result)
    assert latest_execution(engine)["approved_by_execution_id"] == dry_ex["execution_id"]


def test_a_different_config_is_refused_and_the_difference_named(sqlite_url):
    engine = hand_built(sqlite_url, [100, 200])
    dry(sqlite_url, PCT8)
    before = digest(engine)
    result = real(sqlite_url, {**PCT8, "adjustment_value": 9, "user_id": 7})
    assert not result.success
    desc = failure_description(result)
    assert "planned something else" in desc
    assert "adjustment_value (8.0 → 9.0)" in desc and "user_id (null → 7)" in desc
    assert "target set" not in desc  # same rows selected
    assert digest(engine) == before


def test_a_changed_target_set_is_refused(database_url):
    engine = hand_built(database_url, [100, 200, 300])
    cfg = {**PCT8, "min_price": 150}
    dry(database_url, cfg)  # items 2 and 3
    with engine.begin() as conn:  # the application raises item 1 into the selection
        conn.execute(update(inventories).where(inventories.c.id == 1).values(price=500))
    before = digest(engine)
    result = real(database_url, cfg)
    assert not result.success
    assert "target set of inventories differs (2 → 3 rows)" in failure_description(result)
    assert digest(engine) == before

    with engine.begin() as conn:  # same size, other rows: {1, 3}
        conn.execute(update(inventories).where(inventories.c.id == 2).values(price=100))
    before = digest(engine)
    result = real(database_url, cfg)
    assert not result.success
    assert "target set of inventories differs (same size 2, other ids)" in failure_description(
        result
    )
    assert digest(engine) == before

    again = dry(database_url, cfg)  # a new dry run of what is there now approves it
    assert real(database_url, cfg).success
    assert latest_execution(engine)["approved_by_execution_id"] == again["execution_id"]
    assert prices(engine) == {1: 540, 2: 100, 3: 324}


@pytest.mark.postgres
def test_a_rule_added_after_the_dry_run_is_a_new_plan_and_changes_nothing(pg_url):
    engine = hand_built(pg_url, [100, 200, 300])
    dry(pg_url, PCT8)  # the trial apply passes: no rule against +8 % yet
    with engine.begin() as conn:  # the application adds one before the real run
        conn.exec_driver_sql("ALTER TABLE inventories ADD CONSTRAINT chk_price_cap CHECK (price <= 300)")
    before = digest(engine)
    result = real(pg_url, PCT8)  # the schema is part of the plan: refused before any write
    assert not result.success
    desc = failure_description(result)
    assert "refused before any write" in desc
    changed = "the schema of inventories changed since approval (check constraint chk_price_cap"
    assert f"{changed} added)" in desc, desc
    assert digest(engine) == before
    ex = latest_execution(engine)
    assert ex["status"] == "failed" and "chk_price_cap" in ex["error_message"]


def test_an_approval_is_good_for_one_commit(sqlite_url):
    engine = hand_built(sqlite_url, [100, 200])
    dry_ex = dry(sqlite_url, PCT8)
    # a real run that fails before commit does not use the approval up
    failed = real(sqlite_url, PCT8, defs=starved_defs())
    assert not failed.success and "machine memory nearly exhausted" in failure_description(failed)
    assert real(sqlite_url, PCT8).success
    assert prices(engine) == {1: 108, 2: 216}
    result = real(sqlite_url, PCT8)  # the same +8 % again, on the same dry run
    assert not result.success
    assert f"dry run {dry_ex['execution_id']} already approved real run" in failure_description(
        result
    )
    assert prices(engine) == {1: 108, 2: 216}


def test_changed_patch_code_is_a_new_plan(sqlite_url, monkeypatch):
    engine = hand_built(sqlite_url, [100])
    dry(sqlite_url, PCT8)
    monkeypatch.setattr(approval, "code_version", lambda patch: "0" * 64)
    before = digest(engine)
    result = real(sqlite_url, PCT8)
    assert not result.success
    assert "the patch's code changed since" in failure_description(result)
    assert digest(engine) == before


def test_the_gate_can_be_switched_off_per_patch(sqlite_url):
    engine = hand_built(sqlite_url, [100])
    result = real(sqlite_url, PCT8, defs=defs_with_settings(require_approved_plan=False))
    assert result.success, failure_description(result)
    ex = latest_execution(engine)
    assert ex["plan_hash"] and ex["approved_by_execution_id"] is None
    events = read_events(engine, AuditKeyring.parse(TEST_AUDIT_KEY), ex["execution_id"])
    plan_events = [e["public"] for e in events if e["event_type"] == "plan_hash"]
    assert plan_events[0]["approval"] == "not required"


def test_plan_hash_parts(sqlite_url, monkeypatch):
    cfg = PriceAdjustmentConfig(adjustment_type="percentage", adjustment_value=8)
    same = PriceAdjustmentConfig(
        adjustment_type="percentage",
        adjustment_value=8.0,
        batch_size=5,
        launched_by="x",
        memory_limit_mb=9,
        dry_run=False,
    )
    assert approval.normalized_config(cfg) == approval.normalized_config(same)
    assert approval.normalized_config(cfg)["adjustment_type"] == "percentage"

    price, subclass = InventoryPriceAdjustment(), slow_patches.SlowPricePatch()
    assert approval.code_version(price) == approval.code_version(InventoryPriceAdjustment())
    assert approval.code_version(price) != approval.code_version(subclass)

    engine = get_engine(sqlite_url)
    ensure_framework_tables(engine)
    ids = [17, 3, 2**40, 5, 1, 99, 8]
    with engine.begin() as conn:
        conn.execute(
            insert(targets),
            [
                {"execution_id": e, "table_name": "inventories", "row_id": i}
                for e in ("a", "b")
                for i in ids
            ]
            + [{"execution_id": "c", "table_name": "inventories", "row_id": i} for i in ids[:-1]],
        )
        whole = approval.target_digest(conn, "a", "inventories")
        monkeypatch.setattr(approval, "PAGE", 2)  # read in pages of 2: same digest
        paged = approval.target_digest(conn, "b", "inventories")
        fewer = approval.target_digest(conn, "c", "inventories")
        other_table = approval.target_digest(conn, "a", "batches")
    assert whole == paged and whole["count"] == 7
    assert fewer["sha256"] != whole["sha256"] and other_table["count"] == 0


def test_the_target_digest_hashes_the_same_bytes_on_every_database(database_url, monkeypatch):
    """Packed by the database a page at a time (PostgreSQL, MariaDB) or read in pages here, the
    digest is the SHA-256 of the table name, a NUL and the ids as 8-byte big-endian integers in
    ascending order, byte for byte, so a plan hashed either way approves the same real run."""
    engine = get_engine(database_url)
    ensure_framework_tables(engine)
    ids = [17, 3, 2**40, -5, 0, 2**63 - 1, -(2**63), 99, 8]
    x = new_execution_id()  # a uuid key on PostgreSQL
    with engine.begin() as conn:
        conn.execute(insert(targets), [
            {"execution_id": x, "table_name": "inventories", "row_id": i} for i in ids
        ])
        got = approval.target_digest(conn, x, "inventories")
        none = approval.target_digest(conn, x, "batches")
        monkeypatch.setattr(approval, "PAGE", 2)  # read in pages of 2 (SQLite)
        monkeypatch.setattr(dialect_base, "ID_PAGE", 2)  # packed in pages of 2 (the servers)
        paged = approval.target_digest(conn, x, "inventories")
        server = dialect_of(conn).ids_sha256(
            conn, select(targets.c.row_id).where(targets.c.execution_id == x), b"inventories\0"
        )
    packed = b"inventories\0" + struct.pack(f">{len(ids)}q", *sorted(ids))
    assert got == paged == {"count": len(ids), "sha256": hashlib.sha256(packed).hexdigest()}
    assert none == {"count": 0, "sha256": hashlib.sha256(b"batches\0").hexdigest()}
    assert server in (None, (len(ids), got["sha256"]))
    if not database_url.startswith("sqlite"):
        assert server is not None  # packed in the server, not read id by id


def test_settings_come_from_the_yaml(tmp_path):
    path = tmp_path / "p.yml"
    entry = "patches:\n  p:\n    description: d\n"
    path.write_text(entry + "    require_approved_plan: false\n    plan_valid_hours: 6\n")
    s = load_project_config(path).patches["p"]
    assert (s.require_approved_plan, s.plan_valid_hours) == (False, 6.0)
    path.write_text(entry)
    s = load_project_config(path).patches["p"]
    assert (s.require_approved_plan, s.plan_valid_hours) == (True, 24.0)
    for bad in ("require_approved_plan: 'no'", "plan_valid_hours: 0", "plan_valid_hours: .inf"):
        path.write_text(entry + f"    {bad}\n")
        with pytest.raises(RegistryError, match=bad.split(":")[0]):
            load_project_config(path)
    # Only a scheduled patch may go without (no one is there to approve each scheduled run).
    shipped = default_registry().config.patches
    assert all(s.require_approved_plan for s in shipped.values() if not s.scheduled)
    assert shipped[PRICE_JOB].require_approved_plan


@pytest.mark.slow
def test_dagster_cli_refuses_a_real_run_without_its_dry_run(sqlite_url, dagster_home):
    engine = hand_built(sqlite_url, [100, 200])
    before = digest(engine)
    env = {
        "STOCKRX_DATABASE_URL": sqlite_url,
        "DAGSTER_HOME": str(dagster_home),
        "PYTHONPATH": TEST_PYTHONPATH,
    }
    run = subprocess.run(
        [
            str(Path(sys.executable).parent / "dagster"),
            "job",
            "execute",
            "-m",
            "stockrx_patches.definitions",
            "-j",
            PRICE_JOB,
            "-c",
            "config/runs/inventory_price_adjustment.real.yaml",
        ],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode != 0
    assert "no approved dry run" in run.stdout + run.stderr
    assert digest(engine) == before
