"""A real Dagster webserver and daemon for UI tests, and a headless Chromium to look at the UI.

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

``Chromium`` drives ``/usr/bin/chromium --headless`` over the DevTools protocol (the
``websockets`` package comes with dagster-webserver through uvicorn[standard]): navigate, wait
for a JavaScript condition, click, read the DOM, take screenshots. The Dagster UI is a JavaScript
app that renders Markdown metadata only in a dialog after a click, which ``--dump-dom`` cannot do.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _tool(name: str) -> str:
    """A console script of the running interpreter's environment (the project's .venv)."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise DagsterUIError(f"{name} not found next to {sys.executable} nor on PATH")
    return found


def stop_process_groups(procs: list[subprocess.Popen[bytes]], grace: float = 20.0) -> None:
    """SIGTERM processes we started (session leaders), then SIGKILL what is left of their groups.

    A group holds what its leader spawned: the webserver's code server, the daemon's code server
    and run workers. The group id is the PID of the process started here. All are signalled
    first and waited for together: each takes several seconds to shut down gracefully.
    """
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    # Children may outlive their leader for a moment; give them a little, then SIGKILL.
    deadline = time.monotonic() + 3
    left = list(procs)
    while left and time.monotonic() < deadline:
        left = [p for p in left if _group_alive(p.pid)]
        if left:
            time.sleep(0.2)
    for proc in left:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
                if "address already in use" not in _tail(self.webserver_log).lower() or attempt == 2:
                    raise DagsterUIError(
                        f"dagster-webserver exited with {self.webserver.returncode}:\n"
                        + _tail(self.webserver_log)
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
                    f"daemon not healthy after {timeout:.0f}s: {statuses}\n" + _tail(self.daemon_log)
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
            f"dagster-webserver not answering after {timeout:.0f}s:\n" + _tail(self.webserver_log)
        )

    def check_alive(self) -> None:
        for name, proc, log in (
            ("dagster-webserver", self.webserver, self.webserver_log),
            ("dagster-daemon", self.daemon, self.daemon_log),
        ):
            if proc is not None and proc.poll() is not None:
                raise DagsterUIError(f"{name} exited with {proc.returncode}:\n" + _tail(log))

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
                    f"daemon log:\n{_tail(self.daemon_log)}"
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


# -------------------------------------------------------------------------------------------
# GraphQL documents (the same fields the UI asks for)
# -------------------------------------------------------------------------------------------

WORKSPACE_QUERY = """
query Workspace {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError { __typename ... on PythonError { message } }
      }
    }
    ... on PythonError { message }
  }
}
"""

CONFIG_FIELDS = "fields { name description isRequired defaultValueAsJson configTypeKey }"

REPOSITORY_QUERY = f"""
query Repository($location: String!, $repository: String!) {{
  repositoryOrError(repositorySelector: {{
    repositoryLocationName: $location, repositoryName: $repository
  }}) {{
    __typename
    ... on Repository {{
      name
      jobs {{
        name
        description
        tags {{ key value }}
        solidHandles {{
          handleID
          solid {{
            definition {{
              __typename
              name
              description
              ... on SolidDefinition {{
                configField {{
                  isRequired
                  configType {{ key __typename ... on CompositeConfigType {{ {CONFIG_FIELDS} }} }}
                }}
              }}
            }}
          }}
        }}
      }}
      schedules {{ id name cronSchedule pipelineName scheduleState {{ status }} }}
      sensors {{ id name sensorState {{ status }} }}
    }}
    ... on PythonError {{ message }}
  }}
}}
"""

STOP_SENSOR_MUTATION = """
mutation StopSensor($id: String!) {
  stopSensor(id: $id) {
    __typename
    ... on StopSensorMutationResult { instigationState { status } }
    ... on PythonError { message }
    ... on UnauthorizedError { message }
  }
}
"""

STOP_SCHEDULE_MUTATION = """
mutation StopSchedule($id: String!) {
  stopRunningSchedule(id: $id) {
    __typename
    ... on ScheduleStateResult { scheduleState { status } }
    ... on PythonError { message }
    ... on UnauthorizedError { message }
  }
}
"""

DAEMON_HEALTH_QUERY = """
query DaemonHealth {
  instance { daemonHealth { allDaemonStatuses { daemonType healthy required } } }
}
"""

RUN_CONFIG_SCHEMA_QUERY = """
query RunConfigSchema($selector: PipelineSelector!, $runConfigData: RunConfigData) {
  runConfigSchemaOrError(selector: $selector) {
    __typename
    ... on RunConfigSchema {
      rootDefaultYaml
      isRunConfigValid(runConfigData: $runConfigData) {
        __typename
        ... on RunConfigValidationInvalid { errors { reason message } }
        ... on PythonError { message }
      }
    }
    ... on PythonError { message }
    ... on PipelineNotFoundError { message }
  }
}
"""

