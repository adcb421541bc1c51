"""Cluster-wide pacing of the sync lane: requests, images and tokens, shared in Redis.

This module owns :class:`SyncLimiter`, the one gate every sync-lane call to
``/v1/images/generations`` or ``/v1/images/edits`` passes, in whatever worker process or machine
it runs. Celery's own ``rate_limit`` is per worker process, so it cannot keep a cluster under an
organization's limit; this can.

How it paces: upstream's limits are token buckets that start full and refill continuously; the
limiter keeps one model of each (requests, images, tokens) in one Redis hash, and every call is
granted by one Lua script (``service/redis/scripts/ratelimit_acquire.lua``) when every dimension
holds its cost plus a small headroom, and then all of them are charged together, or none is.
Time is the Redis server's ``TIME``, read inside the script, so workers on machines with skewed
clocks agree.

Where the model comes from:

* Before upstream has answered (or when it sends no ``x-ratelimit-*`` headers) the bucket is the
  configured rate (``IMAGEBATCH_SYNC_RPM`` / ``_IMAGES_PER_MINUTE`` / ``_TPM``) with a burst of
  ``burst_seconds`` (one second's worth): the cluster sends evenly, from zero.
* :meth:`SyncLimiter.observe` on every answer (``ratelimit_observe.lua``): upstream's
  ``x-ratelimit-remaining-requests`` / ``-tokens`` set the level to what upstream says is left,
  less every call of the cluster's still in flight (granted by :meth:`SyncLimiter.wait_and_grant`
  and not yet answered: it may not have reached upstream when upstream counted; a call in flight
  longer than ``max_flight_seconds`` is taken as lost). No credit is taken for the refill since
  upstream counted, so the level lags upstream's by one answer's time. ``x-ratelimit-limit-*`` is the bucket's size, and ``limit - remaining``
  over ``x-ratelimit-reset-*`` (time until full, a Go duration such as ``"6m0s"``, ``"20ms"``)
  its refill rate. So a fresh bucket is spent at once, not paced from zero; and when another
  client spends from the same limit, upstream's count drops faster than ours: the gap between
  consecutive answers is that client's rate, and the limiter refills by what is left of it.
  Learned values hold for ``learned_ttl`` seconds after upstream last said so. A configured
  rate below upstream's still caps ours. OpenAI sends no images header; ``-images`` (the
  simulator's) is read when present.
* :meth:`SyncLimiter.penalize` after a ``429``: nobody in the cluster sends until
  ``retry-after`` has passed (capped at ``max_hold_seconds``: a longer hold is a quota problem to
  surface, not to sleep through).

``headroom`` (a share of a learned bucket, 5 % by default) is never spent: it absorbs another
client's requests that upstream counted before we heard of them, which is what keeps 429s under
1 % when the limit is shared.

A limit of 0 means unlimited for that dimension until upstream says otherwise. Failure
semantics: Redis errors propagate (``redis.RedisError``); the caller retries the call like any
transient error. Nothing is charged unless the call is granted.
"""

from __future__ import annotations

import email.utils
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Grant:
    """A granted call: when (µs, the Redis server's clock), the cluster's running totals of
    requests, images and tokens granted, this call included (the first orders answers), and its
    cost. Pass it to :meth:`SyncLimiter.observe` with the answer: until then it is in flight."""

    at_us: int
    sums: tuple[int, int, int]
    images: int
    tokens: int
    waited: float = 0.0

    def _args(self) -> list[Any]:
        return [self.at_us, self.sums[0], self.images, self.tokens]


_KINDS = ("requests", "images", "tokens")


