"""Submit: upload a chunk's input file and create its upstream batch, exactly once.

Before anything goes upstream the chunk's budgets are reserved (:mod:`service.budgets.policy`):
a chunk that does not fit waits on the sweep's waiting set; one that would cross a money cap is
cancelled and its job stops.

At least once: submit runs under a lease (one submitter per chunk), records the input file and
batch ids the moment they exist, creates batches with SDK retries off, and, when a previous
attempt may have created the batch and died before recording it (``create_started`` set, no
``batch_id``), first lists upstream batches for the chunk's tag in the batch metadata.
"""

from __future__ import annotations

import logging
import tempfile
import time

from service.context import Context
from service.jobs.model import (
    CHUNK_ASSEMBLING,
    CHUNK_CANCELLED,
    CHUNK_DONE,
    CHUNK_PLANNED,
    CHUNK_SUBMITTED,
    CHUNK_WAITING,
    Chunk,
    Job,
)
from service.jobs.request import request_lines
from service.lanes.finalize import after_chunk
from service.lanes.items import BadReference, RefResolver, fail_bad_reference
from service.lanes.plan import LOCK_SECONDS, upstream_line
from service.lanes.reroute import reroute_chunk
from service.models import capability
from service.queues import FINALIZE
from service.redis import keys
from service.redis.leases import Lease
from service.upstream import Batch

log = logging.getLogger("imagebatch.batches")

# A batch found by its metadata tag counts when created at most this long before the attempt
# that lost track of it began (clock skew between us and upstream).
_CLOCK_SLACK_SECONDS = 300


def submit_chunk(ctx: Context, job_id: str, number: int) -> str:
    """Returns what happened: ``submitted``, ``already``, ``waiting`` (budget), ``empty``,
    ``cancelled``, ``rerouted`` (the model cannot be batched now) or ``skipped``."""
    store = ctx.store
    chunk, job = store.chunk(job_id, number), store.job(job_id)
    if chunk is None or job is None:
        return "skipped"
    if chunk.upstream:
        store.mark_active(job_id, number)
        return "already"
    if chunk.status not in (CHUNK_PLANNED, CHUNK_WAITING):
        return "skipped"
    if not job.is_live:
        cancel_unsubmitted_chunk(ctx, job_id, number)
        return "cancelled"
    with Lease(ctx.redis, keys.submit_lock(job_id, number), LOCK_SECONDS).held() as got:
        return _submit(ctx, job, job_id, number) if got else "skipped"


def _submit(ctx: Context, job: Job, job_id: str, number: int) -> str:
    store = ctx.store
    # Another submitter may have finished between our first look and taking the lease.
    chunk = store.chunk(job_id, number)
    if chunk is None or chunk.status not in (CHUNK_PLANNED, CHUNK_WAITING):
        return "already"
    if not capability.batch_capable(ctx.redis, ctx.catalog, chunk.model or job.model):
        # Upstream refused batches of this model lately: no batch is created for it.
        reroute_chunk(ctx, job, chunk, (CHUNK_PLANNED, CHUNK_WAITING))
        return "rerouted"
    if not ctx.budgets.reserve_chunk(job, chunk):
        store.set_chunk_status_if(
            job_id, number, [CHUNK_PLANNED], CHUNK_WAITING, waiting_since=time.time()
        )
        store.mark_waiting(job_id, number)
        return "waiting"
    input_file_id = chunk.input_file_id or _upload_input(ctx, job, chunk)
    if input_file_id is None:  # every item's reference image was unusable: nothing to send
        store.set_chunk_status_if(job_id, number, [CHUNK_PLANNED, CHUNK_WAITING], CHUNK_DONE)
        store.unmark(job_id, number)
        ctx.budgets.release_chunk(job, chunk, None)
        after_chunk(ctx, job_id)
        return "empty"
    batch = _find_or_create_batch(ctx, chunk, input_file_id)
    store.set_chunk_status_if(
        job_id,
        number,
        [CHUNK_PLANNED, CHUNK_WAITING],
        CHUNK_SUBMITTED,
        batch_id=batch.id,
        upstream_status=batch.status,
        submitted_at=time.time(),
    )
    store.mark_active(job_id, number)
    log.info("job %s chunk %s submitted as %s (%s lines)", job_id, number, batch.id, chunk.lines)
    return "submitted"


def _upload_input(ctx: Context, job: Job, chunk: Chunk) -> str | None:
    """Stream the chunk's JSONL to a temporary file, upload it, record the file id.

    An item whose reference image cannot be read fails on its own (it would fail upstream
    too); None when no item of the chunk is left to send.
    """
    members = set(ctx.store.chunk_indexes(chunk.job_id, chunk.number))
    refs = RefResolver(ctx, chunk.job_id)
    lines = 0
    prefix = f"imagebatch-{chunk.job_id}-{chunk.number}-"
    with tempfile.TemporaryFile(prefix=prefix, suffix=".jsonl") as fh:
        for line in request_lines(ctx.storage, chunk.job_id, members):
            try:
                body = refs.resolve(line.body)
            except BadReference as exc:
                fail_bad_reference(ctx, job, chunk.number, line, exc)
                continue
            fh.write(upstream_line(line.index, chunk.endpoint, body))
            lines += 1
        if lines == 0:
            return None
        fh.seek(0)
        name = f"{chunk.job_id}-{chunk.number}.jsonl"
        file_id = ctx.upstream.upload(name, fh, "batch", "application/jsonl")
    ctx.store.update_chunk(chunk.job_id, chunk.number, input_file_id=file_id)
    return file_id


def _find_or_create_batch(ctx: Context, chunk: Chunk, input_file_id: str) -> Batch:
    tag = chunk.attempt_ref
    if chunk.batch_id:
        return ctx.upstream.batch(chunk.batch_id)
    if chunk.create_started:
        # A previous attempt may have created the batch and died before recording it.
        found = _find_batch(ctx, tag, chunk.create_started)
        if found is not None:
            ctx.store.record_batch(chunk.job_id, chunk.number, found.id)
            return found
    ctx.store.update_chunk(chunk.job_id, chunk.number, create_started=time.time())
    batch = ctx.upstream.create_batch(
        input_file_id,
        chunk.endpoint,
        ctx.settings.completion_window,
        {"imagebatch_job": chunk.job_id, "imagebatch_chunk": tag},
    )
    ctx.store.record_batch(chunk.job_id, chunk.number, batch.id)
    return batch


def _find_batch(ctx: Context, tag: str, since: float) -> Batch | None:
    """An upstream batch carrying our chunk tag, created since ``since`` (minus clock slack)."""
    for batch in ctx.upstream.recent_batches():
        if batch.created_at < since - _CLOCK_SLACK_SECONDS:
            return None
        if (batch.metadata or {}).get("imagebatch_chunk") == tag:
            return batch
    return None


def cancel_unsubmitted_chunk(ctx: Context, job_id: str, number: int) -> None:
    """A chunk of a stopping job that never went upstream: its items are cancelled."""
    if ctx.store.set_chunk_status_if(
        job_id, number, [CHUNK_PLANNED, CHUNK_WAITING, CHUNK_ASSEMBLING], CHUNK_CANCELLED
    ):
        ctx.store.cancel_unsubmitted(job_id, [number])
    ctx.store.unmark(job_id, number)
    ctx.enqueue_once(FINALIZE, job_id, job_id)
