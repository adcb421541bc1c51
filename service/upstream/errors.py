"""Upstream's failures, translated: what the lanes and tasks decide on, without the ``openai`` SDK.

Every call through :class:`service.upstream.port.Upstream` raises :class:`UpstreamError` (or its
:class:`UpstreamRateLimited`) instead of the SDK's exceptions. ``transient`` says whether trying
again later can help: connection errors, timeouts, 408, 409, 429 and 5xx are transient; any
other answer (400 moderation, 401, 404 for an unknown batch, ...) is permanent. Upstream's
``x-should-retry`` header overrides that, as it does for the SDK (facts §5.4): a 429 for a
request larger than a whole minute's limit says ``false``, and no wait will make it fit.

A connection that fails mid-stream (upstream closes it before the body's end, a reset, a read
timeout while an output file streams) is transient wherever it surfaces: as the SDK's
``APIConnectionError``, as the HTTP client's ``RemoteProtocolError`` and other transport
errors, or as the lower layers' exceptions (``httpcore2``, ``h11``, a socket's
``ConnectionError``) when a body is read outside the client's own wrapping, or as
``http.client``'s ``IncompleteRead`` when an output file is read straight from its socket
(:mod:`service.upstream.download`). :data:`MID_STREAM`
lists those; :func:`translated` turns them into a transient :class:`UpstreamError` too.
"""

from __future__ import annotations

import contextlib
import http.client
import ssl
from collections.abc import Iterator, Mapping
from typing import Any

import h11
import httpcore2
import httpx2
import openai

from service.errors import ImagebatchError, PermanentError

_TRANSIENT_STATUSES = {408, 409, 429}

# A connection that broke while a request or a body was under way: trying again can help.
MID_STREAM: tuple[type[BaseException], ...] = (
    openai.APIConnectionError,  # APITimeoutError included
    httpx2.TransportError,  # RemoteProtocolError, ReadError, ReadTimeout, ConnectError, ...
    httpx2.DecodingError,  # a compressed body cut short
    httpcore2.NetworkError,
    httpcore2.TimeoutException,
    httpcore2.RemoteProtocolError,
    h11.RemoteProtocolError,
    http.client.HTTPException,  # IncompleteRead, a bad status line (a file read directly)
    ConnectionError,  # reset, aborted, broken pipe
    TimeoutError,
    ssl.SSLEOFError,
    ssl.SSLZeroReturnError,
)


class UpstreamError(ImagebatchError):
    """Upstream did not do what was asked. ``status`` is None when no answer came at all."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        body: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body: dict[str, Any] = dict(body or {})
        self.headers: dict[str, str] = dict(headers or {})
        self.request_id = request_id
        should_retry = {k.lower(): v for k, v in self.headers.items()}.get("x-should-retry")
        if should_retry in ("true", "false"):
            self.transient = should_retry == "true"
        else:
            self.transient = status is None or status >= 500 or status in _TRANSIENT_STATUSES

    @property
    def code(self) -> str:
        """Upstream's error code (``moderation_blocked``, ...), else ``http_<status>``."""
        if self.body.get("code"):
            return str(self.body["code"])
        return "connection_error" if self.status is None else f"http_{self.status}"

    def item_error(self) -> dict[str, Any]:
        """What an item records when its request failed this way."""
        if self.status is None:
            return {"code": "connection_error", "message": str(self)}
        error: dict[str, Any] = {
            "code": self.code,
            "message": self.body.get("message") or str(self),
            "type": self.body.get("type"),
            "status_code": self.status,
            "request_id": self.request_id,
        }
        if self.body.get("moderation_details"):
            error["moderation_details"] = self.body["moderation_details"]
        return error


class UpstreamRateLimited(UpstreamError):
    """A 429: the request never ran; wait (``retry-after``) and send it again, unless it is not
    ``transient`` (larger than upstream's whole limit: it can never run)."""


class BadWebhookSignature(PermanentError):
    """An inbound webhook whose signature, timestamp or signing headers do not check out."""


def translate(exc: BaseException) -> UpstreamError:
    """The SDK's (or the HTTP client's, mid-stream) exception as an :class:`UpstreamError`."""
    if isinstance(exc, MID_STREAM):
        name = type(exc).__name__
        return UpstreamError(f"connection to upstream broken ({name}): {exc}".rstrip(": "))
    if isinstance(exc, openai.APIStatusError):
        cls = UpstreamRateLimited if exc.status_code == 429 else UpstreamError
        return cls(
            str(exc),
            status=exc.status_code,
            body=exc.body if isinstance(exc.body, dict) else None,
            headers=exc.response.headers,
            request_id=exc.request_id,
        )
    return UpstreamError(str(exc) or type(exc).__name__)


_CAUGHT: tuple[type[BaseException], ...] = (openai.APIError, httpx2.HTTPError, *MID_STREAM)


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Run a block of SDK calls; their exceptions come out as :class:`UpstreamError`."""
    try:
        yield
    except _CAUGHT as exc:
        raise translate(exc) from exc
