"""Upstream: the OpenAI API as imagebatch uses it, made once per process, errors translated.

:class:`Upstream` is the one place that builds the SDK client and the one place its exceptions
are caught: every method raises :class:`~service.upstream.errors.UpstreamError` instead, with
``transient`` set, so lanes and tasks decide what to do without importing ``openai``.

Retries: the SDK owns retries of idempotent calls (retrieve, list, cancel, file upload and
content) with its default policy (429, 5xx, connection errors; ``retry-after`` honoured; at
most ``IMAGEBATCH_OPENAI_MAX_RETRIES``). Creating a batch is not idempotent upstream (no
Idempotency-Key), so :meth:`Upstream.create_batch` never retries on its own: the submit path
lists what already exists before it creates again. The sync lane's image calls do not retry
either: the lane owns those retries, paced by the cluster-wide rate limiter.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import IO, Any

import httpcore2
import httpx2
from openai import DefaultHttpxClient, InvalidWebhookSignatureError, OpenAI
from openai.types import Batch

from service.settings import Settings
from service.storage import iter_chunk_lines
from service.upstream.download import open_content
from service.upstream.errors import BadWebhookSignature, translated

# Path segments that are upstream ids (batch_…, file-…, req_…), folded so labels stay bounded.
_ID_SEGMENT = re.compile(r"^(batch_|file-|file_|req_|batch_req_)[A-Za-z0-9_-]+$")
# The key the embedded simulator is started with when no OpenAI key is set.
SIMULATOR_KEY = "sk-imagebatch-simulator"

# How much one socket read of an HTTP/1.1 response may return. httpcore reads 64 KiB at a time
# (encode/httpcore#135 settled on that for small responses), and every read costs a pass through
# h11 and httpx in Python holding the GIL: ~60,000 passes for a 4 GB output file, half the CPU
# of reading it, taken from the threads storing its images. At 1 MiB a read returns whatever the
# socket holds, up to that (TLS returns a record at most, 16 KiB, whatever is asked). httpcore
# has no setting for it; its connections read ``self.READ_NUM_BYTES``, so it is raised for the
# process, once (every HTTP/1.1 client in it reads this way; small responses are unaffected).
READ_BYTES = 1 << 20


def read_large() -> None:
    """Let HTTP/1.1 responses be read up to :data:`READ_BYTES` per socket read (idempotent)."""
    connection = httpcore2.HTTP11Connection
    if getattr(connection, "READ_NUM_BYTES", 0) < READ_BYTES:
        connection.READ_NUM_BYTES = READ_BYTES


def endpoint_label(path: str) -> str:
    """``/v1/batches/batch_abc/cancel`` → ``/v1/batches/{id}/cancel``: a bounded label."""
    return "/".join("{id}" if _ID_SEGMENT.match(part) else part for part in path.split("/"))


def make_client(
    settings: Settings, on_response: Callable[[str, int], None] | None = None
) -> OpenAI:
    """The SDK client. ``on_response(endpoint, status)`` sees every upstream answer, retries
    included (each attempt is a request upstream counts)."""
    key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else SIMULATOR_KEY
    base_url = settings.openai_base_url or (
        f"http://127.0.0.1:{settings.simulator_port}/v1"
        if settings.openai_api_key is None
        else None
    )
    read_large()
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


class Upstream:
    """The calls imagebatch makes upstream. One per process (see :mod:`service.context`).

    ``on_response`` is the hook given to :func:`make_client`, for the requests made without the
    SDK's client (:meth:`file_lines`)."""

    def __init__(
        self, client: OpenAI, on_response: Callable[[str, int], None] | None = None
    ) -> None:
        self.client = client
        self._once = client.with_options(max_retries=0)
        self._on_response = on_response

    @property
    def base_url(self) -> str:
        return str(self.client.base_url)

    # --- files -----------------------------------------------------------------------------
    def upload(self, name: str, content: bytes | IO[bytes], purpose: str, mime: str = "") -> str:
        """Upload a file (``batch`` input, ``vision`` reference image); returns its id."""
        with translated():
            file = (name, content, mime) if mime else (name, content)
            return self.client.files.create(file=file, purpose=purpose).id  # type: ignore[arg-type]

    @contextmanager
    def file_lines(self, file_id: str) -> Iterator[Iterator[bytes]]:
        """An upstream file's non-empty lines, streamed as bytes (never the whole file held).

        Read straight from a connection of its own when it can be (:mod:`.download`), else
        through the SDK; either way split as it arrives.
        """
        direct = open_content(
            self.client, file_id, timeout=self._read_timeout(), on_response=self._seen
        )
        if direct is not None:
            with contextlib.closing(direct), translated():
                yield (raw for raw in iter_chunk_lines(direct.chunks()) if raw.strip())
            return
        with translated(), self.client.files.with_streaming_response.content(file_id) as resp:
            yield (raw for raw in iter_chunk_lines(resp.iter_bytes()) if raw.strip())

    def _read_timeout(self) -> float:
        timeout = self.client.timeout
        if isinstance(timeout, httpx2.Timeout):
            return float(timeout.read or timeout.connect or 600)
        return float(timeout) if isinstance(timeout, (int, float)) else 600.0

    def _seen(self, path: str, status: int) -> None:
        if self._on_response is not None:
            self._on_response(endpoint_label(path), status)

    def file_size(self, file_id: str) -> int:
        with translated():
            return int(self.client.files.retrieve(file_id).bytes)

    # --- batches ---------------------------------------------------------------------------
    def create_batch(
        self,
        input_file_id: str,
        endpoint: str,
        window: str,
        metadata: Mapping[str, str],
        *,
        timeout: float | None = None,
    ) -> Batch:
        """Create a batch, once: never retried here (a retry could create a second batch)."""
        client = self._once if timeout is None else self._once.with_options(timeout=timeout)
        with translated():
            return client.batches.create(
                input_file_id=input_file_id,
                endpoint=endpoint,  # type: ignore[arg-type]
                completion_window=window,  # type: ignore[arg-type]
                metadata=dict(metadata),
            )

    def batch(self, batch_id: str) -> Batch:
        with translated():
            return self.client.batches.retrieve(batch_id)

    def cancel_batch(self, batch_id: str) -> None:
        with translated():
            self.client.batches.cancel(batch_id)

    def recent_batches(self, limit: int = 100) -> Iterator[Batch]:
        """Batches newest first, page after page as the caller reads on."""
        with translated():
            yield from self.client.batches.list(limit=limit)

    # --- models ----------------------------------------------------------------------------
    def models(self, *, timeout: float = 30.0, max_retries: int | None = None) -> dict[str, Any]:
        """Every model upstream offers, id -> its announced ``shutdown_date`` ("YYYY-MM-DD") or
        None. Upstream lists all its models, not only image ones."""
        client = self.client.with_options(timeout=timeout)
        if max_retries is not None:
            client = client.with_options(max_retries=max_retries)
        with translated():
            return {m.id: m.shutdown_date for m in client.models.list()}

    # --- webhooks (OpenAI -> us) -----------------------------------------------------------
    def verify_webhook(self, body: bytes, headers: Mapping[str, str], secret: str) -> None:
        """Check a webhook's Standard Webhooks signature and timestamp (300 s either way) with the
        SDK's own verifier; raises :class:`BadWebhookSignature` saying what was wrong."""
        try:
            self.client.webhooks.verify_signature(body, headers, secret=secret)
        except InvalidWebhookSignatureError as exc:
            raise BadWebhookSignature(str(exc)) from None
        except (ValueError, UnicodeDecodeError) as exc:  # a header missing, a body not UTF-8
            raise BadWebhookSignature(str(exc)) from None

    # --- images (the sync lane) ------------------------------------------------------------
    def image(
        self, endpoint: str, body: Mapping[str, Any]
    ) -> tuple[Mapping[str, str], dict[str, Any]]:
        """One generation or JSON edit, sent once; returns (response headers, ImagesResponse)."""
        with translated():
            if endpoint.endswith("/edits"):
                raw = self._once.post("/images/edits", body=dict(body), cast_to=httpx2.Response)
                return raw.headers, raw.json()
            resp = self._once.images.with_raw_response.generate(**body)
            return resp.headers, resp.http_response.json()
