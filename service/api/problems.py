"""Every error the API answers is ``application/problem+json``: the exception handlers.

Routes raise :class:`service.errors.Problem` (or let a storage or auth error through); these
handlers turn each into a problem response, so no route builds an error body itself.
"""

from __future__ import annotations

import logging

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


async def _problem(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Problem)
    return problem_response(exc)


async def _auth(_: Request, exc: Exception) -> JSONResponse:
    resp = problem_response(Problem(401, "Unauthorized", str(exc)))
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


async def _http(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    title = {404: "Not found", 405: "Method not allowed"}.get(exc.status_code, "Error")
    return problem_response(Problem(exc.status_code, title, str(exc.detail)))


async def _storage(_: Request, exc: Exception) -> JSONResponse:
    log.error("storage error: %s", exc)
    return problem_response(Problem(503, "Storage unavailable", f"storage did not answer: {exc}"))


def install(app: FastAPI) -> None:
    """Register the handlers on ``app``."""
    app.add_exception_handler(Problem, _problem)
    app.add_exception_handler(AuthError, _auth)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(StorageError, _storage)
