"""The gallery: a job's images as thumbnails a page at a time, one item in detail (the lightbox),
thumbnails and images served with the viewer's session, and review decisions."""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse

from service.console import web
from service.errors import Problem
from service.jobs import pages, review, thumbs, views
from service.jobs.model import Job
from service.storage import ObjectNotFound
from service.storage.layout import job_prefix

router = APIRouter()

PAGE = 48
FILTERS = {
    "all": (None, None),
    "unreviewed": (None, "unreviewed"),
    "rejected": (None, "rejected"),
    "approved": (None, "approved"),
    "failed": ("failed", None),
}
_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,140}$")
_ITEM_REF = re.compile(r"^(\d{1,9}):([A-Za-z0-9._-]{1,128})$")


def cards_of(job: Job, items: list[dict[str, Any]], lines: list[Any]) -> list[dict[str, Any]]:
    cards = []
    for item, line in zip(items, lines, strict=True):
        names = [key.rsplit("/", 1)[-1] for key in item.get("keys") or []]
        cards.append(
            {
                "item": item,
                "prompt": line.body.get("prompt", ""),
                "params": {k: v for k, v in line.body.items() if k not in ("prompt", "model")},
                "images": names,
                "thumbs": [f"/ui/jobs/{job.id}/thumbs/{n}" for n in names],
                "full": [f"/ui/jobs/{job.id}/images/{n}" for n in names],
                "ref": f"{item['index']}:{item['id']}",
            }
        )
    return cards


def _cursor(value: str) -> int:
    return int(value) if value.isdigit() and len(value) < 10 else 0


@router.get("/jobs/{job_id}/gallery")
def gallery(request: Request, job_id: str, show: str = "all", at: str = "0") -> Response:
    session = web.viewer(request)
    job = web.own_job(request, session, job_id)
    ctx = web.ctx_of(request)
    show = show if show in FILTERS else "all"
    status, decision = FILTERS[show]
    start = _cursor(at)
    found, lines = pages.page(ctx, job, start, PAGE, status=status, review=decision)
    view = views.job_view(ctx, job)
    return web.page(
        request,
        "gallery.html",
        nav="jobs",
        job=view,
        cards=cards_of(job, found.items, lines),
        show=show,
        filters=list(FILTERS),
        start=start,
        next_cursor=found.next_cursor,
        final=job.is_final,
    )


@router.get("/jobs/{job_id}/items/{index}")
def item_page(request: Request, job_id: str, index: int, partial: int = 0) -> Response:
    session = web.viewer(request)
    job = web.own_job(request, session, job_id)
    if not 0 <= index < job.items:
        raise web.ConsoleError(404, "No such item", f"Job {job_id} has no item {index}.")
    found, lines = pages.page(web.ctx_of(request), job, index, 1)
    if not found.items:
        raise web.ConsoleError(404, "No such item", f"Job {job_id} has no item {index}.")
    (card,) = cards_of(job, found.items[:1], lines[:1])
    values: dict[str, Any] = {
        "job": {"id": job.id, "items": job.items},
        "card": card,
        "final": job.is_final,
    }
    if partial:
        return web.page(request, "_item.html", **values)
    return web.page(request, "item.html", nav="jobs", **values)


def _image_key(job: Job, name: str) -> str:
    if not _NAME.fullmatch(name):
        raise web.ConsoleError(404, "No such image", "There is no such image.")
    return f"{job_prefix(job.id)}images/{name}"


def _not_modified(request: Request, etag: str) -> Response | None:
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag})
    return None


@router.get("/jobs/{job_id}/thumbs/{name}")
def thumbnail(request: Request, job_id: str, name: str) -> Response:
    session = web.viewer(request)
    job = web.own_job(request, session, job_id)
    key = _image_key(job, name)
    storage = web.ctx_of(request).storage
    try:
        sha = thumbs.source_hash(storage, key)
        etag = f'"{sha[:16]}"'
        if (unchanged := _not_modified(request, etag)) is not None:
            return unchanged
        data = thumbs.thumbnail(storage, key, sha)
    except (ObjectNotFound, ValueError):
        raise web.ConsoleError(404, "No such image", "There is no such image.") from None
    except thumbs.ThumbnailError as exc:
        raise web.ConsoleError(422, "Not an image", str(exc)) from None
    # no-cache: the browser keeps it but asks again (a 304), so an image redone in place shows.
    headers = {"ETag": etag, "Cache-Control": "private, no-cache"}
    return Response(data, media_type=thumbs.CONTENT_TYPE, headers=headers)


@router.get("/jobs/{job_id}/images/{name}")
def image(request: Request, job_id: str, name: str) -> Response:
    session = web.viewer(request)
    job = web.own_job(request, session, job_id)
    key = _image_key(job, name)
    storage = web.ctx_of(request).storage
    try:
        info = storage.head(key)
    except (ObjectNotFound, ValueError):
        raise web.ConsoleError(404, "No such image", "There is no such image.") from None
    etag = f'"{(info.metadata.get("sha256") or str(info.size))[:16]}"'
    if (unchanged := _not_modified(request, etag)) is not None:
        return unchanged

    def body() -> Any:
        with storage.open(key) as fh:
            while chunk := fh.read(256 * 1024):
                yield chunk

    headers = {
        "ETag": etag,
        "Cache-Control": "private, no-cache",
        "Content-Length": str(info.size),
        "X-Content-Type-Options": "nosniff",
    }
    ctype = info.content_type or "application/octet-stream"
    return StreamingResponse(body(), media_type=ctype, headers=headers)


def item_refs(values: list[Any]) -> list[tuple[int, str]]:
    """The ``index:id`` references a form names its items by."""
    refs = []
    for value in values[: review.MAX_ITEMS]:
        m = _ITEM_REF.match(str(value))
        if m:
            refs.append((int(m.group(1)), m.group(2)))
    return refs


@router.post("/jobs/{job_id}/review")
async def review_items(request: Request, job_id: str) -> Response:
    session = web.viewer(request)
    form = await request.form()
    web.check_csrf(request, session, form)
    job = web.own_job(request, session, job_id)
    refs = item_refs(form.getlist("item"))
    decision = str(form.get("decision") or "")
    if not refs or decision not in (*review.DECISIONS, "clear"):
        raise web.ConsoleError(422, "Nothing to review", "Choose one or more images first.")
    note = str(form.get("note") or "").strip()[: review.MAX_NOTE_CHARS] or None
    chosen = None if decision == "clear" else decision
    try:
        done = review.review(
            web.ctx_of(request),
            job,
            [review.Decision(item_id, chosen, note, index) for index, item_id in refs],
        )
    except Problem as exc:
        raise web.ConsoleError(exc.status, "Review not saved", exc.detail) from None
    if web.is_script(request):
        return web.finish(request, HTMLResponse(f"{done['reviewed']} reviewed"))
    return web.redirect(request, web.local_path(str(form.get("back") or "")) or "/ui/")
