"""The sync lane against upstream's buckets end to end: two worker processes, a simulator whose
bucket starts full, and (in the second test) another client spending half the same limit.

The simulator holds a 10-second window of a 600-a-minute limit: a full bucket of 100 requests
that refills 10 a second. The minimum time for N images is what the bucket allows: its 100 at once,
then the refill (what another client leaves of it). N is sized for a 20-second minimum; paced from
zero, as the lane used to be, the same N takes 30 s (40 s shared). The benchmark's target is 1.2
of the minimum; these tests allow 1.25, for a loaded machine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import wait_until
from tests.support.simulator import OtherClient, SimulatorHandle
from tests.support.stack import Stack, job_body

pytestmark = pytest.mark.slow

MODEL = "gpt-image-2"
OTHER_MODEL = "gpt-image-2-2026-04-21"  # the other client: same organization, same bucket
PER_MINUTE, WINDOW = 600, 10
BUCKET, RATE = PER_MINUTE * WINDOW // 60, PER_MINUTE / 60


@dataclass
class Run:
    seconds: float  # from our first request to our last image billed
    requests: int
    rate_limited: int


def _ours(sim: SimulatorHandle) -> dict[str, Any]:
    models: dict[str, Any] = sim.stats()["models"]
    return models.get(MODEL) or {"requests": 0, "images": 0, "rate_limited": 0}


def _watch(sim: SimulatorHandle, images: int, timeout: float) -> Run:
    first: float | None = None

    def done() -> dict[str, Any] | None:
        nonlocal first
        ours = _ours(sim)
        if first is None and ours["requests"] > 0:
            first = time.monotonic()
        return ours if ours["images"] >= images else None

    ours = wait_until(done, timeout=timeout, interval=0.05, message=f"{images} sync images")
    assert first is not None
    return Run(time.monotonic() - first, ours["requests"], ours["rate_limited"])


def _stack(make_simulator: Any, make_stack: Any) -> tuple[SimulatorHandle, Stack]:
    sim = make_simulator(rpm=PER_MINUTE, limit_window=WINDOW, latency_ms=50, plain_images=True)
    stack = make_stack(sim, env={"IMAGEBATCH_SYNC_RPM": str(PER_MINUTE)})
    stack.start_api()
    stack.start_worker("control,collect,sync", name="a")
    stack.start_worker("control,collect,sync", name="b")
    stack.start_beat()
    return sim, stack


def _finish(stack: Stack, job_id: str, images: int) -> None:
    job = stack.wait_job(job_id, timeout=60)
    assert job["status"] == "succeeded", stack.logs()
    assert job["counts"]["succeeded"] == images
    root = stack.tmp / "storage" / "jobs" / job_id / "images"
    stored = [p for p in root.glob("*") if not p.name.endswith(".meta.json")]
    assert len(stored) == images


def test_a_fresh_bucket_is_spent_at_once_and_the_rest_at_the_refill_rate(
    make_simulator, make_stack
):
    sim, stack = _stack(make_simulator, make_stack)
    images = BUCKET + int(RATE * 20)  # the bucket's 100, then 20 s of refill
    minimum = (images - BUCKET) / RATE
    job_id = stack.submit(job_body(images, mode="sync", reuse="never"))["id"]
    run = _watch(sim, images, timeout=120)
    _finish(stack, job_id, images)
    print(f"sync: {images} images in {run.seconds:.1f} s (minimum {minimum:.0f} s), {run}")
    assert run.rate_limited <= 0.01 * run.requests, run
    assert run.seconds <= 1.25 * minimum, (run, minimum)


def test_another_client_spending_half_the_limit_is_left_its_share(
    make_simulator, make_stack, tmp_path: Path
):
    sim, stack = _stack(make_simulator, make_stack)
    theirs = OtherClient(sim, RATE / 2, OTHER_MODEL)
    images = BUCKET + int(RATE / 2 * 20)  # the bucket, then 20 s of what the other leaves us
    minimum = (images - BUCKET) / (RATE / 2)
    theirs.start()
    try:
        job_id = stack.submit(job_body(images, mode="sync", reuse="never"))["id"]
        run = _watch(sim, images, timeout=120)
    finally:
        theirs.stop()
    _finish(stack, job_id, images)
    print(
        f"sync beside another client: {images} images in {run.seconds:.1f} s "
        f"(minimum {minimum:.0f} s), {run}; theirs: {theirs.sent} sent, {theirs.refused} refused"
    )
    assert run.rate_limited <= 0.01 * run.requests, run
    assert run.seconds <= 1.25 * minimum, (run, minimum)
    # It really spent from the same bucket, about half the refill, the whole time.
    assert theirs.sent - theirs.refused >= 0.8 * RATE / 2 * run.seconds
