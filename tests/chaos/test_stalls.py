"""A submitter paused past its lease during a batch create: no second upstream batch, and
nothing billed that the job does not count.

Frozen whole (``stop``: no thread runs, its lease keeper's neither) for 40 s, past the submit
lease's 30 s, just before the create and just after it (the batch exists, its id not yet
recorded), while another worker process is free to take the chunk over. Then the issue's case:
the create stalls (``sleep``: the lease keeper thread runs) while Redis is unreachable for 35 s,
so the keeper's renewals fail and the lease lapses under it.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300)]

# Longer than the submit lease (service.lanes.plan.LOCK_SECONDS, 30 s).
PAST_THE_LEASE = 40


@pytest.mark.parametrize("name", ["submit.create_started", "submit.batch_created"])
def test_a_submitter_frozen_past_its_lease(make_drill, name: str) -> None:
    drill = make_drill()
    drill.start(f"{name}=stop:{PAST_THE_LEASE}")
    job_id = drill.submit()
    drill.wait_fired(name)
    job = drill.wait_ended(job_id, timeout=PAST_THE_LEASE + 150)
    drill.check_exact(job)
    drill.check_webhook(job_id)


def test_a_slow_create_while_redis_is_unreachable(make_drill) -> None:
    name = "submit.create_started"
    drill = make_drill()
    drill.start(f"{name}=sleep:{PAST_THE_LEASE}")
    job_id = drill.submit()
    drill.wait_fired(name)
    # Redis stops answering (its process frozen: connections hang, as on a network partition).
    os.kill(drill.redis_proc.pid, signal.SIGSTOP)
    try:
        time.sleep(35)  # unreachable this long: past the lease, before the create returns
    finally:
        os.kill(drill.redis_proc.pid, signal.SIGCONT)
    job = drill.wait_ended(job_id, timeout=PAST_THE_LEASE + 150)
    assert drill.worker().alive(), drill.logs()
    drill.check_exact(job)
    drill.check_webhook(job_id)
