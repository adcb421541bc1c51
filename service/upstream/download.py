"""Reading an upstream file's content straight from its socket, without the SDK's copies.

An output file is GBs of base64 lines. Read through the SDK, each byte of it is copied about six
times holding the GIL (httpcore's read, h11's receive buffer, its slicing twice, httpcore's
``bytes()``, the line joined), which made the reader of a collect the slowest part of it and took
the GIL from the threads storing its images. Here the same GET is sent with the standard
library's ``http.client`` and the body taken a socket read at a time (the kernel writes each
into its bytes with the GIL released), split into lines by
:func:`service.storage.port.iter_chunk_lines`.

Only the plain case goes this way: a direct HTTP(S) connection (no proxy in the environment), the
SDK's own API key, and a ``200`` with an uncompressed body (``http.client`` asks for
``identity``). Anything else - a proxy, a failed connect, any other status - returns ``None``
and the caller reads the file through the SDK, whose retries and error translation then apply
exactly as before. TLS uses the same trust as the SDK's client (certifi, or ``SSL_CERT_FILE`` /
``SSL_CERT_DIR``), through ``httpx2.create_ssl_context``.
"""

from __future__ import annotations

import http.client
import urllib.request
from collections.abc import Callable, Iterator
from urllib.parse import SplitResult, quote, urlsplit

import httpx2
from openai import OpenAI

# What the SDK sends for a file's content; the same Accept, so upstream answers the same.
_ACCEPT = "application/binary"
# At most this much a socket read.
_READ_BYTES = 1 << 20


class Content:
    """A 200 answer to a file's content, open on its own connection; :meth:`close` closes both."""

    def __init__(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse):
        self._conn, self._resp = conn, resp

    def chunks(self) -> Iterator[bytes]:
        """The body as it arrives, one socket read (at most 1 MiB) a chunk: on a slow link each
        line can be split off as soon as it has come. Raises :class:`http.client.IncompleteRead`
        when the connection ends before the body does (``http.client`` returns nothing then, as
        at the end)."""
        while data := self._resp.read1(_READ_BYTES):
            yield data
        if self._resp.length:
            raise http.client.IncompleteRead(b"", self._resp.length)

    def close(self) -> None:
        self._resp.close()
        self._conn.close()


def open_content(
    client: OpenAI,
    file_id: str,
    *,
    timeout: float,
    on_response: Callable[[str, int], None] | None = None,
) -> Content | None:
    """GET ``/files/{file_id}/content`` on a connection of its own: the open :class:`Content`
    on a 200 (close it when done), else ``None`` (read it through the SDK).

    ``on_response(path, status)`` sees the answer, as the SDK client's hook does."""
    url = urlsplit(str(client.base_url))
    auth = client.auth_headers.get("Authorization")
    if url.scheme not in ("http", "https") or not url.hostname or not auth or _proxied(url):
        return None
    headers = {
        k: v
        for k, v in client.default_headers.items()
        if isinstance(v, str) and k.lower() != "content-type"
    }
    headers.update({"Accept": _ACCEPT, "Authorization": auth})
    conn: http.client.HTTPConnection
    if url.scheme == "https":
        context = httpx2.create_ssl_context()
        conn = http.client.HTTPSConnection(url.hostname, url.port, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    path = url.path.rstrip("/") + "/files/" + quote(file_id, safe="") + "/content"
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
    except (OSError, http.client.HTTPException):
        conn.close()
        return None  # the SDK tries again, with its retries, and says what went wrong
    if on_response is not None:
        on_response(path, resp.status)
    if resp.status != 200 or resp.getheader("Content-Encoding", "identity") != "identity":
        conn.close()
        return None
    return Content(conn, resp)


def _proxied(url: SplitResult) -> bool:
    """Whether the environment routes ``url`` through a proxy (as httpx would, trusting env)."""
    proxies = urllib.request.getproxies()
    if not (proxies.get(url.scheme) or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass(url.netloc)
