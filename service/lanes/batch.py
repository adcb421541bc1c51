"""The batch path: plan, submit, sweep, collect, finalize, cancel.

Each step is a plain function of a :class:`~service.context.Context` and ids; Celery tasks in
``workers/tasks`` are thin adapters around them, and tests call them directly.

At-least-once, said out loud: every function here may run twice, or be killed half-way and run
again on another worker. They re-load state, check it, act and record:

- plan assigns only still-pending items (a Lua script moves each item once);
- submit records the upstream file and batch ids the moment they exist, creates batches with
  SDK retries off and, on a retry, lists upstream batches by metadata before creating again, so
  a chunk never gets two upstream batches;
- collect writes each image under a deterministic key (a repeat is an overwrite) and records
  each item's usage with HSETNX, so spend counts once; a lease (SET NX PX, refreshed while
  streaming) keeps two collectors off one chunk, and the sweep hands a chunk whose lease lapsed
  to another worker;
- finalize writes the manifest atomically and only once every item is final.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import openai
import orjson
import pybase64

from service import metrics, pricing
from service.context import Context
from service.jobs import store as js
from service.jobs.spec import ItemSpec
from service.queues import COLLECT_TASK, FINALIZE, PLAN, SUBMIT, SYNC_ITEMS, WEBHOOK
from service.redis import keys
from service.storage import (
    ObjectNotFound,
    ObjectTooLarge,
    image_key,
    iter_chunk_lines,
    manifest_key,
    request_key,
)
from service.upstream.client import no_retry

log = logging.getLogger("imagebatch.batches")

TERMINAL_BATCH = {"completed", "failed", "expired", "cancelled"}
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# Error codes of lines that never ran: worth another attempt.
RETRYABLE_CODES = {"batch_expired", "batch_cancelled", "missing_result"}
_PAGE = 1000
# Plan, submit and finalize hold a lease this long, renewed while they run: a worker that dies
# holding one blocks that step for at most this long.
LOCK_SECONDS = 30.0


# --- the request in storage ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RequestLine:
    index: int
    id: str
    endpoint: str
    body: dict[str, Any]

    def item(self) -> ItemSpec:
        return ItemSpec(index=self.index, id=self.id, endpoint=self.endpoint, body=self.body)


def request_record(item: ItemSpec) -> bytes:
    """One line of ``request.jsonl``."""
    return (
        orjson.dumps(
            {"index": item.index, "id": item.id, "endpoint": item.endpoint, "body": item.body}
        )
        + b"\n"
    )


def request_pages(ctx: Context, job_id: str, size: int = _PAGE) -> Iterator[list[RequestLine]]:
    """The job's request, streamed from storage a page at a time."""
    page: list[RequestLine] = []
    for raw in ctx.storage.iter_lines(request_key(job_id)):
        if not raw.strip():
            continue
        rec = orjson.loads(raw)
        page.append(RequestLine(rec["index"], rec["id"], rec["endpoint"], rec["body"]))
        if len(page) >= size:
            yield page
            page = []
    if page:
        yield page


def upstream_line(index: int, endpoint: str, body: dict[str, Any]) -> bytes:
    return (
        orjson.dumps({"custom_id": str(index), "method": "POST", "url": endpoint, "body": body})
        + b"\n"
    )


def enqueue_once(ctx: Context, task: str, ref: str, *args: Any, ttl: float | None = None) -> bool:
    """Enqueue unless the same task for ``ref`` was enqueued within ``ttl`` seconds."""
    ttl = ttl or max(ctx.settings.poll_seconds * 3, 15)
    if ctx.store.acquire(keys.enqueued(task, ref), ttl):
        ctx.enqueue(task, *args)
        return True
    return False


# --- plan ------------------------------------------------------------------------------------
@dataclass
class _Acc:
    indexes: list[int]
    bytes: int = 0
    input_tokens: int = 0
    nanousd: int = 0


def plan_job(ctx: Context, job_id: str) -> list[int]:
    """Group the job's pending items into chunks that respect every upstream cap.

    Caps: ``batch_max_lines`` lines and ``batch_max_bytes`` bytes per input file, one endpoint
    and one model per file. Returns the new chunk numbers; each is queued for submit.
    """
    job = ctx.store.job(job_id)
    if not job or job["status"] not in (js.JOB_QUEUED, js.JOB_RUNNING) or job.get("mode") == "sync":
        return []  # a sync job's items go to the images endpoints, never into a batch
    with js.Lease(ctx.redis, keys.plan_lock(job_id), LOCK_SECONDS).held() as got:
        return _plan(ctx, job_id, job) if got else []


