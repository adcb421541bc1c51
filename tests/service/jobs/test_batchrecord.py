"""A chunk's batch id is written only under the submit lease and never overwritten (real Redis)."""

from __future__ import annotations

import redis

from service.jobs.batchrecord import BatchRecord
from service.redis import keys

JOB, N = "job_rec", 3
LEASE = keys.submit_lock(JOB, N)


def test_only_the_lease_holder_records_and_nothing_overwrites(redis_client: redis.Redis) -> None:
    redis_client.delete(keys.chunk(JOB, N), LEASE)
    redis_client.hset(keys.chunk(JOB, N), "status", "planned")
    record = BatchRecord(redis_client)
    assert record.begin_create(JOB, N, LEASE, "token-a", 1.0) == 0  # nobody holds it: not ours
    assert record.record(JOB, N, "batch_a", LEASE, "token-a") == "lease"
    assert redis_client.hget(keys.chunk(JOB, N), "batch_id") is None

    redis_client.set(LEASE, "token-a", px=10_000)
    assert record.begin_create(JOB, N, LEASE, "token-a", 2.0) == 1
    assert record.record(JOB, N, "batch_a", LEASE, "token-a") == "ok"
    assert record.record(JOB, N, "batch_a", LEASE, "token-a") == "ok"  # again: same batch
    assert redis_client.get(keys.batch_chunk("batch_a")) == f"{JOB}:{N}".encode()
    # Another holder later, with another batch: told which batch the chunk has, nothing written.
    redis_client.set(LEASE, "token-b", px=10_000)
    assert record.record(JOB, N, "batch_b", LEASE, "token-b") == "batch_a"
    assert record.begin_create(JOB, N, LEASE, "token-b", 3.0) == -1
    assert redis_client.hget(keys.chunk(JOB, N), "batch_id") == b"batch_a"


def test_duplicates_are_kept_open_until_accounted_once(redis_client: redis.Redis) -> None:
    redis_client.delete(keys.job_duplicates(JOB), keys.DUPLICATE_BATCHES, keys.job_spend(JOB))
    record = BatchRecord(redis_client)
    assert record.add_duplicate(JOB, N, "batch_x")
    assert not record.add_duplicate(JOB, N, "batch_x")
    assert record.open_duplicates() == [(JOB, N, "batch_x")]
    assert record.job_has_open_duplicates(JOB)
    day = keys.tenant_spend_daily("t", "2030-01-01")
    summary = {"tokens": {"image_output": 10}, "cost_nanousd": 7}
    increments = [(1, "image_output", 10), (1, "cost:batch", 7)]
    assert record.account_duplicate(JOB, N, "batch_x", summary, increments, day)
    assert not record.account_duplicate(JOB, N, "batch_x", summary, increments, day)
    assert redis_client.hget(keys.job_spend(JOB), "image_output") == b"10"
    assert record.open_duplicates() == [] and not record.job_has_open_duplicates(JOB)
    assert record.duplicates(JOB) == {"batch_x": summary}
