"""Every failpoint, set to kill: the job still ends exactly.

For each name ``imagebatch failpoints`` lists (tests/service/test_failpoints.py pins the command's
output to :data:`service.failpoints.REGISTRY`), a stack of its own runs a job of three chunks of
four items with that failpoint armed as ``kill``: the worker process that reaches it dies by
SIGKILL, Celery's main process starts another in its place, and the job must still end
succeeded, every image stored once, its tokens equal to what the simulator billed, no upstream
batch made twice, and the webhook sent. Sync-lane failpoints run a sync job instead.
"""

from __future__ import annotations

import pytest

from service.failpoints import REGISTRY

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300)]


@pytest.mark.parametrize("name", [fp.name for fp in REGISTRY])
def test_a_kill_at_each_failpoint_leaves_the_job_exact(make_drill, name: str) -> None:
    drill = make_drill()
    drill.start(f"{name}=kill")
    job_id = drill.submit(sync=name.startswith("sync."))
    job = drill.wait_ended(job_id)
    drill.check_fired(name)
    drill.check_exact(job)
    drill.check_webhook(job_id)
