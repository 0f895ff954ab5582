"""One patch per table at a time: the lock in the StockRx database between two `dagster job
execute` processes, stale locks of dead runs, and the run-queue tag limits of the instance config
that `stockrx-patches instance-config` generates from the patch classes."""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from dagster import DagsterInstance
from sqlalchemy import event, func, insert, select

from patch_ops.database import write_transaction
from patch_ops.execution import utcnow
from patch_ops.jobs import TABLE_TAG_PREFIX
from patch_ops.state import (
    BACKUP,
    INSERT,
    UPDATE,
    ensure_framework_tables,
    executions,
    locks,
    mirror_by_name,
    mirror_name,
)
from patch_ops.steps.locks import acquire_locks, release_stale_locks
from patch_ops.target_sets import existing_tables, target_counts
from patch_ops.work_rows import existing_rows
from stockrx_patches.cli import main as cli_main
from stockrx_patches.definitions import defs as real_defs
from stockrx_patches.registry import (
    RegistryError,
    default_registry,
    instance_config,
    instance_config_yaml,
)
from tests.conftest import TEST_PYTHONPATH
from tests.support.stockrx import (
    PRICE_JOB,
    digest,
    failure_description,
    latest_execution,
    run_patch,
    seeded,
)
from tests.support.storage import purge_as_expired

REPO = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent
DRY = {"adjustment_type": "percentage", "adjustment_value": 8}
HOLDER = "11111111-1111-1111-1111-111111111111"


# ---------------------------------------------------------------------------------------------
# Two `dagster job execute` processes
# ---------------------------------------------------------------------------------------------


def _env(url: str, home: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, STOCKRX_DATABASE_URL=url, DAGSTER_HOME=str(home), **extra)
    env["PYTHONPATH"] = TEST_PYTHONPATH
    return env


def _slow_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "slow.yaml"
    cfg.write_text(
        "ops:\n  plan_patch:\n    config:\n      batch_size: 20\n"
        "      adjustment_type: percentage\n      adjustment_value: 8\n"
    )
    return cfg