def _plan(ctx: Context, job_id: str, job: dict[str, str]) -> list[int]:
    store, settings = ctx.store, ctx.settings
    created: list[int] = []
    # A plan killed half-way left a chunk assembling: it is valid as far as it got.
    for n in store.chunks(job_id):
        chunk = store.chunk(job_id, n)
        if chunk and chunk["status"] == js.CHUNK_ASSEMBLING:
            _close_chunk(ctx, job_id, n)
            created.append(n)
    if store.counts(job_id).get("pending", 0) <= 0:
        return created
    model = ctx.catalog.get(job["model"])
    if model is None:
        raise RuntimeError(f"job {job_id}: model {job['model']!r} is no longer in the catalog")
    # With a cost cap, chunks stay small enough that the cap stops the job close to it.
    cap = float(job["max_cost_usd"]) * 1e9 if job.get("max_cost_usd") else None
    max_chunk_nanousd = cap / 4 if cap else None
    # A chunk bigger than the model's enqueued-token budget could never be accepted upstream.
    queue_limit = settings.batch_queue_tokens_per_model.get(
        job["model"], settings.batch_queue_tokens
    )
    accs: dict[str, _Acc] = {}
    for page in request_pages(ctx, job_id):
        states = store.item_states(job_id, [line.index for line in page])
        for line, state in zip(page, states, strict=True):
            if state is None or state.status != js.PENDING:
                continue
            size = len(upstream_line(line.index, line.endpoint, line.body))
            acc = accs.setdefault(line.endpoint, _Acc([]))
            tokens = pricing.estimate_item(line.item(), ctx.catalog)
            cost = pricing.cost_nanousd(tokens, model, ctx.catalog, "batch")
            if acc.indexes and (
                len(acc.indexes) >= settings.batch_max_lines
                or acc.bytes + size > settings.batch_max_bytes
                or (max_chunk_nanousd is not None and acc.nanousd + cost > max_chunk_nanousd)
                or (queue_limit > 0 and acc.input_tokens + tokens.input > queue_limit)
            ):
                created.append(_flush(ctx, job_id, line.endpoint, acc))
                acc = accs[line.endpoint] = _Acc([])
            acc.indexes.append(line.index)
            acc.bytes += size
            acc.input_tokens += tokens.input
            acc.nanousd += cost
    for endpoint, acc in accs.items():
        if acc.indexes:
            created.append(_flush(ctx, job_id, endpoint, acc))
    store.set_job_status_if(job_id, [js.JOB_QUEUED], js.JOB_RUNNING)
    return created


def _flush(ctx: Context, job_id: str, endpoint: str, acc: _Acc) -> int:
    job = ctx.store.job(job_id) or {}
    n = ctx.store.new_chunk(
        job_id,
        {
            "endpoint": endpoint,
            "model": job.get("model", ""),
            "bytes": acc.bytes,
            "attempt": 1,
            "est_input_tokens": acc.input_tokens,
            "est_nanousd": acc.nanousd,
        },
    )
    ctx.store.assign(job_id, n, acc.indexes)
    _close_chunk(ctx, job_id, n)
    return n


def _close_chunk(ctx: Context, job_id: str, n: int) -> None:
    ctx.store.set_chunk_status_if(job_id, n, [js.CHUNK_ASSEMBLING], js.CHUNK_PLANNED)
    ctx.store.mark_waiting(job_id, n)
    enqueue_once(ctx, SUBMIT, f"{job_id}:{n}", job_id, n)


# --- submit ----------------------------------------------------------------------------------
def submit_chunk(ctx: Context, job_id: str, n: int) -> str:
    """Upload a chunk's input file and create its upstream batch, exactly once.

    Returns what happened: ``submitted``, ``already``, ``waiting`` (budget), ``cancelled`` or
    ``skipped``.
    """
    store = ctx.store
    chunk, job = store.chunk(job_id, n), store.job(job_id)
    if chunk is None or job is None:
        return "skipped"
    if chunk["status"] in js.UPSTREAM_CHUNK_STATES:
        store.mark_active(job_id, n)
        return "already"
    if chunk["status"] not in (js.CHUNK_PLANNED, js.CHUNK_WAITING):
        return "skipped"
    if job["status"] not in (js.JOB_QUEUED, js.JOB_RUNNING):
        _cancel_chunk(ctx, job_id, n)
        return "cancelled"
    with js.Lease(ctx.redis, keys.submit_lock(job_id, n), LOCK_SECONDS).held() as got:
        return _submit(ctx, job, job_id, n, chunk) if got else "skipped"


