"""The batch path's plain functions against a real Redis, the simulator over HTTP and local storage.

Tasks are not run here: each step is called directly, the way a worker's task adapter calls it,
so a test can repeat a step (a redelivered task) or stop between two (a crash).
"""

from __future__ import annotations

import base64
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
import orjson
import pybase64
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.context import Context
from service.jobs import intake
from service.jobs import model as js
from service.jobs.spec import parse_job_json
from service.lanes import collect, finalize, items, plan, submit, sweep
from service.storage import StorageError, image_key
from tests.support.context import make_context
from tests.support.procs import wait_until
from tests.support.simulator import SimulatorHandle, start_instant_simulator
from tests.support.stack import job_body


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimulatorHandle]:
    handle = start_instant_simulator(tmp_path_factory.mktemp("sim"))
    yield handle
    handle.stop()


@pytest.fixture
def ctx(
    tmp_path: Path, redis_url: str, redis_client: Any, sim: SimulatorHandle
) -> Iterator[Context]:
    context = make_context(tmp_path, redis_url, sim.url, batch_max_lines=10)
    yield context
    context.redis.close()


def accept(ctx: Context, n: int, **extra: Any) -> str:
    spec = parse_job_json(orjson.dumps(job_body(n, **extra)), ctx.catalog, max_items=1000)
    job_id = intake.submit(ctx, spec, "default").job.id
    return job_id


def run_until_collectable(ctx: Context, job_id: str) -> list[int]:
    chunks = plan.plan_job(ctx, job_id)
    for n in chunks:
        assert submit.submit_chunk(ctx, job_id, n) == "submitted"

    def ended() -> bool:
        sweep.sweep(ctx)
        return all(ctx.store.chunk(job_id, n).status == js.CHUNK_COLLECTING for n in chunks)

    wait_until(ended, timeout=30, message="every upstream batch to end")
    return chunks


def test_plan_respects_line_cap_and_one_endpoint_per_chunk(ctx: Context) -> None:
    job_id = accept(ctx, 25)
    chunks = plan.plan_job(ctx, job_id)
    sizes = [ctx.store.chunk(job_id, n).lines for n in chunks]
    assert sizes == [10, 10, 5]
    assert ctx.store.counts(job_id)["queued"] == 25
    # Planning again (a redelivered task) moves nothing twice.
    assert plan.plan_job(ctx, job_id) == []
    assert sum(ctx.store.chunk(job_id, n).lines for n in ctx.store.chunks(job_id)) == 25


def test_collecting_the_same_output_twice_changes_nothing(
    ctx: Context, sim: SimulatorHandle, tmp_path: Path
) -> None:
    job_id = accept(ctx, 12)
    chunks = run_until_collectable(ctx, job_id)
    for n in chunks:
        collect.collect_chunk(ctx, job_id, n)
    spend = ctx.store.spend(job_id)
    totals = ctx.redis.hgetall("ib:m:tokens")
    assert ctx.store.counts(job_id)["succeeded"] == 12
    # A redelivered collect of every chunk: same images, same spend, same totals.
    for n in chunks:
        ctx.store.update_chunk(job_id, n, status=js.CHUNK_COLLECTING)
        again = collect.collect_chunk(ctx, job_id, n)
        assert again is not None and again.succeeded == 0
    assert ctx.store.spend(job_id) == spend
    assert ctx.redis.hgetall("ib:m:tokens") == totals
    billed = sim.stats()["batches"]
    batch_ids = [ctx.store.chunk(job_id, n).batch_id for n in chunks]
    assert spend["image_output"] == sum(billed[b]["tokens"]["image_output"] for b in batch_ids)
    assert spend["text_input"] == sum(billed[b]["tokens"]["text_input"] for b in batch_ids)
    assert finalize.finalize_job(ctx, job_id) == "succeeded"
    images = list((tmp_path / "storage" / "jobs" / job_id / "images").iterdir())
    assert len(images) == 12
    assert (tmp_path / "storage" / image_key(job_id, "sku-3", "png")).exists()


