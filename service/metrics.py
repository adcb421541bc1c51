"""All of imagebatch's Prometheus metrics: every family is declared here, and nowhere else.

Counts live in Redis, where every worker process on every machine adds to them (:func:`count`,
:func:`observe`, :func:`heartbeat`), and the API reads them at scrape time through
:class:`RedisCollector`; so the figures are right however many processes run, and a restart loses
nothing. Every read at scrape time is bounded: the per-job series cover at most
``IMAGEBATCH_METRICS_MAX_JOBS`` jobs (running, or finished within
``IMAGEBATCH_METRICS_JOB_RETENTION``), and the rest are small hashes with closed label sets.
A scrape also forgets what has gone: jobs past the window leave the per-job index, and worker
heartbeats older than an hour are deleted, so a worker that is gone for good leaves the dashboard.

Failure semantics: a scrape that cannot reach Redis fails as a whole (the API answers 500 and
Prometheus marks the target down) rather than serving partial figures that would read as drops.

Names start with ``imagebatch_``; counters end in ``_total``, durations in ``_seconds``. Adding a
metric: declare its name here (a constant), its help and labels in :data:`COUNTERS` or
:data:`HISTOGRAMS` (written by any process) or as a family the collector builds (read at scrape).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from service.catalog import cached_catalog
from service.exposition import CounterTable
from service.models.lifecycle import ModelView, load_view, utc_today
from service.pricing import KINDS, TIERS
from service.queues import QUEUES
from service.redis import keys, lua
from service.settings import Settings

# --- counters and histograms any process writes ----------------------------------------------
UPSTREAM_REQUESTS = "imagebatch_upstream_requests_total"
UPSTREAM_RATE_LIMITED = "imagebatch_upstream_rate_limited_total"
COLLECT_BYTES = "imagebatch_collect_bytes_total"
SYNC_REQUESTS = "imagebatch_sync_requests_total"
JOBS_FINISHED = "imagebatch_jobs_finished_total"
TASK_DURATION = "imagebatch_task_duration_seconds"
BUDGET_WAIT = "imagebatch_budget_wait_seconds"
# OpenAI's batch webhooks (POST /v1/webhooks/openai): every delivery is received; then verified,
# or rejected (why: "signature" bad, stale or missing; "disabled": no secret set; "too_large");
# a verified one whose webhook-id was already taken is also a duplicate.
OPENAI_WEBHOOKS_RECEIVED = "imagebatch_openai_webhooks_received_total"
OPENAI_WEBHOOKS_VERIFIED = "imagebatch_openai_webhooks_verified_total"
OPENAI_WEBHOOKS_REJECTED = "imagebatch_openai_webhooks_rejected_total"
OPENAI_WEBHOOKS_DUPLICATE = "imagebatch_openai_webhooks_duplicate_total"
ITEMS_REUSED = "imagebatch_items_reused_total"
REUSE_SAVED_USD = "imagebatch_reuse_saved_usd_total"
SCHEDULE_RUNS = "imagebatch_schedule_runs_total"
WEBHOOK_DELIVERIES = "imagebatch_webhook_deliveries_total"
# Graceful handover (service/handover.py): long tasks a shutting-down worker sent again.
TASK_HANDOVERS = "imagebatch_task_handovers_total"
DUPLICATE_BATCHES = "imagebatch_duplicate_batches_total"
DUPLICATE_TOKENS = "imagebatch_duplicate_batch_tokens_total"

# name -> (help, label names)
COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    UPSTREAM_REQUESTS: (
        "Upstream API requests by endpoint and HTTP status.",
        ("endpoint", "status"),
    ),
    UPSTREAM_RATE_LIMITED: ("Upstream 429 answers.", ("endpoint",)),
    COLLECT_BYTES: ("Image bytes collected into storage.", ()),
    SYNC_REQUESTS: ("Sync-lane image requests by outcome.", ("status",)),
    JOBS_FINISHED: ("Jobs finished, by final status.", ("status",)),
    OPENAI_WEBHOOKS_RECEIVED: ("Deliveries to POST /v1/webhooks/openai.", ()),
    OPENAI_WEBHOOKS_VERIFIED: ("OpenAI webhook deliveries whose signature checked out.", ()),
    OPENAI_WEBHOOKS_REJECTED: ("OpenAI webhook deliveries refused, by reason.", ("reason",)),
    OPENAI_WEBHOOKS_DUPLICATE: ("Verified OpenAI webhook deliveries already taken.", ()),
    ITEMS_REUSED: (
        "Items completed by copying an image the tenant already had (no upstream call).",
        ("tenant", "model"),
    ),
    REUSE_SAVED_USD: (
        "USD reused images cost when they were first made: what reuse saved.",
        ("tenant", "model"),
    ),
    SCHEDULE_RUNS: (
        "Schedule slots handled, by outcome (created, skipped, failed).",
        ("outcome",),
    ),
    WEBHOOK_DELIVERIES: (
        "Webhook delivery attempts by outcome: delivered, rejected (a 4xx, final), failed "
        "(retried), timeout (the whole-attempt deadline passed, retried), blocked (a refused "
        "address or no signing secret, final), expired (retries gave up after 24 h).",
        ("outcome",),
    ),
    TASK_HANDOVERS: (
        "Tasks a shutting-down worker stopped at a unit boundary and sent again for another.",
        ("task",),
    ),
    DUPLICATE_BATCHES: (
        "Upstream batches created for a chunk that already had one (an uncertain create): "
        "each is cancelled if still running and its billed tokens are added to its job.",
        ("model",),
    ),
    DUPLICATE_TOKENS: (
        "Tokens upstream billed for duplicate batches (already included in the job totals).",
        ("model", "kind"),
    ),
}
HISTOGRAMS: dict[str, tuple[str, tuple[str, ...]]] = {
    TASK_DURATION: ("Task run time.", ("task",)),
    BUDGET_WAIT: ("Time chunks and sync items waited for budget.", ()),
}
BUCKETS: dict[str, tuple[float, ...]] = {
    # Task durations span a 10 ms sweep to a 20-minute collect of a 50,000-line file.
    TASK_DURATION: (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200),
    # Waiting for budget ranges from nothing to hours when a queue budget is saturated.
    BUDGET_WAIT: (1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 21600),
}

# --- families the collector builds from state at scrape time --------------------------------
JOB_TOKENS = "imagebatch_job_tokens"  # _total
JOB_COST = "imagebatch_job_cost_usd"  # _total
TOKENS = "imagebatch_tokens"  # _total
COST = "imagebatch_cost_usd"  # _total
IMAGES = "imagebatch_images"  # _total
JOBS = "imagebatch_jobs"
ITEMS = "imagebatch_items"
UPSTREAM_BATCHES = "imagebatch_upstream_batches"
UPSTREAM_BATCH_OLDEST_AGE = "imagebatch_upstream_batch_oldest_age_seconds"
UPSTREAM_COMPLETION_WINDOW = "imagebatch_upstream_completion_window_seconds"
QUEUE_DEPTH = "imagebatch_queue_depth"
WORKER_HEARTBEAT = "imagebatch_worker_heartbeat_timestamp_seconds"
BATCH_QUEUE_TOKENS_RESERVED = "imagebatch_batch_queue_tokens_reserved"
BATCH_QUEUE_TOKENS_LIMIT = "imagebatch_batch_queue_tokens_limit"
TENANT_SPEND = "imagebatch_tenant_spend_usd"
TENANT_BUDGET = "imagebatch_tenant_budget_usd"
BUDGET_OLDEST_WAIT = "imagebatch_budget_oldest_wait_seconds"
MODEL_SHUTDOWN = "imagebatch_model_shutdown_timestamp_seconds"
# Forecasts of unfinished jobs (service.jobs.eta, kept by the sweep): when each is expected to
# end, by quantile (0.5, 0.9; absent while there is no history), and each deadline.
JOB_ETA = "imagebatch_job_eta_timestamp_seconds"
JOB_DEADLINE = "imagebatch_job_deadline_timestamp_seconds"

# Worker heartbeats older than this are dropped at scrape time.
HEARTBEAT_RETENTION_SECONDS = 3600.0


# --- writing ---------------------------------------------------------------------------------
def _field(name: str, labels: Mapping[str, str]) -> str:
    return f"{name}|{orjson.dumps(dict(sorted(labels.items()))).decode()}"


def count(
    r: redis.Redis | Any, name: str, labels: Mapping[str, str] | None = None, amount: float = 1
) -> None:
    """Add to a counter shared by every process. ``r`` may be a client or a pipeline."""
    assert name in COUNTERS, name
    r.hincrbyfloat(keys.COUNTERS, _field(name, labels or {}), amount)


def count_upstream(r: redis.Redis, endpoint: str, status: int) -> None:
    """One upstream answer (every attempt counts: upstream counts it too)."""
    with r.pipeline(transaction=False) as pipe:
        count(pipe, UPSTREAM_REQUESTS, {"endpoint": endpoint, "status": str(status)})
        if status == 429:
            count(pipe, UPSTREAM_RATE_LIMITED, {"endpoint": endpoint})
        pipe.execute()


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


@dataclass
class BudgetGauges:
    """The budget layer's figures at scrape time (built by service.budgets.policy)."""

    # (model, tokens reserved, effective limit; 0 = unlimited)
    queue: list[tuple[str, int, int]] = field(default_factory=list)
    # (tenant, period "day" | "month", USD spent and reserved, cap in USD or None)
    tenant_spend: list[tuple[str, str, float, float | None]] = field(default_factory=list)
    oldest_wait_seconds: float = 0.0


