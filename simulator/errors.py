"""OpenAI's error envelope and the ids the simulator hands out.

Every failure the simulator reports, over HTTP or in a batch error file, is an :class:`APIError`
rendered as ``{"error": {"message", "type", "param", "code"}}`` (facts §3.4), so the SDK raises the
same exception class, with the same ``code``/``param``, as it would against OpenAI.
"""

from __future__ import annotations

import secrets
import string
from typing import Any

_ALNUM = string.ascii_letters + string.digits


def new_id(prefix: str, length: int = 24) -> str:
    """An id shaped like OpenAI's: ``file-…`` (alphanumeric) or ``batch_…`` / ``req_…`` (hex)."""
    if prefix.endswith("-"):
        return prefix + "".join(secrets.choice(_ALNUM) for _ in range(length))
    return prefix + secrets.token_hex(length // 2 + length % 2)[:length]


def request_id() -> str:
    return new_id("req_", 32)


class APIError(Exception):
    """A failure answered in OpenAI's envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.extra = extra or {}
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {
            "message": self.message,
            "type": self.type,
            "param": self.param,
            "code": self.code,
        }
        error.update(self.extra)
        return {"error": error}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 ``invalid_request_error`` naming the offending parameter."""
    return APIError(400, message, param=param, code=code)


def not_found(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(404, message, param=param, code=code)


def server_error(request_id: str) -> APIError:
    """The 500 OpenAI answers when something fails on its side (what ``--fail-rate`` injects)."""
    return APIError(
        500,
        "The server had an error while processing your request. Sorry about that! You can retry "
        "your request, or contact us through our help center at help.openai.com if the error "
        f"persists. (Please include the request ID {request_id} in your message.)",
        type="server_error",
    )
