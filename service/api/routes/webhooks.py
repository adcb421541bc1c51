"""``POST /v1/webhooks/openai``: OpenAI's signed batch events, a hint to poll that batch now.

No bearer key: OpenAI cannot send one. The signature is the authentication (the endpoint's
``whsec_`` secret, ``OPENAI_WEBHOOK_SECRET``); without a secret set the route answers 404.
A bad, stale or missing signature is a 400, and so is a delivery whose ``webhook-id`` was taken
before (a replay): neither changes anything. A verified event for a batch that is not ours is
acknowledged (200) and ignored.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service import metrics
from service.api.deps import ctx_of, read_body
from service.errors import Problem
from service.lanes.sweep import batch_event
from service.upstream import webhooks
from service.upstream.errors import BadWebhookSignature

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


def _rejected(request: Request, reason: str) -> None:
    metrics.count(ctx_of(request).redis, metrics.OPENAI_WEBHOOKS_REJECTED, {"reason": reason})


@router.post("/openai", summary="OpenAI's signed batch events (batch.completed, …): poll now")
async def openai_events(request: Request) -> JSONResponse:
    ctx = ctx_of(request)
    metrics.count(ctx.redis, metrics.OPENAI_WEBHOOKS_RECEIVED)
    secret = ctx.settings.openai_webhook_secret
    if secret is None:
        _rejected(request, "disabled")
        raise Problem(
            404,
            "Not found",
            "inbound OpenAI webhooks are off here: set OPENAI_WEBHOOK_SECRET to your webhook "
            "endpoint's secret",
        )
    try:
        body = await read_body(request, webhooks.MAX_BODY_BYTES)
    except Problem:
        _rejected(request, "too_large")
        raise
    try:
        event = webhooks.verify(ctx.upstream, body, request.headers, secret.get_secret_value())
    except BadWebhookSignature as exc:
        _rejected(request, "signature")
        raise Problem(
            400, "Invalid webhook signature", f"the delivery was not accepted: {exc}"
        ) from None
    metrics.count(ctx.redis, metrics.OPENAI_WEBHOOKS_VERIFIED)
    if not webhooks.first_delivery(ctx.redis, event.webhook_id):
        metrics.count(ctx.redis, metrics.OPENAI_WEBHOOKS_DUPLICATE)
        raise Problem(
            400,
            "Duplicate webhook",
            f"webhook-id '{event.webhook_id}' was received before; this delivery changed nothing",
        )
    try:
        outcome = batch_event(ctx, event.batch_id) if event.batch_id else "ignored"
    except BaseException:
        webhooks.forget_delivery(ctx.redis, event.webhook_id)
        raise
    return JSONResponse({"received": event.type, "batch_id": event.batch_id, "status": outcome})
