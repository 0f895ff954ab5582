"""Stop means stop, cleanly: Ctrl-C (SIGINT) on `dagster job execute`, and Terminate through the
webserver (GraphQL terminateRun), while a real run is inside transform, validate or commit.

Each run is held exactly at a failpoint (patch_ops/failpoints.py; no sleeps decide the order),
then stopped. The execution must then be ``cancelled`` at once, saying who, why and how far it got,
with no table lock left, the live tables untouched (or, stopped after the commit committed,
committed and verified by the next run), one ordinary (not urgent) message; and the next run of
the same config must continue it from its saved progress (no batch done twice) and complete.
"""

from __future__ import annotations

import getpass
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster import DagsterInstance, DagsterRunStatus
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from patch_ops.database import get_engine
from patch_ops.failpoints import FAILPOINT_ENV, FAILPOINT_FILE_ENV
from patch_ops.state import executions, locks
from stockrx_patches.definitions import defs as real_defs
from stockrx_patches.tables import inventory_logs
from tests.conftest import TEST_PYTHONPATH
from tests.support import faults, slow_patches
from tests.support.fake_slack import FakeSlack
from tests.support.stockrx import digest, latest_execution, prices, seeded
from tests.support.webserver import DagsterUI, daemon_instance_yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TOKEN = "xoxb-stop-test"
ITEMS = 200  # 4 batches of 50
JOB = ["-m", "tests.support.slow_patches", "-j", "slow_price_adjustment"]
CONFIG = (
    "ops:\n  plan_patch:\n    config:\n      dry_run: false\n      batch_size: 50\n"
    "      adjustment_type: percentage\n      adjustment_value: 8\n"
)
#: Channels and secrets of a developer's shell must not reach the runs.
UNSET = ("STOCKRX_SMTP_HOST", "STOCKRX_SMTP_PASSWORD", "STOCKRX_SMTP_USERNAME",
         "STOCKRX_SMTP_RECIPIENTS", FAILPOINT_ENV, FAILPOINT_FILE_ENV)


def _env(url: str, home: Path, slack: FakeSlack, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    env.update(STOCKRX_DATABASE_URL=url, DAGSTER_HOME=str(home), PYTHONPATH=TEST_PYTHONPATH,
               STOCKRX_SLACK_TOKEN=TOKEN, STOCKRX_SLACK_BASE_URL=slack.base_url,
               SLOW_PATCH_SECONDS="0", **extra)
    return env


def _sigint_default() -> None:
    """A process started from a non-interactive shell may inherit SIGINT ignored: a terminal's
    Ctrl-C would reach it as it does here only with the default disposition."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(env: dict[str, str], config: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [str(BIN / "dagster"), "job", "execute", *JOB, "-c", str(config)],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a terminal's foreground job
            preexec_fn=_sigint_default,
        )


def _wait_for(what: str, ready: Any, proc: subprocess.Popen[bytes] | None, log: Path | None,
              timeout: float = 180) -> float:
    """Poll ``ready()`` until true; returns when (monotonic)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log else ""
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}:\n{tail}")
        if time.monotonic() > deadline:
            pytest.fail(f"never: {what}")
        time.sleep(0.05)
    return time.monotonic()


def _lock_rows(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(locks)).scalar_one())


def _logs_per_item(engine: Engine) -> set[int]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(func.count())
            .where(inventory_logs.c.operation_type == "adjust")
            .group_by(inventory_logs.c.inventory_id)
        ).all()
    return {n for (n,) in rows}


def _messages(slack: FakeSlack, execution_id: str) -> list[str]:
    return [m["text"] for m in slack.messages if execution_id in m["text"]]


