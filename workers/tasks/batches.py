"""Tasks of the batch lane: thin adapters over :mod:`service.lanes`."""

from __future__ import annotations

from typing import Any

from service import queues
from service.context import Context
from service.lanes import collect as collecting
from service.lanes import duplicates
from service.lanes import plan as planning
from service.lanes import submit as submitting
from service.lanes import sweep as sweeping
from workers.base import task


@task(queues.PLAN, time_limit=1800)
def plan(ctx: Context, job_id: str) -> list[int]:
    return planning.plan_job(ctx, job_id)


@task(queues.SUBMIT, time_limit=1800)
def submit(ctx: Context, job_id: str, number: int) -> str:
    return submitting.submit_chunk(ctx, job_id, int(number))


@task(queues.SWEEP, time_limit=300)
def sweep(ctx: Context) -> dict[str, int]:
    return sweeping.sweep(ctx)


# On shutdown a collect stops between lines: the lines in hand (at most 16, each a few MB
# written to storage) finish, then its cursor is saved and it is sent again.
@task(queues.COLLECT_TASK, time_limit=queues.COLLECT_TIME_LIMIT, handover_seconds=120)
def collect(ctx: Context, job_id: str, number: int) -> dict[str, Any] | None:
    result = collecting.collect_chunk(ctx, job_id, int(number))
    return result.__dict__ if result else None


# A duplicate's output is only read (its tokens added once at the end): on shutdown it stops
# between lines and is sent again.
@task(queues.DUPLICATE, time_limit=3600, handover_seconds=60)
def duplicate(ctx: Context, job_id: str, number: int, batch_id: str) -> bool:
    return duplicates.account(ctx, job_id, int(number), batch_id)


@task(queues.POLL, time_limit=120)
def poll(ctx: Context, job_id: str, number: int, batch_id: str) -> str:
    return sweeping.poll_now(ctx, job_id, int(number), batch_id)
