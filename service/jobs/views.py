"""How jobs and items look in the API: plain dicts built from job state and storage."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import orjson

from service.context import Context
from service.jobs import store as js
from service.lanes.batch import manifest_line, request_pages
from service.pricing import KINDS
from service.storage import manifest_key


def iso(ts: str | float | None) -> str | None:
    if ts is None or ts == "":
        return None
    return dt.datetime.fromtimestamp(float(ts), tz=dt.UTC).isoformat().replace("+00:00", "Z")


def job_view(ctx: Context, job: dict[str, str]) -> dict[str, Any]:
    job_id = job["id"]
    store = ctx.store
    counts = store.counts(job_id)
    spend = store.spend(job_id)
    batches = []
    submitted = 0
    for n in store.chunks(job_id):
        chunk = store.chunk(job_id, n) or {}
        if chunk.get("status") in js.UPSTREAM_CHUNK_STATES:
            submitted += int(chunk.get("open", 0))
        batches.append(
            {
                "chunk": n,
                "status": chunk.get("status"),
                "batch_id": chunk.get("batch_id") or None,
                "upstream_status": chunk.get("upstream_status") or None,
                "endpoint": chunk.get("endpoint"),
                "lines": int(chunk.get("lines", 0)),
                "attempt": int(chunk.get("attempt", 1)),
                "completed": int(chunk.get("upstream_completed") or 0),
                "failed": int(chunk.get("upstream_failed") or 0),
            }
        )
    queued = counts.get("queued", 0)
    cost = {tier: spend.get(f"cost:{tier}", 0) / 1e9 for tier in ("batch", "sync")}
    return {
        "id": job_id,
        "object": "job",
        "status": job["status"],
        "model": job["model"],
        "mode": job.get("mode"),
        "labels": orjson.loads(job.get("labels") or "{}"),
        "created_at": iso(job.get("created_at")),
        "updated_at": iso(job.get("updated_at")),
        "finished_at": iso(job.get("finished_at")),
        "items": int(job.get("items", 0)),
        "images": int(job.get("images", 0)),
        "counts": {
            "pending": counts.get("pending", 0),
            "queued": queued - submitted,
            "submitted": submitted,
            "succeeded": counts.get("succeeded", 0),
            "failed": counts.get("failed", 0),
            "cancelled": counts.get("cancelled", 0),
        },
        "images_stored": spend.get("images", 0),
        "tokens": {kind: spend.get(kind, 0) for kind in KINDS},
        "cost_usd": {**cost, "total": cost["batch"] + cost["sync"]},
        "estimate": orjson.loads(job["estimate"]) if job.get("estimate") else None,
        "max_cost_usd": float(job["max_cost_usd"]) if job.get("max_cost_usd") else None,
        "reason": job.get("reason") or None,
        "upstream_batches": batches,
        "links": {
            "self": f"/v1/jobs/{job_id}",
            "items": f"/v1/jobs/{job_id}/items",
            "manifest": f"/v1/jobs/{job_id}/manifest",
        },
    }


def _with_urls(ctx: Context, line: dict[str, Any]) -> dict[str, Any]:
    line["urls"] = [ctx.storage.url(k) for k in line.get("keys") or []]
    return line


def items_page(
    ctx: Context, job: dict[str, str], status: str | None, cursor: int, limit: int
) -> tuple[list[dict[str, Any]], int | None]:
    """Items from index ``cursor`` on, optionally of one status; returns (items, next cursor)."""
    job_id = job["id"]
    if job["status"] in js.JOB_FINAL:
        return _items_from_manifest(ctx, job_id, status, cursor, limit)
    out: list[dict[str, Any]] = []
    total = int(job.get("items", 0))
    for page in request_pages(ctx, job_id):
        if page[-1].index < cursor:
            continue
        page = [line for line in page if line.index >= cursor]
        indexes = [line.index for line in page]
        states = ctx.store.item_states(job_id, indexes)
        usages = ctx.store.item_usage(job_id, indexes)
        errors = ctx.store.item_errors(job_id, indexes)
        for line, state, usage, error in zip(page, states, usages, errors, strict=True):
            item = manifest_line(job, line, state, usage, error)
            if status is None or item["status"] == status:
                out.append(_with_urls(ctx, item))
                if len(out) >= limit:
                    nxt = line.index + 1
                    return out, (nxt if nxt < total else None)
    return out, None


def _items_from_manifest(
    ctx: Context, job_id: str, status: str | None, cursor: int, limit: int
) -> tuple[list[dict[str, Any]], int | None]:
    out: list[dict[str, Any]] = []
    for raw in ctx.storage.iter_lines(manifest_key(job_id)):
        if not raw.strip():
            continue
        item = orjson.loads(raw)
        if item["index"] < cursor or (status is not None and item["status"] != status):
            continue
        if len(out) >= limit:
            return out, item["index"]
        out.append(_with_urls(ctx, item))
    return out, None


def stream_manifest(ctx: Context, job_id: str) -> Iterator[bytes]:
    """The stored manifest, line by line, each with fresh ``urls`` for its images.

    URLs are added as it is served, not stored: presigned S3 URLs expire, the manifest does not.
    """
    for raw in ctx.storage.iter_lines(manifest_key(job_id)):
        if raw.strip():
            yield orjson.dumps(_with_urls(ctx, orjson.loads(raw))) + b"\n"
