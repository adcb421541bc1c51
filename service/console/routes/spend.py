"""Spend: the last 30 days by campaign, model or lane, with totals, and the tenant's budget use."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.budgets.daily import DIMENSIONS, spend_by_day
from service.console import charts, web

router = APIRouter()

DAYS = 30


def _budget(request: Request, tenant_id: str) -> dict[str, Any]:
    """Spent and reserved today and this month against the tenant's caps (None: no cap)."""
    ctx = web.ctx_of(request)
    tenant = ctx.budgets.tenant(tenant_id)
    if tenant is None:
        return {}
    snap = ctx.budgets.tenant_spend.snapshot(tenant)
    return {
        "day": {
            "spent": snap.day_spent / 1e9,
            "reserved": snap.day_reserved / 1e9,
            "cap": tenant.daily_usd,
        },
        "month": {
            "spent": snap.month_spent / 1e9,
            "reserved": snap.month_reserved / 1e9,
            "cap": tenant.monthly_usd,
        },
    }


@router.get("/spend")
def spend_page(request: Request, by: str = "campaign") -> Response:
    session = web.viewer(request)
    assert session.tenant is not None
    by = by if by in DIMENSIONS else "campaign"
    daily = spend_by_day(web.ctx_of(request).redis, session.tenant, days=DAYS)
    chart = charts.stacked_bars(daily.days, daily.series[by])
    return web.page(
        request,
        "spend.html",
        nav="spend",
        by=by,
        dimensions=DIMENSIONS,
        chart=chart,
        totals=[(name, nano / 1e9) for name, nano in daily.totals(by)],
        total=daily.total / 1e9,
        first_day=daily.days[0],
        last_day=daily.days[-1],
        budget=_budget(request, session.tenant),
    )
