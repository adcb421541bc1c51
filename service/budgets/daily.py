"""A tenant's spend per UTC day, by model, lane (batch or sync) and campaign: what was billed.

Written by :func:`service.lanes.items.record_usage`, in the same Lua call that counts an item's
usage exactly once (``keys.tenant_spend_daily``, field :func:`daily_field`), so the days add up
to the same nano-dollars as the jobs' own spend. A day's hash is kept
``keys.DAILY_SPEND_TTL_SECONDS`` after it was last written: enough for the 30 days the console
shows. Read with :func:`spend_by_day` (one pipelined round trip for all the days).
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass, field

import redis

from service.redis import keys

DIMENSIONS = ("campaign", "model", "lane")
NO_CAMPAIGN = "(none)"


def utc_day(ts: float) -> str:
    """``YYYY-MM-DD`` of the UTC day a unix time falls in."""
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).strftime("%Y-%m-%d")


def daily_field(model: str, tier: str, campaign: str) -> str:
    # The campaign is last: it is the caller's text and may hold the separator.
    return f"{model}|{tier}|{campaign}"


@dataclass
class DailySpend:
    """Nano-USD per day (oldest first) for each value of each dimension, and the totals."""

    days: list[str]
    series: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # dim -> value -> days
    total: int = 0

    def totals(self, dimension: str) -> list[tuple[str, int]]:
        """Each value of ``dimension`` with its total over the days, largest first."""
        rows = [(value, sum(per_day)) for value, per_day in self.series[dimension].items()]
        return sorted(rows, key=lambda r: (-r[1], r[0]))

    def per_day(self) -> list[int]:
        """The total of each day."""
        return [sum(col) for col in zip(*self.series["lane"].values(), strict=True)] or [
            0 for _ in self.days
        ]


def spend_by_day(
    client: redis.Redis, tenant: str, *, days: int = 30, now: float | None = None
) -> DailySpend:
    """The tenant's spend of the last ``days`` UTC days, today included."""
    end = dt.datetime.fromtimestamp(
        now if now is not None else dt.datetime.now(dt.UTC).timestamp(), tz=dt.UTC
    )
    names = [
        (end - dt.timedelta(days=back)).strftime("%Y-%m-%d") for back in range(days - 1, -1, -1)
    ]
    pipe = client.pipeline(transaction=False)
    for day in names:
        pipe.hgetall(keys.tenant_spend_daily(tenant, day))
    raw_days = pipe.execute()
    series: dict[str, dict[str, list[int]]] = {
        d: defaultdict(lambda: [0] * len(names)) for d in DIMENSIONS
    }
    total = 0
    for i, raw in enumerate(raw_days):
        for k, v in raw.items():
            model, tier, campaign = k.decode().split("|", 2)
            amount = int(v)
            total += amount
            for dim, value in (
                ("campaign", campaign or NO_CAMPAIGN),
                ("model", model),
                ("lane", tier),
            ):
                series[dim][value][i] += amount
    return DailySpend(names, {d: dict(s) for d, s in series.items()}, total)
