"""Budgets applied to the work: what the batch path reserves before a chunk goes upstream, what it
releases when the chunk ends, and the gauges /metrics shows.

A chunk goes upstream only when all of these hold it, taken in this order and given back in
reverse when a later one refuses: the job's ``max_cost_usd`` (a chunk that would cross it is not
submitted, and the job ends ``budget_exhausted``), the tenant's daily and monthly caps, the
model's enqueued-token budget, and the cluster's batch creations per hour. Everything is keyed by
the chunk (``job:n:attempt``) so a redelivered submit holds each budget once.

A chunk refused by the queue budget waits; when a chunk gives its tokens back, the oldest waiting
chunks (:data:`WAKE_ON_RELEASE` of them) have their submit enqueued at once, so the queue refills
as soon as upstream's does instead of at the sweep's next retry of a waiting chunk.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

from service.budgets.spend import (
    CreateLimiter,
    QueueBudget,
    SpendBudget,
    TenantSpend,
    queue_limits,
    usd_to_nanousd,
)
from service.errors import FieldError, Problem
from service.jobs import store as js
from service.jobs.spec import JobSpec
from service.pricing import Estimate
from service.queues import SUBMIT
from service.redis import keys
from service.tenants import Tenant, Tenants

# Waiting chunks whose submit is enqueued when queue tokens come back: enough to fill the freed
# room with small chunks, few enough that a release never floods the control queue. A submit that
# still does not fit goes back to waiting; the sweep retries the rest.
WAKE_ON_RELEASE = 8


def check_tenant_budget(ctx: Any, tenant: Tenant | None, spec: JobSpec, estimate: Estimate) -> None:
    """At intake: refuse a job whose estimate is more than its tenant has left today or this month."""
    if tenant is None or (tenant.daily_usd is None and tenant.monthly_usd is None):
        return
    tier = spec.lane(ctx.catalog, ctx.settings.sync_max_items)
    needed = estimate.nanousd(tier)
    day_left, month_left = TenantSpend(ctx.redis).check(tenant)
    remaining = {
        "day": None if day_left is None else day_left / 1e9,
        "month": None if month_left is None else month_left / 1e9,
    }
    for period, left, cap in (
        ("daily", day_left, tenant.daily_usd),
        ("monthly", month_left, tenant.monthly_usd),
    ):
        if left is not None and needed > left:
            raise Problem(
                422,
                "Tenant budget exceeded",
                f"this job's estimated cost (${needed / 1e9:.4f} at the {tier} price) is more than tenant "
                f"'{tenant.id}' has left of its {period} budget: ${left / 1e9:.4f} of ${cap:.2f}",
                type_="https://imagebatch.dev/problems/budget",
                errors=[
                    FieldError(
                        "items",
                        f"estimated ${needed / 1e9:.4f} exceeds the remaining {period} budget",
                    )
                ],
                extra={"remaining_usd": remaining, "estimate_usd": needed / 1e9},
            )


class BatchBudgets:
    def __init__(self, ctx: Any, tenants: Tenants):
        self.ctx = ctx
        self.tenants = tenants
        self.queue = QueueBudget(ctx.redis, queue_limits(ctx.settings))
        self.creates = CreateLimiter(ctx.redis, ctx.settings.batch_creates_per_hour)
        self.spend = SpendBudget(ctx.redis)
        self.tenant_spend = TenantSpend(ctx.redis)

    def tenant(self, tenant_id: str) -> Tenant | None:
        return self.tenants.get(tenant_id)

    @staticmethod
    def _key(job_id: str, n: int, chunk: dict[str, str]) -> str:
        return f"{job_id}:{n}:{chunk.get('attempt', 1)}"

    def reserve_chunk(
        self, job: dict[str, str], job_id: str, n: int, chunk: dict[str, str]
    ) -> bool:
        key = self._key(job_id, n, chunk)
        if job.get("budget_exhausted"):
            self._exhausted(job_id, n, "the job's max_cost_usd")
            return False
        estimate = int(chunk.get("est_nanousd") or 0)
        cap = usd_to_nanousd(float(job["max_cost_usd"])) if job.get("max_cost_usd") else None
        # Spend reservations are per chunk, not per attempt: a resubmitted chunk keeps its hold.
        spend_key = f"{job_id}:{n}"
        if not self.spend.reserve_chunk(job_id, spend_key, estimate, cap):
            self._exhausted(job_id, n, "the job's max_cost_usd")
            return False
        tenant = self.tenant(job["tenant"])
        if tenant is not None and not self.tenant_spend.reserve(tenant, spend_key, estimate):
            self.spend.release(job_id, spend_key)
            self._exhausted(job_id, n, f"tenant '{tenant.id}' daily or monthly budget")
            return False
        if not self.queue.reserve(
            chunk.get("model") or job["model"], key, int(chunk.get("est_input_tokens") or 0)
        ):
            return False  # wait for the queue: the sweep tries again; spend holds stay (same keys)
        if not chunk.get("create_counted"):
            if self.creates.try_acquire() > 0:
                self.queue.release(chunk.get("model") or job["model"], key)
                return False
            self.ctx.store.update_chunk(job_id, n, create_counted=1)
        return True

    def _exhausted(self, job_id: str, n: int, what: str) -> None:
        """A chunk that would cross a money cap is never submitted: its items fail, the job ends."""
        store = self.ctx.store
        store.update_job(
            job_id, budget_exhausted=1, reason=f"stopped: submitting more would exceed {what}"
        )
        if store.set_chunk_status_if(
            job_id, n, [js.CHUNK_PLANNED, js.CHUNK_WAITING], js.CHUNK_CANCELLED
        ):
            store.cancel_unsubmitted(job_id, [n])
        store.unmark(job_id, n)

    def release_chunk(
        self, job_id: str, n: int, chunk: dict[str, str], spent_nanousd: int | None
    ) -> None:
        model = chunk.get("model") or ""
        self.queue.release(model, self._key(job_id, n, chunk))
        self.wake_waiting()
        spend_key = f"{job_id}:{n}"
        job = self.ctx.store.job(job_id) or {}
        tenant = self.tenant(job.get("tenant", ""))
        if spent_nanousd is None:
            self.spend.release(job_id, spend_key)
            if tenant is not None:
                self.tenant_spend.release(tenant, spend_key)
        else:
            self.spend.settle(job_id, spend_key, spent_nanousd)
            if tenant is not None:
                self.tenant_spend.settle(tenant, spend_key, spent_nanousd)

    def upstream_pressure(self, job_id: str, n: int, chunk: dict[str, str]) -> None:
        self.queue.shrink(chunk.get("model") or "", self._key(job_id, n, chunk))

    def wake_waiting(self) -> None:
        """Enqueue the submit of the oldest waiting chunks: queue tokens were just given back.

        Submitting is idempotent (a lease, and status checks), so a chunk also retried by the
        sweep, or already submitted, costs one no-op task.
        """
        for ref in self.ctx.redis.zrange(keys.WAITING_CHUNKS, 0, WAKE_ON_RELEASE - 1):
            job_id, _, n = (ref.decode() if isinstance(ref, bytes) else ref).rpartition(":")
            self.ctx.enqueue(SUBMIT, job_id, int(n))

    def metrics(self) -> Iterator[Metric]:
        reserved = GaugeMetricFamily(
            "imagebatch_batch_queue_tokens_reserved",
            "Enqueued input tokens held by active batches.",
            labels=("model",),
        )
        limit = GaugeMetricFamily(
            "imagebatch_batch_queue_tokens_limit",
            "Effective enqueued-token budget (0 = unlimited).",
            labels=("model",),
        )
        for model in self.queue.models():
            held, effective, _configured = self.queue.usage(model)
            reserved.add_metric([model], held)
            limit.add_metric([model], effective)
        yield reserved
        yield limit
        spend = GaugeMetricFamily(
            "imagebatch_tenant_spend_usd",
            "Tenant spend (settled and reserved) this UTC day and month.",
            labels=("tenant", "period"),
        )
        budget = GaugeMetricFamily(
            "imagebatch_tenant_budget_usd", "Tenant spend caps.", labels=("tenant", "period")
        )
        for tenant in self.tenants:
            snap = self.tenant_spend.snapshot(tenant)
            for period, used, cap in (
                ("day", snap.day_spent + snap.day_reserved, tenant.daily_usd),
                ("month", snap.month_spent + snap.month_reserved, tenant.monthly_usd),
            ):
                spend.add_metric([tenant.id, period], used / 1e9)
                if cap is not None:
                    budget.add_metric([tenant.id, period], cap)
        yield spend
        yield budget
        waiting = self.ctx.redis.zrange(keys.WAITING_CHUNKS, 0, 0, withscores=True)
        yield GaugeMetricFamily(
            "imagebatch_budget_oldest_wait_seconds",
            "How long the oldest chunk has waited to be submitted.",
            value=(time.time() - waiting[0][1]) if waiting else 0,
        )
