"""Task names and queues: the contract between whoever enqueues (the API, the sweep) and the
workers. The API sends tasks by name and never imports task bodies.

Queues are split by the kind of work, so a collect streaming gigabytes never delays the sweep:
``control`` (plan, submit, sweep, finalize, cancel, the schedules' tick), ``collect`` (reading
upstream output into storage), ``sync`` (the full-price lane) and ``webhooks`` (telling callers a
job finished: a slow receiver holds only a webhook worker, never another tenant's job).
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from service.redis.client import broker

CONTROL, COLLECT, SYNC = "control", "collect", "sync"
WEBHOOKS = "webhooks"
QUEUES = (CONTROL, COLLECT, SYNC, WEBHOOKS)

PLAN = "jobs.plan"
SUBMIT = "batches.submit"
SWEEP = "batches.sweep"
COLLECT_TASK = "batches.collect"
FINALIZE = "jobs.finalize"
CANCEL = "jobs.cancel"
WEBHOOK = "jobs.webhook"
WEBHOOK_SWEEP = "webhooks.sweep"
SYNC_ITEMS = "sync.items"
POLL = "batches.poll"
MODELS_REFRESH = "models.refresh"
SCHEDULES_TICK = "schedules.tick"
DUPLICATE = "batches.duplicate"  # what a duplicate upstream batch billed (service.lanes.duplicates)

# The longest a task may run: collect's time limit, plus the minute between its soft and hard
# limits. A write begun longer ago than this was abandoned by a killed process (the sweep
# removes what it left: service.lanes.sweep.sweep_temp).
COLLECT_TIME_LIMIT = 4 * 3600
LONGEST_TASK_SECONDS = COLLECT_TIME_LIMIT + 60

ROUTES: dict[str, str] = {
    PLAN: CONTROL,
    SUBMIT: CONTROL,
    SWEEP: CONTROL,
    FINALIZE: CONTROL,
    CANCEL: CONTROL,
    WEBHOOK: WEBHOOKS,
    WEBHOOK_SWEEP: WEBHOOKS,
    COLLECT_TASK: COLLECT,
    SYNC_ITEMS: SYNC,
    POLL: CONTROL,
    MODELS_REFRESH: CONTROL,
    SCHEDULES_TICK: CONTROL,
    DUPLICATE: COLLECT,
}


def producer(broker_url: str) -> Celery:
    """A Celery app that only sends tasks (the API's view of the workers).

    ``broker_url`` is ``IMAGEBATCH_REDIS_URL``, either form (``service.redis.client``)."""
    target = broker(broker_url)
    app = Celery("imagebatch-producer", broker=target.url)
    app.conf.update(
        broker_connection_retry_on_startup=True,
        task_routes={name: {"queue": queue} for name, queue in ROUTES.items()},
        broker_transport_options={"visibility_timeout": 3600, **target.transport_options},
        task_publish_retry_policy=target.publish_retry_policy,
    )
    return app


class Enqueuer:
    """Sends tasks by name to their queue."""

    def __init__(self, app: Celery):
        self.app = app

    def __call__(self, name: str, *args: Any) -> None:
        self.app.send_task(name, args=list(args), queue=ROUTES[name])
