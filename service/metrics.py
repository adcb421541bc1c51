"""All of imagebatch's Prometheus metrics, in one module.

Counts live in Redis, where every worker process on every machine adds to them, and the API
reads them at scrape time through a custom collector; so the figures are right however many
processes run, and a restart loses nothing. Every read at scrape time is bounded: the per-job
series cover at most ``IMAGEBATCH_METRICS_MAX_JOBS`` jobs (running, or finished within
``IMAGEBATCH_METRICS_JOB_RETENTION``), and the rest are small hashes with closed label sets.

Names start with ``imagebatch_``; counters end in ``_total``, durations in ``_seconds``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import orjson
import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from service import keys
from service.queues import QUEUES

KINDS = ("text_input", "image_input", "image_output", "text_output")
TIERS = ("batch", "sync")

# Task durations span a 10 ms sweep to a 20-minute collect of a 50,000-line file.
TASK_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200)
# Waiting for budget ranges from nothing to hours when a queue budget is saturated.
WAIT_BUCKETS = (1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 21600)
BUCKETS: dict[str, tuple[float, ...]] = {
    "imagebatch_task_duration_seconds": TASK_BUCKETS,
    "imagebatch_budget_wait_seconds": WAIT_BUCKETS,
}

# Counters any process increments: name -> (help, label names).
COUNTER_HELP: dict[str, tuple[str, tuple[str, ...]]] = {
    "imagebatch_upstream_requests_total": (
        "Upstream API requests by endpoint and HTTP status.",
        ("endpoint", "status"),
    ),
    "imagebatch_upstream_rate_limited_total": ("Upstream 429 answers.", ("endpoint",)),
    "imagebatch_collect_bytes_total": ("Image bytes collected into storage.", ()),
    "imagebatch_sync_requests_total": ("Sync-lane image requests by outcome.", ("status",)),
    "imagebatch_jobs_finished_total": ("Jobs finished, by final status.", ("status",)),
}
HISTOGRAM_HELP: dict[str, tuple[str, tuple[str, ...]]] = {
    "imagebatch_task_duration_seconds": ("Task run time.", ("task",)),
    "imagebatch_budget_wait_seconds": ("Time chunks and sync items waited for budget.", ()),
}


def _field(name: str, labels: Mapping[str, str]) -> str:
    return f"{name}|{orjson.dumps(dict(sorted(labels.items()))).decode()}"


def count(
    r: redis.Redis | Any, name: str, labels: Mapping[str, str] | None = None, amount: float = 1
) -> None:
    """Add to a counter shared by every process. ``r`` may be a client or a pipeline."""
    assert name in COUNTER_HELP, name
    r.hincrbyfloat(keys.COUNTERS, _field(name, labels or {}), amount)


def observe(
    r: redis.Redis, name: str, value: float, labels: Mapping[str, str] | None = None
) -> None:
    """Record one observation in a histogram shared by every process."""
    base = _field(name, labels or {})
    pipe = r.pipeline(transaction=False)
    for bound in BUCKETS[name]:
        if value <= bound:
            pipe.hincrby(keys.HISTOGRAMS, f"{base}|{bound}", 1)
    pipe.hincrby(keys.HISTOGRAMS, f"{base}|+Inf", 1)
    pipe.hincrbyfloat(keys.HISTOGRAMS, f"{base}|sum", value)
    pipe.execute()


def heartbeat(r: redis.Redis, worker: str) -> None:
    r.hset(keys.HEARTBEATS, worker, time.time())


class RedisCollector:
    """Reads every imagebatch series from Redis when Prometheus scrapes."""

    def __init__(self, ctx: Any):
        self.ctx = ctx

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        r: redis.Redis = self.ctx.redis
        settings = self.ctx.settings
        yield from self._per_job(r, settings)
        yield from self._totals(r)
        yield from self._operations(r)
        yield from self._shared(r)
        budgets = getattr(self.ctx, "budgets", None)
        if budgets is not None:
            yield from budgets.metrics()

    def _per_job(self, r: redis.Redis, settings: Any) -> Iterator[Metric]:
        now = time.time()
        retention = settings.metrics_job_retention.total_seconds()
        pipe = r.pipeline(transaction=False)
        pipe.zremrangebyscore(keys.METRICS_JOBS, "-inf", f"({now - retention}")
        # Keep the newest: running jobs score +inf, finished ones their finish time.
        pipe.zremrangebyrank(keys.METRICS_JOBS, 0, -(settings.metrics_max_jobs + 1))
        pipe.zrevrange(keys.METRICS_JOBS, 0, settings.metrics_max_jobs - 1)
        job_ids = [j.decode() for j in pipe.execute()[2]]
        pipe = r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(keys.job(job_id), "tenant", "model")
            pipe.hgetall(keys.job_spend(job_id))
        raw = pipe.execute()
        tokens = CounterMetricFamily(
            "imagebatch_job_tokens",
            "Tokens a job was billed, by kind.",
            labels=("job_id", "tenant", "model", "kind"),
        )
        cost = CounterMetricFamily(
            "imagebatch_job_cost_usd",
            "USD a job was billed, by tier.",
            labels=("job_id", "tenant", "model", "tier"),
        )
        for i, job_id in enumerate(job_ids):
            tenant, model = (v.decode() if v else "" for v in raw[2 * i])
            spend = {k.decode(): int(v) for k, v in raw[2 * i + 1].items()}
            for kind in KINDS:
                tokens.add_metric([job_id, tenant, model, kind], spend.get(kind, 0))
            for tier in TIERS:
                cost.add_metric([job_id, tenant, model, tier], spend.get(f"cost:{tier}", 0) / 1e9)
        yield tokens
        yield cost

    def _totals(self, r: redis.Redis) -> Iterator[Metric]:
        pipe = r.pipeline(transaction=False)
        pipe.hgetall(keys.TOTAL_TOKENS)
        pipe.hgetall(keys.TOTAL_COST)
        pipe.hgetall(keys.TOTAL_IMAGES)
        tok, cost, images = pipe.execute()
        fam = CounterMetricFamily(
            "imagebatch_tokens",
            "Tokens billed, by tenant, model, kind and tier.",
            labels=("tenant", "model", "kind", "tier"),
        )
        for k, v in tok.items():
            fam.add_metric(k.decode().split("|"), int(v))
        yield fam
        fam = CounterMetricFamily(
            "imagebatch_cost_usd",
            "USD billed, by tenant, model, tier and campaign label.",
            labels=("tenant", "model", "tier", "campaign"),
        )
        for k, v in cost.items():
            fam.add_metric(k.decode().split("|"), int(v) / 1e9)
        yield fam
        fam = CounterMetricFamily(
            "imagebatch_images", "Images by outcome.", labels=("model", "status")
        )
        for k, v in images.items():
            fam.add_metric(k.decode().split("|"), int(v))
        yield fam

    def _operations(self, r: redis.Redis) -> Iterator[Metric]:
        active = [j.decode() for j in r.smembers(keys.ACTIVE_JOBS)]
        pipe = r.pipeline(transaction=False)
        for job_id in active:
            pipe.hget(keys.job(job_id), "status")
            pipe.hgetall(keys.job_counts(job_id))
        raw = pipe.execute()
        jobs: dict[str, int] = {"queued": 0, "running": 0, "cancelling": 0}
        items: dict[str, int] = {
            s: 0 for s in ("pending", "queued", "succeeded", "failed", "cancelled")
        }
        for i in range(len(active)):
            status = raw[2 * i].decode() if raw[2 * i] else "unknown"
            jobs[status] = jobs.get(status, 0) + 1
            for k, v in raw[2 * i + 1].items():
                items[k.decode()] = items.get(k.decode(), 0) + int(v)
        fam = GaugeMetricFamily("imagebatch_jobs", "Unfinished jobs by status.", labels=("status",))
        for status, n in jobs.items():
            fam.add_metric([status], n)
        yield fam
        fam = GaugeMetricFamily(
            "imagebatch_items", "Items of unfinished jobs by state.", labels=("state",)
        )
        for state, n in items.items():
            fam.add_metric([state], n)
        yield fam

        chunks = r.zrange(keys.ACTIVE_CHUNKS, 0, -1, withscores=True)
        pipe = r.pipeline(transaction=False)
        for member, _ in chunks:
            job_id, _, n = member.decode().rpartition(":")
            pipe.hget(keys.chunk(job_id, n), "upstream_status")
        statuses = pipe.execute()
        by_status: dict[str, int] = {}
        for s in statuses:
            name = s.decode() if s else "unknown"
            by_status[name] = by_status.get(name, 0) + 1
        fam = GaugeMetricFamily(
            "imagebatch_upstream_batches", "Active upstream batches by status.", labels=("status",)
        )
        for status, n in by_status.items():
            fam.add_metric([status], n)
        yield fam
        oldest = min((score for _, score in chunks), default=None)
        yield GaugeMetricFamily(
            "imagebatch_upstream_batch_oldest_age_seconds",
            "Age of the oldest active upstream batch.",
            value=(time.time() - oldest) if oldest else 0,
        )
        yield GaugeMetricFamily(
            "imagebatch_upstream_completion_window_seconds",
            "The completion window asked of upstream.",
            value=_window_seconds(self.ctx.settings.completion_window),
        )
        fam = GaugeMetricFamily(
            "imagebatch_queue_depth", "Tasks waiting in each Celery queue.", labels=("queue",)
        )
        pipe = r.pipeline(transaction=False)
        for q in QUEUES:
            pipe.llen(q)
        for q, n in zip(QUEUES, pipe.execute(), strict=True):
            fam.add_metric([q], n)
        yield fam
        fam = GaugeMetricFamily(
            "imagebatch_worker_heartbeat_timestamp_seconds",
            "Unix time of each worker's last heartbeat.",
            labels=("worker",),
        )
        for worker, ts in r.hgetall(keys.HEARTBEATS).items():
            fam.add_metric([worker.decode()], float(ts))
        yield fam

    def _shared(self, r: redis.Redis) -> Iterator[Metric]:
        pipe = r.pipeline(transaction=False)
        pipe.hgetall(keys.COUNTERS)
        pipe.hgetall(keys.HISTOGRAMS)
        counters, hists = pipe.execute()
        families: dict[str, CounterMetricFamily] = {}
        for name, (help_, labelnames) in COUNTER_HELP.items():
            families[name] = CounterMetricFamily(
                name.removesuffix("_total"), help_, labels=labelnames
            )
        for field, value in counters.items():
            name, _, labels_json = field.decode().partition("|")
            labels = orjson.loads(labels_json)
            if name in families:
                families[name].add_metric(
                    [labels.get(n, "") for n in COUNTER_HELP[name][1]], float(value)
                )
        yield from families.values()
        grouped: dict[tuple[str, str], dict[str, float]] = {}
        for field, value in hists.items():
            name, labels_json, part = field.decode().split("|")
            grouped.setdefault((name, labels_json), {})[part] = float(value)
        hfam = {
            name: HistogramMetricFamily(name, help_, labels=labelnames)
            for name, (help_, labelnames) in HISTOGRAM_HELP.items()
        }
        for (name, labels_json), parts in grouped.items():
            if name not in hfam:
                continue
            labels = orjson.loads(labels_json)
            buckets = [(str(b), parts.get(str(b), 0.0)) for b in BUCKETS[name]] + [
                ("+Inf", parts.get("+Inf", 0.0))
            ]
            hfam[name].add_metric(
                [labels.get(n, "") for n in HISTOGRAM_HELP[name][1]], buckets, parts.get("sum", 0.0)
            )
        yield from hfam.values()


def _window_seconds(window: str) -> float:
    unit = {"h": 3600, "m": 60, "s": 1, "d": 86400}.get(window[-1:], 3600)
    return float(window[:-1]) * unit if window[:-1].replace(".", "").isdigit() else 86400.0


def registry(ctx: Any) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(RedisCollector(ctx))  # type: ignore[arg-type]
    return reg


def render(reg: CollectorRegistry) -> tuple[bytes, str]:
    return generate_latest(reg), CONTENT_TYPE_LATEST