def _submit(ctx: Context, job: dict[str, str], job_id: str, n: int, chunk: dict[str, str]) -> str:
    store = ctx.store
    # Another submitter may have finished between our first look and taking the lease.
    chunk = store.chunk(job_id, n) or chunk
    if chunk["status"] not in (js.CHUNK_PLANNED, js.CHUNK_WAITING):
        return "already"
    if not reserve_budgets(ctx, job, job_id, n, chunk):
        store.set_chunk_status_if(
            job_id, n, [js.CHUNK_PLANNED], js.CHUNK_WAITING, waiting_since=time.time()
        )
        store.mark_waiting(job_id, n)
        return "waiting"
    input_file_id = chunk.get("input_file_id") or _upload_input(ctx, job, job_id, n, chunk)
    if input_file_id is None:  # every item's reference image was unusable: nothing to send
        store.set_chunk_status_if(job_id, n, [js.CHUNK_PLANNED, js.CHUNK_WAITING], js.CHUNK_DONE)
        store.unmark(job_id, n)
        release_budgets(ctx, job_id, n, chunk, None)
        _after_chunk(ctx, job_id)
        return "empty"
    batch = _find_or_create_batch(ctx, job_id, n, chunk, input_file_id)
    store.set_chunk_status_if(
        job_id,
        n,
        [js.CHUNK_PLANNED, js.CHUNK_WAITING],
        js.CHUNK_SUBMITTED,
        batch_id=batch.id,
        upstream_status=batch.status,
        submitted_at=time.time(),
    )
    store.mark_active(job_id, n)
    log.info("job %s chunk %s submitted as %s (%s lines)", job_id, n, batch.id, chunk.get("lines"))
    return "submitted"


def reserve_budgets(
    ctx: Context, job: dict[str, str], job_id: str, n: int, chunk: dict[str, str]
) -> bool:
    """Reserve what a chunk needs before it goes upstream; False means wait.

    The hook the budget layer plugs into; with no budgets configured every chunk goes.
    """
    hook = getattr(ctx, "budgets", None)
    if hook is None:
        return True
    return bool(hook.reserve_chunk(job, job_id, n, chunk))


def release_budgets(
    ctx: Context, job_id: str, n: int, chunk: dict[str, str], spent_nanousd: int | None
) -> None:
    hook = getattr(ctx, "budgets", None)
    if hook is not None:
        hook.release_chunk(job_id, n, chunk, spent_nanousd)


def _upload_input(
    ctx: Context, job: dict[str, str], job_id: str, n: int, chunk: dict[str, str]
) -> str | None:
    """Stream the chunk's JSONL to a temporary file, upload it, record the file id.

    An item whose reference image cannot be read fails on its own (it would fail upstream
    too); None when no item of the chunk is left to send.
    """
    members = set(ctx.store.chunk_indexes(job_id, n))
    endpoint = chunk["endpoint"]
    refs = _RefResolver(ctx, job_id)
    lines = 0
    with tempfile.TemporaryFile(prefix=f"imagebatch-{job_id}-{n}-", suffix=".jsonl") as fh:
        for page in request_pages(ctx, job_id):
            for line in page:
                if line.index not in members:
                    continue
                try:
                    body = refs.resolve(line.body)
                except BadReference as exc:
                    fail_bad_reference(ctx, job, job_id, n, line, exc)
                    continue
                fh.write(upstream_line(line.index, endpoint, body))
                lines += 1
        if lines == 0:
            return None
        fh.seek(0)
        created = ctx.openai.files.create(
            file=(f"{job_id}-{n}.jsonl", fh, "application/jsonl"), purpose="batch"
        )
    ctx.store.update_chunk(job_id, n, input_file_id=created.id)
    return created.id


class BadReference(Exception):
    """A caller's reference image that cannot be read: missing, too large, or not allowed."""


def fail_bad_reference(
    ctx: Context, job: dict[str, str], job_id: str, chunk: int, line: RequestLine, exc: BadReference
) -> None:
    error = {"code": "invalid_image_reference", "message": str(exc)}
    ctx.store.record_failure(
        job_id,
        line.index,
        chunk,
        error,
        "fail",
        ctx.settings.max_attempts,
        job["model"],
        line.item().n,
    )


