"""The price benchmark's parent side (``python -m benchmarks.price_adjustment``): the job's
run configs and how it is launched, every contender run and measured from outside (the
baselines through ``--worker`` children of ``benchmarks.price_adjustment``, the job and the
empty job through ``dagster job execute``, the in-process profile), and the rounds that run
them all on identical copies of the seeded data and check the data they leave.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import sys
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from benchmarks import common, contenders, dagster_timings, databases, digests, harness
from benchmarks.app_writer import app_writer
from benchmarks.common import log
from benchmarks.contenders import EXECUTORS, Outcome
from benchmarks.digests import Digest, same

JOB = "inventory_price_adjustment"
DRY_CONFIG = Path("config") / "runs" / f"{JOB}.yaml"  # relative to the measured code
REAL_CONFIG = Path("config") / "runs" / f"{JOB}.real.yaml"
#: A throwaway audit key for this benchmark process only (``key_id:fernet_key``).
AUDIT_KEY = "bench:" + base64.urlsafe_b64encode(os.urandom(32)).decode()


def fmt_price(v: float | Decimal) -> str:
    """As the patch prints prices in notes: whole yen as an integer, else two decimals."""
    return f"{int(v)}" if float(v).is_integer() else f"{float(v):.2f}"


def run_config(path: Path) -> dict[str, Any]:
    """The op config of a run config file (it configures exactly one op: plan_patch)."""
    (op,) = yaml.safe_load(path.read_text())["ops"].values()
    return dict(op["config"])


def percentage_of_config(path: Path) -> Decimal:
    cfg = run_config(path)
    if cfg.get("adjustment_type") != "percentage" or set(cfg) - {
        "dry_run", "adjustment_type", "adjustment_value"
    }:
        raise SystemExit(f"{path} is no longer a plain percentage run: update the baselines")
    return Decimal(str(cfg["adjustment_value"]))


# ---------------------------------------------------------------------------------------------
# Contenders as measured from outside
# ---------------------------------------------------------------------------------------------


WORKER_NAMES = {"bare": "bare SQL", "naive": "naive ORM", "floor": "safety floor (SQL)",
                "keyed": "safety floor on shared keyed tables (SQL)",
                "own": "safety floor on tables of its own (SQL)",
                "own_bulk": "safety floor on tables of its own, bulk path (SQL)"}
#: The safety floors: the hand-written steps on their own keyless tables, then on the job's
#: storage and on tables of the execution's own (``benchmarks.floor_storage``).
FLOORS = ("floor", "keyed", "own", "own_bulk")


def run_worker(kind: str, url: str, run_at: dt.datetime, pct: Decimal,
               args: argparse.Namespace) -> Outcome:
    stored = kind in FLOORS[1:]
    module = "benchmarks.floor_storage" if stored else "benchmarks.price_adjustment"
    cmd = [sys.executable, "-m", module, "--worker", kind, "--database-url", url,
           "--run-at", run_at.isoformat(), "--percentage", str(pct),
           "--naive-rows", str(args.naive_rows)]
    if stored:  # the tables and an approving dry run's rows, untimed
        made = common.run_monitored([*cmd, "--approve"], env=dict(os.environ),
                                    timeout=args.timeout)
        if (approved := result_of(made)) is None:
            failed = Outcome(WORKER_NAMES[kind], 0, made)
            failed.notes.append("its approval failed: " + made.stderr.strip()[-300:])
            return failed
        cmd += ["--keyed", approved]
    proc = common.run_monitored(cmd, env=dict(os.environ), timeout=args.timeout)
    out = Outcome(WORKER_NAMES[kind], 0, proc)
    res: dict[str, Any] = json.loads(result_of(proc) or "{}")
    if res:
        out.work_s = res["work_s"]
        out.rows_changed = res["rows_changed"]
        out.rows = res["rows"] if res["rows"] is not None else args.items
        out.steps = res.get("steps", [])
    if kind == "naive" and out.rows:
        out.scale = args.items / out.rows
        # Scale the work's CPU only, not the process start-up.
        out.cpu_s = proc.cpu_s + res["work_cpu_s"] * (out.scale - 1)
    if not out.ok:
        out.notes.append("failed: " + " / ".join(proc.stderr.strip().splitlines()[-3:]))
    return out


def result_of(proc: common.ProcessResult) -> str | None:
    """The JSON a worker child printed after ``RESULT_MARK`` (None: it printed none)."""
    return next((line[len(common.RESULT_MARK):] for line in proc.stdout.splitlines()
                 if line.startswith(common.RESULT_MARK)), None)


@dataclass
class JobSetup:
    """How the job is launched: the measured code, the run config files, the op they configure."""

    code: contenders.Code
    workdir: Path
    op_key: str
    overrides: dict[str, Any]
    executor: str = "default"

    @property
    def dry_config(self) -> Path:
        return self.code.dir / DRY_CONFIG

    @property
    def real_config(self) -> Path:
        return self.code.dir / REAL_CONFIG

    @property
    def percentage(self) -> Decimal:
        return percentage_of_config(self.real_config)

    def config_files(self, base: Path, extra: dict[str, Any] | None = None) -> list[Path]:
        """The repo's run config, plus a file with the benchmark's overrides, if any."""
        cfg = {**self.overrides, **(extra or {})}
        doc: dict[str, Any] = {"ops": {self.op_key: {"config": cfg}}} if cfg else {}
        if self.executor != "default":
            doc["execution"] = {"config": EXECUTORS[self.executor]}
        if not doc:
            return [base]
        path = self.workdir / f"overrides_{len(list(self.workdir.glob('overrides_*')))}.yaml"
        path.write_text(yaml.safe_dump(doc))
        return [base, path]


def job_setup(
    code: contenders.Code, workdir: Path, executor: str, batch_size: int | None = None,
    transform_path: str | None = None,
) -> JobSetup:
    ops = yaml.safe_load((code.dir / REAL_CONFIG).read_text())["ops"]
    (op_key,) = ops
    # Real runs may be refused outside the maintenance windows: say so explicitly, as a release
    # engineer would outside them (the dry run gets the same config: it approves that plan).
    fields = config_fields(code)
    overrides: dict[str, Any] = (
        {"allow_outside_window": True} if "allow_outside_window" in fields else {}
    )
    if batch_size is not None:  # the run config's override of config/data_patches.yml
        overrides["batch_size"] = batch_size
    if transform_path is not None:  # default: the in-database path where the patch declares it
        if "transform_path" not in fields:
            raise SystemExit("--transform-path: the measured code has no transform_path option")
        overrides["transform_path"] = transform_path
    return JobSetup(code, workdir, op_key, overrides, executor)


def config_fields(code: contenders.Code) -> set[str]:
    """Field names of the patch's run config, as the measured code defines them."""
    probe = (
        "from stockrx_patches.registry import default_registry as r; "
        f"print(' '.join(r().get({JOB!r}).config_class.model_fields))"
    )
    res = common.run_monitored([sys.executable, "-c", probe], cwd=code.dir,
                               env=code.env(dict(os.environ)), timeout=120)
    if res.returncode != 0:
        raise SystemExit(f"cannot load the measured code in {code.dir}:\n{res.stderr[-2000:]}")
    return set(res.stdout.split())


