"""Schedule tasks: the tick beat sends every ``IMAGEBATCH_SCHEDULE_TICK_SECONDS``."""

from __future__ import annotations

from service import queues
from service.context import Context
from service.schedules import runner
from workers.base import task


@task(queues.SCHEDULES_TICK, time_limit=300)
def tick(ctx: Context) -> dict[str, int]:
    return runner.tick(ctx)
