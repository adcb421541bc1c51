"""OpenAI's batch webhooks, sent by the simulator: signed as OpenAI signs them, retried until taken.

When a batch ends (``completed``, ``failed``, ``expired``, ``cancelled``) the batch engine hands it
to :meth:`WebhookSender.send`, which queues the event in memory and returns at once; a few worker
threads POST it to ``--webhook-url``. The event is OpenAI's (facts §7.4; SDK
``types/webhooks/batch_*_webhook_event.py``)::

    {"id": "evt_…", "object": "event", "type": "batch.completed", "created_at": 1795000000,
     "data": {"id": "batch_…"}}

``created_at`` is when the batch reached its final state. It is signed the Standard Webhooks way,
as OpenAI does: ``webhook-id`` (``wh_…``, the same on every attempt at one event, so a receiver
can drop repeats), ``webhook-timestamp`` (Unix seconds of this attempt) and ``webhook-signature``
``v1,<base64 HMAC-SHA256 of "{webhook-id}.{webhook-timestamp}.{body}">``, keyed with the base64
part of the ``whsec_…`` secret. The SDK's ``client.webhooks.unwrap`` verifies it.

Failure semantics: an attempt fails on a non-2xx answer, a connection error or a timeout; it is
retried with exponential backoff (0.5 s doubling to 60 s, jittered) until delivered or, as
upstream, 72 hours have passed. Events are scheduled independently and sent by several threads,
so they arrive in no guaranteed order. Redirects are not followed (a 3xx is a failed attempt).
The queue lives in memory: nothing pending survives a restart, and nothing is dropped while the
process runs. Sending never blocks the batch engine.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import itertools
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx2
import orjson

from simulator.errors import new_id

log = logging.getLogger("simulator.webhooks")

# Upstream's retry window (facts §7.4: "exponential backoff for up to 72 h").
RETRY_WINDOW_SECONDS = 72 * 3600
FIRST_RETRY_SECONDS = 0.5
MAX_RETRY_SECONDS = 60.0
WORKERS = 4
# Per phase (connect, read, write): a receiver that never answers holds one worker this long.
ATTEMPT_TIMEOUT = httpx2.Timeout(10.0, connect=5.0)

EVENT_TYPES = ("batch.completed", "batch.failed", "batch.expired", "batch.cancelled")


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for one attempt (Standard Webhooks, v1).

    Written out rather than taken from the ``standardwebhooks`` package: it is one HMAC, the SDK
    only verifies, and the tests check it with the SDK's own verifier.
    """
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


@dataclass(order=True)
class _Delivery:
    due: float
    seq: int
    webhook_id: str = field(compare=False)
    event_type: str = field(compare=False)
    body: bytes = field(compare=False)
    created: float = field(compare=False)
    attempts: int = field(default=0, compare=False)


@dataclass
class _Counts:
    events: int = 0
    attempts: int = 0
    delivered: int = 0
    failed_attempts: int = 0
    abandoned: int = 0
    by_type: dict[str, int] = field(default_factory=dict)


