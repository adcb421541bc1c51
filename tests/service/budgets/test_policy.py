"""The budget policy on a real Redis with a tenants file: what a chunk or a sync item must hold
before it goes upstream, taken in order (job cap, tenant caps, queue tokens, batch creations)
and given back when a later one refuses; a chunk that would cross a money cap ends its job
``budget_exhausted``; intake's tenant check; the figures /metrics shows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.context import Context
from service.errors import Problem
from service.jobs import intake
from service.jobs import model as m
from service.jobs.spec import parse_job_json
from service.queues import SUBMIT
from tests.support.context import make_context, recorder
from tests.support.stack import job_body

MODEL = "gpt-image-2"
USD = 1_000_000_000  # nano-USD

TENANTS = """
[tenants.acme]
key_sha256 = ["{a}"]
daily_usd = 1.0
monthly_usd = 20.0

[tenants.tight]
key_sha256 = ["{b}"]
daily_usd = 0.01

[tenants.open]
key_sha256 = ["{c}"]
"""


@pytest.fixture
def ctx(tmp_path: Path, redis_url: str, redis_client: Any) -> Iterator[Context]:
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(TENANTS.format(a="a" * 64, b="b" * 64, c="c" * 64))
    context = make_context(
        tmp_path,
        redis_url,
        tenants_file=tenants,
        batch_queue_tokens=1000,
        batch_creates_per_hour=2,
    )
    yield context
    context.redis.close()


def new_job(ctx: Context, tenant: str = "acme", n: int = 4, **extra: Any) -> m.Job:
    spec = parse_job_json(orjson.dumps(job_body(n, **extra)), ctx.catalog, max_items=100)
    return intake.submit(ctx, spec, tenant).job


def planned_chunk(
    ctx: Context, job: m.Job, indexes: list[int], *, tokens: int, nanousd: int
) -> m.Chunk:
    """A chunk as plan leaves it: items queued in it, its estimates set, waiting to submit."""
    number = ctx.store.new_chunk(
        job.id,
        endpoint="/v1/images/generations",
        model=job.model,
        est_input_tokens=tokens,
        est_nanousd=nanousd,
    )
    ctx.store.assign(job.id, number, indexes)
    ctx.store.set_chunk_status_if(job.id, number, [m.CHUNK_ASSEMBLING], m.CHUNK_PLANNED)
    ctx.store.mark_waiting(job.id, number)
    chunk = ctx.store.chunk(job.id, number)
    assert chunk is not None
    return chunk


def held(ctx: Context, job: m.Job) -> dict[str, Any]:
    """What each budget holds for ``job`` and its tenant right now."""
    tenant = ctx.budgets.tenant(job.tenant)
    snap = ctx.budgets.tenant_spend.snapshot(tenant) if tenant else None
    return {
        "job": ctx.budgets.spend.job_state(job.id)["reserved"],
        "job_spent": ctx.budgets.spend.job_state(job.id)["spent"],
        "tenant_day": snap.day_reserved if snap else None,
        "tenant_spent": snap.day_spent if snap else None,
        "queue": ctx.budgets.queue.usage(MODEL)[0],
        "creates": ctx.budgets.creates.used(),
    }


def test_a_chunk_holds_every_budget_once_however_often_it_is_submitted(ctx: Context) -> None:
    job = new_job(ctx, max_cost_usd=1.0)
    chunk = planned_chunk(ctx, job, [0, 1], tokens=300, nanousd=USD // 100)
    assert ctx.budgets.reserve_chunk(job, chunk)
    expected = {
        "job": USD // 100,
        "job_spent": 0,
        "tenant_day": USD // 100,
        "tenant_spent": 0,
        "queue": 300,
        "creates": 1,
    }
    assert held(ctx, job) == expected
    # A redelivered submit of the same chunk holds nothing more, and counts no second creation.
    again = ctx.store.chunk(job.id, chunk.number)
    assert again is not None and again.create_counted
    assert ctx.budgets.reserve_chunk(job, again)
    assert held(ctx, job) == expected


def test_a_chunk_waiting_for_queue_tokens_keeps_its_money_and_counts_no_creation(
    ctx: Context,
) -> None:
    job = new_job(ctx)
    first = planned_chunk(ctx, job, [0, 1], tokens=800, nanousd=1000)
    second = planned_chunk(ctx, job, [2, 3], tokens=400, nanousd=2000)
    assert ctx.budgets.reserve_chunk(job, first)
    ctx.store.mark_active(job.id, first.number)  # as submit does once the batch exists
    assert not ctx.budgets.reserve_chunk(job, second)  # 800 + 400 > 1000: it waits
    assert held(ctx, job)["queue"] == 800 and held(ctx, job)["creates"] == 1
    # Its money stays held (under the same key) so it cannot be spent elsewhere meanwhile.
    assert held(ctx, job)["job"] == 3000
    assert ctx.store.chunk(job.id, second.number).status == m.CHUNK_PLANNED  # type: ignore[union-attr]
    # The first batch ends: its tokens come back and the waiting chunk's submit is enqueued.
    ctx.budgets.release_chunk(job, first, 900)
    assert recorder(ctx).named(SUBMIT) == [(job.id, second.number)]
    assert ctx.budgets.reserve_chunk(job, second)
    after = held(ctx, job)
    assert (after["queue"], after["job"], after["job_spent"], after["creates"]) == (
        400,
        2000,
        900,
        2,
    )


def test_a_refused_creation_gives_the_queue_tokens_back(ctx: Context) -> None:
    job = new_job(ctx, n=6)
    chunks = [planned_chunk(ctx, job, [2 * i, 2 * i + 1], tokens=100, nanousd=10) for i in range(3)]
    assert ctx.budgets.reserve_chunk(job, chunks[0])
    assert ctx.budgets.reserve_chunk(job, chunks[1])
    assert not ctx.budgets.reserve_chunk(job, chunks[2])  # 2 creations an hour
    assert held(ctx, job)["queue"] == 200 and held(ctx, job)["creates"] == 2
    third = ctx.store.chunk(job.id, chunks[2].number)
    assert third is not None and third.status == m.CHUNK_PLANNED and not third.create_counted
    assert ctx.store.job(job.id).budget_exhausted is False  # type: ignore[union-attr]


def test_a_chunk_over_the_jobs_max_cost_is_cancelled_and_the_job_stops(ctx: Context) -> None:
    job = new_job(ctx, max_cost_usd=0.01)
    fits = planned_chunk(ctx, job, [0, 1], tokens=100, nanousd=USD // 200)
    over = planned_chunk(ctx, job, [2, 3], tokens=100, nanousd=USD // 100)
    assert ctx.budgets.reserve_chunk(job, fits)
    assert not ctx.budgets.reserve_chunk(job, over)
    assert ctx.store.chunk(job.id, over.number).status == m.CHUNK_CANCELLED  # type: ignore[union-attr]
    states = ctx.store.item_states(job.id, [0, 1, 2, 3])
    assert [s.status for s in states if s] == [m.QUEUED, m.QUEUED, m.CANCELLED, m.CANCELLED]
    stopped = ctx.store.job(job.id)
    assert stopped is not None and stopped.budget_exhausted
    assert stopped.reason is not None and "max_cost_usd" in stopped.reason
    assert ctx.store.waiting_chunks() == [(job.id, fits.number)]
    # Nothing the refused chunk asked for is held; what the first chunk holds stays.
    assert held(ctx, job)["job"] == USD // 200 and held(ctx, job)["queue"] == 100
    # The job is stopped: even a chunk that would fit is not sent any more.
    small = planned_chunk(ctx, stopped, [], tokens=1, nanousd=1)
    assert not ctx.budgets.reserve_chunk(stopped, small)


def test_a_tenant_cap_refusal_gives_the_job_cap_hold_back(ctx: Context) -> None:
    job = new_job(ctx, tenant="tight", n=2, max_cost_usd=1.0)
    chunk = planned_chunk(ctx, job, [0, 1], tokens=100, nanousd=USD // 50)  # $0.02 > $0.01/day
    assert not ctx.budgets.reserve_chunk(job, chunk)
    assert held(ctx, job)["job"] == 0 and held(ctx, job)["tenant_day"] == 0
    assert held(ctx, job)["queue"] == 0 and held(ctx, job)["creates"] == 0
    stopped = ctx.store.job(job.id)
    assert stopped is not None and stopped.budget_exhausted
    assert "tenant 'tight'" in (stopped.reason or "")


def test_sync_items_hold_and_settle_money_by_item(ctx: Context) -> None:
    job = new_job(ctx, n=2, max_cost_usd=0.05)
    assert ctx.budgets.reserve_spend(job, f"{job.id}:s0", USD // 50) is None
    assert ctx.budgets.reserve_spend(job, f"{job.id}:s0", USD // 50) is None  # once
    assert ctx.budgets.reserve_spend(job, f"{job.id}:s1", USD // 25) == "the job's max_cost_usd"
    ctx.budgets.settle_spend(job, f"{job.id}:s0", USD // 100)
    ctx.budgets.settle_spend(job, f"{job.id}:s0", USD // 100)  # a repeated settle counts once
    assert (held(ctx, job)["job"], held(ctx, job)["job_spent"]) == (0, USD // 100)
    assert held(ctx, job)["tenant_spent"] == USD // 100
    assert ctx.budgets.reserve_spend(job, f"{job.id}:s1", USD // 25) is None  # room again
    ctx.budgets.release_spend(job, f"{job.id}:s1")
    assert held(ctx, job)["job"] == 0 and held(ctx, job)["tenant_day"] == 0


def test_check_tenant_refuses_a_job_bigger_than_what_is_left(ctx: Context) -> None:
    tenant = ctx.budgets.tenant("acme")
    assert tenant is not None
    ctx.budgets.check_tenant(tenant, USD // 2, "batch")  # fits
    job = new_job(ctx)
    assert ctx.budgets.reserve_spend(job, "held-elsewhere", (USD * 3) // 4) is None
    with pytest.raises(Problem) as caught:
        ctx.budgets.check_tenant(tenant, USD // 2, "batch")
    problem = caught.value.to_dict()
    assert problem["status"] == 422
    assert problem["remaining_usd"] == {"day": pytest.approx(0.25), "month": pytest.approx(19.25)}
    assert problem["estimate_usd"] == pytest.approx(0.5)
    assert "daily" in problem["detail"] and "$0.2500 of $1.00" in problem["detail"]
    assert problem["errors"][0]["field"] == "items"
    # No caps, or no tenant (an open API): nothing to check.
    ctx.budgets.check_tenant(ctx.budgets.tenant("open"), 10**15, "sync")
    ctx.budgets.check_tenant(None, 10**15, "sync")


def test_gauges_show_queue_tenant_spend_and_the_oldest_wait(ctx: Context) -> None:
    assert ctx.budgets.gauges().queue == [] and ctx.budgets.gauges().oldest_wait_seconds == 0.0
    job = new_job(ctx)
    chunk = planned_chunk(ctx, job, [0, 1], tokens=250, nanousd=USD // 10)
    assert ctx.budgets.reserve_chunk(job, chunk)
    ctx.budgets.settle_spend(job, "elsewhere", USD // 20)
    planned_chunk(ctx, job, [2, 3], tokens=2000, nanousd=1)  # waits
    gauges = ctx.budgets.gauges()
    assert gauges.queue == [(MODEL, 250, 1000)]
    spend = {(t, period): (used, cap) for t, period, used, cap in gauges.tenant_spend}
    assert spend[("acme", "day")] == (pytest.approx(0.15), 1.0)
    assert spend[("acme", "month")] == (pytest.approx(0.15), 20.0)
    assert spend[("open", "day")] == (0.0, None)
    assert set(spend) == {(t, p) for t in ("acme", "tight", "open") for p in ("day", "month")}
    assert 0.0 < gauges.oldest_wait_seconds < 60
