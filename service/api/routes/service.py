"""What the deployment is and whether it is well: ``/v1/info``, ``/healthz``, ``/readyz``,
``/metrics``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from service import exposition
from service.api.deps import ctx_of, tenants_of
from service.api.problems import problem_response
from service.errors import Problem

router = APIRouter(tags=["service"])

SIMULATOR_NOTE = (
    "Using the built-in simulator: images are synthetic and nothing is billed. "
    "Set OPENAI_API_KEY to use OpenAI."
)


@router.get("/v1/info", summary="What this deployment runs against")
def info(request: Request) -> dict[str, Any]:
    ctx = ctx_of(request)
    settings = ctx.settings
    simulated = settings.simulator or settings.openai_api_key is None
    return {
        "version": request.app.version,
        "upstream": {
            "simulator": simulated,
            "base_url": ctx.upstream.base_url,
            "note": SIMULATOR_NOTE if simulated else None,
        },
        "storage": ctx.storage.description,
        "auth": "open (tenant 'default')" if tenants_of(request).open else "bearer keys per tenant",
        "default_model": ctx.catalog.default_model,
        "models": sorted(ctx.models().live_ids()),
        "limits": {
            "max_items_per_job": settings.max_items_per_job,
            "max_body_bytes": settings.max_body_bytes,
            "batch_max_lines": settings.batch_max_lines,
            "batch_max_bytes": settings.batch_max_bytes,
        },
    }


@router.get("/healthz", summary="Liveness")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: Redis and storage reachable")
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
    if all(v == "ok" for v in checks.values()):
        return JSONResponse({"status": "ready", "checks": checks})
    detail = "; ".join(f"{k}: {v}" for k, v in checks.items() if v != "ok")
    return problem_response(Problem(503, "Not ready", detail, extra={"checks": checks}))


@router.get("/metrics", summary="Prometheus metrics")
def prometheus(request: Request) -> Response:
    data, ctype = exposition.render(request.app.state.metrics)
    return Response(data, media_type=ctype)
