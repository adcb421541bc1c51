"""Deadlines: what the sweep does for a job that must finish by a time (``deadline``).

On every pass the sweep hands each unfinished job here (:func:`check`). Its forecast
(:mod:`service.jobs.eta`) is kept for ``/metrics`` (refreshed at most every
:data:`REFRESH_SECONDS` for a job without a deadline), and the job's ``on_deadline`` is applied:

* ``wait``: nothing changes; the view and the metrics say whether the forecast misses.
* ``cancel``: at the deadline the job is cancelled as a caller's cancel would (upstream batches
  cancelled, what they finished collected and kept; the rest ``cancelled``).
* ``sync``: once the forecast's p90 plus ``IMAGEBATCH_DEADLINE_MARGIN_SECONDS`` passes the
  deadline, or the clock alone comes within the margin of it, the job leaves the batch lane
  (:func:`leave_batch_lane`): it is marked ``sync`` with reason ``deadline``; its chunks not yet
  upstream move to the sync lane through the reroute path (:func:`service.lanes.reroute.reroute_chunk`);
  its upstream batches are cancelled, and their collect keeps every line they finished and puts
  the lines that never ran back to pending without counting an attempt; the sync lane's fan-out
  takes what is pending. The sync lane holds each item's full price against ``max_cost_usd`` and
  the tenant's caps before sending it, as for any sync job.

No item is made twice: an item is in exactly one chunk at a time, the sync lane sends only items
queued in its chunk 0, and items of an upstream batch reach it only after that batch's collect
has recorded their outcome (a finished line is final; only lines that never ran come back).

At least once: every step may run again. Switching is a plain write of the same fields; a chunk
not yet upstream is moved under its submit lease (so a submit cannot be creating its batch
meanwhile), and a batch is cancelled once (the chunk remembers it asked).
"""

from __future__ import annotations

import logging
import time

import orjson

from service.context import Context
from service.jobs import eta
from service.jobs.deadline import DEADLINE
from service.jobs.model import (
    CHUNK_PLANNED,
    CHUNK_SUBMITTED,
    CHUNK_WAITING,
    JOB_CANCELLING,
    JOB_LIVE,
    Job,
)
from service.lanes.reroute import reroute_chunk
from service.queues import CANCEL, SYNC_ITEMS
from service.redis import keys
from service.redis.leases import Lease
from service.upstream import UpstreamError

log = logging.getLogger("imagebatch.deadlines")

# How often a job without a deadline has its forecast recomputed for /metrics.
REFRESH_SECONDS = 15.0
CANCEL_ASKED = "cancelled to make the job's deadline"  # a chunk's last_error once asked
# Chunks moved to the sync lane: complete and not upstream. An assembling chunk is left to its
# plan, which closes it (planned) or finds the job on the sync lane; the next pass takes it.
_WAITING = (CHUNK_PLANNED, CHUNK_WAITING)


def check(ctx: Context, job: Job, now: float | None = None) -> str | None:
    """The sweep's pass over one unfinished job: its forecast kept, its deadline applied.

    Returns what was done: ``cancelled``, ``sync`` (the job left the batch lane now),
    ``draining`` (it had left, and batches were still being cancelled) or None.
    """
    now = time.time() if now is None else now
    if job.deadline is None and not _stale(ctx, job.id, now):
        return None
    forecast = eta.job_eta(ctx, job, now)
    _keep(ctx, job, forecast, now)
    if job.deadline is None or job.status not in JOB_LIVE:
        return None
    if job.on_deadline == "cancel" and now >= job.deadline:
        return cancel_at_deadline(ctx, job)
    if job.on_deadline != "sync":
        return None
    if job.lane_reason == DEADLINE:
        return "draining" if drain(ctx, job) else None
    if job.mode != "sync" and will_miss(job, forecast, ctx.settings.deadline_margin_seconds, now):
        leave_batch_lane(ctx, job)
        return "sync"
    return None


