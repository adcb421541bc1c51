"""Cluster-wide budgets of the batch lane and of spend, held in Redis and taken atomically.

This module owns four budgets that every API and worker process shares through one Redis:

* :class:`QueueBudget`: OpenAI's enqueued (input) token limit per model (facts §2). A chunk reserves
  its input tokens before its upstream batch is created and releases them when the batch ends.
* :class:`CreateLimiter`: upstream batch creations per hour (facts §2: 2,000/hour), a sliding
  window over the last hour.
* :class:`SpendBudget`: a job's ``max_cost_usd``: a chunk reserves its estimated cost against the
  cap (counting what is already reserved and spent) and settles to the actual cost from ``usage``.
* :class:`TenantSpend`: a tenant's ``daily_usd`` / ``monthly_usd`` caps over UTC days and months.

Every check-and-take is one Lua script, so two workers can never both take the last of a budget.
Reservations are idempotent by a caller's key (a chunk id such as ``"job123:4"``): Celery delivers
at least once, so reserving the same key twice holds it once, and releasing or settling twice
counts once. Money is integer nano-USD (1 USD = 10**9); Lua compares numbers as doubles, exact
below 2**53 nano-USD (about 9 million USD), far above any cap this service holds.

Failure semantics: a Redis error propagates (``redis.RedisError``); the caller's task retries it,
and because every operation is idempotent by key the retry cannot double-count. A reservation
whose holder dies stays held until someone releases its key: the sweep that owns a chunk releases
its reservation when the chunk ends or is abandoned (``QueueBudget.held`` lists them for that
reconciliation). Tenant reservations also disappear when their day/month counters expire.

Queue budget policy (what an operator sees in the gauges):

* Limit: ``limits(model)`` (``batch_queue_tokens``, overridden per model by
  ``batch_queue_tokens_per_model``); 0 means unlimited.
* Oversized chunks: a reservation larger than the whole budget is granted when nothing else is
  reserved for the model, otherwise such a chunk would wait forever. Upstream may still refuse it
  (``token_limit_exceeded``); the planner should size chunks below the limit.
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

import datetime as dt
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis

from service.budgets.ratelimit import lua_now

if TYPE_CHECKING:
    from service.settings import Settings
    from service.tenants import Tenant

NANO_PER_USD = 1_000_000_000

# --- Redis keys ---------------------------------------------------------------------------------
# Each budget's keys share a {hash tag} so a script touching several of them stays on one slot of
# a Redis Cluster.
_PREFIX = "ib"


def _queue_keys(model: str) -> list[str]:
    base = f"{_PREFIX}:qbudget:{{{model}}}"
    return [
        f"{base}:held",  # HASH reservation key -> input tokens held
        f"{base}:total",  # STRING: sum of :held, kept beside it so a check is O(1)
        f"{base}:effective",  # STRING: the shrunk limit; absent = configured; expires = recovery
        f"{base}:waiter",  # STRING "tokens|key": the oldest refused reservation, expires
    ]


# SET of models that ever held a queue reservation: what the gauges list.
_QUEUE_MODELS = f"{_PREFIX}:qbudget:models"
# ZSET member -> server time (µs) of each upstream batch creation in the last hour, plus a STRING
# counter that makes members unique.
_CREATES = f"{_PREFIX}:creates:{{window}}"
_CREATES_SEQ = f"{_PREFIX}:creates:{{window}}:seq"


def _job_spend_keys(job_id: str) -> list[str]:
    base = f"{_PREFIX}:jspend:{{{job_id}}}"
    return [
        base,  # HASH reserved, spent (nano-USD), cap (nano-USD; absent = none)
        f"{base}:held",  # HASH reservation key -> reserved nano-USD
        f"{base}:settled",  # HASH reservation key -> actual nano-USD: settles count once
    ]


def _tenant_base(tenant_id: str) -> str:
    return f"{_PREFIX}:tspend:{{{tenant_id}}}"


def _tenant_day(tenant_id: str, day: str) -> str:
    # HASH reserved, spent (nano-USD) for one UTC day "YYYY-MM-DD"; expires 2 days after it ends.
    return f"{_tenant_base(tenant_id)}:day:{day}"


def _tenant_month(tenant_id: str, month: str) -> str:
    # HASH reserved, spent (nano-USD) for one UTC month "YYYY-MM"; expires 7 days after it ends.
    return f"{_tenant_base(tenant_id)}:month:{month}"


def _tenant_held(tenant_id: str) -> str:
    # HASH reservation key -> "nanousd|day|month": where the reservation was counted.
    return f"{_tenant_base(tenant_id)}:held"


def _tenant_settled(tenant_id: str, key: str) -> str:
    # STRING marker, EX 40 days: this reservation key has been settled.
    return f"{_tenant_base(tenant_id)}:settled:{key}"


_DAY_MARGIN = dt.timedelta(days=2)
_MONTH_MARGIN = dt.timedelta(days=7)
_TENANT_HELD_TTL = 62 * 86400
_TENANT_SETTLED_TTL = 40 * 86400
# A job's spend keys live this long after their last change: longer than any job runs (24 h
# completion windows, a few attempts), short enough that Redis does not keep them for ever.
_JOB_SPEND_TTL = 30 * 86400


def usd_to_nanousd(usd: float) -> int:
    """USD to integer nano-USD, rounded to the nearest nano-dollar."""
    return round(usd * NANO_PER_USD)


def _int(value: Any) -> int:
    return int(value) if value is not None else 0


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# --- the enqueued-token budget ------------------------------------------------------------------

# KEYS held, total, effective, waiter.  ARGV key, tokens, configured limit, waiter ttl ms.
# Returns 1 held (now or already), 0 refused.
_RESERVE_QUEUE = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 1 end
local tokens = tonumber(ARGV[2])
local configured = tonumber(ARGV[3])
local limit = configured
local eff = redis.call('GET', KEYS[3])
if eff then
  eff = tonumber(eff)
  if configured == 0 or eff < configured then limit = eff end
end
if limit > 0 then
  local total = tonumber(redis.call('GET', KEYS[2]) or '0')
  local waiter = redis.call('GET', KEYS[4])
  local room_for_waiter = 0
  local waiter_is_me = false
  if waiter then
    local sep = string.find(waiter, '|', 1, true)
    local wtokens = tonumber(string.sub(waiter, 1, sep - 1))
    if string.sub(waiter, sep + 1) == ARGV[1] then
      waiter_is_me = true
    else
      room_for_waiter = math.min(wtokens, limit)
    end
  end
  local fits = total + tokens + room_for_waiter <= limit
  -- Nothing held and nobody else waiting: grant even a chunk larger than the whole limit.
  if total == 0 and room_for_waiter == 0 then fits = true end
  if tokens == 0 then fits = true end
  if not fits then
    if not waiter then
      redis.call('SET', KEYS[4], ARGV[2] .. '|' .. ARGV[1], 'PX', ARGV[4])
    elseif waiter_is_me then
      redis.call('PEXPIRE', KEYS[4], ARGV[4])
    end
    return 0
  end
  if waiter_is_me then redis.call('DEL', KEYS[4]) end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('INCRBY', KEYS[2], ARGV[2])
return 1
"""

