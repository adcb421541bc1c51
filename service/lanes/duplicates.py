"""Duplicate upstream batches: found, cancelled, and what they billed counted, never silently lost.

Submit never creates a batch without its lease and resolves a create of unknown outcome upstream
first (:mod:`service.lanes.submit`), yet a create can still land twice: a create that took longer
than twice ``IMAGEBATCH_BATCH_CREATE_TIMEOUT_SECONDS``, or a Redis that lost its last writes in a
restart. Such a batch is found by the chunk's attempt tag in the batch metadata (:func:`tagged`):
when a submitter's compare-and-set shows the chunk has another batch, when a resolution finds
more than one, and when a chunk whose create was uncertain is collected (:func:`detect`).

Each duplicate is counted (``imagebatch_duplicate_batches_total``), cancelled if still running
(:func:`sweep`, from the periodic sweep) and, once it ended, its output file is read for what
upstream billed (:func:`account`, queue ``collect``): the tokens and cost are added to its job
and the totals exactly once, and shown in the job view. Its images are not stored (the chunk's
own batch made them). The job finalizes only when its duplicates are accounted.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson

from service import handover, metrics, pricing
from service.budgets.daily import daily_field, utc_day
from service.context import Context
from service.errors import TransientError
from service.jobs.batchrecord import DAILY, SPEND, TOTAL_COST, TOTAL_TOKENS, BatchRecord
from service.jobs.model import Chunk
from service.queues import DUPLICATE
from service.redis import keys
from service.upstream import Batch, UpstreamError

log = logging.getLogger("imagebatch.batches")

TERMINAL_BATCH = {"completed", "failed", "expired", "cancelled"}
# Upstream's clock may differ from ours: batches are looked up this much further back.
CLOCK_SLACK_SECONDS = 300


def tagged(ctx: Context, chunk: Chunk) -> list[Batch]:
    """Every upstream batch carrying the chunk's attempt tag, newest first."""
    since = (chunk.created_at or chunk.create_started or time.time()) - CLOCK_SLACK_SECONDS
    found = []
    for batch in ctx.upstream.recent_batches():
        if batch.created_at < since:
            break
        if (batch.metadata or {}).get("imagebatch_chunk") == chunk.attempt_ref:
            found.append(batch)
    return found


def register(ctx: Context, job_id: str, number: int, batch_id: str, model: str) -> bool:
    """A duplicate batch of the chunk: remembered, counted and cancelled; True when new."""
    if not BatchRecord(ctx.redis).add_duplicate(job_id, number, batch_id):
        return False
    metrics.count(ctx.redis, metrics.DUPLICATE_BATCHES, {"model": model})
    log.error(
        "job %s chunk %s: duplicate upstream batch %s; cancelling it, its billing will be counted",
        job_id,
        number,
        batch_id,
    )
    _cancel(ctx, batch_id)
    return True


def detect(ctx: Context, chunk: Chunk) -> int:
    """At the end of a chunk whose create was uncertain: any other batch with its tag is a
    duplicate. Returns how many were new."""
    if not chunk.create_uncertain or not chunk.batch_id:
        return 0
    return sum(
        register(ctx, chunk.job_id, chunk.number, batch.id, chunk.model)
        for batch in tagged(ctx, chunk)
        if batch.id != chunk.batch_id
    )


def sweep(ctx: Context) -> int:
    """Each open duplicate: cancelled while it runs; once ended, its accounting is queued.
    Returns how many were queued."""
    queued = 0
    for job_id, number, batch_id in BatchRecord(ctx.redis).open_duplicates():
        try:
            batch = ctx.upstream.batch(batch_id)
        except UpstreamError as exc:
            log.warning("sweep: could not poll duplicate %s: %s", batch_id, exc)
            continue
        if batch.status in TERMINAL_BATCH:
            queued += ctx.enqueue_once(DUPLICATE, batch_id, job_id, number, batch_id)
        elif batch.status != "cancelling":
            _cancel(ctx, batch_id)
    return queued


def account(ctx: Context, job_id: str, number: int, batch_id: str) -> bool:
    """Add what an ended duplicate billed to its job and the totals, once; True when added now."""
    record = BatchRecord(ctx.redis)
    job = ctx.store.job(job_id)
    model = ctx.catalog.get(job.model) if job else None
    if job is None or model is None:
        ctx.redis.zrem(keys.DUPLICATE_BATCHES, f"{job_id}:{number}:{batch_id}")
        return False
    batch = ctx.upstream.batch(batch_id)
    if batch.status not in TERMINAL_BATCH:
        raise TransientError(f"duplicate batch {batch_id} has not ended yet ({batch.status})")
    tokens, nanousd, lines = pricing.Tokens(), 0, 0
    if batch.output_file_id:
        with ctx.upstream.file_lines(batch.output_file_id) as raw_lines:
            for raw in raw_lines:
                if handover.requested():
                    # Nothing is written until the whole file is read: the next run starts over.
                    raise handover.Handover(f"duplicate batch {batch_id}")
                usage = _usage(orjson.loads(raw))
                if usage is not None:
                    used = pricing.usage_tokens(usage)
                    tokens += used
                    nanousd += pricing.cost_nanousd(used, model, ctx.catalog, "batch")
                    lines += 1
    increments: list[tuple[int, str, int]] = [
        (SPEND, "cost:batch", nanousd),
        (SPEND, "duplicate_batches", 1),
        (SPEND, "duplicate_cost", nanousd),
        (TOTAL_COST, f"{job.tenant}|{model.id}|batch|{job.campaign}", nanousd),
        (DAILY, daily_field(model.id, "batch", job.campaign), nanousd),
    ]
    for kind, amount in tokens.as_dict().items():
        if amount:
            increments += [
                (SPEND, kind, amount),
                (TOTAL_TOKENS, f"{job.tenant}|{model.id}|{kind}|batch", amount),
            ]
    summary = {"tokens": tokens.as_dict(), "cost_nanousd": nanousd, "lines": lines}
    daily = keys.tenant_spend_daily(job.tenant, utc_day(time.time()))
    added = record.account_duplicate(job_id, number, batch_id, summary, increments, daily)
    if added:
        for kind, amount in tokens.as_dict().items():
            if amount:
                metrics.count(
                    ctx.redis, metrics.DUPLICATE_TOKENS, {"model": model.id, "kind": kind}, amount
                )
        log.warning("job %s: duplicate batch %s billed %s", job_id, batch_id, summary)
    return added


def _usage(line: dict[str, Any]) -> dict[str, Any] | None:
    response = line.get("response") or {}
    if response.get("status_code") != 200:
        return None
    usage = (response.get("body") or {}).get("usage")
    return usage if isinstance(usage, dict) else None


def _cancel(ctx: Context, batch_id: str) -> None:
    try:
        ctx.upstream.cancel_batch(batch_id)
    except UpstreamError as exc:
        log.info("cancel duplicate %s: upstream said %s (it may have ended)", batch_id, exc.status)
