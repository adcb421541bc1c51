"""Leases and markers on a real Redis: one holder at a time, a stalled holder loses its lease,
``held()`` keeps a lease alive for as long as its block runs, markers expire."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from service.redis.leases import Lease, LeaseLost, mark_once, unmark
from tests.support.procs import wait_until

KEY = "ib:lock:test:job_1"


def test_only_one_of_many_racing_holders_acquires(redis_client: redis.Redis) -> None:
    leases = [Lease(redis_client, KEY, 5) for _ in range(12)]
    barrier = threading.Barrier(len(leases))
    won: list[bool] = [False] * len(leases)

    def take(i: int) -> None:
        barrier.wait()
        won[i] = leases[i].acquire()

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(leases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(won) == 1
    holder = leases[won.index(True)]
    assert redis_client.get(KEY) == holder.token.encode()


def test_a_non_holder_cannot_refresh_or_release(redis_client: redis.Redis) -> None:
    holder, other = Lease(redis_client, KEY, 5), Lease(redis_client, KEY, 5)
    assert holder.acquire()
    with pytest.raises(LeaseLost):
        other.refresh(force=True)
    other.release()
    assert redis_client.get(KEY) == holder.token.encode()
    holder.refresh(force=True)  # the holder renews without complaint
    holder.release()
    assert redis_client.exists(KEY) == 0
    assert other.acquire()


def test_a_holder_that_stalled_past_expiry_learns_it_lost_the_lease(
    redis_client: redis.Redis,
) -> None:
    stalled = Lease(redis_client, KEY, 0.2)
    assert stalled.acquire()
    successor = Lease(redis_client, KEY, 5)
    wait_until(successor.acquire, timeout=5, message="the stalled lease to lapse")
    with pytest.raises(LeaseLost):
        stalled.refresh(force=True)
    stalled.release()  # must not drop the successor's lease
    assert redis_client.get(KEY) == successor.token.encode()


def test_held_keeps_the_lease_past_its_ttl_and_releases_on_exit(
    redis_client: redis.Redis,
) -> None:
    lease = Lease(redis_client, KEY, 0.3)
    rival = Lease(redis_client, KEY, 0.3)
    with lease.held() as got:
        assert got
        start = time.monotonic()

        def three_ttls_and_still_ours() -> bool:
            assert redis_client.get(KEY) == lease.token.encode(), "lease lost while held"
            assert not rival.acquire()
            return time.monotonic() - start > 1.0

        wait_until(three_ttls_and_still_ours, timeout=5, interval=0.05, message="1 s held")
    assert redis_client.exists(KEY) == 0
    assert rival.acquire()


def test_held_yields_false_and_leaves_the_other_holder_alone(redis_client: redis.Redis) -> None:
    first = Lease(redis_client, KEY, 5)
    assert first.acquire()
    with Lease(redis_client, KEY, 5).held() as got:
        assert not got
    assert redis_client.get(KEY) == first.token.encode()


def test_held_releases_when_the_block_raises(redis_client: redis.Redis) -> None:
    lease = Lease(redis_client, KEY, 5)
    with pytest.raises(RuntimeError), lease.held():
        raise RuntimeError("the step failed")
    assert redis_client.exists(KEY) == 0


def test_mark_once_sets_a_marker_once_until_it_expires_or_is_removed(
    redis_client: redis.Redis,
) -> None:
    marker = "ib:enq:batches.submit:job_1:3"
    assert mark_once(redis_client, marker, 0.2)
    assert not mark_once(redis_client, marker, 0.2)
    wait_until(lambda: mark_once(redis_client, marker, 30), timeout=5, message="marker expiry")
    assert not mark_once(redis_client, marker, 30)
    unmark(redis_client, marker)
    assert mark_once(redis_client, marker, 30)


def test_a_holder_knows_at_once_when_its_lease_outlived_its_last_renewal(
    redis_client: redis.Redis,
) -> None:
    lease = Lease(redis_client, KEY, 0.3)
    assert lease.acquire() and not lease.lost
    lease.ensure()
    time.sleep(0.35)  # paused past the lease, without a renewal: no Redis call needed to know
    assert lease.lost
    with pytest.raises(LeaseLost):
        lease.ensure()
    assert Lease(redis_client, KEY, 5).acquire()  # and indeed another may take it now


def test_the_keeper_marks_the_lease_lost_when_redis_fails(tmp_path) -> None:
    from tests.support.procs import start_redis

    proc, url = start_redis(tmp_path / "redis")
    client = redis.Redis.from_url(url, socket_timeout=1)
    try:
        lease = Lease(client, KEY, 3)
        with lease.held() as got:
            assert got and not lease.lost
            proc.kill()
            proc.popen.wait(10)
            # The keeper renews every second: its first Redis error tells the holder, long
            # before the 3 s lease would have run out.
            started = time.monotonic()
            wait_until(lambda: lease.lost, timeout=2.5, message="the keeper to give the lease up")
            assert time.monotonic() - started < 2.5
            with pytest.raises(LeaseLost):
                lease.ensure()
    except redis.RedisError:
        pass  # the release on the way out has no Redis to talk to
    finally:
        client.close()
        proc.stop()


def test_a_lease_taken_over_is_lost_for_the_old_holder(redis_client: redis.Redis) -> None:
    lease = Lease(redis_client, KEY, 0.6)
    with lease.held() as got:
        assert got
        redis_client.set(KEY, "someone-else", px=5000)  # what a lapse and a takeover leave
        wait_until(lambda: lease.lost, timeout=2, message="the keeper to notice the takeover")
    assert redis_client.get(KEY) == b"someone-else"  # the old holder's release did not drop it