def _start_slow(
    url: str, home: Path, cfg: Path, seconds: str, gate: Path | None = None
) -> subprocess.Popen[bytes]:
    extra = {"SLOW_PATCH_GATE": str(gate)} if gate else {}
    return subprocess.Popen(
        [
            str(BIN / "dagster"),
            "job",
            "execute",
            "-m",
            "tests.support.slow_patches",
            "-j",
            "slow_price_adjustment",
            "-c",
            str(cfg),
        ],
        cwd=REPO,
        env=_env(url, home, SLOW_PATCH_SECONDS=seconds, **extra),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _wait_for_batches(engine, n: int) -> dict:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            ex = latest_execution(engine, "slow_price_adjustment")
            if ex["batches_done"] >= n:
                return ex
        except Exception:  # noqa: BLE001 - tables not created yet
            pass
        time.sleep(0.2)
    pytest.fail(f"the slow patch never reached batch {n}")


def _execute_price(url: str, home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(BIN / "dagster"),
            "job",
            "execute",
            "-m",
            "stockrx_patches.definitions",
            "-j",
            PRICE_JOB,
            "-c",
            "config/runs/inventory_price_adjustment.yaml",
        ],
        cwd=REPO,
        env=_env(url, home, **env),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_second_process_fails_fast_naming_the_holder(sqlite_url, dagster_home, tmp_path):
    engine = seeded(sqlite_url, items=200)
    before = digest(engine)
    # The holder stops before its second batch until the gate opens: it keeps its lock however
    # long the second CLI takes to start and plan (fixed sleeps per batch raced a loaded machine)
    gate = tmp_path / "gate"
    first = _start_slow(sqlite_url, dagster_home, _slow_config(tmp_path), "0", gate)
    try:
        holder = _wait_for_batches(engine, 1)

        second = _execute_price(sqlite_url, dagster_home)
        gate.touch()

        assert second.returncode == 1
        out = second.stdout + second.stderr
        assert (
            "inventory_price_adjustment refused before any write: table 'inventories' is "
            f"locked by slow_price_adjustment execution {holder['execution_id']}" in out
        )
        assert f"Dagster run {holder['dagster_run_id']}, host {socket.gethostname()}" in out
        refused = latest_execution(engine, PRICE_JOB)
        assert refused["status"] == "failed" and "is locked by" in refused["error_message"]
        assert first.wait(timeout=240) == 0
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    done = latest_execution(engine, "slow_price_adjustment")
    assert done["status"] == "completed"
    # It did not wait: it was refused while the holder was still at work.
    assert refused["completed_at"] < done["completed_at"]
    assert digest(engine) == before  # both were dry runs
    with engine.connect() as conn:
        assert conn.execute(select(locks)).all() == []


@pytest.mark.slow
def test_lock_of_a_killed_process_is_released_as_stale(sqlite_url, dagster_home, tmp_path):
    engine = seeded(sqlite_url, items=200)
    first = _start_slow(sqlite_url, dagster_home, _slow_config(tmp_path), "0.5")
    try:
        killed = _wait_for_batches(engine, 2)
        os.killpg(first.pid, signal.SIGKILL)  # no cleanup code runs
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    with engine.connect() as conn:
        held = conn.execute(select(locks)).mappings().all()
    assert {h["execution_id"] for h in held} == {killed["execution_id"]}

    # Same host, the holder's process is gone, its last heartbeat older than the grace period
    # (none here: the heartbeat was written before the kill, hence before the second run's plan;
    # the grace period itself is test_dead_process_on_this_host_within_the_grace_period_...).
    second = _execute_price(sqlite_url, dagster_home, STOCKRX_LOCK_PID_GRACE_SECONDS="0")

    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"released stale lock of execution {killed['execution_id']}" in (
        second.stdout + second.stderr
    )
    dead = latest_execution(engine, "slow_price_adjustment")
    assert dead["status"] == "failed"
    assert dead["error_message"].startswith("abandoned: its table locks were released as stale")
    assert f"(pid {held[0]['pid']}) is gone from this host" in dead["error_message"]
    assert latest_execution(engine, PRICE_JOB)["status"] == "completed"
    # Nothing of it reached the live tables; its backup and staged rows serve no one (phase
    # ABANDONED is never carried on) and stay in tables of its own, none in the shared mirrors,
    # until the purge drops them with its target sets.
    assert dead["phase"] == "abandoned"
    dead_id, tables = dead["execution_id"], dead["declaration"]["tables"]
    assert "inventories" in tables

    def left(conn, table: str, action: str) -> int | None:  # type: ignore[no-untyped-def]
        rows = existing_rows(conn, table, dead_id, action)
        return None if rows is None else conn.execute(
            select(func.count()).select_from(rows.table).where(rows.mine)).scalar_one()

    with engine.connect() as conn:
        for kind in ("backup", "stage"):
            mirror = mirror_by_name(conn, mirror_name(kind, "inventories"))
            assert mirror is None or conn.execute(select(func.count()).where(
                mirror.c.dp_execution_id == dead_id)).scalar_one() == 0
        assert (left(conn, "inventories", BACKUP) or 0) > 0  # kept until the purge
        assert (left(conn, "inventories", UPDATE) or 0) > 0  # its first batches
        assert sum(target_counts(conn, dead_id, tables).values()) > 0
    purge_as_expired(engine, dead_id)
    with engine.connect() as conn:
        assert [(t, a) for t in tables for a in (BACKUP, UPDATE, INSERT)
                if left(conn, t, a) is not None] == []
        assert existing_tables(conn, dead_id, tables) == []


# ---------------------------------------------------------------------------------------------
# Holder rules, in-process
# ---------------------------------------------------------------------------------------------


def _hold(
    engine,
    status: str = "running",
    host: str = "batch-host-7",
    beat_age_s: float = 5,
    pid: int = 4242,
    tables: tuple[str, ...] = ("inventories",),
) -> None:  # type: ignore[no-untyped-def]
    ensure_framework_tables(engine)
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(
            insert(executions).values(
                execution_id=HOLDER,
                patch_name="batch_expiry_update",
                kind="patch",
                status=status,
                phase="transforming",
                dry_run=False,
                started_at=now,
                heartbeat_at=now - dt.timedelta(seconds=beat_age_s),
            )
        )
        conn.execute(insert(locks), [
            {"table_name": table, "execution_id": HOLDER, "dagster_run_id": "run-elsewhere",
             "hostname": host, "pid": pid, "acquired_at": now - dt.timedelta(minutes=3)}
            for table in tables
        ])


def _holder(engine) -> dict:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return dict(
            conn.execute(select(executions).where(executions.c.execution_id == HOLDER))
            .mappings()
            .one()
        )


def test_live_holder_elsewhere_refuses_with_its_details(sqlite_url):
    engine = seeded(sqlite_url, items=20)
    _hold(engine)

    result = run_patch(sqlite_url, PRICE_JOB, DRY)

    assert not result.success
    reason = failure_description(result)
    assert (
        f"table 'inventories' is locked by batch_expiry_update execution {HOLDER} "
        "(Dagster run run-elsewhere, host batch-host-7, pid 4242, since " in reason
    )
    assert "one patch per table at a time" in reason
    assert _holder(engine)["status"] == "running"


def test_holder_without_heartbeat_for_too_long_is_stale(sqlite_url):
    engine = seeded(sqlite_url, items=20)
    _hold(engine, beat_age_s=2 * 3600)

    result = run_patch(sqlite_url, PRICE_JOB, DRY)

    assert result.success, failure_description(result)
    holder = _holder(engine)
    assert holder["status"] == "failed" and holder["completed_at"] is not None
    assert re.search(
        r"because its last heartbeat was 7,20\d s ago \(limit 1,800 s\)$", holder["error_message"]
    )


def test_finished_holder_that_left_its_lock_is_stale(sqlite_url):
    engine = seeded(sqlite_url, items=20)
    _hold(engine, status="completed")

    result = run_patch(sqlite_url, PRICE_JOB, DRY)

    assert result.success, failure_description(result)
    holder = _holder(engine)
    assert holder["status"] == "completed"  # its outcome is kept; the note is added
    assert "because its execution is completed" in holder["error_message"]


def test_dead_holder_of_every_table_is_released_once(sqlite_url):
    engine = seeded(sqlite_url, items=20)
    _hold(engine, status="completed", tables=("inventories", "inventory_logs"))

    result = run_patch(sqlite_url, PRICE_JOB, DRY)

    assert result.success, failure_description(result)
    assert _holder(engine)["error_message"].count("released as stale") == 1


def test_dead_holder_of_every_table_is_released_once_by_the_taker(sqlite_url):
    engine = seeded(sqlite_url, items=20)
    _hold(engine, status="completed", tables=("inventories", "inventory_logs"))
    taker = "22222222-2222-2222-2222-222222222222"

    with write_transaction(engine) as conn:
        acquire_locks(conn, ["inventories", "inventory_logs"], taker, "run-here")

    assert _holder(engine)["error_message"].count("released as stale") == 1
    with engine.connect() as conn:
        assert set(conn.execute(select(locks.c.execution_id)).scalars()) == {taker}


def test_a_step_takes_over_all_its_locks_in_two_statements(sqlite_url):
    engine = seeded(sqlite_url, items=20)
    _hold(engine, host=socket.gethostname(), tables=("inventories", "inventory_logs"))
    sent: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: sent.append(a[2]))

    with write_transaction(engine) as conn:
        acquire_locks(conn, ["inventories", "inventory_logs"], HOLDER, "run-here")

    assert len([s for s in sent if "data_patch_locks" in s]) == 2  # read them all, move them all
    with engine.connect() as conn:
        held = conn.execute(select(locks.c.execution_id, locks.c.dagster_run_id, locks.c.pid))
        assert {tuple(r) for r in held} == {(HOLDER, "run-here", os.getpid())}


