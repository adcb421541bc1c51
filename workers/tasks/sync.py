"""The sync lane's task: a job's fan-out into slices, and each slice."""

from __future__ import annotations

from service import queues
from service.context import Context
from service.lanes import sync
from workers.base import task


# On shutdown a slice sends no further item; the requests in flight finish (each bounded by
# IMAGEBATCH_OPENAI_TIMEOUT_SECONDS, 600 s by default: an image already paid for is kept).
@task(queues.SYNC_ITEMS, time_limit=3600, handover_seconds=660)
def sync_items(
    ctx: Context, job_id: str, start: int | None = None, end: int | None = None
) -> object:
    if start is None or end is None:
        return sync.fan_out(ctx, job_id)
    return sync.run_slice(ctx, job_id, int(start), int(end))
