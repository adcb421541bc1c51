"""The sync lane's cluster-wide limiter against a real Redis: pacing, holds, upstream headers."""

from __future__ import annotations

import contextlib
import email.utils
import heapq
import itertools
import multiprocessing
import random
import time
from typing import Any

import pytest
import redis

from service.budgets.ratelimit import (
    Grant,
    SyncLimiter,
    parse_go_duration,
    retry_after_seconds,
)
from simulator.errors import APIError
from simulator.limits import RateLimiter as UpstreamLimits


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


def _headers(limit: int, remaining: int, reset: str, kind: str = "requests") -> dict[str, str]:
    return {
        f"x-ratelimit-limit-{kind}": str(limit),
        f"x-ratelimit-remaining-{kind}": str(remaining),
        f"x-ratelimit-reset-{kind}": reset,
    }


def test_a_fresh_upstream_bucket_is_spent_at_once_then_paced_at_its_refill_rate(
    redis_client: redis.Redis,
) -> None:
    # Configured 1,200 a minute; upstream's bucket holds 300 and refills 20 a second.
    limiter = SyncLimiter(redis_client, rpm=1200, ipm=0, tpm=0)
    t = _now()
    grants = [limiter.grant(1, 0, now=t) for _ in range(40)]
    # Before upstream has answered: the configured pace, one second's worth (20).
    sent = [g for g in grants if isinstance(g, Grant)]
    assert len(sent) == 20
    # The first answer: 299 left. The other 19 are in flight: upstream may not have counted them.
    limiter.observe(_headers(300, 299, "50ms"), sent[0], now=t)
    st = limiter.state()
    assert st["requests_capacity"] == 300
    assert st["requests_level"] == pytest.approx(280)
    # All but the headroom (5 % of 300) goes now, not at 20 a second.
    burst = [limiter.grant(1, 0, now=t) for _ in range(300)]
    sent += [g for g in burst if isinstance(g, Grant)]
    assert len(sent) == 1 + 19 + 265
    for j, grant in enumerate(sent[1:], start=2):  # upstream counts them in order
        limiter.observe(_headers(300, 300 - j, f"{j / 20:.3f}s"), grant, now=t)
    assert limiter.state()["requests_level"] == pytest.approx(15)
    assert limiter.acquire(1, 0, now=t) == pytest.approx(0.05, rel=0.01)
    # A second later: 20 refilled. Its answer (34 left, full again in 13.3 s) confirms the rate.
    last = limiter.grant(1, 0, now=t + 1.0)
    assert isinstance(last, Grant)
    limiter.observe(_headers(300, 34, "13.3s"), last, now=t + 1.0)
    st = limiter.state()
    assert st["requests_per_minute"] == pytest.approx(1198, abs=1)
    assert st["requests_others_per_minute"] == 0
    assert sum(limiter.acquire(1, 0, now=t + 1.0) == 0.0 for _ in range(40)) == 19
    # Down to the headroom: paced at the refill rate.
    assert limiter.acquire(1, 0, now=t + 1.0) == pytest.approx(0.05, rel=0.01)


def test_an_answer_counts_what_is_still_in_flight(
    redis_client: redis.Redis,
) -> None:
    limiter = SyncLimiter(redis_client, rpm=600, ipm=0, tpm=0, headroom=0)
    t = _now()
    limiter.observe(_headers(100, 100, "0s"), now=t)  # full
    grants = [limiter.grant(1, 0, now=t) for _ in range(10)]
    assert all(isinstance(g, Grant) for g in grants)
    assert limiter.state()["requests_level"] == pytest.approx(90)
    # The third request's answer, half a second later: upstream had counted 20 of another
    # client's and some of ours; nine of ours are unanswered, so they count as not yet counted.
    # No credit for refill since upstream counted (when that was is unknown).
    g1, _, g3 = grants[:3]
    assert isinstance(g1, Grant) and isinstance(g3, Grant)
    limiter.observe(_headers(100, 77, "0s"), g3, now=t + 0.5)
    assert limiter.state()["requests_level"] == pytest.approx(77 - 9)
    # An older answer (the first request's) may only lower the level, never raise it.
    limiter.observe(_headers(100, 99, "0s"), g1, now=t + 0.6)
    assert limiter.state()["requests_level"] == pytest.approx(68 + 1)  # refilled 0.1 s, no more
    g4 = grants[3]
    assert isinstance(g4, Grant)
    limiter.observe(_headers(100, 50, "0s"), g4, now=t + 0.6)
    assert limiter.state()["requests_level"] == pytest.approx(50 - 7)
    # A call that ends without an answer (a connection error) is no longer in flight.
    for g in grants[4:]:
        assert isinstance(g, Grant)
        limiter.observe({}, g, now=t + 0.6)
    g2 = grants[1]
    assert isinstance(g2, Grant)
    limiter.observe(_headers(100, 40, "0s"), g2, now=t + 0.6)
    assert limiter.state()["requests_level"] == pytest.approx(40)


