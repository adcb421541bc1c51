"""Cluster-wide pacing of the sync lane: requests, images and tokens per minute, shared in Redis.

This module owns :class:`SyncLimiter`, the one gate every sync-lane call to
``/v1/images/generations`` or ``/v1/images/edits`` passes, in whatever worker process or machine
it runs. Celery's own ``rate_limit`` is per worker process, so it cannot keep a cluster under an
organization's limit; this can.

How it paces: a generic cell rate algorithm (GCRA, a token bucket kept as one "theoretical arrival
time" per dimension) in one Lua script (``service/redis/scripts/ratelimit_acquire.lua``). Each dimension (requests, images, tokens) has an emission
interval of ``60 s / limit``; a call is granted when every dimension has room, and then all of
them are charged together, or none is. The burst allowance is small (``burst_seconds``, one
second's worth by default) so the cluster sends evenly through the minute instead of spending the
minute's allowance in its first second and overrunning upstream's own window; a single call that
costs more than the burst (many tokens) is granted once its dimension is idle. Time is the Redis
server's ``TIME``, read inside the script, so workers on machines with skewed clocks agree.

Adapting to upstream (facts §3.4, §5.5):

* :meth:`SyncLimiter.penalize` after a ``429``: nobody in the cluster sends until
  ``retry-after`` has passed (capped at ``max_hold_seconds``: a longer hold is a quota problem to
  surface, not to sleep through).
* :meth:`SyncLimiter.observe` on every response: ``x-ratelimit-remaining-requests`` /
  ``-tokens`` at 0 holds the cluster until ``x-ratelimit-reset-requests`` / ``-tokens`` (Go
  durations such as ``"1s"``, ``"6m0s"``, ``"20ms"``); ``x-ratelimit-limit-requests`` /
  ``-tokens`` (per minute) lower the effective limits when upstream's are below the configured
  ones, for ``learned_ttl`` seconds after they were last seen. There is no images-per-minute header,
  so ``ipm`` is only ever the configured value.

A limit of 0 means unlimited for that dimension. Failure semantics: Redis errors propagate
(``redis.RedisError``); the caller retries the call like any transient error. Nothing is charged
unless the call is granted.
"""

from __future__ import annotations

import email.utils
import math
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import redis

from service.redis import keys, lua

# A limiter's key expires when it has been idle this long.
_IDLE_EXPIRE_SECONDS = 3600


_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_GO_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,  # U+00B5 micro sign
    "μs": 1e-6,  # U+03BC greek mu
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_go_duration(text: str) -> float:
    """Seconds in a Go duration string (``"1s"``, ``"6m0s"``, ``"20ms"``, ``"1h2m3.5s"``).

    A bare number is taken as seconds (some proxies send that). Raises ValueError otherwise.
    """
    s = text.strip()
    sign = -1.0 if s.startswith("-") else 1.0
    s = s.lstrip("+-")
    if not s:
        raise ValueError(f"not a duration: {text!r}")
    try:
        return sign * float(s)
    except ValueError:
        pass
    total, pos = 0.0, 0
    while pos < len(s):
        m = _GO_DURATION_PART.match(s, pos)
        if m is None:
            raise ValueError(f"not a duration: {text!r}")
        total += float(m.group(1)) * _GO_UNITS[m.group(2)]
        pos = m.end()
    return sign * total


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """Seconds a response asks us to wait: ``retry-after-ms``, else ``retry-after`` (seconds or
    an HTTP date), as the OpenAI SDK reads them (facts §5.4); None when absent or unreadable."""
    h = {k.lower(): v for k, v in headers.items()}
    if "retry-after-ms" in h:
        try:
            return max(0.0, float(h["retry-after-ms"]) / 1000)
        except ValueError:
            pass
    value = h.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _header_int(headers: Mapping[str, str], name: str) -> int | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        return int(float(value))
    except ValueError:
        return None


