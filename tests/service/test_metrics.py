"""The /metrics collector over a real Redis: what Prometheus would read after a scrape.

Job state is written the way the service writes it (JobStore, record_usage, metrics.count), then
the registry the API serves is rendered and parsed back with prometheus_client's own parser.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service import exposition, metrics, pricing
from service.catalog import cached_catalog
from service.jobs.model import Job
from service.jobs.store import JobStore
from service.lanes import items
from service.redis import keys
from service.settings import Settings

RETENTION = dt.timedelta(hours=2)
USAGE = {
    "input_tokens": 40,
    "output_tokens": 196,
    "total_tokens": 236,
    "input_tokens_details": {"text_tokens": 28, "image_tokens": 12},
}


@pytest.fixture
def ctx(redis_url: str, redis_client: redis.Redis, tmp_path: Path) -> Iterator[SimpleNamespace]:
    """What the collector and record_usage read: a Redis client, settings, catalog and store."""
    client = redis.Redis.from_url(redis_url)
    yield SimpleNamespace(
        redis=client,
        settings=Settings(
            redis_url=redis_url,
            data_dir=tmp_path,
            metrics_job_retention=RETENTION,
            metrics_max_jobs=5,
        ),
        catalog=cached_catalog(None),
        store=JobStore(client),
    )
    client.close()


def scrape(ctx: SimpleNamespace) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Render /metrics as the API does and parse it: sample name -> sorted labels -> value."""
    text, content_type = exposition.render(metrics.registry(ctx.redis, ctx.settings))
    assert content_type.startswith("text/plain")
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def job_ids(samples: dict[str, dict[tuple[tuple[str, str], ...], float]]) -> set[str]:
    return {dict(k)["job_id"] for k in samples.get("imagebatch_job_tokens_total", {})}


def new_job(ctx: SimpleNamespace, job_id: str, *, tenant: str = "acme", campaign: str = "") -> None:
    job = Job(
        id=job_id,
        tenant=tenant,
        status="running",
        model=ctx.catalog.default_model,
        mode="batch",
        items=3,
        images=3,
        created_at=time.time(),
        labels={"campaign": campaign} if campaign else {},
    )
    ctx.store.create_job(job, ["a", "b", "c"])


def finished(ctx: SimpleNamespace, job_id: str, ago: float) -> None:
    """A job that finished ``ago`` seconds before now."""
    new_job(ctx, job_id)
    ctx.store.finish(job_id, "acme", "succeeded")
    ctx.redis.zadd(keys.METRICS_JOBS, {job_id: time.time() - ago})


def test_finished_jobs_leave_the_per_job_series_after_the_retention_window(
    ctx: SimpleNamespace,
) -> None:
    new_job(ctx, "running-1")
    finished(ctx, "recent", ago=RETENTION.total_seconds() - 600)
    finished(ctx, "expired", ago=RETENTION.total_seconds() + 600)
    assert job_ids(scrape(ctx)) == {"running-1", "recent"}
    # The scrape also dropped the expired job from the index, so it never comes back.
    assert ctx.redis.zscore(keys.METRICS_JOBS, "expired") is None


def test_at_most_max_jobs_are_shown_newest_first_and_running_jobs_always(
    ctx: SimpleNamespace,
) -> None:
    for i in range(3):
        new_job(ctx, f"running-{i}")
    for i in range(6):  # finished-5 is the newest
        finished(ctx, f"finished-{i}", ago=600 - i * 60)
    shown = job_ids(scrape(ctx))
    assert shown == {"running-0", "running-1", "running-2", "finished-5", "finished-4"}
    assert ctx.redis.zcard(keys.METRICS_JOBS) == 5
    # A job finishing now is newer than every other finished job: it stays, still shown.
    ctx.store.finish("running-0", "acme", "succeeded")
    assert job_ids(scrape(ctx)) == shown
    # A new job takes the place of the oldest finished one.
    new_job(ctx, "running-3")
    assert job_ids(scrape(ctx)) == {
        "running-0",
        "running-1",
        "running-2",
        "running-3",
        "finished-5",
    }


