"""``/v1/schedules``: cron schedules that make jobs from a job template or a catalog URL."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import JSONResponse

from service.api.deps import ctx_of, read_body, tenant_of
from service.errors import not_found
from service.jobs import views
from service.schedules import define, runner
from service.schedules.model import Schedule, schedule_view
from service.schedules.store import ScheduleStore

router = APIRouter(prefix="/v1/schedules", tags=["schedules"])

SCHEDULE_EXAMPLE = {
    "name": "weekly catalog",
    "cron": "0 6 * * MON",
    "timezone": "Europe/Riga",
    "catalog_url": "s3://catalog/products.csv",
    "template": "Studio photo of a {color} {title} on white",
    "params": {"quality": "low", "size": "1024x1024"},
    "labels": {"campaign": "weekly", "team": "catalog"},
    "max_cost_usd": 50.0,
    "catch_up": "one",
}
BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"type": "object"}, "example": SCHEDULE_EXAMPLE}
        },
    }
}


def _store(request: Request) -> ScheduleStore:
    return ScheduleStore(ctx_of(request).redis)


def _view(request: Request, schedule: Schedule) -> dict[str, Any]:
    last = ctx_of(request).store.job(schedule.last_job_id) if schedule.last_job_id else None
    return schedule_view(schedule, last.status if last else None)


def own_schedule(request: Request, schedule_id: str) -> Schedule:
    """The caller's schedule; another tenant's is indistinguishable from none."""
    tenant = tenant_of(request)
    schedule = _store(request).get(schedule_id)
    if schedule is None or schedule.tenant != tenant:
        raise not_found("schedule", schedule_id)
    return schedule


@router.post("", status_code=201, openapi_extra=BODY_DOC, summary="Create a schedule")
async def create(request: Request) -> JSONResponse:
    tenant = tenant_of(request)
    doc = define.parse_body(await read_body(request))
    schedule = define.create(ctx_of(request), tenant, doc)
    _store(request).save(schedule)
    return JSONResponse(
        _view(request, schedule),
        status_code=201,
        headers={"Location": f"/v1/schedules/{schedule.id}"},
    )


@router.get("", summary="List schedules")
def list_schedules(request: Request) -> dict[str, Any]:
    tenant = tenant_of(request)
    return {
        "object": "list",
        "data": [_view(request, s) for s in _store(request).for_tenant(tenant)],
    }


@router.get("/{schedule_id}", summary="A schedule: its template, next run and last run")
def get_schedule(request: Request, schedule_id: str) -> dict[str, Any]:
    return _view(request, own_schedule(request, schedule_id))


@router.patch(
    "/{schedule_id}", openapi_extra=BODY_DOC, summary="Change a schedule (pause: enabled=false)"
)
async def patch_schedule(request: Request, schedule_id: str) -> dict[str, Any]:
    current = own_schedule(request, schedule_id)
    doc = define.parse_body(await read_body(request))
    schedule = define.patch(ctx_of(request), current, doc)
    _store(request).save(schedule)
    return _view(request, schedule)


@router.delete("/{schedule_id}", status_code=204, summary="Delete a schedule (its jobs stay)")
def delete_schedule(request: Request, schedule_id: str) -> Response:
    _store(request).delete(own_schedule(request, schedule_id))
    return Response(status_code=204)


@router.post("/{schedule_id}/run", status_code=202, summary="Run a schedule now")
def run_schedule(
    request: Request, schedule_id: str, idempotency_key: Annotated[str | None, Header()] = None
) -> JSONResponse:
    schedule = own_schedule(request, schedule_id)
    ctx = ctx_of(request)
    done = runner.run_now(ctx, schedule, idempotency_key)
    view = views.job_view(ctx, done.job)
    view["warnings"] = list(done.warnings)
    headers = {"Location": f"/v1/jobs/{done.job.id}"}
    if not done.created:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(view, status_code=202, headers=headers)
