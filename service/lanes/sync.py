"""The sync lane: items sent straight to the images endpoints at full price.

Pacing is cluster-wide (:class:`service.budgets.ratelimit.SyncLimiter` in Redis): every request takes
one request, its images and its estimated tokens before it goes, so any number of workers
together stay under ``IMAGEBATCH_SYNC_RPM`` / ``_IMAGES_PER_MINUTE`` / ``_TPM``. Every answer's
``x-ratelimit-*`` headers (successes, errors and 429s alike) sync the shared limiter to upstream's
buckets, with the grant the request went out under: a fresh bucket is spent at once, and
another client spending from the same limit is left its share.

Retries are owned here, not by the SDK (its retries are off for these calls, so the two never
multiply): a 429 waits for ``retry-after`` (and holds the whole cluster) and does not count as an
attempt; 5xx, 408, 409 and connection errors are retried up to ``IMAGEBATCH_MAX_ATTEMPTS``;
moderation blocks, other 4xx and a 429 for a request larger than upstream's whole per-minute
limit (``x-should-retry: false``) are final.

Reuse: before a slice sends anything, the items whose image the tenant already has are completed
by a copy (:mod:`service.lanes.reuse`), at no cost.

Money: before an item is sent its estimated sync cost is reserved against the job's
``max_cost_usd`` and the tenant's daily and monthly caps (the same budgets the batch path holds,
keyed by item), and settled to the actual cost from ``usage`` when it returns; an item that
would cross a cap is not sent: it is cancelled and the job ends ``budget_exhausted``.

A job's items are split into slices, one task each, so several workers share a job. The fan-out
moves every item into the job's chunk 0 (pending → queued) at once: a sync job never has pending
items, so the sweep never plans one into an upstream batch while its slices wait their turn. A
slice runs under a lease (renewed while it runs), so a duplicate of it (a redelivered fan-out)
waits for the first to end and then finds its items done; if the worker running it dies, the lease
lapses within :data:`SLICE_LEASE_SECONDS` and the redelivered slice sends what was left (an item
that was in flight is sent again: at least once). A slice that finds the job cancelled cancels its
unsent items, those waiting for the rate limit too (they look once a second).

Handover (:mod:`service.handover`): when its worker shuts down, a slice sends no further item
(items waiting for the rate limit give up their turn within a second), lets the requests in
flight finish and be stored, releases its lease and raises
:class:`~service.handover.Handover`; the slice is sent again and another worker sends the rest.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from service import handover, metrics, pricing
from service.budgets.policy import item_spend_key
from service.budgets.ratelimit import Grant, SyncLimiter, WaitAbandoned, retry_after_seconds
from service.context import Context
from service.failpoints import failpoint
from service.jobs.model import JOB_QUEUED, JOB_RUNNING, QUEUED, Job
from service.jobs.request import RequestLine, request_pages
from service.lanes.finalize import unfinished
from service.lanes.items import (
    BadReference,
    RefResolver,
    fail_bad_reference,
    record_failure,
    record_usage,
    store_images,
)
from service.lanes.reuse import Reuser
from service.queues import FINALIZE, SYNC_ITEMS
from service.redis import keys
from service.redis.leases import Lease
from service.upstream import UpstreamError, UpstreamRateLimited

log = logging.getLogger("imagebatch.sync")

SYNC_CHUNK = 0  # a sync job's items all live in chunk 0
SLICE = 8  # items per task: small enough that two workers share even a short job
# A slice's lease: renewed every third of it while the slice runs, so this is how long a slice
# whose worker died blocks the sweep from sending it again.
SLICE_LEASE_SECONDS = 30.0
_ASSIGN_PAGE = 2000
HANDED_OVER = "handed_over"  # an item left queued for the next worker (the worker shuts down)


def limiter(ctx: Context) -> SyncLimiter:
    s = ctx.settings
    return SyncLimiter(
        ctx.redis,
        s.sync_rpm,
        s.sync_images_per_minute,
        s.sync_tpm,
        headroom=s.sync_headroom,
    )


def fan_out(ctx: Context, job_id: str) -> int:
    """Split a sync job into slices of item indexes, one task each."""
    job = ctx.store.job(job_id)
    if job is None:
        return 0
    ctx.store.ensure_sync_chunk(job_id, SYNC_CHUNK)
    # Every item goes into chunk 0 now, not when its slice runs: items left pending while the
    # slices wait (behind the rate limit) would be planned into an upstream batch by the sweep.
    for start in range(0, job.items, _ASSIGN_PAGE):
        end = min(start + _ASSIGN_PAGE, job.items)
        ctx.store.assign(job_id, SYNC_CHUNK, list(range(start, end)))
    ctx.store.set_job_status_if(job_id, [JOB_QUEUED], JOB_RUNNING)
    for start in range(0, job.items, SLICE):
        ctx.enqueue(SYNC_ITEMS, job_id, start, min(start + SLICE, job.items))
    return job.items


def run_slice(ctx: Context, job_id: str, start: int, end: int) -> dict[str, int]:
    """Send the items with index in [start, end) that are still queued in chunk 0."""
    outcome = {"succeeded": 0, "failed": 0, "cancelled": 0}
    job = ctx.store.job(job_id)
    if job is None or job.is_final:
        return outcome
    lease = Lease(ctx.redis, keys.sync_slice_lease(job_id, start), SLICE_LEASE_SECONDS)
    with lease.held() as got:
        # A duplicate returns at once: the holder is sending these items, and if it dies its
        # lease lapses and the sweep sends the slice again (requeue_stalled).
        return _run_slice(ctx, job, start, end, outcome) if got else outcome


def requeue_stalled(ctx: Context, job_id: str, ttl: float = 120.0) -> int:
    """The sweep's safety net for a sync job: send again every slice that still has items
    queued and nobody holding its lease (its task was lost, or its worker died)."""
    job = ctx.store.job(job_id)
    if job is None:
        return 0
    starts = {
        (state.index // SLICE) * SLICE
        for state in ctx.store.scan_items(job_id)
        if state.status == QUEUED and state.chunk == SYNC_CHUNK
    }
    sent = 0
    for start in sorted(starts):
        if ctx.redis.exists(keys.sync_slice_lease(job_id, start)):
            continue
        end = min(start + SLICE, job.items)
        if ctx.enqueue_once(SYNC_ITEMS, f"{job_id}:{start}", job_id, start, end, ttl=ttl):
            sent += 1
    return sent


def _slice_lines(ctx: Context, job: Job, start: int, end: int) -> list[RequestLine]:
    """The slice's items still queued in chunk 0."""
    lines: list[RequestLine] = []
    for page in request_pages(ctx.storage, job.id):
        lines += [line for line in page if start <= line.index < end]
        if page[-1].index >= end:
            break
    states = ctx.store.item_states(job.id, [line.index for line in lines])
    return [
        line
        for line, state in zip(lines, states, strict=True)
        if state is not None and state.status == QUEUED and state.chunk == SYNC_CHUNK
    ]