def test_holder_whose_run_was_terminated_between_steps_is_cancelled_and_kept(sqlite_url):
    # A Terminate that reached no step (between two steps): the stop is recorded by the next run
    # that finds the lock; the execution stays resumable (not failed/abandoned).
    engine = seeded(sqlite_url, items=20)
    _hold(engine)
    with engine.begin() as conn:
        release_stale_locks(conn, ["inventories"], "a test", lambda run_id: "CANCELED")

    holder = _holder(engine)
    assert (holder["status"], holder["phase"]) == ("cancelled", "transforming")
    assert holder["error_message"].startswith(
        "cancelled: its Dagster run was terminated on request while no step was running"
    )
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(locks)).scalar_one() == 0


def test_dead_process_on_this_host_within_the_grace_period_still_holds(sqlite_url):
    engine = seeded(sqlite_url, items=20)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _hold(engine, host=socket.gethostname(), pid=gone.pid, beat_age_s=5)

    result = run_patch(sqlite_url, PRICE_JOB, DRY)

    # Between two op processes of a live run the pid is gone for a moment: not stale yet.
    assert not result.success and "is locked by" in failure_description(result)


# ---------------------------------------------------------------------------------------------
# Run-queue tag limits
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", ["dagster.yaml", "dagster.postgres.yaml", "dagster.mysql.yaml"])
def test_generated_instance_config_limits_every_table_of_every_patch_to_one_run(base, tmp_path):
    base_config = yaml.safe_load((REPO / base).read_text())
    listed = base_config["concurrency"]["runs"].get("tag_concurrency_limits") or []
    assert not [lim for lim in listed if lim["key"].startswith(TABLE_TAG_PREFIX)], (
        f"{base} lists table limits: instance-config generates them"
    )
    text = instance_config_yaml(REPO / base)
    config = yaml.safe_load(text)
    limits = {
        lim["key"]: lim["limit"] for lim in config["concurrency"]["runs"]["tag_concurrency_limits"]
    }
    registry = default_registry()
    wanted = {f"{TABLE_TAG_PREFIX}{t}" for p in registry.patches.values() for t in p.tables()}
    assert wanted == {"stockrx-table/inventories", "stockrx-table/batches",
                      "stockrx-table/inventory_logs"}
    assert {k: v for k, v in limits.items() if k.startswith(TABLE_TAG_PREFIX)} == dict.fromkeys(
        wanted, 1
    )
    for job in real_defs.resolve_all_job_defs():  # the tags the jobs really carry
        for key in job.tags:
            if key.startswith(TABLE_TAG_PREFIX):
                assert limits.get(key) == 1, f"{base}: no limit for {key} of job {job.name}"
    # The rest of the base is kept.
    assert {k: v for k, v in config.items() if k != "concurrency"} == {
        k: v for k, v in base_config.items() if k != "concurrency"
    }
    assert config["concurrency"]["runs"]["max_concurrent_runs"] == 4
    if base == "dagster.yaml":  # Dagster reads it as the daemon will
        (tmp_path / "dagster.yaml").write_text(text)
        with DagsterInstance.from_config(str(tmp_path)) as instance:
            queue = instance.get_concurrency_config().run_queue_config
        assert queue is not None
        assert {lim["key"]: lim["limit"] for lim in queue.tag_concurrency_limits} == limits


