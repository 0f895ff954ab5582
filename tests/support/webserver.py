"""A real Dagster webserver and daemon for UI tests.

    ui = DagsterUI(repo_root, dagster_home, env={"STOCKRX_DATABASE_URL": url}, log_dir=tmp)
    ui.start()                       # dagster-webserver + dagster-daemon, waits for the location
    run_id = ui.launch_run("inventory_price_adjustment", run_config)
    status = ui.wait_for_run(run_id)
    events = ui.run_events(run_id)
    ui.stop()                        # SIGTERM each process group, SIGKILL what is left

Both servers read the same DAGSTER_HOME, so the instance's run coordinator applies: with the
repo's QueuedRunCoordinator a launched run is QUEUED until the daemon dequeues it, exactly as in
``make ui`` (``dagster dev``). They are started as two processes (not ``dagster dev``) so that
each has a PID of its own to stop, and a crash of either is seen at once.

Sensors and schedules of the code location default to RUNNING (a work-pending sensor starts a dry
run by itself when the demo data has work). With ``automation=False`` (the default) the webserver
starts first, every sensor and schedule is stopped through GraphQL (the state is kept in the
instance, as a user's click would be), and only then the daemon starts: the only runs are the
test's own.

The GraphQL it sends is in tests/support/dagster_graphql.py, the headless Chromium that looks at
the UI in tests/support/chromium.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from stockrx_patches.registry import instance_config_yaml
from tests.support.dagster_graphql import (
    DAEMON_HEALTH_QUERY,
    EVENTS_QUERY,
    LAUNCH_RUN_MUTATION,
    REPOSITORY_QUERY,
    RUN_CONFIG_SCHEMA_QUERY,
    RUN_QUERY,
    STOP_SCHEDULE_MUTATION,
    STOP_SENSOR_MUTATION,
    WORKSPACE_QUERY,
)
from tests.support.processes import free_port, stop_process_groups, tail_log

LOCATION = "stockrx_patches"
REPOSITORY = "__repository__"
TERMINAL_STATUSES = {"SUCCESS", "FAILURE", "CANCELED"}


#: How often a test daemon's run queue looks for runs to start (Dagster's default: 5 s). A queued
#: run waited up to one interval, plus another after each run ahead of it on the same table.
DEQUEUE_INTERVAL_SECONDS = 1


def daemon_instance_yaml() -> str:
    """The dagster.yaml of ``stockrx-patches instance-config`` (the repo's base plus the run-queue
    limit of every patch table), with the run queue polled every second: Dagster's documented
    ``run_coordinator.config.dequeue_interval_seconds``; nothing else changes (the limits decide
    what starts, the interval only when)."""
    config = yaml.safe_load(instance_config_yaml())
    coordinator = config["run_coordinator"]
    coordinator["config"] = {**(coordinator.get("config") or {}),
                             "dequeue_interval_seconds": DEQUEUE_INTERVAL_SECONDS}
    return yaml.safe_dump(config, sort_keys=False)


class DagsterUIError(RuntimeError):
    """The webserver or daemon failed to start, died, or answered with an error."""


def _tool(name: str) -> str:
    """A console script of the running interpreter's environment (the project's .venv)."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise DagsterUIError(f"{name} not found next to {sys.executable} nor on PATH")
    return found