def test_a_retried_submit_adopts_the_batch_it_already_created(
    ctx: Context, sim: SimulatorHandle
) -> None:
    job_id = accept(ctx, 5)
    (n,) = plan.plan_job(ctx, job_id)
    assert submit.submit_chunk(ctx, job_id, n) == "submitted"
    first = ctx.store.chunk(job_id, n).batch_id
    # The worker died after creating the batch and before recording it.
    ctx.store.update_chunk(job_id, n, status=js.CHUNK_PLANNED, batch_id=None)
    assert submit.submit_chunk(ctx, job_id, n) == "submitted"
    assert ctx.store.chunk(job_id, n).batch_id == first
    tagged = [
        b
        for b in sim.client().batches.list(limit=100)
        if (b.metadata or {}).get("imagebatch_chunk", "").startswith(f"{job_id}:{n}:")
    ]
    assert len(tagged) == 1


def test_submit_of_a_submitted_chunk_does_nothing(ctx: Context) -> None:
    job_id = accept(ctx, 3)
    (n,) = plan.plan_job(ctx, job_id)
    assert submit.submit_chunk(ctx, job_id, n) == "submitted"
    assert submit.submit_chunk(ctx, job_id, n) == "already"


def test_error_lines_are_classified() -> None:
    moderation = {
        "custom_id": "1",
        "response": {
            "status_code": 400,
            "body": {
                "error": {
                    "code": "moderation_blocked",
                    "type": "image_generation_user_error",
                    "message": "blocked",
                    "moderation_details": {"moderation_stage": "input", "categories": ["violence"]},
                }
            },
        },
        "error": None,
    }
    assert items.error_from_line(moderation)["retryable"] is False
    assert items.error_from_line(moderation)["moderation_details"]["categories"] == ["violence"]
    expired = {
        "custom_id": "2",
        "response": None,
        "error": {"code": "batch_expired", "message": "late"},
    }
    assert items.error_from_line(expired)["retryable"] is True
    server = {
        "custom_id": "3",
        "response": {
            "status_code": 500,
            "body": {"error": {"message": "oops", "type": "server_error"}},
        },
    }
    assert items.error_from_line(server)["retryable"] is True


def test_token_limit_exceeded_upstream_puts_the_chunk_back_to_wait(
    tmp_path: Path, redis_url: str, redis_client: Any
) -> None:
    # Upstream's enqueued-token limit is lower than we were told (ours is unset): the second
    # job's batch is created, then fails with token_limit_exceeded, as OpenAI does.
    sim = start_instant_simulator(tmp_path / "sim", rate=8, batch_queue_tokens=200)
    ctx = make_context(tmp_path, redis_url, sim.url, poll_seconds=0.2)
    try:
        first, second = accept(ctx, 10, prefix="a"), accept(ctx, 10, prefix="b")
        (n1,) = plan.plan_job(ctx, first)
        (n2,) = plan.plan_job(ctx, second)
        assert submit.submit_chunk(ctx, first, n1) == "submitted"
        assert submit.submit_chunk(ctx, second, n2) == "submitted"

        def collecting(job_id: str, n: int) -> bool:
            sweep.sweep(ctx)
            return ctx.store.chunk(job_id, n).status == js.CHUNK_COLLECTING

        wait_until(lambda: collecting(second, n2), timeout=30, message="the second batch to fail")
        collect.collect_chunk(ctx, second, n2)
        chunk = ctx.store.chunk(second, n2)
        assert chunk is not None and chunk.status == js.CHUNK_WAITING
        assert chunk.last_error == "token_limit_exceeded"
        assert (
            ctx.store.counts(second)["failed"] == 0
        )  # nothing is lost: the items wait with their chunk

        wait_until(lambda: collecting(first, n1), timeout=30, message="the first batch to finish")
        collect.collect_chunk(ctx, first, n1)
        assert submit.submit_chunk(ctx, second, n2) == "submitted"  # what the sweep's retry does
        wait_until(
            lambda: collecting(second, n2), timeout=30, message="the resubmitted batch to finish"
        )
        collect.collect_chunk(ctx, second, n2)
        assert finalize.finalize_job(ctx, second) == "succeeded"
        tags = [
            b.metadata["imagebatch_chunk"]
            for b in sim.client().batches.list(limit=100)
            if (b.metadata or {}).get("imagebatch_job") == second
        ]
        assert sorted(tags) == [f"{second}:{n2}:1", f"{second}:{n2}:2"]
    finally:
        ctx.redis.close()
        sim.stop()


# --- collect into S3: concurrent uploads, exactly once, bounded ----------------------------------


