"""Redo: rejected (or failed) images made again with edited prompts; a job's failed items
retried."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.console import web
from service.console.routes.gallery import cards_of, item_refs
from service.errors import Problem
from service.jobs import pages, redo, review

router = APIRouter()


@router.get("/jobs/{job_id}/redo")
def redo_form(request: Request, job_id: str) -> Response:
    session = web.viewer(request)
    job = web.own_job(request, session, job_id)
    refs = item_refs(request.query_params.getlist("item"))
    if not refs:
        raise web.ConsoleError(422, "Nothing to redo", "Select one or more images first.")
    ctx = web.ctx_of(request)
    cards = []
    for index, item_id in refs[:200]:
        found, lines = pages.page(ctx, job, index, 1)
        if found.items and found.items[0]["id"] == item_id:
            cards += cards_of(job, found.items, lines)
    return web.page(request, "redo.html", nav="jobs", job=job, cards=cards)


@router.post("/jobs/{job_id}/redo")
async def redo_items(request: Request, job_id: str) -> Response:
    session = web.viewer(request)
    form = await request.form()
    web.check_csrf(request, session, form)
    job = web.own_job(request, session, job_id)
    edits = {
        index: (item_id, str(form.get(f"prompt:{index}") or ""))
        for index, item_id in item_refs(form.getlist("item"))
    }
    assert session.tenant is not None
    ctx = web.ctx_of(request)
    try:
        done = redo.redo(ctx, job, edits, session.tenant)
    except Problem as exc:
        raise web.ConsoleError(exc.status, "Redo not started", exc.detail) from None
    if done.in_place:
        return web.redirect(request, f"/ui/jobs/{job_id}")
    review.note_redo(ctx, job, edits, done.job_id)
    return web.redirect(request, f"/ui/jobs/{done.job_id}")


@router.post("/jobs/{job_id}/retry")
async def retry_failed(request: Request, job_id: str) -> Response:
    session = web.viewer(request)
    web.check_csrf(request, session, await request.form())
    job = web.own_job(request, session, job_id)
    assert session.tenant is not None
    try:
        done = redo.retry_failed(web.ctx_of(request), job, session.tenant)
    except Problem as exc:
        raise web.ConsoleError(exc.status, "Retry not started", exc.detail) from None
    return web.redirect(request, f"/ui/jobs/{done.job_id}")
