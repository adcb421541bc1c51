"""The simulator's HTTP surface: OpenAI's Files, Batches, Images and Models endpoints, plus stats.

``create_app(config)`` returns a FastAPI app. Under uvicorn its lifespan starts the batch engine
and the housekeeping task; mounted directly as an ASGI app (``httpx2.ASGITransport``, which runs no
lifespan) they start on the first request instead.

Every response carries ``x-request-id``; the sync image endpoints also carry the
``x-ratelimit-*`` headers (:mod:`simulator.limits`). Every error is OpenAI's envelope
(:mod:`simulator.errors`): unknown routes answer 404 ``Invalid URL (METHOD /path)``, a wrong or
missing key (when ``--api-key`` is set) 401, and an unexpected bug 500 ``server_error``.
``/_simulator/stats`` and ``/_simulator/reset`` are the admin view (no key needed); a reset also
fills the sync rate-limit buckets again.

The models it serves are the catalog's, with ``--shutdown`` dates in place of the catalog's own
(announced by ``GET /v1/models`` and enforced on every request); ``--batch-unsupported`` models
fail batch validation (:mod:`simulator.batches`); with ``--webhook-url`` every finished batch sends
OpenAI's signed ``batch.*`` event (:mod:`simulator.webhooks`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from service.catalog import EDITS, GENERATIONS, Catalog, Model, cached_catalog
from service.tokens import encoding
from simulator.batches import BatchEngine, BatchRecord
from simulator.config import ConfigError, SimulatorConfig
from simulator.errors import APIError, invalid, request_id, server_error
from simulator.files import FileStore, Form, receive_multipart
from simulator.generation import ImageMaker, InputImage, probe_image, resolve_edit_refs
from simulator.images import Renderer
from simulator.limits import RateLimiter, injected_failure
from simulator.stats import Stats
from simulator.webhooks import WebhookSender, disabled_snapshot

log = logging.getLogger("simulator")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Each reference image of a multipart edit may be up to 50 MB (facts §3.2).
MAX_EDIT_IMAGE_BYTES = 50 * 1024 * 1024
CONTENT_CHUNK = 1 << 20
HOUSEKEEPING_SECONDS = 5.0


class JSONBytes(Response):
    media_type = "application/json"


def _list_page(recs: Sequence[Any], more: bool) -> Response:
    """OpenAI's cursor page: ``{object: list, data, first_id, last_id, has_more}``."""
    return _json(
        {
            "object": "list",
            "data": [r.to_api() for r in recs],
            "first_id": recs[0].id if recs else None,
            "last_id": recs[-1].id if recs else None,
            "has_more": more,
        }
    )


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return JSONBytes(orjson.dumps(data), status_code=status, headers=headers)


def _error_response(exc: APIError) -> Response:
    return _json(exc.body(), exc.status, exc.headers)


def model_object(model: Model) -> dict[str, Any]:
    return {
        "id": model.id,
        "object": "model",
        "created": model.created,
        "owned_by": model.owned_by,
        "shutdown_date": model.shutdown_date.isoformat() if model.shutdown_date else None,
    }


def _parse_json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise invalid(
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
            "using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was "
            "sent was not valid JSON.)"
        ) from exc