class CrashingStorage:
    """The real S3 adapter, except that the worker "dies" on its ``crash_at``-th image write
    (that write and every later one raise, as a killed process would never write them); the
    puts that went through are counted. ``hold`` (an Event) keeps every write waiting."""

    def __init__(self, inner: Any, crash_at: int | None = None, hold: Any = None) -> None:
        self.inner, self.crash_at, self.hold = inner, crash_at, hold
        self.puts = 0
        self.lock = threading.Lock()

    def put_bytes(self, key: str, data: bytes, **kwargs: Any) -> None:
        if self.hold is not None:
            self.hold.wait(30)
        with self.lock:
            if self.crash_at is not None and self.puts + 1 >= self.crash_at:
                raise StorageError("the worker was killed", key=key)
            self.puts += 1
        self.inner.put_bytes(key, data, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
def s3_ctx(
    tmp_path: Path, redis_url: str, redis_client: Any, sim: SimulatorHandle, s3_endpoint: str
) -> Iterator[Context]:
    bucket = f"collect-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(
        Bucket=bucket
    )
    context = make_context(
        tmp_path,
        redis_url,
        sim.url,
        storage_url=f"s3://{bucket}/out",
        s3_endpoint_url=s3_endpoint,
        s3_region="us-east-1",
        s3_path_style=True,
        batch_max_lines=40,
    )
    yield context
    context.redis.close()


def test_collect_into_s3_after_a_crash_stores_each_image_once_and_counts_once(
    s3_ctx: Context, sim: SimulatorHandle
) -> None:
    ctx = s3_ctx
    job_id = accept(ctx, 40)
    (n,) = run_until_collectable(ctx, job_id)
    real = ctx.storage
    ctx.storage = CrashingStorage(real, crash_at=15)  # type: ignore[assignment]
    with pytest.raises(StorageError):
        collect.collect_chunk(ctx, job_id, n, upload_threads=8)
    done_before = ctx.store.counts(job_id).get("succeeded", 0)
    assert 0 < done_before < 40
    # The next worker takes the chunk over (the lease was released, or lapsed after a kill).
    ctx.storage = CrashingStorage(real)  # type: ignore[assignment]
    again = collect.collect_chunk(ctx, job_id, n, upload_threads=8)
    assert again is not None and again.succeeded == 40 - done_before
    # Only images not yet counted were written again (under the same keys), not the others.
    assert ctx.storage.puts == 40 - done_before  # type: ignore[attr-defined]
    assert ctx.store.counts(job_id)["succeeded"] == 40
    objects = list(real.list(f"jobs/{job_id}/images/"))
    assert len(objects) == 40
    assert real.head(objects[0].key).metadata["sha256"]
    billed = sim.stats()["batches"][ctx.store.chunk(job_id, n).batch_id]["tokens"]
    spend = ctx.store.spend(job_id)
    assert spend["image_output"] == billed["image_output"]


def test_collect_holds_a_bounded_number_of_lines_while_storage_is_slow(
    s3_ctx: Context,
) -> None:
    """Whatever the file's size, at most two lines per upload thread are read ahead of
    storage: with every write held, the reader stops there until writes go through."""
    ctx = s3_ctx
    job_id = accept(ctx, 40)
    (n,) = run_until_collectable(ctx, job_id)
    hold = threading.Event()
    ctx.storage = CrashingStorage(ctx.storage, hold=hold)  # type: ignore[assignment]
    read = [0]
    file_lines = ctx.upstream.file_lines

    @contextmanager
    def counted(file_id: str) -> Iterator[Iterator[bytes]]:
        with file_lines(file_id) as lines:

            def each() -> Iterator[bytes]:
                for raw in lines:
                    read[0] += 1
                    yield raw

            yield each()

    ctx.upstream.file_lines = counted  # type: ignore[method-assign]
    threads = 4
    worker = threading.Thread(
        target=collect.collect_chunk, args=(ctx, job_id, n), kwargs={"upload_threads": threads}
    )
    worker.start()
    try:
        wait_until(lambda: read[0] >= 2 * threads, timeout=30, message="lines to be read ahead")
        # For a second, with every write held: the reader stays where its slots ran out (two
        # lines a thread, and the one it waits to hand over).
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            assert read[0] <= 2 * threads + 1
            time.sleep(0.02)
    finally:
        hold.set()
        worker.join(60)
    assert ctx.store.counts(job_id)["succeeded"] == 40


