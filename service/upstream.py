"""The upstream OpenAI client, made once per process.

Retries: the SDK owns retries of idempotent calls (retrieve, list, file upload, content) with
its default policy (429, 5xx, connection errors; ``retry-after`` honoured). Creating a batch is
not idempotent upstream (no Idempotency-Key), so :func:`no_retry` gives the submit path a client
that never retries on its own; submit retries itself after listing what already exists.
"""

from __future__ import annotations

from openai import OpenAI

from service.settings import Settings

# The key the embedded simulator is started with when no OpenAI key is set.
SIMULATOR_KEY = "sk-imagebatch-simulator"


def make_client(settings: Settings) -> OpenAI:
    key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else SIMULATOR_KEY
    base_url = settings.openai_base_url or (
        f"http://127.0.0.1:{settings.simulator_port}/v1"
        if settings.openai_api_key is None
        else None
    )
    return OpenAI(
        api_key=key,
        base_url=base_url,
        max_retries=settings.openai_max_retries,
        timeout=settings.openai_timeout_seconds,
    )


def no_retry(client: OpenAI) -> OpenAI:
    return client.with_options(max_retries=0)
