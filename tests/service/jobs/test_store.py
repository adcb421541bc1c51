"""Job, chunk and item state through JobStore on a real Redis: what is written reads back the
same, every item transition is atomic and counted once, and a repeated call changes nothing."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import redis

from service.jobs import model as m
from service.jobs.store import SPEND, TOTAL_COST, TOTAL_IMAGES, TOTAL_TOKENS, JobStore
from service.redis import keys

MODEL = "gpt-image-2"


@pytest.fixture
def store(redis_client: redis.Redis) -> JobStore:
    return JobStore(redis_client)


def a_job(job_id: str = "job_0193a1b2c3d4e5f6", n: int = 4, **fields: Any) -> m.Job:
    now = time.time()
    base: dict[str, Any] = {
        "id": job_id,
        "tenant": "acme",
        "status": m.JOB_QUEUED,
        "model": MODEL,
        "mode": "batch",
        "items": n,
        "images": n,
        "created_at": now,
        "updated_at": now,
    }
    return m.Job(**(base | fields))


def with_items(store: JobStore, job: m.Job) -> str:
    store.create_job(job, (f"sku-{i}" for i in range(job.items)))
    return job.id


def queued_in_chunk(store: JobStore, job: m.Job, indexes: list[int] | None = None) -> int:
    """A chunk holding ``indexes`` (default: every item), as plan leaves it."""
    with_items(store, job)
    number = store.new_chunk(job.id, endpoint="/v1/images/generations", model=MODEL)
    assert store.assign(job.id, number, indexes or list(range(job.items))) == len(
        indexes or range(job.items)
    )
    return number


def states(store: JobStore, job_id: str, n: int) -> list[tuple[str, int, int]]:
    return [(s.status, s.attempts, s.chunk) for s in store.item_states(job_id, range(n)) if s]


# --- jobs ------------------------------------------------------------------------------------


def test_a_job_reads_back_as_it_was_recorded(store: JobStore) -> None:
    job = a_job(
        requested_mode="auto",
        labels={"campaign": "spring", "team": "catalog"},
        estimate={"tokens": {"image_output": 784}, "usd": {"batch": 0.01, "sync": 0.02}},
        max_cost_usd=12.5,
        webhook_url="https://example.test/hook",
        idempotency_key="order-17",
    )
    with_items(store, job)
    assert store.job(job.id) == job
    assert store.job(job.id).campaign == "spring"  # type: ignore[union-attr]
    assert store.job(job.id).max_cost_nanousd == 12_500_000_000  # type: ignore[union-attr]
    assert store.job("job_nope") is None


def test_a_new_job_has_every_item_pending_and_is_listed(store: JobStore) -> None:
    older = with_items(store, a_job("job_a", created_at=1000.0))
    newer = with_items(store, a_job("job_b", created_at=2000.0))
    assert states(store, newer, 4) == [(m.PENDING, 0, m.NO_CHUNK)] * 4
    assert [s.id for s in store.item_states(newer, [0, 3]) if s] == ["sku-0", "sku-3"]
    assert store.counts(newer) == {
        "pending": 4,
        "queued": 0,
        "succeeded": 0,
        "failed": 0,
        "cancelled": 0,
    }
    assert store.list_jobs("acme") == [(newer, 2000.0), (older, 1000.0)]
    assert store.list_jobs("acme", before=2000.0) == [(older, 1000.0)]
    assert store.list_jobs("other") == []
    assert store.active_jobs() == [older, newer]


def test_job_status_changes_only_from_an_allowed_status(store: JobStore) -> None:
    job_id = with_items(store, a_job())
    assert not store.set_job_status_if(job_id, [m.JOB_RUNNING], "succeeded")
    assert store.job_status(job_id) == m.JOB_QUEUED
    # Ten workers race to start the job: exactly one moves it.
    barrier = threading.Barrier(10)
    moved: list[bool] = []

    def start() -> None:
        barrier.wait()
        moved.append(store.set_job_status_if(job_id, [m.JOB_QUEUED], m.JOB_RUNNING))

    threads = [threading.Thread(target=start) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert moved.count(True) == 1
    assert store.job_status(job_id) == m.JOB_RUNNING


def test_stop_for_budget_is_seen_by_the_next_reader(store: JobStore) -> None:
    job_id = with_items(store, a_job())
    store.stop_for_budget(job_id, "stopped: the job's max_cost_usd")
    job = store.job(job_id)
    assert job is not None and job.budget_exhausted
    assert job.reason == "stopped: the job's max_cost_usd"


# --- chunks ----------------------------------------------------------------------------------


def test_a_chunk_reads_back_and_changes_status_by_compare_and_set(store: JobStore) -> None:
    job_id = with_items(store, a_job())
    number = store.new_chunk(
        job_id, endpoint="/v1/images/generations", model=MODEL, est_input_tokens=120
    )
    assert store.new_chunk(job_id) == number + 1  # numbers are never reused
    chunk = store.chunk(job_id, number)
    assert chunk is not None
    assert (chunk.status, chunk.endpoint, chunk.est_input_tokens) == (
        m.CHUNK_ASSEMBLING,
        "/v1/images/generations",
        120,
    )
    assert chunk.ref == f"{job_id}:{number}" and chunk.attempt_ref == f"{job_id}:{number}:1"
    assert not store.set_chunk_status_if(job_id, number, [m.CHUNK_PLANNED], m.CHUNK_SUBMITTED)
    assert store.set_chunk_status_if(
        job_id, number, [m.CHUNK_ASSEMBLING], m.CHUNK_PLANNED, batch_id=None, lines=0
    )
    store.update_chunk(job_id, number, batch_id="batch_1", attempt=2)
    chunk = store.chunk(job_id, number)
    assert chunk is not None
    assert (chunk.status, chunk.batch_id, chunk.attempt) == (m.CHUNK_PLANNED, "batch_1", 2)
    assert store.chunks(job_id) == [number, number + 1]
    assert store.chunk(job_id, 99) is None


def test_assign_moves_only_pending_items_once(store: JobStore) -> None:
    job = a_job(n=5)
    number = queued_in_chunk(store, job, [0, 1, 2])
    assert store.assign(job.id, number, [1, 2, 3]) == 1  # 1 and 2 are queued already
    assert states(store, job.id, 5) == [(m.QUEUED, 0, number)] * 4 + [(m.PENDING, 0, -1)]
    assert list(store.chunk_indexes(job.id, number)) == [0, 1, 2, 3]
    chunk = store.chunk(job.id, number)
    assert chunk is not None and (chunk.lines, chunk.open) == (4, 4)
    assert store.counts(job.id)["pending"] == 1 and store.counts(job.id)["queued"] == 4


def test_a_big_chunk_lists_its_items_in_order_across_pages(store: JobStore) -> None:
    job = a_job(n=8_500)
    number = queued_in_chunk(store, job)
    assert list(store.chunk_indexes(job.id, number)) == list(range(8_500))


def test_waiting_and_active_chunks_are_what_the_sweep_sees(store: JobStore) -> None:
    job_id = with_items(store, a_job())
    assert store.oldest_wait() is None
    store.mark_waiting(job_id, 1)
    store.mark_waiting(job_id, 2)
    first_wait = store.oldest_wait()
    store.mark_waiting(job_id, 1)  # again: keeps its place in the line
    assert store.waiting_chunks() == [(job_id, 1), (job_id, 2)]
    assert store.waiting_chunks(1) == [(job_id, 1)]
    assert store.oldest_wait() == first_wait
    store.mark_active(job_id, 1)
    assert store.waiting_chunks() == [(job_id, 2)]
    assert [(j, n) for j, n, _ in store.active_chunks()] == [(job_id, 1)]
    store.unmark(job_id, 1)
    store.unmark(job_id, 2)
    assert store.active_chunks() == [] and store.waiting_chunks() == []


# --- item transitions ------------------------------------------------------------------------


def increments(nanousd: int) -> list[tuple[int, str, int]]:
    return [
        (SPEND, "cost:batch", nanousd),
        (SPEND, "images", 1),
        (SPEND, "image_output", 196),
        (TOTAL_TOKENS, f"acme|{MODEL}|image_output|batch", 196),
        (TOTAL_COST, f"acme|{MODEL}|batch|", nanousd),
        (TOTAL_IMAGES, f"{MODEL}|succeeded", 1),
    ]


def test_a_success_recorded_twice_counts_once(store: JobStore, redis_client: redis.Redis) -> None:
    job = a_job(n=2)
    number = queued_in_chunk(store, job)
    usage = {"tokens": {"image_output": 196}, "cost_nanousd": 2_940_000, "keys": ["k"]}
    assert store.record_success(job.id, 0, usage, increments(2_940_000))
    assert not store.record_success(job.id, 0, usage, increments(2_940_000))
    assert states(store, job.id, 2) == [(m.SUCCEEDED, 0, number), (m.QUEUED, 0, number)]
    assert store.counts(job.id)["succeeded"] == 1 and store.counts(job.id)["queued"] == 1
    assert store.spend(job.id) == {"cost:batch": 2_940_000, "images": 1, "image_output": 196}
    assert redis_client.hget(keys.TOTAL_TOKENS, f"acme|{MODEL}|image_output|batch") == b"196"
    assert redis_client.hget(keys.TOTAL_IMAGES, f"{MODEL}|succeeded") == b"1"
    assert store.item_usage(job.id, [0, 1]) == [usage, None]
    chunk = store.chunk(job.id, number)
    assert chunk is not None and chunk.open == 1


def test_a_retried_line_goes_back_to_pending_until_attempts_run_out(
    store: JobStore, redis_client: redis.Redis
) -> None:
    job = a_job(n=1)
    error = {"code": "batch_expired", "message": "late"}
    for attempt in (1, 2):
        number = queued_in_chunk(store, job) if attempt == 1 else store.new_chunk(job.id)
        if attempt == 2:
            assert store.assign(job.id, number, [0]) == 1
        assert store.record_failure(job.id, 0, number, error, "retry", 3, MODEL, 1) == m.PENDING
        assert states(store, job.id, 1) == [(m.PENDING, attempt, number)]
    number = store.new_chunk(job.id)
    store.assign(job.id, number, [0])
    assert store.record_failure(job.id, 0, number, error, "retry", 3, MODEL, 1) == m.FAILED
    assert states(store, job.id, 1) == [(m.FAILED, 3, number)]
    assert store.counts(job.id) == {
        "pending": 0,
        "queued": 0,
        "succeeded": 0,
        "failed": 1,
        "cancelled": 0,
    }
    assert store.item_errors(job.id, [0]) == [error]
    # Only the final failure counts as a failed image.
    assert redis_client.hget(keys.TOTAL_IMAGES, f"{MODEL}|failed") == b"1"


@pytest.mark.parametrize(("action", "status"), [("fail", m.FAILED), ("cancel", m.CANCELLED)])
def test_fail_and_cancel_are_final_at_once(store: JobStore, action: str, status: str) -> None:
    job = a_job(n=1)
    number = queued_in_chunk(store, job)
    error = {"code": "moderation_blocked", "message": "no"}
    assert store.record_failure(job.id, 0, number, error, action, 3, MODEL, 1) == status
    assert states(store, job.id, 1) == [(status, 1, number)]
    assert store.counts(job.id)[m.STATUS_NAMES[status]] == 1
    chunk = store.chunk(job.id, number)
    assert chunk is not None and chunk.open == 0


def test_a_stale_failure_changes_nothing(store: JobStore) -> None:
    job = a_job(n=2)
    number = queued_in_chunk(store, job)
    store.record_success(job.id, 0, {"tokens": {}}, [])
    error = {"code": "batch_expired", "message": "late"}
    # Item 0 already succeeded; item 1 is queued in `number`, not in an older chunk.
    assert store.record_failure(job.id, 0, number, error, "fail", 3, MODEL, 1) == ""
    assert store.record_failure(job.id, 1, number - 1, error, "fail", 3, MODEL, 1) == ""
    assert store.record_failure(job.id, 5, number, error, "fail", 3, MODEL, 1) == ""
    assert states(store, job.id, 2) == [(m.SUCCEEDED, 0, number), (m.QUEUED, 0, number)]
    assert store.item_errors(job.id, [0, 1]) == [None, None]


def test_cancel_unsubmitted_spares_items_already_upstream(store: JobStore) -> None:
    job = a_job(n=6)
    with_items(store, job)
    upstream = store.new_chunk(job.id)
    store.assign(job.id, upstream, [0, 1])
    planned = store.new_chunk(job.id)
    store.assign(job.id, planned, [2, 3])
    # 4 and 5 are still pending; `upstream` has a batch, `planned` never went.
    assert store.cancel_unsubmitted(job.id, [planned]) == 4
    assert [s for s, _, _ in states(store, job.id, 6)] == [m.QUEUED] * 2 + [m.CANCELLED] * 4
    assert store.counts(job.id)["cancelled"] == 4 and store.counts(job.id)["queued"] == 2
    chunk = store.chunk(job.id, planned)
    assert chunk is not None and chunk.open == 0
    assert store.cancel_unsubmitted(job.id, [planned]) == 0  # again: nothing left to cancel


def test_finish_keeps_the_job_and_drops_per_item_state(
    store: JobStore, redis_client: redis.Redis
) -> None:
    job = a_job(n=2)
    number = queued_in_chunk(store, job)
    store.record_success(job.id, 0, {"tokens": {}}, [])
    store.record_failure(job.id, 1, number, {"code": "x"}, "fail", 3, MODEL, 1)
    store.mark_active(job.id, number)
    store.finish(job.id, job.tenant, "partially_failed", reason="1 item failed")
    done = store.job(job.id)
    assert done is not None and done.status == "partially_failed" and done.is_final
    assert done.finished_at is not None and done.reason == "1 item failed"
    assert store.counts(job.id)["succeeded"] == 1  # the counts stay for GET /v1/jobs/{id}
    assert store.active_jobs() == [] and store.active_chunks() == []
    for gone in (keys.job_items, keys.job_usage, keys.job_errors):
        assert redis_client.exists(gone(job.id)) == 0
    assert redis_client.exists(keys.chunk_items(job.id, number)) == 0