def spy_state_reads(ctx: Context) -> list[list[int]]:
    """The item indexes of every state read the store makes from now on, read by read."""
    reads: list[list[int]] = []
    item_states = ctx.store.item_states

    def counted(job: str, indexes: Sequence[int]) -> list[Any]:
        reads.append(list(indexes))
        return item_states(job, indexes)

    ctx.store.item_states = counted  # type: ignore[method-assign]
    return reads


def test_the_states_of_lines_handed_over_are_read_together(ctx: Context) -> None:
    """The first state a worker needs brings those of every line handed to the pool since; a
    line whose custom_id is not near its start is read on its own when its worker needs it."""
    job_id = accept(ctx, 4)
    reads = spy_state_reads(ctx)
    states = collect.StateReads(ctx, job_id)
    for i in range(3):
        states.expect(b'{"id":"r%d","custom_id":"%d","response":{}}' % (i, i))
    assert [states.state(i).id for i in (1, 0, 2)] == ["sku-1", "sku-0", "sku-2"]  # type: ignore[union-attr]
    states.expect(b'{"id":"r3","response":{"pad":"' + b"x" * 2000 + b'"},"custom_id":"3"}')
    assert states.state(3).id == "sku-3"  # type: ignore[union-attr]
    assert reads == [[0, 1, 2], [3]]


def test_a_collect_reads_each_items_state_once(ctx: Context) -> None:
    job_id = accept(ctx, 10)
    (n,) = run_until_collectable(ctx, job_id)
    reads = spy_state_reads(ctx)
    result = collect.collect_chunk(ctx, job_id, n, upload_threads=4)
    assert result is not None and result.succeeded == 10
    *output, missing = reads  # the last: the one page that looks for lines that never came
    assert sorted(i for read in output for i in read) == list(range(10))
    assert sorted(missing) == list(range(10))


# --- output lines: images left where they are -----------------------------------------------

JSON_TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=12) | st.sampled_from(
    ['"b64_json":"x"', '\\"b64_json\\":', "b64_json", '"', "\\"]
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | JSON_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(JSON_TEXT, inner, max_size=3),
    max_leaves=8,
)


def plain(value: Any) -> Any:
    """``value`` with every memoryview read as the str it stands for."""
    if isinstance(value, memoryview):
        return bytes(value).decode()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


@settings(max_examples=300, deadline=None)
@given(
    images=st.lists(st.binary(max_size=300), max_size=12),
    extra=st.dictionaries(JSON_TEXT, JSON_VALUES, max_size=3),
    spaced=st.booleans(),
)
def test_an_output_line_parses_as_json_does_with_its_images_left_in_place(
    images: list[bytes], extra: dict[str, Any], spaced: bool
) -> None:
    body = {"data": [{"b64_json": base64.b64encode(b).decode()} for b in images], **extra}
    rec = {"custom_id": "7", "response": {"status_code": 200, "body": body}, "x": extra}
    raw = orjson.dumps(rec)
    if spaced:
        raw = raw.replace(b'"b64_json":', b'"b64_json" :\t ')
    parsed = collect.parse_output_line(raw)
    assert plain(parsed) == orjson.loads(raw)
    for image, blob in zip(parsed["response"]["body"]["data"], images, strict=True):
        assert pybase64.b64decode(image["b64_json"], validate=True) == blob


def test_an_output_line_with_an_escaped_value_or_a_stray_key_parses_plainly() -> None:
    escaped = b'{"custom_id":"1","response":{"body":{"data":[{"b64_json":"ab\\/c"}]}}}'
    assert collect.parse_output_line(escaped) == orjson.loads(escaped)
    stray = b'{"custom_id":"1","error":{"b64_json":"QUJD"},"response":{"body":{"data":[]}}}'
    assert collect.parse_output_line(stray) == orjson.loads(stray)
    images = b'{"custom_id":"1","response":{"body":{"data":[{"b64_json":"QUJD"}]}}}'
    parsed = collect.parse_output_line(images)["response"]["body"]["data"][0]["b64_json"]
    assert isinstance(parsed, memoryview) and bytes(parsed) == b"QUJD"
