"""Spend budgets, cluster-wide in Redis: a job's ``max_cost_usd`` and a tenant's day and month caps.

* :class:`SpendBudget`: a job's ``max_cost_usd``: a chunk (or a sync item) reserves its estimated
  cost against the cap (counting what is already reserved and spent) and settles to the actual
  cost from ``usage``.
* :class:`TenantSpend`: a tenant's ``daily_usd`` / ``monthly_usd`` caps over UTC days and months.

Every check-and-take is one Lua script (``service/redis/scripts/*_spend_*.lua``), so two workers
can never both take the last of a budget. Reservations are idempotent by a caller's key (a chunk
``"job123:4"`` or a sync item ``"job123:s17"``): reserving twice holds once, and releasing or
settling twice counts once. Money is integer nano-USD (1 USD = 10**9); Lua compares numbers as
doubles, exact below 2**53 nano-USD (about 9 million USD), far above any cap this service holds.

Failure semantics: a Redis error propagates (``redis.RedisError``); the caller's task retries it,
and because every operation is idempotent by key the retry cannot double-count. Tenant
reservations disappear when their day/month counters expire.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis

from service.pricing import usd_to_nanousd
from service.redis import keys, lua

if TYPE_CHECKING:
    from service.tenants import Tenant

_DAY_MARGIN = dt.timedelta(days=2)
_MONTH_MARGIN = dt.timedelta(days=7)
_TENANT_HELD_TTL = 62 * 86400
_TENANT_SETTLED_TTL = 40 * 86400
# A job's spend keys live this long after their last change: longer than any job runs (24 h
# completion windows, a few attempts), short enough that Redis does not keep them for ever.
_JOB_SPEND_TTL = 30 * 86400


def _int(value: Any) -> int:
    return int(value) if value is not None else 0


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class SpendBudget:
    """A job's ``max_cost_usd``: chunk estimates reserved against it, settled to actual cost."""

    def __init__(self, redis_client: redis.Redis):
        self._redis = redis_client
        self._reserve = lua.script(redis_client, "job_spend_reserve")
        self._settle = lua.script(redis_client, "job_spend_settle")
        self._release = lua.script(redis_client, "job_spend_release")

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
            keys=list(keys.job_spend_budget(job_id)),
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
        self._settle(
            keys=list(keys.job_spend_budget(job_id)),
            args=[key, int(actual_nanousd), _JOB_SPEND_TTL],
        )

    def release(self, job_id: str, key: str) -> None:
        """Drop ``key``'s reservation without spending (chunk abandoned); idempotent."""
        self._release(keys=list(keys.job_spend_budget(job_id)[:2]), args=[key])

    def job_state(self, job_id: str) -> dict[str, int | None]:
        """``reserved``, ``spent``, ``cap`` (None = no cap) and ``remaining`` (None = no cap)."""
        reserved, spent, cap = self._redis.hmget(
            keys.job_spend_budget(job_id)[0], ["reserved", "spent", "cap"]
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


class TenantSpend:
    """A tenant's spend per UTC day and month against its ``daily_usd`` / ``monthly_usd`` caps.

    A reservation counts in the day and month it was made; actual spend counts in the day and
    month it is settled (when upstream billed it). Counters expire 2 days after their day and
    7 days after their month ends.
    """

    def __init__(self, redis_client: redis.Redis):
        self._redis = redis_client
        self._reserve = lua.script(redis_client, "tenant_spend_reserve")
        self._finish = lua.script(redis_client, "tenant_spend_finish")

    def _totals(self, tenant_id: str, periods: _Periods) -> tuple[int, int, int, int]:
        pipe = self._redis.pipeline(transaction=False)
        pipe.hmget(keys.tenant_spend_day(tenant_id, periods.day), ["reserved", "spent"])
        pipe.hmget(keys.tenant_spend_month(tenant_id, periods.month), ["reserved", "spent"])
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
                keys.tenant_spend_held(tenant.id),
                keys.tenant_spend_settled(tenant.id, key),
                keys.tenant_spend_day(tenant.id, p.day),
                keys.tenant_spend_month(tenant.id, p.month),
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
            keys.tenant_spend_settled(tenant.id, key),
            keys.tenant_spend_day(tenant.id, p.day),
            keys.tenant_spend_month(tenant.id, p.month),
        ]
        extra_args = [int(actual_nanousd), p.day_expires, p.month_expires, _TENANT_SETTLED_TTL]
        self._finish_with(tenant.id, key, extra_keys, extra_args)

    def release(self, tenant: Tenant, key: str) -> None:
        """Drop ``key``'s reservation without spending; idempotent."""
        self._finish_with(tenant.id, key, [], [])

    def _finish_with(
        self, tenant_id: str, key: str, extra_keys: list[str], extra_args: list[Any]
    ) -> None:
        held = keys.tenant_spend_held(tenant_id)
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
                day_key, month_key = (
                    keys.tenant_spend_day(tenant_id, day),
                    keys.tenant_spend_month(tenant_id, month),
                )
            result = self._finish(
                keys=[held, day_key, month_key, *extra_keys], args=[key, expected, *extra_args]
            )
            if int(result) != -1:
                return
        raise RuntimeError(f"tenant {tenant_id!r} reservation {key!r} kept changing; try again")
