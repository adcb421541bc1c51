"""The Celery app: broker, queues, routing, beat schedule, and the per-process context.

Delivery is at least once (``acks_late``, ``reject_on_worker_lost``): a worker killed mid-task
has its message redelivered, and every task is safe to run twice. SIGTERM to the main process
starts Celery's warm shutdown (no new tasks) and a graceful handover (:mod:`service.handover`):
every pool process is told, and long tasks (collect, sync slices) save their place, release their
lease and are sent again for another worker, so the warm shutdown ends within seconds. The beat schedule holds the
sweeps (batches, and webhooks due for another attempt), the refresh of upstream's model list and
the schedules' tick (user schedules live in Redis, not in beat); nothing waits in a countdown, so
the Redis visibility timeout never redelivers a long-waiting task.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from typing import Any

from celery import Celery
from celery.signals import (
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)

from service import handover, queues
from service.context import Context, build_context, redis_url
from service.redis.client import broker, connect
from service.redis.leases import pause
from service.settings import Settings, get_settings
from workers import brokerfix  # noqa: F401  (a Redis restart must never kill a worker)

log = logging.getLogger("imagebatch.workers")

_ctx: Context | None = None


# Tasks register on this app at import; :func:`configure` gives it the broker and settings
# before a worker, beat or producer starts (settings are never read at import time).
app = Celery(
    "imagebatch",
    include=[
        "workers.tasks.batches",
        "workers.tasks.jobs",
        "workers.tasks.models",
        "workers.tasks.schedules",
        "workers.tasks.sync",
        "workers.tasks.webhooks",
    ],
)


def context() -> Context:
    """This process's context, made on first use after the fork."""
    global _ctx
    if _ctx is None:
        settings = get_settings()
        if not app.conf.broker_url:
            configure(settings)
        _ctx = build_context(settings, enqueue=queues.Enqueuer(app))
    return _ctx


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@worker_process_init.connect
def _fresh_context(**_: Any) -> None:
    # A forked child must not share its parent's Redis or HTTP connections.
    global _ctx
    _ctx = None
    # The main process asks for a handover with a signal (see _hand_over).
    handover.reset()
    handover.install_signal()


# The WorkController of this process, when it is a worker's main process: its pool's processes
# are told to hand over when the worker shuts down.
_worker: Any = None


@worker_init.connect
def _remember_worker(sender: Any = None, **_: Any) -> None:
    global _worker
    _worker = sender


@worker_shutting_down.connect
def _hand_over(sig: str = "", how: str = "", **_: Any) -> None:
    """The main process begins to shut down (run from its signal handler, so nothing here may
    block): long tasks in this process (threads or solo pool) and in every pool process stop at
    their next unit and are sent again. Celery's warm shutdown then waits only for that."""
    handover.request()
    pids = _pool_pids(_worker)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # the process ended meanwhile
            os.kill(pid, handover.SIGNAL)
    log.warning(
        "%s shutdown on %s: handing over the work of %d pool processes", how, sig, len(pids)
    )


def _pool_pids(worker: Any) -> list[int]:
    """The pool processes of a prefork worker (none for the threads and solo pools)."""
    pool = getattr(worker, "pool", None)
    if pool is None:
        return []
    try:
        pids = pool.info.get("processes") or []
    except Exception:  # the pool is stopping: nothing to tell
        return []
    return [int(pid) for pid in pids if pid and int(pid) != os.getpid()]


# The worker's main process says it is alive every HEARTBEAT_SECONDS, busy or idle, so the
# "no worker heartbeat" alert and the dashboard see an idle worker as alive.
HEARTBEAT_SECONDS = 30.0
_heartbeat_stop = threading.Event()


@worker_ready.connect
def _start_heartbeat(**_: Any) -> None:
    import redis

    from service import metrics

    client = connect(get_settings())
    name = worker_name()

    def beat() -> None:
        while True:
            try:
                metrics.heartbeat(client, name)
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)
            if pause(_heartbeat_stop, HEARTBEAT_SECONDS, step=1.0):
                return

    threading.Thread(target=beat, name="imagebatch-heartbeat", daemon=True).start()


@worker_shutdown.connect
def _stop_heartbeat(**_: Any) -> None:
    _heartbeat_stop.set()


@worker_process_shutdown.connect
def _close(**_: Any) -> None:
    if _ctx is not None:
        _ctx.redis.close()


def configure(settings: Settings) -> Celery:
    target = broker(redis_url(settings))
    app.conf.update(
        broker_url=target.url,
        broker_connection_retry_on_startup=True,
        # Long enough that a slow collect is not redelivered while it still runs; the sweep
        # re-enqueues a collect whose lease lapsed well before this.
        broker_transport_options={"visibility_timeout": 3600, **target.transport_options},
        # With Sentinel, publishing retries through a failover (service/redis/client.py).
        task_publish_retry_policy=target.publish_retry_policy,
        task_routes={name: {"queue": q} for name, q in queues.ROUTES.items()},
        task_default_queue=queues.CONTROL,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        beat_schedule={
            "sweep": {
                "task": queues.SWEEP,
                "schedule": settings.poll_seconds,
                "options": {"queue": queues.CONTROL, "expires": max(settings.poll_seconds * 2, 5)},
            },
            # Upstream's model list: shutdown dates and models no longer offered.
            "models-refresh": {
                "task": queues.MODELS_REFRESH,
                "schedule": settings.models_refresh_seconds,
                "options": {"queue": queues.CONTROL, "expires": settings.models_refresh_seconds},
            },
            # User schedules live in Redis; this only wakes the runner, which makes each due
            # slot's job exactly once however many beat processes send it.
            "schedules": {
                "task": queues.SCHEDULES_TICK,
                "schedule": settings.schedule_tick_seconds,
                "options": {
                    "queue": queues.CONTROL,
                    "expires": max(settings.schedule_tick_seconds * 2, 5),
                },
            },
            # Webhook retries wait in Redis, due at a time; this queues those that are due.
            "webhooks": {
                "task": queues.WEBHOOK_SWEEP,
                "schedule": min(settings.poll_seconds, 5.0),
                "options": {"queue": queues.WEBHOOKS, "expires": 10},
            },
        },
    )
    return app
