"""Outbound webhooks: tell a caller's ``webhook_url`` that its job finished.

The body is ``{"type": "job.finished", "event": "job.finished", "timestamp": …, "job": <the job as
GET /v1/jobs/{id} shows it>}``, POSTed as JSON and signed (:mod:`service.webhooks.signing`) with
the tenant's secret; ``webhook-id`` is the same on every attempt, so receivers de-duplicate on it.

Delivery, step by step: finalize calls :func:`schedule` (the delivery is recorded as pending and
due now, then the ``webhooks`` queue gets a task); :func:`deliver` makes one attempt under a lease,
through :class:`~service.webhooks.guard.GuardedTransport` (addresses checked, whole-attempt
deadline ``IMAGEBATCH_WEBHOOK_TIMEOUT_SECONDS``, no redirects, no proxy) and records it; a 2xx is
delivered; a 408, 429, 5xx, connection error or timeout is retried after :data:`BACKOFF_SECONDS`
(about 24 h in all); any other answer, a refused address or a tenant without a secret ends the
delivery as failed. Retries wait in a Redis sorted set that :func:`sweep` (beat, on the webhooks
queue) reads, never in a Celery countdown. Every attempt is listed by :func:`delivery_view`
(``GET /v1/jobs/{id}/webhooks``) and counted in ``imagebatch_webhook_deliveries_total{outcome}``.

At least once: a lost task is re-enqueued by the sweep while the delivery is pending; the lease
keeps two workers from sending the same event at once, and a task for a delivery that is not due
or already ended does nothing.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx2
import orjson
import redis

from service import metrics
from service.context import Context
from service.failpoints import failpoint
from service.jobs.model import Job
from service.jobs.views import job_view
from service.queues import WEBHOOK
from service.redis import keys
from service.redis.leases import Lease, unmark
from service.webhooks.guard import AddressRefused, GuardedTransport, networks, webhook_url_problem
from service.webhooks.signing import signed_headers

log = logging.getLogger("imagebatch.webhooks")

EVENT = "job.finished"
# Seconds to wait after each failed attempt; they add up to just under 24 h, then it gives up.
BACKOFF_SECONDS = (5, 30, 120, 600, 1800, 3600, 7200, 14400, 28800, 28800)
GIVE_UP_SECONDS = 24 * 3600
# Attempts kept in the log (there are at most len(BACKOFF_SECONDS) + 1 of them).
MAX_LOGGED_ATTEMPTS = 20
# How long a finished delivery and its log are kept.
RETENTION_SECONDS = 30 * 24 * 3600
# The most of a receiver's answer read (for the log): the body is not ours to hold.
MAX_ANSWER_BYTES = 1024
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
NO_SECRET = (
    "no webhook secret is configured for this tenant (webhook_secret in the tenants file, or "
    "IMAGEBATCH_WEBHOOK_SECRET for an open API): webhooks are only sent signed"
)


def secret_for(ctx: Context, tenant_id: str) -> str | None:
    """The secret that signs ``tenant_id``'s webhooks, or None when it has none."""
    tenants = ctx.budgets.tenants
    if tenants.open:
        secret = ctx.settings.webhook_secret
        return secret.get_secret_value() if secret is not None else None
    tenant = tenants.get(tenant_id)
    return tenant.webhook_secret if tenant is not None else None


def url_checker(ctx: Context, tenant_id: str) -> Callable[[str], str | None]:
    """The intake check of a webhook URL: a secret to sign with, and an allowed address."""
    allowed = networks(ctx.settings.webhook_allowed_networks)

    def check(url: str) -> str | None:
        if secret_for(ctx, tenant_id) is None:
            return NO_SECRET
        return webhook_url_problem(url, allowed, timeout=ctx.settings.webhook_timeout_seconds)

    return check


def event_id(job: Job) -> str:
    """The same for every attempt at one event; a job finished again (a retry) is a new event."""
    return f"evt_{job.id.removeprefix('job_')}_{int((job.finished_at or 0) * 1000):x}"


def schedule(ctx: Context, job: Job) -> None:
    """Record the finished job's webhook as pending and due now, and queue its first attempt."""
    if not job.webhook_url:
        return
    now = time.time()
    key = keys.job_webhook(job.id)
    with ctx.redis.pipeline() as pipe:
        pipe.delete(key, keys.job_webhook_attempts(job.id))
        pipe.hset(
            key,
            mapping={
                "event_id": event_id(job),
                "url": job.webhook_url,
                "status": PENDING,
                "attempts": 0,
                "first_at": now,
                "next_at": now,
            },
        )
        pipe.zadd(keys.WEBHOOKS_DUE, {job.id: now})
        pipe.execute()
    ctx.enqueue_once(WEBHOOK, job.id, job.id, ttl=_enqueue_ttl(ctx))


