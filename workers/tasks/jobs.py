"""Job-level tasks: finalize and cancel, in either lane."""

from __future__ import annotations

from service import queues
from service.context import Context
from service.lanes import finalize as finalizing
from workers.base import task


@task(queues.FINALIZE, time_limit=1800)
def finalize(ctx: Context, job_id: str) -> str | None:
    return finalizing.finalize_job(ctx, job_id)


@task(queues.CANCEL, time_limit=600)
def cancel(ctx: Context, job_id: str) -> None:
    finalizing.cancel_job(ctx, job_id)
