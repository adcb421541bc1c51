"""What the deployment is and whether it is well: ``/v1/info``, ``/healthz``, ``/readyz``,
``/metrics``.

With tenants configured, ``/v1/info`` needs a tenant key and shows that tenant what it may know
(its caps, prefixes, what its webhooks need), never the storage location, the upstream URL or
other tenants; ``/metrics`` needs ``IMAGEBATCH_METRICS_TOKEN``. ``/healthz`` and ``/readyz`` stay
open and say only whether Redis and storage answer, not where they are.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from service import exposition
from service.api.deps import ctx_of, require_metrics_token, tenant_record, tenants_of
from service.api.problems import COMMON, documented, problem_response
from service.errors import Problem

log = logging.getLogger("imagebatch.api")
router = APIRouter(tags=["service"], responses=COMMON)

SIMULATOR_NOTE = (
    "Using the built-in simulator: images are synthetic and nothing is billed. "
    "Set OPENAI_API_KEY to use OpenAI."
)


@router.get("/v1/info", summary="What this deployment runs against (for your tenant)")
def info(request: Request) -> dict[str, Any]:
    tenant = tenant_record(request)
    ctx = ctx_of(request)
    settings = ctx.settings
    simulated = settings.simulator or settings.openai_api_key is None
    upstream: dict[str, Any] = {
        "simulator": simulated,
        "note": SIMULATOR_NOTE if simulated else None,
    }
    where: dict[str, Any] = {}
    if tenants_of(request).open:
        # An open API's caller is its operator: where things are is theirs to see.
        upstream["base_url"] = ctx.upstream.base_url
        where["storage"] = ctx.storage.description
        prefixes = [*settings.reference_prefixes, *(str(r) for r in settings.local_ref_roots)]
        signed = settings.webhook_secret is not None
    else:
        prefixes = [p.text for p in tenant.reference_prefixes]
        signed = tenant.webhook_secret is not None
    return {
        "version": request.app.version,
        "upstream": upstream,
        **where,
        "auth": "open (tenant 'default')" if tenants_of(request).open else "bearer keys per tenant",
        "tenant": {
            "id": tenant.id,
            "daily_usd": tenant.daily_usd,
            "monthly_usd": tenant.monthly_usd,
            "reference_prefixes": prefixes,
            "file_ids": tenant.file_ids or tenants_of(request).open,
            "webhooks": "signed" if signed else "unavailable: no webhook secret configured",
        },
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
async def healthz() -> dict[str, str]:
    # Answered on the event loop, not in a worker thread: liveness is whether the loop turns,
    # and a probe must not wait behind (or take a thread from) the jobs being validated.
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: Redis and storage reachable", responses=documented(503))
def readyz(request: Request) -> JSONResponse:
    ctx = ctx_of(request)
    checks: dict[str, str] = {}
    # The causes name hosts and buckets: they go to the log, the probe only learns which failed.
    try:
        ctx.redis.ping()
        checks["redis"] = "ok"
    except Exception as exc:  # any failure means not ready; say which
        log.warning("readiness: redis unreachable: %s", exc)
        checks["redis"] = "unreachable"
    try:
        ctx.storage.check()
        checks["storage"] = "ok"
    except Exception as exc:
        log.warning("readiness: storage unreachable: %s", exc)
        checks["storage"] = "unreachable"
    if all(v == "ok" for v in checks.values()):
        return JSONResponse({"status": "ready", "checks": checks})
    detail = "; ".join(f"{k}: {v}" for k, v in checks.items() if v != "ok")
    return problem_response(Problem(503, "Not ready", detail, extra={"checks": checks}))


@router.get(
    "/metrics",
    summary="Prometheus metrics (Authorization: Bearer <IMAGEBATCH_METRICS_TOKEN>)",
    dependencies=[Depends(require_metrics_token)],
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
def prometheus(request: Request) -> Response:
    data, ctype = exposition.render(request.app.state.metrics)
    return Response(data, media_type=ctype)
