"""Collect: read an ended upstream batch into storage and record every line's outcome once.

The output file is streamed line by line (a line can be several MB of base64); each line's images
are decoded and stored by a small thread pool, at most ``2 * threads`` lines in memory at once
whatever the file's size. Then the error file; then the lines that came back in neither file
(they never ran). Moderation blocks are final; expired, cancelled and transient lines go back to
pending for another chunk, up to ``IMAGEBATCH_MAX_ATTEMPTS``. A batch that failed as a whole for
upstream's enqueued-token limit goes back to waiting, its budget shrunk; one that failed because
its model does not support the Batch API is rerouted (:mod:`service.lanes.reroute`).

At least once: a lease (``SET NX PX``, renewed as lines arrive) keeps two collectors off one
chunk, and the sweep hands a chunk whose lease lapsed to another worker; every image is written
under a deterministic key (a repeat overwrites it) and every item's usage is counted once.

Handover: a cursor in Redis says how many leading lines of the output file are stored and
recorded (saved every few seconds, and when the worker shuts down). A worker asked to hand over
(:mod:`service.handover`) stops reading between lines, lets the lines in hand finish, saves the
cursor, releases the lease and raises :class:`~service.handover.Handover`; the next collect of
the chunk skips the lines before the cursor without parsing them.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, cast

import orjson

from service import handover, metrics
from service.context import Context
from service.failpoints import failpoint
from service.jobs import eta
from service.jobs.model import (
    CHUNK_COLLECTING,
    CHUNK_DONE,
    CHUNK_WAITING,
    QUEUED,
    SUCCEEDED,
    Chunk,
    ItemState,
    Job,
)
from service.jobs.request import PAGE
from service.lanes import duplicates, reroute
from service.lanes.finalize import after_chunk
from service.lanes.items import (
    error_from_line,
    line_failure_action,
    outcome_name,
    record_failure,
    record_usage,
    store_images,
)
from service.redis import keys
from service.redis.leases import Lease
from service.upstream import Batch

log = logging.getLogger("imagebatch.batches")

# How often a collect saves its cursor while it runs (a crash then redoes at most this much), and
# how long a saved cursor is kept (a chunk is collected within hours; the key is dropped then).
CURSOR_SAVE_SECONDS = 5.0
CURSOR_TTL_SECONDS = 7 * 86_400
# An image's base64 in an output line: the key, then its string value (base64 has no '"' or '\').
_B64_VALUE = re.compile(rb'"b64_json"\s*:\s*"')
# A line's custom_id (our item index), looked for in its first bytes, where upstream puts it.
_CUSTOM_ID = re.compile(rb'"custom_id"\s*:\s*"(\d{1,12})"')
_HEAD_BYTES = 1024


@dataclass
class CollectResult:
    succeeded: int = 0
    duplicates: int = 0
    failed: int = 0
    retried: int = 0
    cancelled: int = 0
    bytes: int = 0

    def add_failure(self, new_status: str) -> None:
        name = outcome_name(new_status)
        if name:
            setattr(self, name, getattr(self, name) + 1)


def collect_chunk(
    ctx: Context, job_id: str, number: int, *, upload_threads: int = 8, account: bool = True
) -> CollectResult | None:
    """Collect chunk ``number`` if it is waiting to be collected and nobody else is at it.

    ``account=False`` is for measurement only (bench/bench_accounting.py): each succeeded item
    is marked succeeded without pricing its usage or adding to job spend and the totals, so the
    benchmark sees what accounting costs. The service never passes it: spend would go unrecorded.
    """
    store = ctx.store
    chunk, job = store.chunk(job_id, number), store.job(job_id)
    if chunk is None or job is None or chunk.status != CHUNK_COLLECTING or not chunk.batch_id:
        return None
    lease = Lease(ctx.redis, keys.collect_lease(job_id, number), ctx.settings.collect_lease_seconds)
    if not lease.acquire():
        return None
    try:
        return _collect(ctx, job, chunk, chunk.batch_id, lease, upload_threads, account)
    finally:
        lease.release()


def _collect(
    ctx: Context,
    job: Job,
    chunk: Chunk,
    batch_id: str,
    lease: Lease,
    threads: int,
    account: bool,
) -> CollectResult:
    result = CollectResult()
    failpoint("collect.started")
    # A chunk whose create was uncertain may have a second batch upstream: found before the
    # chunk ends, so its job waits for it to be accounted.
    duplicates.detect(ctx, chunk)
    batch = ctx.upstream.batch(batch_id)
    if batch.status == "failed" and _back_to_waiting(ctx, job, chunk, batch):
        return result  # budget pressure: the chunk goes back to waiting as it is
    if batch.status == "failed" and reroute.refused_batch(ctx, job, chunk, batch):
        return result  # the model cannot be batched: its items went to the sync lane or failed
    try:
        if batch.status != "failed" and batch.output_file_id:
            _collect_output(ctx, job, chunk, batch.output_file_id, lease, result, threads, account)
            failpoint("collect.output_done")
        if batch.status != "failed" and batch.error_file_id:
            _collect_errors(ctx, job, chunk, batch.error_file_id, lease, result)
    except handover.Handover:  # what was stored counts, also when the collect hands over
        metrics.count(ctx.redis, metrics.COLLECT_BYTES, None, result.bytes)
        raise
    metrics.count(ctx.redis, metrics.COLLECT_BYTES, None, result.bytes)
    # Lines that came back in neither file never ran.
    _settle_missing(ctx, job, chunk, result, _batch_error(batch))
    spent = _chunk_spend(ctx, chunk)
    ended = ctx.store.set_chunk_status_if(
        chunk.job_id,
        chunk.number,
        [CHUNK_COLLECTING],
        CHUNK_DONE,
        collected_at=time.time(),
        upstream_status=batch.status,
    )
    failpoint("collect.chunk_done")
    ctx.store.unmark(chunk.job_id, chunk.number)
    ctx.redis.delete(keys.collect_cursor(chunk.job_id, chunk.number))
    if ended:  # how long it took teaches the forecasts (once, however often collect runs)
        eta.record_batch(ctx, chunk, batch)
    ctx.budgets.release_chunk(job, chunk, spent)
    after_chunk(ctx, chunk.job_id)
    return result


def _chunk_spend(ctx: Context, chunk: Chunk) -> int:
    """Actual nano-USD of a chunk's succeeded items (for settling its spend reservation)."""
    total = 0
    indexes = list(ctx.store.chunk_indexes(chunk.job_id, chunk.number))
    for start in range(0, len(indexes), PAGE):
        for usage in ctx.store.item_usage(chunk.job_id, indexes[start : start + PAGE]):
            if usage and usage.get("chunk") == chunk.number:
                total += int(usage.get("cost_nanousd", 0))
    return total


