"""Intake, the one way a job comes in: validated, estimated, checked against the tenant's budget,
its request stored, then recorded and enqueued; a refusal stores nothing, and an Idempotency-Key
makes a repeated submission return the first job.

Real Redis, local storage in tmp_path (S3 on moto where a storage failure is the point), the
broker replaced by a recorder.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import orjson
import pytest
import redis
from botocore.config import Config

from service.context import Context
from service.errors import Problem
from service.jobs import intake
from service.jobs.intake import Submission
from service.queues import PLAN, SYNC_ITEMS
from service.redis import keys
from service.storage import StorageError, request_key
from tests.support.context import make_context, recorder
from tests.support.stack import job_body

# Enough for one small job a day and no more: 3 images at gpt-image-2 low cost ~$0.009 (batch).
TENANTS = """
[tenants.acme]
key_sha256 = ["{digest}"]
daily_usd = 0.005

[tenants.big]
key_sha256 = ["{other}"]
"""


@pytest.fixture
def ctx(tmp_path: Path, redis_url: str, redis_client: Any) -> Iterator[Context]:
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(TENANTS.format(digest="a" * 64, other="b" * 64))
    context = make_context(tmp_path, redis_url, tenants_file=tenants)
    yield context
    context.redis.close()


def submit(ctx: Context, body: dict[str, Any], tenant: str = "big", **kw: Any) -> Submission:
    return intake.submit_body(ctx, tenant, orjson.dumps(body), "application/json", {}, **kw)


def job_keys(r: redis.Redis) -> list[bytes]:
    return sorted(r.scan_iter("ib:job*"))


def stored_requests(ctx: Context) -> list[str]:
    return [info.key for info in ctx.storage.list("jobs/") if info.key.endswith("request.jsonl")]


def test_an_accepted_job_is_stored_recorded_and_enqueued(ctx: Context) -> None:
    done = submit(ctx, job_body(3, labels={"campaign": "spring"}))
    job = done.job
    assert done.created and job.status == "queued" and job.mode == "batch"
    assert (job.items, job.images, job.tenant, job.campaign) == (3, 3, "big", "spring")
    assert job.estimate is not None and job.estimate["tokens"]["image_output"] == 3 * 196
    lines = [orjson.loads(raw) for raw in ctx.storage.iter_lines(request_key(job.id))]
    assert [(r["index"], r["id"]) for r in lines] == [(0, "sku-0"), (1, "sku-1"), (2, "sku-2")]
    assert lines[0]["body"]["prompt"] == "Studio photo of product 0 on white"
    assert ctx.store.job(job.id) == job
    assert ctx.store.counts(job.id)["pending"] == 3
    assert recorder(ctx).sent == [(PLAN, job.id)]


def test_a_small_sync_job_goes_to_the_sync_lane(ctx: Context) -> None:
    job = submit(ctx, job_body(2, mode="sync")).job
    assert job.mode == "sync" and job.requested_mode == "sync"
    assert recorder(ctx).sent == [(SYNC_ITEMS, job.id)]


def test_a_csv_catalog_comes_in_the_same_way(ctx: Context) -> None:
    csv = b"sku,color\nmug-1,red\nmug-2,blue\n"
    params = {"template": "A {color} mug on white", "quality": "low"}
    job = intake.submit_body(ctx, "big", csv, "text/csv; charset=utf-8", params).job
    lines = [orjson.loads(raw) for raw in ctx.storage.iter_lines(request_key(job.id))]
    assert [(r["id"], r["body"]["prompt"]) for r in lines] == [
        ("mug-1", "A red mug on white"),
        ("mug-2", "A blue mug on white"),
    ]


def test_an_unknown_content_type_is_refused_with_415(ctx: Context, redis_client: Any) -> None:
    with pytest.raises(Problem) as caught:
        intake.submit_body(ctx, "big", b"<job/>", "application/xml", {})
    assert caught.value.status == 415
    assert job_keys(redis_client) == [] and recorder(ctx).sent == []


def test_a_tenant_over_its_cap_is_refused_and_nothing_is_stored(
    ctx: Context, redis_client: redis.Redis
) -> None:
    with pytest.raises(Problem) as caught:
        submit(ctx, job_body(3), tenant="acme")
    problem = caught.value.to_dict()
    assert problem["status"] == 422 and problem["type"].endswith("/budget")
    assert problem["remaining_usd"] == {"day": pytest.approx(0.005), "month": None}
    assert problem["estimate_usd"] > 0.005
    assert "acme" in problem["detail"] and "daily" in problem["detail"]
    assert job_keys(redis_client) == [] and stored_requests(ctx) == []
    assert recorder(ctx).sent == []
    assert submit(ctx, job_body(1), tenant="acme").created  # one image fits the cap


def test_same_idempotency_key_returns_the_first_job(
    ctx: Context, redis_client: redis.Redis
) -> None:
    first = submit(ctx, job_body(2), idempotency_key="order-17")
    again = submit(ctx, job_body(2), idempotency_key="order-17")
    assert first.created and not again.created
    assert again.job.id == first.job.id
    assert [j for j, _ in ctx.store.list_jobs("big")] == [first.job.id]
    assert len(stored_requests(ctx)) == 1
    assert recorder(ctx).sent == [(PLAN, first.job.id)]
    # Keys are per tenant: another tenant's "order-17" is its own job.
    other = submit(ctx, job_body(1), tenant="acme", idempotency_key="order-17")
    assert other.created and other.job.id != first.job.id


def test_concurrent_submissions_with_one_key_make_one_job(ctx: Context) -> None:
    # A client that timed out retries while its first request is still being stored.
    barrier = threading.Barrier(4)
    results: list[Submission | Problem] = []

    def go() -> None:
        barrier.wait()
        try:
            results.append(submit(ctx, job_body(300), idempotency_key="retry-me"))
        except Problem as exc:
            results.append(exc)

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    made = {r.job.id for r in results if isinstance(r, Submission)}
    assert len(ctx.store.list_jobs("big")) == 1, results
    assert len(made) == 1
    assert [r.created for r in results if isinstance(r, Submission)].count(True) == 1
    for r in results:
        if isinstance(r, Problem):  # still in progress: a conflict, retry later
            assert r.status == 409 and "Idempotency-Key" in r.detail


def test_an_idempotency_key_is_checked(ctx: Context, redis_client: redis.Redis) -> None:
    with pytest.raises(Problem) as caught:
        submit(ctx, job_body(1), idempotency_key="k" * 256)
    assert caught.value.status == 422
    assert caught.value.errors[0].field == "Idempotency-Key"
    assert job_keys(redis_client) == []


def test_a_storage_failure_records_nothing_and_frees_the_key(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, s3_endpoint: str
) -> None:
    def context(bucket: str) -> Context:
        return make_context(
            tmp_path,
            redis_url,
            storage_url=f"s3://{bucket}/imagebatch",
            s3_endpoint_url=s3_endpoint,
            s3_region="us-east-1",
            s3_path_style=True,
        )

    broken = context("bucket-that-was-deleted")
    with pytest.raises(StorageError):
        submit(broken, job_body(2), idempotency_key="order-18")
    assert job_keys(redis_client) == [] and recorder(broken).sent == []
    assert redis_client.exists(keys.idempotency("big", "order-18")) == 0
    # Storage back: the client's retry with the same key makes the job.
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}),
    )
    s3.create_bucket(Bucket="bucket-back-again")
    fixed = context("bucket-back-again")
    done = submit(fixed, job_body(2), idempotency_key="order-18")
    assert done.created
    obj = s3.get_object(Bucket="bucket-back-again", Key=f"imagebatch/{request_key(done.job.id)}")
    assert len(obj["Body"].read().splitlines()) == 2
    broken.redis.close()
    fixed.redis.close()
