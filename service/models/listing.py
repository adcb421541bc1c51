"""How models look to callers (``GET /v1/models``): plain dicts built from the lifecycle view.

Each catalog model with its state today (``active``, ``shutting_down`` with its date,
``shut_down``), where that date comes from, whether upstream offers it, its batch support (the
catalog's configured value and what was learned from upstream), what it accepts, and its prices
per 1M tokens at both tiers.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict
from typing import Any

from service.catalog import Catalog
from service.models.lifecycle import ModelState, ModelView


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).isoformat().replace("+00:00", "Z")


def model_view(state: ModelState, catalog: Catalog) -> dict[str, Any]:
    model = state.model
    learned = None
    if state.batch_refusal is not None:
        refusal = state.batch_refusal
        learned = {
            "supported": False,
            "since": _iso(refusal.get("since")),
            "until": _iso(refusal.get("until")),
            "batch_id": refusal.get("batch_id"),
            "message": refusal.get("message"),
        }
    sync_prices = asdict(model.price)
    factor = catalog.price_factor("batch")
    return {
        "id": model.id,
        "object": "model",
        "state": state.state,
        "shutdown_date": state.shutdown_date.isoformat() if state.shutdown_date else None,
        "shutdown_source": state.shutdown_source,
        "replacements": list(model.replacements),
        "offered_upstream": state.offered,
        "snapshot_of": model.snapshot_of,
        "batch": {
            "supported": state.batch_capable,
            "configured": state.batch_configured,
            "learned": learned,
        },
        "endpoints": list(model.endpoints),
        "sizes": list(model.sizes),
        "custom_sizes": model.custom_sizes,
        "qualities": list(model.qualities),
        "formats": list(model.formats),
        "token_counts": model.token_table,
        "prices": {
            "unit": "USD per 1M tokens",
            "sync": sync_prices,
            "batch": {kind: price * factor for kind, price in sync_prices.items()},
        },
    }


def models_view(view: ModelView) -> dict[str, Any]:
    """The whole list, and where its lifecycle facts come from."""
    return {
        "object": "list",
        "today": view.today.isoformat(),
        "lifecycle_source": view.source,
        "upstream_list_read_at": _iso(view.upstream.fetched_at) if view.upstream else None,
        "data": [model_view(state, view.catalog) for state in view],
    }