def _back_to_waiting(ctx: Context, job: Job, chunk: Chunk, batch: Batch) -> bool:
    """A batch failed as a whole for upstream's enqueued-token limit: the chunk waits again, as a
    new attempt, and the queue budget shrinks. False for any other failure."""
    errors = list(batch.errors.data) if batch.errors and batch.errors.data else []
    if not job.is_live or not any(e.code == "token_limit_exceeded" for e in errors):
        return False
    ctx.budgets.upstream_pressure(chunk)
    ctx.store.set_chunk_status_if(
        chunk.job_id,
        chunk.number,
        [CHUNK_COLLECTING],
        CHUNK_WAITING,
        attempt=chunk.attempt + 1,
        batch_id=None,
        create_started=None,
        waiting_since=time.time(),
        last_error="token_limit_exceeded",
    )
    ctx.store.unmark_active(chunk.job_id, chunk.number)
    ctx.store.mark_waiting(chunk.job_id, chunk.number)
    log.warning(
        "job %s chunk %s: upstream enqueued-token limit reached; waiting",
        chunk.job_id,
        chunk.number,
    )
    return True


def _batch_error(batch: Batch) -> dict[str, Any]:
    """The error an item gets when its line came back in neither file."""
    errors = list(batch.errors.data) if batch.errors and batch.errors.data else []
    if errors:
        e = errors[0]
        return {
            "code": e.code or "batch_failed",
            "message": e.message or f"upstream batch {batch.id} failed",
            "batch_id": batch.id,
        }
    if batch.status == "expired":
        return {
            "code": "batch_expired",
            "message": "The upstream batch expired before this request ran.",
        }
    if batch.status == "cancelled":
        return {
            "code": "batch_cancelled",
            "message": "The upstream batch was cancelled before this request ran.",
        }
    return {
        "code": "missing_result",
        "message": f"upstream batch {batch.id} returned no line for this request",
    }


def _settle_missing(
    ctx: Context, job: Job, chunk: Chunk, result: CollectResult, error: dict[str, Any]
) -> None:
    indexes = list(ctx.store.chunk_indexes(chunk.job_id, chunk.number))
    for start in range(0, len(indexes), PAGE):
        for state in ctx.store.item_states(chunk.job_id, indexes[start : start + PAGE]):
            if state and state.status == QUEUED and state.chunk == chunk.number:
                _line_failed(ctx, job, chunk.number, state.index, error, result)


