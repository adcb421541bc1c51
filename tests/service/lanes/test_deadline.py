"""The sweep's deadline step, called directly: a real Redis, local storage and a simulator whose
batches are slow, with the broker replaced by a recorder so each step is run by hand.

The forecast decides here (history seeded as collect would record it): a job whose p90 is past
its deadline leaves the batch lane at once, before the clock would say so.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from service import metrics
from service.catalog import cached_catalog
from service.context import Context
from service.exposition import render
from service.jobs import eta, intake, views
from service.jobs import model as js
from service.jobs.spec import parse_job_json
from service.lanes import deadline, plan, submit, sync
from service.pricing import estimate_job
from service.queues import CANCEL, SYNC_ITEMS
from service.redis import keys
from tests.support.context import make_context, recorder
from tests.support.simulator import SimulatorHandle, start_simulator


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimulatorHandle]:
    # Slow batches: an image every 10 s, so a batch stays in progress through a test.
    handle = start_simulator(
        tmp_path_factory.mktemp("sim"), rate=0.1, validate_seconds=0, finalize_seconds=0
    )
    yield handle
    handle.stop()


def job_body(n: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": "gpt-image-2",
        "defaults": {"size": "1024x1024", "quality": "low"},
        "items": [{"id": f"sku-{i}", "prompt": f"Studio photo of product {i}"} for i in range(n)],
        **extra,
    }


def chunk_tokens() -> int:
    """Input tokens of a 4-item chunk (every item's prompt is as long)."""
    catalog = cached_catalog()
    spec = parse_job_json(orjson.dumps(job_body(4)), catalog, max_items=4)
    tokens = estimate_job(spec.items, catalog).tokens
    return tokens.text_input + tokens.image_input


@pytest.fixture
def ctx(tmp_path: Path, redis_url: str, sim: SimulatorHandle) -> Iterator[Context]:
    redis.Redis.from_url(redis_url).flushdb()
    context = make_context(
        tmp_path,
        redis_url,
        sim.url,
        batch_max_lines=4,
        deadline_margin_seconds=30,
        # Room for one chunk at a time: the second one waits.
        batch_queue_tokens=chunk_tokens(),
    )
    yield context
    context.redis.close()


def rfc3339(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat().replace("+00:00", "Z")


def accept(ctx: Context, n: int, **extra: Any) -> js.Job:
    body = job_body(n, **extra)
    job_id = intake.submit_body(ctx, "default", orjson.dumps(body), "application/json", {}).job.id
    for number in plan.plan_job(ctx, job_id):
        submit.submit_chunk(ctx, job_id, number)
    job = ctx.store.job(job_id)
    assert job is not None
    return job


def seed_history(ctx: Context, seconds: float) -> None:
    """Three completed 4-line batches that took ``seconds`` each, as collect records them."""
    for _ in range(3):
        chunk = SimpleNamespace(
            model="gpt-image-2",
            size="1024x1024",
            lines=4,
            submitted_at=time.time() - seconds,
            eligible_at=None,
        )
        batch = SimpleNamespace(status="completed", in_progress_at=None, finalizing_at=None)
        assert eta.record_batch(ctx, chunk, batch)  # type: ignore[arg-type]


def chunk_statuses(ctx: Context, job_id: str) -> list[str]:
    return [c.status for c in ctx.store.job_chunks(job_id) if c.number != sync.SYNC_CHUNK]


def test_a_forecast_past_the_deadline_sends_the_job_to_the_sync_lane(ctx: Context) -> None:
    seed_history(ctx, 300)  # a batch takes 5 minutes
    job = accept(ctx, 8, deadline=rfc3339(time.time() + 600), on_deadline="sync")
    assert chunk_statuses(ctx, job.id) == [js.CHUNK_SUBMITTED, js.CHUNK_WAITING]
    # Two waves of 5 minutes and a 30 s margin: past a deadline 10 minutes away.
    view = views.job_view(ctx, job)
    assert view["eta"]["misses_deadline"] is True
    assert view["eta"]["p90_seconds"] == pytest.approx(600, abs=30)

    assert deadline.check(ctx, job) == "sync"
    after = ctx.store.job(job.id)
    assert after is not None and after.mode == "sync" and after.lane_reason == "deadline"
    sync_chunk, submitted, waiting = ctx.store.job_chunks(job.id)
    assert sync_chunk.number == sync.SYNC_CHUNK and sync_chunk.open == 4
    # The waiting chunk went through the reroute path: its items are queued on the sync lane.
    assert waiting.status == js.CHUNK_DONE and waiting.last_error == "deadline"
    states = ctx.store.item_states(job.id, list(range(8)))
    assert {s.chunk for s in states[4:] if s} == {sync.SYNC_CHUNK}
    # The upstream batch was asked to cancel, once.
    assert submitted.last_error == deadline.CANCEL_ASKED
    assert deadline.check(ctx, after) is None
    assert (job.id,) in recorder(ctx).named(SYNC_ITEMS)
    # A submit that comes late (redelivered) finds the job gone from the batch lane.
    assert submit.submit_chunk(ctx, job.id, waiting.number) == "skipped"
    assert views.job_view(ctx, after)["lanes"]["sync"]["reason"] == "deadline"


def test_a_job_that_will_make_it_stays_on_the_batch_lane(ctx: Context) -> None:
    seed_history(ctx, 60)
    job = accept(ctx, 4, deadline=rfc3339(time.time() + 3600), on_deadline="sync")
    assert deadline.check(ctx, job) is None
    assert ctx.store.job_mode(job.id) == "batch"
    assert views.job_view(ctx, job)["eta"]["misses_deadline"] is False


def test_wait_only_reports_and_metrics_show_the_forecast(ctx: Context) -> None:
    seed_history(ctx, 300)
    when = time.time() + 120
    job = accept(ctx, 4, deadline=rfc3339(when))
    assert job.on_deadline == "wait"
    assert deadline.check(ctx, job) is None
    assert ctx.store.job_mode(job.id) == "batch"
    registry = metrics.registry(ctx.redis, ctx.settings)
    text = render(registry)[0].decode()
    samples = {
        (s.name, s.labels.get("quantile"), s.labels.get("on_deadline")): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.labels.get("job_id") == job.id
    }
    assert samples[(metrics.JOB_DEADLINE, None, "wait")] == pytest.approx(when, abs=1e-3)
    p90 = samples[(metrics.JOB_ETA, "0.9", None)]
    assert p90 > when  # the alert's condition: forecast to miss
    # A finished job leaves the forecasts at the next scrape.
    ctx.redis.srem(keys.ACTIVE_JOBS, job.id)
    render(registry)
    assert not ctx.redis.hexists(keys.JOB_ETAS, job.id)


def test_cancel_waits_for_the_deadline_itself(ctx: Context) -> None:
    job = accept(ctx, 4, deadline=rfc3339(time.time() + 60), on_deadline="cancel")
    assert deadline.check(ctx, job) is None  # no history, and not yet
    assert deadline.check(ctx, job, now=time.time() + 61) == "cancelled"
    after = ctx.store.job(job.id)
    assert after is not None and after.status == js.JOB_CANCELLING
    assert after.reason == "cancelled at its deadline"
    assert (job.id,) in recorder(ctx).named(CANCEL)