def test_in_flight_calls_of_a_dead_worker_stop_counting(redis_client: redis.Redis) -> None:
    limiter = SyncLimiter(redis_client, rpm=0, ipm=0, tpm=0, headroom=0, max_flight_seconds=60)
    t = _now()
    lost = limiter.grant(1, 0, now=t)  # its worker dies: never answered
    assert isinstance(lost, Grant)
    g = limiter.grant(1, 0, now=t + 1)
    assert isinstance(g, Grant)
    limiter.observe(_headers(100, 50, "0s"), g, now=t + 1)
    assert limiter.state()["requests_level"] == pytest.approx(49)
    g = limiter.grant(1, 0, now=t + 61)
    assert isinstance(g, Grant)
    limiter.observe(_headers(100, 50, "0s"), g, now=t + 61)
    assert limiter.state()["requests_level"] == pytest.approx(50)


def test_another_clients_spending_is_learned_and_left_to_it(redis_client: redis.Redis) -> None:
    # Upstream refills 10 a second; another client spends 4 of them, we spend 6 (3 every 0.5 s):
    # the bucket stays at 50, and only the answers can tell us someone else is spending.
    limiter = SyncLimiter(redis_client, rpm=0, ipm=0, tpm=0, headroom=0)
    t = _now()
    for step in range(60):
        now = t + step * 0.5
        grants = [limiter.grant(1, 0, now=now) for _ in range(3)]
        for left, g in zip((52, 51, 50), grants, strict=True):
            assert isinstance(g, Grant)
            limiter.observe(_headers(100, left, f"{(100 - left) / 10:.3f}s"), g, now=now)
    st = limiter.state()
    assert st["requests_others_per_minute"] == pytest.approx(4 * 60, rel=0.15)
    assert st["requests_per_minute"] == pytest.approx(6 * 60, rel=0.15)


def test_learned_buckets_lapse_and_a_lower_configured_rate_still_caps(
    redis_client: redis.Redis,
) -> None:
    limiter = SyncLimiter(redis_client, rpm=60, ipm=0, tpm=0, learned_ttl=60)
    t = _now()
    limiter.observe(_headers(300, 0, "15s"), now=t)  # upstream: 20 a second
    assert limiter.state()["requests_per_minute"] == 60  # ours is lower: ours stands
    assert limiter.acquire(1, 0, now=t + 30) == 0.0
    # Learned values lapse unless upstream keeps saying so: back to one second's worth.
    assert limiter.acquire(1, 0, now=t + 120) == 0.0
    assert limiter.acquire(1, 0, now=t + 120) == pytest.approx(1.0, abs=1e-3)


