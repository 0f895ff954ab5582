"""Dagster's own share of a run: a job of the patch jobs' shape (plan → backup → transform →
validate → commit → verify, each op handing a small value to the next) whose ops do nothing and
import nothing but Dagster. ``python -m benchmarks.price_adjustment --only dagster`` runs it
through ``dagster job execute`` with the executor the patch job is measured with, so its wall time
is the least any six-op Dagster job takes on that path on this machine.
"""

from __future__ import annotations

from dagster import Definitions, job, op


@op
def plan_patch() -> str:
    return "execution-id"


@op
def take_backup(execution_id: str) -> str:
    return execution_id


@op
def transform_batches(execution_id: str) -> str:
    return execution_id


@op
def validate_changes(execution_id: str) -> str:
    return execution_id


@op
def commit_changes(execution_id: str) -> str:
    return execution_id


@op
def verify_commit(execution_id: str) -> None:
    return None


@job
def empty_patch_shape() -> None:
    verify_commit(commit_changes(validate_changes(transform_batches(take_backup(plan_patch())))))


defs = Definitions(jobs=[empty_patch_shape])
