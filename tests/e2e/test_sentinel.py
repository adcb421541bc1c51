"""Redis high availability end to end: the whole stack on a ``redis+sentinel://`` URL (a primary,
its replica, three sentinels), the primary killed with SIGKILL while a job collects, and the job
still ends with every image stored once and its tokens exactly what upstream billed.

Printed (and written down in bench/RESULTS.md and deploy/SCALING.md): how long the sentinels took
to elect the replica, how long until the job moved again, and how many images were stored a
second time (work redone because state the old primary had not yet replicated was lost, or a
task's acknowledgement was).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import wait_until
from tests.support.sentinel import (
    SentinelGroup,
    sentinel_command,
    sentinel_required,
    start_sentinel_group,
    wait_for_new_primary,
)
from tests.support.stack import Stack, job_body

pytestmark = pytest.mark.slow

ITEMS = 400


@pytest.fixture
def group(tmp_path: Path) -> Iterator[SentinelGroup]:
    if sentinel_command() is None:
        if sentinel_required():
            pytest.fail("redis-sentinel is required under CI (Debian's redis-sentinel package)")
        pytest.skip("redis-sentinel is not installed")
    group = start_sentinel_group(tmp_path / "redis")
    yield group
    group.stop()


def _images(stack: Stack, job_id: str) -> dict[str, tuple[int, int]]:
    """Stored images by file name -> (inode, mtime): a rewrite replaces the inode."""
    root = stack.tmp / "storage" / "jobs" / job_id / "images"
    found = {}
    for path in root.glob("*") if root.exists() else []:
        if not path.name.endswith(".meta.json"):
            st = path.stat()
            found[path.name] = (st.st_ino, st.st_mtime_ns)
    return found


def test_the_primary_killed_mid_collect_loses_nothing(
    group: SentinelGroup, make_simulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = make_simulator(rate=150, image_bytes=200_000)
    stack = Stack(
        tmp_path / "stack",
        group.url,
        sim.url,
        env={
            "IMAGEBATCH_BATCH_MAX_LINES": "100",
            "IMAGEBATCH_COLLECT_LEASE_SECONDS": "5",
            # Every output line waits 0.2 s: collect lasts seconds, not a blink, so the primary
            # dies while it runs however fast the machine is (a quiet one finished before).
            "IMAGEBATCH_FAILPOINTS": "collect.line=sleep:0.2@1*",
        },
    )
    stack.tmp.mkdir(parents=True)
    try:
        stack.start(workers=2)
        started = time.monotonic()
        job_id = stack.submit(job_body(ITEMS))["id"]
        wait_until(
            lambda: len(_images(stack, job_id)) >= ITEMS // 4,
            timeout=90,
            message="collect to be under way",
        )
        before = _images(stack, job_id)
        done_before = stack.job(job_id)["counts"]["succeeded"]
        assert done_before < ITEMS, "the job ended before the primary could be killed"

        killed = time.monotonic()
        group.kill("primary")  # SIGKILL
        election = wait_for_new_primary(group, group.primary_port)
        # The job view is read through the API's Redis client: it moves again once the workers'
        # and the API's clients have found the new primary.
        wait_until(
            lambda: stack.job(job_id)["counts"]["succeeded"] > done_before,
            timeout=60,
            interval=0.1,
            message="the job to move again after the failover",
        )
        resumed = time.monotonic() - killed

        job = stack.wait_job(job_id, timeout=120)
        total = time.monotonic() - started
        assert job["status"] == "succeeded", stack.logs()
        after = _images(stack, job_id)
        # Every image once: one object per item, the job's count agrees.
        assert len(after) == ITEMS
        assert job["counts"]["succeeded"] == ITEMS
        assert job["images_stored"] == ITEMS

        # Tokens exact: what the job reports is what the simulator billed, over every batch it
        # ran (a batch created twice, or an item sent twice, would be billed and show here).
        stats = sim.stats()
        billed: Counter[str] = Counter()
        for batch in stats["batches"].values():
            billed.update(batch["tokens"])
        assert stats["batch"]["images"] == ITEMS
        assert len(stats["batches"]) == len(job["upstream_batches"])
        for kind in ("text_input", "image_input", "image_output"):
            assert job["tokens"].get(kind, 0) == billed.get(kind, 0), kind

        rewritten = sum(1 for name, key in before.items() if after.get(name) != key)
        with capsys.disabled():
            print(
                f"\nsentinel failover: election {election:.2f} s after SIGKILL, job moving again "
                f"after {resumed:.2f} s; {len(before)}/{ITEMS} images stored before the kill, "
                f"{rewritten} of them stored again; job {total:.1f} s; load "
                f"{os.getloadavg()[0]:.1f}"
            )
    finally:
        stack.stop()
