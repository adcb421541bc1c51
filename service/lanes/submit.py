"""Submit: upload a chunk's input file and create its upstream batch, exactly once.

Before anything goes upstream the chunk's budgets are reserved (:mod:`service.budgets.policy`):
a chunk that does not fit waits on the sweep's waiting set; one that would cross a money cap is
cancelled and its job stops.

At least once, and no create without the lease: submit runs under a lease (one submitter per
chunk), records the input file and batch ids the moment they exist, and creates batches with SDK
retries off. It checks it still holds the lease right before the create, and records
``create_started`` and the ``batch_id`` with a compare-and-set on the lease's token
(:mod:`service.jobs.batchrecord`): a submitter that lost its lease mid-create writes nothing.

A create whose outcome is unknown (``create_started`` set, no ``batch_id``: a timeout, a lost
lease, a crash after the create) is resolved upstream first: batches carrying the chunk's
attempt tag in their metadata, preferring the one made from the chunk's input file, are looked
up, and until twice ``IMAGEBATCH_BATCH_CREATE_TIMEOUT_SECONDS`` have passed since that create began
(it may still land) nothing creates another. A batch created twice anyway is a duplicate
(:mod:`service.lanes.duplicates`): cancelled, and what it billed added to the job.
"""

from __future__ import annotations

import logging
import tempfile
import time

from service.context import Context
from service.failpoints import failpoint
from service.jobs import eta
from service.jobs.batchrecord import BatchRecord
from service.jobs.deadline import DEADLINE
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
from service.lanes import duplicates
from service.lanes.finalize import after_chunk
from service.lanes.items import BadReference, RefResolver, fail_bad_reference
from service.lanes.plan import upstream_line
from service.lanes.reroute import reroute_chunk
from service.models import capability
from service.queues import FINALIZE
from service.redis import keys
from service.redis.leases import Lease, LeaseLost
from service.upstream import Batch

log = logging.getLogger("imagebatch.batches")


def submit_chunk(ctx: Context, job_id: str, number: int) -> str:
    """Returns what happened: ``submitted``, ``already``, ``waiting`` (budget), ``empty``,
    ``cancelled``, ``rerouted`` (the model cannot be batched now), ``unresolved`` (an earlier
    create's outcome is not known yet), ``lease-lost`` or ``skipped``."""
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
    lease = Lease(ctx.redis, keys.submit_lock(job_id, number), ctx.settings.lease_seconds)
    with lease.held() as got:
        try:
            return _submit(ctx, job, job_id, number, lease) if got else "skipped"
        except LeaseLost as exc:
            # Paused or cut off past the lease: whoever holds it now carries on (the chunk is
            # still on the waiting set), and nothing was created by us after the loss.
            log.warning("job %s chunk %s: %s", job_id, number, exc)
            return "lease-lost"


def _submit(ctx: Context, job: Job, job_id: str, number: int, lease: Lease) -> str:
    store = ctx.store
    # Another submitter may have finished between our first look and taking the lease.
    chunk = store.chunk(job_id, number)
    if chunk is None or chunk.status not in (CHUNK_PLANNED, CHUNK_WAITING):
        return "already"
    fresh = store.job(job_id)
    if fresh is not None and fresh.lane_reason == DEADLINE:
        # The job left the batch lane for its deadline after this chunk was planned.
        reroute_chunk(ctx, fresh, chunk, (CHUNK_PLANNED, CHUNK_WAITING), DEADLINE)
        return "rerouted"
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
    failpoint("submit.budget_reserved")
    input_file_id = chunk.input_file_id or _upload_input(ctx, job, chunk)
    if input_file_id is None:  # every item's reference image was unusable: nothing to send
        store.set_chunk_status_if(job_id, number, [CHUNK_PLANNED, CHUNK_WAITING], CHUNK_DONE)
        store.unmark(job_id, number)
        ctx.budgets.release_chunk(job, chunk, None)
        after_chunk(ctx, job_id)
        return "empty"
    eligible = eta.eligible_at(ctx, chunk)  # where the forecasts' batch durations start
    batch = _find_or_create_batch(ctx, chunk, input_file_id, lease)
    if batch is None:
        return "unresolved"  # the sweep sends the chunk's submit again (it is still waiting)
    failpoint("submit.batch_recorded")
    store.set_chunk_status_if(
        job_id,
        number,
        [CHUNK_PLANNED, CHUNK_WAITING],
        CHUNK_SUBMITTED,
        upstream_status=batch.status,
        submitted_at=time.time(),
        eligible_at=eligible,
    )
    store.mark_active(job_id, number)
    failpoint("submit.chunk_submitted")
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
    failpoint("submit.input_uploaded")
    ctx.store.update_chunk(chunk.job_id, chunk.number, input_file_id=file_id)
    return file_id


