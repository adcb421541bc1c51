"""What a process needs to do its work, made once per process and passed down.

The API builds one in its lifespan; a Celery worker builds one after it forks. Tests build one
from ``Settings(...)`` directly. A Context holds the process's clients (Redis, storage,
upstream), the catalog, how to enqueue a task by name, the budget policy, and the clock whose
date model lifecycle decisions use.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import redis

from service import failpoints, metrics
from service.budgets.policy import BudgetPolicy
from service.catalog import Catalog, cached_catalog
from service.jobs.store import JobStore
from service.models.lifecycle import ModelView, load_view, utc_today
from service.queues import Enqueuer, producer
from service.redis import keys
from service.redis.client import connect, require_url
from service.redis.leases import mark_once
from service.settings import Settings
from service.storage import Storage, open_storage
from service.tenants import load_tenants
from service.upstream import Upstream
from service.upstream.port import make_client


@dataclass
class Context:
    settings: Settings
    redis: redis.Redis
    storage: Storage
    catalog: Catalog
    enqueue: Callable[..., None]
    budgets: BudgetPolicy = field(init=False, repr=False)
    _upstream: Upstream | None = field(default=None, repr=False)
    # Today's date (UTC) for model lifecycle decisions; tests pass their own.
    clock: Callable[[], dt.date] = field(default=utc_today, repr=False)

    @cached_property
    def store(self) -> JobStore:
        return JobStore(self.redis)

    @property
    def upstream(self) -> Upstream:
        """The upstream port, made on first use (the API process may never need it)."""
        if self._upstream is None:
            self._upstream = Upstream(
                make_client(self.settings, on_response=self._count), on_response=self._count
            )
        return self._upstream

    def models(self) -> ModelView:
        """The catalog merged with upstream's lifecycle and learned batch support, as of now."""
        return load_view(self.redis, self.catalog, self.clock())

    def enqueue_once(self, task: str, ref: str, *args: Any, ttl: float | None = None) -> bool:
        """Enqueue unless the same task for ``ref`` was enqueued within ``ttl`` seconds."""
        ttl = ttl or max(self.settings.poll_seconds * 3, 15)
        if mark_once(self.redis, keys.enqueued(task, ref), ttl):
            self.enqueue(task, *args)
            return True
        return False

    def _count(self, endpoint: str, status: int) -> None:
        # A metric must never fail an upstream call.
        with contextlib.suppress(redis.RedisError):
            metrics.count_upstream(self.redis, endpoint, status)


def redis_url(settings: Settings) -> str:
    return require_url(settings)


def build_context(settings: Settings, *, enqueue: Callable[..., Any] | None = None) -> Context:
    url = redis_url(settings)
    client = connect(settings)
    failpoints.arm(settings.failpoints, client)
    ctx = Context(
        settings=settings,
        redis=client,
        storage=open_storage(settings),
        catalog=cached_catalog(str(settings.catalog_file) if settings.catalog_file else None),
        enqueue=enqueue or Enqueuer(producer(url)),
    )
    ctx.budgets = BudgetPolicy(
        client, settings, ctx.store, ctx.enqueue, load_tenants(settings.tenants_file)
    )
    return ctx
