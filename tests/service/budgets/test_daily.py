"""A tenant's spend per day is counted in the same Lua call as the item's usage: it adds up to
exactly what the jobs spent, a repeated collect adds nothing, and it is read back by campaign,
model and lane for the last 30 days.

Real Redis, local storage; items end through the lanes' own steps (tests/support/jobs.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.budgets.daily import NO_CAMPAIGN, spend_by_day, utc_day
from service.context import Context
from service.lanes import items
from service.redis import keys
from tests.support.context import make_context
from tests.support.jobs import USAGE, ended_job


@pytest.fixture
def ctx(tmp_path: Path, redis_url: str) -> Iterator[Context]:
    context = make_context(tmp_path, redis_url)
    context.redis.flushdb()
    yield context
    context.redis.close()


def test_the_days_add_up_to_what_the_jobs_spent_exactly_once(ctx: Context) -> None:
    spring = ended_job(ctx, 7, labels={"campaign": "spring"}, finish=False)
    plain = ended_job(ctx, 3)
    spent = sum(ctx.store.spend(job.id).get("cost:batch", 0) for job in (spring, plain))
    assert spent > 0
    # A repeated collect of an item (while its job runs) counts nothing, in the day either.
    again, _ = items.record_usage(ctx, spring, 0, 0, dict(USAGE), [], tier="batch")
    assert not again
    daily = spend_by_day(ctx.redis, "default")
    assert len(daily.days) == 30 and daily.days[-1] == utc_day(time.time())
    assert daily.total == spent
    assert dict(daily.totals("campaign")) == {
        "spring": ctx.store.spend(spring.id)["cost:batch"],
        NO_CAMPAIGN: ctx.store.spend(plain.id)["cost:batch"],
    }
    assert dict(daily.totals("lane")) == {"batch": spent}
    assert dict(daily.totals("model")) == {"gpt-image-2": spent}
    assert daily.per_day()[-1] == spent and sum(daily.per_day()[:-1]) == 0
    ttl = ctx.redis.ttl(keys.tenant_spend_daily("default", daily.days[-1]))
    assert 0 < ttl <= keys.DAILY_SPEND_TTL_SECONDS


def test_days_outside_the_window_are_not_shown(ctx: Context) -> None:
    now = time.time()
    old = utc_day(now - 40 * 86400)
    recent = utc_day(now - 3 * 86400)
    ctx.redis.hset(keys.tenant_spend_daily("acme", old), "gpt-image-2|batch|x", 5)
    ctx.redis.hset(keys.tenant_spend_daily("acme", recent), "gpt-image-2|sync|a|b", 7)
    daily = spend_by_day(ctx.redis, "acme", now=now)
    assert daily.total == 7
    assert dict(daily.totals("campaign")) == {"a|b": 7}  # a campaign may hold the separator
    assert daily.series["lane"]["sync"][-4] == 7
