"""A job's manifest: ``jobs/{id}/manifest.jsonl``, one line per item, written when it finishes.

Each line says what became of one item: its status, attempts, storage keys, usage, cost, tier
and error; its reuse fingerprint; for an item completed by copying an image the tenant already
had, ``reused_from: {job_id, item_id}`` and ``saved_usd`` (what making it had cost); and its review
decision (``review``: approved or rejected, with a note; null when none; the manifest served by
the API always carries the current decision, see :mod:`service.jobs.views`). While a job runs the
same lines are built from Redis (the items view); once it
finishes the manifest in storage is the record and Redis drops the per-item state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from service.context import Context
from service.jobs.lines import OffsetRecorder, record_offsets
from service.jobs.model import ItemState, Job
from service.jobs.request import RequestLine, request_pages
from service.storage import manifest_key


def manifest_line(
    line: RequestLine,
    state: ItemState | None,
    usage: dict[str, Any] | None,
    error: dict[str, Any] | None,
    fingerprint: str | None = None,
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
        if usage.get("reused_from"):
            # Completed by copying an image the tenant already had (service.lanes.reuse).
            out["reused_from"] = usage["reused_from"]
            out["saved_usd"] = int(usage.get("saved_nanousd") or 0) / 1e9
    if error and status != "succeeded":
        out["error"] = error
    out["fingerprint"] = fingerprint
    return out


def live_lines(
    ctx: Context, job_id: str, page: list[RequestLine]
) -> list[tuple[RequestLine, dict[str, Any]]]:
    """Manifest lines of a page of a running job's items, from Redis."""
    indexes = [line.index for line in page]
    states = ctx.store.item_states(job_id, indexes)
    usages = ctx.store.item_usage(job_id, indexes)
    errors = ctx.store.item_errors(job_id, indexes)
    prints = ctx.store.item_fingerprints(job_id, indexes)
    reviews = ctx.store.item_reviews(job_id, indexes)
    out = []
    for line, state, usage, error, print_, review in zip(
        page, states, usages, errors, prints, reviews, strict=True
    ):
        item = manifest_line(line, state, usage, error, print_)
        item["review"] = review
        out.append((line, item))
    return out


def write_manifest(
    ctx: Context, job: Job, observe: Callable[[list[dict[str, Any]]], None] | None = None
) -> None:
    """Write the manifest in one pass over the request (atomically replaces any earlier one).

    ``observe`` sees each page of lines as written (finalize records them for reuse).
    """
    offsets = OffsetRecorder()
    with ctx.storage.writer(
        manifest_key(job.id), content_type="application/jsonl", metadata={"job": job.id}
    ) as out:
        for page in request_pages(ctx.storage, job.id):
            items = [item for _, item in live_lines(ctx, job.id, page)]
            for item in items:
                line = orjson.dumps(item) + b"\n"
                out.write(line)
                offsets.wrote(line)
            if observe is not None:
                observe(items)
    record_offsets(ctx, job.id, "manifest", offsets.offsets)