def _next_run_in_process(env: dict[str, str]) -> str:
    """The stopped run's config run again in this process with the CLI run's environment; its
    Dagster log messages (what the CLI prints)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        instance = DagsterInstance.get()
        result = slow_patches.defs.resolve_job_def("slow_price_adjustment").execute_in_process(
            run_config=yaml.safe_load(CONFIG), instance=instance, raise_on_error=False
        )
        out = "\n".join(e.user_message for e in instance.all_logs(result.run_id))
        assert result.success, out[-3000:]
        return out
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def slack() -> Iterator[FakeSlack]:
    with FakeSlack(token=TOKEN) as fake:
        yield fake


# Through the CLI: Ctrl-C ------------------------------------------------------------------------

PLACES = {
    # place: (failpoint, batches kept when stopped, phase when stopped)
    "transform": ("transform:batch:2", 2, "transforming"),
    "validate": ("validate:inside", 4, "validated"),
    "commit": ("commit:inside", 4, "validated"),  # the commit transaction rolled back
}


@pytest.mark.parametrize(
    ("place", "backend"),
    [
        *[(place, "sqlite") for place in PLACES],
        # one case on a server database (its next run goes through the CLI too)
        pytest.param("commit", "postgres", marks=pytest.mark.postgres),
    ],
)
def test_ctrl_c_cancels_the_execution_at_once_and_the_next_run_resumes_it(
    place: str, backend: str, request: pytest.FixtureRequest, dagster_home: Path,
    tmp_path: Path, slack: FakeSlack,
) -> None:
    point, kept, phase = PLACES[place]
    url = request.getfixturevalue("sqlite_url" if backend == "sqlite" else "pg_url")
    engine = seeded(url, items=ITEMS)
    before, old = digest(engine), prices(engine)
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG)
    marker, log = tmp_path / "failpoint.pid", tmp_path / "stopped.log"
    env = _env(url, dagster_home, slack)
    proc = _start({**env, FAILPOINT_ENV: point, FAILPOINT_FILE_ENV: str(marker)}, config, log)
    try:
        _wait_for(point, marker.exists, proc, log)
        assert _lock_rows(engine) > 0
        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole foreground process group
        released = _wait_for("locks released", lambda: _lock_rows(engine) == 0, None, None, 60)
        proc.wait(timeout=120)
        ended = time.monotonic()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = log.read_text(errors="replace")
    print(f"\n{place} ({backend}): locks released {released - sent:.2f} s after SIGINT, "
          f"the CLI exited after {ended - sent:.2f} s")
    assert proc.returncode != 0, out[-3000:]

    ex = latest_execution(engine)
    assert ex["status"] == "cancelled", (ex["status"], ex["error_message"], out[-3000:])
    assert ex["phase"] == phase and ex["batches_done"] == kept
    note = ex["error_message"]
    assert note.startswith("cancelled: stopped by SIGINT in step ")
    assert f"by OS user {getpass.getuser()}" in note
    assert f"{kept * 50}/{ITEMS} rows transformed" in note and "nothing reached the live" in note
    stop = ex["report"]["stops"][-1]
    assert stop["reason"] == "stopped by SIGINT" and stop["processed"] == kept * 50
    assert stop["step"] == {"transform": "transform_batches", "validate": "validate_changes",
                            "commit": "commit_changes"}[place]
    assert _lock_rows(engine) == 0
    assert digest(engine) == before  # the live tables untouched
    run = DagsterInstance.get().get_run_by_id(ex["dagster_run_id"])
    assert run is not None and run.status == DagsterRunStatus.FAILURE
    [message] = _messages(slack, ex["execution_id"])
    assert "STOPPED (cancelled on request)" in message and "stopped by SIGINT" in message
    assert ":rotating_light:" not in message  # ordinary, not urgent

    if backend == "postgres":  # the next run through the CLI as well
        again = subprocess.run(
            [str(BIN / "dagster"), "job", "execute", *JOB, "-c", str(config)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )
        out = again.stdout + again.stderr
        assert again.returncode == 0, out[-3000:]
    else:
        # In-process, on the same Dagster instance and environment (a CLI run costs ~17 CPU
        # seconds, README "Executor"): the resume is the plan op's, whatever executor runs it.
        out = _next_run_in_process(env)
    done = latest_execution(engine)
    assert done["execution_id"] == ex["execution_id"]
    assert (done["status"], done["phase"]) == ("completed", "verified")
    assert done["batches_done"] == 4  # none done twice
    assert f"resuming cancelled execution {ex['execution_id']}" in out
    if place == "transform":
        assert f"resuming transform at id > {ex['cursor']}" in out
    new = prices(engine)
    assert all(new[i] == int(old[i] * 1.08 + 0.5 + 1e-7) for i in old)
    assert _logs_per_item(engine) == {1}
    assert _lock_rows(engine) == 0


def test_a_stop_after_the_commit_committed_says_committed_and_the_next_run_verifies_it(
    sqlite_url: str, tmp_path: Path
) -> None:
    # In-process (a forked child running the whole job, tests/support/faults.py): the CLI path
    # of a stop is the test above; this is what the record says when the commit had committed.
    engine = seeded(sqlite_url, items=faults.ITEMS)
    old = prices(engine)
    child = faults.stop_at(sqlite_url, "commit:after", tmp_path)
    os.kill(child.pid, signal.SIGINT)
    child.join(60)
    assert child.exitcode is not None

    ex = latest_execution(engine)
    # safety rule 6: the record says the data changed
    assert (ex["status"], ex["phase"]) == ("unverified", "committed")
    assert "stopped by SIGINT in step commit_changes" in ex["error_message"]
    assert "its changes are committed" in ex["error_message"]
    assert _lock_rows(engine) == 0
    new = prices(engine)
    assert all(new[i] == int(old[i] * 1.08 + 0.5 + 1e-7) for i in old)

    faults.patch_run(sqlite_url)  # the next run verifies it first, then refuses a repeat
    with engine.connect() as conn:
        verified = conn.execute(
            select(executions.c.status, executions.c.phase)
            .where(executions.c.execution_id == ex["execution_id"])
        ).one()
    assert tuple(verified) == ("completed", "verified")
    assert prices(engine) == new  # never applied twice
    assert _logs_per_item(engine) == {1}


# Through the webserver: Terminate -------------------------------------------------------------

TERMINATE = """
mutation Terminate($runId: String!) {
  terminateRun(runId: $runId) {
    __typename
    ... on TerminateRunFailure { message }
    ... on PythonError { message }
  }
}
"""


def test_terminate_from_the_ui_cancels_a_run_held_in_transform(
    sqlite_url: str, tmp_path: Path, slack: FakeSlack
) -> None:
    engine = seeded(sqlite_url, items=ITEMS)
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(daemon_instance_yaml())  # queue polled every 1 s
    marker = tmp_path / "failpoint.pid"
    env: dict[str, str | None] = {k: None for k in UNSET}
    env.update(STOCKRX_DATABASE_URL=sqlite_url, STOCKRX_SLACK_TOKEN=TOKEN,
               STOCKRX_SLACK_BASE_URL=slack.base_url, **{FAILPOINT_ENV: "transform:batch:2",
                                                         FAILPOINT_FILE_ENV: str(marker)})
    run_config = {"ops": {"plan_patch": {"config": {
        "dry_run": True, "batch_size": 50, "adjustment_type": "percentage",
        "adjustment_value": 8}}}}
    with DagsterUI(REPO, home, env=env, log_dir=tmp_path / "logs") as ui:
        run_id = ui.launch_run("inventory_price_adjustment", run_config)["runId"]
        _wait_for("transform:batch:2", marker.exists, None, None)
        sent = time.monotonic()
        answer = ui.graphql(TERMINATE, {"runId": run_id})["terminateRun"]
        assert answer["__typename"] == "TerminateRunSuccess", answer
        released = _wait_for("locks released", lambda: _lock_rows(engine) == 0, None, None, 60)
        final = ui.wait_for_run(run_id, timeout=120)
        print(f"\nterminate: locks released {released - sent:.2f} s after terminateRun")
        assert final["status"] == "CANCELED"

    ex = latest_execution(engine)
    assert (ex["status"], ex["phase"], ex["batches_done"]) == ("cancelled", "transforming", 2)
    note = ex["error_message"]
    assert note.startswith("cancelled: terminated from the UI")
    assert "a Dagster UI/API user" in note and "100/200 rows transformed" in note
    [message] = _messages(slack, ex["execution_id"])
    assert "STOPPED (cancelled on request)" in message and ":rotating_light:" not in message

    # The next run of the same config (here in-process) continues it.
    os.environ["STOCKRX_DATABASE_URL"] = sqlite_url
    try:
        result = real_defs.resolve_job_def("inventory_price_adjustment").execute_in_process(
            run_config=run_config, instance=DagsterInstance.ephemeral(), raise_on_error=False
        )
    finally:
        os.environ.pop("STOCKRX_DATABASE_URL", None)
    assert result.success
    done = latest_execution(engine)
    assert done["execution_id"] == ex["execution_id"] and done["status"] == "completed"
    assert done["batches_done"] == 4
    assert _lock_rows(engine) == 0
    get_engine(sqlite_url).dispose()
