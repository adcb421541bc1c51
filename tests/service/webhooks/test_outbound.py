"""Delivering a finished job's webhook: signed, logged, retried, refused; real Redis, a real
receiver on loopback (allowed by the settings, as an operator would), no workers (the task is a
thin adapter; these call the function it calls)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from standardwebhooks import Webhook

from service import metrics
from service.context import Context, build_context
from service.errors import TransientError
from service.jobs.model import Job
from service.lanes.finalize import finalize_job
from service.queues import WEBHOOK
from service.redis import keys
from service.settings import Settings
from service.tenants import new_webhook_secret
from service.webhooks import outbound

SECRET = new_webhook_secret()


class Receiver:
    """A loopback webhook receiver answering the statuses it is given, one per request."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.requests: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((dict(self.headers), body))
                status = receiver.statuses.pop(0) if receiver.statuses else 204
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def make_ctx(redis_client, redis_url: str, tmp_path: Path) -> Iterator[Callable[..., Context]]:
    made: list[Context] = []

    def make(**overrides: Any) -> Context:
        fields: dict[str, Any] = {
            "redis_url": redis_url,
            "storage_url": (tmp_path / "storage").as_uri(),
            "data_dir": tmp_path,
            "webhook_secret": SECRET,
            "webhook_allowed_networks": ["127.0.0.0/8"],
            "webhook_timeout_seconds": 3,
        }
        settings = Settings(**{**fields, **overrides})
        queued: list[tuple[Any, ...]] = []
        ctx = build_context(settings, enqueue=lambda *args: queued.append(args))
        ctx.queued = queued  # type: ignore[attr-defined]
        made.append(ctx)
        return ctx

    yield make
    for ctx in made:
        ctx.redis.close()


def finished_job(ctx: Context, url: str) -> Job:
    now = time.time()
    job = Job(
        id=f"job_{int(now * 1000):011x}{'ab' * 6}",
        tenant="default",
        status="queued",
        model="gpt-image-2",
        mode="batch",
        items=1,
        images=1,
        created_at=now,
        webhook_url=url,
    )
    ctx.store.create_job(job, ["sku-1"])
    ctx.store.finish(job.id, job.tenant, "succeeded")
    done = ctx.store.job(job.id)
    assert done is not None
    return done


def attempts(ctx: Context, job: Job) -> list[dict[str, Any]]:
    return outbound.delivery_view(ctx, job)["data"]  # type: ignore[no-any-return]


def counted(ctx: Context, outcome: str) -> float:
    raw = ctx.redis.hget(
        keys.COUNTERS, metrics._field(metrics.WEBHOOK_DELIVERIES, {"outcome": outcome})
    )
    return float(raw or 0)


def test_delivered_signed_so_the_openai_sdk_and_standardwebhooks_verify_it(make_ctx) -> None:
    ctx = make_ctx()
    hook = Receiver([204])
    job = finished_job(ctx, hook.url)
    outbound.schedule(ctx, job)
    assert ctx.queued == [(WEBHOOK, job.id)]  # type: ignore[attr-defined]
    assert outbound.deliver(ctx, job.id) == "delivered"
    headers, body = hook.requests[0]
    # Both verifiers raise unless the signature is ours and the timestamp fresh.
    openai.OpenAI(api_key="x", webhook_secret=SECRET).webhooks.verify_signature(body, headers)
    event = Webhook(SECRET).verify(body, headers)
    assert event["type"] == "job.finished" and event["job"]["id"] == job.id
    assert headers["webhook-id"] == outbound.event_id(job)
    view = outbound.delivery_view(ctx, job)
    assert view["status"] == "delivered" and view["data"][0]["address"] == "127.0.0.1"
    assert counted(ctx, "delivered") == 1
    assert outbound.deliver(ctx, job.id) is None  # a redelivered task sends nothing again
    assert len(hook.requests) == 1


