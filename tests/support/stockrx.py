"""Helpers for tests that run patches against real databases."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from typing import Any

from dagster import DagsterInstance, Definitions, ExecuteInProcessResult
from sqlalchemy import insert, inspect, select, text
from sqlalchemy.engine import Engine

from patch_ops.database import get_engine
from patch_ops.patch import Patch, PatchSettings
from patch_ops.state import executions
from stockrx_patches.definitions import build_definitions
from stockrx_patches.registry import Registry, default_registry
from stockrx_patches.seed import seed_demo
from stockrx_patches.tables import (
    STOCKRX_TABLES,
    batches,
    create_stockrx_schema,
    inventories,
    inventory_logs,
)

T0 = dt.datetime(2026, 1, 10, 9, 0, 0)
PRICE_JOB = "inventory_price_adjustment"


def digest(
    engine: Engine, tables: tuple[str, ...] = STOCKRX_TABLES, ignore: tuple[str, ...] = ()
) -> dict[str, str]:
    """A hash of every row and column (but ``ignore``'s) of each table, in id order."""
    out = {}
    insp = inspect(engine)
    with engine.connect() as conn:
        for name in tables:
            cols = [c["name"] for c in insp.get_columns(name) if c["name"] not in ignore]
            h = hashlib.sha256()
            q = text(f"SELECT {', '.join(cols)} FROM {name} ORDER BY id")
            for row in conn.execute(q):
                h.update(repr(tuple(_norm(v) for v in row)).encode())
            out[name] = h.hexdigest()
    return out


def _norm(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 2)
    if hasattr(v, "as_tuple"):  # Decimal
        return round(float(v), 2)
    return v


def seeded(url: str, items: int = 300) -> Engine:
    engine = get_engine(url)
    seed_demo(engine, items=items, today=dt.date(2026, 11, 29))
    return engine


def hand_built(url: str, prices: list[float], quantity: int = 5) -> Engine:
    """Items with the given prices (ids 1..n), each with one lot and one receive log."""
    engine = get_engine(url)
    create_stockrx_schema(engine)
    with engine.begin() as conn:
        for i, price in enumerate(prices, start=1):
            conn.execute(
                insert(inventories).values(
                    id=i, name=f"item {i}", quantity=quantity, price=price, status=0,
                    batches_count=1, inventory_logs_count=1, created_at=T0,
                    updated_at=T0 + dt.timedelta(days=i),
                )
            )
            conn.execute(
                insert(batches).values(
                    inventory_id=i, lot_code=f"L{i}", expires_on=dt.date(2027, 1, 1),
                    quantity=quantity, created_at=T0, updated_at=T0,
                )
            )
            conn.execute(
                insert(inventory_logs).values(
                    inventory_id=i, delta=quantity, operation_type="receive",
                    previous_quantity=0, current_quantity=quantity, note="in",
                    created_at=T0, updated_at=T0,
                )
            )
        if engine.dialect.name == "postgresql":
            for t in STOCKRX_TABLES:
                conn.execute(
                    text(f"SELECT setval(pg_get_serial_sequence('{t}', 'id'), "
                         f"(SELECT max(id) FROM {t}))")
                )
    return engine


def defs_with(*extra: tuple[Patch, PatchSettings]) -> Definitions:
    """The real definitions plus test-only patches."""
    base = default_registry()
    patches = dict(base.patches)
    settings = dict(base.config.patches)
    for patch, s in extra:
        patches[patch.name] = patch
        settings[patch.name] = s
    config = type(base.config)(settings, base.config.security, base.config.scheduling)
    return build_definitions(Registry(patches, config))


def starved_defs() -> Definitions:
    """The real code location on a "machine" whose free memory is below the guard's reserve."""
    from resources.memory import MemoryGuard, available_mb
    from stockrx_patches.definitions import MEMORY

    guard = MemoryGuard(min_available_mb=available_mb() + 1e6)
    return build_definitions(default_registry(), {MEMORY: guard})


def run_job(
    url: str,
    job_name: str,
    op_name: str,
    config: dict[str, Any],
    defs: Definitions | None = None,
    instance: DagsterInstance | None = None,
) -> ExecuteInProcessResult:
    """Run a job in-process against the database at ``url`` (as STOCKRX_DATABASE_URL), with
    ``config`` for its first op ``op_name``."""
    from stockrx_patches.definitions import defs as default_defs

    job = (defs or default_defs).resolve_job_def(job_name)
    saved = os.environ.get("STOCKRX_DATABASE_URL")
    os.environ["STOCKRX_DATABASE_URL"] = url
    try:
        return job.execute_in_process(
            run_config={"ops": {op_name: {"config": config}}},
            raise_on_error=False,
            instance=instance,
        )
    finally:
        if saved is None:
            os.environ.pop("STOCKRX_DATABASE_URL", None)
        else:
            os.environ["STOCKRX_DATABASE_URL"] = saved


def run_patch(
    url: str,
    job_name: str,
    config: dict[str, Any],
    defs: Definitions | None = None,
    instance: DagsterInstance | None = None,
    approve: bool = True,
) -> ExecuteInProcessResult:
    """Run a patch job in-process against the database at ``url`` (as STOCKRX_DATABASE_URL).

    A real run (``dry_run: False``) goes the way a release engineer takes it through the
    approval gate: first the same config as a dry run, then the real run. If that dry run fails,
    its result is returned and the real run is not launched. ``approve=False`` launches only
    what is asked (tests of the gate itself, or test patches without the gate whose dry run
    fails on purpose).
    """
    if approve and config.get("dry_run") is False:
        dry = run_patch(url, job_name, {**config, "dry_run": True}, defs, instance, approve=False)
        if not dry.success:
            return dry
    return run_job(url, job_name, "plan_patch", config, defs, instance)


def validated_price_run(engine: Engine) -> tuple[str, Any]:
    """A real price run (+8 %) planned, backed up, transformed and validated, by the steps
    themselves (no approval, no Dagster), its commit still to come: (its id, the patch)."""
    from patch_ops.steps.backup import take_backup
    from patch_ops.steps.plan import plan_execution
    from patch_ops.steps.transform import run_transform
    from patch_ops.steps.validate import validate_execution
    from resources.memory import MemoryGuard

    registry = default_registry()
    patch, settings = registry.patches[PRICE_JOB], registry.settings(PRICE_JOB)
    config = patch.config_class(adjustment_type="percentage", adjustment_value=8, dry_run=False)
    execution_id = plan_execution(engine, patch, settings, config)
    take_backup(engine, execution_id)
    run_transform(engine, patch, execution_id, MemoryGuard())
    assert validate_execution(engine, patch, settings, execution_id)[0]
    return execution_id, patch


def latest_execution(engine: Engine, patch_name: str | None = None) -> dict[str, Any]:
    q = select(executions).order_by(executions.c.started_at.desc(), executions.c.execution_id)
    if patch_name:
        q = q.where(executions.c.patch_name == patch_name)
    with engine.connect() as conn:
        return dict(conn.execute(q.limit(1)).mappings().one())


def failure_description(result: ExecuteInProcessResult) -> str:
    for event in result.all_events:
        if event.is_step_failure:
            data = event.step_failure_data
            if data.user_failure_data is not None and data.user_failure_data.description:
                return str(data.user_failure_data.description)
            return str(data.error.message if data.error else "")
    return ""


def prices(engine: Engine) -> dict[int, float]:
    with engine.connect() as conn:
        return {r.id: float(r.price) for r in conn.execute(select(inventories.c.id, inventories.c.price))}
