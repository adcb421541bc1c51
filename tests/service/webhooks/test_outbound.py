"""Outbound webhooks against a real HTTP receiver: a finished job is announced with the body
``GET /v1/jobs/{id}`` shows; a receiver that cannot take it now gets it again later (the task
retries :class:`WebhookRetry`); a refusal is final."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.context import Context
from service.errors import ImagebatchError
from service.jobs import intake
from service.jobs.spec import parse_job_json
from service.jobs.views import job_view
from service.webhooks.outbound import WebhookRetry, send_job_finished
from tests.support.context import make_context
from tests.support.procs import free_port
from tests.support.receiver import receiving
from tests.support.stack import job_body


@pytest.fixture
def ctx(tmp_path: Path, redis_url: str, redis_client: Any) -> Iterator[Context]:
    context = make_context(tmp_path, redis_url)
    yield context
    context.redis.close()


def finished_job(ctx: Context, webhook_url: str | None) -> str:
    extra = {"webhook_url": webhook_url} if webhook_url else {}
    spec = parse_job_json(orjson.dumps(job_body(2, **extra)), ctx.catalog, max_items=10)
    job = intake.submit(ctx, spec, "default").job
    ctx.store.cancel_unsubmitted(job.id, [])
    ctx.store.finish(job.id, job.tenant, "cancelled")
    return job.id


def test_a_finished_job_is_announced_with_its_view(ctx: Context) -> None:
    with receiving([200]) as receiver:
        job_id = finished_job(ctx, f"{receiver.url}/hooks/imagebatch")
        assert send_job_finished(ctx, job_id) == 200
    (got,) = receiver.requests
    assert (got.method, got.path) == ("POST", "/hooks/imagebatch")
    assert got.headers["user-agent"] == "imagebatch"
    assert got.headers["imagebatch-event"] == "job.finished"
    assert got.headers["content-type"] == "application/json"
    sent = got.json()
    assert sent["event"] == "job.finished"
    job = ctx.store.job(job_id)
    assert job is not None
    assert sent["job"] == orjson.loads(orjson.dumps(job_view(ctx, job)))
    assert sent["job"]["status"] == "cancelled" and sent["job"]["counts"]["cancelled"] == 2


@pytest.mark.parametrize("status", [503, 500, 429])
def test_a_receiver_that_cannot_take_it_now_gets_it_again_later(ctx: Context, status: int) -> None:
    with receiving([status]) as receiver:
        job_id = finished_job(ctx, receiver.url)
        with pytest.raises(WebhookRetry) as caught:
            send_job_finished(ctx, job_id)
    assert isinstance(caught.value, ImagebatchError) and caught.value.transient
    assert str(status) in str(caught.value)
    assert receiver.count() == 1


def test_nothing_listening_is_retried_later(ctx: Context) -> None:
    job_id = finished_job(ctx, f"http://127.0.0.1:{free_port()}/hook")
    with pytest.raises(WebhookRetry) as caught:
        send_job_finished(ctx, job_id)
    assert caught.value.transient


def test_a_receiver_that_never_answers_is_retried_later(ctx: Context) -> None:
    # A socket that accepts connections (the kernel's backlog) and never answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        job_id = finished_job(ctx, f"http://127.0.0.1:{silent.getsockname()[1]}/hook")
        with pytest.raises(WebhookRetry):
            send_job_finished(ctx, job_id, timeout=0.3)


@pytest.mark.parametrize("status", [400, 404, 410])
def test_a_refusal_is_final(ctx: Context, status: int) -> None:
    with receiving([status, 200]) as receiver:
        job_id = finished_job(ctx, receiver.url)
        assert send_job_finished(ctx, job_id) == status
    assert receiver.count() == 1


def test_a_job_without_a_webhook_sends_nothing(ctx: Context) -> None:
    with receiving([200]) as receiver:
        assert send_job_finished(ctx, finished_job(ctx, None)) is None
        assert send_job_finished(ctx, "job_doesnotexist") is None
    assert receiver.count() == 0
