"""Forecasts: the math on its own (samples, quantiles, the queue replay), then samples kept in a
real Redis and a job's forecast read from its chunks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from service.context import Context
from service.jobs import eta
from service.jobs.eta import Queue, Sample, SyncWork, Work, forecast, replay, weighted_quantile
from service.jobs.model import CHUNK_SUBMITTED, CHUNK_WAITING, JOB_RUNNING, Job
from service.redis import keys
from tests.support.context import make_context

NOW = 1_000_000.0
HOUR = 3600.0


def sample(lines: int = 100, seconds: float = 60.0, scaled: float | None = None, age: float = 0):
    return Sample(lines, seconds, seconds if scaled is None else scaled, NOW - age)


# --- samples ---------------------------------------------------------------------------------
def test_a_sample_scales_only_its_per_line_part() -> None:
    s = sample(lines=100, seconds=70, scaled=50)  # 20 s fixed, 0.5 s a line
    assert s.predict(100) == pytest.approx(70)
    assert s.predict(200) == pytest.approx(120)
    assert s.predict(10) == pytest.approx(25)


def test_a_sample_without_upstream_timestamps_scales_whole() -> None:
    assert sample(lines=100, seconds=60).predict(50) == pytest.approx(30)


def test_samples_weigh_half_as_much_every_half_life() -> None:
    assert sample(age=0).weight(NOW, HOUR) == pytest.approx(1)
    assert sample(age=HOUR).weight(NOW, HOUR) == pytest.approx(0.5)
    assert sample(age=3 * HOUR).weight(NOW, HOUR) == pytest.approx(0.125)


def test_weighted_quantile() -> None:
    assert weighted_quantile([3, 1, 2], [1, 1, 1], 0.5) == 2
    assert weighted_quantile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [1] * 10, 0.9) == 9
    # Weight moves the quantile toward the heavy value.
    assert weighted_quantile([10, 20], [1, 9], 0.5) == 20
    with pytest.raises(ValueError):
        weighted_quantile([], [], 0.5)


# --- the replay through the queue --------------------------------------------------------------
def test_unlimited_queue_runs_every_chunk_at_once() -> None:
    works = [Work(100, 1000), Work(100, 1000), Work(50, 500)]
    assert replay(NOW, works, Queue(), sample(100, 60)) == pytest.approx(NOW + 60)


def test_batches_upstream_end_when_their_prediction_says() -> None:
    works = [Work(100, 1000, started=NOW - 40)]
    assert replay(NOW, works, Queue(), sample(100, 60)) == pytest.approx(NOW + 20)
    # Running late: it ends no earlier than now.
    late = [Work(100, 1000, started=NOW - 90)]
    assert replay(NOW, late, Queue(), sample(100, 60)) == pytest.approx(NOW)


def test_the_token_budget_makes_chunks_wait_in_waves() -> None:
    # Room for two chunks at a time: four chunks of 60 s take two waves.
    works = [Work(100, 1000) for _ in range(4)]
    assert replay(NOW, works, Queue(limit=2000), sample(100, 60)) == pytest.approx(NOW + 120)
    # Two already upstream, 30 s in: the waiting two start when they end.
    works = [Work(100, 1000, started=NOW - 30)] * 2 + [Work(100, 1000)] * 2
    assert replay(NOW, works, Queue(limit=2000), sample(100, 60)) == pytest.approx(NOW + 90)


def test_chunks_of_other_jobs_waiting_ahead_go_first() -> None:
    works = [Work(100, 1000)]
    queue = Queue(limit=1000, ahead=((100, 1000), (100, 1000)))
    assert replay(NOW, works, queue, sample(100, 60)) == pytest.approx(NOW + 180)


def test_tokens_other_jobs_hold_are_freed_half_a_batch_from_now() -> None:
    queue = Queue(limit=1000, held_by_others=1000)
    assert replay(NOW, [Work(100, 1000)], queue, sample(100, 60)) == pytest.approx(NOW + 90)


def test_an_oversized_chunk_starts_once_nothing_else_holds_the_queue() -> None:
    works = [Work(100, 5000)]
    assert replay(NOW, works, Queue(limit=1000), sample(100, 60)) == pytest.approx(NOW + 60)


def test_the_creation_limit_spaces_out_batches() -> None:
    # No creation left this hour, one a minute: three chunks start 1, 2 and 3 minutes from now.
    works = [Work(10, 10) for _ in range(3)]
    queue = Queue(creates_left=0, creates_per_hour=60)
    assert replay(NOW, works, queue, sample(10, 5)) == pytest.approx(NOW + 180 + 5)
    # With two creations left, only the third waits.
    queue = Queue(creates_left=2, creates_per_hour=60)
    assert replay(NOW, works, queue, sample(10, 5)) == pytest.approx(NOW + 60 + 5)


# --- the forecast ------------------------------------------------------------------------------
def test_no_history_says_so_instead_of_guessing() -> None:
    got = forecast(NOW, [Work(100, 1000)], Queue(), [], SyncWork(), HOUR)
    assert (got.p50, got.p90, got.basis) == (None, None, "no history")
    assert not got.known


def test_p50_and_p90_come_from_the_samples() -> None:
    history = [sample(100, float(s)) for s in range(10, 110, 10)]  # 10, 20, ... 100 s
    got = forecast(NOW, [Work(100, 1000)], Queue(), history, SyncWork(), HOUR)
    assert got.p50 == pytest.approx(NOW + 50)
    assert got.p90 == pytest.approx(NOW + 90)
    assert got.basis.startswith("10 recent batches")


def test_recent_samples_outweigh_old_ones() -> None:
    # Upstream slowed down: nine fast batches from a day ago, two slow ones now.
    history = [sample(100, 10, age=24 * HOUR)] * 9 + [sample(100, 100)] * 2
    got = forecast(NOW, [Work(100, 1000)], Queue(), history, SyncWork(), HOUR)
    assert got.p50 == pytest.approx(NOW + 100)


def test_sync_work_takes_its_share_of_the_rate() -> None:
    got = forecast(NOW, [], Queue(), [], SyncWork(images=120, per_minute=60), HOUR)
    assert got.p50 == got.p90 == pytest.approx(NOW + 120)
    assert "60 images/min" in got.basis
    # Both lanes at once: the later one decides.
    got = forecast(NOW, [Work(100, 1000)], Queue(), [sample(100, 60)], SyncWork(60, 60), HOUR)
    assert got.p50 == pytest.approx(NOW + 60)


def test_sync_work_without_a_rate_is_not_guessed() -> None:
    got = forecast(NOW, [], Queue(), [], SyncWork(images=10), HOUR)
    assert got.p50 is None and got.basis.startswith("no history")


def test_nothing_left_ends_now() -> None:
    got = forecast(NOW, [], Queue(), [], SyncWork(), HOUR)
    assert got.p50 == got.p90 == NOW


# --- with Redis --------------------------------------------------------------------------------
@pytest.fixture
def ctx(tmp_path: Path, redis_url: str) -> Iterator[Context]:
    redis.Redis.from_url(redis_url).flushdb()
    context = make_context(tmp_path, redis_url, eta_samples=3, batch_max_lines=100)
    yield context
    context.redis.close()


def _batch(status: str = "completed", in_progress: int | None = None, final: int | None = None):
    return SimpleNamespace(status=status, in_progress_at=in_progress, finalizing_at=final)


def _chunk(ctx: Context, job_id: str, **fields: Any) -> int:
    number = ctx.store.new_chunk(job_id, model="gpt-image-2", size="1024x1024", **fields)
    return number


def test_completed_batches_are_kept_newest_first_and_capped(ctx: Context) -> None:
    job = "job_x"
    for seconds in (10, 20, 30, 40):
        n = _chunk(ctx, job, lines=100, submitted_at=NOW - seconds)
        chunk = ctx.store.chunk(job, n)
        assert chunk is not None
        assert eta.record_batch(ctx, chunk, _batch(), now=NOW)  # type: ignore[arg-type]
    kept = eta.samples(ctx, "gpt-image-2", "1024x1024")
    assert [s.seconds for s in kept] == [40, 30, 20]  # capped at IMAGEBATCH_ETA_SAMPLES
    # Another size of the model falls back to the model's samples across sizes.
    assert [s.seconds for s in eta.samples(ctx, "gpt-image-2", "1536x1024")] == [40, 30, 20]
    assert eta.samples(ctx, "gpt-image-1", "1024x1024") == []
    assert ctx.redis.ttl(keys.eta_samples("gpt-image-2", "1024x1024")) > 0


def test_only_completed_batches_teach(ctx: Context) -> None:
    n = _chunk(ctx, "job_y", lines=100, submitted_at=NOW - 10)
    chunk = ctx.store.chunk("job_y", n)
    assert chunk is not None
    for status in ("cancelled", "expired", "failed"):
        assert not eta.record_batch(ctx, chunk, _batch(status), now=NOW)  # type: ignore[arg-type]
    assert eta.samples(ctx, "gpt-image-2", "1024x1024") == []


def test_upstream_timestamps_split_the_fixed_part(ctx: Context) -> None:
    n = _chunk(ctx, "job_z", lines=100, submitted_at=NOW - 70)
    chunk = ctx.store.chunk("job_z", n)
    assert chunk is not None
    batch = _batch(in_progress=int(NOW - 60), final=int(NOW - 10))
    eta.record_batch(ctx, chunk, batch, now=NOW)  # type: ignore[arg-type]
    (kept,) = eta.samples(ctx, "gpt-image-2", "1024x1024")
    assert (kept.seconds, kept.scaled) == (70, 50)


def test_a_batch_counts_from_when_its_chunk_could_first_go_upstream(ctx: Context) -> None:
    # Planned and sent at once: from its plan.
    planned = ctx.store.chunk("job_e", _chunk(ctx, "job_e", created_at=NOW - 50))
    assert planned is not None
    assert eta.eligible_at(ctx, planned, now=NOW) == NOW - 50
    # Waited for the token budget since NOW - 40; the queue had tokens back at NOW - 10.
    waited = ctx.store.chunk("job_e", _chunk(ctx, "job_e", waiting_since=NOW - 40))
    assert waited is not None
    assert eta.eligible_at(ctx, waited, now=NOW) == NOW - 40  # no release seen yet
    released = ctx.store.chunk("job_e", _chunk(ctx, "job_e", lines=1, submitted_at=NOW - 90))
    assert released is not None
    eta.record_batch(ctx, released, _batch("cancelled"), now=NOW - 10)  # any end releases
    assert eta.eligible_at(ctx, waited, now=NOW) == NOW - 10
    # The sample of a batch that waited starts there, not at its submit.
    n = _chunk(ctx, "job_e", lines=4, submitted_at=NOW - 5, eligible_at=NOW - 10)
    done = ctx.store.chunk("job_e", n)
    assert done is not None
    eta.record_batch(ctx, done, _batch(), now=NOW + 20)  # type: ignore[arg-type]
    assert [s.seconds for s in eta.samples(ctx, "gpt-image-2", "1024x1024")] == [30]


def _job(ctx: Context, job_id: str, items: int, mode: str = "batch", **fields: Any) -> Job:
    job = Job(
        id=job_id,
        tenant="default",
        status=JOB_RUNNING,
        model="gpt-image-2",
        mode=mode,
        items=items,
        images=items,
        created_at=NOW,
        estimate={"tokens": {"text_input": 10 * items}},
        **fields,
    )
    ctx.store.create_job(job, (str(i) for i in range(items)))
    return job


def test_a_jobs_forecast_reads_its_chunks_and_pending_items(ctx: Context) -> None:
    job = _job(ctx, "job_f", 250)
    n = _chunk(ctx, job.id, status=CHUNK_SUBMITTED, submitted_at=NOW - 20, est_input_tokens=1000)
    ctx.store.assign(job.id, n, list(range(100)))
    # No sample yet: it says so.
    assert eta.job_eta(ctx, job, NOW).basis == "no history"
    done = _chunk(ctx, "job_done", lines=100, submitted_at=NOW - 60)
    finished = ctx.store.chunk("job_done", done)
    assert finished is not None
    eta.record_batch(ctx, finished, _batch(), now=NOW)  # type: ignore[arg-type]
    got = eta.job_eta(ctx, job, NOW)
    # The batch upstream ends in 40 s; the 150 pending items are two chunks (100 + 50 lines)
    # that start now with no token budget set: 60 s for the 100-line one.
    assert got.p50 == pytest.approx(NOW + 60)
    assert got.known


def test_waiting_chunks_queue_behind_the_token_budget(tmp_path: Path, redis_url: str) -> None:
    redis.Redis.from_url(redis_url).flushdb()
    ctx = make_context(tmp_path, redis_url, batch_queue_tokens=1000, batch_max_lines=100)
    try:
        job = _job(ctx, "job_q", 300)
        for start in (0, 100, 200):
            n = _chunk(ctx, job.id, status=CHUNK_WAITING, est_input_tokens=1000)
            ctx.store.assign(job.id, n, list(range(start, start + 100)))
            ctx.store.mark_waiting(job.id, n)
        done = _chunk(ctx, "job_done", lines=100, submitted_at=NOW - 60)
        finished = ctx.store.chunk("job_done", done)
        assert finished is not None
        eta.record_batch(ctx, finished, _batch(), now=NOW)  # type: ignore[arg-type]
        # One chunk fits the budget at a time: three waves of 60 s.
        assert eta.job_eta(ctx, job, NOW).p50 == pytest.approx(NOW + 180)
    finally:
        ctx.redis.close()


def test_a_sync_job_takes_its_share_of_the_cluster_rate(tmp_path: Path, redis_url: str) -> None:
    redis.Redis.from_url(redis_url).flushdb()
    ctx = make_context(tmp_path, redis_url, sync_images_per_minute=60, sync_rpm=120)
    try:
        first = _job(ctx, "job_s1", 30, mode="sync")
        _job(ctx, "job_s2", 30, mode="sync")
        _job(ctx, "job_b", 30)  # a batch job takes none of it
        got = eta.job_eta(ctx, first, NOW)
        # 60 images a minute (the tighter limit) shared by two sync jobs: 30 items take 60 s.
        assert got.p50 == got.p90 == pytest.approx(NOW + 60)
        assert "30 images/min" in got.basis
    finally:
        ctx.redis.close()
