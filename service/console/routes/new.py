"""A new job: a CSV catalog with a prompt template (or a pasted JSON job), its estimate, submit."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.datastructures import UploadFile

from service.console import web
from service.errors import Problem
from service.jobs import intake

router = APIRouter()

# A CSV this large is not echoed back into the page after an estimate (choose the file again).
ECHO_CSV_BYTES = 2 * 1024 * 1024
QUALITIES = ("low", "medium", "high", "auto")
SIZES = ("1024x1024", "1536x1024", "1024x1536", "auto")
FORMATS = ("png", "jpeg", "webp")


def _defaults(request: Request) -> dict[str, Any]:
    ctx = web.ctx_of(request)
    models = sorted(m.id for m in ctx.catalog.models.values() if not m.is_shut_down())
    return {
        "kind": "csv",
        "model": ctx.catalog.default_model,
        "models": models,
        "template": "",
        "csv_text": "",
        "json_text": "",
        "size": "1024x1024",
        "quality": "low",
        "output_format": "png",
        "mode": "auto",
        "campaign": "",
        "max_cost_usd": "",
        "sizes": SIZES,
        "qualities": QUALITIES,
        "formats": FORMATS,
    }


@router.get("/new")
def new_job_form(request: Request) -> Response:
    web.viewer(request)
    return web.page(request, "new.html", nav="new", form=_defaults(request))


def _read_form(form: Any, values: dict[str, Any]) -> tuple[bytes, str, dict[str, str]]:
    """(body, content type, query) of the job the form describes; fills ``values`` back."""
    for name in ("kind", "model", "template", "size", "quality", "output_format", "mode"):
        values[name] = str(form.get(name) or values.get(name) or "")[:20_000]
    values["campaign"] = str(form.get("campaign") or "").strip()[:128]
    values["max_cost_usd"] = str(form.get("max_cost_usd") or "").strip()[:32]
    if values["kind"] == "json":
        values["json_text"] = str(form.get("json_text") or "")
        return values["json_text"].encode(), "application/json", {}
    upload = form.get("csv_file")
    text = str(form.get("csv_text") or "")
    if isinstance(upload, UploadFile) and upload.filename:
        raw = upload.file.read()
        text = raw.decode("utf-8", errors="replace")
    values["csv_text"] = text if len(text) <= ECHO_CSV_BYTES else ""
    query = {
        name: values[name]
        for name in ("model", "template", "size", "quality", "output_format", "mode")
        if values[name]
    }
    if values["campaign"]:
        query["label.campaign"] = values["campaign"]
    if values["max_cost_usd"]:
        query["max_cost_usd"] = values["max_cost_usd"]
    return text.encode(), "text/csv", query


@router.post("/new")
async def new_job(request: Request) -> Response:
    session = web.viewer(request)
    ctx = web.ctx_of(request)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > ctx.settings.max_body_bytes:
        raise web.ConsoleError(413, "Too large", "That catalog is over the size limit.")
    form = await request.form()
    web.check_csrf(request, session, form)
    values = _defaults(request)
    body, ctype, query = _read_form(form, values)
    action = str(form.get("action") or "estimate")
    assert session.tenant is not None
    try:
        if action == "submit":
            # The one way in, as POST /v1/jobs: validated for this tenant, budget-checked.
            done = intake.submit_body(ctx, session.tenant, body, ctype, query)
            return web.redirect(request, f"/ui/jobs/{done.job.id}")
        spec = intake.parse_body(ctx, body, ctype, query)
        estimate = intake.estimate(ctx, spec, session.tenant)
    except Problem as exc:
        return web.page(request, "new.html", 422, nav="new", form=values, problem=exc)
    lane = spec.lane(ctx.catalog, ctx.settings.sync_max_items)
    return web.page(
        request,
        "new.html",
        nav="new",
        form=values,
        estimate=estimate.to_dict(),
        total_items=len(spec.items),
        lane=lane,
        warnings=list(spec.warnings),
    )