def _run_slice(
    ctx: Context, job: Job, start: int, end: int, outcome: dict[str, int]
) -> dict[str, int]:
    todo = _slice_lines(ctx, job, start, end)
    if todo and ctx.store.job_status(job.id) == JOB_RUNNING:
        # Items the tenant already has are copied, not sent (and not paid for).
        reused = Reuser(ctx, job).complete(todo, SYNC_CHUNK)
        outcome["succeeded"] += len(reused)
        todo = [line for line in todo if line.index not in reused]
    # Estimated here, before the threads: the first estimate in a process loads the tokenizer
    # (~0.3 s of CPU), and threads calling it at once would each load it.
    estimates = {line.index: pricing.estimate_item(line.item(), ctx.catalog) for line in todo}
    sender = _Sender(ctx, job)
    workers = max(1, min(ctx.settings.sync_concurrency, len(todo) or 1))
    left = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for result in pool.map(lambda line: sender.item(line, estimates[line.index]), todo):
            if result == HANDED_OVER:
                left += 1
            else:
                outcome[result] += 1
    if left:
        raise handover.Handover(f"sync slice {job.id}:{start}-{end}, {left} items not sent")
    if unfinished(ctx.store.counts(job.id)) <= 0:
        ctx.enqueue(FINALIZE, job.id)
    return outcome