def run_job(name: str, url: str, configs: list[Path], setup: JobSetup,
            args: argparse.Namespace) -> Outcome:
    return contenders.run_dagster_job(JOB, name, url, configs, setup.code, setup.workdir,
                                      args.timeout, AUDIT_KEY)


EMPTY_JOB = ("benchmarks.trivial_job", "empty_patch_shape")


def empty_job_executor(executor: str, home: Path) -> dict[str, Any]:
    """The empty job's executor config for ``--executor``. "default" is what the patch jobs'
    own executor does (patch_ops.executor): op processes forked from a fork server that has imported
    the code location, Dagster's CLI and the instance's modules; nothing of ours."""
    if executor != "default":
        return EXECUTORS[executor]
    from dagster import DagsterInstance

    from patch_ops.executor import instance_modules

    instance = DagsterInstance.from_config(str(home))
    try:
        preload = [EMPTY_JOB[0], "dagster._cli", *instance_modules(instance)]
    finally:
        instance.dispose()
    return {"multiprocess": {"start_method": {"forkserver": {"preload_modules": preload}}}}


def run_empty_job(setup: JobSetup, args: argparse.Namespace) -> Outcome:
    """benchmarks/trivial_job.py through ``dagster job execute`` with the patch job's executor
    and instance config: what Dagster itself costs a six-op run on the users' path."""
    home = dagster_timings.new_dagster_home(setup.workdir, "empty_job", setup.code.dir)
    config = setup.workdir / "empty_job.yaml"
    execution = empty_job_executor(setup.executor, home)
    config.write_text(yaml.safe_dump({"execution": {"config": execution}}))
    module, job = EMPTY_JOB
    path = os.pathsep.join(p for p in (str(common.REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, DAGSTER_HOME=str(home), PYTHONPATH=path)
    return contenders.execute_dagster_job("Dagster alone: 6 empty ops",
                                          ["-m", module, "-j", job, "-c", str(config)], env,
                                          common.REPO_ROOT, home, args.timeout)


def run_profile(url: str, setup: JobSetup, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The in-process engine profile, in a child process that imports the measured code."""
    cmd = [sys.executable, "-m", "benchmarks.profile_engine", "--database-url", url,
           "--out", str(Path(args.profile).resolve()),
           "--config", json.dumps(run_config(setup.real_config) | setup.overrides)]
    res = common.run_monitored(cmd, env=setup.code.env(dict(os.environ)), cwd=setup.code.dir,
                               timeout=args.timeout * 2)
    for line in res.stdout.splitlines():
        if line.startswith(common.RESULT_MARK):
            return list(json.loads(line[len(common.RESULT_MARK):]))
    log("profile failed:\n" + res.stderr[-3000:])
    return []


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


CONTENDERS = ("bare", "naive", *FLOORS, "dagster", "job", "zero")


def benchmark(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    code = contenders.measured_code(args.code, workdir)
    setup = job_setup(code, workdir, args.executor, args.batch_size, args.transform_path)
    against = None
    if args.against:
        against = job_setup(contenders.measured_code(args.against, workdir), workdir,
                            args.executor, args.batch_size, args.transform_path)
        log(f"against {against.code.label}: its job runs in every round too, interleaved")
    log(f"measuring {code.label}; job config overrides {setup.overrides or 'none'}; "
        f"executor {args.executor}; {args.rounds} round(s)"
        + (f"; application stand-in {args.app_writer:g} writes/s" if args.app_writer else ""))
    copies = databases.make_copies(args, workdir)
    log(f"seeded {copies.counts} in {copies.seed_seconds:.1f} s ({copies.description})")
    rounds: list[dict[str, Outcome]] = []
    run_ats: list[dt.datetime] = []
    profile: list[dict[str, Any]] = []
    try:
        seeded = digests.digest(copies.seeded_url, min(args.naive_rows, args.items))
        for r in range(args.rounds):
            if args.rounds > 1:
                log(f"round {r + 1} of {args.rounds}")
            outcomes, run_at = one_round(args, setup, copies, workdir, seeded, r, against)
            rounds.append(outcomes)
            run_ats.append(run_at)
        if args.profile:
            url = copies.fresh("profile")
            try:
                log("profiling the engine steps in-process ...")
                profile = run_profile(url, setup, args)
            finally:
                copies.discard(url)
    finally:
        copies.close()
    fields = harness.result_fields(args, code, copies)
    if against is not None:
        fields["code"] += f"; against {against.code.label}"
    return {
        **fields,
        "run_at": run_ats[-1].isoformat(),
        "percentage": str(setup.percentage),
        "outcomes": rounds[-1],
        "rounds": rounds,
        "run_ats": [r.isoformat() for r in run_ats],
        "profile": profile,
        "total_s": time.monotonic() - t0,
    }


def one_round(args: argparse.Namespace, setup: JobSetup, copies: databases.Copies, workdir: Path,
              seeded: Digest, r: int,
              against: JobSetup | None) -> tuple[dict[str, Outcome], dt.datetime]:
    """Round ``r`` (from 0): every contender once, each on a fresh copy (the naive baseline in
    the first round only: it is the reference for the rows/min bound, not part of the job's;
    the job of the code ``against`` after the measured code's in even rounds, before it in odd
    ones); the final data checked."""
    first = r == 0
    subset = min(args.naive_rows, args.items)
    outcomes: dict[str, Outcome] = {}
    run_at = dt.datetime(2026, 1, 15, 2, 0, 0)  # replaced by the real run's run_at

    def measure(key: str, url: str | None, fn) -> Outcome:  # type: ignore[no-untyped-def]
        """Run ``fn(url)`` (with the application stand-in writing, if asked); digest the data it
        leaves (``url`` None: it uses no database)."""
        log(f"running {key} ...")
        cpu0 = common.server_cpu_seconds(copies.server_pid)
        with app_writer(url if key != "naive" else None, args.items, args.app_writer, workdir,
                        key) as writer:
            out = fn(url)
        cpu1 = common.server_cpu_seconds(copies.server_pid)
        if cpu0 is not None and cpu1 is not None:
            out.server_cpu_s = (cpu1 - cpu0) * out.scale
        out.writer = writer
        out.digest = digests.digest(url, subset) if out.ok and url else None
        log(f"  {key}: rc {out.process.returncode}, {out.process.wall_s:.1f} s")
        outcomes[key] = out
        return out

    def job(prefix: str, label: str, s: JobSetup) -> dt.datetime | None:
        """The job's dry run, then its real run on the same data (the dry run approves it);
        the real run's run_at."""
        dry_cfg, real_cfg = s.config_files(s.dry_config), s.config_files(s.real_config)
        url = copies.fresh(prefix)
        try:
            dry = measure(f"{prefix}_dry", url,
                          lambda u: run_job(f"{label} dry", u, dry_cfg, s, args))
            if not dry.ok:  # without its dry run, the real run is refused
                return None
            databases.settle(url)
            real = measure(f"{prefix}_real", url,
                           lambda u: run_job(f"{label} real", u, real_cfg, s, args))
            if against and real.ok and real.execution:
                real.untimed_digest = digests.digest(url, subset,
                                                     run_at=real.execution["run_at"])
        finally:
            copies.discard(url)
        if real.execution and real.execution.get("run_at"):
            return real.execution["run_at"]
        if prefix == "job":
            real.notes.append(f"no run_at: baselines used {run_at}")
        return None

    if "job" in args.only:
        jobs = [("job", "job", setup)] + (
            [("against", f"job at {args.against}", against)] if against else [])
        for prefix, label, s in jobs if r % 2 == 0 else jobs[::-1]:
            at = job(prefix, label, s)
            if prefix == "job" and at is not None:
                run_at = at
    for key in ("bare", "naive", *FLOORS):
        if key in args.only and (first or key != "naive"):
            url = copies.fresh(key)
            try:
                measure(key, url, lambda u, k=key: run_worker(k, u, run_at, setup.percentage,
                                                              args))
            finally:
                copies.discard(url)
    if "dagster" in args.only:
        measure("dagster", None, lambda _: run_empty_job(setup, args))
    if "zero" in args.only:
        above_all = {"min_price": 1e9}
        zdry = setup.config_files(setup.dry_config, above_all)
        zreal = setup.config_files(setup.real_config, above_all)
        url = copies.fresh("zero")
        try:
            zero = measure("zero_dry", url, lambda u: run_job("job dry, 0 rows", u, zdry, setup,
                                                              args))
            if zero.ok:
                measure("zero_real", url, lambda u: run_job("job real, 0 rows", u, zreal, setup,
                                                            args))
        finally:
            copies.discard(url)

    ref = outcomes["job_real"].digest if "job_real" in outcomes else None
    checks = {
        "job_real": lambda o: "reference",
        "against_real": lambda o: same(o.untimed_digest, outcomes["job_real"].untimed_digest
                                       if "job_real" in outcomes else None, "full")
        + " to job real, its run's instant aside",
        "against_dry": lambda o: same(o.digest, seeded, "full") + " to seed",
        **{key: lambda o: same(o.digest, ref, "full") + " to job real"
           for key in ("bare", *FLOORS)},
        "dagster": lambda o: "no data (uses no database)",
        "naive": lambda o: same(o.digest, ref, "subset") + f" to job real on items ≤ {subset:,}",
        "job_dry": lambda o: same(o.digest, seeded, "full") + " to seed",
        "zero_dry": lambda o: same(o.digest, seeded, "full") + " to seed",
        "zero_real": lambda o: same(o.digest, seeded, "full") + " to seed",
    }
    for key, o in outcomes.items():
        o.check = checks[key](o)
    return outcomes, run_at
