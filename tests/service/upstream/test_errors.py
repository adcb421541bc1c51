"""A connection to upstream broken mid-stream is transient, however it surfaces: a real HTTP
server that promises a longer body than it sends, read through the real SDK and HTTP client."""

from __future__ import annotations

import http.client
import socket
import threading
from collections.abc import Iterator

import h11
import httpcore2
import httpx2
import openai
import pytest

from service.settings import Settings
from service.upstream import Upstream, UpstreamError
from service.upstream import port as upstream_port
from service.upstream.errors import translated
from service.upstream.port import make_client


@pytest.fixture
def cut_short() -> Iterator[str]:
    """An HTTP server that answers 200 with a Content-Length it never fills, then hangs up."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                partial = b'{"custom_id": "0", "response": {"status_code": 200}}\n' * 20
                head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                conn.sendall(head + b"Content-Length: 1000000\r\n\r\n" + partial)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/v1"
    stop.set()
    server.close()


def port(url: str) -> Upstream:
    s = Settings(openai_base_url=url, openai_api_key="sk-test", openai_max_retries=0)
    return Upstream(make_client(s))


@pytest.mark.parametrize("direct", [True, False], ids=["read directly", "read through the SDK"])
def test_an_output_file_cut_short_mid_stream_is_transient(
    cut_short: str, direct: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read from its own connection (the usual way) or through the SDK (as with a proxy set),
    a body that ends before its Content-Length is a broken connection, never a short file."""
    if not direct:
        monkeypatch.setattr(upstream_port, "open_content", lambda *a, **k: None)
    seen: list[bytes] = []
    with pytest.raises(UpstreamError) as caught, port(cut_short).file_lines("file-1") as lines:
        seen.extend(lines)
    assert caught.value.transient and caught.value.status is None
    assert caught.value.code == "connection_error"
    cause = http.client.IncompleteRead if direct else httpx2.RemoteProtocolError
    assert isinstance(caught.value.__cause__, cause)
    assert len(seen) <= 20  # the whole lines that came may be read; then it raises


def test_a_response_cut_short_through_the_sdk_is_transient(cut_short: str) -> None:
    with pytest.raises(UpstreamError) as caught:
        port(cut_short).create_batch("file-1", "/v1/images/generations", "24h", {})
    assert caught.value.transient
    assert isinstance(caught.value.__cause__, (openai.APIConnectionError, httpx2.HTTPError))


@pytest.mark.parametrize(
    "raised",
    [
        httpx2.RemoteProtocolError("peer closed connection without sending complete body"),
        httpx2.ReadError("read failed"),
        openai.APIConnectionError(request=httpx2.Request("GET", "http://upstream/v1/files")),
        httpcore2.RemoteProtocolError("server disconnected"),
        h11.RemoteProtocolError("peer closed connection", 400),
        ConnectionResetError(104, "Connection reset by peer"),
        http.client.IncompleteRead(b"", 999_000),
    ],
    ids=lambda e: type(e).__module__.split(".")[0] + "." + type(e).__name__,
)
def test_every_layer_of_a_broken_connection_comes_out_transient(raised: BaseException) -> None:
    with pytest.raises(UpstreamError) as caught, translated():
        raise raised
    assert caught.value.transient and caught.value.__cause__ is raised


def test_an_answer_upstream_refused_stays_permanent() -> None:
    request = httpx2.Request("POST", "http://upstream/v1/batches")
    response = httpx2.Response(400, request=request, json={"error": {"message": "bad"}})
    with pytest.raises(UpstreamError) as caught, translated():
        raise openai.BadRequestError("bad", response=response, body={"message": "bad"})
    assert not caught.value.transient and caught.value.status == 400
