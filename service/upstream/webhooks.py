"""OpenAI's batch webhooks (OpenAI -> us): verified, de-duplicated, read as a hint to poll now.

OpenAI signs its events the Standard Webhooks way (``webhook-id``, ``webhook-timestamp``,
``webhook-signature: v1,<base64>``; HMAC-SHA256 of ``"{id}.{timestamp}.{body}"`` with the
endpoint's ``whsec_`` secret) and delivers at least once, retrying for up to 72 hours, in no
order (facts §7.4). :func:`verify` checks the signature and the timestamp (300 s either way) with
the SDK's own verifier (:meth:`service.upstream.port.Upstream.verify_webhook`) and reads the
event; :func:`first_delivery` drops a ``webhook-id`` already taken (``SET NX`` for
:data:`SEEN_SECONDS`, longer than OpenAI's retries).

An event names only a batch id: it says "look at this batch now", nothing more. The caller polls
the batch upstream as the sweep would; the sweep stays the safety net for a webhook that never
comes.

Failure semantics: anything wrong with a delivery raises :class:`BadWebhookSignature` before
any state is touched; a delivery whose handling failed afterwards must :func:`forget_delivery`
so OpenAI's retry of it is not dropped as a duplicate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import orjson
import redis

from service.redis import keys
from service.upstream.errors import BadWebhookSignature
from service.upstream.port import Upstream

# Batch events OpenAI sends; any other event type is verified and acknowledged, and ignored.
BATCH_EVENTS = ("batch.completed", "batch.failed", "batch.expired", "batch.cancelled")
# How long a webhook-id is remembered: OpenAI retries a delivery for up to 72 hours.
SEEN_SECONDS = 4 * 86400
# Largest delivery read: a batch event is a few hundred bytes.
MAX_BODY_BYTES = 64 * 1024


@dataclass(frozen=True)
class Event:
    """One verified delivery: its webhook-id, event type and, for batch events, the batch id."""

    webhook_id: str
    type: str
    batch_id: str | None


def verify(upstream: Upstream, body: bytes, headers: Mapping[str, str], secret: str) -> Event:
    """The delivery's event, once its signature and timestamp check out.

    Raises :class:`BadWebhookSignature` for a missing header, a bad or stale signature, or a
    signed body that is not an event.
    """
    upstream.verify_webhook(body, headers, secret)
    try:
        event = orjson.loads(body)
        kind = str(event["type"])
        data = event.get("data") or {}
        batch_id = str(data["id"]) if kind in BATCH_EVENTS else None
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise BadWebhookSignature(f"the signed body is not an event: {exc!r}") from None
    return Event(_header(headers, "webhook-id"), kind, batch_id)


def _header(headers: Mapping[str, str], name: str) -> str:
    for key, value in headers.items():
        if key.lower() == name:
            return value
    raise BadWebhookSignature(f"Could not find {name} header")


def first_delivery(r: redis.Redis, webhook_id: str) -> bool:
    """True the first time ``webhook_id`` is seen (within :data:`SEEN_SECONDS`)."""
    return bool(r.set(keys.openai_webhook_seen(webhook_id), "1", nx=True, ex=SEEN_SECONDS))


def forget_delivery(r: redis.Redis, webhook_id: str) -> None:
    """Handling failed after :func:`first_delivery`: OpenAI's retry must be taken, not dropped."""
    r.delete(keys.openai_webhook_seen(webhook_id))
