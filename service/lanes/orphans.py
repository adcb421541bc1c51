"""No chunk without an owner: the sweep's audit of a job's chunks.

Every chunk state has someone who moves it on: ``assembling`` the planner (under the plan
lease), ``planned`` and ``waiting`` the submitter (found by the sweep on the waiting set),
``submitted`` and ``collecting`` the sweep's poll and collect (the active set), ``sync`` the sync
lane. A process killed between two writes can leave a chunk in a state whose owner never hears
of it: planned but not on the waiting set, submitted but not on the active set, assembling with
no planner left, or cancelled with items still queued in it. Such a job would wait forever with
items queued. :func:`adopt` finds those chunks and hands each back to its owner; every action is
idempotent, so running it while the owner is merely slow does no harm.

It runs from the sweep for each unfinished batch job, at most once every few sweeps per job.
"""

from __future__ import annotations

import logging

from service.context import Context
from service.jobs.model import (
    CHUNK_ASSEMBLING,
    CHUNK_CANCELLED,
    CHUNK_NOT_SUBMITTED,
    UPSTREAM_CHUNK_STATES,
    Job,
)
from service.lanes.plan import close_chunk
from service.lanes.submit import cancel_unsubmitted_chunk
from service.queues import PLAN
from service.redis import keys
from service.redis.leases import mark_once

log = logging.getLogger("imagebatch.batches")

# How many sweeps apart one job's chunks are audited.
AUDIT_EVERY_SWEEPS = 6


def due(ctx: Context, job_id: str) -> bool:
    """True at most once every few sweeps per job (a marker in Redis)."""
    seconds = max(ctx.settings.poll_seconds * AUDIT_EVERY_SWEEPS, 1.0)
    return mark_once(ctx.redis, keys.chunk_audit(job_id), seconds)


def adopt(ctx: Context, job: Job) -> int:
    """Hand every ownerless chunk of ``job`` back to its owner; returns how many were adopted."""
    store = ctx.store
    numbers = store.chunks(job.id)
    if not numbers:
        return 0
    adopted = 0
    planner = bool(ctx.redis.exists(keys.plan_lock(job.id)))
    for number, (status, open_lines, watched) in zip(
        numbers, store.chunk_watch(job.id, numbers), strict=True
    ):
        action = _action(job, status, open_lines, watched, planner)
        if action is None:
            continue
        log.warning("job %s chunk %s was left %s with no owner: %s", job.id, number, status, action)
        adopted += 1
        if action == "plan":
            ctx.enqueue_once(PLAN, job.id, job.id)
        elif action == "wait":
            close_chunk(ctx, job.id, number)
        elif action == "watch":
            store.mark_active(job.id, number)
        elif action == "cancel":
            cancel_unsubmitted_chunk(ctx, job.id, number)
        elif action == "cancel-items":
            store.cancel_unsubmitted(job.id, [number])
    return adopted


def _action(job: Job, status: str, open_lines: int, watched: bool, planner: bool) -> str | None:
    """What an ownerless chunk needs, or None when it has an owner (or needs nothing)."""
    if status in CHUNK_NOT_SUBMITTED and not job.is_live:
        # A stopping job: what never went upstream is cancelled (cancel may have been cut short).
        return "cancel" if not watched or status == CHUNK_ASSEMBLING else None
    if status == CHUNK_ASSEMBLING:
        # The planner closes assembling chunks; only when no planner holds the job's lease.
        return None if planner else "plan"
    if status in CHUNK_NOT_SUBMITTED:
        return None if watched else "wait"
    if status in UPSTREAM_CHUNK_STATES:
        return None if watched else "watch"
    if status == CHUNK_CANCELLED and open_lines > 0:
        return "cancel-items"  # cancelled, but its items were never marked so
    return None
