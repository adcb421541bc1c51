"""A job's manifest: ``jobs/{id}/manifest.jsonl``, one line per item, written when it finishes.

Each line says what became of one item: its status, attempts, storage keys, usage, cost, tier
and error. While a job runs the same lines are built from Redis (the items view); once it
finishes the manifest in storage is the record and Redis drops the per-item state.
"""

from __future__ import annotations

from typing import Any

import orjson

from service.context import Context
from service.jobs.model import ItemState, Job
from service.jobs.request import RequestLine, request_pages
from service.storage import manifest_key


def manifest_line(
    line: RequestLine,
    state: ItemState | None,
    usage: dict[str, Any] | None,
    error: dict[str, Any] | None,
) -> dict[str, Any]:
    status = state.status_name if state else "unknown"
    out: dict[str, Any] = {
        "id": line.id,
        "index": line.index,
        "status": status,
        "attempts": state.attempts if state else 0,
        "keys": [],
        "usage": None,
        "cost_usd": None,
        "tier": None,
        "error": None,
    }
    if usage:
        out.update(
            keys=usage["keys"],
            usage=usage["tokens"],
            cost_usd=usage["cost_nanousd"] / 1e9,
            tier=usage["tier"],
        )
    if error and status != "succeeded":
        out["error"] = error
    return out


def live_lines(
    ctx: Context, job_id: str, page: list[RequestLine]
) -> list[tuple[RequestLine, dict[str, Any]]]:
    """Manifest lines of a page of a running job's items, from Redis."""
    indexes = [line.index for line in page]
    states = ctx.store.item_states(job_id, indexes)
    usages = ctx.store.item_usage(job_id, indexes)
    errors = ctx.store.item_errors(job_id, indexes)
    return [
        (line, manifest_line(line, state, usage, error))
        for line, state, usage, error in zip(page, states, usages, errors, strict=True)
    ]


def write_manifest(ctx: Context, job: Job) -> None:
    """Write the manifest in one pass over the request (atomically replaces any earlier one)."""
    with ctx.storage.writer(
        manifest_key(job.id), content_type="application/jsonl", metadata={"job": job.id}
    ) as out:
        for page in request_pages(ctx.storage, job.id):
            for _, item in live_lines(ctx, job.id, page):
                out.write(orjson.dumps(item) + b"\n")
