"""``/v1/jobs``: submit, estimate, list, read, items, manifest, cancel, retry, review, webhook
deliveries.

Parsing and storing a job run in a worker thread (``run_in_threadpool``): the event loop keeps
answering ``/healthz`` and every other request while a large body is validated.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from service.api.deps import (
    ctx_of,
    index_cursor,
    own_job,
    read_body,
    read_body_buffer,
    score_cursor,
    tenant_of,
)
from service.api.problems import COMMON, documented
from service.context import Context
from service.errors import FieldError, Problem
from service.jobs import intake, retry, views
from service.jobs import review as reviews
from service.jobs.model import JOB_CANCELLING, JOB_LIVE, STATUS_NAMES
from service.queues import CANCEL
from service.webhooks import outbound

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=COMMON)

JOB_BODY_EXAMPLE = {
    "model": "gpt-image-2",
    "mode": "batch",
    "defaults": {"size": "1024x1024", "quality": "low", "output_format": "png", "n": 1},
    "items": [
        {
            "id": "sku-1001",
            "prompt": "Studio photo of a red ceramic mug on white",
            "quality": "medium",
        },
        {"id": "sku-1002", "prompt": "The same mug on a kitchen shelf"},
    ],
    "labels": {"campaign": "spring-sale", "team": "catalog"},
    "max_cost_usd": 25.0,
}
JOB_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"type": "object"}, "example": JOB_BODY_EXAMPLE},
            "text/csv": {
                "schema": {"type": "string"},
                "example": "id,color,title\nsku-1,red,mug\n",
            },
        },
    }
}


@router.post(
    "",
    status_code=202,
    openapi_extra=JOB_BODY_DOC,
    summary="Submit a job (JSON items or template+rows, or a CSV catalog)",
    responses=documented(409, 413, 415),
)
async def submit(
    request: Request, idempotency_key: Annotated[str | None, Header()] = None
) -> JSONResponse:
    tenant = tenant_of(request)
    ctype = request.headers.get("content-type")
    intake.media_type(ctype)  # a 415 before the body is read
    body = intake.Body(await read_body_buffer(request))  # handed over: freed once parsed
    ctx = ctx_of(request)
    query = dict(request.query_params)

    def work() -> tuple[dict[str, Any], intake.Submission]:
        done = intake.submit_body(ctx, tenant, body, ctype, query, idempotency_key)
        return views.job_view(ctx, done.job), done

    view, done = await run_in_threadpool(work)
    view["warnings"] = list(done.warnings)
    headers = {"Location": f"/v1/jobs/{done.job.id}"}
    if not done.created:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(view, status_code=202, headers=headers)


@router.post(
    "/estimate",
    openapi_extra=JOB_BODY_DOC,
    summary="Estimate tokens and USD (batch and sync) for a job body; creates nothing",
    responses=documented(413, 415),
)
async def estimate(request: Request) -> dict[str, Any]:
    tenant = tenant_of(request)
    ctype = request.headers.get("content-type")
    intake.media_type(ctype)
    body = intake.Body(await read_body_buffer(request))
    ctx = ctx_of(request)
    query = dict(request.query_params)

    def work(ctx: Context) -> dict[str, Any]:
        spec = intake.parse_body(ctx, body, ctype, query, tenant)
        return {**intake.estimate(ctx, spec, tenant).to_dict(), "warnings": list(spec.warnings)}

    return await run_in_threadpool(work, ctx)


def _labels(pairs: list[str]) -> dict[str, str]:
    wanted = {}
    for pair in pairs:
        k, sep, v = pair.partition("=")
        if not sep:
            raise Problem(
                422,
                "Invalid request",
                f"label: '{pair}' is not key=value",
                errors=[FieldError("label", "expected key=value")],
            )
        wanted[k] = v
    return wanted


@router.get("", summary="List jobs, newest first")
def list_jobs(
    request: Request,
    status: str | None = None,
    label: Annotated[list[str] | None, Query(description="key=value; repeat to AND")] = None,
    schedule: Annotated[str | None, Query(description="runs of this schedule")] = None,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> dict[str, Any]:
    tenant = tenant_of(request)
    ctx = ctx_of(request)
    wanted = _labels(label or [])
    if schedule:
        wanted["schedule"] = schedule  # every run's job carries the label
    before = score_cursor(cursor)
    out: list[dict[str, Any]] = []
    next_cursor = None
    while len(out) < limit:
        rows = ctx.store.list_jobs(tenant, before=before, limit=limit * 2)
        if not rows:
            break
        for job_id, score in rows:
            before = score
            job = ctx.store.job(job_id)
            if job is None or (status and job.status != status):
                continue
            if any(job.labels.get(k) != v for k, v in wanted.items()):
                continue
            out.append(views.job_view(ctx, job))
            if len(out) >= limit:
                next_cursor = repr(score)
                break
    return {"object": "list", "data": out, "next_cursor": next_cursor}


@router.get("/{job_id}", summary="A job: status, counts, tokens, cost, estimate, upstream batches")
def get_job(request: Request, job_id: str) -> dict[str, Any]:
    return views.job_view(ctx_of(request), own_job(request, job_id))


@router.get(
    "/{job_id}/items",
    summary="A job's items with state, error, storage keys and URLs",
    description=(
        "Items in index order from `cursor` on. A page filtered by `status` or `review` reads "
        "at most 10,000 items: it may hold fewer than `limit` (even none) with a `next_cursor` "
        "to go on from; `next_cursor` null means the end of the job."
    ),
)
def get_items(
    request: Request,
    job_id: str,
    status: str | None = None,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    review: Annotated[
        str | None, Query(description="approved, rejected or unreviewed (images not yet reviewed)")
    ] = None,
) -> dict[str, Any]:
    job = own_job(request, job_id)
    if review is not None and review not in reviews.FILTERS:
        raise Problem(
            422,
            "Invalid request",
            f"review: must be one of {', '.join(reviews.FILTERS)}",
            errors=[FieldError("review", "unknown review decision")],
        )
    start = index_cursor(cursor)
    valid = set(STATUS_NAMES.values())
    if status is not None and status not in valid:
        raise Problem(
            422,
            "Invalid request",
            f"status: must be one of {', '.join(sorted(valid))}",
            errors=[FieldError("status", "unknown item status")],
        )
    items, nxt = views.items_page(ctx_of(request), job, status, start, limit, review)
    return {"object": "list", "data": items, "next_cursor": nxt}


@router.get(
    "/{job_id}/manifest",
    summary="The manifest (JSONL, streamed) of a finished job",
    responses=documented(409),
)
def get_manifest(request: Request, job_id: str) -> StreamingResponse:
    job = own_job(request, job_id)
    if not job.is_final:
        raise Problem(
            409,
            "Job not finished",
            f"job '{job_id}' is {job.status}; the manifest is written when it finishes",
        )
    stream = views.stream_manifest(ctx_of(request), job_id)
    return StreamingResponse(stream, media_type="application/jsonl")


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    summary="Cancel a job (finished images are kept)",
    responses=documented(409),
)
def cancel(request: Request, job_id: str) -> JSONResponse:
    job = own_job(request, job_id)
    ctx = ctx_of(request)
    if job.is_final:
        raise Problem(409, "Job already finished", f"job '{job_id}' is already {job.status}")
    ctx.store.set_job_status_if(job_id, JOB_LIVE, JOB_CANCELLING, reason="cancelled by the caller")
    ctx.enqueue_once(CANCEL, job_id, job_id, ttl=5)
    return JSONResponse(views.job_view(ctx, ctx.store.job(job_id) or job), status_code=202)


RETRY_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": False,
        "content": {
            "application/json": {
                "schema": {"type": "object"},
                "examples": {
                    "failed": {"summary": "the failed items (the default)", "value": {}},
                    "statuses": {"value": {"statuses": ["failed", "budget_exhausted"]}},
                    "items": {
                        "summary": "listed items, with overrides",
                        "value": {"items": [{"id": "sku-7", "prompt": "A red mug, no logo"}]},
                    },
                },
            }
        },
    }
}


@router.post(
    "/{job_id}/retry",
    status_code=202,
    openapi_extra=RETRY_BODY_DOC,
    summary="Run a finished job's failed (or listed) items again, in the same job",
)
async def retry_items(
    request: Request, job_id: str, idempotency_key: Annotated[str | None, Header()] = None
) -> JSONResponse:
    job = own_job(request, job_id)
    wanted = retry.parse_retry_body(await read_body(request))
    ctx = ctx_of(request)
    done = retry.retry_job(ctx, job, wanted, idempotency_key)
    view = views.job_view(ctx, done.job)
    view["retried"] = done.retried
    headers = {"Location": f"/v1/jobs/{job_id}"}
    if not done.created:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(view, status_code=202, headers=headers)


@router.post(
    "/{job_id}/review",
    summary="Approve or reject a job's images, each with an optional note",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"type": "object"},
                    "example": {
                        "items": [
                            {"id": "sku-1001", "decision": "approved"},
                            {"id": "sku-1002", "decision": "rejected", "note": "mug is blue"},
                        ]
                    },
                }
            },
        }
    },
)
async def review(request: Request, job_id: str) -> dict[str, Any]:
    job = own_job(request, job_id)
    decisions = reviews.parse_review_body(await read_body(request))
    ctx = ctx_of(request)
    done = reviews.review(ctx, job, decisions)
    counts = ctx.store.counts(job_id)
    return {**done, "review": views.review_counts(ctx, job, counts.get("succeeded", 0))}


@router.get(
    "/{job_id}/webhooks",
    summary="The job's webhook delivery: status, next attempt, and every attempt made",
)
def get_webhooks(request: Request, job_id: str) -> dict[str, Any]:
    job = own_job(request, job_id)
    return outbound.delivery_view(ctx_of(request), job)
