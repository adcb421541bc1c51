"""Rate-limit buckets and injected failures as plain functions, on a clock the test moves."""

from __future__ import annotations

import pytest

from simulator.errors import APIError
from simulator.limits import UNLIMITED, RateLimiter, go_duration, injected_failure


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.25, "250ms"),
        (0.9996, "1s"),
        (1, "1s"),
        (6.5, "6.5s"),
        (360, "6m0s"),
        (61.25, "1m1.25s"),
    ],
)
def test_durations_read_like_openai_headers(seconds, text):
    assert go_duration(seconds) == text


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.25, 0.5, 1.0])
def test_injected_failures_are_an_exact_evenly_spaced_share(rate):
    fails = [injected_failure(i, rate) for i in range(100)]
    assert sum(fails) == round(100 * rate)
    if rate < 1:
        assert not fails[0], "the first request never fails, so a retry test knows where it stands"


def test_requests_per_minute_refill_and_retry_after():
    clock = Clock()
    limiter = RateLimiter(rpm=60, ipm=0, tpm=0, clock=clock)
    for _ in range(60):
        headers = limiter.admit("gpt-image-2", 1, 100)
    assert headers["x-ratelimit-limit-requests"] == "60"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-remaining-tokens"] == str(UNLIMITED)
    with pytest.raises(APIError) as info:
        limiter.admit("gpt-image-2", 1, 100)
    err = info.value
    assert (err.status, err.code, err.type) == (429, "rate_limit_exceeded", "requests")
    assert err.headers["retry-after"] == "1"
    assert "requests per min" in err.message
    clock.now += 1.0
    limiter.admit("gpt-image-2", 1, 100)


def test_images_and_tokens_limits_and_nothing_taken_on_refusal():
    clock = Clock()
    limiter = RateLimiter(rpm=0, ipm=10, tpm=6000, clock=clock)
    limiter.admit("m", 8, 1000)
    with pytest.raises(APIError) as info:
        limiter.admit("m", 3, 1000)
    assert info.value.headers["retry-after"] == "6"  # one image refills every 6 s
    # The refused request took nothing: two images still fit.
    limiter.admit("m", 2, 1000)
    with pytest.raises(APIError) as info:
        limiter.admit("m", 0, 5000)
    assert info.value.type == "tokens"
    assert info.value.headers["x-ratelimit-remaining-tokens"] == "4000"


def test_a_request_that_can_never_fit_says_do_not_retry():
    limiter = RateLimiter(rpm=0, ipm=5, tpm=0, clock=Clock())
    with pytest.raises(APIError) as info:
        limiter.admit("m", 10, 0)
    assert info.value.headers["x-should-retry"] == "false"
    assert "Request too large" in info.value.message


def test_buckets_start_full_and_refill_over_the_window_with_honest_headers():
    clock = Clock()
    # 1,200 a minute in a 15-second window: the bucket holds 300 and refills 20 a second.
    limiter = RateLimiter(rpm=1200, ipm=0, tpm=0, clock=clock, window=15)
    first = limiter.headers()
    assert first["x-ratelimit-limit-requests"] == "300"
    assert first["x-ratelimit-remaining-requests"] == "300"  # full before anyone asked
    assert first["x-ratelimit-reset-requests"] == "0s"
    for _ in range(300):
        headers = limiter.admit("m", 1, 0)
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"] == "15s"  # empty to full: the whole window
    with pytest.raises(APIError) as info:
        limiter.admit("m", 1, 0)
    assert info.value.headers["retry-after-ms"] == "50"  # one request refills in 1/20 s
    assert info.value.headers["retry-after"] == "1"
    clock.now += 2.5  # 50 refilled, and the reset counts down
    headers = limiter.headers()
    assert headers["x-ratelimit-remaining-requests"] == "50"
    assert headers["x-ratelimit-reset-requests"] == "12.5s"
    assert [limiter.admit("m", 1, 0) for _ in range(50)][-1][
        "x-ratelimit-remaining-requests"
    ] == "0"
    clock.now += 60  # never more than the window's worth, however long it waits
    assert limiter.headers()["x-ratelimit-remaining-requests"] == "300"


def test_a_window_shorter_than_a_minute_keeps_at_least_one_in_the_bucket():
    limiter = RateLimiter(rpm=2, ipm=0, tpm=0, clock=Clock(), window=1)
    assert limiter.headers()["x-ratelimit-limit-requests"] == "1"
    limiter.admit("m", 1, 0)
    with pytest.raises(APIError) as info:
        limiter.admit("m", 1, 0)
    assert info.value.headers["retry-after"] == "30"