def _find_or_create_batch(
    ctx: Context, chunk: Chunk, input_file_id: str, lease: Lease
) -> Batch | None:
    """The chunk's batch: the one recorded, one found upstream, or one created now under the
    lease. None while an earlier create's outcome is still unknown (nothing may create)."""
    if chunk.batch_id:
        return ctx.upstream.batch(chunk.batch_id)
    if chunk.create_started:
        # An earlier create's outcome is unknown: it may have made the batch, or still may.
        ctx.store.update_chunk(chunk.job_id, chunk.number, create_uncertain=1)
        found = duplicates.tagged(ctx, chunk)
        if found:
            return _adopt(ctx, chunk, found, input_file_id, lease)
        wait = 2 * ctx.settings.batch_create_timeout_seconds
        if time.time() < chunk.create_started + wait:
            log.warning(
                "job %s chunk %s: an earlier batch create may still land; not creating before %ss",
                chunk.job_id,
                chunk.number,
                round(chunk.create_started + wait - time.time()),
            )
            return None
    record = BatchRecord(ctx.redis)
    lease.ensure()
    began = record.begin_create(chunk.job_id, chunk.number, lease.key, lease.token, time.time())
    if began == 0:
        raise LeaseLost(f"lease {lease.key} passed to another submitter before the create")
    if began < 0:
        return None  # another submitter recorded a batch meanwhile
    failpoint("submit.create_started")
    lease.ensure()
    batch = ctx.upstream.create_batch(
        input_file_id,
        chunk.endpoint,
        ctx.settings.completion_window,
        {"imagebatch_job": chunk.job_id, "imagebatch_chunk": chunk.attempt_ref},
        timeout=ctx.settings.batch_create_timeout_seconds,
    )
    failpoint("submit.batch_created")
    return batch if _record(ctx, chunk, batch, lease) else None


def _adopt(
    ctx: Context, chunk: Chunk, found: list[Batch], input_file_id: str, lease: Lease
) -> Batch | None:
    """Batches found upstream for the chunk's attempt: the first made from its input file (or
    the first at all) becomes its batch; any other is a duplicate."""
    found = sorted(found, key=lambda b: (b.input_file_id != input_file_id, b.created_at, b.id))
    keep = found[0]
    recorded = _record(ctx, chunk, keep, lease)
    for extra in found[1:]:
        duplicates.register(ctx, chunk.job_id, chunk.number, extra.id, chunk.model)
    return keep if recorded else None


def _record(ctx: Context, chunk: Chunk, batch: Batch, lease: Lease) -> bool:
    """Record ``batch`` as the chunk's, under the lease; False when it could not be."""
    outcome = BatchRecord(ctx.redis).record(
        chunk.job_id, chunk.number, batch.id, lease.key, lease.token
    )
    if outcome == "ok":
        return True
    ctx.store.update_chunk(chunk.job_id, chunk.number, create_uncertain=1)
    if outcome == "lease":
        # Not ours to record: whoever holds the lease now finds this batch upstream by its tag.
        log.warning(
            "job %s chunk %s: lost the submit lease while creating %s; left for the next "
            "submitter to find",
            chunk.job_id,
            chunk.number,
            batch.id,
        )
        return False
    duplicates.register(ctx, chunk.job_id, chunk.number, batch.id, chunk.model)
    return False


def cancel_unsubmitted_chunk(ctx: Context, job_id: str, number: int) -> None:
    """A chunk of a stopping job that never went upstream: its items are cancelled."""
    if ctx.store.set_chunk_status_if(
        job_id, number, [CHUNK_PLANNED, CHUNK_WAITING, CHUNK_ASSEMBLING], CHUNK_CANCELLED
    ):
        ctx.store.cancel_unsubmitted(job_id, [number])
    ctx.store.unmark(job_id, number)
    ctx.enqueue_once(FINALIZE, job_id, job_id)
