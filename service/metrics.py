"""All of imagebatch's Prometheus metrics, in one module.

Counts live in Redis, where every worker process on every machine adds to them, and the API
reads them at scrape time through a custom collector; so the figures are right however many
processes run, and a restart loses nothing. Every read at scrape time is bounded: the per-job
series cover at most ``IMAGEBATCH_METRICS_MAX_JOBS`` jobs (running, or finished within
``IMAGEBATCH_METRICS_JOB_RETENTION``), and the rest are small hashes with closed label sets.
A scrape also forgets what has gone: jobs past the window leave the per-job index, and worker
heartbeats older than an hour are deleted, so a worker that is gone for good leaves the dashboard.

Failure semantics: a scrape that cannot reach Redis fails as a whole (the API answers 500 and
Prometheus marks the target down) rather than serving partial figures that would read as drops.

Names start with ``imagebatch_``; counters end in ``_total``, durations in ``_seconds``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
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
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from service.queues import QUEUES
from service.redis import keys

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


# --- scrape-time reads -------------------------------------------------------------------------
# A scrape reads thousands of hash fields. Parsed reply by reply in Python (redis-py without
# hiredis) that alone took over 60 ms for 1,000 jobs, so the lookups run in Lua scripts inside
# Redis that answer with one JSON string (cjson, which every Redis ships), parsed in one orjson
# call. Each call covers at most _PAGE ids, so Redis is never held for more than a few
# milliseconds whatever the settings, and workers' commands run between calls. Keys are built
# from prefixes taken from service.keys; cjson encodes an empty table as {}, read as empty.

_PAGE = 1000
_JOB_PREFIX = keys.job("")
_SPEND_SUFFIX = keys.job_spend("").removeprefix(_JOB_PREFIX)
_COUNTS_SUFFIX = keys.job_counts("").removeprefix(_JOB_PREFIX)
_CHUNK_INFIX = keys.chunk("", "").removeprefix(_JOB_PREFIX)
SPEND_FIELDS = (*KINDS, *(f"cost:{tier}" for tier in TIERS))

# What the per-job series need. ARGV: job key prefix, spend key suffix, number of spend fields,
# the spend fields, then job ids. Returns JSON [job_id, tenant, model, spend..., job_id, ...]
# with false for a missing field.
_PER_JOB = """
local nf = tonumber(ARGV[3])
local fields = {}
for i = 1, nf do fields[i] = ARGV[3 + i] end
local out = {}
for i = 4 + nf, #ARGV do
  local id = ARGV[i]
  local job = redis.call('HMGET', ARGV[1] .. id, 'tenant', 'model')
  out[#out + 1] = id
  out[#out + 1] = job[1]
  out[#out + 1] = job[2]
  local spend = redis.call('HMGET', ARGV[1] .. id .. ARGV[2], unpack(fields))
  for f = 1, nf do out[#out + 1] = spend[f] end
end
return cjson.encode(out)
"""

# Whole hashes as one JSON array of [field, value, ...] lists. KEYS: the hashes.
_HASHES = """
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('HGETALL', key) end
return cjson.encode(out)
"""

# Jobs by status and their items by state, summed inside Redis. ARGV: job key prefix, counts
# key suffix, then job ids. Returns JSON [{status: jobs}, {state: items}].
_ACTIVE = """
local jobs, items = {}, {}
for i = 3, #ARGV do
  local st = redis.call('HGET', ARGV[1] .. ARGV[i], 'status') or 'unknown'
  jobs[st] = (jobs[st] or 0) + 1
  local c = redis.call('HGETALL', ARGV[1] .. ARGV[i] .. ARGV[2])
  for f = 1, #c, 2 do items[c[f]] = (items[c[f]] or 0) + tonumber(c[f + 1]) end
end
return cjson.encode({jobs, items})
"""

# Upstream batches by upstream status. ARGV: job key prefix, chunk key infix, then
# "job_id:chunk" members of ACTIVE_CHUNKS. Returns JSON {status: batches}.
_CHUNKS = """
local by = {}
for i = 3, #ARGV do
  local _, _, job, n = string.find(ARGV[i], '^(.*):([^:]*)$')
  local st = job and redis.call('HGET', ARGV[1] .. job .. ARGV[2] .. n, 'upstream_status')
  st = st or 'unknown'
  by[st] = (by[st] or 0) + 1
end
return cjson.encode(by)
"""

# Worker heartbeats, dropping those older than the cutoff: a worker that stopped for good
# would otherwise stay on the dashboard forever. Atomic, so a worker beating at the same moment
# is never dropped. KEYS: HEARTBEATS. ARGV: cutoff. Returns JSON [worker, time, ...].
_HEARTBEATS = """
local out = {}
local rows = redis.call('HGETALL', KEYS[1])
for i = 1, #rows, 2 do
  if tonumber(rows[i + 1]) < tonumber(ARGV[1]) then redis.call('HDEL', KEYS[1], rows[i])
  else out[#out + 1] = rows[i]; out[#out + 1] = rows[i + 1] end
end
return cjson.encode(out)
"""

# Worker heartbeats older than this are dropped at scrape time.
HEARTBEAT_RETENTION_SECONDS = 3600.0


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


class RedisCollector:
    """Reads every imagebatch series from Redis when Prometheus scrapes."""

    def __init__(self, ctx: Any):
        self.ctx = ctx
        r: redis.Redis = ctx.redis
        self._per_job_script = r.register_script(_PER_JOB)
        self._hashes_script = r.register_script(_HASHES)
        self._active_script = r.register_script(_ACTIVE)
        self._chunks_script = r.register_script(_CHUNKS)
        self._heartbeats_script = r.register_script(_HEARTBEATS)

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
        tokens = _CounterTable(
            "imagebatch_job_tokens",
            "Tokens a job was billed, by kind.",
            labels=("job_id", "tenant", "model", "kind"),
        )
        cost = _CounterTable(
            "imagebatch_job_cost_usd",
            "USD a job was billed, by tier.",
            labels=("job_id", "tenant", "model", "tier"),
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

    def _totals(self, r: redis.Redis) -> Iterator[Metric]:
        tok, cost, images = _json_list(
            self._hashes_script(
                keys=[keys.TOTAL_TOKENS, keys.TOTAL_COST, keys.TOTAL_IMAGES], client=r
            )
        )
        by_tokens = _CounterTable(
            "imagebatch_tokens",
            "Tokens billed, by tenant, model, kind and tier.",
            labels=("tenant", "model", "kind", "tier"),
        )
        for k, v in _pairs(tok):
            by_tokens.add_metric(k.split("|", 3), int(v))
        yield by_tokens
        by_cost = _CounterTable(
            "imagebatch_cost_usd",
            "USD billed, by tenant, model, tier and campaign label.",
            labels=("tenant", "model", "tier", "campaign"),
        )
        for k, v in _pairs(cost):
            # The campaign is a caller's label and may itself contain "|": it is the rest.
            by_cost.add_metric(k.split("|", 3), int(v) / 1e9)
        yield by_cost
        by_images = CounterMetricFamily(
            "imagebatch_images", "Images by outcome.", labels=("model", "status")
        )
        for k, v in _pairs(images):
            by_images.add_metric(k.split("|"), int(v))
        yield by_images

    def _operations(self, r: redis.Redis) -> Iterator[Metric]:
        active = [j.decode() for j in r.smembers(keys.ACTIVE_JOBS)]
        jobs: dict[str, int] = {"queued": 0, "running": 0, "cancelling": 0}
        items: dict[str, int] = {
            s: 0 for s in ("pending", "queued", "succeeded", "failed", "cancelled")
        }
        for page in _pages(active):
            by_status, by_state = _json_list(
                self._active_script(args=[_JOB_PREFIX, _COUNTS_SUFFIX, *page], client=r)
            )
            for status, n in _json_dict(by_status).items():
                jobs[status] = jobs.get(status, 0) + int(n)
            for state, n in _json_dict(by_state).items():
                items[state] = items.get(state, 0) + int(n)
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
        batches: dict[str, int] = {}
        for page in _pages([m.decode() for m, _ in chunks]):
            raw = self._chunks_script(args=[_JOB_PREFIX, _CHUNK_INFIX, *page], client=r)
            for status, n in _json_dict(orjson.loads(raw)).items():
                batches[status] = batches.get(status, 0) + int(n)
        fam = GaugeMetricFamily(
            "imagebatch_upstream_batches", "Active upstream batches by status.", labels=("status",)
        )
        for status, n in batches.items():
            fam.add_metric([status], n)
        yield fam
        oldest = float(chunks[0][1]) if chunks else None
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
        beats = self._heartbeats_script(
            keys=[keys.HEARTBEATS],
            args=[repr(time.time() - HEARTBEAT_RETENTION_SECONDS)],
            client=r,
        )
        for worker, ts in _pairs(_json_list(beats)):
            fam.add_metric([worker], float(ts))
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
    reg.register(RedisCollector(ctx))
    return reg


# --- writing the text format ----------------------------------------------------------------
# prometheus_client's generate_latest took about 6 µs a sample, most of it re-checking the same
# few label names on each of 13,000 samples; _text() checks them once per label set. It writes
# exactly what generate_latest writes (tests/service/test_metrics.py compares the two byte for
# byte) and hands anything outside what this module produces (other metric types, timestamps,
# _created samples, unusual names) to generate_latest.
_TYPES = {"counter", "gauge", "histogram"}
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


class _Unusual(Exception):
    """A metric render() leaves to prometheus_client."""


class _CounterTable(CounterMetricFamily):
    """A counter family kept as one flat list of label values and values.

    For the per-job and total series: CounterMetricFamily keeps a Sample with its own labels dict
    per series, and 13,000 of those cost about 11 ms a scrape and, held until the scrape ends,
    enough live objects to run Python's full garbage collection every few scrapes (45 ms each in
    the API process). Strings in one list are not tracked by the collector at all. render()
    writes the list straight out; ``samples`` is still there for any other reader of the
    registry, built when read.
    """

    def __init__(self, name: str, documentation: str, labels: Sequence[str]):
        self.flat: list[Any] = []  # label values..., value, label values..., value
        self.labelnames = tuple(labels)
        super().__init__(name, documentation, labels=labels)

    def rows(self) -> Iterator[tuple[list[Any], Any]]:
        width = len(self.labelnames) + 1
        flat = self.flat
        for at in range(0, len(flat), width):
            yield flat[at : at + width - 1], flat[at + width - 1]

    @property
    def samples(self) -> list[Sample]:
        name = self.name + "_total"
        return [
            Sample(name, dict(zip(self.labelnames, labels, strict=True)), value)
            for labels, value in self.rows()
        ]

    @samples.setter
    def samples(self, value: list[Sample]) -> None:
        if value:  # Metric.__init__ starts every family with []
            raise TypeError("add series to a _CounterTable with add_metric")

    def add_metric(
        self,
        labels: Sequence[str],
        value: float,
        created: float | None = None,
        timestamp: Any = None,
        exemplar: Any = None,
    ) -> None:
        if len(labels) != len(self.labelnames):
            raise ValueError(f"{self.name}: {len(self.labelnames)} label values, got {labels!r}")
        if created is not None or timestamp is not None or exemplar is not None:
            raise TypeError("a _CounterTable series is label values and a value only")
        self.flat.extend(labels)
        self.flat.append(value)


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _label_format(names: tuple[str, ...]) -> str:
    """A str.format template for one label set, in sorted name order as generate_latest has it."""
    if not all(_LABEL_NAME.match(n) for n in names):
        raise _Unusual(names)
    order = sorted(range(len(names)), key=lambda i: names[i])
    return ",".join(f'{names[i]}="{{{i}}}"' for i in order)


def _value(value: float) -> str:
    text = repr(float(value))
    if "n" in text or text.find(".") > 6:  # inf, nan, or where Go switches to an exponent
        return floatToGoString(value)
    return text


def _text(metrics: Iterable[Metric]) -> bytes:
    out: list[str] = []
    formats: dict[tuple[str, ...], str] = {}
    for metric in metrics:
        mtype = metric.type
        name = metric.name + "_total" if mtype == "counter" else metric.name
        if mtype not in _TYPES or not _METRIC_NAME.match(name):
            raise _Unusual(metric.name)
        doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {mtype}\n")
        if isinstance(metric, _CounterTable):
            fmt = _label_format(metric.labelnames)
            for values, value in metric.rows():
                joined = "".join(values)
                if "\\" in joined or "\n" in joined or '"' in joined:
                    values = [_escape(v) for v in values]
                out.append(f"{name}{{{fmt.format(*values)}}} {_value(value)}\n")
            continue
        for s in metric.samples:
            if s.timestamp is not None or s.name.endswith(("_created", "_gsum", "_gcount")):
                raise _Unusual(s.name)
            if not s.labels:
                out.append(f"{s.name} {_value(s.value)}\n")
                continue
            names = tuple(s.labels)
            fmt = formats.get(names) or formats.setdefault(names, _label_format(names))
            values = list(s.labels.values())
            joined = "".join(values)
            if "\\" in joined or "\n" in joined or '"' in joined:
                values = [_escape(v) for v in values]
            out.append(f"{s.name}{{{fmt.format(*values)}}} {_value(s.value)}\n")
    return "".join(out).encode()


def render(reg: CollectorRegistry) -> tuple[bytes, str]:
    """The registry in Prometheus' text format, and its content type."""
    families = list(reg.collect())
    try:
        return _text(families), CONTENT_TYPE_LATEST
    except _Unusual:
        return generate_latest(_Families(families)), CONTENT_TYPE_LATEST


class _Families:
    """Already collected families, for generate_latest (which wants a collector)."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families
