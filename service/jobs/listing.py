"""A tenant's jobs, newest first, a page at a time: what a job list shows of each.

:func:`list_jobs` walks the tenant's job index (``keys.tenant_jobs``, a sorted set by creation
time) from a cursor, reading each job, its counts and its spend in one pipelined round trip per
batch, and keeps those that match the filters (status, labels; a schedule's runs carry the label
``schedule``). A filter that matches few jobs reads at most ``scan_limit`` of them per page and
answers a short page with a cursor to go on from, so one request never reads all of a tenant's
jobs. The cursor is the creation time to go on before.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from service.context import Context
from service.jobs.model import Job
from service.jobs.store import decode_hash
from service.pricing import TIERS
from service.redis import keys

SCAN_LIMIT = 2000


@dataclass(frozen=True)
class JobRow:
    job: Job
    counts: dict[str, int]
    spend: dict[str, int]

    @property
    def done(self) -> int:
        """Items that ended (succeeded, failed or cancelled)."""
        return sum(self.counts.get(k, 0) for k in ("succeeded", "failed", "cancelled"))

    @property
    def cost_usd(self) -> float:
        return sum(self.spend.get(f"cost:{tier}", 0) for tier in TIERS) / 1e9

    @property
    def estimate_usd(self) -> float | None:
        usd = (self.job.estimate or {}).get("usd") or {}
        value = usd.get(self.job.mode)
        return float(value) if isinstance(value, int | float) else None


def _rows(ctx: Context, job_ids: list[str]) -> list[JobRow | None]:
    pipe = ctx.redis.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.hgetall(keys.job(job_id))
        pipe.hgetall(keys.job_counts(job_id))
        pipe.hgetall(keys.job_spend(job_id))
    raw = pipe.execute()
    out: list[JobRow | None] = []
    for i in range(0, len(raw), 3):
        job_hash, counts, spend = raw[i : i + 3]
        if not job_hash:
            out.append(None)
            continue
        out.append(
            JobRow(
                Job.from_hash(decode_hash(job_hash)),
                {k.decode(): int(v) for k, v in counts.items()},
                {k.decode(): int(v) for k, v in spend.items()},
            )
        )
    return out


def list_jobs(
    ctx: Context,
    tenant: str,
    *,
    status: str | None = None,
    labels: Mapping[str, str] | None = None,
    before: float | None = None,
    limit: int = 50,
    scan_limit: int = SCAN_LIMIT,
) -> tuple[list[JobRow], float | None]:
    """Up to ``limit`` matching jobs created before ``before``; returns (rows, next cursor)."""
    wanted = dict(labels or {})
    out: list[JobRow] = []
    scanned = 0
    batch = limit + 1 if not (status or wanted) else max(limit * 2, 100)
    while scanned < scan_limit:
        ids = ctx.store.list_jobs(tenant, before=before, limit=min(batch, scan_limit - scanned))
        if not ids:
            return out, None
        for (_, score), row in zip(ids, _rows(ctx, [i for i, _ in ids]), strict=True):
            scanned += 1
            if row is None or (status and row.job.status != status):
                before = score
                continue
            if any(row.job.labels.get(k) != v for k, v in wanted.items()):
                before = score
                continue
            if len(out) >= limit:
                return out, before
            out.append(row)
            before = score
    return out, before
