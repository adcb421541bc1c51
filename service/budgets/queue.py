"""The batch lane's upstream budgets, cluster-wide in Redis: enqueued tokens and batch creations.

* :class:`QueueBudget`: OpenAI's enqueued (input) token limit per model (facts §2). A chunk
  reserves its input tokens before its upstream batch is created and releases them when the
  batch ends.
* :class:`CreateLimiter`: upstream batch creations per hour (facts §2: 2,000/hour), a sliding
  window over the last hour, on the Redis server's clock.

Every check-and-take is one Lua script (``service/redis/scripts/queue_*.lua``,
``creates_acquire.lua``), so two workers can never both take the last of a budget. Reservations
are idempotent by a caller's key (a chunk attempt such as ``"job123:4:1"``): reserving the same
key twice holds it once, and releasing twice counts once.

Failure semantics: a Redis error propagates (``redis.RedisError``); the caller's task retries it,
and because every operation is idempotent by key the retry cannot double-count. A reservation
whose holder dies stays held until someone releases its key: the chunk's collect (or its
cancellation) releases it (``QueueBudget.held`` lists them for reconciliation).

Queue budget policy (what an operator sees in the gauges):

* Limit: ``limits(model)`` (``batch_queue_tokens``, overridden per model by
  ``batch_queue_tokens_per_model``); 0 means unlimited.
* Oversized chunks: a reservation larger than the whole budget is granted when nothing else is
  reserved for the model, otherwise such a chunk would wait forever. Upstream may still refuse it
  (``token_limit_exceeded``); the planner sizes chunks below the limit.
* No starvation: the first reservation refused becomes the model's *waiter* (kept while it retries,
  forgotten ``waiter_ttl`` seconds after its last try). While there is a waiter, other
  reservations are granted only if they leave room for it, so a stream of small chunks cannot hold
  a big one back forever.
* Shrink and recovery: upstream's real limit may be lower than the configured one (other users of
  the organization, a wrong setting). When a batch fails with ``token_limit_exceeded``,
  :meth:`QueueBudget.shrink` lowers the effective limit to what upstream demonstrably accepted
  (the tokens reserved, minus the failed chunk), never below ``floor_fraction`` of the configured
  limit, and releases the failed chunk. Each later :meth:`QueueBudget.release` (a batch ended,
  freeing upstream's queue) grows the effective limit back by half the tokens it released, at least
  1 % of the limit; and ``recovery_seconds`` after the last shrink the effective limit returns to the
  configured one in full. This probes upward gently without ever staying shrunk for good.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis

from service.redis import keys, lua

if TYPE_CHECKING:
    from service.settings import Settings


def _int(value: Any) -> int:
    return int(value) if value is not None else 0


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def queue_limits(settings: Settings) -> Callable[[str], int]:
    """The configured enqueued-token limit per model, from settings (0 = unlimited)."""
    per_model = dict(settings.batch_queue_tokens_per_model)
    default = settings.batch_queue_tokens

    def limit(model: str) -> int:
        return int(per_model.get(model, default))

    return limit


class QueueBudget:
    """Enqueued input tokens per model, reserved before an upstream batch exists (see module doc)."""

    def __init__(
        self,
        redis_client: redis.Redis,
        limits: Callable[[str], int],
        *,
        waiter_ttl: float = 120.0,
        floor_fraction: float = 0.1,
        recovery_seconds: float = 3600.0,
    ):
        self._redis = redis_client
        self._limits = limits
        self._waiter_ttl_ms = max(1, int(waiter_ttl * 1000))
        self._floor_fraction = floor_fraction
        self._recovery_ms = max(1, int(recovery_seconds * 1000))
        self._reserve = lua.script(redis_client, "queue_reserve")
        self._release = lua.script(redis_client, "queue_release")
        self._shrink = lua.script(redis_client, "queue_shrink")

    def _configured(self, model: str) -> int:
        return max(0, int(self._limits(model)))

    def reserve(self, model: str, key: str, tokens: int) -> bool:
        """Hold ``tokens`` for ``key``; False = wait and try again (nothing held).

        Idempotent: a key already held stays held with its first amount and returns True.
        """
        if tokens < 0:
            raise ValueError(f"cannot reserve a negative number of tokens ({tokens})")
        granted = self._reserve(
            keys=keys.queue_budget(model),
            args=[key, int(tokens), self._configured(model), self._waiter_ttl_ms],
        )
        if granted:
            self._redis.sadd(keys.QUEUE_BUDGET_MODELS, model)
        return bool(granted)

    def release(self, model: str, key: str) -> None:
        """Give back ``key``'s tokens (its batch ended, or the chunk was abandoned); idempotent."""
        self._release(keys=keys.queue_budget(model), args=[key, self._configured(model)])

    def shrink(self, model: str, failed_key: str) -> None:
        """Upstream refused ``failed_key``'s batch with ``token_limit_exceeded``.

        Lowers the effective limit to the tokens still held (upstream accepted those), never below
        ``floor_fraction`` of the configured limit, and releases ``failed_key`` (its batch is
        over). Idempotent: once ``failed_key`` is released, a second call does nothing.
        """
        self._shrink(
            keys=keys.queue_budget(model),
            args=[failed_key, self._configured(model), self._floor_fraction, self._recovery_ms],
        )

    def usage(self, model: str) -> tuple[int, int, int]:
        """(tokens reserved, effective limit, configured limit); a limit of 0 means unlimited."""
        _, total, effective, _ = keys.queue_budget(model)
        reserved, eff = self._redis.mget(total, effective)
        configured = self._configured(model)
        effective_limit = configured
        if eff is not None:
            learned = int(eff)
            effective_limit = learned if configured == 0 else min(learned, configured)
        return _int(reserved), effective_limit, configured

    def held(self, model: str) -> dict[str, int]:
        """Every reservation key held for ``model`` and its tokens (for reconciliation sweeps)."""
        raw = self._redis.hgetall(keys.queue_budget(model)[0])
        return {_str(k): int(v) for k, v in raw.items()}

    def models(self) -> list[str]:
        """Models that have held a reservation (the gauges' label values)."""
        return sorted(_str(m) for m in self._redis.smembers(keys.QUEUE_BUDGET_MODELS))


class CreateLimiter:
    """Upstream batch creations per hour across the cluster (0 = unlimited)."""

    WINDOW_SECONDS = 3600.0

    def __init__(self, redis_client: redis.Redis, per_hour: int):
        self._redis = redis_client
        self.per_hour = per_hour
        self._acquire = lua.script(redis_client, "creates_acquire")

    def try_acquire(self, now: float | None = None) -> float:
        """0.0 = go (one creation counted); else seconds until one is allowed, nothing counted.

        ``now`` (unix seconds) is for tests; by default the Redis server's clock decides, so
        workers on machines with skewed clocks agree.
        """
        if self.per_hour <= 0:
            return 0.0
        result = self._acquire(
            keys=[keys.BATCH_CREATES, keys.BATCH_CREATES_SEQ],
            args=[
                self.per_hour,
                int(self.WINDOW_SECONDS * 1_000_000),
                "" if now is None else f"{now * 1_000_000:.0f}",
            ],
        )
        return max(0.0, float(_str(result)))

    def used(self, now: float | None = None) -> int:
        """Creations counted in the last hour (for a gauge)."""
        if now is None:
            sec, usec = self._redis.time()
            now = sec + usec / 1_000_000
        low = (now - self.WINDOW_SECONDS) * 1_000_000
        return int(self._redis.zcount(keys.BATCH_CREATES, f"({low:.0f}", "+inf"))