class _RefResolver:
    """Turns a caller's image references into what a batch line can carry.

    ``https://`` and ``data:`` URLs go as ``image_url``; ``file-…`` ids as ``file_id``; images in
    our storage or a bucket (``s3://``, ``file://``) are uploaded once per job (purpose
    ``vision``) and referenced by file id.
    """

    def __init__(self, ctx: Context, job_id: str):
        self.ctx, self.job_id = ctx, job_id
        self.key = f"{keys.job(job_id)}:refs"

    def ref(self, value: str) -> dict[str, str]:
        if value.startswith(("https://", "http://", "data:")):
            return {"image_url": value}
        if value.startswith("file-"):
            return {"file_id": value}
        known = self.ctx.redis.hget(self.key, value)
        if known:
            return {"file_id": known.decode()}
        try:
            data = self.ctx.storage.read_ref(value)
        except (ObjectNotFound, ObjectTooLarge, ValueError) as exc:
            raise BadReference(f"reference image {value!r} cannot be used: {exc}") from exc
        name = value.rsplit("/", 1)[-1] or "image"
        created = self.ctx.openai.files.create(file=(name, data), purpose="vision")
        self.ctx.redis.hset(self.key, value, created.id)
        return {"file_id": created.id}

    def resolve(self, body: dict[str, Any]) -> dict[str, Any]:
        if "images" not in body and "mask" not in body:
            return body
        out = dict(body)
        if "images" in out:
            out["images"] = [self.ref(v) if isinstance(v, str) else v for v in out["images"]]
        if isinstance(out.get("mask"), str):
            out["mask"] = self.ref(out["mask"])
        return out


def _chunk_tag(job_id: str, n: int, attempt: str | int) -> str:
    return f"{job_id}:{n}:{attempt}"


def _find_or_create_batch(
    ctx: Context, job_id: str, n: int, chunk: dict[str, str], input_file_id: str
) -> Any:
    tag = _chunk_tag(job_id, n, chunk.get("attempt", 1))
    if chunk.get("batch_id"):
        return ctx.openai.batches.retrieve(chunk["batch_id"])
    if chunk.get("create_started"):
        # A previous attempt may have created the batch and died before recording it.
        found = _find_batch(ctx, tag, float(chunk["create_started"]))
        if found is not None:
            ctx.store.update_chunk(job_id, n, batch_id=found.id)
            return found
    ctx.store.update_chunk(job_id, n, create_started=time.time())
    batch = no_retry(ctx.openai).batches.create(
        input_file_id=input_file_id,
        endpoint=chunk["endpoint"],
        completion_window=ctx.settings.completion_window,
        metadata={"imagebatch_job": job_id, "imagebatch_chunk": tag},
    )
    ctx.store.update_chunk(job_id, n, batch_id=batch.id)
    return batch


def _find_batch(ctx: Context, tag: str, since: float) -> Any | None:
    """An upstream batch carrying our chunk tag, created since ``since`` (minus clock slack)."""
    for batch in ctx.openai.batches.list(limit=100):
        if batch.created_at < since - 300:
            return None
        if (batch.metadata or {}).get("imagebatch_chunk") == tag:
            return batch
    return None


def _cancel_chunk(ctx: Context, job_id: str, n: int) -> None:
    if ctx.store.set_chunk_status_if(
        job_id, n, [js.CHUNK_PLANNED, js.CHUNK_WAITING, js.CHUNK_ASSEMBLING], js.CHUNK_CANCELLED
    ):
        ctx.store.cancel_unsubmitted(job_id, [n])
    ctx.store.unmark(job_id, n)
    enqueue_once(ctx, FINALIZE, job_id, job_id)


