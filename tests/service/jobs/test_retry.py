"""Retry in place, step by step: a real Redis, the simulator (blocking prompts that say
"forbidden") and local storage; each lane step called as its task would call it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.context import Context
from service.errors import Problem
from service.jobs import retry
from service.lanes import finalize, plan
from service.storage import request_version_key
from tests.service.lanes.test_reuse_lane import accept, billed_images, manifest, run
from tests.support.context import make_context
from tests.support.simulator import SimulatorHandle, start_instant_simulator
from tests.support.stack import job_body


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimulatorHandle]:
    handle = start_instant_simulator(tmp_path_factory.mktemp("sim"), moderation_words="forbidden")
    yield handle
    handle.stop()


@pytest.fixture
def ctx(
    tmp_path: Path, redis_url: str, redis_client: Any, sim: SimulatorHandle
) -> Iterator[Context]:
    context = make_context(tmp_path, redis_url, sim.url)
    yield context
    context.redis.close()


def blocked_job(ctx: Context, n: int = 6, blocked: tuple[int, ...] = (1, 4)) -> str:
    body = job_body(n)
    for i in blocked:
        body["items"][i]["prompt"] = f"A forbidden scene {i}"
    job_id = accept(ctx, body)
    assert run(ctx, job_id) == "partially_failed"
    return job_id


def retry_body(raw: dict[str, Any]) -> retry.RetryRequest:
    return retry.parse_retry_body(orjson.dumps(raw))


def test_rewritten_prompts_end_the_job_succeeded_with_one_manifest(
    ctx: Context, sim: SimulatorHandle
) -> None:
    job_id = blocked_job(ctx)
    first_spend = ctx.store.spend(job_id)
    before = billed_images(sim)
    wanted = retry_body(
        {
            "items": [
                {"id": "sku-1", "prompt": "A calm studio scene 1"},
                {"id": "sku-4", "prompt": "A calm studio scene 4"},
            ]
        }
    )
    outcome = retry.retry_job(ctx, ctx.store.job(job_id), wanted)
    assert outcome.retried == 2 and outcome.created
    job = ctx.store.job(job_id)
    assert job.status == "queued" and job.retries == 1 and job.finished_at is None
    assert ctx.store.counts(job_id) == {
        "pending": 2,
        "queued": 0,
        "succeeded": 4,
        "failed": 0,
        "cancelled": 0,
    }
    assert ("jobs.plan", job_id) in ctx.enqueue.sent  # type: ignore[attr-defined]
    assert run(ctx, job_id) == "succeeded"
    assert billed_images(sim) - before == 2
    lines = manifest(ctx, job_id)
    assert len(lines) == 6 and all(m["status"] == "succeeded" for m in lines.values())
    assert lines["sku-0"]["usage"]["image_output"] > 0  # the first run's items kept their record
    spend = ctx.store.spend(job_id)
    assert spend["images"] == first_spend["images"] + 2
    assert spend["cost:batch"] > first_spend["cost:batch"]
    # The request as submitted is kept; the current one carries the rewritten prompts.
    old = [orjson.loads(x) for x in ctx.storage.iter_lines(request_version_key(job_id, 1))]
    new = [orjson.loads(x) for x in ctx.storage.iter_lines(f"jobs/{job_id}/request.jsonl")]
    assert old[1]["body"]["prompt"] == "A forbidden scene 1"
    assert new[1]["body"]["prompt"] == "A calm studio scene 1"
    assert new[0] == old[0] and len(new) == 6


def test_plain_retry_takes_the_failed_items_and_a_running_job_is_a_conflict(
    ctx: Context, sim: SimulatorHandle
) -> None:
    job_id = blocked_job(ctx)
    outcome = retry.retry_job(ctx, ctx.store.job(job_id), retry.parse_retry_body(b""))
    assert outcome.retried == 2
    with pytest.raises(Problem) as exc:
        retry.retry_job(ctx, ctx.store.job(job_id), retry.parse_retry_body(b""))
    assert exc.value.status == 409
    # Same prompts: blocked again; nothing else changed.
    assert run(ctx, job_id) == "partially_failed"
    assert {i for i, m in manifest(ctx, job_id).items() if m["status"] == "failed"} == {
        "sku-1",
        "sku-4",
    }
    assert manifest(ctx, job_id)["sku-1"]["attempts"] == 1


def test_an_idempotency_key_makes_the_call_safe_to_repeat(ctx: Context) -> None:
    job_id = blocked_job(ctx)
    wanted = retry.parse_retry_body(b"{}")
    first = retry.retry_job(ctx, ctx.store.job(job_id), wanted, "retry-1")
    again = retry.retry_job(ctx, ctx.store.job(job_id), wanted, "retry-1")
    assert (first.created, again.created) == (True, False)
    assert again.retried == first.retried == 2
    assert ctx.store.job(job_id).retries == 1
    assert len([s for s in ctx.enqueue.sent if s[0] == "jobs.plan"]) == 2  # type: ignore[attr-defined]


def test_bad_retry_requests_name_the_field_item_and_id(ctx: Context) -> None:
    job_id = blocked_job(ctx)
    job = ctx.store.job(job_id)
    with pytest.raises(Problem) as exc:
        retry.retry_job(ctx, job, retry_body({"items": [{"id": "sku-1"}, {"id": "nope"}]}))
    assert exc.value.status == 422
    assert [(e.field, e.index, e.id) for e in exc.value.errors] == [("items[1].id", 1, "nope")]
    with pytest.raises(Problem) as exc:
        retry.retry_job(
            ctx, job, retry_body({"items": [{"id": "sku-1", "size": "999x999", "colour": "red"}]})
        )
    fields = {e.field for e in exc.value.errors}
    assert "items[0].size" in fields and "items[0].colour" in fields
    with pytest.raises(Problem) as exc:
        retry_body({"statuses": ["broken"], "max_cost_usd": -1})
    assert {e.field for e in exc.value.errors} == {"statuses[0]", "max_cost_usd"}
    # Nothing was changed by the refused calls.
    assert ctx.store.job(job_id).status == "partially_failed"
    assert finalize.finalize_job(ctx, job_id) is None and plan.plan_job(ctx, job_id) == []


def test_no_items_to_retry_is_a_conflict(ctx: Context) -> None:
    job_id = accept(ctx, job_body(2))
    assert run(ctx, job_id) == "succeeded"
    with pytest.raises(Problem) as exc:
        retry.retry_job(ctx, ctx.store.job(job_id), retry.parse_retry_body(b""))
    assert exc.value.status == 409 and "no failed items" in exc.value.detail


def test_a_listed_succeeded_item_is_made_again_not_reused_from_itself(
    ctx: Context, sim: SimulatorHandle
) -> None:
    job_id = accept(ctx, job_body(3))
    assert run(ctx, job_id) == "succeeded"
    before = billed_images(sim)
    outcome = retry.retry_job(ctx, ctx.store.job(job_id), retry_body({"items": [{"id": "sku-0"}]}))
    assert outcome.retried == 1
    assert run(ctx, job_id) == "succeeded"
    assert billed_images(sim) - before == 1
    line = manifest(ctx, job_id)["sku-0"]
    assert "reused_from" not in line and line["cost_usd"] > 0
