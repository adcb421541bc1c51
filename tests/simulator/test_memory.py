"""Bounded memory: a 50,000-line input and gigabytes of multi-megabyte output lines stream through.

The simulator process is sampled while it works; its resident memory must stay under 300 MB.
"""

from __future__ import annotations

import json

import psutil

from tests.simulator.conftest import gen_line, submit
from tests.support.procs import wait_until
from tests.support.simulator import SimulatorHandle

LIMIT_BYTES = 300 * 1024 * 1024


def run_watching_memory(sim: SimulatorHandle, batch_id: str, timeout: float) -> tuple[object, int]:
    assert sim.proc is not None
    proc = psutil.Process(sim.proc.pid)
    client = sim.client()
    peak = 0

    def done() -> object:
        nonlocal peak
        peak = max(peak, proc.memory_info().rss)
        b = client.batches.retrieve(batch_id)
        return b if b.status in ("completed", "failed", "expired", "cancelled") else None

    batch = wait_until(done, timeout=timeout, interval=0.1, message="the batch to finish")
    return batch, peak


def test_fifty_thousand_lines_stream_through(make_sim):
    # Every line is answered with an injected 500, so the run is quick yet reads, validates, runs
    # and writes all 50,000 lines, and ends the way an all-failed batch does.
    sim = make_sim(rate=10_000_000, fail_rate=1.0)
    client = sim.client()
    line = json.dumps(gen_line("ID", "a ceramic mug, product photo, white background")).encode()
    body = b"".join(line.replace(b'"ID"', f'"sku-{i:05d}"'.encode()) + b"\n" for i in range(50_000))
    f = client.files.create(file=("big.jsonl", body), purpose="batch")
    del body
    batch_id = client.batches.create(
        input_file_id=f.id, endpoint="/v1/images/generations", completion_window="24h"
    ).id
    batch, peak = run_watching_memory(sim, batch_id, timeout=120)
    assert batch.status == "completed"  # type: ignore[attr-defined]
    assert batch.output_file_id is None  # type: ignore[attr-defined]
    counts = batch.request_counts  # type: ignore[attr-defined]
    assert (counts.total, counts.failed) == (50_000, 50_000)
    seen = 0
    with client.files.with_streaming_response.content(batch.error_file_id) as resp:  # type: ignore[attr-defined]
        for raw in resp.iter_lines():
            assert json.loads(raw)["response"]["status_code"] == 500
            seen += 1
    assert seen == 50_000
    print(f"simulator peak RSS {peak / 2**20:.0f} MB")
    assert peak < LIMIT_BYTES, f"simulator peaked at {peak / 2**20:.0f} MB"


def test_gigabytes_of_multi_megabyte_lines_stream_to_and_from_disk(make_sim):
    sim = make_sim(rate=10_000_000, image_bytes=1_000_000)
    client = sim.client()
    lines = [gen_line(f"big-{i}", f"big image {i}", n=2) for i in range(800)]
    batch, peak = run_watching_memory(sim, submit(client, lines).id, timeout=180)
    assert batch.status == "completed"  # type: ignore[attr-defined]
    out = client.files.retrieve(batch.output_file_id)  # type: ignore[attr-defined]
    assert out.bytes > 2_000_000_000
    count, largest = 0, 0
    with client.files.with_streaming_response.content(out.id) as resp:
        for raw in resp.iter_lines():
            count += 1
            largest = max(largest, len(raw))
    assert count == 800 and largest > 2_000_000
    client.files.delete(out.id)  # gigabytes: do not leave them in the test's tmp dir
    print(f"simulator peak RSS {peak / 2**20:.0f} MB")
    assert peak < LIMIT_BYTES, f"simulator peaked at {peak / 2**20:.0f} MB"
