"""A job's request as stored: ``jobs/{id}/request.jsonl``, one line per item.

Intake writes it before the job exists in Redis (an accepted job is never lost); every later
step reads it back, streamed a page at a time, so no step holds a whole job in memory. A retry
that changes items (:mod:`service.jobs.retry`) first keeps the current request as
``request.v{n}.jsonl``, then writes the new one in its place.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from service.jobs.spec import ItemSpec
from service.storage import Storage, request_key

PAGE = 1000  # lines per page: what one Redis round trip looks up


@dataclass(frozen=True, slots=True)
class RequestLine:
    """One item of the stored request: its index, the caller's id, endpoint and request body."""

    index: int
    id: str
    endpoint: str
    body: dict[str, Any]

    def item(self) -> ItemSpec:
        return ItemSpec(index=self.index, id=self.id, endpoint=self.endpoint, body=self.body)

    @property
    def images(self) -> int:
        """Images the item asks for (``n``)."""
        return self.item().n


def request_record(item: ItemSpec) -> bytes:
    """One line of ``request.jsonl``."""
    return (
        orjson.dumps(
            {"index": item.index, "id": item.id, "endpoint": item.endpoint, "body": item.body}
        )
        + b"\n"
    )


def request_pages(
    storage: Storage, job_id: str, size: int = PAGE, *, key: str | None = None
) -> Iterator[list[RequestLine]]:
    """The job's request, streamed from storage a page at a time (``key``: an earlier version,
    ``request.v{n}.jsonl``, instead of the current one)."""
    page: list[RequestLine] = []
    for raw in storage.iter_lines(key or request_key(job_id)):
        if not raw.strip():
            continue
        rec = orjson.loads(raw)
        page.append(RequestLine(rec["index"], rec["id"], rec["endpoint"], rec["body"]))
        if len(page) >= size:
            yield page
            page = []
    if page:
        yield page


def request_lines(
    storage: Storage, job_id: str, indexes: set[int] | None = None
) -> Iterator[RequestLine]:
    """The job's request line by line; only ``indexes`` when given."""
    for page in request_pages(storage, job_id):
        for line in page:
            if indexes is None or line.index in indexes:
                yield line