def _line_failed(
    ctx: Context,
    job: Job,
    number: int,
    index: int,
    error: dict[str, Any],
    result: CollectResult,
) -> None:
    action = line_failure_action(job, error)
    error = {k: v for k, v in error.items() if k != "retryable"}
    result.add_failure(record_failure(ctx, job, number, index, error, action))


def _collect_errors(
    ctx: Context, job: Job, chunk: Chunk, file_id: str, lease: Lease, result: CollectResult
) -> None:
    with ctx.upstream.file_lines(file_id) as lines:
        for raw in lines:
            lease.refresh()
            if handover.requested():
                # Error lines are cheap to read again; the output file's cursor is saved.
                raise handover.Handover(f"collect {chunk.ref}, in its error file")
            rec = orjson.loads(raw)
            try:
                index = int(rec["custom_id"])
            except (KeyError, ValueError):
                log.warning(
                    "job %s chunk %s: error line with unknown custom_id %r",
                    chunk.job_id,
                    chunk.number,
                    rec.get("custom_id"),
                )
                continue
            _line_failed(ctx, job, chunk.number, index, error_from_line(rec), result)


class _Cursor:
    """How many leading lines of one output file are stored and recorded, kept in Redis.

    Lines are handed to a thread pool in order and end in any order; the cursor is the first line
    not yet ended (a line that raised never ends, so the cursor stays before it).
    """

    def __init__(self, ctx: Context, chunk: Chunk, file_id: str):
        self.r, self.file_id = ctx.redis, file_id
        self.key = keys.collect_cursor(chunk.job_id, chunk.number)
        saved = self.r.get(self.key)
        name, _, lines = (saved or b"").decode().partition(" ")
        self.start = int(lines) if name == file_id and lines.isdigit() else 0
        self.saved, self.saved_at = self.start, time.monotonic()
        self._next = self.start
        self._open: set[int] = set()
        self._lock = threading.Lock()

    def begin(self, line: int) -> None:
        with self._lock:
            self._open.add(line)
            self._next = line + 1

    def end(self, line: int) -> None:
        with self._lock:
            self._open.discard(line)

    def save(self, force: bool = False) -> int:
        """Write the cursor if it moved (at most every CURSOR_SAVE_SECONDS unless forced)."""
        if not force and time.monotonic() - self.saved_at < CURSOR_SAVE_SECONDS:
            return self.saved
        with self._lock:
            at = min(self._open) if self._open else self._next
        if at > self.saved:
            self.r.set(self.key, f"{self.file_id} {at}", ex=CURSOR_TTL_SECONDS)
            self.saved = at
            failpoint("collect.checkpoint")
        self.saved_at = time.monotonic()
        return at


def _collect_output(
    ctx: Context,
    job: Job,
    chunk: Chunk,
    file_id: str,
    lease: Lease,
    result: CollectResult,
    threads: int,
    account: bool,
) -> None:
    """Stream the output file; each line's images are decoded, stored and recorded in a pool.

    Lines before the saved cursor were done by an earlier collect: read past, not parsed. Raises
    :class:`~service.handover.Handover` (cursor saved) when the worker is shutting down.
    """
    slots = threading.BoundedSemaphore(threads * 2)
    errors: list[BaseException] = []
    lock = threading.Lock()
    cursor = _Cursor(ctx, chunk, file_id)
    stopped = False

    def done(line: int, fut: Future[tuple[bool, int]]) -> None:
        slots.release()
        exc = fut.exception()
        if exc is not None:
            errors.append(exc)
            return
        counted, size = fut.result()
        with lock:
            result.bytes += size
            if counted:
                result.succeeded += 1
            else:
                result.duplicates += 1
        cursor.end(line)

    states = StateReads(ctx, job.id)
    with (
        ThreadPoolExecutor(max_workers=threads, thread_name_prefix="collect") as pool,
        ctx.upstream.file_lines(file_id) as lines,
    ):
        for line, raw in enumerate(lines):
            lease.refresh()
            if line < cursor.start:
                continue  # stored and recorded by a collect that handed over or died
            if errors:
                break
            if handover.requested():
                stopped = True
                break
            slots.acquire()
            cursor.begin(line)
            states.expect(raw)
            future = pool.submit(_store_line, ctx, job, chunk.number, raw, account, states)
            future.add_done_callback(functools.partial(done, line))
            cursor.save()
    if errors:
        cursor.save(force=True)
        raise errors[0]
    if stopped:
        at = cursor.save(force=True)
        raise handover.Handover(f"collect {chunk.ref} at output line {at}")