class DagsterUI:
    """``dagster-webserver`` and ``dagster-daemon run`` on one DAGSTER_HOME and workspace."""

    def __init__(
        self,
        repo_root: Path,
        dagster_home: Path,
        env: Mapping[str, str | None],
        log_dir: Path,
        workspace: str = "workspace.yaml",
        daemon: bool = True,
        automation: bool = False,
    ) -> None:
        self.repo_root = repo_root
        self.dagster_home = dagster_home
        self.workspace = workspace
        self.log_dir = log_dir
        self.with_daemon = daemon
        self.automation = automation
        merged: dict[str, str | None] = {**os.environ, **env}
        # None in ``env`` unsets a variable the test process has (e.g. a real Slack token).
        self.env = {k: v for k, v in merged.items() if v is not None}
        self.env.update(DAGSTER_HOME=str(dagster_home), PYTHONUNBUFFERED="1")
        self.port = 0
        self.webserver: subprocess.Popen[bytes] | None = None
        self.daemon: subprocess.Popen[bytes] | None = None
        self.webserver_log = log_dir / "webserver.log"
        self.daemon_log = log_dir / "daemon.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # Processes ------------------------------------------------------------------------------
    def _spawn(self, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            return subprocess.Popen(
                args,
                cwd=self.repo_root,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: stopped together, by our PID
            )

    def start(self, timeout: float = 180.0) -> DagsterUI:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            for attempt in range(3):
                self.port = free_port()
                self.webserver = self._spawn(
                    [_tool("dagster-webserver"), "-w", self.workspace,
                     "-h", "127.0.0.1", "-p", str(self.port)],
                    self.webserver_log,
                )
                if self._wait_http(timeout):
                    break
                # Lost the race for the port (someone bound it between free_port and bind).
                if "address already in use" not in tail_log(self.webserver_log).lower() or attempt == 2:
                    raise DagsterUIError(
                        f"dagster-webserver exited with {self.webserver.returncode}:\n"
                        + tail_log(self.webserver_log)
                    )
            self.wait_until_loaded(timeout)
            if not self.automation:
                self.stop_automation()
            if self.with_daemon:
                self.daemon = self._spawn(
                    [_tool("dagster-daemon"), "run", "-w", self.workspace], self.daemon_log
                )
                self.wait_for_daemon(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop_automation(self) -> list[str]:
        """Stop every sensor and schedule of the repository; returns their names."""
        repo = self.repository()
        stopped = []
        for sensor in repo["sensors"]:
            res = self.graphql(STOP_SENSOR_MUTATION, {"id": sensor["id"]})["stopSensor"]
            if res["__typename"] != "StopSensorMutationResult":
                raise DagsterUIError(f"stopSensor {sensor['name']}: {res}")
            stopped.append(sensor["name"])
        for schedule in repo["schedules"]:
            res = self.graphql(STOP_SCHEDULE_MUTATION, {"id": schedule["id"]})[
                "stopRunningSchedule"
            ]
            if res["__typename"] != "ScheduleStateResult":
                raise DagsterUIError(f"stopRunningSchedule {schedule['name']}: {res}")
            stopped.append(schedule["name"])
        return stopped

    def wait_for_daemon(self, timeout: float = 180.0) -> None:
        """Wait for the daemon's queued-run coordinator heartbeat (it dequeues our runs)."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            statuses = self.graphql(DAEMON_HEALTH_QUERY)["instance"]["daemonHealth"][
                "allDaemonStatuses"
            ]
            if any(
                d["daemonType"] == "QUEUED_RUN_COORDINATOR" and d["healthy"] for d in statuses
            ):
                return
            if time.monotonic() > deadline:
                raise DagsterUIError(
                    f"daemon not healthy after {timeout:.0f}s: {statuses}\n" + tail_log(self.daemon_log)
                )
            time.sleep(0.5)

    def _wait_http(self, timeout: float) -> bool:
        """True once /server_info answers; False if the webserver exited."""
        assert self.webserver is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.webserver.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.base_url}/server_info", timeout=2) as r:
                    if r.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        raise DagsterUIError(
            f"dagster-webserver not answering after {timeout:.0f}s:\n" + tail_log(self.webserver_log)
        )

    def check_alive(self) -> None:
        for name, proc, log in (
            ("dagster-webserver", self.webserver, self.webserver_log),
            ("dagster-daemon", self.daemon, self.daemon_log),
        ):
            if proc is not None and proc.poll() is not None:
                raise DagsterUIError(f"{name} exited with {proc.returncode}:\n" + tail_log(log))

    def stop(self) -> None:
        stop_process_groups([p for p in (self.webserver, self.daemon) if p is not None])

    def __enter__(self) -> DagsterUI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # GraphQL --------------------------------------------------------------------------------
    def graphql(self, query: str, variables: Mapping[str, Any] | None = None) -> dict[str, Any]:
        body = json.dumps({"query": query, "variables": dict(variables or {})}).encode()
        req = urllib.request.Request(
            f"{self.base_url}/graphql", data=body, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                payload = json.load(r)
        except urllib.error.HTTPError as e:
            raise DagsterUIError(f"POST /graphql: HTTP {e.code}: {e.read()[:2000]!r}") from e
        if payload.get("errors"):
            raise DagsterUIError(f"GraphQL errors: {json.dumps(payload['errors'])[:4000]}")
        return payload["data"]

    def wait_until_loaded(self, timeout: float = 180.0) -> list[dict[str, Any]]:
        """Wait until every code location is LOADED; a load error fails at once."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            entries = self.graphql(WORKSPACE_QUERY)["workspaceOrError"]["locationEntries"]
            for e in entries:
                loc = e["locationOrLoadError"] or {}
                if loc.get("__typename") == "PythonError":
                    raise DagsterUIError(f"code location {e['name']} failed: {loc['message']}")
            if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                return entries
            if time.monotonic() > deadline:
                raise DagsterUIError(f"code locations not loaded after {timeout:.0f}s: {entries}")
            time.sleep(0.5)

    def repository(self) -> dict[str, Any]:
        data = self.graphql(REPOSITORY_QUERY, {"location": LOCATION, "repository": REPOSITORY})
        repo = data["repositoryOrError"]
        if repo["__typename"] != "Repository":
            raise DagsterUIError(f"repository: {repo}")
        return repo

    def run_config_schema(self, job: str, run_config: Any = None) -> dict[str, Any]:
        data = self.graphql(
            RUN_CONFIG_SCHEMA_QUERY,
            {"selector": self._selector(job, "pipelineName"), "runConfigData": run_config or {}},
        )
        schema = data["runConfigSchemaOrError"]
        if schema["__typename"] != "RunConfigSchema":
            raise DagsterUIError(f"runConfigSchemaOrError: {schema}")
        return schema

    def _selector(self, job: str, key: str = "jobName") -> dict[str, str]:
        return {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, key: job}

    def dismiss_onboarding(self) -> None:
        """Mark the "Join the Dagster community" dialog as seen (stored in the instance)."""
        self.graphql("mutation { setNuxSeen }")

    # Runs -----------------------------------------------------------------------------------
    def launch_run(
        self, job: str, run_config: Mapping[str, Any], tags: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """launchRun as the launchpad does; returns the run (runId, status) or raises."""
        params: dict[str, Any] = {"selector": self._selector(job), "runConfigData": dict(run_config)}
        if tags:
            params["executionMetadata"] = {
                "tags": [{"key": k, "value": v} for k, v in tags.items()]
            }
        result = self.graphql(LAUNCH_RUN_MUTATION, {"executionParams": params})["launchRun"]
        if result["__typename"] != "LaunchRunSuccess":
            raise DagsterUIError(f"launchRun: {json.dumps(result)[:4000]}")
        return result["run"]

    def run(self, run_id: str) -> dict[str, Any]:
        run = self.graphql(RUN_QUERY, {"runId": run_id})["runOrError"]
        if run["__typename"] != "Run":
            raise DagsterUIError(f"runOrError: {run}")
        return run

    def wait_for_run(self, run_id: str, timeout: float = 300.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            run = self.run(run_id)
            if run["status"] in TERMINAL_STATUSES:
                return run
            self.check_alive()
            if time.monotonic() > deadline:
                raise DagsterUIError(
                    f"run {run_id} still {run['status']} after {timeout:.0f}s\n"
                    f"daemon log:\n{tail_log(self.daemon_log)}"
                )
            time.sleep(0.5)

    def run_events(self, run_id: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        cursor = None
        while True:
            conn = self.graphql(EVENTS_QUERY, {"runId": run_id, "afterCursor": cursor})[
                "logsForRun"
            ]
            if conn["__typename"] != "EventConnection":
                raise DagsterUIError(f"logsForRun: {conn}")
            events += conn["events"]
            cursor = conn["cursor"]
            if not conn["hasMore"]:
                return events