# --- scrape-time reads -------------------------------------------------------------------------
# A scrape reads thousands of hash fields. Parsed reply by reply in Python that alone took over
# 60 ms for 1,000 jobs, so the lookups run in Lua scripts inside Redis (scrape_*.lua) that answer
# with one JSON string (cjson, which every Redis ships), parsed in one orjson call. Each call
# covers at most _PAGE ids, so Redis is never held for more than a few milliseconds whatever the
# settings, and workers' commands run between calls. Key prefixes come from service.redis.keys;
# cjson encodes an empty table as {}, read as empty.
_PAGE = 1000
_JOB_PREFIX = keys.job("")
_SPEND_SUFFIX = keys.job_spend("").removeprefix(_JOB_PREFIX)
_COUNTS_SUFFIX = keys.job_counts("").removeprefix(_JOB_PREFIX)
_CHUNK_INFIX = keys.chunk("", "").removeprefix(_JOB_PREFIX)
SPEND_FIELDS = (*KINDS, *(f"cost:{tier}" for tier in TIERS))


def _json_list(raw: bytes) -> list[Any]:
    data = orjson.loads(raw)
    return data if isinstance(data, list) else []  # cjson's {} for an empty table


def _json_dict(raw: Any) -> dict[str, Any]:
    return raw if isinstance(raw, dict) else {}


