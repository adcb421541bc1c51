"""Tasks of the batch path: thin adapters over :mod:`service.batches`."""

from __future__ import annotations

from typing import Any

from service import queues
from service.context import Context
from service.lanes import batch as batches
from workers.base import task


@task(queues.PLAN, time_limit=1800)
def plan(ctx: Context, job_id: str) -> list[int]:
    return batches.plan_job(ctx, job_id)


@task(queues.SUBMIT, time_limit=1800)
def submit(ctx: Context, job_id: str, n: int) -> str:
    return batches.submit_chunk(ctx, job_id, int(n))


@task(queues.SWEEP, time_limit=300)
def sweep(ctx: Context) -> dict[str, int]:
    return batches.sweep(ctx)


@task(queues.COLLECT_TASK, time_limit=4 * 3600)
def collect(ctx: Context, job_id: str, n: int) -> dict[str, Any] | None:
    result = batches.collect_chunk(ctx, job_id, int(n))
    return result.__dict__ if result else None
