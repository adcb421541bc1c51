"""Intake: the one way a job comes in, whoever submits it (the API, a schedule, the console).

:func:`submit_body` validates a body (JSON or a CSV catalog) into a :class:`JobSpec`, then
:func:`submit` estimates it, checks the tenant's budget, stores the request, records the job and
enqueues its first step. Order matters for "an accepted job is never lost": the request is
written to storage first (``jobs/{id}/request.jsonl``), then the job and its items are recorded in
Redis, then planning is enqueued; only then does the caller get an answer. A crash before the
Redis write leaves an orphan request file and no job (the caller got no answer and retries); a
crash after it leaves a job the sweep will plan even if the enqueue was lost.

An ``Idempotency-Key`` makes a submission safe to repeat: the same key from the same tenant within
:data:`IDEMPOTENCY_TTL_SECONDS` returns the first job instead of making another. A repeat that
arrives while the first is still being stored (a client that timed out and retried at once) is
refused with 409 rather than given a second job; if the first submitter died mid-way, the key is
free again after :data:`IDEMPOTENCY_PENDING_SECONDS`. The SHA-256 of the request (body, content
type and query) is kept beside the key, so the same key with a different request is refused
(422) rather than answered with a job that is not what was sent.

A job may point only where its tenant may (:func:`job_scope`): references inside the tenant's
reference prefixes or images of its own jobs, upstream file ids if allowed, and a webhook with a
signing secret and an allowed address.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass

from service import pricing
from service.context import Context
from service.errors import FieldError, Problem, conflict
from service.jobs import reuse
from service.jobs.jsonbody import paused_gc
from service.jobs.model import JOB_QUEUED, Job
from service.jobs.params import JobScope, parse_ref_prefix, storage_prefix
from service.jobs.request import request_record
from service.jobs.schema import image_count, item_ids
from service.jobs.spec import JobSpec, parse_job_csv, parse_job_json
from service.models import capability
from service.queues import PLAN, SYNC_ITEMS
from service.redis import keys
from service.storage import request_key

IDEMPOTENCY_TTL_SECONDS = 24 * 3600
# How long a key is held for a submission still storing its request: far longer than storing the
# largest body takes, short enough that a crashed submitter does not block its client's retry long.
IDEMPOTENCY_PENDING_SECONDS = 300
MAX_IDEMPOTENCY_KEY_CHARS = 255
JSON_TYPES = ("application/json",)
CSV_TYPE = "text/csv"


@dataclass(frozen=True)
class Submission:
    """What became of a submission: the job, and whether this call created it."""

    job: Job
    created: bool
    warnings: tuple[str, ...] = ()


def new_job_id() -> str:
    """Sortable by creation time (milliseconds), unguessable."""
    return f"job_{int(time.time() * 1000):011x}{secrets.token_hex(6)}"


def media_type(content_type: str | None) -> str:
    """``json`` or ``csv`` for a Content-Type intake reads; a 415 for anything else or none."""
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype == CSV_TYPE:
        return "csv"
    if ctype in JSON_TYPES or (ctype.startswith("application/") and ctype.endswith("+json")):
        return "json"
    got = f"not {ctype}" if ctype else "with a Content-Type header"
    raise Problem(
        415,
        "Unsupported media type",
        f"send the job as application/json or text/csv, {got}",
        errors=[FieldError("Content-Type", "must be application/json or text/csv")],
        extra={"accepted": ["application/json", "text/csv"]},
    )


def job_scope(ctx: Context, tenant_id: str) -> JobScope:
    """Where ``tenant_id``'s references and webhook may point (see the module docstring)."""
    from service.webhooks.outbound import url_checker

    tenants = ctx.budgets.tenants
    tenant = tenants.get(tenant_id)
    if tenants.open:
        texts = [*ctx.settings.reference_prefixes]
        texts += [root.resolve().as_uri() for root in ctx.settings.local_ref_roots]
        prefixes = tuple(parse_ref_prefix(t) for t in texts)
        file_ids = True
    else:
        prefixes = tenant.reference_prefixes if tenant is not None else ()
        file_ids = tenant is not None and tenant.file_ids

    @functools.lru_cache(maxsize=1024)
    def owns(job_id: str) -> bool:
        job = ctx.store.job(job_id)
        return job is not None and job.tenant == tenant_id

    return JobScope(
        prefixes=prefixes,
        file_ids=file_ids,
        storage=storage_prefix(ctx.settings.storage_location),
        owns_job=owns,
        webhook=url_checker(ctx, tenant_id),
    )


