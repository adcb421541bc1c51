"""When a job will finish: a forecast with a median, a pessimistic bound and what it rests on.

Every upstream batch that completes leaves a sample (:func:`record_batch`, called by collect):
how many lines it had, how long it took from when its chunk could first go upstream (planned, or
its turn in the token queue: :func:`eligible_at`) to its images stored, and how much of that
grew with its lines (upstream's ``in_progress_at`` to ``finalizing_at``). Samples are kept
per model and size (and per model across sizes) in a capped list in Redis, newest first
(``IMAGEBATCH_ETA_SAMPLES`` of them), and weigh less as they age (half as much every
``IMAGEBATCH_ETA_HALF_LIFE``), so the forecast follows upstream as it speeds up or slows down.

A job's forecast (:func:`job_eta`) replays what is left of it once per sample, as if every batch
took what that sample predicts for its size: batches already upstream end when their prediction
says; chunks still waiting are started in the order the queue would start them, behind the
other jobs' chunks waiting ahead of them, as the model's enqueued-token budget and the batch
creations left this hour allow; items not yet planned are chunks like any other. The job's
items on the sync lane take their share of the cluster-wide sync rate. The weighted median and
90th percentile of those finish times are ``p50`` and ``p90``. With no sample for the model, or
sync work and no sync rate configured, the forecast says ``no history`` and gives no times
rather than guess (:func:`forecast` is the pure part, tested on its own).

Failure semantics: a forecast only reads; a Redis error propagates to the caller (the sweep
retries on its next pass; a view fails like any other read).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from service.context import Context
from service.jobs.model import CHUNK_NOT_SUBMITTED, UPSTREAM_CHUNK_STATES, Chunk, Job
from service.redis import keys
from service.upstream import Batch

ANY_SIZE = "*"  # the samples of a model across sizes
NO_HISTORY = "no history"
SAMPLE_TTL_SECONDS = 30 * 86400  # a model unused this long starts again from no history
_AHEAD_LIMIT = 500  # other jobs' waiting chunks looked at ahead of this job's


@dataclass(frozen=True)
class Sample:
    """One completed upstream batch: ``lines``, ``seconds`` from our submit to its images
    stored, the part of those that grew with the lines (``scaled``), and when it ended."""

    lines: int
    seconds: float
    scaled: float
    at: float

    def predict(self, lines: int) -> float:
        """Seconds a batch of ``lines`` takes, as this one went: its fixed part, plus its
        per-line part scaled to ``lines``."""
        fixed = max(0.0, self.seconds - self.scaled)
        return fixed + self.scaled * lines / max(1, self.lines)

    def weight(self, now: float, half_life: float) -> float:
        return 0.5 ** (max(0.0, now - self.at) / max(1.0, half_life))


@dataclass(frozen=True)
class Work:
    """A chunk of the job still to end in the batch lane: its lines and input tokens, and when
    it went upstream (None: still waiting to be submitted)."""

    lines: int
    tokens: int
    started: float | None = None


@dataclass(frozen=True)
class Queue:
    """The shared budgets a waiting chunk must pass: the model's enqueued-token ``limit``
    (0 = unlimited), tokens other jobs' batches hold, other jobs' chunks waiting ahead
    (lines, tokens), and batch creations left this hour (``creates_per_hour`` 0 = unlimited)."""

    limit: int = 0
    held_by_others: int = 0
    ahead: tuple[tuple[int, int], ...] = ()
    creates_left: int = 0
    creates_per_hour: int = 0


@dataclass(frozen=True)
class SyncWork:
    """Images the job still has to send on the sync lane, and its share of the cluster's rate
    (images per minute; 0 = no rate known)."""

    images: int = 0
    per_minute: float = 0.0


@dataclass(frozen=True)
class Eta:
    """A forecast: unix times by which the job ends with even odds (``p50``) and nine in ten
    (``p90``), or None with ``basis`` saying why not."""

    p50: float | None
    p90: float | None
    basis: str
    samples: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def known(self) -> bool:
        return self.p50 is not None and self.p90 is not None


# --- samples ---------------------------------------------------------------------------------
def record_batch(ctx: Context, chunk: Chunk, batch: Batch, now: float | None = None) -> bool:
    """A chunk's batch ended and was collected (its tokens go back to the queue now): note
    the release, and if it completed keep how long it took as a sample. Only completed batches
    teach (a cancelled or expired one says nothing of how long one takes). The duration runs
    from when the chunk could first have gone upstream (:func:`eligible_at`), so it holds the
    submit's own latency, as a chunk waiting behind the queue will see it."""
    now = time.time() if now is None else now
    ctx.redis.set(keys.eta_released(chunk.model), repr(now), ex=86400)
    start = chunk.eligible_at or chunk.submitted_at
    if batch.status != "completed" or start is None or chunk.lines <= 0:
        return False
    model, size, lines = chunk.model, chunk.size, chunk.lines
    seconds = max(0.0, now - start)
    scaled = seconds
    if batch.in_progress_at and batch.finalizing_at:
        scaled = min(seconds, max(0.0, float(batch.finalizing_at - batch.in_progress_at)))
    raw = orjson.dumps({"lines": lines, "seconds": seconds, "scaled": scaled, "at": now})
    cap = ctx.settings.eta_samples
    pipe = ctx.redis.pipeline(transaction=False)
    for key in {keys.eta_samples(model, size or ANY_SIZE), keys.eta_samples(model, ANY_SIZE)}:
        pipe.lpush(key, raw)
        pipe.ltrim(key, 0, cap - 1)
        pipe.expire(key, SAMPLE_TTL_SECONDS)
    pipe.execute()
    return True


