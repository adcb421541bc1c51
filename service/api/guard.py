"""What every request meets first: a request id, the Host and Origin checks of an open API, and the
catch-all that turns an unexpected exception into a 500 problem.

An open API (no tenants file) trusts whoever reaches it, so it must only be reached on purpose:

* **Host**: a request whose ``Host`` is not in ``IMAGEBATCH_ALLOWED_HOSTS`` (default: the
  loopback names, the bind address and the host of ``IMAGEBATCH_PUBLIC_URL``) is refused with
  400, so a web page cannot use DNS rebinding to talk to an API on localhost. ``/healthz`` and
  ``/readyz`` are exempt (probes address a pod by IP) and say nothing sensitive.
* **Origin**: a state-changing request (not GET/HEAD/OPTIONS) that a browser sent from a page of
  another origin is refused with 403: it is a web page acting on the API, not its user.

With tenants every request carries a bearer key, which browsers never attach by themselves, so
neither check applies.

Every response carries ``X-Request-Id``; an exception no handler caught is logged with its
traceback and that id, and answered with a 500 problem carrying the same id, never a text/plain
page or a stack trace.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import PROBLEM_CONTENT_TYPE, FieldError, Problem
from service.settings import Settings

log = logging.getLogger("imagebatch.api")

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
_EXEMPT_PATHS = ("/healthz", "/readyz")
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def allowed_hosts(settings: Settings) -> frozenset[str] | None:
    """The Host names an open API answers to; None when any is fine (``*`` or tenants)."""
    if settings.tenants_file is not None:
        return None
    names = [h.strip().lower() for h in settings.allowed_hosts if h.strip()]
    if "*" in names:
        return None
    if not names:
        names = [*LOOPBACK_HOSTS, settings.api_host.lower()]
        public = urlsplit(settings.public_url).hostname
        if public:
            names.append(public.lower())
    return frozenset(n.strip("[]") for n in names if n not in ("0.0.0.0", "::"))


def _host_of(value: str) -> str:
    """The name in a Host header or an Origin: port and IPv6 brackets removed, lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class RequestGuard:
    """Pure ASGI middleware (a BaseHTTPMiddleware would buffer streamed responses)."""

    def __init__(self, app: ASGIApp, hosts: Iterable[str] | None) -> None:
        self.app = app
        self.hosts = frozenset(hosts) if hosts is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = "req_" + secrets.token_hex(8)
        scope.setdefault("state", {})["request_id"] = rid
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        refusal = self._refusal(scope)
        if refusal is not None:
            await _send_problem(send_with_id, refusal)
            return
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception(
                "request %s %s %s failed", rid, scope.get("method"), scope.get("path", "")[:200]
            )
            if started:
                raise  # the answer is half sent; the server closes the connection
            problem = Problem(
                500,
                "Internal error",
                f"something went wrong on our side; report request id {rid}",
                extra={"request_id": rid},
            )
            await _send_problem(send_with_id, problem)

    def _refusal(self, scope: Scope) -> Problem | None:
        if self.hosts is None or scope.get("path") in _EXEMPT_PATHS:
            return None
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host = _host_of(headers.get("host", ""))
        if host not in self.hosts:
            detail = (
                f"this API answers to {', '.join(sorted(self.hosts))}, not {host[:100]!r}; "
                "set IMAGEBATCH_ALLOWED_HOSTS to reach it by another name"
            )
            return Problem(400, "Host not allowed", detail, errors=[FieldError("Host", detail)])
        origin = headers.get("origin")
        if origin and scope.get("method") not in _SAFE_METHODS:
            name = urlsplit(origin).hostname or ""
            if name not in self.hosts:
                detail = f"a page from {origin[:100]!r} may not change anything through this API"
                return Problem(
                    403, "Cross-site request refused", detail, errors=[FieldError("Origin", detail)]
                )
        return None


async def _send_problem(send: Any, problem: Problem) -> None:
    body = orjson.dumps(problem.to_dict())
    await send(
        {
            "type": "http.response.start",
            "status": problem.status,
            "headers": [
                (b"content-type", PROBLEM_CONTENT_TYPE.encode()),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
