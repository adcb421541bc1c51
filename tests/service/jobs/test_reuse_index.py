"""The reuse index against a real Redis: per tenant, bounded by size and age, and kept across a
Redis restart when Redis keeps an append-only file."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import redis

from service.jobs.reuse import Entry, ReuseIndex
from tests.support.procs import free_port, redis_server_binary, start_server


def entry(i: int, job: str = "job_a") -> Entry:
    return Entry(job, f"sku-{i}", [f"jobs/{job}/images/sku-{i}.png"], 1000 + i)


def test_lookup_record_and_tenants_apart(redis_client: Any) -> None:
    mine = ReuseIndex(redis_client, "catalog", 100, 3600)
    theirs = ReuseIndex(redis_client, "marketing", 100, 3600)
    mine.record((f"fp{i}", entry(i)) for i in range(3))
    assert mine.lookup(["fp0", None, "fp2", "nope"]) == [entry(0), None, entry(2), None]
    assert theirs.lookup(["fp0", "fp1"]) == [None, None]
    # Newest wins: a reused copy becomes the entry.
    mine.record([("fp0", entry(0, job="job_b"))])
    assert mine.lookup(["fp0"])[0].job_id == "job_b"
    mine.forget("fp1")
    assert mine.lookup(["fp1"]) == [None] and mine.size() == 2


def test_bounded_least_recently_recorded_go_first(redis_client: Any) -> None:
    index = ReuseIndex(redis_client, "t", max_entries=5, ttl_seconds=3600)
    index.record((f"fp{i}", entry(i)) for i in range(5))
    now = int(time.time() * 1000)
    # fp0 recorded longest ago, fp4 most recently (scores are when each was last recorded).
    redis_client.zadd(index.used_key, {f"fp{i}": now - 1000 + i for i in range(5)})
    index.record((f"fp{i}", entry(i)) for i in range(5, 8))
    assert index.size() == 5
    assert [e is not None for e in index.lookup([f"fp{i}" for i in range(8)])] == [
        False,
        False,
        False,
        True,
        True,
        True,
        True,
        True,
    ]


def test_entries_not_recorded_within_the_ttl_are_dropped(redis_client: Any) -> None:
    index = ReuseIndex(redis_client, "t", max_entries=100, ttl_seconds=1)
    index.record([("old", entry(1))])
    entries_key, used_key = index.entries_key, index.used_key
    # Age the entry by two seconds, as if recorded then.
    redis_client.zadd(used_key, {"old": int(time.time() * 1000) - 2000})
    index.record([("new", entry(2))])
    assert index.lookup(["old", "new"]) == [None, entry(2)]
    assert redis_client.pttl(entries_key) > 0  # the whole index expires when unused


def test_the_index_survives_a_redis_restart_with_its_append_only_file(tmp_path: Path) -> None:
    port = free_port()

    def redis_up() -> Any:
        return start_server(
            [
                *(redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1"),
                *("--appendonly", "yes", "--save", "", "--dir", str(tmp_path)),
            ],
            port,
            tmp_path / "redis.log",
        )

    proc = redis_up()
    client = redis.Redis(port=port)
    ReuseIndex(client, "t", 100, 3600).record([("fp", entry(7))])
    client.close()
    proc.stop()
    proc = redis_up()
    try:
        client = redis.Redis(port=port)
        assert ReuseIndex(client, "t", 100, 3600).lookup(["fp"]) == [entry(7)]
        client.close()
    finally:
        proc.stop()