class Body:
    """A request body handed to intake, which lets go of it once it is parsed.

    The body is the biggest thing a submission holds; once the document is built from it, only
    the document matters. Passed as a Body (not as bytes every caller's frame keeps a reference
    to), it is freed before the job is validated and stored.
    """

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._data: bytes | bytearray | memoryview | None = data
        self.size = len(data)

    def peek(self) -> bytes | bytearray | memoryview:
        if self._data is None:
            raise RuntimeError("the body was already handed over")
        return self._data

    def take(self) -> bytes | bytearray | memoryview:
        data = self.peek()
        self._data = None
        return data


def parse_body(
    ctx: Context,
    body: bytes | bytearray | memoryview | Body,
    content_type: str | None,
    query: Mapping[str, str],
    tenant: str | None = None,
) -> JobSpec:
    """Validate a job body: JSON (a job), or ``text/csv`` (a catalog, job fields in ``query``).

    With ``tenant``, references and the webhook are checked against where it may point.
    """
    kind = media_type(content_type)
    limit = ctx.settings.max_items_per_job
    scope = job_scope(ctx, tenant) if tenant is not None else None
    # Rendered template prompts share the body's budget: a small CSV must not become 500 MB.
    if not isinstance(body, Body):
        body = Body(body)
    budget = max(0, ctx.settings.max_body_bytes - body.size)
    # The model is checked against upstream's lifecycle and what was learned, not the catalog
    # alone: a model upstream shut down or stopped offering is refused here.
    models = ctx.models()
    with paused_gc():
        # take(): from here the parser holds the only reference, so the body goes when it can.
        if kind == "csv":
            params = dict(query)
            return parse_job_csv(
                body.take(),
                params,
                ctx.catalog,
                max_items=limit,
                models=models,
                scope=scope,
                prompt_bytes=budget,
            )
        return parse_job_json(
            body.take(),
            ctx.catalog,
            max_items=limit,
            models=models,
            scope=scope,
            prompt_bytes=budget,
        )


def request_digest(
    body: bytes | bytearray | memoryview, content_type: str | None, query: Mapping[str, str]
) -> str:
    """The SHA-256 of what a submission asked for (kept beside its Idempotency-Key)."""
    h = hashlib.sha256()
    h.update((content_type or "").encode() + b"\n")
    h.update("&".join(f"{k}={v}" for k, v in sorted(query.items())).encode() + b"\n")
    h.update(body)
    return h.hexdigest()


def estimate(ctx: Context, spec: JobSpec, tenant: str | None = None) -> pricing.Estimate:
    """The job's estimate; output tokens learned from ``usage`` where OpenAI publishes none.

    With ``tenant``, items whose image the tenant already has are counted under ``reuse`` and
    left out of the price (:func:`service.jobs.reuse.estimate`: generations are looked up;
    edits whose references must be read are priced in full)."""
    model = ctx.catalog.get(spec.model)
    learned = None
    if model is not None and not model.token_counts_published:
        learned = {model.id: capability.learned_tokens(ctx.redis, model.id)}
    capable = capability.batch_capable(ctx.redis, ctx.catalog, spec.model)
    lane = spec.lane(ctx.catalog, ctx.settings.sync_max_items, capable)
    if tenant is None or spec.reuse == "never":
        cost = pricing.estimate_job(spec.items, ctx.catalog, learned)
    else:
        index = reuse.ReuseIndex.of(ctx, tenant)
        rest, found = reuse.estimate(index if index.size() else None, ctx.catalog, spec.items)
        cost = reuse.saved_estimate(rest, found, ctx.catalog, learned)
    # Expected cost at the lane's price beside the worst case: everything at the sync price.
    return dataclasses.replace(cost, lane=lane)


def submit_body(
    ctx: Context,
    tenant: str,
    body: bytes | bytearray | memoryview | Body,
    content_type: str | None,
    query: Mapping[str, str],
    idempotency_key: str | None = None,
) -> Submission:
    """Validate and submit a job body (see :func:`parse_body` and :func:`submit`)."""
    _check_idempotency_key(idempotency_key)
    if not isinstance(body, Body):
        body = Body(body)
    digest = request_digest(body.peek(), content_type, query) if idempotency_key else None
    spec = parse_body(ctx, body, content_type, query, tenant)
    return submit(ctx, spec, tenant, idempotency_key, request_sha256=digest)


