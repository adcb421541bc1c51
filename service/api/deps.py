"""What a route needs from the request: the process's context, the caller's tenant, their job,
the body read within its limit, and the operations token.

Ids and cursors from the path and query are checked here, before they reach Redis: a malformed
job id is a 404 like any unknown one (so nobody learns which strings are ids), a malformed cursor
a 400.
"""

from __future__ import annotations

import hmac
import re

from fastapi import Request

from service.context import Context
from service.errors import FieldError, Problem, unauthorized
from service.jobs.model import Job
from service.tenants import Tenant, Tenants

# What new_job_id makes: "job_", milliseconds in hex, 12 random hex digits.
JOB_ID_RE = re.compile(r"job_[0-9a-f]{20,40}", re.ASCII)
_ASCII_DIGITS = re.compile(r"[0-9]{1,12}", re.ASCII)
_SCORE_RE = re.compile(r"[0-9]{1,17}(\.[0-9]{1,12})?", re.ASCII)


def ctx_of(request: Request) -> Context:
    ctx: Context = request.app.state.ctx
    return ctx


def tenants_of(request: Request) -> Tenants:
    tenants: Tenants = request.app.state.tenants
    return tenants


def tenant_record(request: Request) -> Tenant:
    """The caller's tenant (raises AuthError, a 401, without a valid key)."""
    return tenants_of(request).authenticate(request.headers.get("authorization"))


def tenant_of(request: Request) -> str:
    """The caller's tenant id (raises AuthError, a 401, without a valid key)."""
    return tenant_record(request).id


def no_job(job_id: str) -> Problem:
    detail = f"no job {job_id[:80]!r}"
    return Problem(404, "Job not found", detail, errors=[FieldError("job_id", detail)])


def own_job(request: Request, job_id: str) -> Job:
    """The caller's job ``job_id``; another tenant's job is indistinguishable from no job."""
    tenant = tenant_of(request)
    if not JOB_ID_RE.fullmatch(job_id):
        raise no_job(job_id)
    job = ctx_of(request).store.job(job_id)
    if job is None or job.tenant != tenant:
        raise no_job(job_id)
    return job


def bad_cursor() -> Problem:
    message = "not a cursor from a previous page (use next_cursor as it was given)"
    return Problem(
        400,
        "Invalid cursor",
        f"cursor: {message}",
        errors=[FieldError("cursor", message)],
    )


def index_cursor(cursor: str | None) -> int:
    """An item listing's cursor: the index to go on from."""
    if cursor is None or cursor == "":
        return 0
    if not _ASCII_DIGITS.fullmatch(cursor):
        raise bad_cursor()
    return int(cursor)


def score_cursor(cursor: str | None) -> float | None:
    """A job listing's cursor: the creation time to go on before."""
    if cursor is None or cursor == "":
        return None
    if not _SCORE_RE.fullmatch(cursor):
        raise bad_cursor()
    return float(cursor)


def require_metrics_token(request: Request) -> None:
    """``/metrics`` needs ``Bearer <IMAGEBATCH_METRICS_TOKEN>`` when a token is set, and is closed
    when tenants are configured without one (its series name tenants, jobs and spend)."""
    settings = ctx_of(request).settings
    token = settings.metrics_token.get_secret_value() if settings.metrics_token else None
    if token is None:
        if tenants_of(request).open:
            return
        raise unauthorized(
            "/metrics is closed: set IMAGEBATCH_METRICS_TOKEN and send it as "
            "'Authorization: Bearer <token>'"
        )
    scheme, _, presented = (request.headers.get("authorization") or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        presented.strip().encode(), token.encode()
    ):
        raise unauthorized("/metrics needs 'Authorization: Bearer <IMAGEBATCH_METRICS_TOKEN>'")


async def read_body_buffer(request: Request, limit: int | None = None) -> bytearray:
    """The body in one buffer, refused with 413 as soon as it is over ``limit`` (default
    ``IMAGEBATCH_MAX_BODY_BYTES``).

    One bytearray grown as the body arrives (a remap of its pages, not a copy of the body, and
    nothing zero-filled up front on the event loop): the API holds the body once, not as chunks
    plus their join.
    """
    setting = "" if limit else " (IMAGEBATCH_MAX_BODY_BYTES)"
    limit = limit or ctx_of(request).settings.max_body_bytes
    declared = request.headers.get("content-length", "")
    if _ASCII_DIGITS.fullmatch(declared) and int(declared) > limit:
        raise _too_large(f"the body is {int(declared):,} bytes; the limit is {limit:,}{setting}")
    body = bytearray()
    async for part in request.stream():
        if len(body) + len(part) > limit:
            raise _too_large(f"the body is over the limit of {limit:,} bytes{setting}")
        body += part
    return body


async def read_body(request: Request, limit: int | None = None) -> bytes:
    """:func:`read_body_buffer` as bytes (for small bodies: it copies)."""
    return bytes(await read_body_buffer(request, limit))


def _too_large(detail: str) -> Problem:
    return Problem(
        413,
        "Request body too large",
        f"{detail}; split the request",
        errors=[FieldError("body", "over the size limit")],
    )
