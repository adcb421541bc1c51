"""Intake: a validated job becomes durable, then visible, then queued.

Order matters for "an accepted job is never lost": the request is written to storage first
(``jobs/{id}/request.jsonl``), then the job and its items are recorded in Redis, then planning is
enqueued; only then does the API answer ``202``. A crash before the Redis write leaves an orphan
request file and no job (the caller got no 202 and retries); a crash after it leaves a job the
sweep will plan even if the enqueue was lost.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import orjson

from service import pricing
from service.context import Context
from service.jobs.spec import JobSpec
from service.lanes.batch import request_record
from service.queues import PLAN, SYNC_ITEMS
from service.redis import keys
from service.storage import request_key

IDEMPOTENCY_TTL_SECONDS = 24 * 3600


def new_job_id() -> str:
    """Sortable by creation time (milliseconds), unguessable."""
    return f"job_{int(time.time() * 1000):011x}{secrets.token_hex(6)}"


def accept_job(
    ctx: Context,
    spec: JobSpec,
    tenant: str,
    idempotency_key: str | None = None,
    *,
    estimate: pricing.Estimate | None = None,
) -> tuple[str, bool]:
    """Store and queue a job. Returns (job id, created); created is False for a replayed key."""
    if idempotency_key:
        idem = keys.idempotency(tenant, idempotency_key)
        job_id = new_job_id()
        if not ctx.redis.set(idem, job_id, nx=True, ex=IDEMPOTENCY_TTL_SECONDS):
            existing = ctx.redis.get(idem)
            if existing:
                return existing.decode(), False
    else:
        job_id = new_job_id()
    try:
        _store(ctx, spec, job_id, tenant, idempotency_key, estimate)
    except BaseException:
        if idempotency_key:
            ctx.redis.delete(keys.idempotency(tenant, idempotency_key))
        raise
    return job_id, True


def _store(
    ctx: Context,
    spec: JobSpec,
    job_id: str,
    tenant: str,
    idempotency_key: str | None,
    estimate: pricing.Estimate | None,
) -> None:
    estimate = estimate or pricing.estimate_job(spec.items, ctx.catalog)
    with ctx.storage.writer(
        request_key(job_id),
        content_type="application/jsonl",
        metadata={"job": job_id, "tenant": tenant},
    ) as out:
        for item in spec.items:
            out.write(request_record(item))
    chosen = spec.lane(ctx.catalog, ctx.settings.sync_max_items)
    now = time.time()
    fields: dict[str, Any] = {
        "id": job_id,
        "tenant": tenant,
        "status": "queued",
        "mode": chosen,
        "requested_mode": spec.mode,
        "model": spec.model,
        "created_at": now,
        "updated_at": now,
        "items": len(spec.items),
        "images": sum(item.n for item in spec.items),
        "labels": orjson.dumps(spec.labels).decode(),
        "campaign": spec.labels.get("campaign", ""),
        "estimate": orjson.dumps(estimate.to_dict()).decode(),
        "max_cost_usd": spec.max_cost_usd,
        "webhook_url": spec.webhook_url,
        "idempotency_key": idempotency_key,
    }
    ctx.store.create_job(job_id, fields, (item.id for item in spec.items))
    ctx.enqueue(SYNC_ITEMS if chosen == "sync" else PLAN, job_id)