def eligible_at(ctx: Context, chunk: Chunk, now: float | None = None) -> float:
    """When ``chunk`` could first have gone upstream: when it was planned, or, if it waited
    for the token budget, when the budget last had tokens back (never before it waited)."""
    now = time.time() if now is None else now
    if chunk.waiting_since is None:
        return min(now, chunk.created_at or now)
    raw = ctx.redis.get(keys.eta_released(chunk.model))
    released = float(raw) if raw else chunk.waiting_since
    return min(now, max(chunk.waiting_since, released))


def samples(ctx: Context, model: str, size: str) -> list[Sample]:
    """The model's samples at ``size``, else across its sizes (newest first)."""
    for key in (keys.eta_samples(model, size or ANY_SIZE), keys.eta_samples(model, ANY_SIZE)):
        rows = ctx.redis.lrange(key, 0, -1)
        if rows:
            return [Sample(**orjson.loads(r)) for r in rows]
    return []


# --- the forecast (pure) -----------------------------------------------------------------------
def weighted_quantile(values: Sequence[float], weights: Sequence[float], q: float) -> float:
    """The smallest value with at least ``q`` of the total weight at or below it."""
    pairs = sorted(zip(values, weights, strict=True))
    total = sum(w for _, w in pairs)
    if not pairs or total <= 0:
        raise ValueError("no values to take a quantile of")
    running = 0.0
    for value, weight in pairs:
        running += weight
        if running >= q * total - 1e-12:
            return value
    return pairs[-1][0]


def _creation_at(now: float, queue: Queue, k: int) -> float:
    """When the ``k``-th creation from now (0-based) may happen under the hourly limit."""
    if queue.creates_per_hour <= 0 or k < queue.creates_left:
        return now
    return now + (k - queue.creates_left + 1) * 3600.0 / queue.creates_per_hour


def replay(now: float, works: Sequence[Work], queue: Queue, sample: Sample) -> float:
    """When the job's last batch ends if every batch takes what ``sample`` predicts."""
    running: list[tuple[float, int]] = []  # (end, tokens) of batches holding the queue
    finish = now
    for work in works:
        if work.started is not None:
            end = max(now, work.started + sample.predict(work.lines))
            running.append((end, work.tokens))
            finish = max(finish, end)
    if queue.held_by_others > 0:
        # Other jobs' batches: on average half-way through when we look.
        typical = max((w.lines for w in works), default=1)
        running.append((now + sample.predict(typical) / 2, queue.held_by_others))
    waiting = [(lines, tokens, False) for lines, tokens in queue.ahead]
    waiting += [(w.lines, w.tokens, True) for w in works if w.started is None]
    t = now
    for created, (lines, tokens, mine) in enumerate(waiting):
        while True:
            running = [(end, held) for end, held in running if end > t]
            held = sum(h for _, h in running)
            if queue.limit <= 0 or held + tokens <= queue.limit or not running:
                break
            t = min(end for end, _ in running)  # wait for the next batch to end
        t = max(t, _creation_at(now, queue, created))
        end = t + sample.predict(lines)
        running.append((end, tokens))
        if mine:
            finish = max(finish, end)
    return finish


def forecast(
    now: float,
    works: Sequence[Work],
    queue: Queue,
    history: Sequence[Sample],
    sync: SyncWork,
    half_life: float,
) -> Eta:
    """The job's forecast from what is left of it, the queue, and the samples (see module doc)."""
    parts: list[str] = []
    sync_end = now
    if sync.images > 0:
        if sync.per_minute <= 0:
            return Eta(None, None, f"{NO_HISTORY} (sync lane, no rate configured)")
        sync_end = now + sync.images * 60.0 / sync.per_minute
        parts.append(f"sync lane at {sync.per_minute:g} images/min for this job")
    if not works:
        if sync.images <= 0:
            return Eta(now, now, "nothing left to run")
        return Eta(sync_end, sync_end, "; ".join(parts))
    if not history:
        return Eta(None, None, NO_HISTORY)
    ends = [max(sync_end, replay(now, works, queue, s)) for s in history]
    weights = [s.weight(now, half_life) for s in history]
    p50 = weighted_quantile(ends, weights, 0.5)
    p90 = weighted_quantile(ends, weights, 0.9)
    ahead = len(queue.ahead)
    parts.insert(0, f"{len(history)} recent batches" + (f", {ahead} chunks ahead" if ahead else ""))
    return Eta(p50, p90, "; ".join(parts), samples=len(history))


