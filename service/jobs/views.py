"""How jobs and items look to callers: plain dicts built from job state and storage.

The API's responses, the webhook body and the CLI all show a job the way :func:`job_view` builds
it; items come from Redis while a job runs and from its manifest once it has finished.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from typing import Any

import orjson

from service.context import Context
from service.jobs import eta, pages
from service.jobs.batchrecord import BatchRecord
from service.jobs.model import Job
from service.pricing import KINDS, TIERS
from service.storage import manifest_key


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).isoformat().replace("+00:00", "Z")


def job_view(ctx: Context, job: Job) -> dict[str, Any]:
    counts = ctx.store.counts(job.id)
    spend = ctx.store.spend(job.id)
    batches = []
    submitted = 0
    for chunk in ctx.store.job_chunks(job.id):
        if chunk.upstream:
            submitted += chunk.open
        batches.append(
            {
                "chunk": chunk.number,
                "status": chunk.status,
                "batch_id": chunk.batch_id,
                "upstream_status": chunk.upstream_status,
                "endpoint": chunk.endpoint,
                "lines": chunk.lines,
                "attempt": chunk.attempt,
                "completed": chunk.upstream_completed,
                "failed": chunk.upstream_failed,
            }
        )
    cost = {tier: spend.get(f"cost:{tier}", 0) / 1e9 for tier in TIERS}
    return {
        "id": job.id,
        "object": "job",
        "status": job.status,
        "model": job.model,
        "mode": job.mode,
        "labels": job.labels,
        "created_at": iso(job.created_at),
        "updated_at": iso(job.updated_at),
        "finished_at": iso(job.finished_at),
        "items": job.items,
        "images": job.images,
        "counts": {
            "pending": counts.get("pending", 0),
            "queued": counts.get("queued", 0) - submitted,
            "submitted": submitted,
            "succeeded": counts.get("succeeded", 0),
            "failed": counts.get("failed", 0),
            "cancelled": counts.get("cancelled", 0),
            # Of the succeeded, those completed by copying an image the tenant already had.
            "reused": spend.get("reused", 0),
        },
        "images_stored": spend.get("images", 0),
        "tokens": {kind: spend.get(kind, 0) for kind in KINDS},
        "cost_usd": {**cost, "total": cost["batch"] + cost["sync"]},
        "estimate": job.estimate,
        "max_cost_usd": job.max_cost_usd,
        "reason": job.reason,
        "deadline": iso(job.deadline),
        "on_deadline": job.on_deadline,
        "eta": None if job.is_final else eta_view(ctx, job),
        "lanes": lanes_view(job, spend),
        "review": review_counts(ctx, job, counts.get("succeeded", 0)),
        "reuse": job.reuse,
        "retries": job.retries,
        "upstream_batches": batches,
        # Batches upstream made twice for one chunk (an uncertain create): cancelled, and what
        # they billed is in tokens and cost_usd above (service.lanes.duplicates).
        "duplicate_batches": _duplicates(ctx, job.id),
        "links": {
            "self": f"/v1/jobs/{job.id}",
            "items": f"/v1/jobs/{job.id}/items",
            "manifest": f"/v1/jobs/{job.id}/manifest",
        },
    }


def _duplicates(ctx: Context, job_id: str) -> list[dict[str, Any]]:
    return [
        {
            "batch_id": batch_id,
            "accounted": billed is not None,
            "tokens": (billed or {}).get("tokens"),
            "cost_usd": (billed or {}).get("cost_nanousd", 0) / 1e9,
        }
        for batch_id, billed in BatchRecord(ctx.redis).duplicates(job_id).items()
    ]


def eta_view(ctx: Context, job: Job, now: float | None = None) -> dict[str, Any]:
    """A live job's ``eta``: ISO times, seconds from now, what it rests on, and its deadline."""
    now = time.time() if now is None else now
    forecast = eta.job_eta(ctx, job, now)
    out: dict[str, Any] = {
        "p50": iso(forecast.p50),
        "p90": iso(forecast.p90),
        "p50_seconds": None if forecast.p50 is None else round(max(0.0, forecast.p50 - now), 1),
        "p90_seconds": None if forecast.p90 is None else round(max(0.0, forecast.p90 - now), 1),
        "basis": forecast.basis,
    }
    if job.deadline is not None:
        margin = ctx.settings.deadline_margin_seconds
        late = forecast.p90 is not None and forecast.p90 + margin > job.deadline
        out["misses_deadline"] = late or now + margin >= job.deadline
    return out


def lanes_view(job: Job, spend: dict[str, int]) -> dict[str, Any]:
    """Items and USD per lane, and why the job used the sync lane (None: it did not)."""
    lanes: dict[str, Any] = {
        tier: {"items": spend.get(f"items:{tier}", 0), "usd": spend.get(f"cost:{tier}", 0) / 1e9}
        for tier in TIERS
    }
    reason = job.lane_reason
    if reason is None and job.mode == "sync":
        reason = "requested" if job.requested_mode == "sync" else "auto"
    lanes["sync"]["reason"] = reason
    return lanes


def review_counts(ctx: Context, job: Job, succeeded: int) -> dict[str, int]:
    """How many of the job's items were approved, rejected, and are still to review."""
    raw = ctx.store.review_counts(job.id)
    approved, rejected = raw.get("approved", 0), raw.get("rejected", 0)
    return {
        "approved": approved,
        "rejected": rejected,
        "unreviewed": max(0, succeeded - approved - rejected),
    }


def _with_urls(ctx: Context, line: dict[str, Any]) -> dict[str, Any]:
    line["urls"] = [ctx.storage.url(k) for k in line.get("keys") or []]
    return line


def items_page(
    ctx: Context,
    job: Job,
    status: str | None,
    cursor: int,
    limit: int,
    review: str | None = None,
) -> tuple[list[dict[str, Any]], int | None]:
    """Items from index ``cursor`` on, optionally of one status or review decision; returns
    (items, next cursor). The page is read from ``cursor`` on, never from the job's start."""
    found, _ = pages.page(ctx, job, cursor, limit, status=status, review=review)
    return [_with_urls(ctx, item) for item in found.items], found.next_cursor


def stream_manifest(ctx: Context, job_id: str) -> Iterator[bytes]:
    """The stored manifest, line by line, each with fresh ``urls`` for its images and the
    item's current review decision.

    Both are added as it is served, not stored: presigned S3 URLs expire, and a decision may be
    made after the job finished; the manifest does not change.
    """
    batch: list[dict[str, Any]] = []
    for raw in ctx.storage.iter_lines(manifest_key(job_id)):
        if raw.strip():
            batch.append(orjson.loads(raw))
        if len(batch) >= pages.MAX_BATCH:
            yield _served(ctx, job_id, batch)
            batch = []
    if batch:
        yield _served(ctx, job_id, batch)


def _served(ctx: Context, job_id: str, batch: list[dict[str, Any]]) -> bytes:
    reviews = ctx.store.item_reviews(job_id, [item["index"] for item in batch])
    out = bytearray()
    for item, review in zip(batch, reviews, strict=True):
        item["review"] = review
        out += orjson.dumps(_with_urls(ctx, item)) + b"\n"
    return bytes(out)
