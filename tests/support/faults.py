"""A patch for crash tests and a way to kill its run exactly at a failpoint
(patch_ops/failpoints.py): the run goes in a forked child process (all its ops in-process) that
stops at the failpoint; the test kills it there with SIGKILL."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import time
from pathlib import Path
from typing import Any

from dagster import DagsterInstance, Definitions, ExecuteInProcessResult

from patch_ops.failpoints import FAILPOINT_ENV, FAILPOINT_FILE_ENV
from stockrx_patches.patches.inventory_price_adjustment import InventoryPriceAdjustment
from stockrx_patches.registry import default_registry
from tests.support.stockrx import defs_with


class FaultPrice(InventoryPriceAdjustment):
    """The price patch (+8 %) without the approval gate (not what is tested here): each case
    is one real run, and its recovery another."""

    name = "fault_price_adjustment"


SETTINGS = dataclasses.replace(
    default_registry().settings("inventory_price_adjustment"),
    require_approved_plan=False, batch_size=50, estimated_records=200,
)
ITEMS = 200  # 4 transform batches of 50 (fixed by the run config, not sized by duration)
REAL = {"adjustment_type": "percentage", "adjustment_value": 8, "dry_run": False,
        "batch_size": 50}
OP = f"{FaultPrice.name}__"


def fault_defs() -> Definitions:
    return defs_with((FaultPrice(), SETTINGS))


def execute(
    url: str, job: str, op: str, config: dict[str, Any], instance_dir: str | None = None
) -> ExecuteInProcessResult:
    os.environ["STOCKRX_DATABASE_URL"] = url
    instance = DagsterInstance.local_temp(tempdir=instance_dir) if instance_dir else None
    return fault_defs().resolve_job_def(job).execute_in_process(
        run_config={"ops": {op: {"config": config}}}, raise_on_error=False, instance=instance
    )


def patch_run(url: str, instance_dir: str | None = None) -> ExecuteInProcessResult:
    return execute(url, FaultPrice.name, "plan_patch", REAL, instance_dir)


def restore_run(url: str, execution_id: str) -> ExecuteInProcessResult:
    return execute(url, "restore_patch", "plan_restore",
                   {"execution_id": execution_id, "dry_run": False})


def _child(
    url: str, point: str, marker: str, restore_of: str | None, instance_dir: str | None
) -> None:
    """The killed run, in a forked child: all its ops in this process."""
    os.environ[FAILPOINT_ENV] = point
    os.environ[FAILPOINT_FILE_ENV] = marker
    try:
        if restore_of is None:
            patch_run(url, instance_dir)
        else:
            restore_run(url, restore_of)
    finally:
        os._exit(0)  # never run the parent's (pytest's) exit handlers


def stop_at(
    url: str, point: str, tmp_path: Path, restore_of: str | None = None,
    instance_dir: str | None = None,
) -> Any:
    """Start the run in a child process; return the child once it waits at ``point``."""
    marker = tmp_path / "failpoint.pid"
    marker.unlink(missing_ok=True)
    child = multiprocessing.get_context("fork").Process(
        target=_child, args=(url, point, str(marker), restore_of, instance_dir)
    )
    child.start()
    deadline = time.monotonic() + 180
    while not marker.exists():
        assert child.is_alive(), f"the run ended (exit {child.exitcode}) before {point}"
        assert time.monotonic() < deadline, f"the run never reached {point}"
        time.sleep(0.05)
    assert int(marker.read_text()) == child.pid
    return child


def kill(child: Any) -> None:
    os.kill(child.pid, signal.SIGKILL)
    child.join(30)
    assert child.exitcode == -signal.SIGKILL


def run_and_kill(url: str, point: str, tmp_path: Path, restore_of: str | None = None) -> None:
    """Run until ``point``, and kill the run there."""
    kill(stop_at(url, point, tmp_path, restore_of))