def _header_duration(headers: Mapping[str, str], name: str) -> float | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        seconds = parse_go_duration(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds > 0 else None


class WaitAbandoned(Exception):
    """:meth:`SyncLimiter.wait_and_acquire` gave up because its caller no longer wants the slot
    (the job was cancelled while the request waited); nothing was charged."""


def _now_us(now: float | None) -> str:
    return "" if now is None else f"{now * 1_000_000:.0f}"


class SyncLimiter:
    """Requests, images and tokens per minute for the whole cluster (0 = unlimited)."""

    def __init__(
        self,
        redis_client: redis.Redis,
        rpm: int,
        ipm: int,
        tpm: int,
        name: str = "default",
        *,
        burst_seconds: float = 1.0,
        max_hold_seconds: float = 600.0,
        learned_ttl: float = 600.0,
    ):
        self._redis = redis_client
        self.rpm, self.ipm, self.tpm = max(0, rpm), max(0, ipm), max(0, tpm)
        self.name = name
        self._key = keys.rate_limiter(name)
        self._burst_us = int(burst_seconds * 1_000_000)
        self._max_hold = max_hold_seconds
        self._learned_ttl_us = int(learned_ttl * 1_000_000)
        self._acquire = lua.script(redis_client, "ratelimit_acquire")
        self._adjust = lua.script(redis_client, "ratelimit_adjust")

    def acquire(self, images: int, tokens: int, now: float | None = None) -> float:
        """Take one request, ``images`` and ``tokens``: 0.0 = granted and charged; otherwise the
        seconds to wait before trying again, and nothing is charged.

        ``now`` (unix seconds) is for tests; by default the Redis server's clock decides.
        """
        if images < 0 or tokens < 0:
            raise ValueError("images and tokens must be >= 0")
        result = self._acquire(
            keys=[self._key],
            args=[
                _now_us(now),
                self.rpm,
                self.ipm,
                self.tpm,
                int(images),
                int(tokens),
                self._burst_us,
                _IDLE_EXPIRE_SECONDS,
            ],
        )
        return float(result.decode() if isinstance(result, bytes) else result)

    def wait_and_acquire(
        self,
        images: int,
        tokens: int,
        deadline: float,
        abandon: Callable[[], bool] | None = None,
    ) -> float:
        """Block until granted; return the seconds waited.

        ``deadline`` is a :func:`time.monotonic` value. Raises TimeoutError as soon as the next
        possible slot lies past it (without sleeping until then: the caller learns early).
        ``abandon`` is asked about once a second while waiting (never before the first try);
        when it says True, :class:`WaitAbandoned` is raised and nothing is charged. Many callers
        queue here (a whole job's items at the limit's pace): without it, each would learn that
        its job was cancelled only after taking a slot.
        """
        start = time.monotonic()
        asked = start
        while True:
            wait = self.acquire(images, tokens)
            now = time.monotonic()
            if wait <= 0:
                return now - start
            if now + wait > deadline:
                raise TimeoutError(
                    f"the sync lane's rate limit has no room before the deadline (next slot in "
                    f"{wait:.1f} s); try again later or use batch mode"
                )
            if abandon is not None:
                if now - asked >= 1.0:
                    asked = now
                    if abandon():
                        raise WaitAbandoned()
                wait = min(wait, 1.0)
            time.sleep(wait)

    def penalize(self, retry_after: float, now: float | None = None) -> None:
        """Upstream said 429: hold every sender in the cluster for ``retry_after`` seconds."""
        if not math.isfinite(retry_after) or retry_after <= 0:
            return
        self._hold(min(retry_after, self._max_hold), None, None, now)

    def observe(self, headers: Mapping[str, str], now: float | None = None) -> None:
        """Adapt to upstream's ``x-ratelimit-*`` headers on a response (see module doc)."""
        h = {k.lower(): v for k, v in headers.items()}
        hold: float | None = None
        for kind in ("requests", "tokens"):
            if _header_int(h, f"x-ratelimit-remaining-{kind}") == 0:
                # Exhausted upstream: hold until it resets; 1 s if the reset is missing.
                reset = _header_duration(h, f"x-ratelimit-reset-{kind}") or 1.0
                hold = max(hold or 0.0, reset)
        learned_rpm = _header_int(h, "x-ratelimit-limit-requests")
        learned_tpm = _header_int(h, "x-ratelimit-limit-tokens")
        if hold is None and not learned_rpm and not learned_tpm:
            return
        self._hold(
            None if hold is None else min(hold, self._max_hold),
            learned_rpm if learned_rpm and learned_rpm > 0 else None,
            learned_tpm if learned_tpm and learned_tpm > 0 else None,
            now,
        )

    def _hold(
        self, seconds: float | None, rpm: int | None, tpm: int | None, now: float | None
    ) -> None:
        self._adjust(
            keys=[self._key],
            args=[
                _now_us(now),
                "" if seconds is None else f"{seconds * 1_000_000:.0f}",
                "" if rpm is None else rpm,
                "" if tpm is None else tpm,
                self._learned_ttl_us,
                _IDLE_EXPIRE_SECONDS,
            ],
        )

    def state(self) -> dict[str, Any]:
        """Numbers for gauges: effective and configured limits per minute (0 = unlimited), how
        long the cluster is held, and how far ahead of now each dimension is booked (seconds)."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.time()
        pipe.hgetall(self._key)
        (sec, usec), raw = pipe.execute()
        now = sec * 1_000_000 + usec
        h = {(k.decode() if isinstance(k, bytes) else k): float(v) for k, v in raw.items()}

        def effective(configured: int, learned: str) -> int:
            value = h.get(learned)
            valid = value is not None and h.get(f"{learned}_until", 0) > now
            if valid and value is not None and (configured == 0 or value < configured):
                return int(value)
            return configured

        def ahead(field: str) -> float:
            return max(0.0, (h.get(field, 0) - now) / 1_000_000)

        return {
            "name": self.name,
            "requests_per_minute": effective(self.rpm, "lim_r"),
            "images_per_minute": self.ipm,
            "tokens_per_minute": effective(self.tpm, "lim_t"),
            "requests_per_minute_configured": self.rpm,
            "images_per_minute_configured": self.ipm,
            "tokens_per_minute_configured": self.tpm,
            "hold_seconds": ahead("hold"),
            "requests_ahead_seconds": ahead("tat_r"),
            "images_ahead_seconds": ahead("tat_i"),
            "tokens_ahead_seconds": ahead("tat_t"),
        }