def _now_us(now: float | None) -> str:
    return "" if now is None else f"{now * 1_000_000:.0f}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class SyncLimiter:
    """Requests, images and tokens for the whole cluster, modelled on upstream's buckets."""

    def __init__(
        self,
        redis_client: redis.Redis,
        rpm: int,
        ipm: int,
        tpm: int,
        name: str = "default",
        *,
        burst_seconds: float = 1.0,
        headroom: float = 0.05,
        max_hold_seconds: float = 600.0,
        learned_ttl: float = 600.0,
        max_flight_seconds: float = 900.0,
    ):
        self._redis = redis_client
        self.rpm, self.ipm, self.tpm = max(0, rpm), max(0, ipm), max(0, tpm)
        self.name = name
        self._key = keys.rate_limiter(name)
        self._keys = [self._key, keys.rate_limiter_flight(name)]
        self._max_flight_us = int(max_flight_seconds * 1_000_000)
        self._burst_us = int(burst_seconds * 1_000_000)
        self._headroom = min(0.5, max(0.0, headroom))
        self._max_hold = max_hold_seconds
        self._learned_ttl_us = int(learned_ttl * 1_000_000)
        self._acquire = lua.script(redis_client, "ratelimit_acquire")
        self._observe = lua.script(redis_client, "ratelimit_observe")
        self._adjust = lua.script(redis_client, "ratelimit_adjust")

    def _common(self, now: float | None) -> list[Any]:
        return [
            _now_us(now),
            self.rpm,
            self.ipm,
            self.tpm,
            self._burst_us,
            f"{self._headroom:.6f}",
            _IDLE_EXPIRE_SECONDS,
            self._max_flight_us,
        ]

    def grant(self, images: int, tokens: int, now: float | None = None) -> Grant | float:
        """Take one request, ``images`` and ``tokens``: a :class:`Grant` when granted and
        charged; otherwise the seconds to wait before trying again, and nothing is charged.

        ``now`` (unix seconds) is for tests; by default the Redis server's clock decides.
        """
        if images < 0 or tokens < 0:
            raise ValueError("images and tokens must be >= 0")
        result = self._acquire(keys=self._keys, args=[*self._common(now), int(images), int(tokens)])
        first = _text(result[0])
        if first != "0":
            return max(1e-6, float(_text(result[1])))
        at, r, i, t = (int(_text(x)) for x in result[1:5])
        return Grant(at, (r, i, t), int(images), int(tokens))

    def acquire(self, images: int, tokens: int, now: float | None = None) -> float:
        """:meth:`grant` as a number: 0.0 = granted and charged, else the seconds to wait."""
        got = self.grant(images, tokens, now)
        return 0.0 if isinstance(got, Grant) else got

    def wait_and_grant(
        self,
        images: int,
        tokens: int,
        deadline: float,
        abandon: Callable[[], bool] | None = None,
    ) -> Grant:
        """Block until granted; the grant, with the seconds waited.

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
            got = self.grant(images, tokens)
            now = time.monotonic()
            if isinstance(got, Grant):
                return Grant(got.at_us, got.sums, got.images, got.tokens, now - start)
            wait = got
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

    def wait_and_acquire(
        self,
        images: int,
        tokens: int,
        deadline: float,
        abandon: Callable[[], bool] | None = None,
    ) -> float:
        """:meth:`wait_and_grant`, returning only the seconds waited."""
        return self.wait_and_grant(images, tokens, deadline, abandon).waited

    def penalize(self, retry_after: float, now: float | None = None) -> None:
        """Upstream said 429: hold every sender in the cluster for ``retry_after`` seconds."""
        if not math.isfinite(retry_after) or retry_after <= 0:
            return
        hold = min(retry_after, self._max_hold)
        self._adjust(
            keys=[self._key], args=[_now_us(now), f"{hold * 1_000_000:.0f}", _IDLE_EXPIRE_SECONDS]
        )

    def observe(
        self, headers: Mapping[str, str], grant: Grant | None = None, now: float | None = None
    ) -> None:
        """Sync to upstream's ``x-ratelimit-*`` headers on an answer (success, error or 429) to
        the call ``grant`` let through (see the module doc); without ``grant`` the answer is
        taken as describing upstream just now. Every granted call must end here, headers or
        not (a connection error: ``{}``): until then it counts as in flight."""
        h = {k.lower(): v for k, v in headers.items()}
        per_kind: list[Any] = []
        heard = False
        for kind in _KINDS:
            remaining = _header_int(h, f"x-ratelimit-remaining-{kind}")
            limit = _header_int(h, f"x-ratelimit-limit-{kind}")
            reset = _header_duration(h, f"x-ratelimit-reset-{kind}")
            if remaining is None or remaining < 0:
                per_kind += ["", "", ""]
                continue
            heard = True
            per_kind += [
                "" if limit is None or limit <= 0 else limit,
                remaining,
                "" if reset is None else f"{reset * 1_000_000:.0f}",
            ]
        if not heard and grant is None:
            return
        mark: list[Any] = ["", "", "", ""] if grant is None else grant._args()
        self._observe(
            keys=self._keys,
            args=[*self._common(now), self._learned_ttl_us, *mark, *per_kind],
        )

    def state(self) -> dict[str, Any]:
        """Numbers for gauges: the rate the cluster may spend now per minute (0 = unlimited),
        the configured ones, upstream's bucket as learned (size, level, others' use per minute),
        and how long the cluster is held."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.time()
        pipe.hgetall(self._key)
        (sec, usec), raw = pipe.execute()
        now = sec * 1_000_000 + usec
        h = {_text(k): float(v) for k, v in raw.items()}
        out: dict[str, Any] = {"name": self.name}
        configured = {"requests": self.rpm, "images": self.ipm, "tokens": self.tpm}
        for kind, d in zip(_KINDS, ("r", "i", "t"), strict=True):
            learned = h.get(f"until_{d}", 0) > now and f"cap_{d}" in h
            per_minute = configured[kind]
            if learned:
                gross = h.get(f"rate_{d}", 0.0) * 60 or per_minute or h[f"cap_{d}"]
                net = max(gross - h.get(f"f_{d}", 0.0) * 60, gross * 0.05)
                per_minute = round(min(net, per_minute) if per_minute else net)
            out[f"{kind}_per_minute"] = per_minute
            out[f"{kind}_per_minute_configured"] = configured[kind]
            out[f"{kind}_capacity"] = h.get(f"cap_{d}") if learned else None
            out[f"{kind}_level"] = h.get(f"lvl_{d}") if learned else None
            out[f"{kind}_others_per_minute"] = h.get(f"f_{d}", 0.0) * 60 if learned else 0.0
        out["hold_seconds"] = max(0.0, (h.get("hold", 0) - now) / 1_000_000)
        return out
