"""/metrics: how long the API takes to answer a scrape with 1,000 jobs' per-job series.

Starts a Redis and the API (uvicorn) on free ports and fills Redis the way a busy deployment
does: 1,000 jobs with per-job series (a few hundred running, the rest finished within the
retention window), 5,000 more that the scrape must trim (3,000 finished before the retention
window, 2,000 within it but older than the newest IMAGEBATCH_METRICS_MAX_JOBS), spend hashes as
collect writes them, bounded-label totals for 50 tenants x 3 models x 20 campaigns, shared
counters and histograms, active upstream batches and worker heartbeats (some an hour stale).
Then GETs /metrics 50 times and prints median and p95, the response size and series count.
Target (issue: metrics): median and p95 at most 200 ms.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx2
import orjson
import redis
from _support import ROOT, machine, start_api, start_redis

sys.path.insert(0, str(ROOT))

from service import metrics
from service.catalog import cached_catalog
from service.pricing import TIERS
from service.queues import QUEUES
from service.redis import keys

RETAINED = 1000  # the default IMAGEBATCH_METRICS_MAX_JOBS
RUNNING = 300
EXPIRED = 3000  # finished before the retention window
BEYOND_MAX = 2000  # finished within the window, but older than the newest RETAINED
TENANTS, MODELS, CAMPAIGNS = 50, 3, 20
ACTIVE_CHUNKS = 400
WORKERS, STALE_WORKERS = 24, 8
SCRAPES = 50
TARGET_MS = 200.0
DAY = 86400.0


def populate(r: redis.Redis, now: float, rng: random.Random) -> dict[str, int]:
    """Write the deployment's state; returns how many jobs of each kind it wrote."""
    catalog = cached_catalog(None)
    models = [m.id for m in catalog.models.values() if m.batch][:MODELS]
    tenants = [f"tenant-{t:02d}" for t in range(TENANTS)]
    campaigns = [f"campaign-{c:02d}" for c in range(CAMPAIGNS)] + [""]
    pipe = r.pipeline(transaction=False)

    def job(job_id: str, finished_at: float | None) -> None:
        tenant, model = rng.choice(tenants), rng.choice(models)
        items = rng.randint(10, 50_000)
        created = (finished_at or now) - rng.uniform(60, 6 * 3600)
        fields = {
            "id": job_id,
            "tenant": tenant,
            "model": model,
            "mode": "batch",
            "requested_mode": "auto",
            "status": "running"
            if finished_at is None
            else rng.choice(("succeeded", "succeeded", "partially_failed")),
            "created_at": created,
            "updated_at": finished_at or now,
            "items": items,
            "images": items,
            "labels": orjson.dumps({"campaign": rng.choice(campaigns), "team": "catalog"}).decode(),
            "campaign": rng.choice(campaigns),
            "estimate": orjson.dumps(
                {
                    "tokens": {"input": 40 * items, "output": 196 * items},
                    "batch_usd": 0.0055 * items,
                    "sync_usd": 0.011 * items,
                }
            ).decode(),
        }
        if finished_at is not None:
            fields["finished_at"] = finished_at
        pipe.hset(keys.job(job_id), mapping=fields)
        done = items if finished_at is not None else rng.randint(0, items)
        images_out = 196 * done
        cost = int((40 * done * 5.0 + images_out * 30.0) / 2 * 1000)  # nano-USD at batch rates
        spend = {
            "text_input": 40 * done,
            "image_output": images_out,
            "cost:batch": cost,
            "images": done,
        }
        if rng.random() < 0.2:  # edits carry image input
            spend["image_input"] = 323 * done
        if rng.random() < 0.1:  # the sync lane
            spend["cost:sync"] = cost // 50
        pipe.hset(keys.job_spend(job_id), mapping=spend)
        pipe.zadd(keys.METRICS_JOBS, {job_id: finished_at if finished_at is not None else "+inf"})
        if finished_at is None:
            pipe.sadd(keys.ACTIVE_JOBS, job_id)
            pending = rng.randint(0, items - done)
            pipe.hset(
                keys.job_counts(job_id),
                mapping={
                    "pending": pending,
                    "queued": items - done - pending,
                    "succeeded": done,
                    "failed": 0,
                    "cancelled": 0,
                },
            )

    retention = DAY  # the default IMAGEBATCH_METRICS_JOB_RETENTION
    for i in range(RUNNING):
        job(f"run-{i:05d}", None)
    # The newest finished jobs: the ones a scrape keeps next to the running ones.
    newest = [now - rng.uniform(0, retention / 3) for _ in range(RETAINED - RUNNING)]
    cutoff = min(newest)
    for i, t in enumerate(newest):
        job(f"fin-{i:05d}", t)
    for i in range(BEYOND_MAX):
        job(f"old-{i:05d}", rng.uniform(now - retention + 60, cutoff - 1))
    for i in range(EXPIRED):
        job(f"exp-{i:05d}", now - rng.uniform(retention + 60, 30 * DAY))
    pipe.execute()

    kinds = ("text_input", "image_input", "image_output")
    for tier in TIERS:
        pipe.hset(
            keys.TOTAL_TOKENS,
            mapping={
                f"{t}|{m}|{k}|{tier}": rng.randint(1, 10**10)
                for t in tenants
                for m in models
                for k in kinds
            },
        )
        pipe.hset(
            keys.TOTAL_COST,
            mapping={
                f"{t}|{m}|{tier}|{c}": rng.randint(1, 10**13)
                for t in tenants
                for m in models
                for c in campaigns[:CAMPAIGNS]
            },
        )
    pipe.hset(
        keys.TOTAL_IMAGES,
        mapping={
            f"{m}|{s}": rng.randint(1, 10**7) for m in models for s in ("succeeded", "failed")
        },
    )
    for endpoint in ("files", "batches", "images/generations", "images/edits"):
        for status in ("200", "400", "429", "500"):
            metrics.count(
                pipe,
                metrics.UPSTREAM_REQUESTS,
                {"endpoint": endpoint, "status": status},
                rng.randint(1, 10**6),
            )
        metrics.count(
            pipe,
            metrics.UPSTREAM_RATE_LIMITED,
            {"endpoint": endpoint},
            rng.randint(1, 1000),
        )
    for status in ("succeeded", "failed", "rate_limited"):
        metrics.count(pipe, metrics.SYNC_REQUESTS, {"status": status}, rng.randint(1, 10**5))
    for status in ("succeeded", "partially_failed", "failed", "cancelled", "budget_exhausted"):
        metrics.count(pipe, metrics.JOBS_FINISHED, {"status": status}, rng.randint(1, 10**4))
    metrics.count(pipe, metrics.COLLECT_BYTES, None, 7.3e12)
    pipe.execute()
    for task in (
        "batches.plan",
        "batches.submit",
        "batches.sweep",
        "batches.collect",
        "batches.finalize",
        "batches.cancel",
        "sync.run",
        "webhooks.send",
    ):
        for _ in range(20):
            metrics.observe(r, metrics.TASK_DURATION, rng.expovariate(1 / 5), {"task": task})
    for _ in range(20):
        metrics.observe(r, metrics.BUDGET_WAIT, rng.expovariate(1 / 300))

    for c in range(ACTIVE_CHUNKS):
        job_id = f"run-{c % RUNNING:05d}"
        pipe.zadd(keys.ACTIVE_CHUNKS, {f"{job_id}:{c}": now - rng.uniform(0, DAY)})
        pipe.hset(
            keys.chunk(job_id, c),
            mapping={
                "status": "submitted",
                "upstream_status": rng.choice(("validating", "in_progress", "finalizing")),
            },
        )
    for q in QUEUES:
        pipe.rpush(q, *[b"{}"] * rng.randint(1, 50))
    for w in range(WORKERS):
        age = rng.uniform(2 * 3600, 7 * DAY) if w < STALE_WORKERS else rng.uniform(0, 60)
        pipe.hset(keys.HEARTBEATS, f"celery@worker-{w:02d}", now - age)
    pipe.execute()
    return {
        "running": RUNNING,
        "finished": RETAINED - RUNNING,
        "beyond_max": BEYOND_MAX,
        "expired": EXPIRED,
    }


