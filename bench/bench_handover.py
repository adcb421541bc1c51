"""Graceful handover: how long a job's images stop arriving when its collecting worker stops.

Each run is a fresh stack of real processes (tests/support/handover.py): the API, a control
worker, two collect workers (prefork, one process each), beat, and the simulator serving a
300-line output file (about 28 kB a line) at 1.5 MB/s, so the collect is caught mid-file. When a
fifth of the images are stored, the worker holding the collect is stopped:

- ``sigterm``: SIGTERM to its main process, as Kubernetes sends it on a scale-down. The worker
  hands the collect over (service/handover.py): the lines in hand finish, the cursor is saved,
  the lease released and the task sent again; the other worker resumes after the cursor.
- ``sigkill``: SIGKILL to the whole worker, as a lost machine (and, before the handover, what a
  scale-down ended in once the grace period ran out). The other worker takes over only when the
  sweep finds the lease lapsed.

Both with a collect lease of ``--lease`` seconds (the service's default is 120 s). Printed per
run: the gap (the longest pause between two stored images from the signal to the job's end,
which spans the handover), how long the worker took to exit, images stored by then and how many
of those were stored again; then the median gap of each mode.

    .venv/bin/python bench/bench_handover.py [--runs 3] [--kill-runs 1] [--lease 15]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import tempfile
from pathlib import Path

import redis
from _support import machine, start_redis

from tests.support.handover import ITEMS, SIM, run_handover
from tests.support.simulator import start_simulator
from tests.support.stack import Stack


def one_run(tmp: Path, redis_url: str, sig: signal.Signals, lease: int) -> dict[str, float]:
    redis.Redis.from_url(redis_url).flushdb()
    sim = start_simulator(tmp / "sim", rate=2000, validate_seconds=0, finalize_seconds=0, **SIM)
    stack = Stack(
        tmp / "stack",
        redis_url,
        sim.url,
        env={"IMAGEBATCH_COLLECT_LEASE_SECONDS": str(lease), "IMAGEBATCH_LOG_LEVEL": "info"},
    )
    stack.tmp.mkdir(parents=True)
    try:
        return run_handover(stack, sim, sig)
    finally:
        stack.stop()
        sim.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="SIGTERM runs (default 3)")
    parser.add_argument("--kill-runs", type=int, default=1, help="SIGKILL runs (default 1)")
    parser.add_argument("--lease", type=int, default=15, help="collect lease seconds (15)")
    args = parser.parse_args()
    print(f"machine: {machine()}; {ITEMS} images a job, lease {args.lease} s")
    with tempfile.TemporaryDirectory(prefix="bench-handover-") as root:
        redis_proc, url = start_redis(Path(root) / "redis")
        gaps: dict[str, list[float]] = {"sigterm": [], "sigkill": []}
        try:
            plan = [signal.SIGTERM] * args.runs + [signal.SIGKILL] * args.kill_runs
            for i, sig in enumerate(plan):
                got = one_run(Path(root) / f"run{i}", url, sig, args.lease)
                mode = sig.name.lower()
                gaps[mode].append(got["gap"])
                print(
                    f"{mode:8} gap {got['gap']:6.2f} s  worker exited after "
                    f"{got['exited']:5.2f} s  {got['before']:.0f}/{ITEMS} images stored by "
                    f"then, {got['rewritten']:.0f} stored again  load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
        finally:
            redis_proc.stop()
    for mode, values in gaps.items():
        if values:
            print(f"median gap {mode}: {statistics.median(values):.2f} s over {len(values)} runs")


if __name__ == "__main__":
    main()