# --- sweep -----------------------------------------------------------------------------------
def sweep(ctx: Context) -> dict[str, int]:
    """Check every active upstream batch once; re-enqueue whatever was lost.

    Runs from beat every ``poll_seconds``; a lock keeps overlapping sweeps from doubling calls.
    """
    store = ctx.store
    seen = {"polled": 0, "ended": 0, "resubmitted": 0, "replanned": 0, "finalized": 0}
    if not store.acquire(keys.SWEEP_LOCK, max(ctx.settings.poll_seconds * 4, 10)):
        return seen
    try:
        for job_id, n, _since in store.active_chunks():
            chunk = store.chunk(job_id, n)
            if chunk is None:
                store.unmark(job_id, n)
                continue
            if chunk["status"] == js.CHUNK_SUBMITTED:
                seen["polled"] += 1
                try:
                    batch = ctx.openai.batches.retrieve(chunk["batch_id"])
                except openai.APIError as exc:
                    log.warning("sweep: could not poll %s: %s", chunk.get("batch_id"), exc)
                    continue
                rc = batch.request_counts
                store.update_chunk(
                    job_id,
                    n,
                    upstream_status=batch.status,
                    upstream_completed=rc.completed if rc else 0,
                    upstream_failed=rc.failed if rc else 0,
                )
                if batch.status in TERMINAL_BATCH and store.set_chunk_status_if(
                    job_id, n, [js.CHUNK_SUBMITTED], js.CHUNK_COLLECTING, ended_at=time.time()
                ):
                    seen["ended"] += 1
                    enqueue_once(ctx, COLLECT_TASK, f"{job_id}:{n}", job_id, n)
            elif chunk["status"] == js.CHUNK_COLLECTING:
                if not ctx.redis.exists(keys.collect_lease(job_id, n)):
                    enqueue_once(
                        ctx,
                        COLLECT_TASK,
                        f"{job_id}:{n}",
                        job_id,
                        n,
                        ttl=ctx.settings.collect_lease_seconds,
                    )
            else:
                store.unmark(job_id, n)
        for job_id, n in store.waiting_chunks():
            if enqueue_once(ctx, SUBMIT, f"{job_id}:{n}", job_id, n):
                seen["resubmitted"] += 1
        for job_id in store.active_jobs():
            job = store.job(job_id)
            if job is None or job["status"] in js.JOB_FINAL:
                ctx.redis.srem(keys.ACTIVE_JOBS, job_id)
                continue
            counts = store.counts(job_id)
            if job.get("mode") == "sync" and job["status"] in (js.JOB_QUEUED, js.JOB_RUNNING):
                from service.lanes import sync as sync_lane  # the sync lane builds on this module

                if counts.get("pending", 0) > 0:
                    enqueue_once(ctx, SYNC_ITEMS, job_id, job_id)  # its fan-out was lost
                elif counts.get("queued", 0) > 0:
                    sync_lane.requeue_stalled(ctx, job_id)
                else:
                    enqueue_once(ctx, FINALIZE, job_id, job_id)
                continue
            if counts.get("pending", 0) > 0 and job["status"] in (js.JOB_QUEUED, js.JOB_RUNNING):
                if not ctx.redis.exists(keys.plan_lock(job_id)) and enqueue_once(
                    ctx, PLAN, job_id, job_id
                ):
                    seen["replanned"] += 1
            elif counts.get("pending", 0) + counts.get("queued", 0) <= 0 and enqueue_once(
                ctx, FINALIZE, job_id, job_id
            ):
                seen["finalized"] += 1
        return seen
    finally:
        store.release(keys.SWEEP_LOCK)


# --- collect ---------------------------------------------------------------------------------
@dataclass
class CollectResult:
    succeeded: int = 0
    duplicates: int = 0
    failed: int = 0
    retried: int = 0
    cancelled: int = 0
    bytes: int = 0


def collect_chunk(
    ctx: Context, job_id: str, n: int, *, upload_threads: int = 8, account: bool = True
) -> CollectResult | None:
    """Read an ended upstream batch into storage and record every line's outcome once.

    ``account=False`` is for measurement only (bench/bench_accounting.py): each succeeded item
    is marked succeeded without pricing its usage or adding to job spend and the totals, so the
    benchmark sees what accounting costs. The service never passes it: spend would go unrecorded.
    """
    store = ctx.store
    chunk, job = store.chunk(job_id, n), store.job(job_id)
    if chunk is None or job is None or chunk["status"] != js.CHUNK_COLLECTING:
        return None
    lease = js.Lease(ctx.redis, keys.collect_lease(job_id, n), ctx.settings.collect_lease_seconds)
    if not lease.acquire():
        return None
    result = CollectResult()
    try:
        batch = ctx.openai.batches.retrieve(chunk["batch_id"])
        if batch.status == "failed":
            if _handle_failed_batch(ctx, job, job_id, n, chunk, batch):
                return result  # budget pressure: the chunk goes back to waiting as it is
        else:
            if batch.output_file_id:
                _collect_output(
                    ctx,
                    job,
                    job_id,
                    n,
                    batch.output_file_id,
                    lease,
                    result,
                    upload_threads,
                    account,
                )
            if batch.error_file_id:
                _collect_errors(ctx, job, job_id, n, batch.error_file_id, lease, result)
        metrics.count(ctx.redis, "imagebatch_collect_bytes_total", None, result.bytes)
        # Lines that came back in neither file never ran.
        _settle_missing(ctx, job, job_id, n, result, _batch_error(batch))
        spent = _chunk_spend(ctx, job_id, n)
        store.set_chunk_status_if(
            job_id,
            n,
            [js.CHUNK_COLLECTING],
            js.CHUNK_DONE,
            collected_at=time.time(),
            upstream_status=batch.status,
        )
        store.unmark(job_id, n)
        release_budgets(ctx, job_id, n, chunk, spent)
        _after_chunk(ctx, job_id)
        return result
    finally:
        lease.release()


def _after_chunk(ctx: Context, job_id: str) -> None:
    counts = ctx.store.counts(job_id)
    if counts.get("pending", 0) > 0:
        ctx.enqueue(PLAN, job_id)
    elif counts.get("queued", 0) <= 0:
        ctx.enqueue(FINALIZE, job_id)


