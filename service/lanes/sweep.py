"""The sweep: beat's periodic pass over everything in flight; the safety net of both lanes.

Every ``IMAGEBATCH_POLL_SECONDS`` it polls each active upstream batch once (an ended one is
queued for collect), hands a collect whose lease lapsed to another worker, re-enqueues the
submit of every waiting chunk, and for every unfinished job re-sends whatever was lost: a plan
for pending items, a sync job's fan-out or stalled slices, a finalize when nothing is left. It
also keeps each job's forecast and applies its deadline (:mod:`service.lanes.deadline`).
Nothing waits in a Celery countdown. OpenAI's batch webhooks (:func:`poll_now`) poll a batch the
moment it ends; the sweep remains the safety net for events that never come.

At least once: a lock keeps overlapping sweeps from doubling upstream calls; every task it sends
is idempotent, and enqueue markers keep it from queueing the same task twice while one waits.
"""

from __future__ import annotations

import logging
import time

from service.context import Context
from service.errors import TransientError
from service.failpoints import failpoint
from service.jobs.model import (
    CHUNK_COLLECTING,
    CHUNK_NOT_SUBMITTED,
    CHUNK_SUBMITTED,
    JOB_LIVE,
    Chunk,
)
from service.lanes import deadline, duplicates, orphans, sync
from service.lanes.finalize import unfinished
from service.queues import (
    COLLECT_TASK,
    FINALIZE,
    LONGEST_TASK_SECONDS,
    PLAN,
    POLL,
    SUBMIT,
    SYNC_ITEMS,
)
from service.redis import keys
from service.redis.leases import mark_once, unmark
from service.storage import StorageError
from service.upstream import UpstreamError

log = logging.getLogger("imagebatch.batches")

TERMINAL_BATCH = {"completed", "failed", "expired", "cancelled"}
TEMP_SWEEP_SECONDS = 600  # how often abandoned temporary files are looked for


def sweep(ctx: Context) -> dict[str, int]:
    """One pass; returns what it did (for the task's log and the tests)."""
    seen = {
        "polled": 0,
        "ended": 0,
        "resubmitted": 0,
        "replanned": 0,
        "finalized": 0,
        "adopted": 0,
    }
    if not mark_once(ctx.redis, keys.SWEEP_LOCK, max(ctx.settings.poll_seconds * 4, 10)):
        return seen
    try:
        failpoint("sweep.pass")
        _active_chunks(ctx, seen)
        duplicates.sweep(ctx)
        sweep_temp(ctx)
        for job_id, number in ctx.store.waiting_chunks():
            if ctx.enqueue_once(SUBMIT, f"{job_id}:{number}", job_id, number):
                seen["resubmitted"] += 1
        for job_id in ctx.store.active_jobs():
            _job(ctx, job_id, seen)
        return seen
    finally:
        unmark(ctx.redis, keys.SWEEP_LOCK)


def sweep_temp(ctx: Context) -> int:
    """At most every TEMP_SWEEP_SECONDS: remove what writes killed mid-way left in storage
    (temp files, incomplete uploads) older than the longest task. Returns how many."""
    if not mark_once(ctx.redis, keys.TEMP_SWEEP, TEMP_SWEEP_SECONDS):
        return 0
    try:
        removed = ctx.storage.sweep_temp(LONGEST_TASK_SECONDS)
    except StorageError as exc:
        log.warning("sweep: could not remove abandoned temporary files: %s", exc)
        return 0
    if removed:
        log.info("sweep: removed %d abandoned temporary files from storage", removed)
    return removed


def _active_chunks(ctx: Context, seen: dict[str, int]) -> None:
    for job_id, number, _since in ctx.store.active_chunks():
        chunk = ctx.store.chunk(job_id, number)
        if chunk is None:
            ctx.store.unmark(job_id, number)
        elif chunk.status == CHUNK_SUBMITTED:
            seen["polled"] += 1
            if chunk.batch_id and poll(ctx, chunk, chunk.batch_id):
                seen["ended"] += 1
        elif chunk.status == CHUNK_COLLECTING:
            if not ctx.redis.exists(keys.collect_lease(job_id, number)):
                ttl = ctx.settings.collect_lease_seconds
                ctx.enqueue_once(COLLECT_TASK, chunk.ref, job_id, number, ttl=ttl)
        elif chunk.status in CHUNK_NOT_SUBMITTED:
            # Sent back to waiting by a collect cut short before it moved the chunk's marks.
            ctx.store.unmark_active(job_id, number)
            ctx.store.close_chunk(job_id, number)
        else:
            ctx.store.unmark(job_id, number)


