"""The sync lane's plain functions against a real simulator, real Redis and local storage.

``fan_out`` and ``run_slice`` are called directly, as the ``sync.items`` task adapter calls them,
so a test can run a slice twice (a redelivered task) or change the job between fan-out and slice.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from service import metrics
from service.context import Context
from service.jobs import intake
from service.jobs import model as m
from service.jobs.spec import parse_job_json
from service.lanes import sync
from service.queues import FINALIZE, SYNC_ITEMS
from service.redis import keys
from tests.support.context import make_context, recorder
from tests.support.procs import wait_until
from tests.support.simulator import SimulatorHandle, start_simulator
from tests.support.stack import job_body


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimulatorHandle]:
    handle = start_simulator(
        tmp_path_factory.mktemp("sim"), plain_images=True, moderation_words="forbidden=violence"
    )
    yield handle
    handle.stop()


@pytest.fixture
def ctx(
    tmp_path: Path, redis_url: str, redis_client: Any, sim: SimulatorHandle
) -> Iterator[Context]:
    sim.reset()
    context = make_context(tmp_path, redis_url, sim.url)
    yield context
    context.redis.close()


def accept(ctx: Context, n: int, **extra: Any) -> m.Job:
    body = job_body(n, mode="sync", **extra)
    spec = parse_job_json(orjson.dumps(body), ctx.catalog, max_items=1000)
    job = intake.submit(ctx, spec, "default").job
    assert job.mode == "sync"
    return job


def slices(ctx: Context, job_id: str) -> list[tuple[int, int]]:
    return [(a[1], a[2]) for a in recorder(ctx).named(SYNC_ITEMS) if len(a) == 3]


def run_all(ctx: Context, job_id: str) -> dict[str, int]:
    total = {"succeeded": 0, "failed": 0, "cancelled": 0}
    for start, end in slices(ctx, job_id):
        for k, v in sync.run_slice(ctx, job_id, start, end).items():
            total[k] += v
    return total


def images(tmp_path: Path, job_id: str) -> list[str]:
    folder = tmp_path / "storage" / "jobs" / job_id / "images"
    return sorted(p.name for p in folder.glob("*.png")) if folder.exists() else []


def upstream_answers(ctx: Context, status: int) -> int:
    """Image requests upstream answered with ``status``, as /metrics counts them."""
    want = {"endpoint": "/v1/images/generations", "status": str(status)}
    total = 0.0
    for field, value in ctx.redis.hgetall(keys.COUNTERS).items():
        name, _, labels = field.decode().partition("|")
        if name == metrics.UPSTREAM_REQUESTS and orjson.loads(labels) == want:
            total += float(value)
    return int(total)


def test_a_sync_job_ends_with_its_images_stored_and_its_spend_settled(
    ctx: Context, sim: SimulatorHandle, tmp_path: Path
) -> None:
    job = accept(ctx, 10)
    assert sync.fan_out(ctx, job.id) == 10
    # Every item is in chunk 0 at once, so the sweep never plans one into a batch.
    assert ctx.store.counts(job.id)["queued"] == 10 and ctx.store.counts(job.id)["pending"] == 0
    assert ctx.store.job_status(job.id) == m.JOB_RUNNING
    assert slices(ctx, job.id) == [(0, 8), (8, 10)]
    assert run_all(ctx, job.id) == {"succeeded": 10, "failed": 0, "cancelled": 0}
    assert images(tmp_path, job.id) == sorted(f"sku-{i}.png" for i in range(10))
    assert recorder(ctx).named(FINALIZE) == [(job.id,)]
    # Spend is what upstream billed, and every hold was settled.
    spend = ctx.store.spend(job.id)
    billed = sim.stats()["sync"]
    assert spend["image_output"] == billed["tokens"]["image_output"]
    assert spend["text_input"] == billed["tokens"]["text_input"]
    assert spend["images"] == billed["images"] == 10
    money = ctx.budgets.spend.job_state(job.id)
    assert money["reserved"] == 0 and money["spent"] == spend["cost:sync"] > 0


def test_a_redelivered_slice_sends_nothing_again(ctx: Context, sim: SimulatorHandle) -> None:
    job = accept(ctx, 3)
    sync.fan_out(ctx, job.id)
    assert sync.run_slice(ctx, job.id, 0, 3)["succeeded"] == 3
    requests = sim.stats()["sync"]["requests"]
    assert sync.run_slice(ctx, job.id, 0, 3) == {"succeeded": 0, "failed": 0, "cancelled": 0}
    assert sim.stats()["sync"]["requests"] == requests
    assert ctx.store.spend(job.id)["images"] == 3


def test_a_moderation_block_fails_its_item_only_and_is_not_retried(
    ctx: Context, tmp_path: Path
) -> None:
    body = job_body(3, mode="sync")
    body["items"][1]["prompt"] = "a forbidden scene"
    spec = parse_job_json(orjson.dumps(body), ctx.catalog, max_items=10)
    job = intake.submit(ctx, spec, "default").job
    sync.fan_out(ctx, job.id)
    assert sync.run_slice(ctx, job.id, 0, 3) == {"succeeded": 2, "failed": 1, "cancelled": 0}
    states = ctx.store.item_states(job.id, [0, 1, 2])
    assert [s.status for s in states if s] == [m.SUCCEEDED, m.FAILED, m.SUCCEEDED]
    (error,) = ctx.store.item_errors(job.id, [1])
    assert error is not None and error["code"] == "moderation_blocked"
    assert error["moderation_details"]["categories"] == ["violence"]
    assert images(tmp_path, job.id) == ["sku-0.png", "sku-2.png"]
    assert upstream_answers(ctx, 400) == 1  # sent once: a block is final
    assert ctx.budgets.spend.job_state(job.id)["reserved"] == 0  # its hold was given back


def test_a_job_cancelled_before_its_slice_runs_sends_nothing(
    ctx: Context, sim: SimulatorHandle
) -> None:
    job = accept(ctx, 5)
    sync.fan_out(ctx, job.id)
    assert ctx.store.set_job_status_if(job.id, [m.JOB_RUNNING], m.JOB_CANCELLING)
    assert sync.run_slice(ctx, job.id, 0, 5) == {"succeeded": 0, "failed": 0, "cancelled": 5}
    assert sim.stats()["sync"]["requests"] == 0
    assert ctx.store.counts(job.id)["cancelled"] == 5
    (error,) = ctx.store.item_errors(job.id, [0])
    assert error is not None and error["code"] == "cancelled"
    assert recorder(ctx).named(FINALIZE) == [(job.id,)]


def test_an_item_over_the_jobs_max_cost_is_not_sent_and_the_job_stops(
    ctx: Context, sim: SimulatorHandle
) -> None:
    job = accept(ctx, 3, max_cost_usd=0.000001)
    sync.fan_out(ctx, job.id)
    assert sync.run_slice(ctx, job.id, 0, 3)["cancelled"] == 3
    assert sim.stats()["sync"]["requests"] == 0
    stopped = ctx.store.job(job.id)
    assert stopped is not None and stopped.budget_exhausted
    (error,) = ctx.store.item_errors(job.id, [0])
    assert error is not None and error["code"] == "budget_exhausted"


def test_a_429_is_waited_out_and_not_counted_as_an_attempt(
    tmp_path: Path, redis_url: str, redis_client: Any
) -> None:
    # Upstream's bucket holds 60 images and refills one every 3 s; the test spends them first,
    # so the lane's request meets a 429 asking it to wait (unless the machine took 3 s between).
    # With one attempt allowed, the item can only succeed if that 429 did not use it up.
    limited = start_simulator(tmp_path / "sim", ipm=20, limit_window=180, plain_images=True)
    ctx = make_context(tmp_path, redis_url, limited.url, max_attempts=1)
    try:
        client = limited.client(max_retries=0)
        for _ in range(6):
            client.images.generate(model="gpt-image-2", prompt="x", n=10, quality="low")
        job = accept(ctx, 1)
        sync.fan_out(ctx, job.id)
        assert sync.run_slice(ctx, job.id, 0, 1) == {"succeeded": 1, "failed": 0, "cancelled": 0}
        assert limited.stats()["sync"]["rate_limited"] >= 1
        assert upstream_answers(ctx, 429) >= 1
        assert ctx.store.spend(job.id)["images"] == 1
    finally:
        ctx.redis.close()
        limited.stop()


def test_a_request_upstream_will_never_accept_fails_instead_of_waiting_forever(
    tmp_path: Path, redis_url: str, redis_client: Any
) -> None:
    # One image costs more tokens than upstream allows in a whole minute: its 429 says
    # x-should-retry: false. Waiting cannot help; the item must fail with upstream's reason.
    tiny = start_simulator(tmp_path / "sim", tpm=50, plain_images=True)
    ctx = make_context(tmp_path, redis_url, tiny.url)
    try:
        job = accept(ctx, 1)
        sync.fan_out(ctx, job.id)
        outcome: dict[str, Any] = {}
        worker = threading.Thread(
            target=lambda: outcome.update(sync.run_slice(ctx, job.id, 0, 1)), daemon=True
        )
        worker.start()
        try:
            wait_until(lambda: not worker.is_alive(), timeout=20, message="the slice to end")
        finally:
            # Let a hung slice give up (it abandons its wait once the job is not running).
            ctx.store.set_job_status_if(job.id, [m.JOB_RUNNING], m.JOB_CANCELLING)
            worker.join(30)
        assert outcome == {"succeeded": 0, "failed": 1, "cancelled": 0}
        (error,) = ctx.store.item_errors(job.id, [0])
        assert error is not None and error["code"] == "rate_limit_exceeded"
        assert "Request too large" in error["message"]
    finally:
        ctx.redis.close()
        tiny.stop()