def will_miss(job: Job, forecast: eta.Eta, margin: float, now: float) -> bool:
    """Will the job miss its deadline on the batch lane? The clock says so within ``margin``
    of it; the forecast says so when its p90 plus ``margin`` is past it."""
    if job.deadline is None:
        return False
    if now + margin >= job.deadline:
        return True
    return forecast.p90 is not None and forecast.p90 + margin > job.deadline


def leave_batch_lane(ctx: Context, job: Job) -> None:
    """Send the job's unfinished items to the sync lane (see the module doc)."""
    ctx.store.switch_to_sync(job.id, DEADLINE)
    log.warning(
        "job %s leaves the batch lane to make its deadline: its unfinished items go to the "
        "sync lane at full price",
        job.id,
    )
    drain(ctx, ctx.store.job(job.id) or job)
    ctx.enqueue(SYNC_ITEMS, job.id)  # the fan-out takes what is pending


def drain(ctx: Context, job: Job) -> int:
    """Move the job's chunks not yet upstream to the sync lane and ask upstream to cancel its
    batches not yet asked; returns how many chunks it acted on (0: nothing left to do)."""
    acted = 0
    for chunk in ctx.store.job_chunks(job.id):
        if chunk.status in _WAITING:
            acted += _reroute_waiting(ctx, job, chunk.number)
        elif (
            chunk.status == CHUNK_SUBMITTED and chunk.batch_id and chunk.last_error != CANCEL_ASKED
        ):
            _cancel_batch(ctx, job, chunk.number, chunk.batch_id)
            acted += 1
    return acted


def _reroute_waiting(ctx: Context, job: Job, number: int) -> int:
    """A chunk not yet upstream goes to the sync lane, under its submit lease: a submit cannot
    be creating its batch meanwhile (if one holds the lease, the next pass tries again)."""
    with Lease(
        ctx.redis, keys.submit_lock(job.id, number), ctx.settings.lease_seconds
    ).held() as got:
        chunk = ctx.store.chunk(job.id, number) if got else None
        if chunk is None or chunk.status not in _WAITING:
            return 0
        reroute_chunk(ctx, job, chunk, _WAITING, DEADLINE)
        return 1


def _cancel_batch(ctx: Context, job: Job, number: int, batch_id: str) -> None:
    try:
        ctx.upstream.cancel_batch(batch_id)
    except UpstreamError as exc:
        if exc.transient:
            return  # the next pass asks again
        log.info("cancel %s: upstream said %s (it may have ended already)", batch_id, exc.status)
    ctx.store.update_chunk(job.id, number, last_error=CANCEL_ASKED)
    log.info("job %s: batch %s cancelled to make the deadline", job.id, batch_id)


def cancel_at_deadline(ctx: Context, job: Job) -> str | None:
    """``on_deadline: cancel`` and the deadline has come: cancel as a caller would."""
    if ctx.store.set_job_status_if(
        job.id, JOB_LIVE, JOB_CANCELLING, reason="cancelled at its deadline"
    ):
        log.info("job %s reached its deadline: cancelled", job.id)
    ctx.enqueue_once(CANCEL, job.id, job.id, ttl=5)
    return "cancelled"


# --- the forecasts /metrics reads ---------------------------------------------------------------
def _stale(ctx: Context, job_id: str, now: float) -> bool:
    raw = ctx.redis.hget(keys.JOB_ETAS, job_id)
    return raw is None or now - float(orjson.loads(raw).get("at", 0)) >= REFRESH_SECONDS


def _keep(ctx: Context, job: Job, forecast: eta.Eta, now: float) -> None:
    entry = {
        "p50": forecast.p50,
        "p90": forecast.p90,
        "basis": forecast.basis,
        "deadline": job.deadline,
        "on_deadline": job.on_deadline,
        "tenant": job.tenant,
        "at": now,
    }
    ctx.redis.hset(keys.JOB_ETAS, job.id, orjson.dumps(entry))


def forget(ctx: Context, job_id: str) -> None:
    """A finished job has no forecast."""
    ctx.redis.hdel(keys.JOB_ETAS, job_id)
