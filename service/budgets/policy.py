"""The budget policy: what the lanes reserve before work goes upstream, and give back after.

A chunk goes upstream only when all of these hold it, taken in this order: the job's
``max_cost_usd`` (a chunk that would cross it is not submitted, and the job ends
``budget_exhausted``), the tenant's daily and monthly caps, the model's enqueued-token budget, and
the cluster's batch creations per hour. When a money cap refuses, the money already held is given
back and the chunk is cancelled. When the queue or the creation limit refuses, the chunk waits:
its money holds stay (a retry finds them held under the same keys), and queue tokens taken before
a refused creation are given back. A sync item holds the two money budgets the same way, keyed by
item. Everything is keyed by the chunk or item so a redelivered task holds each budget once.

A chunk refused by the queue budget waits; when a chunk gives its tokens back, the oldest waiting
chunks (:data:`WAKE_ON_RELEASE` of them) have their submit enqueued at once, so the queue refills
as soon as upstream's does instead of at the sweep's next retry of a waiting chunk.

Intake asks :meth:`BudgetPolicy.check_tenant` first: a job whose estimate is more than its
tenant has left today or this month is refused before anything is stored.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis

from service.budgets.queue import CreateLimiter, QueueBudget, queue_limits
from service.budgets.spend import SpendBudget, TenantSpend
from service.errors import FieldError, Problem
from service.jobs.model import CHUNK_CANCELLED, CHUNK_NOT_SUBMITTED, Chunk, Job
from service.jobs.store import JobStore
from service.metrics import BudgetGauges
from service.queues import SUBMIT
from service.settings import Settings
from service.tenants import Tenant, Tenants

# Waiting chunks whose submit is enqueued when queue tokens come back: enough to fill the freed
# room with small chunks, few enough that a release never floods the control queue. A submit that
# still does not fit goes back to waiting; the sweep retries the rest.
WAKE_ON_RELEASE = 8


def chunk_spend_key(chunk: Chunk) -> str:
    # Spend holds are per chunk, not per attempt: a resubmitted chunk keeps its hold.
    return chunk.ref


def item_spend_key(job_id: str, index: int) -> str:
    return f"{job_id}:s{index}"


class BudgetPolicy:
    """Every budget, applied to jobs, chunks and sync items. One per process (in the Context)."""

    def __init__(
        self,
        r: redis.Redis,
        settings: Settings,
        store: JobStore,
        enqueue: Callable[..., Any],
        tenants: Tenants,
    ):
        self.store, self.enqueue, self.tenants = store, enqueue, tenants
        self.queue = QueueBudget(r, queue_limits(settings))
        self.creates = CreateLimiter(r, settings.batch_creates_per_hour)
        self.spend = SpendBudget(r)
        self.tenant_spend = TenantSpend(r)

    def tenant(self, tenant_id: str) -> Tenant | None:
        return self.tenants.get(tenant_id)

    # --- intake ----------------------------------------------------------------------------
    def check_tenant(self, tenant: Tenant | None, needed_nanousd: int, tier: str) -> None:
        """Refuse (422) a job whose estimate is more than its tenant has left."""
        if tenant is None or (tenant.daily_usd is None and tenant.monthly_usd is None):
            return
        day_left, month_left = self.tenant_spend.check(tenant)
        remaining = {
            "day": None if day_left is None else day_left / 1e9,
            "month": None if month_left is None else month_left / 1e9,
        }
        for period, left, cap in (
            ("daily", day_left, tenant.daily_usd),
            ("monthly", month_left, tenant.monthly_usd),
        ):
            if left is not None and needed_nanousd > left:
                raise Problem(
                    422,
                    "Tenant budget exceeded",
                    f"this job's estimated cost (${needed_nanousd / 1e9:.4f} at the {tier} price) "
                    f"is more than tenant '{tenant.id}' has left of its {period} budget: "
                    f"${left / 1e9:.4f} of ${cap:.2f}",
                    type_="https://imagebatch.dev/problems/budget",
                    errors=[
                        FieldError(
                            "items",
                            f"estimated ${needed_nanousd / 1e9:.4f} exceeds the remaining "
                            f"{period} budget",
                        )
                    ],
                    extra={"remaining_usd": remaining, "estimate_usd": needed_nanousd / 1e9},
                )

    # --- money, for a chunk or a sync item ---------------------------------------------------
    def reserve_spend(self, job: Job, key: str, nanousd: int) -> str | None:
        """Hold ``nanousd`` against the job's cap and its tenant's; None when held, else what
        refused it (nothing is held then)."""
        if not self.spend.reserve_chunk(job.id, key, nanousd, job.max_cost_nanousd):
            return "the job's max_cost_usd"
        tenant = self.tenant(job.tenant)
        if tenant is not None and not self.tenant_spend.reserve(tenant, key, nanousd):
            self.spend.release(job.id, key)
            return f"tenant '{tenant.id}' daily or monthly budget"
        return None

    def release_spend(self, job: Job, key: str) -> None:
        self.spend.release(job.id, key)
        tenant = self.tenant(job.tenant)
        if tenant is not None:
            self.tenant_spend.release(tenant, key)

    def settle_spend(self, job: Job, key: str, nanousd: int) -> None:
        self.spend.settle(job.id, key, nanousd)
        tenant = self.tenant(job.tenant)
        if tenant is not None:
            self.tenant_spend.settle(tenant, key, nanousd)

    # --- chunks ------------------------------------------------------------------------------
    def reserve_chunk(self, job: Job, chunk: Chunk) -> bool:
        """Hold everything a chunk needs before it goes upstream; False means it waits (or, if
        a money cap refused it, it is cancelled and the job stops)."""
        if job.budget_exhausted:
            self._exhausted(chunk, "the job's max_cost_usd")
            return False
        refused = self.reserve_spend(job, chunk_spend_key(chunk), chunk.est_nanousd)
        if refused:
            self._exhausted(chunk, refused)
            return False
        model = chunk.model or job.model
        if not self.queue.reserve(model, chunk.attempt_ref, chunk.est_input_tokens):
            return False  # wait for the queue: the sweep tries again; spend holds stay (same keys)
        if not chunk.create_counted:
            if self.creates.try_acquire() > 0:
                self.queue.release(model, chunk.attempt_ref)
                return False
            self.store.update_chunk(chunk.job_id, chunk.number, create_counted=1)
        return True

    def _exhausted(self, chunk: Chunk, what: str) -> None:
        """A chunk that would cross a money cap is never submitted: its items end, the job ends."""
        self.store.stop_for_budget(chunk.job_id, f"stopped: submitting more would exceed {what}")
        if self.store.set_chunk_status_if(
            chunk.job_id, chunk.number, CHUNK_NOT_SUBMITTED, CHUNK_CANCELLED
        ):
            self.store.cancel_unsubmitted(chunk.job_id, [chunk.number])
        self.store.unmark(chunk.job_id, chunk.number)

    def release_chunk(self, job: Job, chunk: Chunk, spent_nanousd: int | None) -> None:
        """The chunk's batch ended (``spent_nanousd`` is what it cost) or it never went upstream
        (None): give back its queue tokens and settle or release its money."""
        self.queue.release(chunk.model, chunk.attempt_ref)
        self.wake_waiting()
        if spent_nanousd is None:
            self.release_spend(job, chunk_spend_key(chunk))
        else:
            self.settle_spend(job, chunk_spend_key(chunk), spent_nanousd)

    def upstream_pressure(self, chunk: Chunk) -> None:
        """Upstream refused the chunk's batch for its enqueued-token limit."""
        self.queue.shrink(chunk.model, chunk.attempt_ref)

    def wake_waiting(self) -> None:
        """Enqueue the submit of the oldest waiting chunks: queue tokens were just given back.

        Submitting is idempotent (a lease, and status checks), so a chunk also retried by the
        sweep, or already submitted, costs one no-op task.
        """
        for job_id, number in self.store.waiting_chunks(WAKE_ON_RELEASE):
            self.enqueue(SUBMIT, job_id, number)

    # --- what /metrics shows -------------------------------------------------------------------
    def gauges(self) -> BudgetGauges:
        gauges = BudgetGauges()
        for model in self.queue.models():
            held, effective, _configured = self.queue.usage(model)
            gauges.queue.append((model, held, effective))
        for tenant in self.tenants:
            snap = self.tenant_spend.snapshot(tenant)
            gauges.tenant_spend += [
                (tenant.id, period, used / 1e9, cap)
                for period, used, cap in (
                    ("day", snap.day_spent + snap.day_reserved, tenant.daily_usd),
                    ("month", snap.month_spent + snap.month_reserved, tenant.monthly_usd),
                )
            ]
        since = self.store.oldest_wait()
        gauges.oldest_wait_seconds = (time.time() - since) if since else 0.0
        return gauges
