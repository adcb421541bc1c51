"""Reading a job's JSONL objects (``request.jsonl``, ``manifest.jsonl``) from any line on.

An item page (the API's ``/items``, the console's gallery) starts at an index; reading the object
from its start to get there would make page 50 of a 50,000-item job cost the whole job. So each
object gets a sparse index: the byte offset of every :data:`STEP`-th line, a short list in Redis
(``keys.job_line_offsets``). A page seeks to the offset of the line at or before its start (a
ranged read on S3), skips fewer than :data:`STEP` lines, and reads on.

The index is derived data: written by whoever writes the object (:func:`record_offsets`, as the
manifest is written) or built on first use by one pass that counts newlines, and always checked
before it is trusted: the byte before an offset must end a line and the line there must carry the
index it should (``"index": n``). An object rewritten since (a retry changes ``request.jsonl``)
fails the check and the index is built again, so a stale index costs one rebuild, never a wrong
page. Redis errors and storage errors propagate; :class:`ObjectNotFound` is raised when the
object does not exist.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import orjson

from service.context import Context
from service.redis import keys
from service.storage import manifest_key, request_key
from service.storage.port import iter_stream_lines

STEP = 1000  # lines between two recorded offsets: at most STEP - 1 lines are read to be skipped
OFFSETS_TTL_SECONDS = 30 * 86400
_READ = 256 * 1024
NAMES = ("request", "manifest")


def object_key(job_id: str, name: str) -> str:
    if name == "request":
        return request_key(job_id)
    if name == "manifest":
        return manifest_key(job_id)
    raise ValueError(f"no indexed object {name!r}; one of {NAMES}")


class OffsetRecorder:
    """Counts what a writer writes and notes where every :data:`STEP`-th line starts."""

    def __init__(self) -> None:
        self.offsets: list[int] = []
        self._pos = 0
        self._lines = 0

    def wrote(self, line: bytes) -> None:
        """Call with each whole line written (terminator included), in order."""
        if self._lines % STEP == 0:
            self.offsets.append(self._pos)
        self._pos += len(line)
        self._lines += 1


def record_offsets(ctx: Context, job_id: str, name: str, offsets: Sequence[int]) -> None:
    """Store the offsets of a freshly written object (replacing any earlier ones)."""
    key = keys.job_line_offsets(job_id, name)
    pipe = ctx.redis.pipeline()
    pipe.delete(key)
    if offsets:
        pipe.rpush(key, *offsets)
        pipe.expire(key, OFFSETS_TTL_SECONDS)
    pipe.execute()


def build_offsets(ctx: Context, job_id: str, name: str) -> list[int]:
    """Read the object once, counting newlines, and store the offset of every STEP-th line."""
    offsets: list[int] = []
    pos = 0  # where the chunk in hand starts in the object
    line = 0  # the number of the next line to start
    pending = True  # the next byte starts a line
    with ctx.storage.open(object_key(job_id, name)) as fh:
        while chunk := fh.read(_READ):
            i, n = 0, len(chunk)
            while i < n:
                if pending:
                    if line % STEP == 0:
                        offsets.append(pos + i)
                    pending = False
                nl = chunk.find(b"\n", i)
                if nl < 0:
                    break
                line += 1
                i = nl + 1
                pending = True
            pos += n
    record_offsets(ctx, job_id, name, offsets)
    return offsets


class _Stale(Exception):
    """The recorded offset does not start the line it should: the object was rewritten."""


def _offset(ctx: Context, job_id: str, name: str, block: int) -> tuple[int | None, int]:
    """The recorded offset of line ``block * STEP`` (None if unknown), and how many are recorded."""
    key = keys.job_line_offsets(job_id, name)
    pipe = ctx.redis.pipeline(transaction=False)
    pipe.lindex(key, block)
    pipe.llen(key)
    raw, count = pipe.execute()
    return (int(raw) if raw is not None else None), int(count)


def _line_index(line: bytes) -> int | None:
    try:
        rec = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    value = rec.get("index") if isinstance(rec, dict) else None
    return value if isinstance(value, int) else None


def _read(ctx: Context, key: str, offset: int, first: int) -> Iterator[bytes]:
    """The object's lines from ``offset`` on; raises :class:`_Stale` (on the first ``next``)
    unless line ``first`` starts exactly there."""
    with ctx.storage.open_from(key, max(0, offset - 1)) as fh:
        if offset > 0 and fh.read(1) != b"\n":
            raise _Stale
        lines = iter_stream_lines(fh, _READ)
        head = next(lines, None)
        if head is None or _line_index(head) != first:
            raise _Stale
        yield head
        yield from lines


def lines_from(ctx: Context, job_id: str, name: str, start: int) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of the job's ``name`` object from line ``start`` on, streamed.

    Every writer writes one line per item, in index order, so the line number is the item's
    index.
    """
    key = object_key(job_id, name)
    block = start // STEP
    offset, recorded = _offset(ctx, job_id, name, block)
    if offset is None and recorded:
        return  # past the last line
    for attempt in range(2):
        if offset is None or attempt:
            offsets = build_offsets(ctx, job_id, name)
            if block >= len(offsets):
                return
            offset = offsets[block]
        lines = _read(ctx, key, offset, block * STEP)
        try:
            head = next(lines)
            break
        except _Stale:
            offset = None
    else:
        raise RuntimeError(f"the line index of {key} does not check out after a rebuild")
    number = block * STEP
    for line in _prepend(head, lines):
        if number >= start:
            yield number, line
        number += 1


def _prepend(head: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield head
    yield from rest
