"""Inbound OpenAI webhooks at the edge: deliveries signed the way the simulator signs them (and
OpenAI does) are read; anything forged, stale, tampered, unsigned or not an event is refused
before any state is touched; a webhook-id is taken once, in a real Redis."""

from __future__ import annotations

import base64
import os
import time

import orjson
import pytest
import redis

from service.settings import Settings
from service.upstream import Upstream
from service.upstream.errors import BadWebhookSignature
from service.upstream.port import make_client
from service.upstream.webhooks import first_delivery, forget_delivery, verify
from simulator.webhooks import sign

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()


@pytest.fixture(scope="module")
def upstream() -> Upstream:
    # Verification needs no network: nothing listens at this address.
    s = Settings(openai_base_url="http://127.0.0.1:9/v1", openai_api_key="sk-test")
    return Upstream(make_client(s))


def signed(
    payload: dict[str, object], *, secret: str = SECRET, at: int | None = None, wid: str = "wh_1"
) -> tuple[bytes, dict[str, str]]:
    body = orjson.dumps(payload)
    ts = at if at is not None else int(time.time())
    return body, {
        "webhook-id": wid,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(secret, wid, ts, body),
    }


EVENT = {
    "id": "evt_1",
    "object": "event",
    "type": "batch.completed",
    "created_at": 1,
    "data": {"id": "batch_abc"},
}


def test_a_genuine_batch_event_is_read(upstream: Upstream) -> None:
    body, headers = signed(EVENT)
    event = verify(upstream, body, headers, SECRET)
    assert (event.webhook_id, event.type, event.batch_id) == (
        "wh_1",
        "batch.completed",
        "batch_abc",
    )
    # Header names are case-insensitive, and a rotated secret's second signature may match.
    other = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    both = {
        "Webhook-Id": headers["webhook-id"],
        "Webhook-Timestamp": headers["webhook-timestamp"],
        "Webhook-Signature": f"v1,{'A' * 44} {headers['webhook-signature']}",
    }
    assert verify(upstream, body, both, SECRET).batch_id == "batch_abc"
    assert (
        verify(upstream, *signed({**EVENT, "type": "response.completed"}), SECRET).batch_id is None
    )
    with pytest.raises(BadWebhookSignature):
        verify(upstream, body, headers, other)


@pytest.mark.parametrize(
    "case",
    ["wrong secret", "stale", "from the future", "tampered", "unsigned", "not utf-8", "no event"],
)
def test_anything_else_is_refused(upstream: Upstream, case: str) -> None:
    now = int(time.time())
    body, headers = signed(EVENT)
    if case == "wrong secret":
        body, headers = signed(EVENT, secret="whsec_" + base64.b64encode(b"x" * 32).decode())
    elif case == "stale":
        body, headers = signed(EVENT, at=now - 301)
    elif case == "from the future":
        body, headers = signed(EVENT, at=now + 301)
    elif case == "tampered":
        body = body.replace(b"batch_abc", b"batch_xyz")
    elif case == "unsigned":
        del headers["webhook-signature"]
    elif case == "not utf-8":
        body = b"\xff\xfe" + body
    elif case == "no event":
        body, headers = signed({"hello": "world"})  # type: ignore[dict-item]
    with pytest.raises(BadWebhookSignature):
        verify(upstream, body, headers, SECRET)


def test_a_webhook_id_is_taken_once_until_forgotten(redis_client: redis.Redis) -> None:
    assert first_delivery(redis_client, "wh_9")
    assert not first_delivery(redis_client, "wh_9")
    # Longer than OpenAI's 72 hours of retries.
    assert redis_client.ttl("ib:webhook-in:wh_9") > 72 * 3600
    forget_delivery(redis_client, "wh_9")
    assert first_delivery(redis_client, "wh_9")
