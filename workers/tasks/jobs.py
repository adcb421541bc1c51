"""Job-level tasks: finalize, cancel, webhooks, the sync lane."""

from __future__ import annotations

from service import queues
from service.context import Context
from service.lanes import batch as batches
from workers.base import task


@task(queues.FINALIZE, time_limit=1800)
def finalize(ctx: Context, job_id: str) -> str | None:
    return batches.finalize_job(ctx, job_id)


@task(queues.CANCEL, time_limit=600)
def cancel(ctx: Context, job_id: str) -> None:
    batches.cancel_job(ctx, job_id)


@task(queues.SYNC_ITEMS, time_limit=3600)
def sync_items(
    ctx: Context, job_id: str, start: int | None = None, end: int | None = None
) -> object:
    from service.lanes import sync as sync_lane

    if start is None or end is None:
        return sync_lane.fan_out(ctx, job_id)
    return sync_lane.run_slice(ctx, job_id, int(start), int(end))


@task(queues.WEBHOOK, time_limit=120)
def webhook(ctx: Context, job_id: str) -> int | None:
    from service.webhooks.outbound import send_job_finished

    return send_job_finished(ctx, job_id)