def may_be_lost(ctx: Context, job: Job) -> bool:
    """Whether a finished job's webhook may never have been scheduled (its finalize died after
    the final status): it has a URL, no delivery is recorded, and it finished recently enough to
    be sent still."""
    return bool(
        job.webhook_url
        and time.time() - (job.finished_at or 0) <= GIVE_UP_SECONDS
        and not ctx.redis.exists(keys.job_webhook(job.id))
    )


def schedule_if_lost(ctx: Context, job: Job) -> bool:
    """Schedule the webhook :func:`may_be_lost` says was never scheduled; True when it did."""
    if not may_be_lost(ctx, job):
        return False
    schedule(ctx, job)
    return True


def _enqueue_ttl(ctx: Context) -> float:
    # Long enough that a queued attempt is not queued again; short enough that a lost one is.
    return ctx.settings.webhook_timeout_seconds + 30


def sweep(ctx: Context, limit: int = 500) -> int:
    """Queue an attempt for every delivery that is due (retries, and tasks that were lost)."""
    due = ctx.redis.zrangebyscore(keys.WEBHOOKS_DUE, "-inf", time.time(), start=0, num=limit)
    queued = 0
    for raw in due:
        job_id = raw.decode()
        queued += ctx.enqueue_once(WEBHOOK, job_id, job_id, ttl=_enqueue_ttl(ctx))
    return queued


def deliver(ctx: Context, job_id: str) -> str | None:
    """One attempt at a pending, due delivery; its outcome, or None when there was nothing to do."""
    lease = Lease(ctx.redis, keys.webhook_lock(job_id), ctx.settings.webhook_timeout_seconds + 30)
    with lease.held() as got:
        if not got:
            return None
        try:
            return _deliver_once(ctx, job_id)
        finally:
            # Whatever happened, the sweep may queue the next attempt once it is due.
            unmark(ctx.redis, keys.enqueued(WEBHOOK, job_id))


def _deliver_once(ctx: Context, job_id: str) -> str | None:
    state = _state(ctx.redis, job_id)
    job = ctx.store.job(job_id)
    if job is None or state.get("status") != PENDING:
        ctx.redis.zrem(keys.WEBHOOKS_DUE, job_id)
        return None
    if float(state.get("next_at", 0)) > time.time() + 1:
        return None  # a duplicate task: the next attempt is not due yet
    # In flight: the sweep leaves it alone until the attempt must have ended (a worker that dies
    # mid-attempt is retried from here).
    ctx.redis.zadd(keys.WEBHOOKS_DUE, {job_id: time.time() + _enqueue_ttl(ctx)})
    attempt = int(state.get("attempts", 0)) + 1
    record = _attempt(ctx, job, state["event_id"], state["url"])
    record["attempt"] = attempt
    failpoint("webhook.before_record")
    _record(ctx, job_id, attempt, record, float(state.get("first_at", time.time())))
    failpoint("webhook.after_record")
    return str(record["outcome"])


def _attempt(ctx: Context, job: Job, event: str, url: str) -> dict[str, Any]:
    """Send once; what happened, as the attempt log shows it."""
    started = time.time()
    record: dict[str, Any] = {"at": _iso(started), "status_code": None, "address": None}
    secret = secret_for(ctx, job.tenant)
    if secret is None:
        return {**record, "outcome": "blocked", "error": NO_SECRET, "duration_ms": 0}
    body = orjson.dumps(
        {"type": EVENT, "event": EVENT, "timestamp": _iso(started), "job": job_view(ctx, job)}
    )
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "imagebatch-webhooks",
        **signed_headers(secret, event, int(started), body),
    }
    deadline = time.monotonic() + ctx.settings.webhook_timeout_seconds
    transport = GuardedTransport(networks(ctx.settings.webhook_allowed_networks), deadline)
    outcome, error, status = "failed", None, None
    try:
        with (
            httpx2.Client(transport=transport, follow_redirects=False, trust_env=False) as client,
            client.stream("POST", url, content=body, headers=headers) as resp,
        ):
            status = resp.status_code
            if 200 <= status < 300:
                outcome = "delivered"  # the answer's body is not read: it is not ours to wait for
            elif status in (408, 429) or status >= 500:
                outcome, error = "failed", f"the receiver answered {status}{_read_some(resp)}"
            else:
                answer = _read_some(resp)
                outcome, error = "rejected", f"the receiver answered {status}{answer}; not retried"
    except AddressRefused as exc:
        outcome, error = "blocked", f"refused: {exc}"
    except httpx2.TimeoutException:
        outcome = "timeout"
        error = f"no complete answer within {ctx.settings.webhook_timeout_seconds:g}s"
    except httpx2.HTTPError as exc:
        outcome, error = "failed", f"{type(exc).__name__}: {exc}"
    record.update(
        outcome=outcome,
        status_code=status,
        error=error,
        address=transport.backend.peer,
        duration_ms=round((time.time() - started) * 1000),
    )
    return record