def _query_int(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise invalid(
            f"Invalid '{name}': expected an integer.", param=name, code="invalid_type"
        ) from exc
    if not lo <= value <= hi:
        raise invalid(
            f"Invalid '{name}': must be between {lo} and {hi}.", param=name, code="invalid_value"
        )
    return value


def with_upstream_news(catalog: Catalog, config: SimulatorConfig) -> Catalog:
    """The catalog with ``--shutdown`` dates in place of its own; a copy, the cached one untouched.

    Raises :class:`ConfigError` when ``--shutdown`` or ``--batch-unsupported`` names a model the
    catalog does not have: a typo would otherwise silently test nothing.
    """
    for flag, named in (
        ("--shutdown", config.shutdown),
        ("--batch-unsupported", config.batch_unsupported),
    ):
        unknown = sorted(set(named) - catalog.models.keys())
        if unknown:
            raise ConfigError(
                f"{flag} names {', '.join(repr(m) for m in unknown)}, not in the catalog "
                f"{catalog.source}"
            )
    if not config.shutdown:
        return catalog
    models = {
        mid: dataclasses.replace(m, shutdown_date=config.shutdown[mid])
        if mid in config.shutdown
        else m
        for mid, m in catalog.models.items()
    }
    return dataclasses.replace(catalog, models=models)


class Simulator:
    """Everything one simulator process holds, made once and shared by the routes."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        root = config.data_dir
        root.mkdir(parents=True, exist_ok=True)
        self.catalog: Catalog = with_upstream_news(
            cached_catalog(str(config.catalog_file) if config.catalog_file else None), config
        )
        self.renderer = Renderer(draw_prompt=not config.plain_images, pad_to=config.image_bytes)
        self.maker = ImageMaker(self.catalog, self.renderer, config.moderation_rules())
        self.files = FileStore(root / "files")
        self.stats = Stats(root / "stats.json")
        self.webhooks: WebhookSender | None = None
        if config.webhook_url and config.webhook_secret:
            self.webhooks = WebhookSender(
                config.webhook_url, config.webhook_secret.get_secret_value()
            )
        self.engine = BatchEngine(
            config,
            self.files,
            self.maker,
            self.stats,
            root / "batches",
            on_finished=self._batch_finished,
        )
        self.limiter = self.fresh_limiter()
        self._sync_index = 0
        self._started = False
        self._start_lock = asyncio.Lock()
        self._housekeeping: asyncio.Task[None] | None = None
        self.files.load()
        self.engine.load()
        self.stats.load()

    async def ensure_started(self) -> None:
        if self._started:
            return
        async with self._start_lock:
            if self._started:
                return
            # Load the o200k_base ranks now (~0.5 s), not inside the first request.
            await asyncio.to_thread(encoding)
            if self.webhooks:
                self.webhooks.start()
            self.engine.start()
            self._housekeeping = asyncio.get_running_loop().create_task(self._housekeep())
            self._started = True

    async def stop(self) -> None:
        if self._housekeeping:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
        await self.engine.stop()
        if self.webhooks:
            await self.webhooks.stop()
        self.stats.save(force=True)
        self._started = False

    async def _housekeep(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_SECONDS)
            try:
                self.files.sweep()
                self.stats.save()
            except Exception:  # housekeeping must outlive a full disk or a torn file
                log.exception("simulator housekeeping failed")

    def fresh_limiter(self) -> RateLimiter:
        """The sync limits with every bucket full, as at start."""
        c = self.config
        return RateLimiter(c.rpm, c.ipm, c.tpm, window=c.limit_window)

    def file_path(self, file_id: str) -> Path:
        self.files.get(file_id)
        return self.files.data_path(file_id)

    def _batch_finished(self, rec: BatchRecord) -> None:
        if self.webhooks is None:
            return
        ended = {
            "completed": rec.completed_at,
            "failed": rec.failed_at,
            "expired": rec.expired_at,
            "cancelled": rec.cancelled_at,
        }[rec.status]
        self.webhooks.send(f"batch.{rec.status}", rec.id, int(ended or time.time()))

    def stats_snapshot(self) -> dict[str, Any]:
        snap = self.stats.snapshot(self.engine.records.values(), self.engine.enqueued())
        snap["webhooks"] = self.webhooks.snapshot() if self.webhooks else disabled_snapshot()
        return snap

    # --- sync images --------------------------------------------------------------------------

    def _edit_form(
        self, form: Form
    ) -> tuple[dict[str, Any], tuple[InputImage, ...], InputImage | None]:
        body: dict[str, Any] = dict(form.fields)
        for name in ("image", "image[]", "mask"):
            if name in body:
                raise invalid(f"'{name}' must be sent as a file part.", param=name.rstrip("[]"))
        inputs = []
        for i, part in enumerate(form.files_named("image", "image[]")):
            if part.size > MAX_EDIT_IMAGE_BYTES:
                raise invalid(
                    f"Image {i + 1} is larger than 50 MB.", param="image", code="file_too_large"
                )
            with part.path.open("rb") as f:
                inputs.append(probe_image(f, "image"))
        masks = form.files_named("mask")
        mask = None
        if masks:
            with masks[0].path.open("rb") as f:
                mask = probe_image(f, "mask")
        unknown = [p.name for p in form.files if p.name not in ("image", "image[]", "mask")]
        if unknown:
            raise invalid(
                f"Unknown parameter: '{unknown[0]}'.", param=unknown[0], code="unknown_parameter"
            )
        return body, tuple(inputs), mask

    async def images(self, request: Request, endpoint: str) -> Response:
        rid: str = request.state.request_id
        headers: dict[str, str] = {}
        try:
            form_body = request.headers.get("content-type", "").startswith("multipart/form-data")
            inputs: tuple[InputImage, ...] = ()
            mask: InputImage | None = None
            if form_body:
                if endpoint != EDITS:
                    raise invalid("This endpoint takes a JSON body.", code="invalid_content_type")
                form = await receive_multipart(request, self.files.spool, MAX_EDIT_IMAGE_BYTES)
                try:
                    body, inputs, mask = await run_in_threadpool(self._edit_form, form)
                finally:
                    form.discard()
            else:
                body = _parse_json(await request.body())
                if not isinstance(body, dict):
                    raise invalid("The request body must be a JSON object.")
                if endpoint == EDITS:
                    inputs, mask = await run_in_threadpool(resolve_edit_refs, body, self.file_path)
            req = self.maker.parse(endpoint, body, inputs=inputs, mask=mask, form=form_body)
            tally = self.stats.sync_tally(req.model.id)
            tally.requests += 1
            try:
                headers = self.limiter.admit(
                    req.model.id, req.n, req.input_tokens + req.output_tokens
                )
            except APIError:
                tally.rate_limited += 1
                raise
            index, self._sync_index = self._sync_index, self._sync_index + 1
            if self.config.latency_ms:
                await asyncio.sleep(self.config.latency_ms / 1000)
            if injected_failure(index, self.config.fail_rate):
                tally.server_errors_injected += 1
                raise server_error(rid)
            self.maker.moderate(req.prompt, rid)
            payload = await run_in_threadpool(self.maker.response_json, req)
            tally.completed += 1
            tally.bill(req.text_tokens, req.image_tokens, req.output_tokens, req.n)
            return JSONBytes(payload, headers=headers)
        except APIError as exc:
            if not exc.headers:
                exc.headers = headers or self.limiter.headers()
            raise


class _Envelope:
    """Pure ASGI middleware: request ids, API-key check, lazy start."""

    def __init__(
        self, app: Callable[[Scope, Receive, Send], Awaitable[None]], sim: Simulator
    ) -> None:
        self.app = app
        self.sim = sim
        key = sim.config.api_key
        self.key = key.get_secret_value() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.sim.ensure_started()
        rid = request_id()
        scope.setdefault("state", {})["request_id"] = rid

        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        if self.key and scope["path"].startswith("/v1"):
            problem = self._auth_problem(scope)
            if problem:
                await _error_response(problem)(scope, receive, send_with_id)
                return
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # A bug answers OpenAI's 500 (with its request id), not a bare text page.
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            await _error_response(server_error(rid))(scope, receive, send_with_id)

    def _auth_problem(self, scope: Scope) -> APIError | None:
        auth = ""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                auth = value.decode("latin-1")
                break
        if not auth:
            return APIError(
                401,
                "You didn't provide an API key. You need to provide your API key in an Authorization "
                "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            )
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or token.strip() != self.key:
            shown = token.strip()
            masked = (shown[:3] + "*" * 4 + shown[-4:]) if len(shown) > 8 else "****"
            return APIError(
                401,
                f"Incorrect API key provided: {masked}. You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
                code="invalid_api_key",
            )
        return None


def create_app(config: SimulatorConfig | None = None) -> FastAPI:
    """The simulator as an ASGI app (state under ``config.data_dir``)."""
    config = config or SimulatorConfig()
    sim = Simulator(config)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await sim.ensure_started()
        yield
        await sim.stop()

    app = FastAPI(
        title="imagebatch OpenAI simulator",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    app.state.sim = sim

    async def on_api_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return _error_response(exc)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        message = f"Invalid URL ({request.method} {request.url.path})"
        if exc.status_code != 404:
            message = f"{exc.detail}: {request.method} {request.url.path}"
        return _error_response(APIError(exc.status_code, message))

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)

    # --- files ----------------------------------------------------------------------------------

    @app.post("/v1/files")
    async def create_file(request: Request) -> Response:
        form = await receive_multipart(request, sim.files.spool)
        try:
            rec = await run_in_threadpool(sim.files.upload, form)
        finally:
            form.discard()
        return _json(rec.to_api())

    @app.get("/v1/files")
    async def list_files(request: Request) -> Response:
        limit = _query_int(request, "limit", 10_000, 1, 10_000)
        order = request.query_params.get("order", "desc")
        if order not in ("asc", "desc"):
            raise invalid(
                "Invalid 'order': expected 'asc' or 'desc'.", param="order", code="invalid_value"
            )
        recs, more = sim.files.page(
            request.query_params.get("purpose"), limit, order, request.query_params.get("after")
        )
        return _list_page(recs, more)

    @app.get("/v1/files/{file_id}")
    async def get_file(file_id: str) -> Response:
        return _json(sim.files.get(file_id).to_api())

    @app.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str) -> Response:
        rec = sim.files.get(file_id)
        fd = os.open(sim.files.data_path(file_id), os.O_RDONLY)
        size = os.fstat(fd).st_size

        pace = sim.config.download_bytes_per_second
        # Paced downloads go out in tenths of a second's worth, so a reader sees a steady trickle.
        step = min(CONTENT_CHUNK, max(1, pace // 10)) if pace else CONTENT_CHUNK

        async def chunks() -> AsyncIterator[bytes]:
            # Page-cache reads of 1 MiB are quicker inline than a thread hop per chunk.
            try:
                offset, began = 0, time.monotonic()
                while offset < size:
                    chunk = os.pread(fd, step, offset)
                    if not chunk:
                        break
                    offset += len(chunk)
                    yield chunk
                    if pace:
                        ahead = offset / pace - (time.monotonic() - began)
                        if ahead > 0:
                            await asyncio.sleep(ahead)
            finally:
                os.close(fd)

        return StreamingResponse(
            chunks(),
            media_type="application/octet-stream",
            headers={
                "content-length": str(size),
                "content-disposition": f'attachment; filename="{rec.filename}"',
            },
        )

    @app.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str) -> Response:
        sim.files.get(file_id)
        sim.files.delete(file_id)
        return _json({"id": file_id, "object": "file", "deleted": True})

    # --- batches --------------------------------------------------------------------------------

    slow_creates: set[asyncio.Future[Any]] = set()  # kept referenced until they finish

    @app.post("/v1/batches")
    async def create_batch(request: Request) -> Response:
        body = _parse_json(await request.body())
        if not sim.config.create_delay:
            return _json(sim.engine.create(body).to_api())

        # A slow create: the batch comes to exist only after the delay, whether or not the
        # client still waits for the answer (upstream does not stop when a client gives up).
        async def create_later() -> Any:
            await asyncio.sleep(sim.config.create_delay)
            return sim.engine.create(body)

        task = asyncio.ensure_future(create_later())
        slow_creates.add(task)
        task.add_done_callback(slow_creates.discard)
        return _json((await asyncio.shield(task)).to_api())

    @app.get("/v1/batches")
    async def list_batches(request: Request) -> Response:
        limit = _query_int(request, "limit", 20, 1, 100)
        recs, more = sim.engine.page(request.query_params.get("after"), limit)
        return _list_page(recs, more)

    @app.get("/v1/batches/{batch_id}")
    async def get_batch(batch_id: str) -> Response:
        return _json(sim.engine.get(batch_id).to_api())

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str) -> Response:
        return _json(sim.engine.cancel(batch_id).to_api())

    # --- images ---------------------------------------------------------------------------------

    @app.post("/v1/images/generations")
    async def generations(request: Request) -> Response:
        return await sim.images(request, GENERATIONS)

    @app.post("/v1/images/edits")
    async def edits(request: Request) -> Response:
        return await sim.images(request, EDITS)

    # --- models ---------------------------------------------------------------------------------

    @app.get("/v1/models")
    async def list_models() -> Response:
        return _json(
            {"object": "list", "data": [model_object(m) for m in sim.catalog.models.values()]}
        )

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> Response:
        model = sim.catalog.get(model_id)
        if model is None:
            raise APIError(
                404,
                f"The model '{model_id}' does not exist or you do not have access to it.",
                param="model",
                code="model_not_found",
            )
        return _json(model_object(model))

    # --- admin ----------------------------------------------------------------------------------

    @app.get("/_simulator/stats")
    async def stats() -> Response:
        return _json(sim.stats_snapshot())

    @app.post("/_simulator/reset")
    async def reset() -> Response:
        sim.stats.reset(sim.engine.records.values(), sim.engine.enqueued())
        sim.limiter = sim.fresh_limiter()  # the sync buckets full again, as at start
        if sim.webhooks:
            sim.webhooks.reset()
        sim.stats.save(force=True)
        return _json(sim.stats_snapshot())

    @app.get("/_simulator/health")
    async def health() -> Response:
        return _json({"status": "ok", "catalog": str(sim.catalog.source)})

    app.add_middleware(_Envelope, sim=sim)
    return app
