"""The HTTP API (v1): intake, status, items, manifest, cancel, metrics, health.

Every error is ``application/problem+json`` (RFC 9457). The API validates and stores requests
and enqueues work by task name; it never runs the batch path itself.
"""

from __future__ import annotations

import logging
import mimetypes
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import orjson
from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import metrics, tokens
from service.budgets.policy import check_tenant_budget
from service.context import Context, build_context
from service.errors import PROBLEM_CONTENT_TYPE, FieldError, Problem
from service.jobs import store as js
from service.jobs import views
from service.jobs.intake import accept_job
from service.jobs.spec import parse_job_csv, parse_job_json
from service.lanes.batch import enqueue_once
from service.pricing import estimate_job
from service.queues import CANCEL
from service.settings import Settings, get_settings
from service.storage import ObjectNotFound, StorageError
from service.tenants import AuthError, Tenants, load_tenants

log = logging.getLogger("imagebatch.api")

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
_JOB_BODY_DOC: dict[str, Any] = {
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


def problem_response(problem: Problem) -> JSONResponse:
    return JSONResponse(
        problem.to_dict(),
        status_code=problem.status,
        media_type=PROBLEM_CONTENT_TYPE,
        headers=problem.headers if hasattr(problem, "headers") else None,
    )


def create_app(settings: Settings | None = None, *, context: Context | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.ctx = context or build_context(settings)
        app.state.tenants = load_tenants(settings.tenants_file)
        if app.state.tenants.open:
            log.warning(
                "no tenants configured (IMAGEBATCH_TENANTS_FILE unset): the API is open, every job belongs to tenant 'default'"
            )
        app.state.metrics = metrics.registry(app.state.ctx)
        tokens.encoding()  # load the tokenizer now, not on the first request
        yield
        app.state.ctx.redis.close()

    app = FastAPI(
        title="imagebatch",
        version="1",
        summary="Large batches of image prompts to images in storage through OpenAI's Batch API.",
        lifespan=lifespan,
    )

    @app.exception_handler(Problem)
    async def _problem(_: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc)

    @app.exception_handler(AuthError)
    async def _auth(_: Request, exc: AuthError) -> JSONResponse:
        resp = problem_response(Problem(401, "Unauthorized", str(exc)))
        resp.headers["WWW-Authenticate"] = 'Bearer realm="imagebatch"'
        return resp

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            FieldError(
                field=".".join(
                    str(p) for p in e["loc"] if p not in ("query", "path", "header", "body")
                )
                or "request",
                message=e["msg"],
            )
            for e in exc.errors()
        ]
        first = errors[0] if errors else FieldError("request", "invalid request")
        return problem_response(
            Problem(422, "Invalid request", f"{first.field}: {first.message}", errors=errors)
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        title = {404: "Not found", 405: "Method not allowed"}.get(exc.status_code, "Error")
        return problem_response(Problem(exc.status_code, title, str(exc.detail)))

    @app.exception_handler(StorageError)
    async def _storage(_: Request, exc: StorageError) -> JSONResponse:
        log.error("storage error: %s", exc)
        return problem_response(
            Problem(503, "Storage unavailable", f"storage did not answer: {exc}")
        )

    def ctx_of(request: Request) -> Context:
        return request.app.state.ctx

    def tenant_of(request: Request) -> str:
        tenants: Tenants = request.app.state.tenants
        return tenants.authenticate(request.headers.get("authorization")).id

    def own_job(request: Request, job_id: str) -> dict[str, str]:
        tenant = tenant_of(request)
        job = ctx_of(request).store.job(job_id)
        if job is None or job.get("tenant") != tenant:
            # Another tenant's job is indistinguishable from no job.
            raise Problem(404, "Job not found", f"no job '{job_id}'")
        return job

    async def read_body(request: Request) -> bytes:
        limit = settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise Problem(
                413,
                "Request body too large",
                f"the body is {int(declared):,} bytes; the limit is {limit:,} (IMAGEBATCH_MAX_BODY_BYTES)",
            )
        chunks, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise Problem(
                    413,
                    "Request body too large",
                    f"the body is over the limit of {limit:,} bytes (IMAGEBATCH_MAX_BODY_BYTES)",
                )
            chunks.append(part)
        return b"".join(chunks)

    async def parse(request: Request) -> Any:
        body = await read_body(request)
        ctx = ctx_of(request)
        ctype = (
            (request.headers.get("content-type") or "application/json")
            .split(";")[0]
            .strip()
            .lower()
        )
        if ctype == "text/csv":
            return parse_job_csv(
                body, dict(request.query_params), ctx.catalog, max_items=settings.max_items_per_job
            )
        if ctype not in ("application/json", "application/*+json") and not ctype.endswith("+json"):
            raise Problem(
                415,
                "Unsupported media type",
                f"send the job as application/json or text/csv, not {ctype}",
            )
        return parse_job_json(body, ctx.catalog, max_items=settings.max_items_per_job)

    @app.post(
        "/v1/jobs",
        status_code=202,
        openapi_extra=_JOB_BODY_DOC,
        tags=["jobs"],
        summary="Submit a job (JSON items or template+rows, or a CSV catalog)",
    )
    async def submit(
        request: Request, idempotency_key: Annotated[str | None, Header()] = None
    ) -> JSONResponse:
        tenant = tenant_of(request)
        spec = await parse(request)
        ctx = ctx_of(request)
        estimate = estimate_job(spec.items, ctx.catalog)
        check_tenant_budget(ctx, request.app.state.tenants.get(tenant), spec, estimate)
        if idempotency_key is not None and not (0 < len(idempotency_key) <= 255):
            raise Problem(
                422,
                "Invalid request",
                "Idempotency-Key: must be 1 to 255 characters",
                errors=[FieldError("Idempotency-Key", "must be 1 to 255 characters")],
            )
        job_id, created = accept_job(ctx, spec, tenant, idempotency_key, estimate=estimate)
        job = ctx.store.job(job_id)
        body: dict[str, Any] = (
            views.job_view(ctx, job) if job else {"id": job_id, "object": "job", "status": "queued"}
        )
        body["warnings"] = list(spec.warnings)
        return JSONResponse(
            body,
            status_code=202,
            headers={"Location": f"/v1/jobs/{job_id}"}
            | ({"Idempotent-Replayed": "true"} if not created else {}),
        )

    @app.post(
        "/v1/jobs/estimate",
        openapi_extra=_JOB_BODY_DOC,
        tags=["jobs"],
        summary="Estimate tokens and USD (batch and sync) for a job body; creates nothing",
    )
    async def estimate(request: Request) -> dict[str, Any]:
        tenant_of(request)
        spec = await parse(request)
        return {
            **estimate_job(spec.items, ctx_of(request).catalog).to_dict(),
            "warnings": list(spec.warnings),
        }

    @app.get("/v1/jobs", tags=["jobs"], summary="List jobs, newest first")
    def list_jobs(
        request: Request,
        status: str | None = None,
        label: Annotated[list[str] | None, Query(description="key=value; repeat to AND")] = None,
        cursor: str | None = None,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
    ) -> dict[str, Any]:
        tenant = tenant_of(request)
        ctx = ctx_of(request)
        wanted = {}
        for pair in label or []:
            k, sep, v = pair.partition("=")
            if not sep:
                raise Problem(
                    422,
                    "Invalid request",
                    f"label: '{pair}' is not key=value",
                    errors=[FieldError("label", "expected key=value")],
                )
            wanted[k] = v
        try:
            before = float(cursor) if cursor else None
        except ValueError:
            raise Problem(
                422,
                "Invalid request",
                "cursor: not a cursor from a previous page",
                errors=[FieldError("cursor", "malformed")],
            ) from None
        out: list[dict[str, Any]] = []
        next_cursor = None
        while len(out) < limit:
            rows = ctx.store.list_jobs(tenant, before=before, limit=limit * 2)
            if not rows:
                break
            for job_id, score in rows:
                before = score
                job = ctx.store.job(job_id)
                if job is None or (status and job["status"] != status):
                    continue
                labels = orjson.loads(job.get("labels") or "{}")
                if any(labels.get(k) != v for k, v in wanted.items()):
                    continue
                out.append(views.job_view(ctx, job))
                if len(out) >= limit:
                    next_cursor = repr(score)
                    break
        return {"object": "list", "data": out, "next_cursor": next_cursor}

    @app.get(
        "/v1/jobs/{job_id}",
        tags=["jobs"],
        summary="A job: status, counts, tokens, cost, estimate, upstream batches",
    )
    def get_job(request: Request, job_id: str) -> dict[str, Any]:
        return views.job_view(ctx_of(request), own_job(request, job_id))

    @app.get(
        "/v1/jobs/{job_id}/items",
        tags=["jobs"],
        summary="A job's items with state, error, storage keys and URLs",
    )
    def get_items(
        request: Request,
        job_id: str,
        status: str | None = None,
        cursor: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> dict[str, Any]:
        job = own_job(request, job_id)
        valid = set(js.STATUS_NAMES.values())
        if status is not None and status not in valid:
            raise Problem(
                422,
                "Invalid request",
                f"status: must be one of {', '.join(sorted(valid))}",
                errors=[FieldError("status", "unknown item status")],
            )
        items, nxt = views.items_page(ctx_of(request), job, status, cursor, limit)
        return {"object": "list", "data": items, "next_cursor": nxt}

    @app.get(
        "/v1/jobs/{job_id}/manifest",
        tags=["jobs"],
        summary="The manifest (JSONL, streamed) of a finished job",
    )
    def get_manifest(request: Request, job_id: str) -> StreamingResponse:
        job = own_job(request, job_id)
        if job["status"] not in js.JOB_FINAL:
            raise Problem(
                409,
                "Job not finished",
                f"job '{job_id}' is {job['status']}; the manifest is written when it finishes",
            )
        ctx = ctx_of(request)
        return StreamingResponse(views.stream_manifest(ctx, job_id), media_type="application/jsonl")

    @app.post(
        "/v1/jobs/{job_id}/cancel",
        status_code=202,
        tags=["jobs"],
        summary="Cancel a job (finished images are kept)",
    )
    def cancel(request: Request, job_id: str) -> JSONResponse:
        job = own_job(request, job_id)
        ctx = ctx_of(request)
        if job["status"] in js.JOB_FINAL:
            raise Problem(409, "Job already finished", f"job '{job_id}' is already {job['status']}")
        ctx.store.set_job_status_if(
            job_id,
            [js.JOB_QUEUED, js.JOB_RUNNING],
            js.JOB_CANCELLING,
            reason="cancelled by the caller",
        )
        enqueue_once(ctx, CANCEL, job_id, job_id, ttl=5)
        return JSONResponse(views.job_view(ctx, ctx.store.job(job_id) or job), status_code=202)

    @app.get(
        "/v1/objects/{key:path}",
        tags=["storage"],
        summary="An object in local storage (images, manifests)",
    )
    def get_object(request: Request, key: str) -> StreamingResponse:
        parts = key.split("/")
        if len(parts) < 3 or parts[0] != "jobs":
            raise Problem(404, "Not found", f"no object '{key}'")
        own_job(request, parts[1])
        ctx = ctx_of(request)
        try:
            info = ctx.storage.head(key)
        except (ObjectNotFound, ValueError):
            raise Problem(404, "Not found", f"no object '{key}'") from None
        ctype = info.content_type or mimetypes.guess_type(key)[0] or "application/octet-stream"

        def body() -> Any:
            with ctx.storage.open(key) as fh:
                while chunk := fh.read(256 * 1024):
                    yield chunk

        return StreamingResponse(
            body(), media_type=ctype, headers={"Content-Length": str(info.size)}
        )

    @app.get("/v1/info", tags=["service"], summary="What this deployment runs against")
    def info(request: Request) -> dict[str, Any]:
        ctx = ctx_of(request)
        tenants: Tenants = request.app.state.tenants
        return {
            "version": app.version,
            "upstream": {
                "simulator": settings.simulator or ctx.settings.openai_api_key is None,
                "base_url": str(ctx.openai.base_url),
                "note": (
                    "Using the built-in simulator: images are synthetic and nothing is billed. "
                    "Set OPENAI_API_KEY to use OpenAI."
                )
                if (settings.simulator or ctx.settings.openai_api_key is None)
                else None,
            },
            "storage": ctx.storage.description,
            "auth": "open (tenant 'default')" if tenants.open else "bearer keys per tenant",
            "default_model": ctx.catalog.default_model,
            "models": sorted(m.id for m in ctx.catalog.models.values() if not m.is_shut_down()),
            "limits": {
                "max_items_per_job": settings.max_items_per_job,
                "max_body_bytes": settings.max_body_bytes,
                "batch_max_lines": settings.batch_max_lines,
                "batch_max_bytes": settings.batch_max_bytes,
            },
        }

    @app.get("/healthz", tags=["service"], summary="Liveness")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["service"], summary="Readiness: Redis and storage reachable")
    def readyz(request: Request) -> JSONResponse:
        ctx = ctx_of(request)
        checks: dict[str, str] = {}
        try:
            ctx.redis.ping()
            checks["redis"] = "ok"
        except Exception as exc:  # any failure means not ready; say which
            checks["redis"] = f"unreachable: {exc}"
        try:
            ctx.storage.check()
            checks["storage"] = "ok"
        except Exception as exc:
            checks["storage"] = f"unreachable: {exc}"
        ready = all(v == "ok" for v in checks.values())
        if ready:
            return JSONResponse({"status": "ready", "checks": checks})
        problem = Problem(
            503,
            "Not ready",
            "; ".join(f"{k}: {v}" for k, v in checks.items() if v != "ok"),
            extra={"checks": checks},
        )
        return problem_response(problem)

    @app.get("/metrics", tags=["service"], summary="Prometheus metrics")
    def prometheus(request: Request) -> Response:
        data, ctype = metrics.render(request.app.state.metrics)
        return Response(data, media_type=ctype)

    return app