def test_spend_recorded_by_collect_reads_back_per_job_and_in_the_totals(
    ctx: SimpleNamespace,
) -> None:
    # A campaign is a caller's label: any string, including the separators and characters the
    # text format must escape.
    campaign = 'spring|sale "2026"\\nline\nnext'
    new_job(ctx, "job-a", campaign=campaign)
    new_job(ctx, "job-b", tenant="globex")
    job_a, job_b = ctx.store.job("job-a"), ctx.store.job("job-b")
    for index in range(3):
        counted, _ = items.record_usage(
            ctx, job_a, 1, index, USAGE, [f"a{index}.png"], tier="batch"
        )
        assert counted
    assert items.record_usage(ctx, job_b, 1, 0, USAGE, ["b.png"], tier="sync")[0]
    # Recorded again (a redelivered collect): nothing moves.
    assert not items.record_usage(ctx, job_a, 1, 0, USAGE, ["a0.png"], tier="batch")[0]

    model = ctx.catalog.get(ctx.catalog.default_model)
    tokens = pricing.usage_tokens(USAGE)
    nano_batch = pricing.cost_nanousd(tokens, model, ctx.catalog, "batch")
    nano_sync = pricing.cost_nanousd(tokens, model, ctx.catalog, "sync")
    s = scrape(ctx)

    job = s["imagebatch_job_tokens_total"]
    for kind, amount in tokens.as_dict().items():
        want = (("job_id", "job-a"), ("kind", kind), ("model", model.id), ("tenant", "acme"))
        assert job[want] == 3 * amount
    cost = s["imagebatch_job_cost_usd_total"]
    assert cost[
        (("job_id", "job-a"), ("model", model.id), ("tenant", "acme"), ("tier", "batch"))
    ] == pytest.approx(3 * nano_batch / 1e9)
    assert (
        cost[(("job_id", "job-a"), ("model", model.id), ("tenant", "acme"), ("tier", "sync"))] == 0
    )
    assert cost[
        (("job_id", "job-b"), ("model", model.id), ("tenant", "globex"), ("tier", "sync"))
    ] == pytest.approx(nano_sync / 1e9)

    totals = s["imagebatch_cost_usd_total"]
    assert totals == {
        (
            ("campaign", campaign),
            ("model", model.id),
            ("tenant", "acme"),
            ("tier", "batch"),
        ): pytest.approx(3 * nano_batch / 1e9),
        (
            ("campaign", ""),
            ("model", model.id),
            ("tenant", "globex"),
            ("tier", "sync"),
        ): pytest.approx(nano_sync / 1e9),
    }
    by_kind = s["imagebatch_tokens_total"]
    assert (
        by_kind[
            (("kind", "image_output"), ("model", model.id), ("tenant", "acme"), ("tier", "batch"))
        ]
        == 3 * tokens.image_output
    )
    assert (
        by_kind[
            (("kind", "text_input"), ("model", model.id), ("tenant", "globex"), ("tier", "sync"))
        ]
        == tokens.text_input
    )
    assert s["imagebatch_images_total"][(("model", model.id), ("status", "succeeded"))] == 4


def test_unfinished_jobs_items_and_upstream_batches_are_summed(ctx: SimpleNamespace) -> None:
    new_job(ctx, "j1")
    new_job(ctx, "j2")
    new_job(ctx, "j3")
    ctx.store.set_job_status_if("j3", ["running"], "cancelling")
    ctx.store.assign("j1", 1, [0, 1])  # two of j1's items go into chunk 1
    started = time.time() - 300
    for job_id, n, status in (
        ("j1", 1, "in_progress"),
        ("j2", 1, "in_progress"),
        ("j2", 2, "finalizing"),
    ):
        ctx.store.update_chunk(job_id, n, upstream_status=status)
        ctx.redis.zadd(keys.ACTIVE_CHUNKS, {f"{job_id}:{n}": started + n})
    ctx.redis.zadd(keys.ACTIVE_CHUNKS, {"j9:4": time.time()})  # its chunk hash is gone
    s = scrape(ctx)
    assert s["imagebatch_jobs"] == {
        (("status", "queued"),): 0,
        (("status", "running"),): 2,
        (("status", "cancelling"),): 1,
    }
    items = {dict(k)["state"]: v for k, v in s["imagebatch_items"].items()}
    assert items == {"pending": 7, "queued": 2, "succeeded": 0, "failed": 0, "cancelled": 0}
    assert s["imagebatch_upstream_batches"] == {
        (("status", "in_progress"),): 2,
        (("status", "finalizing"),): 1,
        (("status", "unknown"),): 1,
    }
    assert s["imagebatch_upstream_batch_oldest_age_seconds"][()] == pytest.approx(299, abs=5)