# KEYS held, total, effective, waiter.  ARGV key, configured limit.  Returns 1 released, 0 not held.
_RELEASE_QUEUE = """
local waiter = redis.call('GET', KEYS[4])
if waiter then
  local sep = string.find(waiter, '|', 1, true)
  if string.sub(waiter, sep + 1) == ARGV[1] then redis.call('DEL', KEYS[4]) end
end
local held = redis.call('HGET', KEYS[1], ARGV[1])
if not held then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('DECRBY', KEYS[2], held) <= 0 then redis.call('DEL', KEYS[2]) end
local eff = redis.call('GET', KEYS[3])
if eff then
  eff = tonumber(eff)
  local configured = tonumber(ARGV[2])
  local base = configured
  if base == 0 then base = eff end
  -- A batch ended and freed upstream's queue: probe upward by half of what it held.
  local step = math.max(math.floor(tonumber(held) / 2), math.ceil(base / 100), 1)
  local grown = eff + step
  if configured > 0 and grown >= configured then
    redis.call('DEL', KEYS[3])
  else
    redis.call('SET', KEYS[3], string.format('%.0f', grown), 'KEEPTTL')
  end
end
return 1
"""

# KEYS held, total, effective, waiter.  ARGV failed key, configured limit, floor fraction,
# recovery ms.  Returns the new effective limit, or -1 if the key was not held (already handled).
_SHRINK_QUEUE = """
local failed = redis.call('HGET', KEYS[1], ARGV[1])
if not failed then return -1 end
failed = tonumber(failed)
local total = tonumber(redis.call('GET', KEYS[2]) or '0')
local configured = tonumber(ARGV[2])
-- Upstream accepted everything we hold except the failed chunk: that is the limit we know works.
local new = total - failed
local floor = 1
if configured > 0 then floor = math.max(1, math.floor(configured * tonumber(ARGV[3]))) end
if new < floor then new = floor end
local current = redis.call('GET', KEYS[3])
if current then current = tonumber(current) else current = configured end
if current > 0 and new > current then new = current end
redis.call('SET', KEYS[3], string.format('%.0f', new), 'PX', ARGV[4])
redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('DECRBY', KEYS[2], string.format('%.0f', failed)) <= 0 then
  redis.call('DEL', KEYS[2])
end
return new
"""


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
        self._reserve = redis_client.register_script(_RESERVE_QUEUE)
        self._release = redis_client.register_script(_RELEASE_QUEUE)
        self._shrink = redis_client.register_script(_SHRINK_QUEUE)

    def _configured(self, model: str) -> int:
        return max(0, int(self._limits(model)))

    def reserve(self, model: str, key: str, tokens: int) -> bool:
        """Hold ``tokens`` for ``key``; False = wait and try again (nothing held).

        Idempotent: a key already held stays held with its first amount and returns True.
        """
        if tokens < 0:
            raise ValueError(f"cannot reserve a negative number of tokens ({tokens})")
        granted = self._reserve(
            keys=_queue_keys(model),
            args=[key, int(tokens), self._configured(model), self._waiter_ttl_ms],
        )
        if granted:
            self._redis.sadd(_QUEUE_MODELS, model)
        return bool(granted)

    def release(self, model: str, key: str) -> None:
        """Give back ``key``'s tokens (its batch ended, or the chunk was abandoned); idempotent."""
        self._release(keys=_queue_keys(model), args=[key, self._configured(model)])

    def shrink(self, model: str, failed_key: str) -> None:
        """Upstream refused ``failed_key``'s batch with ``token_limit_exceeded``.

        Lowers the effective limit to the tokens still held (upstream accepted those), never below
        ``floor_fraction`` of the configured limit, and releases ``failed_key`` (its batch is
        over). Idempotent: once ``failed_key`` is released, a second call does nothing.
        """
        self._shrink(
            keys=_queue_keys(model),
            args=[failed_key, self._configured(model), self._floor_fraction, self._recovery_ms],
        )

    def usage(self, model: str) -> tuple[int, int, int]:
        """(tokens reserved, effective limit, configured limit); a limit of 0 means unlimited."""
        _, total, effective, _ = _queue_keys(model)
        reserved, eff = self._redis.mget(total, effective)
        configured = self._configured(model)
        effective_limit = configured
        if eff is not None:
            learned = int(eff)
            effective_limit = learned if configured == 0 else min(learned, configured)
        return _int(reserved), effective_limit, configured

    def held(self, model: str) -> dict[str, int]:
        """Every reservation key held for ``model`` and its tokens (for reconciliation sweeps)."""
        raw = self._redis.hgetall(_queue_keys(model)[0])
        return {_str(k): int(v) for k, v in raw.items()}

    def models(self) -> list[str]:
        """Models that have held a reservation (the gauges' label values)."""
        return sorted(_str(m) for m in self._redis.smembers(_QUEUE_MODELS))


