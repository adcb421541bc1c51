"""``/v1/models``: the models jobs may name, with lifecycle state, batch support and prices."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from service.api.deps import ctx_of, tenant_of
from service.errors import Problem
from service.models.listing import model_view, models_view

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", summary="Models with lifecycle state, batch support, endpoints, sizes and prices")
def list_models(request: Request) -> dict[str, Any]:
    tenant_of(request)
    return models_view(ctx_of(request).models())


@router.get("/{model_id:path}", summary="One model")
def get_model(request: Request, model_id: str) -> dict[str, Any]:
    tenant_of(request)
    ctx = ctx_of(request)
    state = ctx.models().get(model_id)
    if state is None:
        raise Problem(404, "Model not found", f"no model '{model_id}' in the catalog")
    return model_view(state, ctx.catalog)
