"""Finalize and cancel: how a job ends, in either lane.

A job finalizes once every item is final (succeeded, failed or cancelled): the manifest is written
to storage (its images recorded in the tenant's reuse index as it is), the final status set (``succeeded``, ``partially_failed``, ``failed``, ``cancelled``
or ``budget_exhausted``), Redis drops the per-item state, and the webhook is queued.

Cancel stops what has not reached upstream (its items are cancelled) and cancels the upstream
batches; their partial output is real and billed, so it is collected as usual before the job
finalizes as ``cancelled``. Finished images are kept.

At least once: finalize runs under a lease and re-checks the status inside it, so a repeat does
nothing; cancel only acts on a job already marked ``cancelling`` and every step is idempotent.
"""

from __future__ import annotations

import logging

from service import metrics
from service.context import Context
from service.errors import TransientError
from service.failpoints import failpoint
from service.jobs.batchrecord import BatchRecord
from service.jobs.manifest import write_manifest
from service.jobs.model import (
    CHUNK_CANCELLED,
    CHUNK_NOT_SUBMITTED,
    CHUNK_SUBMITTED,
    JOB_CANCELLING,
    Job,
)
from service.jobs.reuse import ReuseIndex, manifest_recorder
from service.queues import FINALIZE, PLAN, SYNC_ITEMS
from service.redis import keys
from service.redis.leases import Lease
from service.upstream import UpstreamError
from service.webhooks import outbound

log = logging.getLogger("imagebatch.batches")


def final_status(job: Job, counts: dict[str, int]) -> str:
    if job.status == JOB_CANCELLING:
        return "cancelled"
    if job.budget_exhausted:
        return "budget_exhausted"
    succeeded = counts.get("succeeded", 0)
    failed = counts.get("failed", 0) + counts.get("cancelled", 0)
    if failed == 0:
        return "succeeded"
    return "failed" if succeeded == 0 else "partially_failed"


def unfinished(counts: dict[str, int]) -> int:
    """Items not yet final."""
    return counts.get("pending", 0) + counts.get("queued", 0)


def after_chunk(ctx: Context, job_id: str) -> None:
    """A chunk ended: plan what went back to pending (or, for a job that moved to the sync
    lane, send it there), or finalize when nothing is left."""
    counts = ctx.store.counts(job_id)
    if counts.get("pending", 0) > 0:
        sync = ctx.store.job_mode(job_id) == "sync"
        ctx.enqueue(SYNC_ITEMS if sync else PLAN, job_id)
    elif counts.get("queued", 0) <= 0:
        ctx.enqueue(FINALIZE, job_id)


def finalize_job(ctx: Context, job_id: str) -> str | None:
    """Write the manifest and set the final status, once every item is final."""
    store = ctx.store
    job = store.job(job_id)
    if job is not None and job.is_final:
        _lost_webhook(ctx, job)
        return None
    if job is None or unfinished(store.counts(job_id)) > 0:
        return None
    if BatchRecord(ctx.redis).job_has_open_duplicates(job_id):
        return None  # a duplicate upstream batch is still to be accounted (the sweep sees to it)
    with Lease(ctx.redis, keys.finalize_lock(job_id), ctx.settings.lease_seconds).held() as got:
        job = store.job(job_id)  # a finalize that held the lease before us may have finished
        if not got or job is None or job.is_final:
            return None
        counts = store.counts(job_id)
        # The job's images become reusable as its manifest is written.
        write_manifest(ctx, job, observe=manifest_recorder(ReuseIndex.of(ctx, job.tenant), job.id))
        status = final_status(job, counts)
        failpoint("finalize.before_status")
        store.finish(job_id, job.tenant, status)
        failpoint("finalize.after_status")
        metrics.count(ctx.redis, metrics.JOBS_FINISHED, {"status": status})
        log.info("job %s finished: %s %s", job_id, status, counts)
        if job.webhook_url:
            outbound.schedule(ctx, store.job(job_id) or job)
        return status


def _lost_webhook(ctx: Context, job: Job) -> None:
    """A finalize killed between the final status and scheduling the webhook left it unsent;
    its message, delivered again, schedules it here, under the lease (never while another
    finalize of the job is at it). While the lease is held (by that finalize, or by the killed
    one until its lease lapses) the task retries."""
    if not outbound.may_be_lost(ctx, job):
        return
    with Lease(ctx.redis, keys.finalize_lock(job.id), ctx.settings.lease_seconds).held() as got:
        if not got:
            raise TransientError(f"job {job.id}: its webhook may not be scheduled yet")
        current = ctx.store.job(job.id)
        if current is not None and current.is_final and outbound.schedule_if_lost(ctx, current):
            log.warning("job %s: its webhook was never scheduled; scheduled now", job.id)


def cancel_job(ctx: Context, job_id: str) -> None:
    """Cancel upstream batches and every item that has not reached upstream."""
    store = ctx.store
    job = store.job(job_id)
    if job is None or job.status != JOB_CANCELLING:
        return
    not_upstream: list[int] = []
    for chunk in store.job_chunks(job_id):
        if chunk.status == CHUNK_SUBMITTED and chunk.batch_id:
            try:
                ctx.upstream.cancel_batch(chunk.batch_id)
            except UpstreamError as exc:
                if exc.transient:
                    raise
                log.info(
                    "cancel %s: upstream said %s (it may have ended already)",
                    chunk.batch_id,
                    exc.status,
                )
        elif chunk.status in CHUNK_NOT_SUBMITTED:
            store.set_chunk_status_if(job_id, chunk.number, CHUNK_NOT_SUBMITTED, CHUNK_CANCELLED)
            store.unmark(job_id, chunk.number)
            not_upstream.append(chunk.number)
    store.cancel_unsubmitted(job_id, not_upstream)
    ctx.enqueue_once(FINALIZE, job_id, job_id, ttl=1)