# --- batch creations per hour -------------------------------------------------------------------

# KEYS window zset, sequence.  ARGV per-window limit, window µs, now µs ('' = server time).
# Returns '0' when taken, else the seconds until the oldest creation leaves the window.
_CREATE_ACQUIRE = (
    lua_now(3)
    + """
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now - window))
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  local seq = redis.call('INCR', KEYS[2])
  local stamp = string.format('%.0f', now)
  redis.call('ZADD', KEYS[1], stamp, stamp .. '-' .. seq)
  redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000))
  return '0'
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return string.format('%.6f', (tonumber(oldest[2]) + window - now) / 1000000)
"""
)


class CreateLimiter:
    """Upstream batch creations per hour across the cluster (0 = unlimited)."""

    WINDOW_SECONDS = 3600.0

    def __init__(self, redis_client: redis.Redis, per_hour: int):
        self._redis = redis_client
        self.per_hour = per_hour
        self._acquire = redis_client.register_script(_CREATE_ACQUIRE)

    def try_acquire(self, now: float | None = None) -> float:
        """0.0 = go (one creation counted); else seconds until one is allowed, nothing counted.

        ``now`` (unix seconds) is for tests; by default the Redis server's clock decides, so
        workers on machines with skewed clocks agree.
        """
        if self.per_hour <= 0:
            return 0.0
        result = self._acquire(
            keys=[_CREATES, _CREATES_SEQ],
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
        return int(self._redis.zcount(_CREATES, f"({low:.0f}", "+inf"))


# --- a job's max_cost_usd -----------------------------------------------------------------------

# KEYS state, held, settled.  ARGV key, estimate, cap ('' = none), ttl s.  Returns 1 held, 0 refused.
_RESERVE_JOB = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 or redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then
  return 1
end
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 'cap', ARGV[3])
  local reserved = tonumber(redis.call('HGET', KEYS[1], 'reserved') or '0')
  local spent = tonumber(redis.call('HGET', KEYS[1], 'spent') or '0')
  if reserved + spent + tonumber(ARGV[2]) > tonumber(ARGV[3]) then
    redis.call('EXPIRE', KEYS[1], ARGV[4])
    return 0
  end
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[1], 'reserved', ARGV[2])
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[4]) end
return 1
"""

# KEYS state, held, settled.  ARGV key, actual, ttl s.  Returns 1 settled now, 0 already settled.
_SETTLE_JOB = """
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then return 0 end
local held = redis.call('HGET', KEYS[2], ARGV[1])
if held then
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('HINCRBY', KEYS[1], 'reserved', '-' .. held)
end
redis.call('HINCRBY', KEYS[1], 'spent', ARGV[2])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[3]) end
return 1
"""

# KEYS state, held.  ARGV key.  Returns 1 released, 0 not held.
_RELEASE_JOB = """
local held = redis.call('HGET', KEYS[2], ARGV[1])
if not held then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[1], 'reserved', '-' .. held)
return 1
"""


class SpendBudget:
    """A job's ``max_cost_usd``: chunk estimates reserved against it, settled to actual cost."""

    def __init__(self, redis_client: redis.Redis):
        self._redis = redis_client
        self._reserve = redis_client.register_script(_RESERVE_JOB)
        self._settle = redis_client.register_script(_SETTLE_JOB)
        self._release = redis_client.register_script(_RELEASE_JOB)

    def reserve_chunk(
        self, job_id: str, key: str, estimate_nanousd: int, cap_nanousd: int | None
    ) -> bool:
        """Reserve a chunk's estimated cost; False = it would cross the cap (nothing reserved).

        The cap counts what is already reserved plus what is already spent. ``None`` = no cap
        (the reservation is still recorded so the job's state is complete). Idempotent by ``key``:
        a key already reserved, or already settled, returns True without reserving again.
        """
        if estimate_nanousd < 0:
            raise ValueError(f"cannot reserve a negative amount ({estimate_nanousd} nano-USD)")
        granted = self._reserve(
            keys=_job_spend_keys(job_id),
            args=[
                key,
                int(estimate_nanousd),
                "" if cap_nanousd is None else int(cap_nanousd),
                _JOB_SPEND_TTL,
            ],
        )
        return bool(granted)

    def settle(self, job_id: str, key: str, actual_nanousd: int) -> None:
        """Replace ``key``'s reservation by its actual cost; a second settle does nothing.

        Actual spend is recorded even if it crosses the cap (the money is spent); later
        reservations are then refused.
        """
        self._settle(keys=_job_spend_keys(job_id), args=[key, int(actual_nanousd), _JOB_SPEND_TTL])

    def release(self, job_id: str, key: str) -> None:
        """Drop ``key``'s reservation without spending (chunk abandoned); idempotent."""
        self._release(keys=_job_spend_keys(job_id)[:2], args=[key])

    def job_state(self, job_id: str) -> dict[str, int | None]:
        """``reserved``, ``spent``, ``cap`` (None = no cap) and ``remaining`` (None = no cap)."""
        reserved, spent, cap = self._redis.hmget(
            _job_spend_keys(job_id)[0], ["reserved", "spent", "cap"]
        )
        state: dict[str, int | None] = {
            "reserved": _int(reserved),
            "spent": _int(spent),
            "cap": None if cap is None else int(cap),
        }
        state["remaining"] = (
            None if cap is None else max(0, int(cap) - _int(reserved) - _int(spent))
        )
        return state