def _chunk_spend(ctx: Context, job_id: str, n: int) -> int:
    """Actual nano-USD of a chunk's succeeded items (for settling its spend reservation)."""
    total = 0
    indexes = list(ctx.store.chunk_indexes(job_id, n))
    for start in range(0, len(indexes), _PAGE):
        for usage in ctx.store.item_usage(job_id, indexes[start : start + _PAGE]):
            if usage and usage.get("chunk") == n:
                total += int(usage.get("cost_nanousd", 0))
    return total


def _handle_failed_batch(
    ctx: Context, job: dict[str, str], job_id: str, n: int, chunk: dict[str, str], batch: Any
) -> bool:
    """A batch that failed as a whole. True when it goes back to waiting (budget pressure)."""
    errors = list(batch.errors.data) if batch.errors and batch.errors.data else []
    if any(e.code == "token_limit_exceeded" for e in errors) and job["status"] in (
        js.JOB_QUEUED,
        js.JOB_RUNNING,
    ):
        hook = getattr(ctx, "budgets", None)
        if hook is not None:
            hook.upstream_pressure(job_id, n, chunk)
        attempt = int(chunk.get("attempt", 1)) + 1
        ctx.store.set_chunk_status_if(
            job_id,
            n,
            [js.CHUNK_COLLECTING],
            js.CHUNK_WAITING,
            attempt=attempt,
            batch_id=None,
            create_started=None,
            waiting_since=time.time(),
            last_error="token_limit_exceeded",
        )
        ctx.store.r.zrem(keys.ACTIVE_CHUNKS, f"{job_id}:{n}")
        ctx.store.mark_waiting(job_id, n)
        log.warning("job %s chunk %s: upstream enqueued-token limit reached; waiting", job_id, n)
        return True
    return False


def _batch_error(batch: Any) -> dict[str, Any]:
    errors = list(batch.errors.data) if getattr(batch, "errors", None) and batch.errors.data else []
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
    ctx: Context,
    job: dict[str, str],
    job_id: str,
    n: int,
    result: CollectResult,
    error: dict[str, Any],
) -> None:
    indexes = list(ctx.store.chunk_indexes(job_id, n))
    for start in range(0, len(indexes), _PAGE):
        for state in ctx.store.item_states(job_id, indexes[start : start + _PAGE]):
            if state and state.status == js.QUEUED and state.chunk == n:
                _record_line_failure(ctx, job, job_id, n, state.index, error, result)


def _record_line_failure(
    ctx: Context,
    job: dict[str, str],
    job_id: str,
    n: int,
    index: int,
    error: dict[str, Any],
    result: CollectResult,
) -> None:
    if job["status"] not in (js.JOB_QUEUED, js.JOB_RUNNING) and error.get("retryable", True):
        action = "cancel"
    elif error.get("retryable") or error.get("code") in RETRYABLE_CODES:
        action = "retry"
    else:
        action = "fail"
    error = {k: v for k, v in error.items() if k != "retryable"}
    new = ctx.store.record_failure(
        job_id, index, n, error, action, ctx.settings.max_attempts, job["model"], 1
    )
    if new == js.PENDING:
        result.retried += 1
    elif new == js.FAILED:
        result.failed += 1
    elif new == js.CANCELLED:
        result.cancelled += 1


def classify_error_line(rec: dict[str, Any]) -> dict[str, Any]:
    """What an error-file line means for its item: the error to record, and whether to retry."""
    response = rec.get("response")
    if response is None:
        err = rec.get("error") or {}
        code = err.get("code") or "unknown_error"
        return {
            "code": code,
            "message": err.get("message") or code,
            "retryable": code in RETRYABLE_CODES,
        }
    status = int(response.get("status_code") or 0)
    body = response.get("body") or {}
    err = body.get("error") or {}
    out: dict[str, Any] = {
        "code": err.get("code") or err.get("type") or f"http_{status}",
        "message": err.get("message") or f"upstream answered {status}",
        "status_code": status,
        "type": err.get("type"),
        "retryable": status >= 500 or status in (408, 409, 429),
    }
    if err.get("moderation_details"):
        out["moderation_details"] = err["moderation_details"]
    if response.get("request_id"):
        out["request_id"] = response["request_id"]
    return out


def _collect_errors(
    ctx: Context,
    job: dict[str, str],
    job_id: str,
    n: int,
    file_id: str,
    lease: js.Lease,
    result: CollectResult,
) -> None:
    for raw in upstream_lines(ctx, file_id, lease):
        rec = orjson.loads(raw)
        try:
            index = int(rec["custom_id"])
        except (KeyError, ValueError):
            log.warning(
                "job %s chunk %s: error line with unknown custom_id %r",
                job_id,
                n,
                rec.get("custom_id"),
            )
            continue
        _record_line_failure(ctx, job, job_id, n, index, classify_error_line(rec), result)


