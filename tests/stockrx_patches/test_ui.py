"""The Dagster UI path, for real: a dagster-webserver and a dagster-daemon on a small seeded
SQLite demo database, driven through the webserver's GraphQL API (what the UI itself calls) and
looked at with headless Chromium.

One server pair per module (starting it takes ~15 s, a run ~30 s): the DAGSTER_HOME is built like
the ``dagster_home`` fixture does (a fresh directory with the generated instance config; here with the run
queue polled every second, tests.support.webserver.daemon_instance_yaml), but at module scope,
which that function-scoped fixture cannot be. The repo's dagster.yaml has the
QueuedRunCoordinator (and one run per table tag at a time), so launched runs are QUEUED until the
daemon starts them, as with ``make ui``. Sensors and schedules are stopped before the daemon
starts (tests.support.webserver): the only runs are the ones launched here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import func, select

from patch_ops.database import get_engine
from stockrx_patches.seed import seed_demo
from stockrx_patches.tables import inventories
from tests.support.chromium import Chromium, find_chromium
from tests.support.processes import free_port, stop_process_groups
from tests.support.webserver import DagsterUI, DagsterUIError, daemon_instance_yaml

pytestmark = pytest.mark.slow

DEMO_ITEMS = 2_000
PRICE_JOB = "inventory_price_adjustment"
# Secrets and channels of a developer's shell must not reach the test servers.
UNSET = (
    "STOCKRX_SLACK_TOKEN", "STOCKRX_SLACK_BASE_URL", "STOCKRX_SMTP_HOST", "STOCKRX_SMTP_PASSWORD",
    "STOCKRX_SMTP_USERNAME", "STOCKRX_SMTP_RECIPIENTS",
)


def _price_sum(url: str) -> float:
    engine = get_engine(url)
    try:
        with engine.connect() as conn:
            return float(conn.execute(select(func.sum(inventories.c.price))).scalar_one())
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('demo_db') / 'stockrx.sqlite'}"
    engine = get_engine(url)
    try:
        seed_demo(engine, items=DEMO_ITEMS)
    finally:
        engine.dispose()
    return url


@pytest.fixture(scope="module")
def ui(
    tmp_path_factory: pytest.TempPathFactory, repo_root: Path, demo_url: str
) -> Iterator[DagsterUI]:
    base = tmp_path_factory.mktemp("dagster_ui")
    home = base / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(daemon_instance_yaml())  # queue polled every 1 s
    env: dict[str, str | None] = {k: None for k in UNSET}
    env["STOCKRX_DATABASE_URL"] = demo_url
    server = DagsterUI(repo_root, home, env=env, log_dir=base / "logs")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _patch_names() -> list[str]:
    from stockrx_patches.registry import default_registry

    return sorted(default_registry().patches)


def launchpad_config(ui: DagsterUI, job: str, **plan_patch: Any) -> dict[str, Any]:
    """What a launchpad user sends: the default scaffold plus the fields they typed."""
    config = yaml.safe_load(ui.run_config_schema(job)["rootDefaultYaml"])
    config["ops"]["plan_patch"]["config"].update(plan_patch)
    return config


@pytest.fixture(scope="module")
def runs(ui: DagsterUI, demo_url: str) -> dict[str, dict[str, Any]]:
    """Two runs of the price patch launched as from the launchpad, both finished.

    ``dry``: percentage +8 with dry_run left at its default; ``refused``: percentage +5000,
    refused by plan_patch; ``nameless``: a real run from the UI without launched_by. Each: the run as launched, as finished, its events, price sums.
    """
    before = _price_sum(demo_url)
    launched = {
        "dry": ui.launch_run(
            PRICE_JOB,
            launchpad_config(ui, PRICE_JOB, adjustment_type="percentage", adjustment_value=8),
        ),
        "refused": ui.launch_run(
            PRICE_JOB,
            launchpad_config(ui, PRICE_JOB, adjustment_type="percentage", adjustment_value=5000),
        ),
        # a real run as the launchpad sends it (the UI tags its runs), naming nobody
        "nameless": ui.launch_run(
            PRICE_JOB,
            launchpad_config(ui, PRICE_JOB, adjustment_type="percentage", adjustment_value=8,
                             dry_run=False),
            tags={"dagster/from_ui": "true"},
        ),
    }
    out = {}
    for name, run in launched.items():
        final = ui.wait_for_run(run["runId"])
        out[name] = {
            "launched": run,
            "final": final,
            "events": ui.run_events(run["runId"]),
            "price_sum_before": before,
        }
    for rec in out.values():
        rec["price_sum_after"] = _price_sum(demo_url)
    return out


def _events(run: dict[str, Any], typename: str, step: str | None = None) -> list[dict[str, Any]]:
    return [
        e for e in run["events"]
        if e["__typename"] == typename and (step is None or e.get("stepKey") == step)
    ]


def _metadata(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["label"]: e for e in entries}


# Code location ------------------------------------------------------------------------------


def test_code_location_loads_every_job_schedule_and_sensor(ui: DagsterUI) -> None:
    from stockrx_patches.definitions import defs

    expected = defs.get_repository_def()
    repo = ui.repository()
    jobs = {j["name"]: j for j in repo["jobs"] if not j["name"].startswith("__")}
    assert set(jobs) == {j.name for j in expected.get_all_jobs() if not j.name.startswith("__")}
    assert set(_patch_names()) <= set(jobs)
    assert {s["name"] for s in repo["schedules"]} == {s.name for s in expected.schedule_defs}
    assert {s["name"] for s in repo["sensors"]} == {s.name for s in expected.sensor_defs}
    for name, job in jobs.items():
        assert job["description"], f"job {name} has no description"
    # The fixture stopped them before starting the daemon (they default to RUNNING).
    assert all(s["sensorState"]["status"] == "STOPPED" for s in repo["sensors"])
    assert all(s["scheduleState"]["status"] == "STOPPED" for s in repo["schedules"])


def test_patch_jobs_carry_patch_name_and_written_tables_as_tags(ui: DagsterUI) -> None:
    from stockrx_patches.registry import default_registry

    registry = default_registry()
    jobs = {j["name"]: j for j in ui.repository()["jobs"]}
    for name in _patch_names():
        tags = {t["key"]: t["value"] for t in jobs[name]["tags"]}
        assert tags["stockrx/patch"] == name
        assert tags["stockrx/tables"].split(",") == list(registry.patches[name].written_tables())


# Launchpad ----------------------------------------------------------------------------------


def test_every_op_config_field_is_described_and_dry_run_defaults_to_true(ui: DagsterUI) -> None:
    seen_dry_run = set()
    for job in ui.repository()["jobs"]:
        for handle in job["solidHandles"]:
            field = handle["solid"]["definition"].get("configField")
            if not field:
                continue
            for f in field["configType"].get("fields") or []:
                where = f"{job['name']}: ops.{handle['handleID']}.config.{f['name']}"
                assert (f["description"] or "").strip(), f"{where} has no description"
                if f["name"] == "dry_run":
                    assert not f["isRequired"] and f["defaultValueAsJson"] == "true", where
                    seen_dry_run.add((job["name"], handle["handleID"]))
    for name in _patch_names():
        assert (name, "plan_patch") in seen_dry_run


def test_launchpad_opens_with_a_valid_dry_run_of_the_example_config(ui: DagsterUI) -> None:
    from stockrx_patches.registry import default_registry

    registry = default_registry()
    for name in _patch_names():
        schema = ui.run_config_schema(name)
        text = schema["rootDefaultYaml"]
        scaffold = yaml.safe_load(text)
        # No resource settings (they come from the environment), no placeholders to replace.
        assert set(scaffold) == {"ops"}, (name, text)
        assert "|" not in text and "…" not in text, (name, text)
        plan = scaffold["ops"]["plan_patch"]["config"]
        assert plan == {"dry_run": True, **registry.patches[name].example_config}, (name, text)
        result = schema["isRunConfigValid"]  # what the launchpad opens with
        assert result["__typename"] == "PipelineConfigValidationValid", (name, result)
        empty = ui.run_config_schema(name, {})["isRunConfigValid"]
        assert empty["__typename"] == "PipelineConfigValidationValid", (name, empty)


def test_launchpad_field_help_says_what_the_readme_says(ui: DagsterUI) -> None:
    [job] = [j for j in ui.repository()["jobs"] if j["name"] == PRICE_JOB]
    plan = next(h for h in job["solidHandles"] if h["handleID"] == "plan_patch")
    fields = {f["name"]: f for f in plan["solid"]["definition"]["configField"]["configType"]["fields"]}
    memory = fields["memory_limit_mb"]["description"]
    assert "add" in memory and "80 %" in memory and "halved" in memory, memory
    assert "Fail the run above this RSS" not in memory


def test_schedule_cron_is_one_expression_not_a_python_list(ui: DagsterUI) -> None:
    schedules = {s["name"]: s for s in ui.repository()["schedules"]}
    assert schedules["batch_expiry_update_at_window_start"]["cronSchedule"] == "0 2 * * 0,3"


def test_price_patch_scaffold_plus_the_two_required_fields_is_valid(ui: DagsterUI) -> None:
    config = launchpad_config(ui, PRICE_JOB, adjustment_type="percentage", adjustment_value=8)
    result = ui.run_config_schema(PRICE_JOB, config)["isRunConfigValid"]
    assert result["__typename"] == "PipelineConfigValidationValid", result


# Runs ---------------------------------------------------------------------------------------


def test_launched_runs_are_queued_for_the_daemon(runs: dict[str, dict[str, Any]]) -> None:
    # dagster.yaml has the QueuedRunCoordinator: the webserver only enqueues.
    assert runs["dry"]["launched"]["status"] == "QUEUED"
    tags = {t["key"]: t["value"] for t in runs["dry"]["launched"]["tags"]}
    assert tags["stockrx/patch"] == PRICE_JOB


def test_dry_run_succeeds_and_reports_its_impact_as_markdown_metadata(
    runs: dict[str, dict[str, Any]],
) -> None:
    run = runs["dry"]
    assert run["final"]["status"] == "SUCCESS", json.dumps(run["events"][-5:], indent=1)
    outputs = _events(run, "ExecutionStepOutputEvent", "validate_changes")
    assert [o["outputName"] for o in outputs] == ["passed_dry"]
    meta = _metadata(outputs[0]["metadataEntries"])
    report = meta["impact_report"]
    assert report["__typename"] == "MarkdownMetadataEntry"
    md = report["mdStr"]
    assert md.startswith(f"## {PRICE_JOB}: impact report, DRY RUN, nothing committed")
    assert "| measure | value |" in md
    assert f"| inventories rows selected | {DEMO_ITEMS:,} |" in md
    assert "| sum of price before |" in md and "| sum of price after |" in md
    assert "### Sample of changed inventories rows" in md
    assert meta["rows_selected"]["intValue"] == DEMO_ITEMS
    assert 0 < meta["rows_changed"]["intValue"] <= DEMO_ITEMS
    # A dry run commits nothing: commit never started, the live prices are as before.
    assert not _events(run, "ExecutionStepStartEvent", "commit_changes")
    assert _events(run, "ExecutionStepSuccessEvent", "report_dry_run")
    assert run["price_sum_after"] == run["price_sum_before"]


def test_event_log_has_the_rendered_report_not_its_raw_markdown(
    runs: dict[str, dict[str, Any]],
) -> None:
    raw = [e["message"] for e in _events(runs["dry"], "LogMessageEvent")
           if "| measure | value |" in (e.get("message") or "")]
    assert raw == []


def test_refused_run_fails_with_the_one_line_reason_first(
    runs: dict[str, dict[str, Any]],
) -> None:
    run = runs["refused"]
    assert run["final"]["status"] == "FAILURE"
    failures = _events(run, "ExecutionStepFailureEvent")
    assert [f["stepKey"] for f in failures] == ["plan_patch"]
    description = failures[0]["failureMetadata"]["description"]
    assert "\n" not in description
    assert description.startswith(f"{PRICE_JOB} refused before any write: ")
    assert "percentage needs adjustment_value in [-100, 1000], got 5000" in description
    # The UI shows the error message; its first line is the class name and the description.
    first_line = failures[0]["error"]["message"].splitlines()[0]
    assert first_line.endswith(description)
    meta = _metadata(failures[0]["failureMetadata"]["metadataEntries"])
    assert "got 5000" in meta["error"]["text"]
    assert not _events(run, "ExecutionStepStartEvent", "take_backup")
    assert run["price_sum_after"] == run["price_sum_before"]


def test_runs_are_tagged_dry_or_real_so_the_runs_page_can_filter_them(
    runs: dict[str, dict[str, Any]],
) -> None:
    tags = {t["key"]: t["value"] for t in runs["dry"]["final"]["tags"]}
    assert tags["stockrx/mode"] == "dry run"
    assert tags["stockrx/progress"] == f"{DEMO_ITEMS:,}/{DEMO_ITEMS:,} rows (100%)"


def test_a_real_run_from_the_launchpad_must_name_who_launched_it(
    runs: dict[str, dict[str, Any]],
) -> None:
    run = runs["nameless"]
    assert run["final"]["status"] == "FAILURE"
    [failure] = _events(run, "ExecutionStepFailureEvent")
    description = failure["failureMetadata"]["description"]
    assert "a real run launched from the Dagster UI must say who launched it" in description
    assert not _events(run, "ExecutionStepStartEvent", "take_backup")
    assert run["price_sum_after"] == run["price_sum_before"]


# Browser ------------------------------------------------------------------------------------

CLICK_METADATA = """(() => {
  const td = [...document.querySelectorAll('td')].find(t => t.textContent === %s);
  const a = td && td.parentElement.querySelector('a');
  if (!a) return false;
  a.click();
  return true;
})()"""
#: True when Chromium draws Japanese with glyphs: each character differs from an unassigned code
#: point, which is always a box.
CJK_GLYPHS = """(() => {
  const c = document.createElement('canvas'); c.width = 48; c.height = 48;
  const g = c.getContext('2d');
  const draw = ch => { g.clearRect(0, 0, 48, 48); g.font = '40px sans-serif';
                       g.fillText(ch, 2, 40); return c.toDataURL(); };
  const box = draw(String.fromCodePoint(0x10FFFD));
  return ['価', '格', '調'].every(ch => draw(ch) !== box);
})()"""
DIALOG_WITH_TABLE = """(() => {
  const d = document.querySelector('[role=dialog]');
  return d && d.querySelector('table') ? d.innerText : '';
})()"""


@pytest.fixture(scope="module")
def chromium() -> str:
    """Chromium's path, or skip. Module scope, first in the test's arguments: it skips before
    the servers start."""
    binary = find_chromium()
    if binary is None:
        pytest.skip(
            "Chromium not installed: no /usr/bin/chromium (Debian package `chromium`; "
            "scripts/bootstrap.sh installs it when run as root)"
        )
    pytest.importorskip(
        "websockets.sync.client", reason="websockets (comes with dagster-webserver) is missing"
    )
    return binary


def test_run_page_shows_the_impact_report_in_chromium(
    chromium: str, ui: DagsterUI, runs: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    ui.dismiss_onboarding()  # else a "Join the Dagster community" dialog covers the page
    dry_id = runs["dry"]["launched"]["runId"]
    refused_id = runs["refused"]["launched"]["runId"]
    execution_id = _metadata(
        _events(runs["dry"], "ExecutionStepOutputEvent", "validate_changes")[0]["metadataEntries"]
    )["execution_id"]["text"]

    with Chromium(chromium, tmp_path / "profile", tmp_path / "chromium.log") as page:
        # The run page, its event log filtered to validate_changes (the log is virtualised:
        # only rows in view are in the DOM).
        page.navigate(f"{ui.base_url}/runs/{dry_id}?logs=step%3Avalidate_changes")
        page.wait_for(
            "document.body.innerText.includes('[Show Markdown]')", what="the run's event log"
        )
        body = page.text()
        (tmp_path / "run_page.html").write_text(page.html())
        page.screenshot(tmp_path / "run_page.png")
        assert dry_id[:8] in body and "Success" in body
        assert "impact_report" in body
        # Markdown metadata shows as a "[Show Markdown]" link; the report opens in a dialog.
        assert page.evaluate(CLICK_METADATA % json.dumps("impact_report")), "no impact_report link"
        dialog = page.wait_for(DIALOG_WITH_TABLE, what="the impact report dialog")
        page.screenshot(tmp_path / "impact_report.png")
        assert f"{PRICE_JOB}: impact report, DRY RUN, nothing committed" in dialog
        assert f"inventories rows selected\t{DEMO_ITEMS:,}" in dialog  # a rendered table row
        assert execution_id in dialog
        assert "Sample of changed inventories rows" in dialog
        # The stock log notes are Japanese: in the dialog, and drawn with real glyphs (a CJK
        # font; without one they are boxes, all alike, in the screenshots).
        assert "価格調整: " in dialog
        assert page.evaluate(CJK_GLYPHS), "Japanese text renders as boxes: no CJK font"

        # The Runs page lists each run with its tags: the mode tag tells dry runs from real ones.
        page.navigate(f"{ui.base_url}/runs")
        page.wait_for("document.body.innerText.includes('stockrx/mode')", what="the mode tags")
        (tmp_path / "runs_page.html").write_text(page.html())
        assert "stockrx/mode: dry run" in page.text()

        # The refused run: the one-line reason is on the page.
        page.navigate(f"{ui.base_url}/runs/{refused_id}?logs=step%3Aplan_patch")
        reason = "percentage needs adjustment_value in [-100, 1000], got 5000"
        page.wait_for(
            f"document.body.innerText.includes({json.dumps(reason)})", what="the failure reason"
        )
        page.screenshot(tmp_path / "refused_run.png")
        assert "Failure" in page.text()


LAUNCH_BUTTON = """(() => {
  const b = [...document.querySelectorAll('button')].find(
    b => b.innerText.trim() === 'Launch Run' && !b.disabled);
  if (!b) return false;
  b.click();
  return true;
})()"""


def test_a_real_run_launched_in_chromium_names_its_launcher_and_shows_its_mode(
    chromium: str, ui: DagsterUI, runs: dict[str, dict[str, Any]], demo_url: str, tmp_path: Path
) -> None:
    """The launchpad as an operator uses it: the real run's config typed into its editor
    (approved by the ``dry`` run of the same plan), Launch Run clicked; the run commits, names who
    launched it, and the Runs page shows it as a real run."""
    assert runs["dry"]["final"]["status"] == "SUCCESS"  # the approving dry run
    ui.dismiss_onboarding()
    config = launchpad_config(
        ui, PRICE_JOB, adjustment_type="percentage", adjustment_value=8, dry_run=False,
        launched_by="alice@example.com",
    )
    playground = f"{ui.base_url}/locations/stockrx_patches/jobs/{PRICE_JOB}/playground"
    with Chromium(chromium, tmp_path / "profile", tmp_path / "chromium.log") as page:
        page.navigate(playground)
        page.wait_for("!!document.querySelector('.CodeMirror')", what="the launchpad editor")
        typed = json.dumps(yaml.safe_dump(config))
        page.evaluate(
            f"(() => {{ document.querySelector('.CodeMirror').CodeMirror.setValue({typed}); "
            "return true; })()"
        )
        page.screenshot(tmp_path / "launchpad_real_run.png")
        page.wait_for(LAUNCH_BUTTON, what="an enabled Launch Run button")
        run_id = page.wait_for(
            "(location.pathname.match(/\\/runs\\/([0-9a-f-]{36})/) || [])[1]",
            what="the new run's page",
        )
        final = ui.wait_for_run(run_id)
        tags = {t["key"]: t["value"] for t in final["tags"]}
        assert final["status"] == "SUCCESS", json.dumps(final)[:2000]
        assert tags["stockrx/mode"] == "real"
        assert tags["stockrx/launched-by"] == "alice@example.com"
        assert tags.get("dagster/from_ui") == "true"  # launched the launchpad's way
        assert _price_sum(demo_url) != runs["dry"]["price_sum_before"]  # it committed

        page.navigate(f"{ui.base_url}/runs")
        page.wait_for(
            "document.body.innerText.includes('stockrx/mode: real')", what="the real run's tag"
        )
        page.screenshot(tmp_path / "runs_page_real.png")


# make ui ------------------------------------------------------------------------------------


def _make_ui(repo_root: Path, tmp_path: Path, port: int, **env: str) -> subprocess.Popen[bytes]:
    """`make ui` as an operator types it, in its own process group, output in tmp_path/ui.log."""
    full = {k: v for k, v in os.environ.items() if k not in UNSET}
    full.update(UI_PORT=str(port), UI_DAGSTER_HOME=str(tmp_path / "home"), **env)
    with open(tmp_path / "ui.log", "wb") as out:
        return subprocess.Popen(
            ["make", "-s", "ui"], cwd=repo_root, env=full, stdin=subprocess.DEVNULL,
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )


def test_make_ui_with_its_port_taken_exits_non_zero_saying_why(
    repo_root: Path, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _make_ui(repo_root, tmp_path, port,
                        UI_DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite'}")
        try:
            rc = proc.wait(timeout=120)
        finally:
            stop_process_groups([proc])
    out = (tmp_path / "ui.log").read_text()
    assert rc != 0, out
    assert f"port {port} on 127.0.0.1 is not free" in out and "UI_PORT=" in out, out
    assert not (tmp_path / "home").exists()  # refused before writing anything


def test_make_ui_starts_with_schedules_and_sensors_stopped_and_no_dagster_yaml_warning(
    repo_root: Path, tmp_path: Path, demo_url: str
) -> None:
    port = free_port()
    proc = _make_ui(repo_root, tmp_path, port, UI_DATABASE_URL=demo_url)
    try:
        view = DagsterUI(repo_root, tmp_path / "home", env={}, log_dir=tmp_path)
        view.port = port
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "ui.log").read_text()[-3000:]
            try:
                view.wait_until_loaded(timeout=5)
                break
            except (OSError, DagsterUIError):
                assert time.monotonic() < deadline, (tmp_path / "ui.log").read_text()[-3000:]
                time.sleep(0.5)
        repo = view.repository()
    finally:
        stop_process_groups([proc])
    out = (tmp_path / "ui.log").read_text()
    assert "Found a dagster instance configuration value" not in out, out
    assert "schedules and sensors: stopped by default" in out
    assert all(s["scheduleState"]["status"] == "STOPPED" for s in repo["schedules"])
    sensors = {s["name"]: s["sensorState"]["status"] for s in repo["sensors"]}
    assert sensors["notification_outbox_sensor"] == "STOPPED"
    assert sorted(n for n, status in sensors.items() if status != "STOPPED") == []
