"""The per-item steps both lanes share: what an upstream error means for its item (every shape
of reference/openai-facts.md §1.4 and §3.4), references resolved and uploaded once per job,
images stored under deterministic keys, usage counted once.

References go to a real simulator; storage is a local directory, or moto's S3 for a bucket
reference.
"""

from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import orjson
import pytest
from botocore.config import Config
from PIL import Image

from service.context import Context
from service.jobs import intake
from service.jobs import model as m
from service.jobs.spec import parse_job_json
from service.lanes import items
from service.lanes.items import BadReference, RefResolver
from service.storage import image_key
from tests.support.context import make_context
from tests.support.simulator import SimulatorHandle, start_simulator
from tests.support.stack import job_body

# --- what an error line means -----------------------------------------------------------------


def http_line(
    status: int, error: dict[str, Any] | None, request_id: str = "req_1"
) -> dict[str, Any]:
    body = {"error": error} if error is not None else {}
    return {
        "id": "batch_req_1",
        "custom_id": "7",
        "response": {"status_code": status, "request_id": request_id, "body": body},
        "error": None,
    }


def other_line(code: str | None, message: str | None = None) -> dict[str, Any]:
    error = None if code is None else {"code": code, "message": message}
    return {"id": "batch_req_1", "custom_id": "7", "response": None, "error": error}


MODERATION = {
    "message": "Your request was rejected by the safety system. safety_violations=[sexual].",
    "type": "image_generation_user_error",
    "param": None,
    "code": "moderation_blocked",
    "moderation_details": {"moderation_stage": "output", "categories": ["sexual"]},
}


def test_a_moderation_block_is_final_and_keeps_its_details() -> None:
    got = items.error_from_line(http_line(400, MODERATION, "req_abc"))
    assert got == {
        "code": "moderation_blocked",
        "message": MODERATION["message"],
        "status_code": 400,
        "type": "image_generation_user_error",
        "retryable": False,
        "moderation_details": {"moderation_stage": "output", "categories": ["sexual"]},
        "request_id": "req_abc",
    }


@pytest.mark.parametrize(
    ("status", "error", "code", "retryable"),
    [
        (500, {"message": "oops", "type": "server_error"}, "server_error", True),
        (503, None, "http_503", True),
        (429, {"message": "slow down", "code": "rate_limit_exceeded"}, "rate_limit_exceeded", True),
        (408, None, "http_408", True),
        (409, None, "http_409", True),
        (
            400,
            {"message": "bad size", "type": "invalid_request_error"},
            "invalid_request_error",
            False,
        ),
        (401, {"message": "no key", "code": "invalid_api_key"}, "invalid_api_key", False),
        (404, None, "http_404", False),
    ],
)
def test_an_http_failure_is_retried_only_when_upstream_may_do_better(
    status: int, error: dict[str, Any] | None, code: str, retryable: bool
) -> None:
    got = items.error_from_line(http_line(status, error))
    assert (got["code"], got["retryable"], got["status_code"]) == (code, retryable, status)
    assert got["message"] == ((error or {}).get("message") or f"upstream answered {status}")
    assert "moderation_details" not in got


@pytest.mark.parametrize(
    ("code", "retryable"),
    [
        ("batch_expired", True),
        ("batch_cancelled", True),
        ("missing_result", True),
        ("invalid_request", False),
        (None, False),
    ],
)
def test_a_line_that_never_ran_is_retried_when_it_expired_or_was_cancelled(
    code: str | None, retryable: bool
) -> None:
    got = items.error_from_line(other_line(code, "This request could not be executed."))
    assert got["code"] == (code or "unknown_error")
    assert got["retryable"] is retryable
    assert "status_code" not in got


def a_job(status: str) -> m.Job:
    return m.Job("job_1", "t", status, "gpt-image-2", "batch", 1, 1, 0.0)


@pytest.mark.parametrize(
    ("status", "error", "action"),
    [
        (m.JOB_RUNNING, {"code": "server_error", "retryable": True}, "retry"),
        (m.JOB_RUNNING, {"code": "moderation_blocked", "retryable": False}, "fail"),
        (m.JOB_QUEUED, {"code": "batch_expired"}, "retry"),  # known code, flag missing
        (m.JOB_CANCELLING, {"code": "batch_cancelled", "retryable": True}, "cancel"),
        (m.JOB_CANCELLING, {"code": "moderation_blocked", "retryable": False}, "fail"),
    ],
)
def test_a_failed_line_is_retried_failed_or_cancelled(
    status: str, error: dict[str, Any], action: str
) -> None:
    assert items.line_failure_action(a_job(status), error) == action


