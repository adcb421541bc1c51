"""Intake: how long the API takes to accept a 50,000-item job, and how much its memory grows.

Starts a Redis and the API (uvicorn, local storage) on free ports, posts the same 50,000-item
job several times and prints the median time to the 202 and the API's RSS growth.
Target (issue: the batch path): median at most 3 s, growth at most 200 MB.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx2
import orjson
import psutil
from _support import machine, start_api, start_redis

ITEMS = 50_000
RUNS = 5


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        redis_proc, redis_url = start_redis(tmp / "redis")
        api, port = start_api(tmp, redis_url)
        try:
            body = orjson.dumps(
                {
                    "model": "gpt-image-2",
                    "defaults": {"size": "1024x1024", "quality": "low"},
                    "items": [
                        {
                            "id": f"sku-{i:06d}",
                            "prompt": f"Studio photo of product {i}, a ceramic mug in colour {i % 97} on white",
                        }
                        for i in range(ITEMS)
                    ],
                    "labels": {"campaign": "bench"},
                }
            )
            proc = psutil.Process(api.pid)
            with httpx2.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
                client.post(
                    "/v1/jobs/estimate",
                    content=b'{"items":[{"prompt":"warm up"}]}',
                    headers={"Content-Type": "application/json"},
                )
                rss_before = proc.memory_info().rss
                peak = [rss_before]
                stop = threading.Event()

                def sample() -> None:  # the peak inside a request, not just between them
                    while not stop.wait(0.005):
                        peak[0] = max(peak[0], proc.memory_info().rss)

                sampler = threading.Thread(target=sample, daemon=True)
                sampler.start()
                times = []
                for _ in range(RUNS):
                    start = time.perf_counter()
                    resp = client.post(
                        "/v1/jobs", content=body, headers={"Content-Type": "application/json"}
                    )
                    times.append(time.perf_counter() - start)
                    assert resp.status_code == 202, resp.text[:500]
                stop.set()
                sampler.join()
                rss_after = proc.memory_info().rss
            median = statistics.median(times)
            print(f"machine: {machine()}")
            print(f"intake: {ITEMS:,}-item job ({len(body) / 1e6:.1f} MB body), {RUNS} runs")
            print(
                f"  time to 202: median {median:.2f} s (min {min(times):.2f}, max {max(times):.2f})   target <= 3 s"
            )
            print(
                f"  API RSS: before {rss_before / 1e6:.0f} MB, peak {peak[0] / 1e6:.0f} MB, after {rss_after / 1e6:.0f} MB; "
                f"growth {(peak[0] - rss_before) / 1e6:.0f} MB   target <= 200 MB"
            )
        finally:
            api.stop()
            redis_proc.stop()


if __name__ == "__main__":
    main()