def test_instance_config_keeps_the_base_limits_and_refuses_a_looser_table_limit(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(
        "concurrency:\n  runs:\n    tag_concurrency_limits:\n"
        "      - {key: team, value: ops, limit: 2}\n"
        "      - {key: stockrx-table/batches, limit: 1}\n"
    )
    limits = instance_config(base)["concurrency"]["runs"]["tag_concurrency_limits"]
    assert limits[:2] == [{"key": "team", "value": "ops", "limit": 2},
                          {"key": "stockrx-table/batches", "limit": 1}]
    assert [lim["key"] for lim in limits[2:]] == ["stockrx-table/inventories",
                                                   "stockrx-table/inventory_logs"]
    base.write_text(base.read_text().replace("batches, limit: 1", "batches, limit: 2"))
    with pytest.raises(RegistryError, match="stockrx-table/batches is limited to 2 runs"):
        instance_config(base)


def test_instance_config_command_prints_the_generated_config(capsys, tmp_path):
    assert cli_main(["instance-config"]) == 0
    assert capsys.readouterr().out == instance_config_yaml()
    assert cli_main(["instance-config", "--base", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: instance config base not found") and err.count("\n") == 1


def test_patch_jobs_carry_one_tag_per_locked_table():
    expiry = real_defs.resolve_job_def("batch_expiry_update").tags
    price = real_defs.resolve_job_def(PRICE_JOB).tags
    assert {k for k in expiry if k.startswith(TABLE_TAG_PREFIX)} == {
        "stockrx-table/inventories",
        "stockrx-table/batches",
        "stockrx-table/inventory_logs",
    }
    assert {k for k in price if k.startswith(TABLE_TAG_PREFIX)} == {
        "stockrx-table/inventories",
        "stockrx-table/inventory_logs",
    }