def test_outcomes_are_named_for_the_collect_counters() -> None:
    assert [items.outcome_name(s) for s in (m.PENDING, m.FAILED, m.CANCELLED, m.QUEUED)] == [
        "retried",
        "failed",
        "cancelled",
        None,
    ]


# --- references --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimulatorHandle]:
    handle = start_simulator(tmp_path_factory.mktemp("sim"), plain_images=True)
    yield handle
    handle.stop()


@pytest.fixture
def ctx(
    tmp_path: Path, redis_url: str, redis_client: Any, sim: SimulatorHandle
) -> Iterator[Context]:
    (tmp_path / "refs").mkdir()
    context = make_context(
        tmp_path,
        redis_url,
        sim.url,
        local_ref_roots=[tmp_path / "refs"],
        reference_prefixes=["https://cdn.example.test/"],
    )
    yield context
    context.redis.close()


def png(color: str = "red") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(out, "PNG")
    return out.getvalue()


def vision_files(sim: SimulatorHandle) -> list[str]:
    return [f.id for f in sim.client().files.list(purpose="vision")]


def resolver(ctx: Context, job_id: str) -> RefResolver:
    """References resolved for the open API's tenant (the jobs here exist only by id)."""
    return RefResolver(ctx, job_id, intake.job_scope(ctx, "default"))


def test_urls_and_file_ids_pass_through_without_an_upload(
    ctx: Context, sim: SimulatorHandle
) -> None:
    before = vision_files(sim)
    refs = resolver(ctx, "job_1")
    assert refs.ref("https://cdn.example.test/a.png") == {
        "image_url": "https://cdn.example.test/a.png"
    }
    assert refs.ref("data:image/png;base64,AAAA") == {"image_url": "data:image/png;base64,AAAA"}
    assert refs.ref("file-abc123") == {"file_id": "file-abc123"}
    plain = {"model": "gpt-image-2", "prompt": "x"}
    assert refs.resolve(plain) is plain
    assert vision_files(sim) == before


def test_a_stored_reference_is_uploaded_once_per_job(
    ctx: Context, sim: SimulatorHandle, tmp_path: Path
) -> None:
    photo = tmp_path / "refs" / "mug.png"
    photo.write_bytes(png())
    uri = photo.as_uri()
    before = set(vision_files(sim))
    body = {"model": "gpt-image-2", "prompt": "x", "images": [uri, uri], "mask": uri}
    resolved = resolver(ctx, "job_1").resolve(body)
    (file_id,) = set(vision_files(sim)) - before
    assert resolved["images"] == [{"file_id": file_id}, {"file_id": file_id}]
    assert resolved["mask"] == {"file_id": file_id}
    assert body["images"] == [uri, uri]  # the stored request is not changed
    # Another worker resolving for the same job (a retried item) uploads nothing again.
    assert resolver(ctx, "job_1").ref(uri) == {"file_id": file_id}
    assert len(set(vision_files(sim)) - before) == 1
    assert sim.client().files.content(file_id).content == photo.read_bytes()
    # Another job uploads its own copy.
    other = resolver(ctx, "job_2").ref(uri)["file_id"]
    assert other != file_id and len(set(vision_files(sim)) - before) == 2


def test_a_reference_that_cannot_be_read_is_a_bad_reference(
    ctx: Context, sim: SimulatorHandle, tmp_path: Path
) -> None:
    before = vision_files(sim)
    refs = resolver(ctx, "job_1")
    missing = (tmp_path / "refs" / "gone.png").as_uri()
    with pytest.raises(BadReference, match=r"gone\.png"):
        refs.ref(missing)
    outside = tmp_path / "secret.png"
    outside.write_bytes(png())
    with pytest.raises(BadReference, match="outside the prefixes") as caught:
        refs.ref(outside.as_uri())  # not under IMAGEBATCH_LOCAL_REF_ROOTS: never read
    assert caught.value.code == "reference_not_allowed"
    with pytest.raises(BadReference):
        refs.ref("s3://bucket/key.png")  # no prefix allows it (and local storage reads no s3)
    assert vision_files(sim) == before


