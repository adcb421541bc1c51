"""The house way to declare a task.

``@task("batches.collect", time_limit=3600)`` gives a Celery task with a stable dotted name, its
queue from :mod:`service.queues` (through the app's ``task_routes``), ``acks_late`` (every task is idempotent), no result backend,
soft and hard time limits, a duration histogram and a worker heartbeat, and retries only for
what is transient (upstream 429/5xx/connection errors, storage and Redis hiccups) with capped
exponential backoff. Task bodies call plain functions in ``service/`` with a Context and ids.

A task whose worker shuts down may stop early with :class:`service.handover.Handover` (it saved
its place and released its lease first): it is sent again, as it was, for another worker, and
this run ends as done (acknowledged). ``handover_seconds`` says how long such a task may still
run after the worker asked (the unit in hand); the deployments' grace periods are set from it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from celery import Task
from celery.exceptions import Reject
from kombu.exceptions import OperationalError

from service import metrics
from service.errors import ImagebatchError
from service.handover import Handover
from service.upstream.errors import MID_STREAM
from workers import app as app_module

log = logging.getLogger("imagebatch.tasks")

F = TypeVar("F", bound=Callable[..., Any])

# What a task retries: imagebatch's own errors that say so (upstream 429/5xx/connection,
# storage hiccups, a webhook receiver that cannot take it now), and Redis going away.
RETRIED: tuple[type[BaseException], ...] = (
    ImagebatchError,
    redis.ConnectionError,
    redis.TimeoutError,
    # A connection to upstream broken mid-stream, should one surface untranslated.
    *MID_STREAM,
)


# Publishing a task's retry waits this long for a broker that went away (a Redis restart)
# before giving up: about a minute, in steps of at most 2 s.
RETRY_PUBLISH_POLICY = {
    "max_retries": 30,
    "interval_start": 0.5,
    "interval_step": 0.5,
    "interval_max": 2.0,
}
# What "the broker is away" looks like when a retry is published.
BROKER_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    OperationalError,
    OSError,
)


def task(
    name: str,
    *,
    time_limit: int = 600,
    max_retries: int = 8,
    handover_seconds: int | None = None,
) -> Callable[[F], Task]:
    def wrap(fn: F) -> Task:
        @functools.wraps(fn)
        def run(self: Task, *args: Any) -> Any:
            ctx = app_module.context()
            start = time.monotonic()
            try:
                return fn(ctx, *args)
            except Handover as exc:
                # Its lease is released and its place saved: another worker takes it from here.
                ctx.enqueue(name, *args)
                with contextlib.suppress(redis.RedisError):
                    metrics.count(ctx.redis, metrics.TASK_HANDOVERS, {"task": name})
                log.warning("%s%s: %s; sent again", name, args, exc)
                return None
            except RETRIED as exc:
                if not getattr(exc, "transient", True):
                    raise  # a refusal, a missing or oversized object: retrying cannot help
                delay = min(2**self.request.retries, 60)
                log.warning(
                    "%s%s: transient %s, retry %d in %ss",
                    name,
                    args,
                    type(exc).__name__,
                    self.request.retries + 1,
                    delay,
                )
                try:
                    raise self.retry(
                        exc=exc,
                        countdown=delay,
                        max_retries=max_retries,
                        retry_policy=RETRY_PUBLISH_POLICY,
                    ) from exc
                except Reject as rejected:
                    # Celery rejects the message *without* requeue when it cannot publish the
                    # retry. When that is because the broker is away, requeue it instead: a
                    # connection error must never lose a message.
                    if isinstance(rejected.reason, BROKER_ERRORS):
                        log.warning("%s%s: retry not published (%s); requeued", name, args, exc)
                        raise Reject(rejected.reason, requeue=True) from exc
                    raise
            finally:
                try:
                    metrics.observe(
                        ctx.redis,
                        metrics.TASK_DURATION,
                        time.monotonic() - start,
                        {"task": name},
                    )
                    metrics.heartbeat(ctx.redis, app_module.worker_name())
                except redis.RedisError:
                    pass

        return app_module.app.task(
            bind=True,
            name=name,
            acks_late=True,
            ignore_result=True,
            soft_time_limit=time_limit,
            time_limit=time_limit + 60,
            # None: the task does not hand over; a worker's warm shutdown waits for its end.
            handover_seconds=handover_seconds,
        )(run)

    return wrap