# --- a job's forecast, from Redis ---------------------------------------------------------------
def job_eta(ctx: Context, job: Job, now: float | None = None) -> Eta:
    """The forecast of a live job (see the module doc)."""
    now = time.time() if now is None else now
    works, sizes, batch_open, mine = _works(ctx, job)
    counts = ctx.store.counts(job.id)
    unfinished = counts.get("pending", 0) + counts.get("queued", 0)
    sync = SyncWork()
    if job.mode == "sync":
        images_per_item = job.images / max(1, job.items)
        left = max(0, unfinished - batch_open)
        sync = SyncWork(math.ceil(left * images_per_item), _sync_share(ctx))
    elif counts.get("pending", 0) > 0:
        works += _pending_works(ctx, job, counts["pending"])
    size = max(sizes, key=lambda s: sizes[s]) if sizes else ANY_SIZE
    history = samples(ctx, job.model, size) if works else []
    queue = _queue(ctx, job, works, mine) if works else Queue()
    return forecast(now, works, queue, history, sync, ctx.settings.eta_half_life.total_seconds())


def _works(ctx: Context, job: Job) -> tuple[list[Work], dict[str, int], int, set[str]]:
    """The job's chunks still to end upstream, lines by size, lines open upstream, and the
    refs of its waiting chunks."""
    works: list[Work] = []
    sizes: dict[str, int] = {}
    batch_open = 0
    waiting: set[str] = set()
    for chunk in ctx.store.job_chunks(job.id):
        if chunk.status in UPSTREAM_CHUNK_STATES:
            start = chunk.eligible_at or chunk.submitted_at or None
            works.append(Work(chunk.lines, chunk.est_input_tokens, start))
            batch_open += chunk.open
        elif chunk.status in CHUNK_NOT_SUBMITTED and chunk.open > 0:
            works.append(Work(chunk.lines, chunk.est_input_tokens))
            batch_open += chunk.open
            waiting.add(chunk.ref)
        else:
            continue
        sizes[chunk.size or ANY_SIZE] = sizes.get(chunk.size or ANY_SIZE, 0) + chunk.lines
    return works, sizes, batch_open, waiting


def _pending_works(ctx: Context, job: Job, pending: int) -> list[Work]:
    """Items not yet planned, as the chunks plan would make of them."""
    tokens = (job.estimate or {}).get("tokens") or {}
    per_item = (tokens.get("text_input", 0) + tokens.get("image_input", 0)) / max(1, job.items)
    size = max(1, ctx.settings.batch_max_lines)
    out = []
    for start in range(0, pending, size):
        lines = min(size, pending - start)
        out.append(Work(lines, round(lines * per_item)))
    return out


def _queue(ctx: Context, job: Job, works: Sequence[Work], mine: set[str]) -> Queue:
    held, effective, _configured = ctx.budgets.queue.usage(job.model)
    own = sum(w.tokens for w in works if w.started is not None)
    ahead: list[tuple[int, int]] = []
    for job_id, number in ctx.store.waiting_chunks(_AHEAD_LIMIT):
        if f"{job_id}:{number}" in mine or job_id == job.id:
            break  # the first of ours: everything after waits behind it
        chunk = ctx.store.chunk(job_id, number)
        if chunk is not None and (chunk.model or job.model) == job.model and chunk.open > 0:
            ahead.append((chunk.lines, chunk.est_input_tokens))
    per_hour = ctx.settings.batch_creates_per_hour
    left = max(0, per_hour - ctx.budgets.creates.used()) if per_hour > 0 else 0
    return Queue(effective, max(0, held - own), tuple(ahead), left, per_hour)


def _sync_share(ctx: Context) -> float:
    """This job's share of the cluster-wide sync rate, images per minute (0: none configured):
    the tightest configured limit, shared evenly by the jobs sending on the sync lane."""
    s = ctx.settings
    limits = [x for x in (s.sync_images_per_minute, s.sync_rpm) if x > 0]
    if not limits:
        return 0.0
    active = ctx.store.active_jobs()
    pipe = ctx.redis.pipeline(transaction=False)
    for job_id in active:
        pipe.hget(keys.job(job_id), "mode")
    sending = sum(1 for mode in pipe.execute() if mode in (b"sync", "sync"))
    return min(limits) / max(1, sending)
