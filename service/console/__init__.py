"""The web console at ``/ui/``: jobs, live progress, the gallery with review, a new job with its
estimate, spend, schedules. Served by the API process itself: server-rendered templates, a little script,
every asset from ``static/`` (nothing from a CDN, no build step).

It calls the same domain functions as the API (``service.jobs``, ``service.budgets``) and never
the API's routes; who may see what follows the same rule (a tenant sees only its own jobs), with a
session cookie in place of the bearer key (:mod:`service.console.sessions`).
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from fastapi.staticfiles import StaticFiles

from service.console import web
from service.console.routes import auth, gallery, jobs, new, redo, schedules, spend

STATIC = web.HERE / "static"


def router() -> APIRouter:
    console = APIRouter(prefix="/ui", include_in_schema=False)
    for part in (
        auth.router,
        jobs.router,
        gallery.router,
        redo.router,
        new.router,
        spend.router,
        schedules.router,
    ):
        console.include_router(part)
    return console


def install(app: FastAPI) -> None:
    """Mount the console on ``app``: its pages, its static files and its error pages."""
    app.include_router(router())
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="console-static")
    web.install_handlers(app)
