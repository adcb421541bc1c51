"""The sync lane: items sent straight to the images endpoints at full price.

Pacing is cluster-wide (:class:`service.ratelimit.SyncLimiter` in Redis): every request takes
one request, its images and its estimated tokens before it goes, so any number of workers
together stay under ``IMAGEBATCH_SYNC_RPM`` / ``_IMAGES_PER_MINUTE`` / ``_TPM``. Upstream's
``x-ratelimit-*`` headers and 429s adjust the shared limiter.

Retries are owned here, not by the SDK (its retries are off for these calls, so the two never
multiply): a 429 waits for ``retry-after`` (and holds the whole cluster) and does not count as an
attempt; 5xx and connection errors are retried up to ``IMAGEBATCH_MAX_ATTEMPTS``; moderation
blocks and other 4xx are final.

A job's items are split into slices, one task each, so several workers share a job. An item is
claimed (pending → queued, in the job's chunk 0) before it is sent, so a redelivered slice never
sends it twice; one that dies mid-request is found still queued by the sweep and put back.
"""

from __future__ import annotations

import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx2
import openai
import pybase64

from service import jobstore as js
from service import metrics, pricing
from service.batches import CONTENT_TYPES, _RefResolver, record_usage, request_pages
from service.context import Context
from service.queues import FINALIZE, SYNC_ITEMS
from service.ratelimit import SyncLimiter, retry_after_seconds
from service.storage import image_key

log = logging.getLogger("imagebatch.sync")

SYNC_CHUNK = 0  # a sync job's items all live in chunk 0
SLICE = 8  # items per task: small enough that two workers share even a short job


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
    ctx.store.set_job_status_if(job_id, [js.JOB_QUEUED], js.JOB_RUNNING)
    total = int(job["items"])
    for start in range(0, total, SLICE):
        ctx.enqueue(SYNC_ITEMS, job_id, start, min(start + SLICE, total))
    return total


def run_slice(ctx: Context, job_id: str, start: int, end: int) -> dict[str, int]:
    """Send the still-pending items with index in [start, end)."""
    job = ctx.store.job(job_id)
    outcome = {"succeeded": 0, "failed": 0}
    if job is None or job["status"] not in (js.JOB_QUEUED, js.JOB_RUNNING):
        return outcome
    lines = []
    for page in request_pages(ctx, job_id):
        lines += [line for line in page if start <= line.index < end]
        if page[-1].index >= end:
            break
    claimed = set()
    for line in lines:
        if ctx.store.assign(job_id, SYNC_CHUNK, [line.index]):
            claimed.add(line.index)
    todo = [line for line in lines if line.index in claimed]
    lim = limiter(ctx)
    refs = _RefResolver(ctx, job_id)
    with ThreadPoolExecutor(
        max_workers=max(1, min(ctx.settings.sync_concurrency, len(todo) or 1))
    ) as pool:
        for ok in pool.map(lambda line: _send(ctx, job, job_id, line, lim, refs), todo):
            outcome["succeeded" if ok else "failed"] += 1
    counts = ctx.store.counts(job_id)
    if counts.get("pending", 0) + counts.get("queued", 0) <= 0:
        ctx.enqueue(FINALIZE, job_id)
    return outcome


def _send(
    ctx: Context, job: dict[str, str], job_id: str, line: Any, lim: SyncLimiter, refs: _RefResolver
) -> bool:
    model = ctx.catalog.get(job["model"])
    assert model is not None
    estimate = pricing.estimate_item(line.item(), ctx.catalog)
    body = refs.resolve(line.body)
    client = ctx.openai.with_options(max_retries=0)
    attempts = 0
    last_error: dict[str, Any] = {}
    while attempts < ctx.settings.max_attempts:
        waited = lim.wait_and_acquire(line.item().n, estimate.total, time.monotonic() + 3600)
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
            metrics.count(
                ctx.redis,
                "imagebatch_upstream_requests_total",
                {"endpoint": line.endpoint, "status": "200"},
            )
            metrics.count(ctx.redis, "imagebatch_sync_requests_total", {"status": "succeeded"})
            _store(ctx, job, job_id, line, payload)
            return True
        except openai.RateLimitError as exc:
            lim.observe(exc.response.headers)
            lim.penalize(retry_after_seconds(exc.response.headers) or 1.0)
            metrics.count(
                ctx.redis, "imagebatch_upstream_rate_limited_total", {"endpoint": line.endpoint}
            )
            metrics.count(ctx.redis, "imagebatch_sync_requests_total", {"status": "rate_limited"})
            continue  # not an attempt: the request never ran
        except openai.APIStatusError as exc:
            metrics.count(
                ctx.redis,
                "imagebatch_upstream_requests_total",
                {"endpoint": line.endpoint, "status": str(exc.status_code)},
            )
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
    fmt = body.get("output_format") or line.body.get("output_format") or "png"
    ext = "jpg" if fmt == "jpeg" else fmt
    data = body.get("data") or []
    stored = []
    size = 0
    for k, image in enumerate(data):
        blob = pybase64.b64decode(image["b64_json"], validate=True)
        size += len(blob)
        key = image_key(job_id, line.id, ext, k if len(data) > 1 else None)
        ctx.storage.put_bytes(
            key,
            blob,
            content_type=CONTENT_TYPES.get(fmt, "application/octet-stream"),
            metadata={
                "job": job_id,
                "item": line.id,
                "model": job["model"],
                "size": str(body.get("size", "")),
                "quality": str(body.get("quality", "")),
                "sha256": hashlib.sha256(blob).hexdigest(),
            },
        )
        stored.append(key)
    metrics.count(ctx.redis, "imagebatch_collect_bytes_total", None, size)
    record_usage(
        ctx, job, job_id, SYNC_CHUNK, line.index, body.get("usage") or {}, stored, tier="sync"
    )
