"""Plan: group a job's pending items into chunks, each one upstream batch input file.

Items whose image the tenant already has are completed first by a copy
(:mod:`service.lanes.reuse`) and never reach a chunk.

Caps: ``batch_max_lines`` lines and ``batch_max_bytes`` bytes per input file, one endpoint and one
model per file, a chunk's input tokens under the model's enqueued-token budget (a bigger chunk
could never be accepted upstream) and, with a ``max_cost_usd``, a quarter of the cap (so the cap
stops the job close to it). Each chunk is queued for submit as soon as it is complete.

At least once: plan runs under a lease (one planner per job at a time) and a Lua script moves each
item from pending into a chunk once, so a plan that runs twice assigns nothing twice; a plan
killed half-way left a chunk ``assembling``, which the next plan closes as it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import orjson

from service import pricing
from service.catalog import Model
from service.context import Context
from service.failpoints import failpoint
from service.jobs.model import (
    CHUNK_ASSEMBLING,
    JOB_LIVE,
    JOB_QUEUED,
    JOB_RUNNING,
    NO_CHUNK,
    PENDING,
    Job,
)
from service.jobs.request import RequestLine, request_pages
from service.lanes.reuse import Reuser
from service.models import capability
from service.queues import FINALIZE, SUBMIT, SYNC_ITEMS
from service.redis import keys
from service.redis.leases import Lease


@dataclass
class _Chunk:
    """A chunk being filled, before it is recorded."""

    indexes: list[int] = field(default_factory=list)
    bytes: int = 0
    input_tokens: int = 0
    nanousd: int = 0
    size: str = ""  # the items' size; "mixed" once two differ (forecasts learn per size)


@dataclass(frozen=True)
class _Caps:
    lines: int
    bytes: int
    nanousd: float | None
    input_tokens: int

    def full(self, acc: _Chunk, size: int, tokens: int, cost: int) -> bool:
        """Would adding an item of this size, input tokens and cost break a cap?"""
        return bool(acc.indexes) and (
            len(acc.indexes) >= self.lines
            or acc.bytes + size > self.bytes
            or (self.nanousd is not None and acc.nanousd + cost > self.nanousd)
            or (self.input_tokens > 0 and acc.input_tokens + tokens > self.input_tokens)
        )


def plan_job(ctx: Context, job_id: str) -> list[int]:
    """Plan the job's pending items into chunks; returns the new chunk numbers."""
    job = ctx.store.job(job_id)
    if not job or job.status not in JOB_LIVE or job.mode == "sync":
        return []  # a sync job's items go to the images endpoints, never into a batch
    if job.requested_mode == "auto" and not capability.batch_capable(
        ctx.redis, ctx.catalog, job.model
    ):
        # Upstream refused batches of the model lately: the sync lane's fan-out takes the job.
        ctx.store.switch_to_sync(job.id, capability.NOT_BATCH_CAPABLE)
        ctx.enqueue(SYNC_ITEMS, job.id)
        return []
    with Lease(ctx.redis, keys.plan_lock(job_id), ctx.settings.lease_seconds).held() as got:
        return _plan(ctx, job) if got else []


def _plan(ctx: Context, job: Job) -> list[int]:
    store, settings = ctx.store, ctx.settings
    created: list[int] = []
    # A plan killed half-way left a chunk assembling: it is valid as far as it got.
    for chunk in store.job_chunks(job.id):
        if chunk.status == CHUNK_ASSEMBLING:
            close_chunk(ctx, job.id, chunk.number)
            created.append(chunk.number)
    if store.counts(job.id).get("pending", 0) <= 0:
        return created
    model = ctx.catalog.get(job.model)
    if model is None:
        raise RuntimeError(f"job {job.id}: model {job.model!r} is no longer in the catalog")
    cap = job.max_cost_nanousd
    caps = _Caps(
        lines=settings.batch_max_lines,
        bytes=settings.batch_max_bytes,
        nanousd=cap / 4 if cap else None,
        input_tokens=settings.batch_queue_tokens_per_model.get(
            job.model, settings.batch_queue_tokens
        ),
    )
    store.set_job_status_if(job.id, [JOB_QUEUED], JOB_RUNNING)
    reuser = Reuser(ctx, job)
    filling: dict[str, _Chunk] = {}
    for page in _pending_pages(ctx, job.id):
        # Items the tenant already has are completed by a copy and never go upstream.
        reused = reuser.complete(page, NO_CHUNK)
        for line in page:
            if line.index not in reused:
                _fill(ctx, job, model, caps, filling, line, created)
    for endpoint, acc in filling.items():
        if acc.indexes:
            created.append(_record(ctx, job, model, endpoint, acc))
    counts = store.counts(job.id)
    if counts.get("pending", 0) + counts.get("queued", 0) <= 0:
        ctx.enqueue(FINALIZE, job.id)  # every item was reused: no chunk will end to finalize it
    return created


def _fill(
    ctx: Context,
    job: Job,
    model: Model,
    caps: _Caps,
    filling: dict[str, _Chunk],
    line: RequestLine,
    created: list[int],
) -> None:
    """Add an item to its endpoint's chunk, recording the chunk first when the item would not
    fit in it."""
    size = len(upstream_line(line.index, line.endpoint, line.body))
    tokens = pricing.estimate_item(line.item(), ctx.catalog)
    cost = pricing.cost_nanousd(tokens, model, ctx.catalog, "batch")
    acc = filling.setdefault(line.endpoint, _Chunk())
    if caps.full(acc, size, tokens.input, cost):
        created.append(_record(ctx, job, model, line.endpoint, acc))
        acc = filling[line.endpoint] = _Chunk()
    item_size = str(line.body.get("size") or "auto")
    acc.size = item_size if acc.size in ("", item_size) else "mixed"
    acc.indexes.append(line.index)
    acc.bytes += size
    acc.input_tokens += tokens.input
    acc.nanousd += cost


def _pending_pages(ctx: Context, job_id: str) -> Iterator[list[RequestLine]]:
    for page in request_pages(ctx.storage, job_id):
        states = ctx.store.item_states(job_id, [line.index for line in page])
        pending = [
            line
            for line, state in zip(page, states, strict=True)
            if state is not None and state.status == PENDING
        ]
        if pending:
            yield pending


def _record(ctx: Context, job: Job, model: Model, endpoint: str, acc: _Chunk) -> int:
    number = ctx.store.new_chunk(
        job.id,
        endpoint=endpoint,
        model=model.id,
        size=acc.size,
        bytes=acc.bytes,
        attempt=1,
        est_input_tokens=acc.input_tokens,
        est_nanousd=acc.nanousd,
    )
    ctx.store.assign(job.id, number, acc.indexes)
    failpoint("plan.chunk_assembled")
    close_chunk(ctx, job.id, number)
    return number


def close_chunk(ctx: Context, job_id: str, number: int) -> None:
    """A complete chunk: planned and on the sweep's waiting set (one atomic step: a planner
    killed here leaves the chunk assembling, closed by the next plan, or waiting, submitted by
    the sweep), then its submit enqueued."""
    ctx.store.close_chunk(job_id, number)
    failpoint("plan.chunk_planned")
    ctx.enqueue_once(SUBMIT, f"{job_id}:{number}", job_id, number)
    failpoint("plan.chunk_queued")


def upstream_line(index: int, endpoint: str, body: dict[str, object]) -> bytes:
    """One line of a batch input file; the item's index is its ``custom_id``."""
    return (
        orjson.dumps({"custom_id": str(index), "method": "POST", "url": endpoint, "body": body})
        + b"\n"
    )