def _read_some(resp: httpx2.Response) -> str:
    """At most MAX_ANSWER_BYTES of the answer, for the log; never the rest of it."""
    got = b""
    try:
        for chunk in resp.iter_raw():
            got += chunk
            if len(got) >= MAX_ANSWER_BYTES:
                break
    except httpx2.HTTPError:
        pass  # the status is what matters; a trickled or broken body is not waited for
    text = got[:MAX_ANSWER_BYTES].decode("utf-8", "replace").strip()
    return f": {text[:200]}" if text else ""


def _record(ctx: Context, job_id: str, attempt: int, record: dict[str, Any], first: float) -> None:
    """Log the attempt, count it, and decide: done, or when to try again."""
    outcome = record["outcome"]
    now = time.time()
    fields: dict[str, Any] = {"attempts": attempt, "last_outcome": outcome}
    retry_in = BACKOFF_SECONDS[attempt - 1] if attempt - 1 < len(BACKOFF_SECONDS) else None
    if outcome == "delivered":
        fields["status"] = DELIVERED
    elif outcome in ("rejected", "blocked"):
        fields["status"] = FAILED
    elif retry_in is None or now + retry_in - first > GIVE_UP_SECONDS:
        fields["status"] = FAILED
        record["gave_up"] = True
    else:
        fields["next_at"] = now + retry_in
        record["next_attempt_at"] = _iso(now + retry_in)
    with ctx.redis.pipeline() as pipe:
        pipe.hset(keys.job_webhook(job_id), mapping=fields)
        pipe.rpush(keys.job_webhook_attempts(job_id), orjson.dumps(record))
        pipe.ltrim(keys.job_webhook_attempts(job_id), -MAX_LOGGED_ATTEMPTS, -1)
        if "next_at" in fields:
            pipe.zadd(keys.WEBHOOKS_DUE, {job_id: fields["next_at"]})
        else:
            pipe.zrem(keys.WEBHOOKS_DUE, job_id)
            pipe.expire(keys.job_webhook(job_id), RETENTION_SECONDS)
            pipe.expire(keys.job_webhook_attempts(job_id), RETENTION_SECONDS)
        metrics.count(pipe, metrics.WEBHOOK_DELIVERIES, {"outcome": outcome})
        if record.get("gave_up"):
            metrics.count(pipe, metrics.WEBHOOK_DELIVERIES, {"outcome": "expired"})
        pipe.execute()
    level = logging.INFO if outcome == "delivered" else logging.WARNING
    log.log(level, "webhook for %s attempt %d: %s %s", job_id, attempt, outcome, record["error"])


def delivery_view(ctx: Context, job: Job) -> dict[str, Any]:
    """The job's webhook delivery and its attempts, as ``GET /v1/jobs/{id}/webhooks`` shows it."""
    state = _state(ctx.redis, job.id)
    attempts = [orjson.loads(a) for a in ctx.redis.lrange(keys.job_webhook_attempts(job.id), 0, -1)]
    status = state.get("status") or ("not_sent" if job.webhook_url else "none")
    next_at = state.get("next_at") if status == PENDING else None
    return {
        "object": "list",
        "url": job.webhook_url,
        "event_id": state.get("event_id"),
        "status": status,
        "next_attempt_at": _iso(float(next_at)) if next_at else None,
        "data": attempts,
    }


def _state(r: redis.Redis, job_id: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in r.hgetall(keys.job_webhook(job_id)).items()}


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).isoformat(timespec="milliseconds")
