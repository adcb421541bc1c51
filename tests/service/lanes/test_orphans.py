"""The sweep's chunk audit: a chunk left by a crash in any state without its owner is handed back
(real Redis and local storage; the broker is a recorder)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from service.context import Context
from service.jobs import intake
from service.jobs import model as js
from service.jobs.spec import parse_job_json
from service.lanes import orphans, plan, sweep
from service.queues import PLAN
from service.redis import keys
from tests.support.context import make_context, recorder
from tests.support.stack import job_body


@pytest.fixture
def ctx(tmp_path: Path, redis_url: str, redis_client) -> Iterator[Context]:
    redis_client.flushdb()
    context = make_context(tmp_path, redis_url, batch_max_lines=10)
    yield context
    context.redis.close()


def planned_job(ctx: Context, n: int = 20) -> tuple[str, list[int]]:
    spec = parse_job_json(orjson.dumps(job_body(n)), ctx.catalog, max_items=1000)
    job_id = intake.submit(ctx, spec, "default").job.id
    return job_id, plan.plan_job(ctx, job_id)


def test_a_planned_chunk_off_the_waiting_set_goes_back_on_it(ctx: Context) -> None:
    job_id, chunks = planned_job(ctx)
    ctx.redis.zrem(keys.WAITING_CHUNKS, f"{job_id}:{chunks[0]}")
    assert (job_id, chunks[0]) not in ctx.store.waiting_chunks()
    assert orphans.adopt(ctx, ctx.store.job(job_id)) == 1
    assert (job_id, chunks[0]) in ctx.store.waiting_chunks()
    # Nothing else was ownerless, and a second pass finds nothing.
    assert orphans.adopt(ctx, ctx.store.job(job_id)) == 0


def test_the_sweep_runs_the_audit_and_then_resubmits(ctx: Context) -> None:
    job_id, chunks = planned_job(ctx)
    ctx.redis.delete(keys.WAITING_CHUNKS)
    for n in chunks:
        ctx.redis.delete(keys.enqueued("batches.submit", f"{job_id}:{n}"))
    seen = sweep.sweep(ctx)
    assert seen["adopted"] == len(chunks)
    assert sorted(ctx.store.waiting_chunks()) == [(job_id, n) for n in chunks]
    # At most once every few sweeps per job: the next sweep does not audit again.
    assert sweep.sweep(ctx)["adopted"] == 0


def test_an_upstream_chunk_off_the_active_set_is_watched_again(ctx: Context) -> None:
    job_id, chunks = planned_job(ctx)
    ctx.store.set_chunk_status_if(job_id, chunks[0], [js.CHUNK_PLANNED], js.CHUNK_SUBMITTED)
    ctx.redis.zrem(keys.WAITING_CHUNKS, f"{job_id}:{chunks[0]}")
    assert orphans.adopt(ctx, ctx.store.job(job_id)) == 1
    assert [(j, n) for j, n, _ in ctx.store.active_chunks()] == [(job_id, chunks[0])]


def test_an_assembling_chunk_is_replanned_only_when_no_planner_holds_the_job(
    ctx: Context,
) -> None:
    job_id, _ = planned_job(ctx, 5)
    number = ctx.store.new_chunk(job_id, endpoint="/v1/images/generations", model="gpt-image-2")
    recorder(ctx).sent.clear()
    ctx.redis.set(keys.plan_lock(job_id), "someone", px=30_000)
    assert orphans.adopt(ctx, ctx.store.job(job_id)) == 0
    ctx.redis.delete(keys.plan_lock(job_id))
    assert orphans.adopt(ctx, ctx.store.job(job_id)) == 1
    assert recorder(ctx).named(PLAN) == [(job_id,)]
    # The plan it sent closes the chunk (empty here, so it will end as such when submitted).
    plan.plan_job(ctx, job_id)
    assert ctx.store.chunk(job_id, number).status == js.CHUNK_PLANNED
    assert (job_id, number) in ctx.store.waiting_chunks()


def test_a_cancel_cut_short_is_finished_so_the_job_can_end(ctx: Context) -> None:
    job_id, chunks = planned_job(ctx)
    ctx.store.set_job_status_if(job_id, js.JOB_LIVE, js.JOB_CANCELLING)
    # Killed after marking the first chunk cancelled, before cancelling its items; the second
    # was taken off the waiting set and never cancelled at all.
    ctx.store.set_chunk_status_if(job_id, chunks[0], [js.CHUNK_PLANNED], js.CHUNK_CANCELLED)
    ctx.store.unmark(job_id, chunks[0])
    ctx.store.unmark(job_id, chunks[1])
    assert ctx.store.counts(job_id)["queued"] == 20
    assert orphans.adopt(ctx, ctx.store.job(job_id)) == 2
    counts = ctx.store.counts(job_id)
    assert counts["queued"] == 0 and counts["cancelled"] == 20
    assert {c.status for c in ctx.store.job_chunks(job_id)} == {js.CHUNK_CANCELLED}


def test_close_chunk_is_one_step_and_idempotent(ctx: Context) -> None:
    job_id, _ = planned_job(ctx, 5)
    number = ctx.store.new_chunk(job_id, endpoint="/v1/images/generations", model="gpt-image-2")
    assert ctx.store.close_chunk(job_id, number)
    assert ctx.store.chunk(job_id, number).status == js.CHUNK_PLANNED
    assert (job_id, number) in ctx.store.waiting_chunks()
    assert ctx.store.close_chunk(job_id, number)  # again: still planned and waiting
    ctx.store.set_chunk_status_if(job_id, number, [js.CHUNK_PLANNED], js.CHUNK_SUBMITTED)
    assert not ctx.store.close_chunk(job_id, number)  # moved on: left alone
