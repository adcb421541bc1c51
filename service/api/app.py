"""The HTTP API (v1), assembled: settings, lifespan, exception handlers and the routers.

Every error is ``application/problem+json`` (RFC 9457, :mod:`service.api.problems`). The API
validates and stores requests and enqueues work by task name (:mod:`service.jobs.intake`); it
never runs the lanes itself. Routes live in :mod:`service.api.routes`, one module per resource.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis
from fastapi import FastAPI

from service import metrics, tokens
from service.api import malloc, problems
from service.api.guard import RequestGuard, allowed_hosts
from service.api.routes import jobs, models, objects, schedules, webhooks
from service.api.routes import service as service_routes
from service.console import install as install_console
from service.context import Context, build_context
from service.models import lifecycle
from service.settings import Settings, get_settings

log = logging.getLogger("imagebatch.api")

# How long the API waits for upstream's model list at start before serving on what it has.
STARTUP_REFRESH_SECONDS = 5.0


async def _read_upstream_models(ctx: Context) -> None:
    """Upstream's model list before the first job: briefly, once (beat refreshes it later).
    Never stops the API from starting: it serves on the last list, or the catalog alone."""
    try:
        await asyncio.to_thread(
            lifecycle.refresh,
            ctx.redis,
            ctx.upstream,
            timeout=STARTUP_REFRESH_SECONDS,
            max_retries=0,
        )
    except redis.RedisError as exc:
        log.warning("could not keep upstream's model list in Redis at start: %s", exc)


def create_app(settings: Settings | None = None, *, context: Context | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ctx = context or build_context(settings)
        app.state.ctx = ctx
        app.state.tenants = ctx.budgets.tenants
        if app.state.tenants.open:
            log.warning(
                "no tenants configured (IMAGEBATCH_TENANTS_FILE unset): the API is open, "
                "every job belongs to tenant 'default'"
            )
        app.state.metrics = metrics.registry(
            ctx.redis, ctx.settings, ctx.budgets.gauges, models=ctx.models
        )
        tokens.encoding()  # load the tokenizer now, not on the first request
        await _read_upstream_models(ctx)
        # What startup built lives as long as the process: keep the collector's full passes
        # (which hold the GIL, and so the event loop) from walking it again and again.
        gc.collect()
        gc.freeze()
        # A request parsed in a worker thread hands the GIL back to the event loop every 1 ms
        # (not 5): /healthz and small requests stay quick while a large job is validated.
        sys.setswitchinterval(0.001)
        # A large body's buffers go back to the system once it is taken, not kept for the next.
        malloc.unmap_large_blocks()
        yield
        ctx.redis.close()

    app = FastAPI(
        title="imagebatch",
        version="1",
        summary="Large batches of image prompts to images in storage through OpenAI's Batch API.",
        lifespan=lifespan,
        # The problem answers any route may give, documented on every route of every router.
        responses=problems.ANY_ROUTE,
    )
    problems.install(app)
    app.add_middleware(RequestGuard, hosts=allowed_hosts(settings))
    for router in (
        jobs.router,
        objects.router,
        schedules.router,
        service_routes.router,
        models.router,
        webhooks.router,
    ):
        app.include_router(router)
    install_console(app)
    return app