class StateReads:
    """The item states of the lines handed to the pool, read together.

    The reader registers each line's item index (its custom_id, found in the line's first
    bytes) as it hands the line over; the first worker that needs a state not yet read reads
    those of every line registered since, in one round trip. Lines that arrive slower than
    they are stored cost one read each, as before; lines queued behind busy workers share one.
    Holds at most the states of the lines in flight.
    """

    def __init__(self, ctx: Context, job_id: str) -> None:
        self._store, self._job_id = ctx.store, job_id
        self._lock = threading.Lock()
        self._expected: list[int] = []
        self._read: dict[int, ItemState | None] = {}

    def expect(self, raw: bytes) -> None:
        found = _CUSTOM_ID.search(raw, 0, _HEAD_BYTES)
        if found:
            with self._lock:
                self._expected.append(int(found.group(1)))

    def state(self, index: int) -> ItemState | None:
        with self._lock:
            if index not in self._read:
                wanted = [i for i in self._expected if i not in self._read]
                if index not in wanted:
                    wanted.append(index)
                self._expected = []
                read = self._store.item_states(self._job_id, wanted)
                self._read.update(zip(wanted, read, strict=True))
            return self._read.pop(index)


def _store_line(
    ctx: Context,
    job: Job,
    number: int,
    raw: bytes,
    account: bool,
    states: StateReads,
) -> tuple[bool, int]:
    """One output line: its images stored, its usage recorded. (counted now, bytes stored)."""
    failpoint("collect.line")
    rec = parse_output_line(raw)
    index = int(rec["custom_id"])
    state = states.state(index)
    if state is None or state.status == SUCCEEDED:
        return False, 0
    response = rec.get("response") or {}
    body = response.get("body") or {}
    if int(response.get("status_code") or 0) != 200:
        # A non-200 in the output file is unusual but possible: treat it as an error line.
        _line_failed(ctx, job, number, index, error_from_line(rec), CollectResult())
        return False, 0
    stored, size = store_images(ctx, job, state.id, body)
    failpoint("collect.image_stored")
    if not account:
        # Measurement only (see collect_chunk): the same exactly-once success transition, with a
        # record of the manifest's shape but nothing priced and no spend or totals added.
        record = {"tokens": {}, "cost_nanousd": 0, "tier": "batch", "keys": stored, "chunk": number}
        return ctx.store.record_success(job.id, index, record, []), size
    counted, _ = record_usage(
        ctx,
        job,
        number,
        index,
        body.get("usage") or {},
        stored,
        tier="batch",
        size=body.get("size"),
        quality=body.get("quality"),
    )
    failpoint("collect.usage_recorded")
    return counted, size


def parse_output_line(raw: bytes) -> dict[str, Any]:
    """An output line parsed, each image's ``b64_json`` in the body's ``data`` left in ``raw``.

    The same record ``orjson.loads`` gives, except that those values are memoryviews of their
    base64 in ``raw`` instead of str: the MBs of an image are never copied into a str (a
    quarter of collect's CPU an image went to that), and the decoder reads them where they are.
    Each value is cut out (a placeholder naming it left in its place) and the small rest is
    parsed. An unescaped ``"b64_json"`` followed by ``:`` can only be a key (inside a string
    every ``"`` is escaped); a value holding an escape (legal JSON, never sent), or a
    ``b64_json`` anywhere but an image of the body's ``data``, makes the line parse plainly.
    """
    spans: list[tuple[int, int]] = []
    pieces: list[bytes] = []
    pos = 0
    while (key := _B64_VALUE.search(raw, pos)) is not None:
        start = key.end()
        end = raw.find(b'"', start)
        if end < 0 or raw.find(b"\\", start, end) >= 0:
            spans = []
            break
        pieces += [raw[pos:start], b"#%d" % len(spans)]
        spans.append((start, end))
        pos = end
    if not spans:
        return cast(dict[str, Any], orjson.loads(raw))
    pieces.append(raw[pos:])
    rec = cast(dict[str, Any], orjson.loads(b"".join(pieces)))
    response = rec.get("response")
    body = response.get("body") if isinstance(response, dict) else None
    data = body.get("data") if isinstance(body, dict) else None
    images = [i for i in data if isinstance(i, dict)] if isinstance(data, list) else []
    placeholders = [image.get("b64_json") for image in images]
    if len(placeholders) != len(spans) or set(placeholders) != {f"#{k}" for k in range(len(spans))}:
        return cast(dict[str, Any], orjson.loads(raw))
    view = memoryview(raw)
    for image in images:
        start, end = spans[int(image["b64_json"][1:])]
        image["b64_json"] = view[start:end]
    return rec
