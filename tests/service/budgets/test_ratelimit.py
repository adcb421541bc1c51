"""The sync lane's cluster-wide limiter against a real Redis: pacing, holds, upstream headers."""

from __future__ import annotations

import email.utils
import multiprocessing
import time

import pytest
import redis

from service.budgets.ratelimit import SyncLimiter, parse_go_duration, retry_after_seconds


def _now() -> float:
    """A whole second, so `now + 0.1` lands on an exact microsecond like the server's clock does."""
    return float(int(time.time()))


def test_paces_images_per_minute_with_a_one_second_burst(redis_client: redis.Redis) -> None:
    limiter = SyncLimiter(redis_client, rpm=0, ipm=600, tpm=0)  # 10 images/s
    t = _now()
    assert [limiter.acquire(1, 0, now=t) for _ in range(10)] == [0.0] * 10
    assert limiter.acquire(1, 0, now=t) == pytest.approx(0.1, abs=1e-3)
    assert limiter.acquire(1, 0, now=t + 0.05) == pytest.approx(0.05, abs=1e-3)
    assert limiter.acquire(1, 0, now=t + 0.1) == 0.0
    assert limiter.acquire(1, 0, now=t + 0.1) > 0
    # After a quiet spell the burst is back, but never more than one second's worth.
    assert [limiter.acquire(1, 0, now=t + 60) for _ in range(10)] == [0.0] * 10
    assert limiter.acquire(1, 0, now=t + 60) > 0


def test_every_dimension_must_have_room_and_a_refusal_charges_nothing(
    redis_client: redis.Redis,
) -> None:
    limiter = SyncLimiter(redis_client, rpm=120, ipm=600, tpm=60_000)  # 2 req, 10 img, 1000 tok /s
    t = _now()
    assert limiter.acquire(1, 900, now=t) == 0.0
    # Tokens are short: 900 more would book 1.8 s ahead, 0.8 s past the burst.
    assert limiter.acquire(1, 900, now=t) == pytest.approx(0.8, abs=1e-3)
    # Nothing was charged by that refusal: one more request (the last of this second's 2) fits.
    assert limiter.acquire(1, 50, now=t) == 0.0
    # Now requests are short too; the wait is the longest of the dimensions.
    assert limiter.acquire(1, 0, now=t) == pytest.approx(0.5, abs=1e-3)
    assert limiter.acquire(5, 0, now=t + 0.5) == 0.0
    st = limiter.state()
    assert st["requests_per_minute"] == 120
    assert st["tokens_per_minute_configured"] == 60_000


def test_a_call_bigger_than_the_burst_goes_when_idle_then_books_ahead(
    redis_client: redis.Redis,
) -> None:
    limiter = SyncLimiter(redis_client, rpm=0, ipm=0, tpm=6000)  # 100 tokens/s
    t = _now()
    assert limiter.acquire(1, 5000, now=t) == 0.0
    assert limiter.acquire(1, 10, now=t) == pytest.approx(49.1, abs=1e-3)
    assert limiter.acquire(1, 5000, now=t + 49.9) == pytest.approx(0.1, abs=1e-3)
    assert limiter.acquire(1, 5000, now=t + 50) == 0.0


def test_unlimited_lane_never_waits(redis_client: redis.Redis) -> None:
    limiter = SyncLimiter(redis_client, rpm=0, ipm=0, tpm=0)
    assert all(limiter.acquire(10, 10**6) == 0.0 for _ in range(100))


def test_penalize_holds_every_worker_in_the_cluster(redis_client: redis.Redis) -> None:
    worker_a = SyncLimiter(redis_client, rpm=600, ipm=600, tpm=0)
    worker_b = SyncLimiter(redis.Redis(connection_pool=redis_client.connection_pool), 600, 600, 0)
    t = _now()
    worker_a.penalize(2.0, now=t)
    assert worker_b.acquire(1, 0, now=t + 0.5) == pytest.approx(1.5, abs=1e-3)
    worker_a.penalize(1.0, now=t + 0.5)  # a shorter hold never shortens a longer one
    assert worker_b.acquire(1, 0, now=t + 1.0) == pytest.approx(1.0, abs=1e-3)
    assert worker_b.acquire(1, 0, now=t + 2.0) == 0.0
    # Absurd retry-after values are capped (a quota problem should surface, not stall for a day).
    worker_a.penalize(86_400, now=t + 3)
    assert worker_b.acquire(1, 0, now=t + 3) == pytest.approx(600, abs=1e-3)
    worker_a.penalize(0)
    worker_a.penalize(float("nan"))


def test_penalize_on_the_server_clock_blocks_a_waiting_worker(redis_client: redis.Redis) -> None:
    worker_a = SyncLimiter(redis_client, rpm=0, ipm=0, tpm=0)
    worker_b = SyncLimiter(redis_client, rpm=0, ipm=0, tpm=0)
    worker_a.penalize(0.3)
    assert worker_b.state()["hold_seconds"] > 0.2
    waited = worker_b.wait_and_acquire(1, 0, deadline=time.monotonic() + 5)
    assert 0.25 <= waited < 1.0
    assert worker_b.state()["hold_seconds"] == 0


