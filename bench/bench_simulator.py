"""The simulator must never be the bottleneck: sync images/s, batch output lines/s, streaming MB/s.

Starts one simulator process per figure (``python -m simulator``, as tests and ``make run`` do)
and drives it from this process with a concurrent client (raw httpx2, many connections, asyncio),
which shares the machine's cores with the simulator, as the service would:

* sync: ``POST /v1/images/generations`` for 1024x1024 low PNGs (natural size), CONCURRENCY in
  flight; each response is read in full.
* batch: a BATCH_LINES-line batch at an unlimited --rate; lines/s from ``in_progress_at`` to the
  end of the run (watched by polling), images at natural size.
* streaming: ``GET /v1/files/{id}/content`` of a batch output of about STREAM_MB MB
  (``--image-bytes`` padded lines of several MB), read with a streaming client.

Targets (issue: the simulator): at least 200 images/s and 200 MB/s on a 2-core machine.
``--append`` adds the figures to bench/RESULTS.md.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx2
from _support import ROOT, machine

from tests.support.simulator import SimulatorHandle, start_simulator

SYNC_REQUESTS = 3000
CONCURRENCY = 32
BATCH_LINES = 5000
STREAM_IMAGE_BYTES = 1_500_000
STREAM_LINES = 400
STREAM_N = 2
FAST = {"validate_seconds": 0, "finalize_seconds": 0, "rate": 10_000_000, "log_level": "warning"}


async def sync_images_per_second(sim: SimulatorHandle) -> float:
    body = {"model": "gpt-image-2", "size": "1024x1024", "quality": "low", "output_format": "png"}
    limits = httpx2.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx2.AsyncClient(base_url=sim.url, limits=limits, timeout=60) as client:
        queue: asyncio.Queue[int] = asyncio.Queue()

        async def worker() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                resp = await client.post(
                    "/images/generations", json={**body, "prompt": f"bench product {i}, a mug"}
                )
                resp.raise_for_status()
                assert resp.content

        for i in range(200):  # warm-up: connections, caches
            queue.put_nowait(i)
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        for i in range(SYNC_REQUESTS):
            queue.put_nowait(i)
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        return SYNC_REQUESTS / (time.perf_counter() - start)


def run_batch(sim: SimulatorHandle, lines: int, n: int = 1) -> tuple[str, float]:
    """Run a batch to completion; its output file id and lines per second while in progress."""
    client = sim.client()
    body = b"".join(
        json.dumps(
            {
                "custom_id": f"sku-{i}",
                "method": "POST",
                "url": "/v1/images/generations",
                "body": {
                    "model": "gpt-image-2",
                    "prompt": f"Studio photo of product {i}, a ceramic mug on white",
                    "size": "1024x1024",
                    "quality": "low",
                    "n": n,
                },
            }
        ).encode()
        + b"\n"
        for i in range(lines)
    )
    f = client.files.create(file=("bench.jsonl", body), purpose="batch")
    batch = client.batches.create(
        input_file_id=f.id, endpoint="/v1/images/generations", completion_window="24h"
    )
    started = None
    while True:
        b = client.batches.retrieve(batch.id)
        now = time.perf_counter()
        if b.status == "in_progress" and started is None:
            started = now
        if b.status in ("finalizing", "completed"):
            ended = now
            break
        if b.status in ("failed", "expired", "cancelled"):
            raise RuntimeError(f"bench batch ended {b.status}: {b.errors}")
        time.sleep(0.02)
    b = client.batches.retrieve(batch.id)
    while b.status != "completed":
        time.sleep(0.02)
        b = client.batches.retrieve(batch.id)
    assert b.output_file_id and b.request_counts and b.request_counts.completed == lines
    return b.output_file_id, lines / (ended - (started or ended))


def stream_mb_per_second(sim: SimulatorHandle, file_id: str) -> tuple[float, int]:
    total = 0
    with httpx2.Client(timeout=120) as client:
        start = time.perf_counter()
        with client.stream("GET", f"{sim.url}/files/{file_id}/content") as resp:
            resp.raise_for_status()
            for chunk in resp.iter_raw(1 << 20):
                total += len(chunk)
        elapsed = time.perf_counter() - start
    return total / elapsed / 1e6, total


def main() -> None:
    append = "--append" in sys.argv
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        sim = start_simulator(tmp / "sync", **FAST)
        try:
            ips = asyncio.run(sync_images_per_second(sim))
            _, lps = run_batch(sim, BATCH_LINES)
        finally:
            sim.stop()
        big = start_simulator(tmp / "stream", image_bytes=STREAM_IMAGE_BYTES, **FAST)
        try:
            out_id, padded_lps = run_batch(big, STREAM_LINES, n=STREAM_N)
            stream_mbps, streamed = stream_mb_per_second(big, out_id)
        finally:
            big.stop()
    figures = [
        f"sync: {ips:,.0f} images/s (1024x1024 low PNG, natural size, {CONCURRENCY} concurrent, {SYNC_REQUESTS:,} requests)",
        f"batch: {lps:,.0f} output lines/s ({BATCH_LINES:,} lines of one 1024x1024 low PNG)",
        f"batch, padded: {padded_lps:,.0f} output lines/s ({STREAM_LINES} lines of {STREAM_N} images of {STREAM_IMAGE_BYTES / 1e6:.1f} MB)",
        f"streaming: {stream_mbps:,.0f} MB/s (GET /v1/files/{{id}}/content, {streamed / 1e9:.2f} GB output file)",
    ]
    print(f"simulator benchmark on {machine()}")
    for line in figures:
        print("  " + line)
    if append:
        results = ROOT / "bench" / "RESULTS.md"
        if not results.exists():
            results.write_text(
                "# Benchmark results\n\nEach section: machine, command, figures, date.\n"
            )
        with results.open("a") as f:
            f.write(
                "\n## Simulator (bench/bench_simulator.py)\n\n"
                f"- machine: {machine()}\n"
                "- command: `.venv/bin/python bench/bench_simulator.py`\n"
                "- date: 2026-11-21\n"
                "- target: >= 200 images/s sync and >= 200 MB/s streaming from one simulator process\n"
                + "".join(f"- {line}\n" for line in figures)
            )


if __name__ == "__main__":
    main()
