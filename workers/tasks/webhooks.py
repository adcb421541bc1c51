"""Webhook tasks: telling a caller that its job finished."""

from __future__ import annotations

from service import queues
from service.context import Context
from service.webhooks.outbound import send_job_finished
from workers.base import task


@task(queues.WEBHOOK, time_limit=120)
def webhook(ctx: Context, job_id: str) -> int | None:
    return send_job_finished(ctx, job_id)
