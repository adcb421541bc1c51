"""Webhook tasks, on their own queue: one attempt at telling a caller its job finished, and the
sweep that queues the attempts that are due (retries, and tasks that were lost)."""

from __future__ import annotations

from service import queues
from service.context import Context
from service.webhooks import outbound
from workers.base import task


# The attempt itself is bounded by IMAGEBATCH_WEBHOOK_TIMEOUT_SECONDS (at most 300 s); the time
# limit only catches a bug.
@task(queues.WEBHOOK, time_limit=420)
def webhook(ctx: Context, job_id: str) -> str | None:
    return outbound.deliver(ctx, job_id)


@task(queues.WEBHOOK_SWEEP, time_limit=60)
def webhook_sweep(ctx: Context) -> int:
    return outbound.sweep(ctx)
