"""A submitter paused past its lease around a batch create: nothing billed that the job does not
count, and no second upstream batch unless the job found it and counted what it billed.

The stack's leases last ``LEASE_SECONDS`` (10 s); a paused submitter stays paused longer, while
the other process of its worker is free to take the chunk over:

- frozen whole (``stop``: no thread runs, its lease keeper's neither) just before the create,
  and just after it (the batch exists, its id not yet recorded);
- frozen (SIGSTOP from the test) while a slow create (the simulator's ``--create-delay``) is in
  flight;
- the issue's case: a slow create while Redis is unreachable (its process frozen), so the lease
  keeper's renewals hang and the lease lapses under the holder.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.chaos.drill import LEASE_SECONDS, pid_of
from tests.support.procs import wait_until

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300)]

PAST_THE_LEASE = 2 * LEASE_SECONDS + 5


@pytest.mark.parametrize("name", ["submit.create_started", "submit.batch_created"])
def test_a_submitter_frozen_past_its_lease(make_drill, name: str) -> None:
    drill = make_drill()
    drill.start(f"{name}=stop:{PAST_THE_LEASE}")
    job_id = drill.submit()
    drill.wait_fired(name)
    job = drill.wait_ended(job_id)
    drill.check_exact(job, duplicates_allowed=True)
    drill.check_webhook(job_id)


def test_a_submitter_frozen_during_a_slow_create(make_drill) -> None:
    name = "submit.create_started"
    drill = make_drill(create_delay=4)
    drill.start(f"{name}=sleep:0")  # a beacon: says which process is about to create, and when
    job_id = drill.submit()
    drill.wait_fired(name)
    pid = wait_until(lambda: pid_of(drill.worker().log_text(), name), message="the submitter")
    time.sleep(1)  # the create is on its way upstream (it takes 4 s there)
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(PAST_THE_LEASE)  # frozen past its lease, the create answered meanwhile
    finally:
        os.kill(pid, signal.SIGCONT)
    job = drill.wait_ended(job_id)
    drill.check_exact(job, duplicates_allowed=True)
    drill.check_webhook(job_id)


def test_a_slow_create_while_redis_is_unreachable(make_drill) -> None:
    name = "submit.create_started"
    drill = make_drill(create_delay=LEASE_SECONDS + 2)
    drill.start(f"{name}=sleep:0", IMAGEBATCH_BATCH_CREATE_TIMEOUT_SECONDS="20")
    job_id = drill.submit()
    drill.wait_fired(name)
    # Redis stops answering (its process frozen: connections hang, as in a network partition)
    # while the create is in flight, past the lease: the keeper cannot renew it.
    os.kill(drill.redis_proc.pid, signal.SIGSTOP)
    try:
        time.sleep(LEASE_SECONDS + 2)
    finally:
        os.kill(drill.redis_proc.pid, signal.SIGCONT)
    job = drill.wait_ended(job_id)
    assert drill.worker().alive(), drill.logs()
    drill.check_exact(job, duplicates_allowed=True)
    drill.check_webhook(job_id)