def upstream_lines(ctx: Context, file_id: str, lease: js.Lease) -> Iterator[bytes]:
    """An upstream file's non-empty lines, streamed as bytes; the lease is renewed as they come."""
    with ctx.openai.files.with_streaming_response.content(file_id) as resp:
        for raw in iter_chunk_lines(resp.iter_bytes(1 << 20)):
            if raw.strip():
                lease.refresh()
                yield raw


def _collect_output(
    ctx: Context,
    job: dict[str, str],
    job_id: str,
    n: int,
    file_id: str,
    lease: js.Lease,
    result: CollectResult,
    threads: int,
    account: bool = True,
) -> None:
    """Stream the output file; each line's images are decoded, stored and recorded in a pool.

    At most ``2 * threads`` lines are in memory at once, whatever the file's size.
    """
    slots = threading.BoundedSemaphore(threads * 2)
    errors: list[BaseException] = []
    lock = threading.Lock()

    def done(fut: Future[tuple[int, int]]) -> None:
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

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="collect") as pool:
        for raw in upstream_lines(ctx, file_id, lease):
            if errors:
                break
            slots.acquire()
            pool.submit(_store_output_line, ctx, job, job_id, n, raw, account).add_done_callback(
                done
            )
    if errors:
        raise errors[0]


def _store_output_line(
    ctx: Context, job: dict[str, str], job_id: str, n: int, raw: str | bytes, account: bool = True
) -> tuple[int, int]:
    rec = orjson.loads(raw)
    index = int(rec["custom_id"])
    state = ctx.store.item_states(job_id, [index])[0]
    if state is None or state.status == js.SUCCEEDED:
        return 0, 0
    response = rec.get("response") or {}
    body = response.get("body") or {}
    if int(response.get("status_code") or 0) != 200:
        # A non-200 in the output file is unusual but possible: treat it as an error line.
        _record_line_failure(ctx, job, job_id, n, index, classify_error_line(rec), CollectResult())
        return 0, 0
    stored, size = store_images(ctx, job, job_id, state.id, body)
    if not account:
        # Measurement only (see collect_chunk): the same exactly-once success transition, with a
        # record of the manifest's shape but nothing priced and no spend or totals added.
        record = {"tokens": {}, "cost_nanousd": 0, "tier": "batch", "keys": stored, "chunk": n}
        return int(ctx.store.record_success(job_id, index, record, [])), size
    counted = record_usage(
        ctx, job, job_id, n, index, body.get("usage") or {}, stored, tier="batch"
    )
    return int(counted), size


def store_images(
    ctx: Context,
    job: dict[str, str],
    job_id: str,
    item_id: str,
    body: dict[str, Any],
    fmt: str = "png",
) -> tuple[list[str], int]:
    """Decode an ImagesResponse's images and store each under its deterministic key.

    Returns the keys and the bytes stored. Storing the same response again overwrites the same
    objects with the same bytes, so a repeated collect never duplicates an image.
    """
    fmt = body.get("output_format") or fmt
    ext = "jpg" if fmt == "jpeg" else fmt
    data = body.get("data") or []
    stored: list[str] = []
    size = 0
    for k, image in enumerate(data):
        blob = pybase64.b64decode(image["b64_json"], validate=True)
        size += len(blob)
        key = image_key(job_id, item_id, ext, k if len(data) > 1 else None)
        ctx.storage.put_bytes(
            key,
            blob,
            content_type=CONTENT_TYPES.get(fmt, "application/octet-stream"),
            metadata={
                "job": job_id,
                "item": item_id,
                "model": job["model"],
                "size": str(body.get("size", "")),
                "quality": str(body.get("quality", "")),
                "sha256": hashlib.sha256(blob).hexdigest(),
            },
        )
        stored.append(key)
    return stored, size


def record_usage(
    ctx: Context,
    job: dict[str, str],
    job_id: str,
    chunk: int,
    index: int,
    usage: dict[str, Any],
    stored: list[str],
    *,
    tier: str,
) -> bool:
    """Price an item's usage and add it to the job, tenant, model and campaign, exactly once."""
    model = ctx.catalog.get(job["model"])
    if model is None:
        raise RuntimeError(f"model {job['model']!r} is not in the catalog")
    tokens = pricing.usage_tokens(usage)
    nanousd = pricing.cost_nanousd(tokens, model, ctx.catalog, tier)
    tenant, campaign = job["tenant"], job.get("campaign", "")
    increments: list[tuple[int, str, int]] = [
        (1, f"cost:{tier}", nanousd),
        (1, "images", len(stored)),
        (3, f"{tenant}|{model.id}|{tier}|{campaign}", nanousd),
        (4, f"{model.id}|succeeded", len(stored)),
    ]
    for kind, amount in tokens.as_dict().items():
        if amount:
            increments += [(1, kind, amount), (2, f"{tenant}|{model.id}|{kind}|{tier}", amount)]
    record = {
        "tokens": tokens.as_dict(),
        "cost_nanousd": nanousd,
        "tier": tier,
        "keys": stored,
        "chunk": chunk,
    }
    return ctx.store.record_success(job_id, index, record, increments)


