"""A job's items from any index on, as callers see them: what item pages are made of.

:func:`item_lines` yields manifest-shaped items (id, index, status, attempts, keys, usage, cost,
tier, error, review) with their request line (prompt and parameters) from index ``start`` on.
A running job's items come from ``request.jsonl`` and their state in Redis; a finished job's from
``manifest.jsonl`` beside its request. Both objects are entered at ``start`` through their line
index (:mod:`service.jobs.lines`), so a deep page costs what the first page costs. Review
decisions always come from Redis (they may change after the manifest was written).

Redis is asked in batches that grow from :data:`FIRST_BATCH` to :data:`MAX_BATCH` lines, so a
page of 48 items asks for about 64, and a scan through a long job makes few round trips.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from service.context import Context
from service.jobs.lines import lines_from
from service.jobs.manifest import live_lines
from service.jobs.model import Job
from service.jobs.request import RequestLine
from service.storage import ObjectNotFound

FIRST_BATCH = 64
MAX_BATCH = 1000


@dataclass(frozen=True, slots=True)
class Page:
    """Items of a page, and the index to go on from (None: nothing after them)."""

    items: list[dict[str, Any]]
    next_cursor: int | None


def _request_line(raw: bytes) -> RequestLine:
    rec = orjson.loads(raw)
    return RequestLine(rec["index"], rec["id"], rec["endpoint"], rec["body"])


def _batches(lines: Iterator[tuple[int, bytes]]) -> Iterator[list[bytes]]:
    size = FIRST_BATCH
    batch: list[bytes] = []
    for _, raw in lines:
        batch.append(raw)
        if len(batch) >= size:
            yield batch
            batch = []
            size = min(size * 2, MAX_BATCH)
    if batch:
        yield batch


def _running(ctx: Context, job: Job, start: int) -> Iterator[tuple[dict[str, Any], RequestLine]]:
    for batch in _batches(lines_from(ctx, job.id, "request", start)):
        page = [_request_line(raw) for raw in batch]
        for line, item in live_lines(ctx, job.id, page):
            yield item, line


def _finished(ctx: Context, job: Job, start: int) -> Iterator[tuple[dict[str, Any], RequestLine]]:
    requests = lines_from(ctx, job.id, "request", start)
    for batch in _batches(lines_from(ctx, job.id, "manifest", start)):
        items = [orjson.loads(raw) for raw in batch]
        reviews = ctx.store.item_reviews(job.id, [item["index"] for item in items])
        for item, review in zip(items, reviews, strict=True):
            _, raw = next(requests)
            item["review"] = review
            yield item, _request_line(raw)


def item_lines(
    ctx: Context, job: Job, start: int = 0
) -> Iterator[tuple[dict[str, Any], RequestLine]]:
    """(item, its request line) from index ``start`` on, in index order."""
    if job.is_final:
        try:
            yield from _finished(ctx, job, start)
            return
        except ObjectNotFound:
            pass  # finished before manifests were kept (or the manifest was lost): use Redis
    yield from _running(ctx, job, start)


def page(
    ctx: Context,
    job: Job,
    start: int,
    limit: int,
    *,
    status: str | None = None,
    review: str | None = None,
    scan_limit: int = 10 * MAX_BATCH,
) -> tuple[Page, list[RequestLine]]:
    """Up to ``limit`` items from ``start`` on, of one status and review decision if asked.

    A filtered page reads at most ``scan_limit`` items: a filter that matches nothing in a long
    job answers a short page with a cursor to go on from, not a read of the whole job.
    """
    items: list[dict[str, Any]] = []
    lines: list[RequestLine] = []
    for scanned, (item, line) in enumerate(item_lines(ctx, job, start), 1):
        if _matches(item, status, review):
            if len(items) >= limit:
                return Page(items, item["index"]), lines
            items.append(item)
            lines.append(line)
        if scanned >= scan_limit and item["index"] + 1 < job.items:
            return Page(items, item["index"] + 1), lines
    return Page(items, None), lines


def _matches(item: dict[str, Any], status: str | None, review: str | None) -> bool:
    if status is not None and item["status"] != status:
        return False
    if review is None:
        return True
    decision = (item.get("review") or {}).get("decision")
    if review == "unreviewed":
        return decision is None and item["status"] == "succeeded"
    return bool(decision == review)