def poll(ctx: Context, chunk: Chunk, batch_id: str) -> bool:
    """Ask upstream how the chunk's batch is doing; True when it ended (its collect is queued)."""
    try:
        batch = ctx.upstream.batch(batch_id)
    except UpstreamError as exc:
        log.warning("sweep: could not poll %s: %s", batch_id, exc)
        return False
    rc = batch.request_counts
    ctx.store.update_chunk(
        chunk.job_id,
        chunk.number,
        upstream_status=batch.status,
        upstream_completed=rc.completed if rc else 0,
        upstream_failed=rc.failed if rc else 0,
    )
    if batch.status in TERMINAL_BATCH and ctx.store.set_chunk_status_if(
        chunk.job_id, chunk.number, [CHUNK_SUBMITTED], CHUNK_COLLECTING, ended_at=time.time()
    ):
        failpoint("sweep.batch_ended")
        ctx.enqueue_once(COLLECT_TASK, chunk.ref, chunk.job_id, chunk.number)
        return True
    return False


def batch_event(ctx: Context, batch_id: str) -> str:
    """An OpenAI webhook named ``batch_id``: queue an immediate poll of its chunk. ``unknown``
    for a batch that is not ours (the project's other batches) or long gone."""
    found = ctx.store.chunk_of_batch(batch_id)
    if found is None:
        return "unknown"
    job_id, number = found
    ctx.enqueue(POLL, job_id, number, batch_id)
    return "polling"


def poll_now(ctx: Context, job_id: str, number: int, batch_id: str) -> str:
    """OpenAI's webhook says the chunk's batch ended: poll it now rather than at the next sweep.

    Returns ``ended`` (collect queued), ``stale`` (the chunk has moved on: another attempt's
    batch, or already collected) or ``unknown``. Raises :class:`TransientError` (the task
    retries within seconds) while submit has not yet marked the chunk submitted, or while
    upstream does not yet show the batch ended: the event may outrun both.
    """
    chunk = ctx.store.chunk(job_id, number)
    if chunk is None or chunk.batch_id != batch_id:
        return "unknown"
    if chunk.status in CHUNK_NOT_SUBMITTED:
        raise TransientError(f"batch {batch_id}: its submit has not finished recording it")
    if chunk.status != CHUNK_SUBMITTED:
        return "stale"
    if poll(ctx, chunk, batch_id):
        return "ended"
    current = ctx.store.chunk(job_id, number)
    if current is not None and current.status == CHUNK_SUBMITTED:
        raise TransientError(f"batch {batch_id}: upstream does not show it ended yet")
    return "stale"


def _job(ctx: Context, job_id: str, seen: dict[str, int]) -> None:
    job = ctx.store.job(job_id)
    if job is None or job.is_final:
        ctx.store.forget_active(job_id)
        deadline.forget(ctx, job_id)
        return
    acted = deadline.check(ctx, job)  # its forecast, and what its deadline asks
    if acted in ("cancelled", "sync"):
        seen[f"deadline_{acted}"] = seen.get(f"deadline_{acted}", 0) + 1
        job = ctx.store.job(job_id) or job
    counts = ctx.store.counts(job_id)
    if job.mode == "sync" and job.status in JOB_LIVE:
        if counts.get("pending", 0) > 0:
            ctx.enqueue_once(SYNC_ITEMS, job_id, job_id)  # its fan-out was lost
        elif counts.get("queued", 0) > 0:
            sync.requeue_stalled(ctx, job_id)
        else:
            ctx.enqueue_once(FINALIZE, job_id, job_id)
        return
    if unfinished(counts) > 0 and orphans.due(ctx, job_id):
        seen["adopted"] += orphans.adopt(ctx, job)
    if counts.get("pending", 0) > 0 and job.status in JOB_LIVE:
        if not ctx.redis.exists(keys.plan_lock(job_id)) and ctx.enqueue_once(PLAN, job_id, job_id):
            seen["replanned"] += 1
    elif unfinished(counts) <= 0 and ctx.enqueue_once(FINALIZE, job_id, job_id):
        seen["finalized"] += 1
