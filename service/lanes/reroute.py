"""Reroute: what happens to a chunk whose model upstream will not take in a batch.

When upstream fails a batch because its model does not support the Batch API, collect hands the
chunk here (:func:`refused_batch`): the refusal is learned for the whole cluster
(:mod:`service.models.capability`, expiring), and from then on submit and plan send no batch of
that model (:func:`reroute_chunk`; plan moves an ``auto`` job with nothing submitted yet) until
the refusal expires.

* An ``auto`` job moves to the sync lane: its items queued in the chunk move to the sync lane's
  chunk 0 (still queued, each exactly once: a Lua script moves only items queued in that chunk),
  the job's lane becomes ``sync``, and the slices holding the moved items are enqueued; items
  still pending are taken by the sync fan-out.
* A ``batch`` job's items in the chunk fail with ``model_not_batch_capable``, naming the model
  and suggesting ``auto`` or ``sync``.

The same path takes a job leaving the batch lane for its deadline (:mod:`service.lanes.deadline`,
reason ``deadline``): its chunks not yet upstream move to the sync lane whatever its mode.

The chunk itself ends ``done`` (nothing of it ran upstream) and gives back its budget holds.

At least once: every step may run again. Moving or failing only touches items still queued in
the chunk, the chunk's status change is compare-and-set, and a crash between steps leaves the
chunk in a status (collecting, planned, waiting) that brings it back here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from service.context import Context
from service.jobs.deadline import DEADLINE
from service.jobs.model import CHUNK_DONE, Chunk, Job
from service.lanes.finalize import after_chunk
from service.lanes.items import record_failure
from service.lanes.sync import SLICE, SYNC_CHUNK
from service.models import capability
from service.queues import SYNC_ITEMS
from service.upstream import Batch

log = logging.getLogger("imagebatch.batches")


def refused_batch(ctx: Context, job: Job, chunk: Chunk, batch: Batch) -> bool:
    """A failed batch whose model does not support the Batch API: learn it, reroute the chunk.
    False for any other failure."""
    errors = list(batch.errors.data) if batch.errors and batch.errors.data else []
    refusal = next((e for e in errors if capability.is_batch_refusal(e.code, e.message)), None)
    if refusal is None:
        return False
    model = chunk.model or job.model
    if capability.learn_not_batch_capable(
        ctx.redis,
        model,
        batch_id=batch.id,
        message=refusal.message or "",
        ttl=ctx.settings.batch_unsupported_ttl,
    ):
        log.warning(
            "upstream refused batch %s: model %s does not support the Batch API; auto jobs "
            "for it use the sync lane and batch jobs' items fail for the next %s",
            batch.id,
            model,
            ctx.settings.batch_unsupported_ttl,
        )
    reroute_chunk(ctx, job, chunk, (chunk.status,))
    return True


def reroute_chunk(
    ctx: Context,
    job: Job,
    chunk: Chunk,
    from_statuses: Sequence[str],
    reason: str = capability.NOT_BATCH_CAPABLE,
) -> None:
    """Send a chunk's items elsewhere because its model cannot be batched: to the sync lane
    (``auto`` jobs still running) or to failed (``batch`` jobs). With ``reason`` ``deadline``
    (:mod:`service.lanes.deadline`) a live job's items go to the sync lane whatever its mode."""
    store = ctx.store
    indexes = list(store.chunk_indexes(chunk.job_id, chunk.number))
    if job.is_live and (job.requested_mode == "auto" or reason == DEADLINE):
        _to_sync(ctx, job, chunk, indexes, reason)
    else:
        action = "fail" if job.is_live else "cancel"
        error = capability.not_batch_capable_error(chunk.model or job.model)
        for index in indexes:
            record_failure(ctx, job, chunk.number, index, error, action)
    ended = store.set_chunk_status_if(
        chunk.job_id,
        chunk.number,
        list(from_statuses),
        CHUNK_DONE,
        collected_at=time.time(),
        last_error=reason,
    )
    store.unmark(chunk.job_id, chunk.number)
    if ended:
        ctx.budgets.release_chunk(job, chunk, None)
    after_chunk(ctx, chunk.job_id)


def _to_sync(ctx: Context, job: Job, chunk: Chunk, indexes: list[int], reason: str) -> None:
    store = ctx.store
    store.switch_to_sync(job.id, job.lane_reason or reason)
    store.ensure_sync_chunk(job.id, SYNC_CHUNK)
    moved = store.move(job.id, chunk.number, SYNC_CHUNK, indexes)
    for start in sorted({(i // SLICE) * SLICE for i in moved}):
        ctx.enqueue(SYNC_ITEMS, job.id, start, min(start + SLICE, job.items))
    if store.counts(job.id).get("pending", 0) > 0:
        ctx.enqueue(SYNC_ITEMS, job.id)  # the fan-out takes what was never planned
    log.info(
        "job %s chunk %s: %d items moved to the sync lane (%s)",
        job.id,
        chunk.number,
        len(moved),
        "its deadline" if reason == DEADLINE else f"model {job.model} cannot be batched",
    )
