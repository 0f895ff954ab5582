"""Run tags (issue 21, item 2): a run says whether it is a dry run or real, who launched it, and
its progress while it goes (rows done / total, ETA), so the Runs page can filter real runs and
show how far one is."""

from __future__ import annotations

from dagster import DagsterInstance

from patch_ops.steps import locks as lock_rules
from tests.support.faults import ITEMS, kill, patch_run, stop_at
from tests.support.stockrx import failure_description, seeded


def tags_of_the_run(instance_dir: str) -> dict[str, str]:
    with DagsterInstance.local_temp(tempdir=instance_dir) as instance:
        [run] = instance.get_runs(limit=1)
        return dict(run.tags)


def test_a_real_run_tags_its_mode_and_launcher_and_its_progress_changes(
    sqlite_url, tmp_path, monkeypatch
):
    # the second run takes over the first one's locks at once (its process is gone)
    monkeypatch.setattr(lock_rules, "LOCK_PID_GRACE_SECONDS", 0.0)
    seeded(sqlite_url, items=ITEMS)
    instance_dir = str(tmp_path / "dagster_home")
    (tmp_path / "dagster_home").mkdir()

    child = stop_at(sqlite_url, "transform:batch:1", tmp_path, instance_dir=instance_dir)
    first = tags_of_the_run(instance_dir)
    kill(child)
    assert first["stockrx/mode"] == "real"
    assert first["stockrx/launched-by"]
    assert first["stockrx/progress"].startswith(f"50/{ITEMS} rows (25%), ETA ")

    child = stop_at(sqlite_url, "transform:batch:3", tmp_path, instance_dir=instance_dir)
    later = tags_of_the_run(instance_dir)
    kill(child)
    assert later["stockrx/progress"].startswith(f"150/{ITEMS} rows (75%)")


def test_a_finished_run_says_all_rows_done(sqlite_url, tmp_path):
    seeded(sqlite_url, items=ITEMS)
    instance_dir = str(tmp_path / "dagster_home")
    (tmp_path / "dagster_home").mkdir()
    result = patch_run(sqlite_url, instance_dir)
    assert result.success, failure_description(result)
    tags = tags_of_the_run(instance_dir)
    assert tags["stockrx/progress"] == f"{ITEMS}/{ITEMS} rows (100%)"
    assert tags["stockrx/mode"] == "real"