LAUNCH_RUN_MUTATION = """
mutation LaunchRun($executionParams: ExecutionParams!) {
  launchRun(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId status tags { key value } } }
    ... on RunConfigValidationInvalid { errors { reason message } }
    ... on PythonError { message stack }
    ... on Error { message }
  }
}
"""

RUN_QUERY = """
query Run($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run { runId status jobName tags { key value } }
    ... on PythonError { message }
    ... on RunNotFoundError { message }
  }
}
"""

METADATA_ENTRIES = """
metadataEntries {
  label
  __typename
  ... on MarkdownMetadataEntry { mdStr }
  ... on TextMetadataEntry { text }
  ... on IntMetadataEntry { intValue }
  ... on JsonMetadataEntry { jsonString }
}
"""

EVENTS_QUERY = f"""
query RunEvents($runId: ID!, $afterCursor: String) {{
  logsForRun(runId: $runId, afterCursor: $afterCursor, limit: 1000) {{
    __typename
    ... on EventConnection {{
      cursor
      hasMore
      events {{
        __typename
        ... on MessageEvent {{ message level }}
        ... on StepEvent {{ stepKey }}
        ... on ExecutionStepOutputEvent {{ outputName {METADATA_ENTRIES} }}
        ... on ExecutionStepFailureEvent {{
          error {{ message className }}
          failureMetadata {{ label description {METADATA_ENTRIES} }}
        }}
        ... on RunFailureEvent {{ pipelineName }}
      }}
    }}
    ... on PythonError {{ message }}
    ... on RunNotFoundError {{ message }}
  }}
}}
"""


# -------------------------------------------------------------------------------------------
# Headless Chromium over the DevTools protocol
# -------------------------------------------------------------------------------------------

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser")


def find_chromium() -> str | None:
    for c in CHROMIUM_CANDIDATES:
        path = c if os.path.isabs(c) else shutil.which(c)
        if path and os.access(path, os.X_OK):
            return path
    return None


class Chromium:
    """One headless Chromium with one page, driven over CDP (``websockets`` sync client)."""

    def __init__(
        self, binary: str, profile_dir: Path, log: Path, width: int = 1600, height: int = 1200
    ) -> None:
        self.binary = binary
        self.profile_dir = profile_dir
        self.log = log
        self.size = (width, height)
        self.proc: subprocess.Popen[bytes] | None = None
        self._ws: Any = None
        self._stack = contextlib.ExitStack()
        self._ids = itertools.count(1)

    def start(self, timeout: float = 60.0) -> Chromium:
        from websockets.sync.client import connect

        self.profile_dir.mkdir(parents=True, exist_ok=True)
        port_file = self.profile_dir / "DevToolsActivePort"
        port_file.unlink(missing_ok=True)
        args = [
            self.binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
            f"--user-data-dir={self.profile_dir}", f"--window-size={self.size[0]},{self.size[1]}",
            "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "about:blank",
        ]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + timeout
            while not (port_file.exists() and port_file.read_text().strip()):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"chromium did not start:\n{_tail(self.log)}")
                time.sleep(0.1)
            port = int(port_file.read_text().split()[0])
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                pages = [t for t in json.load(r) if t.get("type") == "page"]
            self._ws = self._stack.enter_context(
                connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=10)
            )
            self.send("Page.enable")
            self.send("Runtime.enable")
        except BaseException:
            self.close()
            raise
        return self

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        self._ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self._ws.recv(timeout=60))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"CDP {method}: {msg['error']}")
                return dict(msg.get("result", {}))
            # other messages are events: ignored

    def evaluate(self, expression: str) -> Any:
        res = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"JS error: {res['exceptionDetails']}")
        return res["result"].get("value")

    def navigate(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def wait_for(self, expression: str, timeout: float = 60.0, what: str = "") -> Any:
        """Poll a JS expression until it is truthy (errors count as falsy); return its value."""
        guarded = f"(() => {{ try {{ return ({expression}); }} catch (e) {{ return null; }} }})()"
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(guarded)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what or expression}")
            time.sleep(0.25)

    def text(self, selector: str = "body") -> str:
        return str(
            self.evaluate(f"(document.querySelector({json.dumps(selector)}) || {{}}).innerText || ''")
        )

    def html(self) -> str:
        return str(self.evaluate("document.documentElement.outerHTML"))

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._stack.close()
        self._ws = None
        if self.proc is not None:
            stop_process_groups([self.proc], grace=5)
            self.proc = None

    def __enter__(self) -> Chromium:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
