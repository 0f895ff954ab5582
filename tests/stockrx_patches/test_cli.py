"""The paths release engineers use: `dagster job execute` (multiprocess) and `stockrx-patches`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dagster import DagsterInstance, ReexecutionOptions, execute_job, reconstructable
from sqlalchemy import func, select

from stockrx_patches.cli import main as cli_main
from stockrx_patches.tables import inventory_logs
from tests.conftest import TEST_PYTHONPATH
from tests.support import slow_patches
from tests.support.stockrx import digest, latest_execution, prices, seeded

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _env(url: str, home: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, STOCKRX_DATABASE_URL=url, DAGSTER_HOME=str(home), **extra)
    env["PYTHONPATH"] = TEST_PYTHONPATH
    return env


def dagster_execute(url: str, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "dagster"), "job", "execute", *args],
        cwd=REPO, env=_env(url, home), capture_output=True, text=True, timeout=300,
    )


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "stockrx-patches"), *args, "--database-url", url],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )


# SQLite (the embedded default) and MariaDB (StockRx's engine); PostgreSQL goes through the CLI in
# test_killed_mid_transform_then_reexecuted_resumes_without_redoing_batches and tests/test_stop.py.
@pytest.mark.parametrize(
    "database_url", ["sqlite", pytest.param("mariadb", marks=pytest.mark.mysql)], indirect=True
)
def test_dry_then_real_run_through_dagster_cli(database_url, dagster_home):
    engine = seeded(database_url, items=300)
    before = digest(engine)
    old = prices(engine)
    job = ["-m", "stockrx_patches.definitions", "-j", "inventory_price_adjustment"]

    dry = dagster_execute(database_url, dagster_home, *job, "-c",
                          "config/runs/inventory_price_adjustment.yaml")
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
    out = dry.stdout + dry.stderr
    # the event log has one summary line; the whole report is the step's metadata and `report`
    assert "impact report (dry run, nothing committed): inventories: " in out
    assert "| measure | value |" not in out
    assert digest(engine) == before
    dry_ex = latest_execution(engine)
    dry_report = cli(database_url, "report", dry_ex["execution_id"])
    assert "impact report, DRY RUN, nothing committed" in dry_report.stdout
    assert "価格調整" in dry_report.stdout  # the sample of rows to insert

    real = dagster_execute(database_url, dagster_home, *job, "-c",
                           "config/runs/inventory_price_adjustment.real.yaml")
    assert real.returncode == 0, real.stdout[-3000:] + real.stderr[-3000:]
    new = prices(engine)
    changed = sum(1 for i in old if old[i] != new[i])
    assert changed == dry_ex["staged_updates"] > 0
    assert all(new[i] == int(old[i] * 1.08 + 0.5 + 1e-7) for i in old)
    # the approval gate: the real run went ahead on the dry run's identical plan
    assert latest_execution(engine)["approved_by_execution_id"] == dry_ex["execution_id"]

    report = cli(database_url, "report")
    assert report.returncode == 0 and "REAL RUN" in report.stdout
    assert f"approved by dry run {dry_ex['execution_id']}" in report.stdout
    history = cli(database_url, "history")
    assert history.returncode == 0
    assert history.stdout.count("inventory_price_adjustment") == 2


def test_stockrx_patches_list_names_each_patch():
    # Reads no database: once, not per backend of the test above (a CLI start costs ~2.5 s).
    listing = subprocess.run([str(BIN / "stockrx-patches"), "list"], capture_output=True,
                             text=True, cwd=REPO)
    assert "inventory_price_adjustment: Adjust inventory prices" in listing.stdout


def test_failed_run_exits_non_zero_with_the_reason(sqlite_url, dagster_home, tmp_path):
    engine = seeded(sqlite_url, items=50)
    before = digest(engine)
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "ops:\n  plan_patch:\n    config:\n      dry_run: false\n"
        "      adjustment_type: percentage\n      adjustment_value: 5000\n"
    )
    run = dagster_execute(sqlite_url, dagster_home, "-m", "stockrx_patches.definitions",
                          "-j", "inventory_price_adjustment", "-c", str(bad))
    assert run.returncode != 0
    assert "refused before any write" in run.stdout + run.stderr
    assert digest(engine) == before
    typo = dagster_execute(sqlite_url, dagster_home, "-m", "stockrx_patches.definitions",
                           "-j", "no_such_patch", "-c", "config/runs/inventory_price_adjustment.yaml")
    assert typo.returncode != 0 and "no_such_patch" in typo.stdout + typo.stderr


# Through the CLI on PostgreSQL only (each CLI run costs ~30 s); the in-process resume tests
# in test_windows.py cover both backends.
@pytest.mark.postgres
def test_killed_mid_transform_then_reexecuted_resumes_without_redoing_batches(
    pg_url, dagster_home, tmp_path
):
    engine = seeded(pg_url, items=200)
    before = digest(engine)
    old = prices(engine)
    cfg = tmp_path / "slow.yaml"
    cfg.write_text(
        "ops:\n  plan_patch:\n    config:\n      dry_run: false\n      batch_size: 20\n"
        "      adjustment_type: percentage\n      adjustment_value: 8\n"
    )
    proc = subprocess.Popen(
        [str(BIN / "dagster"), "job", "execute", "-m", "tests.support.slow_patches",
         "-j", "slow_price_adjustment", "-c", str(cfg)],
        cwd=REPO, env=_env(pg_url, dagster_home), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                ex = latest_execution(engine)
                if ex["batches_done"] >= 3:
                    break
            except Exception:  # noqa: BLE001 - tables not created yet
                pass
            time.sleep(0.1)
        else:
            pytest.fail("the slow patch never reached its third batch")
        os.killpg(proc.pid, signal.SIGKILL)  # the process dies, no cleanup code runs
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

    assert digest(engine) == before  # live tables unchanged
    killed = latest_execution(engine)
    assert killed["status"] == "running" and killed["phase"] == "transforming"
    done_before_kill = killed["batches_done"]
    assert 3 <= done_before_kill < 10

    instance = DagsterInstance.get()
    run = instance.get_run_by_id(killed["dagster_run_id"])
    instance.report_run_failed(run)  # what the run monitoring daemon does for a dead run
    os.environ["STOCKRX_DATABASE_URL"] = pg_url
    os.environ["SLOW_PATCH_SECONDS"] = "0"
    try:
        result = execute_job(
            reconstructable(slow_patches.slow_job),
            instance=instance,
            reexecution_options=ReexecutionOptions.from_failure(run.run_id, instance),
        )
    finally:
        os.environ.pop("SLOW_PATCH_SECONDS", None)
    assert result.success
    done = latest_execution(engine)
    assert done["execution_id"] == killed["execution_id"] and done["status"] == "completed"
    assert done["batches_done"] == 10  # 200 rows / 20: none done twice
    logs = [e.user_message for e in instance.all_logs(result.run_id)]
    assert any(f"resuming transform at id > {killed['cursor']}" in m for m in logs)
    new = prices(engine)
    assert all(new[i] == int(old[i] * 1.08 + 0.5 + 1e-7) for i in old)
    with engine.connect() as conn:
        per_item = conn.execute(
            select(inventory_logs.c.inventory_id, func.count())
            .where(inventory_logs.c.operation_type == "adjust")
            .group_by(inventory_logs.c.inventory_id)
        ).all()
    assert {n for _, n in per_item} == {1}
    assert len(per_item) == sum(1 for i in old if old[i] != new[i])


@pytest.mark.parametrize(
    "argv",
    [
        ["history", "--limit", "-1"],
        ["history", "--limit", "0"],
        ["requests", "--limit", "x"],
        ["seed-demo", "--items", "-5"],
        ["purge-backups", "--retention-days", "0"],
    ],
    ids=" ".join,
)
def test_out_of_range_counts_are_usage_errors(argv, capsys):
    # `history --limit -1` listed everything and `seed-demo --items -5` exited 0.
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*argv, "--database-url", "sqlite:////nonexistent/never-opened.db"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "must be at least" in err or "is not a whole number" in err


def test_seed_demo_on_a_database_with_items_refuses_in_one_line(sqlite_url, capsys):
    seeded(sqlite_url, items=10)
    before = digest_of(sqlite_url)
    assert cli_main(["seed-demo", "--database-url", sqlite_url, "--items", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: the database already has inventories; use --reset to start over"
    assert digest_of(sqlite_url) == before


def digest_of(url: str) -> str:
    from patch_ops.database import get_engine

    return digest(get_engine(url))


@pytest.mark.parametrize("command", [["report"], ["history"], ["requests"], ["audit", "verify"]],
                         ids=" ".join)
def test_a_missing_sqlite_file_is_refused_and_not_created(tmp_path, capsys, command):
    missing = tmp_path / "stockrx-typo.db"
    code = cli_main([*command, "--database-url", f"sqlite:///{missing}"])
    assert code != 0
    err = capsys.readouterr().err.strip()
    assert f"the SQLite file {missing} does not exist" in err and "\n" not in err
    assert not missing.exists()


def test_seed_demo_creates_a_new_sqlite_file(tmp_path, capsys):
    fresh = tmp_path / "new-demo.db"
    assert cli_main(["seed-demo", "--database-url", f"sqlite:///{fresh}", "--items", "5"]) == 0
    assert fresh.exists()
