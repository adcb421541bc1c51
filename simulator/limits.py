"""Sync rate limits (requests, images and tokens per minute) and injected server errors.

Limits are token buckets that start full, hold a minute's worth and refill continuously, one set
for all sync image requests (OpenAI keeps one set per model; the service paces cluster-wide, so one
set is what it has to live with; two clients on different models share it, as two clients of one
organization do). ``--limit-window S`` makes each bucket hold S seconds' worth instead (the rate
stays per minute): a test then drains a bucket in seconds. A request either fits every bucket and
takes from all of them, or takes nothing and is answered 429 ``rate_limit_exceeded`` with
``retry-after`` (whole seconds, rounded up) and ``retry-after-ms`` set to when it would fit; a
request that could never fit (more than a whole bucket) gets ``x-should-retry: false``. Every
answer of the images endpoints, success or error, carries ``x-ratelimit-{limit,remaining,reset}-*``
headers (facts §3.4): the limit is what a full bucket holds, remaining what it holds now (rounded
down), reset how long until it is full again (Go's style, ``6m0s``, ``20ms``). OpenAI documents
the ``-requests`` and ``-tokens`` headers; ``-images`` is the simulator's own. A limit of 0 means
none: its headers then report a large limit that never runs low, so a pacing client never waits on
it.

:func:`injected_failure` decides which requests get a 500: a fixed share spaced evenly, so a test
knows exactly which attempt fails and that the SDK's retry gets through.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from simulator.errors import APIError

# What an absent limit is reported as: big enough that no client paces on it.
UNLIMITED = 1_000_000_000
ORG = "org-simulator"


def go_duration(seconds: float) -> str:
    """A duration as Go prints it (``1s``, ``6m0s``, ``250ms``), as OpenAI's headers carry it."""
    if seconds <= 0:
        return "0s"
    if round(seconds * 1000) < 1000:  # 0.9996 s is "1s", as Go rounds it, not "1000ms"
        return f"{max(1, round(seconds * 1000))}ms"
    minutes, rest = divmod(round(seconds, 3), 60)
    rest_s = f"{rest:.3f}".rstrip("0").rstrip(".")
    return f"{int(minutes)}m{rest_s}s" if minutes else f"{rest_s}s"


def injected_failure(index: int, rate: float) -> bool:
    """Whether the ``index``-th request (0-based) of a stream gets an injected 500.

    Spaced evenly: exactly ``floor(k * rate)`` of the first ``k`` requests fail, the first one
    never does (for rates below 1), and the outcome depends only on the position.
    """
    if rate <= 0:
        return False
    return math.floor((index + 1) * rate + 1e-9) > math.floor(index * rate + 1e-9)


class Bucket:
    """A per-minute limit as a token bucket holding ``window`` seconds' worth, full at start."""

    def __init__(self, per_minute: int, clock: Callable[[], float], window: float = 60.0) -> None:
        # What a full bucket holds (reported as the limit); it refills at per_minute / 60 a second.
        self.limit = 0 if per_minute == 0 else max(1, round(per_minute * window / 60.0))
        self._per_second = per_minute / 60.0
        self._clock = clock
        self._level = float(self.limit)
        self._at = clock()

    @property
    def unlimited(self) -> bool:
        return self.limit == 0

    def _refill(self) -> None:
        now = self._clock()
        if not self.unlimited:
            self._level = min(float(self.limit), self._level + (now - self._at) * self._per_second)
        self._at = now

    def wait_for(self, amount: int) -> float:
        """Seconds until ``amount`` fits (0 when it fits now)."""
        self._refill()
        if self.unlimited or amount <= self._level:
            return 0.0
        return (amount - self._level) / self._per_second

    def take(self, amount: int) -> None:
        if not self.unlimited:
            self._level -= amount

    def remaining(self) -> int:
        return UNLIMITED if self.unlimited else max(0, math.floor(self._level))

    def reset_seconds(self) -> float:
        """Seconds until the bucket is full again."""
        if self.unlimited:
            return 0.0
        return (self.limit - self._level) / self._per_second

    def reported_limit(self) -> int:
        return UNLIMITED if self.unlimited else self.limit

    def used(self) -> int:
        return 0 if self.unlimited else max(0, math.ceil(self.limit - self._level))


@dataclass(frozen=True)
class _Kind:
    name: str  # header suffix: requests, images, tokens
    what: str  # in messages: "requests per min (RPM)"
    error_type: str


_REQUESTS = _Kind("requests", "requests per min (RPM)", "requests")
_IMAGES = _Kind("images", "images per min (IPM)", "requests")
_TOKENS = _Kind("tokens", "tokens per min (TPM)", "tokens")


class RateLimiter:
    """One set of sync limits; thread-safe; ``admit`` either takes from every bucket or none."""

    def __init__(
        self,
        rpm: int,
        ipm: int,
        tpm: int,
        clock: Callable[[], float] = time.monotonic,
        window: float = 60.0,
    ) -> None:
        self._lock = threading.Lock()
        self._buckets = {
            _REQUESTS: Bucket(rpm, clock, window),
            _IMAGES: Bucket(ipm, clock, window),
            _TOKENS: Bucket(tpm, clock, window),
        }

    def headers(self) -> dict[str, str]:
        with self._lock:
            return self._headers()

    def _headers(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for kind, bucket in self._buckets.items():
            bucket._refill()
            out[f"x-ratelimit-limit-{kind.name}"] = str(bucket.reported_limit())
            out[f"x-ratelimit-remaining-{kind.name}"] = str(bucket.remaining())
            out[f"x-ratelimit-reset-{kind.name}"] = go_duration(bucket.reset_seconds())
        return out

    def admit(self, model: str, images: int, tokens: int) -> dict[str, str]:
        """Take one request, ``images`` and ``tokens``; return the headers, or raise the 429."""
        wanted = {_REQUESTS: 1, _IMAGES: images, _TOKENS: tokens}
        with self._lock:
            for kind, bucket in self._buckets.items():
                amount = wanted[kind]
                if not bucket.unlimited and amount > bucket.limit:
                    headers = self._headers()
                    headers["x-should-retry"] = "false"
                    raise APIError(
                        429,
                        f"Request too large for {model} in organization {ORG} on {kind.what}: "
                        f"Limit {bucket.limit}, Requested {amount}. The input or output tokens "
                        "must be reduced in order to run successfully.",
                        type=kind.error_type,
                        code="rate_limit_exceeded",
                        headers=headers,
                    )
            waits = {kind: bucket.wait_for(wanted[kind]) for kind, bucket in self._buckets.items()}
            kind, wait = max(waits.items(), key=lambda kv: kv[1])
            if wait > 0:
                bucket = self._buckets[kind]
                headers = self._headers()
                retry = max(1, math.ceil(wait))
                headers["retry-after"] = str(retry)
                headers["retry-after-ms"] = str(max(1, math.ceil(wait * 1000)))
                raise APIError(
                    429,
                    f"Rate limit reached for {model} in organization {ORG} on {kind.what}: "
                    f"Limit {bucket.limit}, Used {bucket.used()}, Requested {wanted[kind]}. "
                    f"Please try again in {go_duration(wait)}. Visit "
                    "https://platform.openai.com/account/rate-limits to learn more.",
                    type=kind.error_type,
                    code="rate_limit_exceeded",
                    headers=headers,
                )
            for kind, bucket in self._buckets.items():
                bucket.take(wanted[kind])
            return self._headers()
