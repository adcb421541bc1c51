"""Every failpoint, set to kill: the job still ends exactly.

For each name ``imagebatch failpoints`` lists (tests/service/test_failpoints.py pins the command's
output to :data:`service.failpoints.REGISTRY`), a stack of its own runs a job of three chunks of
four items with that failpoint armed as ``kill``: the worker process that reaches it dies by
SIGKILL, Celery's main process starts another in its place, and the job must still end
succeeded, every image stored once, its tokens equal to what the simulator billed, no upstream
batch made twice, and the webhook delivered. Sync-lane failpoints run a sync job instead.
"""

from __future__ import annotations

import pytest

from service.failpoints import REGISTRY
from tests.chaos.drill import ITEMS

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300)]

# A sync request's answer lost with its process was billed by upstream and cannot be counted
# (the images endpoints have no idempotency key to ask for it again): a kill once upstream has
# answered, or while other requests of the process are in flight, leaves those tokens uncounted.
SYNC_LOSES_ANSWERS = (
    "sync lane: the answers of requests in flight in a killed worker process are billed "
    "upstream and never counted; the item is sent again (at least once, sync.py)"
)


# The collect cursor is saved at most every 5 s, as lines arrive (read 1 MB at a time): this
# drill's collect reads an output file of ~2 MB at 250 kB/s, so its second MB comes after 5 s.
SIMULATOR = {"collect.checkpoint": {"image_bytes": 400_000, "download_bytes_per_second": 250_000}}


@pytest.mark.parametrize("name", [fp.name for fp in REGISTRY])
def test_a_kill_at_each_failpoint_leaves_the_job_exact(make_drill, name: str) -> None:
    drill = make_drill(**SIMULATOR.get(name, {}))
    drill.start(f"{name}=kill")
    sync = name.startswith("sync.")
    job_id = drill.submit(sync=sync)
    job = drill.wait_ended(job_id)
    drill.check_webhook(job_id)
    drill.check_killed(name)
    if sync:
        _check_sync(drill, job)
    else:
        drill.check_exact(job)


def _check_sync(drill, job) -> None:
    """Exact but for the answers the kill lost: each of those is one whole request."""
    model = drill.sim.stats()["models"][job["model"]]
    lost = model["requests"] - ITEMS
    if lost == 0:
        drill.check_exact(job)
        return
    billed = model["tokens"]
    # Every item here bills the same: the job counted exactly one answer per item.
    per_item = {k: billed[k] // model["requests"] for k in ("text_input", "image_output")}
    assert {k: job["tokens"][k] for k in per_item} == {k: v * ITEMS for k, v in per_item.items()}
    assert job["images_stored"] == ITEMS
    assert 0 < lost <= 2 * 8, f"{lost} requests sent again"  # at most the slices in flight
    pytest.xfail(f"{SYNC_LOSES_ANSWERS}: {lost} of {model['requests']} requests here")
