"""Schedules: the tenant's cron schedules with their next run and last result; create, pause,
resume, run now and delete (the domain is :mod:`service.schedules`, as for the API)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.console import web
from service.errors import Problem
from service.schedules import define, runner
from service.schedules.model import Schedule, schedule_view
from service.schedules.store import ScheduleStore

router = APIRouter()


def _store(request: Request) -> ScheduleStore:
    return ScheduleStore(web.ctx_of(request).redis)


def _own(request: Request, tenant: str, schedule_id: str) -> Schedule:
    schedule = _store(request).get(schedule_id) if len(schedule_id) <= 64 else None
    if schedule is None or schedule.tenant != tenant:
        raise web.ConsoleError(
            404, "Schedule not found", f"There is no schedule {schedule_id[:64]!r} here."
        )
    return schedule


def _views(request: Request, tenant: str) -> list[dict[str, Any]]:
    store = web.ctx_of(request).store
    out = []
    for schedule in _store(request).for_tenant(tenant):
        last = store.job(schedule.last_job_id) if schedule.last_job_id else None
        out.append(schedule_view(schedule, last.status if last else None))
    return out


def _document(form: Any) -> dict[str, Any]:
    """A schedule body from the form's fields (empty fields left out)."""
    text = {
        k: str(form.get(k) or "").strip()
        for k in (
            "name",
            "cron",
            "timezone",
            "catalog_url",
            "template",
            "campaign",
            "max_cost_usd",
            "catch_up",
            "quality",
            "size",
        )
    }
    doc: dict[str, Any] = {
        k: text[k]
        for k in ("name", "cron", "timezone", "catalog_url", "template", "catch_up")
        if text[k]
    }
    params = {k: text[k] for k in ("quality", "size") if text[k]}
    if params:
        doc["params"] = params
    if text["campaign"]:
        doc["labels"] = {"campaign": text["campaign"]}
    if text["max_cost_usd"]:
        try:
            doc["max_cost_usd"] = float(text["max_cost_usd"])
        except ValueError:
            doc["max_cost_usd"] = text["max_cost_usd"]  # refused by define, naming the field
    return doc


@router.get("/schedules")
def schedules_page(request: Request) -> Response:
    session = web.viewer(request)
    assert session.tenant is not None
    return web.page(
        request,
        "schedules.html",
        nav="schedules",
        schedules=_views(request, session.tenant),
        form={},
    )


@router.post("/schedules")
async def create(request: Request) -> Response:
    session = web.viewer(request)
    form = await request.form()
    web.check_csrf(request, session, form)
    assert session.tenant is not None
    doc = _document(form)
    try:
        schedule = define.create(web.ctx_of(request), session.tenant, doc)
    except Problem as exc:
        return web.page(
            request,
            "schedules.html",
            422,
            nav="schedules",
            schedules=_views(request, session.tenant),
            form=dict(form),
            problem=exc,
        )
    _store(request).save(schedule)
    return web.redirect(request, "/ui/schedules")


@router.post("/schedules/{schedule_id}/{action}")
async def act(request: Request, schedule_id: str, action: str) -> Response:
    session = web.viewer(request)
    web.check_csrf(request, session, await request.form())
    assert session.tenant is not None
    schedule = _own(request, session.tenant, schedule_id)
    ctx = web.ctx_of(request)
    try:
        if action in ("pause", "resume"):
            _store(request).save(define.patch(ctx, schedule, {"enabled": action == "resume"}))
        elif action == "delete":
            _store(request).delete(schedule)
        elif action == "run":
            done = runner.run_now(ctx, schedule)
            return web.redirect(request, f"/ui/jobs/{done.job.id}")
        else:
            raise web.ConsoleError(404, "Not found", "No such action.")
    except Problem as exc:
        raise web.ConsoleError(exc.status, "Not done", exc.detail) from None
    return web.redirect(request, "/ui/schedules")
