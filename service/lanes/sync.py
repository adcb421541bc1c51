"""The sync lane: items sent straight to the images endpoints at full price.

Pacing is cluster-wide (:class:`service.ratelimit.SyncLimiter` in Redis): every request takes
one request, its images and its estimated tokens before it goes, so any number of workers
together stay under ``IMAGEBATCH_SYNC_RPM`` / ``_IMAGES_PER_MINUTE`` / ``_TPM``. Upstream's
``x-ratelimit-*`` headers and 429s adjust the shared limiter.

Retries are owned here, not by the SDK (its retries are off for these calls, so the two never
multiply): a 429 waits for ``retry-after`` (and holds the whole cluster) and does not count as an
attempt; 5xx and connection errors are retried up to ``IMAGEBATCH_MAX_ATTEMPTS``; moderation
blocks and other 4xx are final.

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
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx2
import openai

from service import metrics, pricing
from service.budgets.ratelimit import SyncLimiter, WaitAbandoned, retry_after_seconds
from service.budgets.spend import usd_to_nanousd
from service.context import Context
from service.jobs import store as js
from service.lanes.batch import (
    BadReference,
    _RefResolver,
    enqueue_once,
    fail_bad_reference,
    record_usage,
    request_pages,
    store_images,
)
from service.queues import FINALIZE, SYNC_ITEMS
from service.redis import keys

log = logging.getLogger("imagebatch.sync")

SYNC_CHUNK = 0  # a sync job's items all live in chunk 0
_RUNNING = js.JOB_RUNNING.encode()
SLICE = 8  # items per task: small enough that two workers share even a short job
# A slice's lease: renewed every third of it while the slice runs, so this is how long a slice
# whose worker died blocks the sweep from sending it again.
SLICE_LEASE_SECONDS = 30.0


def _slice_key(job_id: str, start: int) -> str:
    # STRING lease (Lease token, PX): a worker is sending this slice's items.
    return f"{keys.job(job_id)}:sync:slice:{start}"


def _spend_key(job_id: str, index: int) -> str:
    # An item's reservation against the job's and the tenant's spend caps.
    return f"{job_id}:s{index}"


def limiter(ctx: Context) -> SyncLimiter:
    s = ctx.settings
    return SyncLimiter(ctx.redis, s.sync_rpm, s.sync_images_per_minute, s.sync_tpm)


def fan_out(ctx: Context, job_id: str) -> int:
    """Split a sync job into slices of item indexes, one task each."""
    job = ctx.store.job(job_id)
    if job is None:
        return 0
    if not ctx.store.chunk(job_id, SYNC_CHUNK):
        ctx.store.update_chunk(
            job_id, SYNC_CHUNK, status="sync", endpoint="", lines=0, open=0, attempt=1
        )
        ctx.redis.sadd(f"ib:job:{job_id}:chunks", SYNC_CHUNK)
    total = int(job["items"])
    # Every item goes into chunk 0 now, not when its slice runs: items left pending while the
    # slices wait (behind the rate limit) would be planned into an upstream batch by the sweep.
    for start in range(0, total, 2000):
        ctx.store.assign(job_id, SYNC_CHUNK, list(range(start, min(start + 2000, total))))
    ctx.store.set_job_status_if(job_id, [js.JOB_QUEUED], js.JOB_RUNNING)
    for start in range(0, total, SLICE):
        ctx.enqueue(SYNC_ITEMS, job_id, start, min(start + SLICE, total))
    return total


def run_slice(ctx: Context, job_id: str, start: int, end: int) -> dict[str, int]:
    """Send the items with index in [start, end) that are still queued in chunk 0."""
    outcome = {"succeeded": 0, "failed": 0, "cancelled": 0}
    job = ctx.store.job(job_id)
    if job is None or job["status"] in js.JOB_FINAL:
        return outcome
    with js.Lease(ctx.redis, _slice_key(job_id, start), SLICE_LEASE_SECONDS).held() as got:
        # A duplicate returns at once: the holder is sending these items, and if it dies its
        # lease lapses and the sweep sends the slice again (requeue_stalled).
        return _run_slice(ctx, job, job_id, start, end, outcome) if got else outcome


def requeue_stalled(ctx: Context, job_id: str, ttl: float = 120.0) -> int:
    """The sweep's safety net for a sync job: send again every slice that still has items
    queued and nobody holding its lease (its task was lost, or its worker died)."""
    job = ctx.store.job(job_id)
    if job is None:
        return 0
    total = int(job["items"])
    starts = {
        (state.index // SLICE) * SLICE
        for state in ctx.store.scan_items(job_id)
        if state.status == js.QUEUED and state.chunk == SYNC_CHUNK
    }
    sent = 0
    for start in sorted(starts):
        if ctx.redis.exists(_slice_key(job_id, start)):
            continue
        ref = f"{job_id}:{start}"
        if enqueue_once(ctx, SYNC_ITEMS, ref, job_id, start, min(start + SLICE, total), ttl=ttl):
            sent += 1
    return sent


def _run_slice(
    ctx: Context, job: dict[str, str], job_id: str, start: int, end: int, outcome: dict[str, int]
) -> dict[str, int]:
    lines = []
    for page in request_pages(ctx, job_id):
        lines += [line for line in page if start <= line.index < end]
        if page[-1].index >= end:
            break
    states = ctx.store.item_states(job_id, [line.index for line in lines])
    todo = [
        line
        for line, state in zip(lines, states, strict=True)
        if state is not None and state.status == js.QUEUED and state.chunk == SYNC_CHUNK
    ]
    # Estimated here, before the threads: the first estimate in a process loads the tokenizer
    # (~0.3 s of CPU), and threads calling it at once would each load it.
    estimates = {line.index: pricing.estimate_item(line.item(), ctx.catalog) for line in todo}
    lim = limiter(ctx)
    refs = _RefResolver(ctx, job_id)
    with ThreadPoolExecutor(
        max_workers=max(1, min(ctx.settings.sync_concurrency, len(todo) or 1))
    ) as pool:
        for result in pool.map(
            lambda line: _run_item(ctx, job, job_id, line, estimates[line.index], lim, refs), todo
        ):
            outcome[result] += 1
    counts = ctx.store.counts(job_id)
    if counts.get("pending", 0) + counts.get("queued", 0) <= 0:
        ctx.enqueue(FINALIZE, job_id)
    return outcome


def _run_item(
    ctx: Context,
    job: dict[str, str],
    job_id: str,
    line: Any,
    estimate: pricing.Tokens,
    lim: SyncLimiter,
    refs: _RefResolver,
) -> str:
    """Check and send one item; its outcome."""
    current = ctx.store.job(job_id) or {}
    if current.get("status") != js.JOB_RUNNING or current.get("budget_exhausted"):
        _cancel_item(ctx, job, job_id, line, current)
        return "cancelled"
    model = ctx.catalog.get(job["model"])
    if model is None:
        raise RuntimeError(f"job {job_id}: model {job['model']!r} is no longer in the catalog")
    refused = _reserve_spend(ctx, job, job_id, line.index, estimate, model)
    if refused:
        ctx.store.update_job(
            job_id, budget_exhausted=1, reason=f"stopped: sending more would exceed {refused}"
        )
        _cancel_item(ctx, job, job_id, line, ctx.store.job(job_id) or {})
        return "cancelled"
    ok = _send(ctx, job, job_id, line, lim, refs, estimate)
    if ok is None:
        _release_spend(ctx, job, job_id, line.index)
        _cancel_item(ctx, job, job_id, line, ctx.store.job(job_id) or {})
        return "cancelled"
    if not ok:
        _release_spend(ctx, job, job_id, line.index)
    return "succeeded" if ok else "failed"


def _cancel_item(
    ctx: Context, job: dict[str, str], job_id: str, line: Any, current: dict[str, str]
) -> None:
    if current.get("budget_exhausted"):
        error = {
            "code": "budget_exhausted",
            "message": current.get("reason") or "not sent: the job's budget is spent",
        }
    else:
        error = {"code": "cancelled", "message": "not sent: the job was cancelled"}
    ctx.store.record_failure(
        job_id, line.index, SYNC_CHUNK, error, "cancel", 1, job["model"], line.item().n
    )


def _reserve_spend(
    ctx: Context,
    job: dict[str, str],
    job_id: str,
    index: int,
    estimate: pricing.Tokens,
    model: Any,
) -> str | None:
    """Hold the item's estimated sync cost; None when held, else the cap that refused it."""
    budgets = ctx.budgets
    if budgets is None:
        return None
    nanousd = pricing.cost_nanousd(estimate, model, ctx.catalog, "sync")
    cap = usd_to_nanousd(float(job["max_cost_usd"])) if job.get("max_cost_usd") else None
    key = _spend_key(job_id, index)
    if not budgets.spend.reserve_chunk(job_id, key, nanousd, cap):
        return "the job's max_cost_usd"
    tenant = budgets.tenant(job["tenant"])
    if tenant is not None and not budgets.tenant_spend.reserve(tenant, key, nanousd):
        budgets.spend.release(job_id, key)
        return f"tenant '{tenant.id}' daily or monthly budget"
    return None


