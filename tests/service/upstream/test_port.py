"""The upstream port against a real simulator process (and, where the simulator cannot fail the
way a test needs, a real HTTP server that answers 500): every failure comes out as an
:class:`UpstreamError` that says whether trying again can help, and the calls that must not be
repeated are sent once."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpcore2
import orjson
import pytest

from service.settings import Settings
from service.upstream import Upstream, UpstreamError, UpstreamRateLimited
from service.upstream import port as upstream_port
from service.upstream.port import READ_BYTES, endpoint_label, make_client
from tests.support.procs import free_port, wait_until
from tests.support.receiver import receiving
from tests.support.simulator import SimulatorHandle, start_simulator

GENERATIONS = "/v1/images/generations"
# Lines shorter, longer and much longer than one read.
SIZES = [10, 3 * 1024 * 1024 + 7, 1, 1024 * 1024 - 30, 5 * 1024 * 1024]


def body(prompt: str = "a red bicycle") -> dict[str, Any]:
    return {
        "model": "gpt-image-2",
        "prompt": prompt,
        "size": "1024x1024",
        "quality": "low",
        "output_format": "png",
    }


def upstream(url: str, on_response: Any = None, **settings: Any) -> Upstream:
    s = Settings(openai_base_url=url, openai_api_key="sk-test", **settings)
    return Upstream(make_client(s, on_response=on_response))


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimulatorHandle]:
    handle = start_simulator(
        tmp_path_factory.mktemp("sim"),
        rate=2000,
        validate_seconds=0,
        finalize_seconds=0,
        moderation_words="forbidden=violence",
        plain_images=True,
    )
    yield handle
    handle.stop()


def test_an_image_comes_back_with_its_rate_limit_headers(sim: SimulatorHandle) -> None:
    headers, payload = upstream(sim.url).image(GENERATIONS, body())
    assert len(payload["data"]) == 1 and payload["data"][0]["b64_json"]
    assert payload["usage"]["output_tokens"] > 0
    assert "x-ratelimit-remaining-requests" in headers


def test_a_moderation_block_is_permanent_and_names_its_categories(sim: SimulatorHandle) -> None:
    with pytest.raises(UpstreamError) as caught:
        upstream(sim.url).image(GENERATIONS, body("a forbidden scene"))
    err = caught.value
    assert not isinstance(err, UpstreamRateLimited)
    assert (err.status, err.transient, err.code) == (400, False, "moderation_blocked")
    item = err.item_error()
    assert item["code"] == "moderation_blocked" and item["status_code"] == 400
    assert item["moderation_details"]["categories"] == ["violence"]
    assert item["request_id"]  # what a caller quotes to OpenAI's support
    assert "safety" in item["message"]


def test_an_unknown_batch_is_a_permanent_404(sim: SimulatorHandle) -> None:
    with pytest.raises(UpstreamError) as caught:
        upstream(sim.url).batch("batch_doesnotexist")
    assert (caught.value.status, caught.value.transient) == (404, False)


def test_nothing_listening_is_a_transient_connection_error() -> None:
    gone = upstream(f"http://127.0.0.1:{free_port()}/v1", openai_max_retries=0)
    with pytest.raises(UpstreamError) as caught:
        gone.batch("batch_abc")
    err = caught.value
    assert err.status is None and err.transient
    assert err.code == "connection_error"
    assert err.item_error()["code"] == "connection_error"


def test_a_429_is_rate_limited_and_carries_retry_after(tmp_path: Path) -> None:
    sim = start_simulator(tmp_path / "sim", rpm=1, plain_images=True)
    try:
        port = upstream(sim.url)
        port.image(GENERATIONS, body())  # the minute's one request
        with pytest.raises(UpstreamRateLimited) as caught:
            port.image(GENERATIONS, body())
        err = caught.value
        assert err.status == 429 and err.transient and err.code == "rate_limit_exceeded"
        assert int(err.headers["retry-after"]) > 0
        assert err.headers["x-ratelimit-remaining-requests"] == "0"
        # Sent once: the sync lane owns these retries, paced by its limiter, not the SDK.
        assert sim.stats()["sync"]["rate_limited"] == 1
    finally:
        sim.stop()


def test_a_request_larger_than_the_whole_limit_is_a_permanent_429(tmp_path: Path) -> None:
    # One image costs more tokens than upstream allows in a minute: x-should-retry: false.
    sim = start_simulator(tmp_path / "sim", tpm=50, plain_images=True)
    try:
        with pytest.raises(UpstreamRateLimited) as caught:
            upstream(sim.url).image(GENERATIONS, body())
        err = caught.value
        assert err.status == 429 and not err.transient
        assert err.headers["x-should-retry"] == "false"
        assert "Request too large" in err.item_error()["message"]
    finally:
        sim.stop()


def test_create_batch_is_sent_once_while_reads_are_retried() -> None:
    seen: list[tuple[str, int]] = []
    with receiving([500]) as server:
        port = upstream(
            f"{server.url}/v1",
            on_response=lambda endpoint, status: seen.append((endpoint, status)),
            openai_max_retries=1,
        )
        with pytest.raises(UpstreamError) as caught:
            port.create_batch("file-abc", GENERATIONS, "24h", {"imagebatch_chunk": "j:1:1"})
        assert caught.value.transient and caught.value.status == 500
        assert server.count("POST", "/v1/batches") == 1  # a retry could create a second batch
        with pytest.raises(UpstreamError):
            port.image(GENERATIONS, body())
        assert server.count("POST", "/v1/images/generations") == 1
        with pytest.raises(UpstreamError):
            port.batch("batch_abc")
        assert server.count("GET", "/v1/batches/batch_abc") == 2  # the SDK's one retry
    # Every attempt is seen by the metrics hook, with ids folded out of the label.
    assert seen == [
        ("/v1/batches", 500),
        ("/v1/images/generations", 500),
        ("/v1/batches/{id}", 500),
        ("/v1/batches/{id}", 500),
    ]


def test_a_batch_runs_and_its_output_streams_line_by_line(sim: SimulatorHandle) -> None:
    port = upstream(sim.url)
    lines = b"".join(
        orjson.dumps({"custom_id": str(i), "method": "POST", "url": GENERATIONS, "body": body()})
        + b"\n"
        for i in range(3)
    )
    file_id = port.upload("input.jsonl", io.BytesIO(lines), "batch")
    assert port.file_size(file_id) == len(lines)
    created = port.create_batch(file_id, GENERATIONS, "24h", {"imagebatch_job": "job_x"})
    done = wait_until(
        lambda: (b := port.batch(created.id)).status == "completed" and b,
        timeout=30,
        message="the batch to complete",
    )
    assert done.output_file_id
    with port.file_lines(done.output_file_id) as out:
        records = [orjson.loads(raw) for raw in out]
    assert sorted(r["custom_id"] for r in records) == ["0", "1", "2"]
    assert all(r["response"]["status_code"] == 200 for r in records)
    assert any(b.id == created.id for b in port.recent_batches(limit=1))


def test_a_file_of_long_lines_streams_back_whole_in_large_reads_through_the_sdk(
    sim: SimulatorHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Output lines are MBs of base64. Read through the SDK (as when a proxy is set; the direct
    read is tests/service/upstream/test_download.py), up to 1 MiB a socket read (httpcore's
    default is 64 KiB), each line comes back whole, byte for byte, however the reads cut it."""
    monkeypatch.setattr(upstream_port, "open_content", lambda *a, **k: None)
    port = upstream(sim.url)
    assert httpcore2.HTTP11Connection.READ_NUM_BYTES == READ_BYTES == 1 << 20
    long = [orjson.dumps({"custom_id": str(i), "pad": "A" * size}) for i, size in enumerate(SIZES)]
    file_id = port.upload("long.jsonl", io.BytesIO(b"\n".join(long) + b"\n\n"), "batch")
    with port.file_lines(file_id) as out:
        assert list(out) == long  # the blank line at the end is skipped


