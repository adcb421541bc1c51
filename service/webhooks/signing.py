"""Signing outbound webhooks the Standard Webhooks way (as OpenAI signs its own).

Each request carries ``webhook-id`` (the event's id: the same on every attempt, so a receiver
de-duplicates on it), ``webhook-timestamp`` (Unix seconds of the attempt) and
``webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`` keyed with the
tenant's ``whsec_`` secret. Any Standard Webhooks verifier checks it, the ``openai`` SDK's
``client.webhooks.verify_signature`` included. The HMAC is the ``standardwebhooks`` reference
implementation's, not ours.

Failure semantics: :func:`signed_headers` raises ``ValueError`` for a secret that is not
``whsec_`` + base64 (the tenants file and settings are checked when loaded, so this is a bug).
"""

from __future__ import annotations

import datetime as dt

from standardwebhooks import Webhook

from service.tenants import webhook_secret_problem


def signed_headers(secret: str, event_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers for one attempt at sending ``body``."""
    problem = webhook_secret_problem(secret)
    if problem:
        raise ValueError(f"webhook secret {problem}")
    when = dt.datetime.fromtimestamp(timestamp, tz=dt.UTC)
    signature = Webhook(secret).sign(event_id, when, body.decode("utf-8"))
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature,
    }
