"""Model tasks: reading upstream's model list (shutdown dates, models offered) on beat's schedule."""

from __future__ import annotations

from service import queues
from service.context import Context
from service.models import lifecycle
from workers.base import task


@task(queues.MODELS_REFRESH, time_limit=300)
def refresh(ctx: Context) -> int | None:
    listed = lifecycle.refresh(ctx.redis, ctx.upstream)
    return len(listed.models) if listed else None
