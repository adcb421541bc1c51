"""Redis killed -9 mid-job and started again from its append-only file: the job still ends
exactly, and no worker exits over it.

Three drills catch Redis going down inside plan, submit and collect (a failpoint holds the step
for 3 s with ``sleep`` while the test kills Redis, so the step wakes to a Redis that is gone or
just back); the fourth kills it at a random moment of the job. Redis stays down for a random
0.5 to 5 s. ``CHAOS_SEED`` repeats a run's moments (each drill prints its seed).
"""

from __future__ import annotations

import random
import time

import pytest

from tests.chaos.drill import seed

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300)]

PHASES = {
    "plan": "plan.chunk_assembled",
    "submit": "submit.create_started",
    "collect": "collect.line",
    "random": None,
}


@pytest.mark.parametrize("phase", list(PHASES))
def test_redis_killed_and_restarted_from_its_aof(make_drill, phase: str) -> None:
    chosen = seed()
    print(f"CHAOS_SEED={chosen}")
    rng = random.Random(chosen)
    # Batches that take a moment (8 images/s), so a random moment falls inside the job.
    drill = make_drill(aof=True, rate=8)
    name = PHASES[phase]
    drill.start(f"{name}=sleep:3" if name else "")
    job_id = drill.submit()
    if name:
        drill.wait_fired(name)
    else:
        time.sleep(rng.uniform(0.2, 4.0))  # the random moment is the point of this drill
    drill.kill_redis()
    time.sleep(rng.uniform(0.5, 5.0))  # Redis stays down this long
    drill.start_redis_again()
    job = drill.wait_ended(job_id)
    assert drill.worker().alive(), f"the worker exited over a Redis restart\n{drill.logs()}"
    drill.check_exact(job)
    drill.check_webhook(job_id)