def test_tokens_and_images_headers_and_what_is_ignored(redis_client: redis.Redis) -> None:
    limiter = SyncLimiter(redis_client, rpm=0, ipm=0, tpm=0, headroom=0)
    t = _now()
    limiter.observe(
        {**_headers(6000, 1000, "50s", "tokens"), **_headers(10, 8, "12s", "images")}, now=t
    )
    st = limiter.state()
    assert (st["tokens_capacity"], st["images_capacity"]) == (6000, 10)
    assert limiter.acquire(1, 1000, now=t) == 0.0
    assert limiter.acquire(2, 100, now=t) == pytest.approx(1.0, abs=0.01)  # 100 tokens/s
    # An unlimited dimension as upstreams report it, and garbage, are ignored.
    limiter.observe(
        {
            **_headers(1_000_000_000, 999_999_999, "0s"),
            "x-ratelimit-remaining-images": "zero",
            "x-ratelimit-reset-tokens": "soon",
        }
    )
    st = limiter.state()
    assert st["requests_capacity"] is None and st["hold_seconds"] == 0
    assert limiter.acquire(1, 0, now=t + 1) == 0.0


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


def _race(
    redis_client: redis.Redis,
    per_minute: int,
    window: float,
    images: int,
    others_per_second: float = 0.0,
    threads: int = 16,
    latency: float = 0.05,
) -> tuple[float, int, int]:
    """``images`` one-image requests through the limiter to the simulator's own buckets, in
    virtual time: ``threads`` senders, each request reaching upstream 1-20 ms after its grant and
    answered 0.5-2.5 x ``latency`` later (so answers come out of order); another client spending
    ``others_per_second`` from the same bucket. Returns (seconds until the last image, requests
    upstream saw, 429s)."""
    rng = random.Random(per_minute)
    clock = [0.0]
    upstream = UpstreamLimits(per_minute, 0, 0, clock=lambda: clock[0], window=window)
    limiter = SyncLimiter(redis_client, rpm=per_minute, ipm=0, tpm=0)
    t0 = _now()
    events: list[tuple[float, int, str, Any]] = []
    order = itertools.count()

    def at(when: float, kind: str, data: Any = None) -> None:
        heapq.heappush(events, (when, next(order), kind, data))

    todo, done, requests, limited, last = images, 0, 0, 0, 0.0
    for _ in range(threads):
        at(0.0, "try")
    if others_per_second:
        at(0.0, "other")
    while done < images:
        t, _, kind, data = heapq.heappop(events)
        clock[0] = t
        if kind == "try" and todo:
            got = limiter.grant(1, 0, now=t0 + t)
            if isinstance(got, Grant):
                todo -= 1
                at(t + rng.uniform(0.001, 0.02), "arrive", got)
            else:
                at(t + got, "try")
        elif kind == "arrive":
            requests += 1
            try:
                answer, ok = upstream.admit("ours", 1, 0), True
            except APIError as exc:
                answer, ok = exc.headers, False
            at(t + latency * rng.uniform(0.5, 2.5), "answer", (data, answer, ok))
        elif kind == "answer":
            grant, answer, ok = data
            limiter.observe(answer, grant, now=t0 + t)
            if ok:
                done, last = done + 1, t
            else:
                limited, todo = limited + 1, todo + 1
                limiter.penalize(retry_after_seconds(answer) or 1.0, now=t0 + t)
            at(t, "try")
        elif kind == "other":
            with contextlib.suppress(APIError):
                upstream.admit("theirs", 1, 0)
            at(t + 1 / others_per_second, "other")
    return last, requests, limited


@pytest.mark.parametrize(
    ("per_minute", "others_share"),
    [(60, 0.0), (300, 0.0), (1200, 0.0), (60, 0.5), (300, 0.5), (1200, 0.5)],
)
def test_against_upstreams_buckets_near_the_minimum_with_few_429s(
    redis_client: redis.Redis, per_minute: int, others_share: float
) -> None:
    window, target = 15.0, 20.0
    bucket, rate = per_minute * window / 60, per_minute / 60
    ours = rate * (1 - others_share)  # what the refill leaves us
    images = round(bucket + ours * target)
    # The other client's first request also finds the bucket full.
    minimum = (images - bucket + (1 if others_share else 0)) / ours
    seconds, requests, limited = _race(
        redis_client, per_minute, window, images, rate * others_share
    )
    assert limited <= 0.01 * requests, (limited, requests)
    assert seconds <= 1.2 * minimum, (seconds, minimum)
