"""OpenAI's batch webhooks, sent by the simulator: signed as OpenAI signs them, retried until taken.

When a batch ends (``completed``, ``failed``, ``expired``, ``cancelled``) the batch engine hands it
to :meth:`WebhookSender.send`, which queues the event in memory and returns at once; a dispatcher
task on the simulator's event loop POSTs it to ``--webhook-url``, a few at a time. The event is
OpenAI's (facts §7.4; SDK ``types/webhooks/batch_*_webhook_event.py``)::

    {"id": "evt_…", "object": "event", "type": "batch.completed", "created_at": 1795000000,
     "data": {"id": "batch_…"}}

``created_at`` is when the batch reached its final state. It is signed the Standard Webhooks way,
as OpenAI does: ``webhook-id`` (``wh_…``, the same on every attempt at one event, so a receiver
can drop repeats), ``webhook-timestamp`` (Unix seconds of this attempt) and ``webhook-signature``
``v1,<base64 HMAC-SHA256 of "{webhook-id}.{webhook-timestamp}.{body}">``, keyed with the base64
part of the ``whsec_…`` secret. The SDK's ``client.webhooks.unwrap`` verifies it.

Failure semantics: an attempt fails on a non-2xx answer, a connection error or a timeout; it is
retried with exponential backoff (0.5 s doubling to 60 s, jittered) until delivered or, as
upstream, 72 hours have passed. Events are scheduled independently and several are in flight at
once, so they arrive in no guaranteed order. Redirects are not followed (a 3xx is a failed
attempt). The queue lives in memory: nothing pending survives a restart, and nothing is dropped while the
process runs. Sending is asynchronous I/O on the loop, so it never blocks the batch engine. (An
event loop rather than threads: a thread's timed wait takes an absolute deadline, which
``faketime`` with the clock moved ahead turns into a wait of a year.)

All methods are called on the event loop's thread (the engine and the routes run there).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import heapq
import hmac
import itertools
import logging
import random
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
# Attempts in flight at once.
CONCURRENCY = 4
# Per phase (connect, read, write): a receiver that never answers holds one slot this long.
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
    """Queues batch events and delivers them from the event loop, retrying failures."""

    def __init__(self, url: str, secret: str, concurrency: int = CONCURRENCY) -> None:
        self.url = url
        self._secret = secret
        self._concurrency = concurrency
        self._heap: list[_Delivery] = []
        self._seq = itertools.count()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._counts = _Counts()
        self._client: httpx2.AsyncClient | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the dispatcher on the running loop."""
        if self._dispatcher is not None:
            return
        self._wake = asyncio.Event()
        self._client = httpx2.AsyncClient(timeout=ATTEMPT_TIMEOUT, follow_redirects=False)
        self._dispatcher = asyncio.get_running_loop().create_task(
            self._dispatch(), name="webhook dispatcher"
        )

    async def stop(self) -> None:
        """Stop sending; events still queued are dropped with the process."""
        tasks = [t for t in (self._dispatcher, *self._in_flight) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._dispatcher = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # --- the engine's side ----------------------------------------------------------------------

    def send(self, event_type: str, batch_id: str, created_at: int) -> str:
        """Queue one event for delivery; returns its ``webhook-id``. Never waits on the network."""
        event = {
            "id": new_id("evt_", 32),
            "object": "event",
            "type": event_type,
            "created_at": created_at,
            "data": {"id": batch_id},
        }
        now = time.monotonic()
        delivery = _Delivery(
            due=now,
            seq=next(self._seq),
            webhook_id=new_id("wh_", 32),
            event_type=event_type,
            body=orjson.dumps(event),
            created=now,
        )
        self._counts.events += 1
        self._counts.by_type[event_type] = self._counts.by_type.get(event_type, 0) + 1
        self._schedule(delivery)
        return delivery.webhook_id

    def snapshot(self) -> dict[str, Any]:
        """The counters ``/_simulator/stats`` shows under ``webhooks``."""
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
            "pending": len(self._heap) + len(self._in_flight),
        }

    def reset(self) -> None:
        """Zero the counters (``POST /_simulator/reset``); events still queued are kept."""
        self._counts = _Counts()

    # --- delivering -----------------------------------------------------------------------------

    def _schedule(self, delivery: _Delivery) -> None:
        heapq.heappush(self._heap, delivery)
        if self._wake is not None:
            self._wake.set()

    async def _dispatch(self) -> None:
        assert self._wake is not None
        while True:
            now = time.monotonic()
            if self._heap and self._heap[0].due <= now and len(self._in_flight) < self._concurrency:
                delivery = heapq.heappop(self._heap)
                task = asyncio.get_running_loop().create_task(self._deliver(delivery))
                self._in_flight.add(task)
                continue
            # Wake for a new event, a freed slot, or the next retry falling due.
            timeout = None
            if self._heap and len(self._in_flight) < self._concurrency:
                timeout = max(0.0, self._heap[0].due - now)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()

    async def _deliver(self, delivery: _Delivery) -> None:
        try:
            ok = await self._attempt(delivery)
        except asyncio.CancelledError:
            raise
        except Exception:  # the dispatcher must outlive any one delivery
            log.exception("webhook %s: unexpected failure", delivery.webhook_id)
            ok = False
        finally:
            task = asyncio.current_task()
            if task is not None:
                self._in_flight.discard(task)
        self._counts.attempts += 1
        if ok:
            self._counts.delivered += 1
        else:
            self._counts.failed_attempts += 1
            if time.monotonic() - delivery.created > RETRY_WINDOW_SECONDS:
                self._counts.abandoned += 1
                log.warning("webhook %s: giving up after 72 h", delivery.webhook_id)
            else:
                delivery.due = time.monotonic() + _backoff(delivery.attempts)
                heapq.heappush(self._heap, delivery)
        assert self._wake is not None
        self._wake.set()

    async def _attempt(self, delivery: _Delivery) -> bool:
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
            resp = await self._client.post(self.url, content=delivery.body, headers=headers)
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
