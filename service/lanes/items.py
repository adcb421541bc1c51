"""The per-item steps both lanes share: resolve references, store images, record usage or failure.

Both lanes end every item the same way: its images stored under deterministic keys
(:func:`store_images`, a repeat overwrites the same objects), its usage priced and counted once
(:func:`record_usage`, guarded by ``HSETNX`` in Redis), or its failure recorded with the retry
decision (:func:`record_failure`). Errors from upstream, whether a batch error line or a failed
sync request, become the same item error shape (:func:`error_from_line`,
:meth:`~service.upstream.errors.UpstreamError.item_error`).
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import pybase64

from service import pricing
from service.budgets.daily import daily_field, utc_day
from service.context import Context
from service.jobs.deadline import DEADLINE
from service.jobs.intake import job_scope
from service.jobs.model import CANCELLED, FAILED, PENDING, Job
from service.jobs.params import JobScope, ref_problem
from service.jobs.request import RequestLine
from service.jobs.store import DAILY, SPEND, TOTAL_COST, TOTAL_IMAGES, TOTAL_TOKENS
from service.models import capability
from service.redis import keys
from service.storage import (
    MAX_REF_BYTES,
    ObjectNotFound,
    ObjectTooLarge,
    ReferenceUnreadable,
    image_key,
)
from service.storage.port import read_capped

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# Error codes of lines that never ran: worth another attempt.
RETRYABLE_CODES = {"batch_expired", "batch_cancelled", "missing_result"}


class BadReference(Exception):
    """A caller's reference image that cannot be used; ``code`` is the item error's code:
    ``reference_unreadable`` (missing, access denied, no such bucket), ``reference_not_allowed``
    (outside the tenant's scope) or ``invalid_image_reference`` (too large, not a file)."""

    def __init__(self, message: str, code: str = "invalid_image_reference"):
        super().__init__(message)
        self.code = code


class RefResolver:
    """Turns a caller's image references into what an upstream request can carry.

    Every reference is checked against the job's tenant's scope again (intake did, but a tenant's
    prefixes may have changed since), so nothing outside it is ever read. ``https://`` and
    ``data:`` URLs go as ``image_url``; ``file-…`` ids as ``file_id``; images in a bucket or a
    directory (``s3://``, ``file://``) and the tenant's own job images are uploaded once per job
    (purpose ``vision``) and referenced by file id, remembered in Redis so a retry uploads
    nothing again. A reference storage refuses (missing, denied, no such bucket) fails its item
    at once: retrying cannot make it readable.
    """

    def __init__(self, ctx: Context, job_id: str, scope: JobScope | None = None):
        self.ctx, self.job_id = ctx, job_id
        self.key = keys.job_refs(job_id)
        if scope is None:
            job = ctx.store.job(job_id)
            scope = job_scope(ctx, job.tenant) if job is not None else JobScope()
        self.scope = scope

    def ref(self, value: str) -> dict[str, str]:
        problem = ref_problem(value) or self.scope.problem(value)
        if problem is not None:
            raise BadReference(
                f"reference image {value!r} may not be used: {problem}", "reference_not_allowed"
            )
        if value.startswith(("https://", "data:")):
            return {"image_url": value}
        if value.startswith("file-"):
            return {"file_id": value}
        known = self.ctx.redis.hget(self.key, value)
        if known:
            return {"file_id": known.decode()}
        data = self.read(value)
        name = value.rsplit("/", 1)[-1] or "image"
        file_id = self.ctx.upstream.upload(name, data, "vision")
        self.ctx.redis.hset(self.key, value, file_id)
        return {"file_id": file_id}

    def read(self, value: str) -> bytes:
        """The bytes of an ``s3://`` or ``file://`` reference (for upload, or to fingerprint
        the item: every read of a caller's reference goes through here, and so through the
        tenant's scope)."""
        problem = ref_problem(value) or self.scope.problem(value)
        if problem is not None:
            raise BadReference(
                f"reference image {value!r} may not be used: {problem}", "reference_not_allowed"
            )
        own = self.scope.own_image_key(value)
        try:
            return self._read_own(own) if own is not None else self.ctx.storage.read_ref(value)
        except (ObjectNotFound, ReferenceUnreadable) as exc:
            raise BadReference(
                f"reference image {value!r} cannot be read: {exc}", "reference_unreadable"
            ) from exc
        except (ObjectTooLarge, ValueError) as exc:
            raise BadReference(f"reference image {value!r} cannot be used: {exc}") from exc

    def _read_own(self, key: str) -> bytes:
        """One of the tenant's own stored images, read by key (never as a path)."""
        with self.ctx.storage.open(key) as fh:
            return read_capped(fh, MAX_REF_BYTES, what=f"reference image {key}")

    def resolve(self, body: dict[str, Any]) -> dict[str, Any]:
        if "images" not in body and "mask" not in body:
            return body
        out = dict(body)
        if "images" in out:
            out["images"] = [self.ref(v) if isinstance(v, str) else v for v in out["images"]]
        if isinstance(out.get("mask"), str):
            out["mask"] = self.ref(out["mask"])
        return out


def store_images(
    ctx: Context, job: Job, item_id: str, body: dict[str, Any], fmt: str = "png"
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
        key = image_key(job.id, item_id, ext, k if len(data) > 1 else None)
        digest = hashlib.sha256(blob).hexdigest()
        ctx.storage.put_bytes(
            key,
            blob,
            content_type=CONTENT_TYPES.get(fmt, "application/octet-stream"),
            metadata={
                "job": job.id,
                "item": item_id,
                "model": job.model,
                "size": str(body.get("size", "")),
                "quality": str(body.get("quality", "")),
                "sha256": digest,
            },
            sha256=digest,
        )
        stored.append(key)
    return stored, size


def record_usage(
    ctx: Context,
    job: Job,
    chunk: int,
    index: int,
    usage: dict[str, Any],
    stored: list[str],
    *,
    tier: str,
    size: str | None = None,
    quality: str | None = None,
) -> tuple[bool, int]:
    """Price an item's usage and add it to the job, tenant, model and campaign, exactly once.

    Returns (counted now, the item's cost in nano-USD); counted is False when the item had been
    counted before (a repeated collect), and nothing was added. For a model whose token counts
    are not published, the ``size`` and ``quality`` the image came out at (from the response)
    and its output tokens teach the estimates (once, with the count).
    """
    model = ctx.catalog.get(job.model)
    if model is None:
        raise RuntimeError(f"model {job.model!r} is not in the catalog")
    tokens = pricing.usage_tokens(usage)
    nanousd = pricing.cost_nanousd(tokens, model, ctx.catalog, tier)
    increments: list[tuple[int, str, int]] = [
        (SPEND, f"cost:{tier}", nanousd),
        (SPEND, "images", len(stored)),
        (SPEND, f"items:{tier}", 1),  # items per lane (the job view's `lanes`)
        (TOTAL_COST, f"{job.tenant}|{model.id}|{tier}|{job.campaign}", nanousd),
        (TOTAL_IMAGES, f"{model.id}|succeeded", len(stored)),
        # The day's spend by model, lane and campaign (the console's spend page), counted in
        # the same call, so exactly once too.
        (DAILY, daily_field(model.id, tier, job.campaign), nanousd),
    ]
    for kind, amount in tokens.as_dict().items():
        if amount:
            increments += [
                (SPEND, kind, amount),
                (TOTAL_TOKENS, f"{job.tenant}|{model.id}|{kind}|{tier}", amount),
            ]
    record = {
        "tokens": tokens.as_dict(),
        "cost_nanousd": nanousd,
        "tier": tier,
        "keys": stored,
        "chunk": chunk,
    }
    daily = keys.tenant_spend_daily(job.tenant, utc_day(time.time()))
    counted = ctx.store.record_success(job.id, index, record, increments, daily)
    if counted and not model.token_counts_published and size and quality:
        capability.observe_tokens(
            ctx.redis, model.id, size, quality, tokens.image_output, len(stored)
        )
    return counted, nanousd


def record_failure(
    ctx: Context,
    job: Job,
    chunk: int,
    line: RequestLine | int,
    error: dict[str, Any],
    action: str,
) -> str:
    """Record that an item's request failed; ``action`` is retry, fail or cancel.

    Returns the item's new status letter ('' when the failure was stale: the item had moved on).
    """
    index, images = (line, 1) if isinstance(line, int) else (line.index, line.images)
    return ctx.store.record_failure(
        job.id, index, chunk, error, action, ctx.settings.max_attempts, job.model, images
    )


def fail_bad_reference(
    ctx: Context, job: Job, chunk: int, line: RequestLine, exc: BadReference
) -> None:
    error = {"code": exc.code, "message": str(exc)}
    record_failure(ctx, job, chunk, line, error, "fail")


def error_from_line(rec: dict[str, Any]) -> dict[str, Any]:
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


def line_failure_action(job: Job, error: dict[str, Any]) -> str:
    """What a failed batch line means for its item: retry it, fail it, or (job stopping) cancel.
    A line that never ran, of a job that left the batch lane for its deadline, goes back to
    pending without counting an attempt (the sync lane takes it)."""
    if not job.is_live and error.get("retryable", True):
        return "cancel"
    if job.lane_reason == DEADLINE and error.get("code") in RETRYABLE_CODES:
        return "requeue"
    if error.get("retryable") or error.get("code") in RETRYABLE_CODES:
        return "retry"
    return "fail"


def outcome_name(new_status: str) -> str | None:
    """The collect counter a recorded failure adds to."""
    return {PENDING: "retried", FAILED: "failed", CANCELLED: "cancelled"}.get(new_status)
