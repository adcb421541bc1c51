"""The job list, a job's page with its live progress, cancel, and the manifest download."""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from service.console import web
from service.jobs import listing, views
from service.jobs.model import JOB_CANCELLING, JOB_FINAL, JOB_LIVE
from service.queues import CANCEL

router = APIRouter()

PAGE = 25
STATUSES = ("queued", "running", "cancelling", *JOB_FINAL)
_LABEL = re.compile(r"^([A-Za-z0-9._-]{1,64})=(.{0,200})$")


def _filters(status: str, label: str, schedule: str) -> tuple[str | None, dict[str, str], str]:
    """The list's filters, and a message when one of them cannot be read."""
    labels: dict[str, str] = {}
    problem = ""
    for part in (p.strip() for p in label.split(",") if p.strip()):
        m = _LABEL.match(part)
        if m:
            labels[m.group(1)] = m.group(2)
        else:
            problem = f"A label filter is key=value, like campaign=spring; not {part[:60]!r}."
    if schedule.strip():
        labels["schedule"] = schedule.strip()[:128]
    return (status if status in STATUSES else None), labels, problem


@router.get("/")
def jobs_page(
    request: Request,
    status: str = "",
    label: str = "",
    schedule: str = "",
    before: str = "",
) -> Response:
    session = web.viewer(request)
    ctx = web.ctx_of(request)
    wanted_status, labels, problem = _filters(status, label, schedule)
    try:
        cursor = float(before) if before else None
    except ValueError:
        cursor, problem = None, "That page link is broken; here are the newest jobs."
    assert session.tenant is not None
    rows, nxt = listing.list_jobs(
        ctx, session.tenant, status=wanted_status, labels=labels, before=cursor, limit=PAGE
    )
    return web.page(
        request,
        "jobs.html",
        nav="jobs",
        rows=rows,
        next_cursor=None if nxt is None else repr(nxt),
        filters={"status": wanted_status or "", "label": label, "schedule": schedule},
        statuses=STATUSES,
        paged=cursor is not None,
        problem=problem,
    )


def _job_values(request: Request, job_id: str) -> dict[str, Any]:
    session = web.viewer(request)
    job = web.own_job(request, session, job_id)
    view = views.job_view(web.ctx_of(request), job)
    counts = view["counts"]
    ended = counts["succeeded"] + counts["failed"] + counts["cancelled"]
    return {"job": view, "ended": ended, "final": job.is_final, "live": job.is_live}


@router.get("/jobs/{job_id}")
def job_page(request: Request, job_id: str) -> Response:
    values = _job_values(request, job_id)
    return web.page(request, "job.html", nav="jobs", **values)


@router.get("/jobs/{job_id}/live")
def job_live(request: Request, job_id: str) -> Response:
    """The live part of a job's page, fetched again by the page's script while the job runs."""
    values = _job_values(request, job_id)
    return web.page(request, "_job_live.html", **values)


@router.post("/jobs/{job_id}/cancel")
async def cancel(request: Request, job_id: str) -> Response:
    session = web.viewer(request)
    web.check_csrf(request, session, await request.form())
    job = web.own_job(request, session, job_id)
    ctx = web.ctx_of(request)
    if job.is_live:
        ctx.store.set_job_status_if(
            job_id, JOB_LIVE, JOB_CANCELLING, reason="cancelled from the console"
        )
        ctx.enqueue_once(CANCEL, job_id, job_id, ttl=5)
    return web.redirect(request, f"/ui/jobs/{job_id}")


@router.get("/jobs/{job_id}/manifest.jsonl")
def manifest(request: Request, job_id: str) -> Response:
    session = web.viewer(request)
    job = web.own_job(request, session, job_id)
    if not job.is_final:
        raise web.ConsoleError(
            409, "Not finished yet", "The manifest is written when the job finishes."
        )
    stream = views.stream_manifest(web.ctx_of(request), job_id)
    headers = {"Content-Disposition": f'attachment; filename="{job_id}-manifest.jsonl"'}
    return web.finish(
        request, StreamingResponse(stream, media_type="application/jsonl", headers=headers)
    )
