"""Overhead: a 1,000-image job end to end against a simulator that finishes batches at once.

The whole stack as real processes (API, two workers, beat, Redis, local storage); the time is
from POST /v1/jobs to the job's final status. What is left is imagebatch's own overhead:
intake, plan, submit, the sweep's poll interval, collect, finalize.
Target (issue: the batch path): at most 20 s.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from _support import ROOT, machine, start_redis

sys.path.insert(0, str(ROOT))

from tests.support.simulator import start_simulator
from tests.support.stack import Stack, job_body

ITEMS = 1000
RUNS = 3
POLL_SECONDS = "1"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        redis_proc, redis_url = start_redis(tmp / "redis")
        sim = start_simulator(tmp / "sim", rate=1_000_000, validate_seconds=0, finalize_seconds=0)
        stack = Stack(
            tmp / "stack",
            redis_url,
            sim.url,
            env={"IMAGEBATCH_POLL_SECONDS": POLL_SECONDS},
        )
        stack.tmp.mkdir()
        try:
            stack.start_api()
            stack.start_worker("control,sync", name="control")
            stack.start_worker("collect", concurrency=1, name="collect")
            stack.start_beat()
            times = []
            for run in range(RUNS):
                start = time.perf_counter()
                job = stack.submit(job_body(ITEMS, prefix=f"r{run}", reuse="never"))
                done = stack.wait_job(job["id"], timeout=300)
                times.append(time.perf_counter() - start)
                assert done["status"] == "succeeded", done
            print(f"machine: {machine()}")
            print(
                f"overhead: {ITEMS:,}-image job, simulator finishing batches at once, IMAGEBATCH_POLL_SECONDS={POLL_SECONDS}"
            )
            print(
                f"  submit to succeeded: median {statistics.median(times):.1f} s (runs: {', '.join(f'{t:.1f}' for t in times)})   target <= 20 s"
            )
        finally:
            stack.stop()
            sim.stop()
            redis_proc.stop()


if __name__ == "__main__":
    main()
