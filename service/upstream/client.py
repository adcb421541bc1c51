"""The upstream OpenAI client, made once per process.

Retries: the SDK owns retries of idempotent calls (retrieve, list, file upload, content) with
its default policy (429, 5xx, connection errors; ``retry-after`` honoured). Creating a batch is
not idempotent upstream (no Idempotency-Key), so :func:`no_retry` gives the submit path a client
that never retries on its own; submit retries itself after listing what already exists.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import httpx2
from openai import DefaultHttpxClient, OpenAI

from service.settings import Settings

# Path segments that are upstream ids (batch_…, file-…, req_…), folded so labels stay bounded.
_ID_SEGMENT = re.compile(r"^(batch_|file-|file_|req_|batch_req_)[A-Za-z0-9_-]+$")


def endpoint_label(path: str) -> str:
    """``/v1/batches/batch_abc/cancel`` → ``/v1/batches/{id}/cancel``: a bounded label."""
    return "/".join("{id}" if _ID_SEGMENT.match(part) else part for part in path.split("/"))


# The key the embedded simulator is started with when no OpenAI key is set.
SIMULATOR_KEY = "sk-imagebatch-simulator"


def make_client(
    settings: Settings, on_response: Callable[[str, int], None] | None = None
) -> OpenAI:
    """The process's client. ``on_response(endpoint, status)`` sees every upstream answer,
    retries included (each attempt is a request upstream counts)."""
    key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else SIMULATOR_KEY
    base_url = settings.openai_base_url or (
        f"http://127.0.0.1:{settings.simulator_port}/v1"
        if settings.openai_api_key is None
        else None
    )
    http_client = None
    if on_response is not None:

        def hook(response: httpx2.Response) -> None:
            on_response(endpoint_label(response.request.url.path), response.status_code)

        http_client = DefaultHttpxClient(event_hooks={"response": [hook]})
    return OpenAI(
        http_client=http_client,
        api_key=key,
        base_url=base_url,
        max_retries=settings.openai_max_retries,
        timeout=settings.openai_timeout_seconds,
    )


def no_retry(client: OpenAI) -> OpenAI:
    return client.with_options(max_retries=0)