# --- a tenant's daily and monthly caps ----------------------------------------------------------


def _utc(now: dt.datetime | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(dt.UTC)
    # A naive datetime is taken as UTC: budgets are counted in UTC days and months.
    return now.replace(tzinfo=dt.UTC) if now.tzinfo is None else now.astimezone(dt.UTC)


@dataclass(frozen=True)
class _Periods:
    day: str
    month: str
    day_expires: int  # unix seconds
    month_expires: int

    @classmethod
    def of(cls, now: dt.datetime | None) -> _Periods:
        t = _utc(now)
        day_start = dt.datetime(t.year, t.month, t.day, tzinfo=dt.UTC)
        next_day = day_start + dt.timedelta(days=1)
        next_month = dt.datetime(t.year + (t.month == 12), t.month % 12 + 1, 1, tzinfo=dt.UTC)
        return cls(
            day=f"{t:%Y-%m-%d}",
            month=f"{t:%Y-%m}",
            day_expires=int((next_day + _DAY_MARGIN).timestamp()),
            month_expires=int((next_month + _MONTH_MARGIN).timestamp()),
        )


@dataclass(frozen=True)
class TenantSpendSnapshot:
    """One tenant's spend in the current UTC day and month, in nano-USD (for gauges)."""

    tenant: str
    day_spent: int
    day_reserved: int
    day_remaining: int | None  # None = no cap
    month_spent: int
    month_reserved: int
    month_remaining: int | None


# KEYS held, settled marker, day, month.  ARGV key, amount, day cap, month cap ('' = none),
# record, day expireat, month expireat, held ttl.  Returns 1 held, 0 refused.
_RESERVE_TENANT = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1 then
  return 1
end
local amount = tonumber(ARGV[2])
for i, cap in ipairs({ARGV[3], ARGV[4]}) do
  if cap ~= '' then
    local reserved = tonumber(redis.call('HGET', KEYS[2 + i], 'reserved') or '0')
    local spent = tonumber(redis.call('HGET', KEYS[2 + i], 'spent') or '0')
    if reserved + spent + amount > tonumber(cap) then return 0 end
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[8])
redis.call('HINCRBY', KEYS[3], 'reserved', ARGV[2])
redis.call('EXPIREAT', KEYS[3], ARGV[6])
redis.call('HINCRBY', KEYS[4], 'reserved', ARGV[2])
redis.call('EXPIREAT', KEYS[4], ARGV[7])
return 1
"""

# KEYS held, reserved-day, reserved-month [, settled marker, day now, month now].
# ARGV key, expected record ('' = none) [, actual, day expireat, month expireat, marker ttl].
# Settle when the extra keys/args are given, else release.
# Returns 1 done, 0 nothing to do (already settled / not held), -1 the record changed: read again.
_FINISH_TENANT = """
if #KEYS > 3 and redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
local record = redis.call('HGET', KEYS[1], ARGV[1])
if (record or '') ~= ARGV[2] then return -1 end
if record then
  local amount = string.sub(record, 1, string.find(record, '|', 1, true) - 1)
  redis.call('HDEL', KEYS[1], ARGV[1])
  -- The reservation's own day and month may have expired already; never recreate them.
  for i = 2, 3 do
    if redis.call('EXISTS', KEYS[i]) == 1 then
      redis.call('HINCRBY', KEYS[i], 'reserved', '-' .. amount)
    end
  end
