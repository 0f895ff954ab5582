"""End to end with a real `dagster dev` (webserver + dagster-daemon) against a DAGSTER_HOME made
from `stockrx-patches instance-config` (the repo's dagster.yaml plus the run-queue limit of every
patch table; the queue polled every second: tests/support/webserver.daemon_instance_yaml): a request row in, a finished run out (with its Slack message and email); the run
queue holding a run whose tables overlap a running one; the schedule's next ticks as Dagster
itself computes them.

The code location is tests.support.slow_patches: the real patches plus the slow test patch. The
StockRx database is a SQLite file; the clock is the test clock (inside the Sunday window). The
request sensor polls every 5 s (STOCKRX_REQUEST_POLL_SECONDS; 30 s by default): each request waits
for one tick to be launched and another to have its outcome recorded."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from patch_ops.database import get_engine
from stockrx_patches import requests as rq
from tests.conftest import TEST_PYTHONPATH
from tests.support.fake_slack import FakeSlack
from tests.support.fake_smtp import FakeSmtp
from tests.support.stockrx import latest_execution, seeded
from tests.support.webserver import daemon_instance_yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TOKEN = "xoxb-daemon-test"
LOCATION_MODULE = "tests.support.slow_patches"
#: The daemon's sensor loop runs every 5 s at most; a shorter interval would gain nothing.
POLL_SECONDS = "5"
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Dev:
    url: str  # the StockRx database
    home: Path  # DAGSTER_HOME
    web: str  # http://127.0.0.1:PORT
    gate: Path  # slow_price_adjustment's batches after its first wait until this file exists
    slack: FakeSlack
    smtp: FakeSmtp
    log: Path

    def graphql(self, query: str, **variables: object) -> dict:  # type: ignore[type-arg]
        body = json.dumps({"query": query, "variables": variables}).encode()
        req = urllib.request.Request(
            f"{self.web}/graphql", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            answer = json.load(resp)
        assert "errors" not in answer, answer
        return answer["data"]

    @contextmanager
    def instance(self) -> Iterator[DagsterInstance]:
        saved = os.environ.get("DAGSTER_HOME")
        os.environ["DAGSTER_HOME"] = str(self.home)
        try:
            with DagsterInstance.get() as inst:
                yield inst
        finally:
            if saved is None:
                os.environ.pop("DAGSTER_HOME", None)
            else:
                os.environ["DAGSTER_HOME"] = saved

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dev]:
    root = tmp_path_factory.mktemp("daemon")
    url = f"sqlite:///{root / 'stockrx.sqlite'}"
    seeded(url, items=200)
    home = root / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(daemon_instance_yaml())  # queue polled every 1 s
    port = _free_port()
    log = root / "dagster_dev.log"
    with FakeSlack(token=TOKEN) as slack, FakeSmtp() as smtp:
        env = dict(
            os.environ,
            PYTHONPATH=TEST_PYTHONPATH,
            DAGSTER_HOME=str(home),
            STOCKRX_DATABASE_URL=url,
            STOCKRX_SLACK_TOKEN=TOKEN,
            STOCKRX_SLACK_BASE_URL=slack.base_url,
            STOCKRX_SMTP_HOST="127.0.0.1",
            STOCKRX_SMTP_PORT=str(smtp.port),
            STOCKRX_SMTP_RECIPIENTS="ops@stockrx.test",
            STOCKRX_SMTP_SECURITY="none",
            STOCKRX_UI_BASE_URL=f"http://127.0.0.1:{port}",
            STOCKRX_REQUEST_POLL_SECONDS=POLL_SECONDS,
            SLOW_PATCH_SECONDS="0",
            SLOW_PATCH_GATE=str(root / "gate"),
        )
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [
                    str(BIN / "dagster"),
                    "dev",
                    "-m",
                    LOCATION_MODULE,
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(port),
                ],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_sigint_default,
            )
        d = Dev(url, home, f"http://127.0.0.1:{port}", root / "gate", slack, smtp, log)
        try:
            deadline = time.monotonic() + 240
            while True:
                try:
                    with urllib.request.urlopen(f"{d.web}/server_info", timeout=5):
                        break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        pytest.fail(f"dagster dev did not come up:\n{d.tail()}")
                    time.sleep(1)
            yield d
        finally:
            # It stops on SIGTERM (as on Ctrl-C: _sigint_default); SIGKILL if it does not.
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)


def _sigint_default() -> None:
    """`dagster dev` maps SIGTERM to its SIGINT handler: inherited as ignored (a process started
    from a non-interactive shell), SIGTERM was ignored too and teardown waited out its 20 s."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_request(dev: Dev, request_id: int, statuses: tuple[str, ...], timeout: float = 300):
    engine = get_engine(dev.url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = rq.get_request(engine, request_id)
        if row is not None and row["status"] in statuses:
            return row
        time.sleep(1)
    pytest.fail(f"request {request_id} never reached {statuses}: {row}\n{dev.tail()}")


def _request(dev: Dev, *args: str) -> int:
    cli = subprocess.run(
        [str(BIN / "stockrx-patches"), "request", *args, "--database-url", dev.url],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr
    return int(cli.stdout.split()[1].rstrip(":"))


def test_request_row_in_finished_run_out(dev: Dev):
    request_id = _request(
        dev,
        "inventory_price_adjustment",
        "--set",
        "adjustment_type=percentage",
        "--set",
        "adjustment_value=8",
        "--requested-by",
        "release-bot",
        "--release-tag",
        "v2.14.0",
    )
    # The CLI refuses an unknown patch at once; release tooling inserting the row in SQL does
    # not go through it: the sensor rejects it.
    bad = rq.submit_request(get_engine(dev.url), "no_such_patch", {}, "release-bot", None)

    done = _wait_request(dev, request_id, ("succeeded", "failed"))

    assert done["status"] == "succeeded", done
    with dev.instance() as instance:
        run = instance.get_run_by_id(done["dagster_run_id"])
        assert run.status == DagsterRunStatus.SUCCESS
        assert run.job_name == "inventory_price_adjustment"
        assert run.tags["stockrx/request"] == str(request_id)
        assert run.tags["stockrx/release"] == "v2.14.0"
        assert run.tags["dagster/sensor_name"] == "patch_request_sensor"
        assert run.tags["stockrx-table/inventories"] == "locked"
    ex = latest_execution(get_engine(dev.url), "inventory_price_adjustment")
    assert ex["execution_id"] == done["execution_id"]
    assert (ex["status"], ex["dry_run"], ex["launched_by"]) == ("completed", True, "release-bot")
    rejected = rq.get_request(get_engine(dev.url), bad)
    assert (
        rejected["status"] == "rejected" and "unknown patch 'no_such_patch'" in rejected["reason"]
    )
    # The run's own notification, from the run worker the daemon started.
    text = next(m["text"] for m in dev.slack.messages if done["dagster_run_id"] in m["text"])
    assert "inventory_price_adjustment completed (DRY RUN)" in text
    assert f"{dev.web}/runs/{done['dagster_run_id']}" in text
    assert any(done["execution_id"] in m.get_content() for m in dev.smtp.messages)


def test_queue_holds_a_run_whose_tables_overlap_a_running_one(dev: Dev):
    engine = get_engine(dev.url)
    # Inserted together, so one sensor tick usually launches both; the slow run goes first either
    # way. It stops before its second batch until the gate opens: it holds the queue for as long
    # as the test takes to see the other run held (no per-batch sleeps to outlast a slow machine).
    slow = rq.submit_request(
        engine,
        "slow_price_adjustment",
        {"adjustment_type": "percentage", "adjustment_value": 8, "batch_size": 20},
        "release-bot",
    )
    expiry = rq.submit_request(engine, "batch_expiry_update", {}, "release-bot")  # inventories too

    seen_held = False
    deadline = time.monotonic() + 300
    with dev.instance() as instance:
        while time.monotonic() < deadline:
            runs = {
                key: instance.get_runs(RunsFilter(tags={"stockrx/request": str(key)}), limit=1)
                for key in (slow, expiry)
            }
            if runs[slow] and runs[expiry]:
                a, b = runs[slow][0], runs[expiry][0]
                if a.status == DagsterRunStatus.STARTED and b.status == DagsterRunStatus.QUEUED:
                    seen_held = True
                    dev.gate.touch()
                assert not (
                    a.status == DagsterRunStatus.STARTED and b.status == DagsterRunStatus.STARTED
                ), "two runs on inventories at once"
                if a.is_finished and b.is_finished:
                    break
            time.sleep(0.5)
        else:
            pytest.fail(f"runs did not finish:\n{dev.tail()}")
        [ra] = instance.get_run_records(RunsFilter(run_ids=[a.run_id]))
        [rb] = instance.get_run_records(RunsFilter(run_ids=[b.run_id]))
    assert seen_held
    assert a.status == b.status == DagsterRunStatus.SUCCESS
    assert rb.start_time >= ra.end_time  # the second started only after the first ended
    assert _wait_request(dev, expiry, ("succeeded", "failed"))["status"] == "succeeded"


def test_schedule_next_ticks_are_sunday_and_wednesday_2am_tokyo(dev: Dev):
    data = dev.graphql("{ workspaceOrError { ... on Workspace { locationEntries { name } } } }")
    [location] = [e["name"] for e in data["workspaceOrError"]["locationEntries"]]
    start = dt.datetime(2026, 11, 25, 0, 0, tzinfo=ZoneInfo("Asia/Tokyo")).timestamp()
    data = dev.graphql(
        """query ($selector: ScheduleSelector!, $cursor: Float) {
             scheduleOrError(scheduleSelector: $selector) {
               ... on Schedule {
                 cronSchedule executionTimezone scheduleState { status }
                 futureTicks(cursor: $cursor, limit: 4) { results { timestamp } }
               }
             }
           }""",
        selector={
            "repositoryLocationName": location,
            "repositoryName": "__repository__",
            "scheduleName": "batch_expiry_update_at_window_start",
        },
        cursor=start,
    )
    schedule = data["scheduleOrError"]
    assert schedule["executionTimezone"] == "Asia/Tokyo"
    assert schedule["scheduleState"]["status"] == "RUNNING"
    ticks = [
        dt.datetime.fromtimestamp(t["timestamp"], ZoneInfo("Asia/Tokyo"))
        for t in schedule["futureTicks"]["results"]
    ]
    assert [f"{t:%a %Y-%m-%d %H:%M}" for t in ticks] == [
        "Wed 2026-11-25 02:00",
        "Sun 2026-11-29 02:00",
        "Wed 2026-12-02 02:00",
        "Sun 2026-12-06 02:00",
    ]