def _count_in_child(url: str, barrier: Any, times: int) -> None:
    client = redis.Redis.from_url(url)
    barrier.wait(timeout=60)  # both processes increment at the same time
    for _ in range(times):
        metrics.count(
            client, "imagebatch_upstream_requests_total", {"endpoint": "batches", "status": "200"}
        )
        metrics.count(client, "imagebatch_collect_bytes_total", None, 0.5)
    client.close()


def test_counters_from_two_processes_add_up(ctx: SimpleNamespace, redis_url: str) -> None:
    mp = multiprocessing.get_context("spawn")
    barrier = mp.Barrier(2)
    procs = [mp.Process(target=_count_in_child, args=(redis_url, barrier, 400)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    s = scrape(ctx)
    assert (
        s["imagebatch_upstream_requests_total"][(("endpoint", "batches"), ("status", "200"))] == 800
    )
    assert s["imagebatch_collect_bytes_total"][()] == 400


def test_heartbeats_older_than_an_hour_are_dropped(ctx: SimpleNamespace) -> None:
    now = time.time()
    metrics.heartbeat(ctx.redis, "celery@alive")
    ctx.redis.hset(keys.HEARTBEATS, "celery@quiet", now - 3000)  # idle 50 minutes: still shown
    ctx.redis.hset(keys.HEARTBEATS, "celery@gone", now - 3700)
    ctx.redis.hset(keys.HEARTBEATS, "celery@long-gone", now - 30 * 86400)
    beats = {
        dict(k)["worker"]: v
        for k, v in scrape(ctx)["imagebatch_worker_heartbeat_timestamp_seconds"].items()
    }
    assert set(beats) == {"celery@alive", "celery@quiet"}
    assert beats["celery@quiet"] == pytest.approx(now - 3000)
    # Dropped from Redis too, so the hash does not grow with every worker that ever ran.
    assert set(ctx.redis.hkeys(keys.HEARTBEATS)) == {b"celery@alive", b"celery@quiet"}
    # A worker that comes back shows again.
    metrics.heartbeat(ctx.redis, "celery@gone")
    assert "celery@gone" in {
        dict(k)["worker"] for k in scrape(ctx)["imagebatch_worker_heartbeat_timestamp_seconds"]
    }


def test_render_writes_what_prometheus_client_writes(ctx: SimpleNamespace) -> None:
    new_job(ctx, "job-a", campaign='a "quoted"\\ campaign\nwith a newline')
    job = ctx.store.job("job-a")
    for index in range(3):
        items.record_usage(ctx, job, 1, index, USAGE, ["x.png"], tier="batch")
    finished(ctx, "job-b", ago=60)
    big = {**USAGE, "output_tokens": 12_345_678}  # Go writes it as 1.2345678e+07
    items.record_usage(ctx, ctx.store.job("job-b"), 1, 0, big, ["y.png"], tier="sync")
    metrics.count(ctx.redis, "imagebatch_jobs_finished_total", {"status": "succeeded"}, 3)
    for seconds in (0.02, 3.0, 700.0, 5000.0):
        metrics.observe(
            ctx.redis, "imagebatch_task_duration_seconds", seconds, {"task": "batches.collect"}
        )
    metrics.heartbeat(ctx.redis, 'celery@host "1"')
    registry = metrics.registry(ctx.redis, ctx.settings)
    text, _ = exposition.render(registry)
    assert text == generate_latest(registry)
    assert b"1.2345678e+07" in text


def test_a_scrape_without_redis_fails_instead_of_showing_zeros(ctx: SimpleNamespace) -> None:
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from tests.support.procs import free_port

    client = redis.Redis(port=free_port(), retry=Retry(NoBackoff(), 0))
    with pytest.raises(redis.ConnectionError):
        exposition.render(metrics.registry(client, ctx.settings))