def _pairs(flat: Any) -> Iterator[tuple[str, str]]:
    if not isinstance(flat, list):
        return iter(())
    return zip(flat[::2], flat[1::2], strict=True)


def _pages(ids: list[str]) -> Iterator[list[str]]:
    for start in range(0, len(ids), _PAGE):
        yield ids[start : start + _PAGE]


def _gauge(name: str, help_: str, rows: Iterable[tuple[str, float]], label: str) -> Metric:
    fam = GaugeMetricFamily(name, help_, labels=(label,))
    for value, n in rows:
        fam.add_metric([value], n)
    return fam


class RedisCollector:
    """Reads every imagebatch series from Redis when Prometheus scrapes."""

    def __init__(
        self,
        r: redis.Redis,
        settings: Settings,
        budget_gauges: Callable[[], BudgetGauges] | None = None,
        models: Callable[[], ModelView] | None = None,
    ):
        self.r, self.settings, self.budget_gauges = r, settings, budget_gauges
        self.models = models or self._models
        self._per_job_script = lua.script(r, "scrape_per_job")
        self._hashes_script = lua.script(r, "scrape_hashes")
        self._active_script = lua.script(r, "scrape_active")
        self._chunks_script = lua.script(r, "scrape_chunks")
        self._heartbeats_script = lua.script(r, "scrape_heartbeats")

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield from self._per_job()
        yield from self._totals()
        yield from self._jobs_and_items()
        yield from self._upstream()
        yield from self._workers()
        yield from self._shared()
        yield from self._forecasts()
        if self.budget_gauges is not None:
            yield from self._budgets(self.budget_gauges())
        yield _gauge(
            MODEL_SHUTDOWN,
            "Unix time a model shuts down (00:00 UTC of its day), from the catalog or upstream, "
            "whichever is earlier.",
            self.models().shutdown_timestamps(),
            "model",
        )

    def _models(self) -> ModelView:
        settings = self.settings
        catalog = cached_catalog(str(settings.catalog_file) if settings.catalog_file else None)
        return load_view(self.r, catalog, utc_today())

    def _per_job(self) -> Iterator[Metric]:
        r, settings = self.r, self.settings
        oldest = time.time() - settings.metrics_job_retention.total_seconds()
        pipe = r.pipeline(transaction=False)
        pipe.zremrangebyscore(keys.METRICS_JOBS, "-inf", f"({oldest!r}")
        # Keep the newest: running jobs score +inf, finished ones their finish time.
        pipe.zremrangebyrank(keys.METRICS_JOBS, 0, -(settings.metrics_max_jobs + 1))
        pipe.zrevrange(keys.METRICS_JOBS, 0, settings.metrics_max_jobs - 1)
        job_ids = [j.decode() for j in pipe.execute()[2]]
        flat: list[Any] = []
        for page in _pages(job_ids):
            flat += _json_list(
                self._per_job_script(
                    args=[_JOB_PREFIX, _SPEND_SUFFIX, len(SPEND_FIELDS), *SPEND_FIELDS, *page],
                    client=r,
                )
            )
        tokens = CounterTable(
            JOB_TOKENS,
            "Tokens a job was billed, by kind.",
            labels=("job_id", "tenant", "model", "kind"),
        )
        cost = CounterTable(
            JOB_COST, "USD a job was billed, by tier.", labels=("job_id", "tenant", "model", "tier")
        )
        stride = 3 + len(SPEND_FIELDS)
        for at in range(0, len(flat), stride):
            job_id, tenant, model = flat[at], flat[at + 1] or "", flat[at + 2] or ""
            spend = flat[at + 3 : at + stride]
            for kind, value in zip(KINDS, spend[: len(KINDS)], strict=True):
                tokens.add_metric([job_id, tenant, model, kind], int(value or 0))
            for tier, value in zip(TIERS, spend[len(KINDS) :], strict=True):
                cost.add_metric([job_id, tenant, model, tier], int(value or 0) / 1e9)
        yield tokens
        yield cost

    def _forecasts(self) -> Iterator[Metric]:
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(keys.JOB_ETAS)
        pipe.smembers(keys.ACTIVE_JOBS)
        entries, active = pipe.execute()
        eta = GaugeMetricFamily(
            JOB_ETA,
            "Unix time an unfinished job is forecast to end by, at even odds (quantile 0.5) "
            "and nine in ten (0.9); absent while there is no history to forecast from.",
            labels=("job_id", "tenant", "quantile"),
        )
        deadline = GaugeMetricFamily(
            JOB_DEADLINE,
            "Unix time an unfinished job must end by, and what it does if it will not.",
            labels=("job_id", "tenant", "on_deadline"),
        )
        gone = [job_id for job_id in entries if job_id not in active]
        if gone:
            self.r.hdel(keys.JOB_ETAS, *gone)  # finished since the sweep forecast them
        for job_id, raw in entries.items():
            if job_id in active:
                entry = _json_dict(orjson.loads(raw))
                name, tenant = job_id.decode(), str(entry.get("tenant") or "")
                for quantile, field_ in (("0.5", "p50"), ("0.9", "p90")):
                    if entry.get(field_) is not None:
                        eta.add_metric([name, tenant, quantile], float(entry[field_]))
                if entry.get("deadline") is not None:
                    policy = str(entry.get("on_deadline") or "wait")
                    deadline.add_metric([name, tenant, policy], float(entry["deadline"]))
        yield eta
        yield deadline

    def _totals(self) -> Iterator[Metric]:
        tok, cost, images = _json_list(
            self._hashes_script(
                keys=[keys.TOTAL_TOKENS, keys.TOTAL_COST, keys.TOTAL_IMAGES], client=self.r
            )
        )
        by_tokens = CounterTable(
            TOKENS,
            "Tokens billed, by tenant, model, kind and tier.",
            labels=("tenant", "model", "kind", "tier"),
        )
        for k, v in _pairs(tok):
            by_tokens.add_metric(k.split("|", 3), int(v))
        yield by_tokens
        by_cost = CounterTable(
            COST,
            "USD billed, by tenant, model, tier and campaign label.",
            labels=("tenant", "model", "tier", "campaign"),
        )
        for k, v in _pairs(cost):
            # The campaign is a caller's label and may itself contain "|": it is the rest.
            by_cost.add_metric(k.split("|", 3), int(v) / 1e9)
        yield by_cost
        by_images = CounterMetricFamily(IMAGES, "Images by outcome.", labels=("model", "status"))
        for k, v in _pairs(images):
            by_images.add_metric(k.split("|"), int(v))
        yield by_images

    def _jobs_and_items(self) -> Iterator[Metric]:
        active = [j.decode() for j in self.r.smembers(keys.ACTIVE_JOBS)]
        jobs: dict[str, int] = {"queued": 0, "running": 0, "cancelling": 0}
        items = dict.fromkeys(("pending", "queued", "succeeded", "failed", "cancelled"), 0)
        for page in _pages(active):
            by_status, by_state = _json_list(
                self._active_script(args=[_JOB_PREFIX, _COUNTS_SUFFIX, *page], client=self.r)
            )
            for status, n in _json_dict(by_status).items():
                jobs[status] = jobs.get(status, 0) + int(n)
            for state, n in _json_dict(by_state).items():
                items[state] = items.get(state, 0) + int(n)
        yield _gauge(JOBS, "Unfinished jobs by status.", jobs.items(), "status")
        yield _gauge(ITEMS, "Items of unfinished jobs by state.", items.items(), "state")

    def _upstream(self) -> Iterator[Metric]:
        chunks = self.r.zrange(keys.ACTIVE_CHUNKS, 0, -1, withscores=True)
        batches: dict[str, int] = {}
        for page in _pages([m.decode() for m, _ in chunks]):
            raw = self._chunks_script(args=[_JOB_PREFIX, _CHUNK_INFIX, *page], client=self.r)
            for status, n in _json_dict(orjson.loads(raw)).items():
                batches[status] = batches.get(status, 0) + int(n)
        yield _gauge(
            UPSTREAM_BATCHES, "Active upstream batches by status.", batches.items(), "status"
        )
        oldest = float(chunks[0][1]) if chunks else None
        yield GaugeMetricFamily(
            UPSTREAM_BATCH_OLDEST_AGE,
            "Age of the oldest active upstream batch.",
            value=(time.time() - oldest) if oldest else 0,
        )
        yield GaugeMetricFamily(
            UPSTREAM_COMPLETION_WINDOW,
            "The completion window asked of upstream.",
            value=_window_seconds(self.settings.completion_window),
        )

    def _workers(self) -> Iterator[Metric]:
        pipe = self.r.pipeline(transaction=False)
        for q in QUEUES:
            pipe.llen(q)
        depths = zip(QUEUES, pipe.execute(), strict=True)
        yield _gauge(QUEUE_DEPTH, "Tasks waiting in each Celery queue.", depths, "queue")
        beats = self._heartbeats_script(
            keys=[keys.HEARTBEATS],
            args=[repr(time.time() - HEARTBEAT_RETENTION_SECONDS)],
            client=self.r,
        )
        yield _gauge(
            WORKER_HEARTBEAT,
            "Unix time of each worker's last heartbeat.",
            ((worker, float(ts)) for worker, ts in _pairs(_json_list(beats))),
            "worker",
        )

    def _shared(self) -> Iterator[Metric]:
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(keys.COUNTERS)
        pipe.hgetall(keys.HISTOGRAMS)
        counters, hists = pipe.execute()
        families = {
            name: CounterMetricFamily(name.removesuffix("_total"), help_, labels=labelnames)
            for name, (help_, labelnames) in COUNTERS.items()
        }
        for field_, value in counters.items():
            name, _, labels_json = field_.decode().partition("|")
            labels = orjson.loads(labels_json)
            if name in families:
                families[name].add_metric(
                    [labels.get(n, "") for n in COUNTERS[name][1]], float(value)
                )
        yield from families.values()
        grouped: dict[tuple[str, str], dict[str, float]] = {}
        for field_, value in hists.items():
            name, labels_json, part = field_.decode().split("|")
            grouped.setdefault((name, labels_json), {})[part] = float(value)
        hfam = {
            name: HistogramMetricFamily(name, help_, labels=labelnames)
            for name, (help_, labelnames) in HISTOGRAMS.items()
        }
        for (name, labels_json), parts in grouped.items():
            if name not in hfam:
                continue
            labels = orjson.loads(labels_json)
            buckets = [(str(b), parts.get(str(b), 0.0)) for b in BUCKETS[name]] + [
                ("+Inf", parts.get("+Inf", 0.0))
            ]
            hfam[name].add_metric(
                [labels.get(n, "") for n in HISTOGRAMS[name][1]], buckets, parts.get("sum", 0.0)
            )
        yield from hfam.values()

    @staticmethod
    def _budgets(gauges: BudgetGauges) -> Iterator[Metric]:
        reserved = GaugeMetricFamily(
            BATCH_QUEUE_TOKENS_RESERVED,
            "Enqueued input tokens held by active batches.",
            labels=("model",),
        )
        limit = GaugeMetricFamily(
            BATCH_QUEUE_TOKENS_LIMIT,
            "Effective enqueued-token budget (0 = unlimited).",
            labels=("model",),
        )
        for model, held, effective in gauges.queue:
            reserved.add_metric([model], held)
            limit.add_metric([model], effective)
        yield reserved
        yield limit
        spend = GaugeMetricFamily(
            TENANT_SPEND,
            "Tenant spend (settled and reserved) this UTC day and month.",
            labels=("tenant", "period"),
        )
        budget = GaugeMetricFamily(TENANT_BUDGET, "Tenant spend caps.", labels=("tenant", "period"))
        for tenant, period, used, cap in gauges.tenant_spend:
            spend.add_metric([tenant, period], used)
            if cap is not None:
                budget.add_metric([tenant, period], cap)
        yield spend
        yield budget
        yield GaugeMetricFamily(
            BUDGET_OLDEST_WAIT,
            "How long the oldest chunk has waited to be submitted.",
            value=gauges.oldest_wait_seconds,
        )


def _window_seconds(window: str) -> float:
    unit = {"h": 3600, "m": 60, "s": 1, "d": 86400}.get(window[-1:], 3600)
    return float(window[:-1]) * unit if window[:-1].replace(".", "").isdigit() else 86400.0


def registry(
    r: redis.Redis,
    settings: Settings,
    budget_gauges: Callable[[], BudgetGauges] | None = None,
    models: Callable[[], ModelView] | None = None,
) -> CollectorRegistry:
    """``models`` gives the lifecycle view (a process's own clock); default: today, UTC."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(RedisCollector(r, settings, budget_gauges, models))
    return reg
