"""The sync lane survives a worker killed mid-job: the sweep sends its stalled slices again."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.support.procs import wait_until
from tests.support.stack import job_body

pytestmark = pytest.mark.slow


def _images(stack_tmp: Path, job_id: str) -> list[Path]:
    root = stack_tmp / "storage" / "jobs" / job_id / "images"
    return sorted(root.glob("*.png")) if root.exists() else []


def test_worker_killed_mid_sync_job_every_item_done_once(make_simulator, make_stack):
    # A bucket of 20 (2 s of the limit), then 10 a second: the job is under way, not done, when
    # its worker is killed.
    sim = make_simulator(ipm=600, limit_window=2, latency_ms=50)
    stack = make_stack(sim, env={"IMAGEBATCH_SYNC_IMAGES_PER_MINUTE": "600"})
    stack.start_api()
    victim = stack.start_worker("sync", concurrency=2, name="victim")
    stack.start_worker("control", name="control")
    stack.start_beat()
    job_id = stack.submit(job_body(80, mode="sync"))["id"]
    wait_until(
        lambda: len(_images(stack.tmp, job_id)) >= 10,
        timeout=60,
        message="the sync job to be under way",
    )
    assert victim.alive()
    stack.kill("victim", signal.SIGKILL)
    stack.start_worker("sync", concurrency=2, name="rescuer")
    job = stack.wait_job(job_id, timeout=120)
    assert job["status"] == "succeeded", stack.logs()
    assert job["mode"] == "sync"
    assert all(
        b["batch_id"] is None for b in job["upstream_batches"]
    )  # nothing went to the Batch API
    assert job["counts"]["succeeded"] == 80
    assert len(_images(stack.tmp, job_id)) == 80
    assert job["images_stored"] == 80  # usage counted once per item
