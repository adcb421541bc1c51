"""What a process needs to do its work, made once per process and passed down.

The API builds one in its lifespan; a Celery worker builds one after it forks. Tests build one
from ``Settings(...)`` directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import redis
from openai import OpenAI

from service.catalog import Catalog, cached_catalog
from service.jobs.store import JobStore
from service.queues import Enqueuer, producer
from service.settings import Settings
from service.storage import Storage, open_storage
from service.upstream.client import make_client


@dataclass
class Context:
    settings: Settings
    redis: redis.Redis
    storage: Storage
    catalog: Catalog
    enqueue: Callable[..., None]
    budgets: Any = None  # service.lanes.BatchBudgets, set by build_context
    _openai: OpenAI | None = field(default=None, repr=False)

    @cached_property
    def store(self) -> JobStore:
        return JobStore(self.redis)

    @property
    def openai(self) -> OpenAI:
        if self._openai is None:
            self._openai = make_client(self.settings, on_response=self._count_upstream)
        return self._openai

    def _count_upstream(self, endpoint: str, status: int) -> None:
        from service import metrics

        try:
            with self.redis.pipeline(transaction=False) as pipe:
                metrics.count(
                    pipe,
                    "imagebatch_upstream_requests_total",
                    {"endpoint": endpoint, "status": str(status)},
                )
                if status == 429:
                    metrics.count(
                        pipe, "imagebatch_upstream_rate_limited_total", {"endpoint": endpoint}
                    )
                pipe.execute()
        except redis.RedisError:
            pass  # a metric must never fail an upstream call


def redis_url(settings: Settings) -> str:
    if not settings.redis_url:
        raise RuntimeError(
            "IMAGEBATCH_REDIS_URL is not set; run `imagebatch up` for the embedded Redis, "
            "or point IMAGEBATCH_REDIS_URL at your Redis (redis://host:6379/0)"
        )
    return settings.redis_url


def build_context(settings: Settings, *, enqueue: Callable[..., Any] | None = None) -> Context:
    url = redis_url(settings)
    client = redis.Redis.from_url(url, health_check_interval=30, socket_keepalive=True)
    ctx = Context(
        settings=settings,
        redis=client,
        storage=open_storage(settings),
        catalog=cached_catalog(str(settings.catalog_file) if settings.catalog_file else None),
        enqueue=enqueue or Enqueuer(producer(url)),
    )
    from service.budgets.policy import BatchBudgets
    from service.tenants import load_tenants

    ctx.budgets = BatchBudgets(ctx, load_tenants(settings.tenants_file))
    return ctx