elseif #KEYS == 3 then
  return 0
end
if #KEYS > 3 then
  redis.call('HINCRBY', KEYS[5], 'spent', ARGV[3])
  redis.call('EXPIREAT', KEYS[5], ARGV[4])
  redis.call('HINCRBY', KEYS[6], 'spent', ARGV[3])
  redis.call('EXPIREAT', KEYS[6], ARGV[5])
  redis.call('SET', KEYS[4], '1', 'EX', ARGV[6])
end
return 1
"""


class TenantSpend:
    """A tenant's spend per UTC day and month against its ``daily_usd`` / ``monthly_usd`` caps.

    A reservation counts in the day and month it was made; actual spend counts in the day and
    month it is settled (when upstream billed it). Counters expire 2 days after their day and
    7 days after their month ends.
    """

    def __init__(self, redis_client: redis.Redis):
        self._redis = redis_client
        self._reserve = redis_client.register_script(_RESERVE_TENANT)
        self._finish = redis_client.register_script(_FINISH_TENANT)

    def _totals(self, tenant_id: str, periods: _Periods) -> tuple[int, int, int, int]:
        pipe = self._redis.pipeline(transaction=False)
        pipe.hmget(_tenant_day(tenant_id, periods.day), ["reserved", "spent"])
        pipe.hmget(_tenant_month(tenant_id, periods.month), ["reserved", "spent"])
        (d_res, d_spent), (m_res, m_spent) = pipe.execute()
        return _int(d_res), _int(d_spent), _int(m_res), _int(m_spent)

    def snapshot(self, tenant: Tenant, now: dt.datetime | None = None) -> TenantSpendSnapshot:
        """Spent, reserved and remaining today and this month."""
        d_res, d_spent, m_res, m_spent = self._totals(tenant.id, _Periods.of(now))

        def remaining(cap_usd: float | None, used: int) -> int | None:
            return None if cap_usd is None else max(0, usd_to_nanousd(cap_usd) - used)

        return TenantSpendSnapshot(
            tenant=tenant.id,
            day_spent=d_spent,
            day_reserved=d_res,
            day_remaining=remaining(tenant.daily_usd, d_res + d_spent),
            month_spent=m_spent,
            month_reserved=m_res,
            month_remaining=remaining(tenant.monthly_usd, m_res + m_spent),
        )

    def check(
        self, tenant: Tenant, now: dt.datetime | None = None
    ) -> tuple[int | None, int | None]:
        """Nano-USD still available (today, this month); None where the tenant has no cap."""
        snap = self.snapshot(tenant, now)
        return snap.day_remaining, snap.month_remaining

    def reserve(
        self, tenant: Tenant, key: str, nanousd: int, now: dt.datetime | None = None
    ) -> bool:
        """Reserve ``nanousd`` today and this month; False = a cap would be crossed.

        Idempotent by ``key``: held or already settled returns True without reserving again.
        """
        if nanousd < 0:
            raise ValueError(f"cannot reserve a negative amount ({nanousd} nano-USD)")
        p = _Periods.of(now)
        day_cap = "" if tenant.daily_usd is None else usd_to_nanousd(tenant.daily_usd)
        month_cap = "" if tenant.monthly_usd is None else usd_to_nanousd(tenant.monthly_usd)
        granted = self._reserve(
            keys=[
                _tenant_held(tenant.id),
                _tenant_settled(tenant.id, key),
                _tenant_day(tenant.id, p.day),
                _tenant_month(tenant.id, p.month),
            ],
            args=[
                key,
                int(nanousd),
                day_cap,
                month_cap,
                f"{int(nanousd)}|{p.day}|{p.month}",
                p.day_expires,
                p.month_expires,
                _TENANT_HELD_TTL,
            ],
        )
        return bool(granted)

    def settle(
        self, tenant: Tenant, key: str, actual_nanousd: int, now: dt.datetime | None = None
    ) -> None:
        """Replace ``key``'s reservation by its actual cost, counted now; idempotent."""
        p = _Periods.of(now)
        extra_keys = [
            _tenant_settled(tenant.id, key),
            _tenant_day(tenant.id, p.day),
            _tenant_month(tenant.id, p.month),
        ]
        extra_args = [int(actual_nanousd), p.day_expires, p.month_expires, _TENANT_SETTLED_TTL]
        self._finish_with(tenant.id, key, extra_keys, extra_args)

    def release(self, tenant: Tenant, key: str) -> None:
        """Drop ``key``'s reservation without spending; idempotent."""
        self._finish_with(tenant.id, key, [], [])

    def _finish_with(
        self, tenant_id: str, key: str, extra_keys: list[str], extra_args: list[Any]
    ) -> None:
        held = _tenant_held(tenant_id)
        # The reservation names the day and month it was counted in; read it, then let the script
        # act only if it is unchanged, so every key the script touches is declared up front.
        for _ in range(10):
            record = self._redis.hget(held, key)
            if record is None:
                day_key = month_key = held  # unused: nothing to un-reserve
                expected = ""
            else:
                expected = _str(record)
                _, day, month = expected.split("|")
                day_key, month_key = _tenant_day(tenant_id, day), _tenant_month(tenant_id, month)
            result = self._finish(
                keys=[held, day_key, month_key, *extra_keys], args=[key, expected, *extra_args]
            )
            if int(result) != -1:
                return
        raise RuntimeError(f"tenant {tenant_id!r} reservation {key!r} kept changing; try again")


# --- numbers for gauges -------------------------------------------------------------------------


def queue_budget_gauges(budget: QueueBudget) -> list[tuple[str, int, int, int]]:
    """(model, reserved, effective limit, configured limit) per model; limits of 0 = unlimited."""
    return [(model, *budget.usage(model)) for model in budget.models()]


def tenant_spend_gauges(
    spend: TenantSpend, tenants: Iterable[Tenant], now: dt.datetime | None = None
) -> list[TenantSpendSnapshot]:
    """Today's and this month's spend, reservations and remaining caps, per tenant."""
    return [spend.snapshot(tenant, now) for tenant in tenants]
