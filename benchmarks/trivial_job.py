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


def _hand_on(name: str):  # type: ignore[no-untyped-def]
    """An op that hands the execution id to the next one, as the patch jobs' ops do."""

    @op(name=name)
    def step(execution_id: str) -> str:
        return execution_id

    return step


MIDDLE = [_hand_on(n) for n in ("take_backup", "transform_batches", "validate_changes",
                                "commit_changes")]


@op
def verify_commit(execution_id: str) -> None:
    return None


@job
def empty_patch_shape() -> None:
    execution_id = plan_patch()
    for step in MIDDLE:
        execution_id = step(execution_id)
    verify_commit(execution_id)


defs = Definitions(jobs=[empty_patch_shape])