class WebhookSender:
    """Queues batch events and delivers them from worker threads, retrying failures."""

    def __init__(self, url: str, secret: str, workers: int = WORKERS) -> None:
        self.url = url
        self._secret = secret
        self._workers = workers
        self._heap: list[_Delivery] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._in_flight = 0
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._counts = _Counts()
        self._client: httpx2.Client | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._threads:
            return
        self._stopping = False
        self._client = httpx2.Client(timeout=ATTEMPT_TIMEOUT, follow_redirects=False)
        for i in range(self._workers):
            t = threading.Thread(target=self._work, name=f"sim-webhook-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 2.0) -> None:
        # The workers are daemons: one stuck on a silent receiver must not hold up shutdown.
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._threads = []
        if self._client is not None:
            self._client.close()
            self._client = None

    # --- the engine's side ----------------------------------------------------------------------

    def send(self, event_type: str, batch_id: str, created_at: int) -> str:
        """Queue one event for delivery; returns its ``webhook-id``. Never blocks on the network."""
        event = {
            "id": new_id("evt_", 32),
            "object": "event",
            "type": event_type,
            "created_at": created_at,
            "data": {"id": batch_id},
        }
        delivery = _Delivery(
            due=time.monotonic(),
            seq=next(self._seq),
            webhook_id=new_id("wh_", 32),
            event_type=event_type,
            body=orjson.dumps(event),
            created=time.monotonic(),
        )
        with self._cond:
            self._counts.events += 1
            self._counts.by_type[event_type] = self._counts.by_type.get(event_type, 0) + 1
            heapq.heappush(self._heap, delivery)
            self._cond.notify()
        return delivery.webhook_id

    def snapshot(self) -> dict[str, Any]:
        """The counters ``/_simulator/stats`` shows under ``webhooks``."""
        with self._cond:
            c = self._counts
            return {
                "enabled": True,
                "url": self.url,
                "events": c.events,
                "by_type": {t: c.by_type.get(t, 0) for t in EVENT_TYPES},
                "attempts": c.attempts,
                "delivered": c.delivered,
                "failed_attempts": c.failed_attempts,
                "abandoned": c.abandoned,
                "pending": len(self._heap) + self._in_flight,
            }

    def reset(self) -> None:
        """Zero the counters (``POST /_simulator/reset``); events still queued are kept."""
        with self._cond:
            self._counts = _Counts()

    # --- the workers ----------------------------------------------------------------------------

    def _next(self) -> _Delivery | None:
        with self._cond:
            while not self._stopping:
                now = time.monotonic()
                if self._heap and self._heap[0].due <= now:
                    self._in_flight += 1
                    return heapq.heappop(self._heap)
                self._cond.wait(self._heap[0].due - now if self._heap else None)
            return None

    def _work(self) -> None:
        while (delivery := self._next()) is not None:
            try:
                ok = self._attempt(delivery)
            except Exception:  # a worker must outlive any one delivery
                log.exception("webhook %s: unexpected failure", delivery.webhook_id)
                ok = False
            with self._cond:
                self._in_flight -= 1
                self._counts.attempts += 1
                if ok:
                    self._counts.delivered += 1
                    continue
                self._counts.failed_attempts += 1
                if time.monotonic() - delivery.created > RETRY_WINDOW_SECONDS:
                    self._counts.abandoned += 1
                    log.warning("webhook %s: giving up after 72 h", delivery.webhook_id)
                    continue
                delivery.due = time.monotonic() + _backoff(delivery.attempts)
                heapq.heappush(self._heap, delivery)
                self._cond.notify()

    def _attempt(self, delivery: _Delivery) -> bool:
        delivery.attempts += 1
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": "imagebatch-simulator",
            "webhook-id": delivery.webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self._secret, delivery.webhook_id, timestamp, delivery.body),
        }
        assert self._client is not None
        try:
            resp = self._client.post(self.url, content=delivery.body, headers=headers)
        except httpx2.HTTPError as exc:
            log.info("webhook %s attempt %d: %r", delivery.webhook_id, delivery.attempts, exc)
            return False
        if 200 <= resp.status_code < 300:
            return True
        log.info(
            "webhook %s attempt %d: HTTP %d",
            delivery.webhook_id,
            delivery.attempts,
            resp.status_code,
        )
        return False


def _backoff(attempts: int) -> float:
    base = min(FIRST_RETRY_SECONDS * 2 ** (attempts - 1), MAX_RETRY_SECONDS)
    return base * random.uniform(0.75, 1.0)


def disabled_snapshot() -> dict[str, Any]:
    """What ``/_simulator/stats`` shows under ``webhooks`` when no URL is set."""
    return {
        "enabled": False,
        "url": None,
        "events": 0,
        "by_type": dict.fromkeys(EVENT_TYPES, 0),
        "attempts": 0,
        "delivered": 0,
        "failed_attempts": 0,
        "abandoned": 0,
        "pending": 0,
    }