def test_a_bucket_reference_is_uploaded_once(
    tmp_path: Path, redis_url: str, redis_client: Any, sim: SimulatorHandle, s3_endpoint: str
) -> None:
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}),
    )
    s3.create_bucket(Bucket="catalog-photos")
    s3.put_object(Bucket="catalog-photos", Key="mugs/blue.png", Body=png("blue"))
    s3.create_bucket(Bucket="imagebatch-out")
    ctx = make_context(
        tmp_path,
        redis_url,
        sim.url,
        storage_url="s3://imagebatch-out/p",
        s3_endpoint_url=s3_endpoint,
        s3_region="us-east-1",
        s3_path_style=True,
        reference_prefixes=["s3://catalog-photos/"],
    )
    try:
        before = set(vision_files(sim))
        refs = resolver(ctx, "job_1")
        first = refs.ref("s3://catalog-photos/mugs/blue.png")
        assert refs.ref("s3://catalog-photos/mugs/blue.png") == first
        assert set(vision_files(sim)) - before == {first["file_id"]}
        with pytest.raises(BadReference) as caught:
            refs.ref("s3://catalog-photos/mugs/none.png")
        assert caught.value.code == "reference_unreadable"
    finally:
        ctx.redis.close()


# --- images and usage ----------------------------------------------------------------------


def accepted(ctx: Context, n: int = 2) -> m.Job:
    spec = parse_job_json(orjson.dumps(job_body(n)), ctx.catalog, max_items=10)
    return intake.submit(ctx, spec, "default").job


def test_images_go_under_deterministic_keys_and_a_repeat_overwrites(
    ctx: Context, tmp_path: Path
) -> None:
    job = accepted(ctx)
    one, two = png("red"), png("blue")
    response = {
        "data": [{"b64_json": base64.b64encode(b).decode()} for b in (one, two)],
        "output_format": "jpeg",
        "size": "1024x1024",
        "quality": "low",
    }
    keys, size = items.store_images(ctx, job, "sku-0", response)
    assert keys == [image_key(job.id, "sku-0", "jpg", 0), image_key(job.id, "sku-0", "jpg", 1)]
    assert size == len(one) + len(two)
    assert items.store_images(ctx, job, "sku-0", response) == (keys, size)
    folder = tmp_path / "storage" / "jobs" / job.id / "images"
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        "sku-0-0.jpg",
        "sku-0-1.jpg",
    ]
    info = ctx.storage.head(keys[1])
    assert info.content_type == "image/jpeg"
    assert info.metadata["sha256"] == hashlib.sha256(two).hexdigest()
    assert info.metadata["item"] == "sku-0" and info.metadata["job"] == job.id
    single = {"data": [{"b64_json": base64.b64encode(one).decode()}]}
    assert items.store_images(ctx, job, "sku-1", single)[0] == [image_key(job.id, "sku-1", "png")]


def test_usage_is_priced_and_counted_once(ctx: Context) -> None:
    job = accepted(ctx, n=1)
    number = ctx.store.new_chunk(job.id)
    ctx.store.assign(job.id, number, [0])
    usage = {
        "input_tokens": 12,
        "output_tokens": 196,
        "input_tokens_details": {"text_tokens": 12, "image_tokens": 0},
        "output_tokens_details": {"image_tokens": 196, "text_tokens": 0},
    }
    counted, cost = items.record_usage(ctx, job, number, 0, usage, ["k"], tier="batch")
    assert counted and cost > 0
    again, same = items.record_usage(ctx, job, number, 0, usage, ["k"], tier="batch")
    assert not again and same == cost
    spend = ctx.store.spend(job.id)
    assert spend["cost:batch"] == cost and spend["images"] == 1
    assert spend["image_output"] == 196 and spend["text_input"] == 12
    assert ctx.store.counts(job.id)["succeeded"] == 1
    (record,) = ctx.store.item_usage(job.id, [0])
    assert record is not None and record["keys"] == ["k"] and record["tier"] == "batch"