def series(text: bytes) -> int:
    return sum(1 for line in text.splitlines() if line and not line.startswith(b"#"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scrapes", type=int, default=SCRAPES)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        redis_proc, redis_url = start_redis(tmp / "redis")
        r = redis.Redis.from_url(redis_url)
        written = populate(r, time.time(), random.Random(20261121))
        jobs_before = r.zcard(keys.METRICS_JOBS)
        api, port = start_api(tmp, redis_url)
        try:
            with httpx2.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
                load_before = f"{os.getloadavg()[0]:.1f}"
                start = time.perf_counter()
                first = client.get("/metrics")
                first_ms = (time.perf_counter() - start) * 1000
                assert first.status_code == 200, first.text[:500]
                jobs_after = r.zcard(keys.METRICS_JOBS)
                times, body = [], b""
                for _ in range(args.scrapes):
                    start = time.perf_counter()
                    resp = client.get("/metrics")
                    times.append((time.perf_counter() - start) * 1000)
                    assert resp.status_code == 200, resp.text[:500]
                    body = resp.content
            per_job = sum(
                1 for line in body.splitlines() if line.startswith(b"imagebatch_job_tokens_total{")
            )
            heartbeats = sum(
                1
                for line in body.splitlines()
                if line.startswith(b"imagebatch_worker_heartbeat_timestamp_seconds{")
            )
            times.sort()
            p95 = times[min(len(times) - 1, round(0.95 * len(times)) - 1)]
            median = statistics.median(times)
            print(
                f"machine: {machine()}; load average {load_before} before, {os.getloadavg()[0]:.1f} after"
            )
            print(
                f"metrics: {written['running']} running + {written['finished']} finished jobs retained; "
                f"{written['beyond_max']} beyond the max and {written['expired']} past retention to trim; "
                f"{TENANTS} tenants x {MODELS} models x {CAMPAIGNS} campaigns; {WORKERS} workers ({STALE_WORKERS} stale)"
            )
            print(
                f"  first scrape (trims the per-job index {jobs_before:,} -> {jobs_after:,} jobs, prunes stale heartbeats): {first_ms:.0f} ms"
            )
            print(
                f"  GET /metrics x{args.scrapes}: median {median:.0f} ms, p95 {p95:.0f} ms, max {times[-1]:.0f} ms   target <= {TARGET_MS:.0f} ms"
            )
            print(
                f"  response: {len(body) / 1e6:.2f} MB, {series(body):,} series "
                f"({per_job // len(metrics.KINDS):,} jobs with per-job series, {heartbeats} worker heartbeats)"
            )
            if median > TARGET_MS or p95 > TARGET_MS:
                print("  MISSED the target")
        finally:
            api.stop()
            r.close()
            redis_proc.stop()


if __name__ == "__main__":
    main()