def test_recent_batches_pages_on_newest_first(sim: SimulatorHandle) -> None:
    port = upstream(sim.url)
    line = orjson.dumps({"custom_id": "0", "method": "POST", "url": GENERATIONS, "body": body()})
    file_id = port.upload("one.jsonl", line + b"\n", "batch")
    made = [port.create_batch(file_id, GENERATIONS, "24h", {}).id for _ in range(3)]
    listed = [b.id for b in port.recent_batches(limit=2)]  # three batches: two pages at least
    assert [i for i in listed if i in made] == made[::-1]


def test_cancel_of_an_unknown_batch_is_permanent(sim: SimulatorHandle) -> None:
    with pytest.raises(UpstreamError) as caught:
        upstream(sim.url).cancel_batch("batch_nope")
    assert caught.value.status == 404 and not caught.value.transient


def test_endpoint_labels_fold_upstream_ids() -> None:
    assert endpoint_label("/v1/batches/batch_6f2a/cancel") == "/v1/batches/{id}/cancel"
    assert endpoint_label("/v1/files/file-9XbZ/content") == "/v1/files/{id}/content"
    assert endpoint_label("/v1/images/generations") == "/v1/images/generations"


def test_without_a_key_or_url_the_client_talks_to_the_embedded_simulator(
    sim: SimulatorHandle,
) -> None:
    s = Settings(_env_file=None, simulator_port=sim.port)  # type: ignore[call-arg]
    assert s.uses_simulator
    port = Upstream(make_client(s))
    assert port.base_url == f"{sim.url}/"
    with pytest.raises(UpstreamError) as caught:
        port.batch("batch_nope")
    assert caught.value.status == 404  # it answered: the simulator is reached