class _Sender:
    """Sends a slice's items, one call of :meth:`item` per item, from several threads."""

    def __init__(self, ctx: Context, job: Job):
        self.ctx, self.job = ctx, job
        self.limiter = limiter(ctx)
        self.refs = RefResolver(ctx, job.id)
        model = ctx.catalog.get(job.model)
        if model is None:
            raise RuntimeError(f"job {job.id}: model {job.model!r} is no longer in the catalog")
        self.model = model

    def item(self, line: RequestLine, estimate: pricing.Tokens) -> str:
        """Check, hold budget for and send one item; its outcome."""
        ctx, job = self.ctx, self.job
        if handover.requested():
            return HANDED_OVER  # nothing reserved or sent: the next worker sends it
        current = ctx.store.job(job.id)
        if current is None or current.status != JOB_RUNNING or current.budget_exhausted:
            self._cancel(line, current)
            return "cancelled"
        key = item_spend_key(job.id, line.index)
        nanousd = pricing.cost_nanousd(estimate, self.model, ctx.catalog, "sync")
        refused = ctx.budgets.reserve_spend(job, key, nanousd)
        if refused:
            ctx.store.stop_for_budget(job.id, f"stopped: sending more would exceed {refused}")
            self._cancel(line, ctx.store.job(job.id))
            return "cancelled"
        ok = self._send(line, estimate)
        if ok is None:
            ctx.budgets.release_spend(job, key)
            if handover.requested():
                return HANDED_OVER
            self._cancel(line, ctx.store.job(job.id))
            return "cancelled"
        if not ok:
            ctx.budgets.release_spend(job, key)
        return "succeeded" if ok else "failed"

    def _cancel(self, line: RequestLine, current: Job | None) -> None:
        if current is not None and current.budget_exhausted:
            error = {
                "code": "budget_exhausted",
                "message": current.reason or "not sent: the job's budget is spent",
            }
        else:
            error = {"code": "cancelled", "message": "not sent: the job was cancelled"}
        self.ctx.store.record_failure(
            self.job.id, line.index, SYNC_CHUNK, error, "cancel", 1, self.job.model, line.images
        )

    def _send(self, line: RequestLine, estimate: pricing.Tokens) -> bool | None:
        """Send one item until it succeeds or fails for good; None when the job was cancelled
        while the item waited for the rate limit, or the worker is handing over (nothing sent,
        or a transient failure not retried here)."""
        ctx, job = self.ctx, self.job
        try:
            body = self.refs.resolve(line.body)
        except BadReference as exc:
            fail_bad_reference(ctx, job, SYNC_CHUNK, line, exc)
            return False
        attempts = 0
        last_error: dict[str, Any] = {}
        while attempts < ctx.settings.max_attempts:
            if handover.requested():
                return None  # not sent (again): the item waits for the next worker
            try:
                grant = self._wait_turn(line, estimate)
            except WaitAbandoned:
                return None
            try:
                failpoint("sync.before_request")
                headers, payload = ctx.upstream.image(line.endpoint, body)
            except UpstreamRateLimited as exc:
                self.limiter.observe(exc.headers, grant)
                if not exc.transient:  # too large for upstream's limit: no wait will help
                    last_error = exc.item_error()
                    break
                self.limiter.penalize(retry_after_seconds(exc.headers) or 1.0)
                metrics.count(ctx.redis, metrics.SYNC_REQUESTS, {"status": "rate_limited"})
                continue  # not an attempt: the request never ran
            except UpstreamError as exc:
                self.limiter.observe(exc.headers, grant)
                last_error = exc.item_error()
                attempts += 1
                if not exc.transient:
                    break
                continue
            except BaseException:
                self.limiter.observe({}, grant)  # no longer in flight, whatever happened
                raise
            self.limiter.observe(headers, grant)
            metrics.count(ctx.redis, metrics.SYNC_REQUESTS, {"status": "succeeded"})
            self._store(line, payload)
            return True
        metrics.count(ctx.redis, metrics.SYNC_REQUESTS, {"status": "failed"})
        record_failure(ctx, job, SYNC_CHUNK, line, last_error, "fail")
        return False

    def _wait_turn(self, line: RequestLine, estimate: pricing.Tokens) -> Grant:
        """Block until the cluster-wide limiter lets this request go; its grant."""
        job_id = self.job.id
        grant = self.limiter.wait_and_grant(
            line.images,
            estimate.total,
            time.monotonic() + 3600,
            abandon=lambda: (
                handover.requested() or self.ctx.store.job_status(job_id) != JOB_RUNNING
            ),
        )
        if grant.waited > 0.5:
            metrics.observe(self.ctx.redis, metrics.BUDGET_WAIT, grant.waited)
        return grant

    def _store(self, line: RequestLine, body: dict[str, Any]) -> None:
        ctx, job = self.ctx, self.job
        fmt = line.body.get("output_format") or "png"
        stored, size = store_images(ctx, job, line.id, body, fmt)
        failpoint("sync.image_stored")
        metrics.count(ctx.redis, metrics.COLLECT_BYTES, None, size)
        _, nanousd = record_usage(
            ctx,
            job,
            SYNC_CHUNK,
            line.index,
            body.get("usage") or {},
            stored,
            tier="sync",
            size=body.get("size"),
            quality=body.get("quality"),
        )
        failpoint("sync.usage_recorded")
        ctx.budgets.settle_spend(job, item_spend_key(job.id, line.index), nanousd)