# --- finalize --------------------------------------------------------------------------------
def final_status(job: dict[str, str], counts: dict[str, int]) -> str:
    if job.get("status") == js.JOB_CANCELLING:
        return "cancelled"
    if job.get("budget_exhausted"):
        return "budget_exhausted"
    succeeded, failed = (
        counts.get("succeeded", 0),
        counts.get("failed", 0) + counts.get("cancelled", 0),
    )
    if failed == 0:
        return "succeeded"
    return "failed" if succeeded == 0 else "partially_failed"


def finalize_job(ctx: Context, job_id: str) -> str | None:
    """Write the manifest and set the final status, once every item is final."""
    store = ctx.store
    job = store.job(job_id)
    if job is None or job["status"] in js.JOB_FINAL:
        return None
    counts = store.counts(job_id)
    if counts.get("pending", 0) + counts.get("queued", 0) > 0:
        return None
    with js.Lease(ctx.redis, keys.finalize_lock(job_id), LOCK_SECONDS).held() as got:
        job = store.job(job_id)  # a finalize that held the lease before us may have finished
        if not got or job is None or job["status"] in js.JOB_FINAL:
            return None
        write_manifest(ctx, job, job_id)
        status = final_status(job, counts)
        store.finish(job_id, job["tenant"], status)
        metrics.count(ctx.redis, "imagebatch_jobs_finished_total", {"status": status})
        log.info("job %s finished: %s %s", job_id, status, counts)
        if job.get("webhook_url"):
            ctx.enqueue(WEBHOOK, job_id)
        return status


def manifest_line(
    job: dict[str, str],
    line: RequestLine,
    state: js.ItemState | None,
    usage: dict[str, Any] | None,
    error: dict[str, Any] | None,
) -> dict[str, Any]:
    status = js.STATUS_NAMES.get(state.status, "unknown") if state else "unknown"
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


def write_manifest(ctx: Context, job: dict[str, str], job_id: str) -> None:
    with ctx.storage.writer(
        manifest_key(job_id), content_type="application/jsonl", metadata={"job": job_id}
    ) as out:
        for page in request_pages(ctx, job_id):
            indexes = [line.index for line in page]
            states = ctx.store.item_states(job_id, indexes)
            usages = ctx.store.item_usage(job_id, indexes)
            errors = ctx.store.item_errors(job_id, indexes)
            for line, state, usage, error in zip(page, states, usages, errors, strict=True):
                out.write(orjson.dumps(manifest_line(job, line, state, usage, error)) + b"\n")


# --- cancel ----------------------------------------------------------------------------------
def cancel_job(ctx: Context, job_id: str) -> None:
    """Cancel upstream batches and every item that has not reached upstream.

    Finished images are kept; cancelled upstream batches are collected as usual (their partial
    output is real and billed), after which the job finalizes as ``cancelled``.
    """
    store = ctx.store
    job = store.job(job_id)
    if job is None or job["status"] != js.JOB_CANCELLING:
        return
    not_upstream: list[int] = []
    for n in store.chunks(job_id):
        chunk = store.chunk(job_id, n) or {}
        if chunk.get("status") == js.CHUNK_SUBMITTED and chunk.get("batch_id"):
            try:
                ctx.openai.batches.cancel(chunk["batch_id"])
            except openai.APIStatusError as exc:
                log.info(
                    "cancel %s: upstream said %s (it may have ended already)",
                    chunk["batch_id"],
                    exc.status_code,
                )
        elif chunk.get("status") in (js.CHUNK_PLANNED, js.CHUNK_WAITING, js.CHUNK_ASSEMBLING):
            store.set_chunk_status_if(
                job_id,
                n,
                [js.CHUNK_PLANNED, js.CHUNK_WAITING, js.CHUNK_ASSEMBLING],
                js.CHUNK_CANCELLED,
            )
            store.unmark(job_id, n)
            not_upstream.append(n)
    store.cancel_unsubmitted(job_id, not_upstream)
    enqueue_once(ctx, FINALIZE, job_id, job_id, ttl=1)
