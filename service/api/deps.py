"""What a route needs from the request: the process's context, the caller's tenant, their job,
and the body read within its limit."""

from __future__ import annotations

from fastapi import Request

from service.context import Context
from service.errors import Problem
from service.jobs.model import Job
from service.tenants import Tenants


def ctx_of(request: Request) -> Context:
    ctx: Context = request.app.state.ctx
    return ctx


def tenants_of(request: Request) -> Tenants:
    tenants: Tenants = request.app.state.tenants
    return tenants


def tenant_of(request: Request) -> str:
    """The caller's tenant id (raises AuthError, a 401, without a valid key)."""
    return tenants_of(request).authenticate(request.headers.get("authorization")).id


def own_job(request: Request, job_id: str) -> Job:
    """The caller's job ``job_id``; another tenant's job is indistinguishable from no job."""
    tenant = tenant_of(request)
    job = ctx_of(request).store.job(job_id)
    if job is None or job.tenant != tenant:
        raise Problem(404, "Job not found", f"no job '{job_id}'")
    return job


async def read_body(request: Request, limit: int | None = None) -> bytes:
    """The body, refused with 413 as soon as it is over ``limit`` (default
    ``IMAGEBATCH_MAX_BODY_BYTES``)."""
    setting = "" if limit else " (IMAGEBATCH_MAX_BODY_BYTES)"
    limit = limit or ctx_of(request).settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise Problem(
            413,
            "Request body too large",
            f"the body is {int(declared):,} bytes; the limit is {limit:,}{setting}",
        )
    chunks, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise Problem(
                413,
                "Request body too large",
                f"the body is over the limit of {limit:,} bytes{setting}",
            )
        chunks.append(part)
    return b"".join(chunks)
