"""The sync lane against an images-per-minute limit, side by side with a plain client.

For each limit L (60, 300 and 1,200 images per minute) and each client, a fresh simulator with
``--ipm L`` (and 50 ms of added latency per request) serves N = 1.25 x L image requests
(1024x1024, low, PNG):

* ours: the whole stack as real processes (API, two Celery workers, beat, Redis, local storage)
  with ``IMAGEBATCH_SYNC_IMAGES_PER_MINUTE=L``, one job with ``"mode": "sync"``;
* plain: asyncio, ``openai.AsyncOpenAI`` with the SDK's default retries (2, honouring
  ``retry-after``), a fixed concurrency of 8, no pacing.

Both are measured the same way, from the simulator's own counters (``GET /_simulator/stats``,
sampled every 50 ms): the achieved rate is the images it billed over the time from its first
request to its last billed image (N - 1 intervals), divided by L; the 429 share is
``rate_limited / requests``. A request the plain client gave up on (a 429 after its retries)
counts as failed. The simulator's bucket holds one minute's worth and starts full, so a client
that bursts gets its first L images at once and is throttled after: N is sized past that.

Target (issue: rate-limit and spend budgets): ours at least 0.95 of the limit with at most 1 %
429s at every limit.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import redis
from _support import ROOT, machine, start_redis

sys.path.insert(0, str(ROOT))

from tests.support.simulator import SimulatorHandle, start_simulator
from tests.support.stack import Stack, job_body

LIMITS = (60, 300, 1200)
SIZE_FACTOR = 1.25  # images per run = 1.25 x the per-minute limit: past the simulator's bucket
LATENCY_MS = 50
PLAIN_CONCURRENCY = 8
PROMPT = "Studio photo of product {i} on white"
MODEL = "gpt-image-2"


@dataclass
class Run:
    limit: int
    images: int  # asked for
    billed: int  # images the simulator made
    requests: int
    rate_limited: int
    seconds: float  # first request to last billed image

    @property
    def rate_share(self) -> float:
        if self.billed < 2 or self.seconds <= 0:
            return 0.0
        return (self.billed - 1) * 60 / self.seconds / self.limit

    @property
    def share_429(self) -> float:
        return self.rate_limited / self.requests if self.requests else 0.0

    @property
    def failed(self) -> int:
        return self.images - self.billed


class Watcher:
    """Samples the simulator's sync counters every 50 ms in a thread, until stopped."""

    def __init__(self, sim: SimulatorHandle):
        self.sim = sim
        self.samples: list[tuple[float, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self.sim.stats()["sync"]))
            self._stop.wait(0.05)

    def wait_for(self, images: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.samples or self.samples[-1][1]["images"] < images:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{images} images not billed within {timeout} s")
            time.sleep(0.05)

    def stop(self, limit: int, images: int) -> Run:
        self._stop.set()
        self._thread.join()
        final = self.sim.stats()["sync"]
        first = next(t for t, s in self.samples if s["requests"] > 0)
        last = next(
            (t for t, s in self.samples if s["images"] >= final["images"]), time.monotonic()
        )
        return Run(
            limit, images, final["images"], final["requests"], final["rate_limited"], last - first
        )


def sim_for(tmp: Path, name: str, limit: int) -> SimulatorHandle:
    return start_simulator(
        tmp / name, ipm=limit, latency_ms=LATENCY_MS, validate_seconds=0, log_level="warning"
    )


def run_ours(tmp: Path, redis_url: str, limit: int, images: int) -> Run:
    redis.Redis.from_url(redis_url).flushdb()
    sim = sim_for(tmp, f"sim-ours-{limit}", limit)
    stack = Stack(
        tmp / f"stack-{limit}",
        redis_url,
        sim.url,
        env={"IMAGEBATCH_SYNC_IMAGES_PER_MINUTE": str(limit), "IMAGEBATCH_POLL_SECONDS": "1"},
    )
    stack.tmp.mkdir()
    try:
        stack.start_api()
        stack.start_worker(name="a")
        stack.start_worker(name="b")
        stack.start_beat()
        watcher = Watcher(sim)
        job_id = stack.submit(job_body(images, prompt=PROMPT, mode="sync", reuse="never"))["id"]
        watcher.wait_for(images, timeout=images * 60 / limit * 2 + 60)
        run = watcher.stop(limit, images)
        job = stack.wait_job(job_id, timeout=60)
        assert job["status"] == "succeeded", job
        assert job["images_stored"] == images, job
        return run
    finally:
        stack.stop()
        sim.stop()


async def plain_client(sim: SimulatorHandle, images: int) -> int:
    """The naive way: N requests, a fixed number in flight, the SDK's own retries."""
    client = openai.AsyncOpenAI(api_key="sk-bench", base_url=sim.url)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(images):
        queue.put_nowait(i)
    failed = 0

    async def worker() -> None:
        nonlocal failed
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            try:
                await client.images.generate(
                    model=MODEL,
                    prompt=PROMPT.format(i=i),
                    size="1024x1024",
                    quality="low",
                    output_format="png",
                )
            except openai.RateLimitError:
                failed += 1

    await asyncio.gather(*(worker() for _ in range(PLAIN_CONCURRENCY)))
    await client.close()
    return failed


def run_plain(tmp: Path, limit: int, images: int) -> Run:
    sim = sim_for(tmp, f"sim-plain-{limit}", limit)
    try:
        watcher = Watcher(sim)
        failed = asyncio.run(plain_client(sim, images))
        run = watcher.stop(limit, images)
        assert run.failed == failed, (run, failed)
        return run
    finally:
        sim.stop()


def main() -> None:
    started, load_before = time.monotonic(), os.getloadavg()[0]
    rows: list[tuple[Run, Run]] = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        redis_proc, redis_url = start_redis(tmp / "redis")
        try:
            for limit in LIMITS:
                images = round(limit * SIZE_FACTOR)
                ours = run_ours(tmp, redis_url, limit, images)
                plain = run_plain(tmp, limit, images)
                rows.append((ours, plain))
                print(f"  L={limit}: ours {ours}\n          plain {plain}", file=sys.stderr)
        finally:
            redis_proc.stop()
    print(f"machine: {machine()}; load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}")
    print(
        f"sync lane vs plain client: simulator --ipm L --latency-ms {LATENCY_MS}, "
        f"N = {SIZE_FACTOR} x L images (1024x1024 low PNG); plain = AsyncOpenAI, "
        f"{PLAIN_CONCURRENCY} in flight, SDK default retries"
    )
    print(
        "| limit/min | images | ours: rate/limit | ours: 429s | ours: failed | ours: s "
        "| plain: rate/limit | plain: 429s | plain: failed | plain: s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for ours, plain in rows:
        print(
            f"| {ours.limit:,} | {ours.images:,} "
            f"| {ours.rate_share:.2f} | {ours.share_429:.1%} | {ours.failed} | {ours.seconds:.1f} "
            f"| {plain.rate_share:.2f} | {plain.share_429:.1%} | {plain.failed} "
            f"| {plain.seconds:.1f} |"
        )
    ok = all(o.rate_share >= 0.95 and o.share_429 <= 0.01 and o.failed == 0 for o, _ in rows)
    print(
        f"target: ours >= 0.95 of the limit with <= 1 % 429s at every limit: "
        f"{'met' if ok else 'MISSED'}   (bench wall time {time.monotonic() - started:.0f} s)"
    )


if __name__ == "__main__":
    main()