def _release_spend(ctx: Context, job: dict[str, str], job_id: str, index: int) -> None:
    budgets = ctx.budgets
    if budgets is None:
        return
    key = _spend_key(job_id, index)
    budgets.spend.release(job_id, key)
    tenant = budgets.tenant(job["tenant"])
    if tenant is not None:
        budgets.tenant_spend.release(tenant, key)


def _settle_spend(ctx: Context, job: dict[str, str], job_id: str, index: int, nanousd: int) -> None:
    budgets = ctx.budgets
    if budgets is None:
        return
    key = _spend_key(job_id, index)
    budgets.spend.settle(job_id, key, nanousd)
    tenant = budgets.tenant(job["tenant"])
    if tenant is not None:
        budgets.tenant_spend.settle(tenant, key, nanousd)


def _send(
    ctx: Context,
    job: dict[str, str],
    job_id: str,
    line: Any,
    lim: SyncLimiter,
    refs: _RefResolver,
    estimate: pricing.Tokens,
) -> bool | None:
    """Send one item until it succeeds or fails for good; None when the job was cancelled while
    the item waited for the rate limit (nothing sent)."""
    try:
        body = refs.resolve(line.body)
    except BadReference as exc:
        fail_bad_reference(ctx, job, job_id, SYNC_CHUNK, line, exc)
        return False
    client = ctx.openai.with_options(max_retries=0)
    attempts = 0
    last_error: dict[str, Any] = {}
    while attempts < ctx.settings.max_attempts:
        try:
            waited = lim.wait_and_acquire(
                line.item().n,
                estimate.total,
                time.monotonic() + 3600,
                abandon=lambda: ctx.redis.hget(keys.job(job_id), "status") != _RUNNING,
            )
        except WaitAbandoned:
            return None
        if waited > 0.5:
            metrics.observe(ctx.redis, "imagebatch_budget_wait_seconds", waited)
        try:
            if line.endpoint.endswith("/edits"):
                raw = client.post("/images/edits", body=body, cast_to=httpx2.Response)
                headers, payload = raw.headers, raw.json()
            else:
                resp = client.images.with_raw_response.generate(**body)
                headers, payload = resp.headers, resp.http_response.json()
            lim.observe(headers)
            metrics.count(ctx.redis, "imagebatch_sync_requests_total", {"status": "succeeded"})
            _store(ctx, job, job_id, line, payload)
            return True
        except openai.RateLimitError as exc:
            lim.observe(exc.response.headers)
            lim.penalize(retry_after_seconds(exc.response.headers) or 1.0)
            metrics.count(ctx.redis, "imagebatch_sync_requests_total", {"status": "rate_limited"})
            continue  # not an attempt: the request never ran
        except openai.APIStatusError as exc:
            err = exc.body if isinstance(exc.body, dict) else {}
            last_error = {
                "code": err.get("code") or f"http_{exc.status_code}",
                "message": err.get("message") or str(exc),
                "type": err.get("type"),
                "status_code": exc.status_code,
                "request_id": exc.request_id,
            }
            if err.get("moderation_details"):
                last_error["moderation_details"] = err["moderation_details"]
            if exc.status_code < 500:
                break
        except (openai.APIConnectionError, openai.APITimeoutError) as exc:
            last_error = {"code": "connection_error", "message": str(exc)}
        attempts += 1
    metrics.count(ctx.redis, "imagebatch_sync_requests_total", {"status": "failed"})
    ctx.store.record_failure(
        job_id,
        line.index,
        SYNC_CHUNK,
        last_error,
        "fail",
        ctx.settings.max_attempts,
        job["model"],
        line.item().n,
    )
    return False


def _store(ctx: Context, job: dict[str, str], job_id: str, line: Any, body: dict[str, Any]) -> None:
    stored, size = store_images(
        ctx, job, job_id, line.id, body, line.body.get("output_format") or "png"
    )
    metrics.count(ctx.redis, "imagebatch_collect_bytes_total", None, size)
    usage = body.get("usage") or {}
    record_usage(ctx, job, job_id, SYNC_CHUNK, line.index, usage, stored, tier="sync")
    model = ctx.catalog.get(job["model"])
    if model is not None:
        actual = pricing.cost_nanousd(pricing.usage_tokens(usage), model, ctx.catalog, "sync")
        _settle_spend(ctx, job, job_id, line.index, actual)
