"""Queue, creation and spend budgets against a real Redis: atomic, idempotent, and right over time."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import pytest
import redis

from service.budgets.queue import CreateLimiter, QueueBudget, queue_limits
from service.budgets.spend import SpendBudget, TenantSpend
from service.pricing import NANO_PER_USD, usd_to_nanousd
from service.settings import Settings
from service.tenants import Tenant
from tests.support.procs import wait_until

T = TypeVar("T")
MODEL = "gpt-image-2"


def _fixed(limit: int) -> Callable[[str], int]:
    return lambda _model: limit


def _race(n: int, fn: Callable[[int], T]) -> list[T]:
    """Run fn(0..n-1) in n threads released at the same instant."""
    barrier = threading.Barrier(n)
    results: list[T | None] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        results[i] = fn(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results  # type: ignore[return-value]


# --- QueueBudget -------------------------------------------------------------------------------


def test_concurrent_reservations_never_exceed_the_limit(redis_client: redis.Redis) -> None:
    budget = QueueBudget(redis_client, _fixed(1000))
    granted = _race(20, lambda i: budget.reserve(MODEL, f"job:{i}", 100))
    assert sum(granted) == 10
    assert budget.usage(MODEL) == (1000, 1000, 1000)
    assert sum(budget.held(MODEL).values()) == 1000


def _churn(url: str, seed: int, stop_at: float, out: multiprocessing.Queue) -> None:
    client = redis.Redis.from_url(url)
    budget = QueueBudget(client, _fixed(10_000), waiter_ttl=0.05)
    rng = random.Random(seed)
    held: list[str] = []
    grants = 0
    n = 0
    while time.time() < stop_at:
        n += 1
        key = f"p{seed}:{n}"
        if budget.reserve(MODEL, key, rng.randint(1, 3000)):
            grants += 1
            held.append(key)
        if held and rng.random() < 0.5:
            budget.release(MODEL, held.pop(rng.randrange(len(held))))
    for key in held:
        budget.release(MODEL, key)
    out.put(grants)


def test_two_processes_churning_stay_under_the_limit(
    redis_url: str, redis_client: redis.Redis
) -> None:
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue = ctx.Queue()
    stop_at = time.time() + 1.5
    procs = [ctx.Process(target=_churn, args=(redis_url, seed, stop_at, out)) for seed in (1, 2)]
    for p in procs:
        p.start()
    budget = QueueBudget(redis_client, _fixed(10_000))
    peak = 0
    while any(p.is_alive() for p in procs):
        reserved, _, _ = budget.usage(MODEL)
        held = budget.held(MODEL)
        peak = max(peak, reserved)
        assert reserved <= 10_000
        assert sum(held.values()) <= 10_000
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    grants = [out.get(timeout=5) for _ in procs]
    assert all(g > 50 for g in grants), grants  # both really competed
    assert peak > 5_000  # and the budget was really under pressure
    assert budget.usage(MODEL)[0] == 0
    assert budget.held(MODEL) == {}


def test_reserve_and_release_are_idempotent(redis_client: redis.Redis) -> None:
    budget = QueueBudget(redis_client, _fixed(1000))
    assert budget.reserve(MODEL, "job:1", 400)
    assert budget.reserve(MODEL, "job:1", 400)
    assert budget.reserve(MODEL, "job:1", 900)  # already held: keeps its first amount
    assert budget.usage(MODEL)[0] == 400
    assert budget.reserve(MODEL, "job:2", 600)
    assert not budget.reserve(MODEL, "job:3", 1)
    budget.release(MODEL, "job:1")
    budget.release(MODEL, "job:1")
    assert budget.usage(MODEL)[0] == 600
    budget.release(MODEL, "never-held")
    assert budget.usage(MODEL)[0] == 600
    assert budget.held(MODEL) == {"job:2": 600}


def test_a_chunk_larger_than_the_budget_runs_alone(redis_client: redis.Redis) -> None:
    budget = QueueBudget(redis_client, _fixed(1000))
    assert budget.reserve(MODEL, "small", 10)
    # Something is held: the oversized chunk waits, and everyone else now leaves room for it.
    assert not budget.reserve(MODEL, "huge", 5000)
    assert not budget.reserve(MODEL, "other", 10)
    budget.release(MODEL, "small")
    assert budget.reserve(MODEL, "huge", 5000)
    assert budget.usage(MODEL) == (5000, 1000, 1000)
    assert not budget.reserve(MODEL, "other", 10)
    budget.release(MODEL, "huge")
    assert budget.reserve(MODEL, "other", 10)


def test_small_chunks_cannot_starve_a_waiting_big_one(redis_client: redis.Redis) -> None:
    budget = QueueBudget(redis_client, _fixed(1000))
    assert budget.reserve(MODEL, "a", 600)
    assert not budget.reserve(MODEL, "big", 700)  # becomes the waiter
    assert not budget.reserve(MODEL, "c", 300)  # would fit, but would keep "big" out
    assert budget.reserve(MODEL, "d", 0)
    budget.release(MODEL, "a")
    assert budget.reserve(MODEL, "c", 300)  # 300 + room for big's 700 fits
    assert budget.reserve(MODEL, "big", 700)
    assert budget.usage(MODEL)[0] == 1000


def test_an_abandoned_waiter_stops_blocking_after_its_ttl(redis_client: redis.Redis) -> None:
    budget = QueueBudget(redis_client, _fixed(1000), waiter_ttl=0.3)
    assert budget.reserve(MODEL, "a", 600)
    assert not budget.reserve(MODEL, "gone", 700)
    assert not budget.reserve(MODEL, "c", 300)
    wait_until(lambda: budget.reserve(MODEL, "c", 300), timeout=5, message="waiter to expire")
    # Releasing a waiter's key (its chunk was cancelled) also frees its place at once.
    assert not budget.reserve(MODEL, "big", 500)
    assert not budget.reserve(MODEL, "e", 50)
    budget.release(MODEL, "big")
    assert budget.reserve(MODEL, "e", 50)


def test_shrink_on_token_limit_exceeded_then_recover_as_batches_end(
    redis_client: redis.Redis,
) -> None:
    budget = QueueBudget(redis_client, _fixed(1000))
    for key, tokens in (("a", 300), ("b", 300), ("c", 200)):
        assert budget.reserve(MODEL, key, tokens)
    budget.shrink(MODEL, "c")  # upstream took a and b, refused c
    assert budget.usage(MODEL) == (600, 600, 1000)
    assert budget.held(MODEL) == {"a": 300, "b": 300}
    budget.shrink(MODEL, "c")  # redelivered: no second shrink
    budget.release(MODEL, "c")
    assert budget.usage(MODEL) == (600, 600, 1000)
    assert not budget.reserve(MODEL, "d", 100)

    budget.release(MODEL, "a")  # a batch ended: grow by half of what it held
    assert budget.usage(MODEL) == (300, 750, 1000)
    assert budget.reserve(MODEL, "d", 400)
    budget.release(MODEL, "b")
    assert budget.usage(MODEL) == (400, 900, 1000)
    budget.release(MODEL, "d")
    assert budget.usage(MODEL) == (0, 1000, 1000)
    assert redis_client.keys("*effective*") == []  # fully recovered: back on the configured limit


def test_shrink_has_a_floor_and_small_steps(redis_client: redis.Redis) -> None:
    budget = QueueBudget(redis_client, _fixed(10_000), floor_fraction=0.1)
    assert budget.reserve(MODEL, "only", 8000)
    budget.shrink(MODEL, "only")  # nothing else was accepted: the floor holds
    assert budget.usage(MODEL) == (0, 1000, 10_000)
    assert budget.reserve(MODEL, "tiny", 2)
    budget.release(MODEL, "tiny")  # grows by at least 1 % of the configured limit
    assert budget.usage(MODEL) == (0, 1100, 10_000)


def test_shrink_recovers_in_full_after_the_recovery_time(redis_client: redis.Redis) -> None:
    budget = QueueBudget(redis_client, _fixed(1000), recovery_seconds=0.3)
    assert budget.reserve(MODEL, "a", 500)
    assert budget.reserve(MODEL, "b", 500)
    budget.shrink(MODEL, "b")
    assert budget.usage(MODEL)[1] == 500
    wait_until(lambda: budget.usage(MODEL)[1] == 1000, timeout=5, message="recovery")
    assert budget.reserve(MODEL, "c", 500)


def test_unlimited_until_upstream_says_otherwise(redis_client: redis.Redis) -> None:
    budget = QueueBudget(redis_client, _fixed(0))
    for i in range(5):
        assert budget.reserve(MODEL, f"k{i}", 10**9)
    assert budget.usage(MODEL) == (5 * 10**9, 0, 0)
    budget.shrink(MODEL, "k4")  # learned: upstream holds at most what it accepted
    assert budget.usage(MODEL) == (4 * 10**9, 4 * 10**9, 0)
    assert not budget.reserve(MODEL, "k5", 1)


def test_limits_per_model_from_settings_and_gauges(redis_client: redis.Redis) -> None:
    settings = Settings(batch_queue_tokens=1000, batch_queue_tokens_per_model={"gpt-image-1.5": 50})
    budget = QueueBudget(redis_client, queue_limits(settings))
    assert budget.reserve(MODEL, "x", 900)
    assert budget.reserve("gpt-image-1.5", "y", 50)
    assert not budget.reserve("gpt-image-1.5", "z", 1)
    assert budget.models() == ["gpt-image-1.5", MODEL]
    assert [(m, *budget.usage(m)) for m in budget.models()] == [
        ("gpt-image-1.5", 50, 50, 50),
        (MODEL, 900, 1000, 1000),
    ]


# --- CreateLimiter -----------------------------------------------------------------------------


def test_creation_limiter_slides_over_an_hour(redis_client: redis.Redis) -> None:
    limiter = CreateLimiter(redis_client, per_hour=3)
    t0 = float(int(time.time()))  # whole seconds: offsets land on exact microseconds
    assert [limiter.try_acquire(now=t0 + i) for i in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.try_acquire(now=t0 + 10) == pytest.approx(3590, abs=0.01)
    assert limiter.try_acquire(now=t0 + 3599.5) == pytest.approx(0.5, abs=0.01)
    assert limiter.try_acquire(now=t0 + 3600.5) == 0.0  # the first left the window
    assert limiter.try_acquire(now=t0 + 3600.6) == pytest.approx(0.4, abs=0.01)
    assert limiter.used(now=t0 + 3600.6) == 3


def test_creation_limiter_on_the_server_clock_under_concurrency(redis_client: redis.Redis) -> None:
    limiter = CreateLimiter(redis_client, per_hour=5)
    waits = _race(20, lambda _i: limiter.try_acquire())
    assert sorted(waits)[:5] == [0.0] * 5
    assert all(3590 < w <= 3600 for w in sorted(waits)[5:])
    assert limiter.used() == 5
    assert CreateLimiter(redis_client, per_hour=0).try_acquire() == 0.0


# --- SpendBudget -------------------------------------------------------------------------------


def test_job_cap_refuses_the_chunk_that_would_cross_it(redis_client: redis.Redis) -> None:
    spend = SpendBudget(redis_client)
    cap = 1000
    assert spend.reserve_chunk("j1", "j1:1", 400, cap)
    assert spend.reserve_chunk("j1", "j1:2", 400, cap)
    assert not spend.reserve_chunk("j1", "j1:3", 300, cap)
    assert spend.job_state("j1") == {"reserved": 800, "spent": 0, "cap": 1000, "remaining": 200}

    spend.settle("j1", "j1:1", 350)  # actual from usage replaces the estimate
    spend.settle("j1", "j1:1", 350)  # redelivered collect: counted once
    assert spend.job_state("j1") == {"reserved": 400, "spent": 350, "cap": 1000, "remaining": 250}
    assert spend.reserve_chunk("j1", "j1:3", 250, cap)  # exactly at the cap is allowed
    assert not spend.reserve_chunk("j1", "j1:4", 1, cap)
    assert spend.reserve_chunk("j1", "j1:1", 999, cap)  # already settled: nothing reserved again
    spend.release("j1", "j1:3")
    spend.release("j1", "j1:3")
    assert spend.job_state("j1") == {"reserved": 400, "spent": 350, "cap": 1000, "remaining": 250}

    # Spend is the truth even past the cap; afterwards nothing more is reserved.
    spend.settle("j1", "j1:2", 700)
    assert spend.job_state("j1") == {"reserved": 0, "spent": 1050, "cap": 1000, "remaining": 0}
    assert not spend.reserve_chunk("j1", "j1:5", 0 + 1, cap)


def test_job_spend_without_cap_and_concurrent_reservations(redis_client: redis.Redis) -> None:
    spend = SpendBudget(redis_client)
    assert spend.reserve_chunk("free", "free:1", 10**12, None)
    assert spend.job_state("free") == {
        "reserved": 10**12,
        "spent": 0,
        "cap": None,
        "remaining": None,
    }
    granted = _race(20, lambda i: spend.reserve_chunk("capped", f"capped:{i}", 100, 1000))
    assert sum(granted) == 10
    assert spend.job_state("capped")["reserved"] == 1000
    assert spend.job_state("unknown") == {"reserved": 0, "spent": 0, "cap": None, "remaining": None}
    assert redis_client.ttl("ib:jspend:{capped}") > 86400


# --- TenantSpend -------------------------------------------------------------------------------


def _month_end(now: dt.datetime) -> dt.datetime:
    """23:00 UTC on the last day of the month after now's (in the future, so keys do not expire)."""
    year, month = now.year + (now.month == 12), now.month % 12 + 1
    first_after = dt.datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=dt.UTC)
    return first_after - dt.timedelta(hours=1)