def submit(
    ctx: Context,
    spec: JobSpec,
    tenant: str,
    idempotency_key: str | None = None,
    *,
    job_id: str | None = None,
    request_sha256: str | None = None,
) -> Submission:
    """Estimate, check the tenant's budget, store, record and enqueue a validated job.

    ``job_id`` is for callers that derive the id themselves (a schedule's slot); it must be new.
    ``request_sha256`` (with an Idempotency-Key) is what the request asked for: a repeat of the
    key with another digest is refused.
    """
    _check_idempotency_key(idempotency_key)
    cost = estimate(ctx, spec, tenant)
    capable = capability.batch_capable(ctx.redis, ctx.catalog, spec.model)
    lane = spec.lane(ctx.catalog, ctx.settings.sync_max_items, capable)
    ctx.budgets.check_tenant(ctx.budgets.tenant(tenant), cost.nanousd(lane), lane)
    job_id = job_id or new_job_id()
    idem = keys.idempotency(tenant, idempotency_key) if idempotency_key else None
    if idem is not None and idempotency_key is not None:
        digest_key = keys.idempotency_digest(tenant, idempotency_key)
        existing = _claim_key(ctx, idem, job_id)
        if existing is not None:
            _same_request(ctx, digest_key, existing, request_sha256)
            return Submission(existing, created=False, warnings=spec.warnings)
        if request_sha256:
            ctx.redis.set(digest_key, request_sha256, ex=IDEMPOTENCY_TTL_SECONDS)
    try:
        job = _store(ctx, spec, job_id, tenant, idempotency_key, cost, lane)
    except BaseException:
        if idem is not None and _text(ctx.redis.get(idem)) == job_id:
            ctx.redis.delete(idem)
        raise
    if idem is not None:
        ctx.redis.set(idem, job_id, ex=IDEMPOTENCY_TTL_SECONDS)
    return Submission(job, created=True, warnings=spec.warnings)


def _same_request(ctx: Context, digest_key: str, job: Job, request_sha256: str | None) -> None:
    """Refuse a repeat of an Idempotency-Key that asks for something else than the first did."""
    first = _text(ctx.redis.get(digest_key))
    if request_sha256 and first and first != request_sha256:
        message = (
            f"this key was used for job '{job.id}' with a different request; use a new key "
            "for a different job"
        )
        raise Problem(
            422,
            "Idempotency-Key reused",
            f"Idempotency-Key: {message}",
            errors=[FieldError("Idempotency-Key", message)],
        )


def _claim_key(ctx: Context, idem: str, job_id: str) -> Job | None:
    """Hold the Idempotency-Key for ``job_id``; or the job it already made (a repeat)."""
    if ctx.redis.set(idem, job_id, nx=True, ex=IDEMPOTENCY_PENDING_SECONDS):
        return None
    existing = _text(ctx.redis.get(idem))
    job = ctx.store.job(existing) if existing else None
    if job is not None:
        return job
    # Held, and no job yet: the first submission is still storing its request.
    if existing is not None or not ctx.redis.set(
        idem, job_id, nx=True, ex=IDEMPOTENCY_PENDING_SECONDS
    ):
        raise conflict(
            "a job with this Idempotency-Key is still being submitted; retry in a few seconds "
            "to get it"
        )
    return None


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _check_idempotency_key(key: str | None) -> None:
    if key is not None and not (0 < len(key) <= MAX_IDEMPOTENCY_KEY_CHARS):
        message = f"must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters"
        raise Problem(
            422,
            "Invalid request",
            f"Idempotency-Key: {message}",
            errors=[FieldError("Idempotency-Key", message)],
        )


def _store(
    ctx: Context,
    spec: JobSpec,
    job_id: str,
    tenant: str,
    idempotency_key: str | None,
    cost: pricing.Estimate,
    lane: str,
) -> Job:
    with ctx.storage.writer(
        request_key(job_id),
        content_type="application/jsonl",
        metadata={"job": job_id, "tenant": tenant},
    ) as out:
        for item in spec.items:
            out.write(request_record(item))
    now = time.time()
    job = Job(
        id=job_id,
        tenant=tenant,
        status=JOB_QUEUED,
        model=spec.model,
        mode=lane,
        requested_mode=spec.mode,
        items=len(spec.items),
        images=image_count(spec.items),
        created_at=now,
        updated_at=now,
        labels=dict(spec.labels),
        estimate=cost.to_dict(),
        max_cost_usd=spec.max_cost_usd,
        webhook_url=spec.webhook_url,
        idempotency_key=idempotency_key,
        reuse=spec.reuse,
        deadline=spec.deadline,
        on_deadline=spec.on_deadline,
    )
    ctx.store.create_job(job, item_ids(spec.items))
    ctx.enqueue(SYNC_ITEMS if lane == "sync" else PLAN, job_id)
    return job