def test_wait_and_acquire_gives_up_as_soon_as_the_deadline_cannot_be_met(
    redis_client: redis.Redis,
) -> None:
    limiter = SyncLimiter(redis_client, rpm=0, ipm=0, tpm=0)
    limiter.penalize(30)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="before the deadline"):
        limiter.wait_and_acquire(1, 0, deadline=start + 1)
    assert time.monotonic() - start < 0.5


def test_observe_holds_until_reset_when_upstream_is_exhausted(redis_client: redis.Redis) -> None:
    limiter = SyncLimiter(redis_client, rpm=600, ipm=600, tpm=600_000)
    t = _now()
    limiter.observe(
        {"x-ratelimit-remaining-requests": "5", "x-ratelimit-reset-requests": "1s"}, now=t
    )
    assert limiter.acquire(1, 0, now=t) == 0.0
    limiter.observe(
        {"X-RateLimit-Remaining-Requests": "0", "X-RateLimit-Reset-Requests": "1.5s"}, now=t
    )
    assert limiter.acquire(1, 0, now=t) == pytest.approx(1.5, abs=1e-3)
    limiter.observe(
        {
            "x-ratelimit-remaining-requests": "3",
            "x-ratelimit-remaining-tokens": "0",
            "x-ratelimit-reset-tokens": "6m0s",
        },
        now=t,
    )
    assert limiter.acquire(1, 0, now=t) == pytest.approx(360, abs=1e-3)


def test_observe_learns_lower_upstream_limits(redis_client: redis.Redis) -> None:
    limiter = SyncLimiter(redis_client, rpm=0, ipm=0, tpm=1_000_000, learned_ttl=60)
    t = _now()
    limiter.observe(
        {"x-ratelimit-limit-requests": "60", "x-ratelimit-limit-tokens": "6000000"}, now=t
    )
    st = limiter.state()
    assert st["requests_per_minute"] == 60  # upstream's limit where we had none
    assert st["tokens_per_minute"] == 1_000_000  # ours is lower: ours stands
    assert limiter.acquire(1, 0, now=t) == 0.0
    assert limiter.acquire(1, 0, now=t) == pytest.approx(1.0, abs=1e-3)
    # Learned limits lapse unless upstream keeps saying so.
    assert limiter.acquire(1, 0, now=t + 61) == 0.0
    assert limiter.acquire(1, 0, now=t + 61) == 0.0
    # Garbage headers are ignored.
    limiter.observe(
        {"x-ratelimit-remaining-requests": "zero", "x-ratelimit-reset-requests": "soon"}
    )
    assert limiter.state()["hold_seconds"] == 0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("20ms", 0.02),
        ("1h2m3.5s", 3723.5),
        ("500us", 0.0005),
        ("1.5µs", 1.5e-6),
        ("250ns", 2.5e-7),
        ("0", 0.0),
        ("0s", 0.0),
        ("2", 2.0),
        ("0.5", 0.5),
        ("-1s", -1.0),
    ],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "1x", "abc", "1s2", "m1", "1 s"])
def test_bad_go_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_go_duration(text)


def test_retry_after_headers() -> None:
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_seconds({"Retry-After": "3"}) == 3.0
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < (retry_after_seconds({"retry-after": later}) or 0) <= 30
    assert retry_after_seconds({}) is None
    assert retry_after_seconds({"retry-after": "whenever"}) is None


IPM = 1200  # 20 images/s: enough grants in 3 s that one grant is < 2 % of the count
RUN = 4.0  # the first second spends the burst; the last three measure the steady rate


def _hammer(url: str, start_at: float, out: multiprocessing.Queue) -> None:
    limiter = SyncLimiter(redis.Redis.from_url(url), rpm=0, ipm=IPM, tpm=0)
    deadline = time.monotonic() + (start_at + RUN - time.time())
    grants: list[float] = []
    time.sleep(max(0.0, start_at - time.time()))  # start both workers together
    try:
        while True:
            limiter.wait_and_acquire(1, 0, deadline)
            grants.append(time.time())
    except TimeoutError:
        pass
    out.put(grants)


def test_two_processes_together_pace_to_the_limit(
    redis_url: str, redis_client: redis.Redis
) -> None:
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue = ctx.Queue()
    start_at = time.time() + 0.3
    procs = [ctx.Process(target=_hammer, args=(redis_url, start_at, out)) for _ in range(2)]
    for p in procs:
        p.start()
    per_worker = [out.get(timeout=RUN + 10) for _ in procs]
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    grants = sorted(g for worker in per_worker for g in worker)
    rate = IPM / 60
    burst = rate * 1.0

    steady = [g for g in grants if start_at + 1.0 <= g < start_at + RUN]
    achieved = len(steady) / (RUN - 1.0)
    assert 0.9 * rate <= achieved <= 1.02 * rate, (achieved, rate)
    assert all(len(worker) > 0.1 * len(grants) for worker in per_worker)  # both really took part
    # Over the whole run, never more than the rate plus one burst.
    assert len(grants) <= rate * RUN + burst + 1
    # And no second ever saw more than two seconds' worth (burst + refill).
    for g in grants:
        assert sum(1 for h in grants if g <= h < g + 1.0) <= 2 * rate + 1