def test_tenant_day_and_month_caps_roll_over(redis_client: redis.Redis) -> None:
    spend = TenantSpend(redis_client)
    tenant = Tenant("acme", frozenset(), daily_usd=1.0, monthly_usd=2.5)
    usd = NANO_PER_USD
    last_day = _month_end(dt.datetime.now(dt.UTC))
    day_before = last_day - dt.timedelta(days=1)
    next_month = last_day + dt.timedelta(hours=2)

    assert spend.reserve(tenant, "c1", usd * 9 // 10, day_before)
    spend.settle(tenant, "c1", usd * 9 // 10, day_before)
    assert spend.check(tenant, day_before) == (usd // 10, usd * 16 // 10)
    assert not spend.reserve(tenant, "c2", usd // 5, day_before)  # crosses the day cap

    # A new day: the day cap is fresh, the month remembers.
    assert spend.check(tenant, last_day) == (usd, usd * 16 // 10)
    assert spend.reserve(tenant, "c2", usd, last_day)
    assert spend.check(tenant, last_day) == (0, usd * 6 // 10)
    assert not spend.reserve(tenant, "c3", 1, last_day)

    # The batch ends after midnight of a new month: the reservation leaves the old day and
    # month, the spend lands in the new ones (when upstream billed it).
    spend.settle(tenant, "c2", usd * 8 // 10, next_month)
    spend.settle(tenant, "c2", usd * 8 // 10, next_month)
    assert spend.check(tenant, last_day) == (usd, usd * 16 // 10)
    assert spend.check(tenant, next_month) == (usd * 2 // 10, usd * 17 // 10)
    snap = spend.snapshot(tenant, next_month)
    assert (snap.day_spent, snap.day_reserved, snap.month_spent, snap.month_reserved) == (
        usd * 8 // 10,
        0,
        usd * 8 // 10,
        0,
    )

    # Counters expire after their period plus a margin, not before.
    day_key = f"ib:tspend:{{acme}}:day:{last_day:%Y-%m-%d}"
    month_key = f"ib:tspend:{{acme}}:month:{next_month:%Y-%m}"
    day_end = (last_day + dt.timedelta(hours=1)).timestamp()
    # When each key expires, on the server's clock (TTL, not EXPIRETIME: Redis 6 has no EXPIRETIME).
    server_now = redis_client.time()[0]
    assert abs(server_now + redis_client.ttl(day_key) - int(day_end + 2 * 86400)) <= 1
    assert server_now + redis_client.ttl(month_key) > next_month.timestamp() + 28 * 86400


def test_tenant_reservations_are_idempotent_and_atomic(redis_client: redis.Redis) -> None:
    spend = TenantSpend(redis_client)
    now = dt.datetime.now(dt.UTC)
    tenant = Tenant("beta", frozenset(), daily_usd=1.0, monthly_usd=None)
    nano = usd_to_nanousd(0.1)
    granted = _race(20, lambda i: spend.reserve(tenant, f"k{i}", nano, now))
    assert sum(granted) == 10
    assert spend.check(tenant, now) == (0, None)
    winners = [i for i, ok in enumerate(granted) if ok]
    assert spend.reserve(tenant, f"k{winners[0]}", nano, now)  # already held
    spend.release(tenant, f"k{winners[0]}")
    spend.release(tenant, f"k{winners[0]}")
    assert spend.check(tenant, now) == (nano, None)
    spend.settle(tenant, f"k{winners[1]}", nano // 2, now)
    spend.release(tenant, f"k{winners[1]}")  # already settled: nothing to release
    assert spend.check(tenant, now) == (nano + nano // 2, None)
    assert spend.reserve(tenant, f"k{winners[1]}", nano, now)  # settled key: not reserved again
    assert spend.check(tenant, now) == (nano + nano // 2, None)


def test_tenant_without_caps_is_tracked_for_gauges(redis_client: redis.Redis) -> None:
    spend = TenantSpend(redis_client)
    now = dt.datetime.now(dt.UTC)
    open_tenant = Tenant("default", frozenset())
    capped = Tenant("acme", frozenset(), daily_usd=10.0, monthly_usd=100.0)
    assert spend.reserve(open_tenant, "a", 10**15, now)
    spend.settle(open_tenant, "a", 7, now)
    assert spend.reserve(capped, "b", usd_to_nanousd(2.5), now)
    assert spend.check(open_tenant, now) == (None, None)
    snaps = {t.id: spend.snapshot(t, now) for t in (open_tenant, capped)}
    assert (snaps["default"].day_spent, snaps["default"].month_spent) == (7, 7)
    assert snaps["acme"].day_reserved == usd_to_nanousd(2.5)
    assert snaps["acme"].day_remaining == usd_to_nanousd(7.5)
    assert snaps["acme"].month_remaining == usd_to_nanousd(97.5)