def test_a_5xx_is_retried_later_with_the_same_webhook_id(make_ctx) -> None:
    ctx = make_ctx()
    hook = Receiver([503, 204])
    job = finished_job(ctx, hook.url)
    outbound.schedule(ctx, job)
    assert outbound.deliver(ctx, job.id) == "failed"
    # The attempt is over: nothing keeps the sweep from queueing the retry when it is due.
    assert not ctx.redis.exists(keys.enqueued(WEBHOOK, job.id))
    first = attempts(ctx, job)[0]
    assert first["status_code"] == 503 and first["next_attempt_at"]
    due = ctx.redis.zscore(keys.WEBHOOKS_DUE, job.id)
    assert due == pytest.approx(time.time() + outbound.BACKOFF_SECONDS[0], abs=2)
    assert outbound.deliver(ctx, job.id) is None  # not due yet: a duplicate task does nothing
    assert outbound.sweep(ctx) == 0
    ctx.redis.zadd(keys.WEBHOOKS_DUE, {job.id: time.time() - 1})  # as if 5 s had passed
    ctx.redis.hset(keys.job_webhook(job.id), "next_at", time.time() - 1)
    assert outbound.sweep(ctx) == 1
    assert outbound.deliver(ctx, job.id) == "delivered"
    (h1, _), (h2, _) = hook.requests
    assert h1["webhook-id"] == h2["webhook-id"]
    assert ctx.redis.zscore(keys.WEBHOOKS_DUE, job.id) is None


def test_a_4xx_is_final_and_a_refused_address_is_never_contacted(make_ctx) -> None:
    ctx = make_ctx()
    hook = Receiver([410])
    job = finished_job(ctx, hook.url)
    outbound.schedule(ctx, job)
    assert outbound.deliver(ctx, job.id) == "rejected"
    assert outbound.delivery_view(ctx, job)["status"] == "failed"

    closed = make_ctx(webhook_allowed_networks=[])  # the operator no longer allows loopback
    other = Receiver([])
    job2 = finished_job(closed, other.url)
    outbound.schedule(closed, job2)
    assert outbound.deliver(closed, job2.id) == "blocked"
    assert other.requests == []
    assert "loopback" in attempts(closed, job2)[0]["error"]
    assert counted(closed, "blocked") == 1


def test_retries_give_up_after_24_hours(make_ctx) -> None:
    ctx = make_ctx()
    hook = Receiver([500] * 3)
    job = finished_job(ctx, hook.url)
    outbound.schedule(ctx, job)
    # The first attempt was a day ago: this failure is the last.
    ctx.redis.hset(keys.job_webhook(job.id), "first_at", time.time() - outbound.GIVE_UP_SECONDS)
    assert outbound.deliver(ctx, job.id) == "failed"
    assert outbound.delivery_view(ctx, job)["status"] == "failed"
    assert attempts(ctx, job)[0]["gave_up"] is True
    assert counted(ctx, "expired") == 1


def test_no_secret_no_webhook(make_ctx) -> None:
    ctx = make_ctx(webhook_secret=None)
    hook = Receiver([])
    job = finished_job(ctx, hook.url)
    outbound.schedule(ctx, job)
    assert outbound.deliver(ctx, job.id) == "blocked"
    assert hook.requests == []
    assert outbound.url_checker(ctx, "default")(hook.url) == outbound.NO_SECRET
    assert orjson.dumps(outbound.delivery_view(ctx, job))  # the view is plain JSON


def test_a_webhook_never_scheduled_is_scheduled_once_by_a_finalize_delivered_again(
    make_ctx,
) -> None:
    """A finalize killed after the final status and before the webhook: its message comes
    again, finds the job final, and schedules the webhook; once scheduled it is left alone."""
    ctx = make_ctx()
    hook = Receiver([204])
    job = finished_job(ctx, hook.url)  # finished, and nothing scheduled
    # The killed finalize's lease has not lapsed yet: the task retries until it has.
    ctx.redis.set(keys.finalize_lock(job.id), "the killed finalize", px=60_000)
    with pytest.raises(TransientError):
        finalize_job(ctx, job.id)
    assert ctx.queued == []  # type: ignore[attr-defined]
    ctx.redis.delete(keys.finalize_lock(job.id))
    assert finalize_job(ctx, job.id) is None
    assert ctx.queued == [(WEBHOOK, job.id)]  # type: ignore[attr-defined]
    assert outbound.deliver(ctx, job.id) == "delivered"
    assert finalize_job(ctx, job.id) is None  # again: delivered already, nothing more
    assert not outbound.schedule_if_lost(ctx, job)
    assert len(ctx.queued) == 1 and len(hook.requests) == 1  # type: ignore[attr-defined]
