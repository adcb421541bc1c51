"""Every error the API answers is ``application/problem+json``: the exception handlers.

Routes raise :class:`service.errors.Problem` (or let a storage or auth error through); these
handlers turn each into a problem response, so no route builds an error body itself. A 405
carries ``Allow``. Anything else a route raises is caught by
:class:`~service.api.guard.RequestGuard` and becomes a 500 problem carrying the request id the
log line (with the traceback) carries too. :func:`documented` describes these answers in the
OpenAPI schema, so every status the API can return is documented.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import PROBLEM_CONTENT_TYPE, FieldError, Problem
from service.storage import StorageError
from service.tenants import AuthError

log = logging.getLogger("imagebatch.api")


def problem_response(problem: Problem) -> JSONResponse:
    return JSONResponse(
        problem.to_dict(),
        status_code=problem.status,
        media_type=PROBLEM_CONTENT_TYPE,
        headers=problem.headers or None,
    )


_PROBLEM_SCHEMA = {
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "field": {"type": "string"},
                    "message": {"type": "string"},
                    "index": {"type": ["integer", "null"]},
                    "id": {"type": ["string", "null"]},
                },
            },
        },
    },
}
_MEANINGS = {
    400: "Malformed request: a body, cursor or Host that cannot be read or is not allowed",
    401: "Missing or unknown API key",
    403: "A cross-site request to an open API",
    404: "No such job or object (or it belongs to another tenant)",
    409: "The job's state does not allow this now",
    413: "The body (or what it renders to) is over the size limit",
    415: "The body is not application/json or text/csv",
    422: "The request is well-formed but not valid; the problem names each field",
    500: "An unexpected error; the problem carries the request id to report",
    503: "Redis or storage unavailable",
}


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for problem answers with these status codes."""
    return {
        status: {
            "description": _MEANINGS[status],
            "content": {PROBLEM_CONTENT_TYPE: {"schema": _PROBLEM_SCHEMA}},
        }
        for status in statuses
    }


# What any route may answer (auth, a bad Host, an unexpected error, storage down).
COMMON = documented(400, 401, 403, 404, 422, 500, 503)
# The same, plus what a route that reads a body may answer: documented by the app for every
# router, those added later included.
ANY_ROUTE = documented(400, 401, 403, 404, 413, 415, 422, 500, 503)


async def _problem(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Problem)
    return problem_response(exc)


async def _auth(_: Request, exc: Exception) -> JSONResponse:
    detail = str(exc)
    field = [FieldError("Authorization", detail)]
    resp = problem_response(Problem(401, "Unauthorized", detail, errors=field))
    resp.headers["WWW-Authenticate"] = 'Bearer realm="imagebatch"'
    return resp


async def _invalid(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        FieldError(
            field=".".join(str(p) for p in e["loc"] if p not in ("query", "path", "header", "body"))
            or "request",
            message=e["msg"],
        )
        for e in exc.errors()
    ]
    first = errors[0] if errors else FieldError("request", "invalid request")
    return problem_response(
        Problem(422, "Invalid request", f"{first.field}: {first.message}", errors=errors)
    )


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    title = {404: "Not found", 405: "Method not allowed"}.get(exc.status_code, "Error")
    detail = str(exc.detail)
    if exc.status_code == 404:
        detail = f"no route {request.url.path[:200]!r}; see /docs for the API"
    elif exc.status_code == 405:
        allow = (exc.headers or {}).get("Allow", "")
        detail = f"{request.method} is not allowed here; allowed: {allow}"
    headers = dict(exc.headers) if exc.headers else None
    errors = [FieldError("method", detail)] if exc.status_code == 405 else None
    return problem_response(Problem(exc.status_code, title, detail, headers=headers, errors=errors))


async def _storage(_: Request, exc: Exception) -> JSONResponse:
    # The cause names buckets and endpoints: the operator's log has it, the caller does not.
    log.error("storage error: %s", exc)
    return problem_response(
        Problem(503, "Storage unavailable", "storage did not answer; try again later")
    )


async def _redis(_: Request, exc: Exception) -> JSONResponse:
    log.error("redis error: %s", exc)
    return problem_response(Problem(503, "Service unavailable", "try again later"))


def install(app: FastAPI) -> None:
    """Register the handlers on ``app``."""
    app.add_exception_handler(Problem, _problem)
    app.add_exception_handler(AuthError, _auth)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(StorageError, _storage)
    app.add_exception_handler(redis.RedisError, _redis)
