"""An output file read straight from its own connection (:mod:`service.upstream.download`),
against a real simulator over HTTPS and plain HTTP: the same lines as through the SDK, the same
trust, the same proxies, and any answer but a plain 200 left to the SDK to retry and explain."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import trustme

from service.settings import Settings
from service.upstream import Upstream, UpstreamError, download
from service.upstream import port as upstream_port
from service.upstream.port import make_client
from tests.support.procs import free_port
from tests.support.simulator import SimulatorHandle, start_simulator

# Lines shorter, longer and much longer than the reader's 4 MiB buffer.
LINES = [
    orjson.dumps({"custom_id": str(i), "pad": "A" * size})
    for i, size in enumerate([10, 5 * 1024 * 1024, 1, 3 * 1024 * 1024 + 7, 0])
]


def connect(url: str, seen: list[tuple[str, int]] | None = None, **settings: Any) -> Upstream:
    """The port as the service makes it: its hook sees the direct reads too."""
    hook = (lambda endpoint, status: seen.append((endpoint, status))) if seen is not None else None
    s = Settings(openai_base_url=url, openai_api_key="sk-test", **settings)
    return Upstream(make_client(s, on_response=hook), on_response=hook)


@pytest.fixture
def direct_reads(monkeypatch: pytest.MonkeyPatch) -> list[download.Content | None]:
    """What each direct attempt gave: a response (read directly) or None (left to the SDK)."""
    results: list[download.Content | None] = []
    real = download.open_content

    def recorded(*args: Any, **kwargs: Any) -> download.Content | None:
        results.append(real(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(upstream_port, "open_content", recorded)
    return results


@pytest.fixture(scope="module")
def tls_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SimulatorHandle, Path]]:
    """The simulator serving HTTPS with a certificate from a CA of this test's own."""
    tmp = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    handle = start_simulator(
        tmp / "sim", ssl_certfile=tmp / "server.pem", ssl_keyfile=tmp / "server.pem"
    )
    try:
        yield handle, tmp / "ca.pem"
    finally:
        handle.stop()


def test_over_tls_the_lines_are_read_directly_with_the_sdks_trust(
    tls_sim: tuple[SimulatorHandle, Path],
    direct_reads: list[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sim, ca = tls_sim
    assert sim.url.startswith("https://")
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # trusted the way the SDK's client trusts
    seen: list[tuple[str, int]] = []
    port = connect(sim.url, seen)
    file_id = port.upload("long.jsonl", io.BytesIO(b"\n".join(LINES) + b"\n"), "batch")
    with port.file_lines(file_id) as out:
        assert list(out) == [line for line in LINES if line]
    assert len(direct_reads) == 1 and direct_reads[0] is not None  # no detour through the SDK
    assert ("/v1/files/{id}/content", 200) in seen


def test_a_certificate_upstream_cannot_prove_is_refused(
    tls_sim: tuple[SimulatorHandle, Path],
    direct_reads: list[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without the CA the SDK does not trust the server, and neither does the direct read: it
    hands over to the SDK, which fails the way it always did (a connection error)."""
    sim, ca = tls_sim
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    file_id = connect(sim.url).upload("one.jsonl", io.BytesIO(LINES[0] + b"\n"), "batch")
    monkeypatch.delenv("SSL_CERT_FILE")
    port = connect(sim.url, openai_max_retries=0)
    with pytest.raises(UpstreamError) as caught, port.file_lines(file_id) as out:
        list(out)
    assert caught.value.transient and caught.value.status is None
    assert direct_reads == [None]


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimulatorHandle]:
    handle = start_simulator(tmp_path_factory.mktemp("sim"))
    try:
        yield handle
    finally:
        handle.stop()


def test_on_a_slow_link_each_line_comes_as_soon_as_it_has_arrived(
    tmp_path: Path, direct_reads: list[Any]
) -> None:
    """A file sent at 400 KB/s: its first line (100 KB) is read long before the last of its
    1.2 MB has come, not once a whole read buffer is full (a collect refreshes its lease and
    saves its cursor line by line)."""
    slow = start_simulator(tmp_path / "sim", download_bytes_per_second=400_000)
    try:
        port = connect(slow.url)
        lines = [orjson.dumps({"custom_id": str(i), "pad": "A" * 100_000}) for i in range(12)]
        file_id = port.upload("slow.jsonl", io.BytesIO(b"\n".join(lines) + b"\n"), "batch")
        arrived: list[float] = []
        start = time.monotonic()
        with port.file_lines(file_id) as out:
            for _ in out:
                arrived.append(time.monotonic() - start)
        assert direct_reads[0] is not None and len(arrived) == 12
        assert arrived[0] < arrived[-1] / 3, arrived  # ~0.3 s of ~3 s
    finally:
        slow.stop()


def test_a_proxy_in_the_environment_is_used_not_bypassed(
    sim: SimulatorHandle, direct_reads: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With HTTP_PROXY set (and nothing exempted) the file is not read around the proxy: here
    the proxy is a port nobody listens on, so the read fails instead of reaching upstream."""
    file_id = connect(sim.url).upload("one.jsonl", io.BytesIO(LINES[0] + b"\n"), "batch")
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")
    port = connect(sim.url, openai_max_retries=0)  # the SDK's client reads proxies when made
    with pytest.raises(UpstreamError) as caught, port.file_lines(file_id) as out:
        list(out)
    assert caught.value.transient and caught.value.status is None
    assert direct_reads == [None]


def test_an_answer_other_than_200_is_left_to_the_sdk(
    sim: SimulatorHandle, direct_reads: list[Any]
) -> None:
    """A file upstream does not have: the direct read sees the 404 and gives way; the SDK asks
    again and says what upstream said, permanent as before. Both requests are counted."""
    seen: list[tuple[str, int]] = []
    port = connect(sim.url, seen)
    with pytest.raises(UpstreamError) as caught, port.file_lines("file-nope") as out:
        list(out)
    assert caught.value.status == 404 and not caught.value.transient
    assert direct_reads == [None]
    assert seen == [("/v1/files/{id}/content", 404)] * 2
