"""Graceful handover, as the e2e test and bench/bench_handover.py play it: a stack with two
collect workers, a job whose output file is served slowly, and the collecting worker stopped
mid-file (SIGTERM to its main process, or SIGKILL to all of it); then the job's end checked and
the pause in storing images measured.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections import Counter

from tests.support.procs import Proc, wait_until
from tests.support.simulator import SimulatorHandle
from tests.support.stack import Stack, job_body

ITEMS = 300
# Output lines of ~28 kB read at 1.5 MB/s: the collect takes about 6 s, so it is caught mid-file,
# and the next worker re-reads the part already done (unparsed) in about a second.
SIM = {"image_bytes": 20_000, "plain_images": True, "download_bytes_per_second": 1_500_000}
# The default lease: a collect that resumed only after it lapsed would take two minutes.
LEASE_SECONDS = 120


def images(stack: Stack, job_id: str) -> dict[str, tuple[int, int]]:
    """Stored images by file name -> (inode, mtime in ns): a rewrite replaces the inode."""
    root = stack.tmp / "storage" / "jobs" / job_id / "images"
    found = {}
    for path in root.glob("*") if root.exists() else []:
        if not path.name.endswith(".meta.json"):
            st = path.stat()
            found[path.name] = (st.st_ino, st.st_mtime_ns)
    return found


def longest_pause(stored: dict[str, tuple[int, int]], since_ns: int) -> float:
    """The longest time, in seconds, between two images stored one after the other, counting
    from the last image stored before ``since_ns`` (the SIGTERM) to the last one stored."""
    times = sorted(mtime for _, mtime in stored.values())
    before = [t for t in times if t < since_ns]
    after = [t for t in times if t >= since_ns]
    span = ([before[-1]] if before else []) + after
    return max((b - a for a, b in itertools.pairwise(span)), default=0) / 1e9


def collecting(workers: list[Proc]) -> Proc:
    """The worker whose log says it received the collect."""
    found = [w for w in workers if "batches.collect[" in w.log_text()]
    assert len(found) == 1, [w.log_text()[-2000:] for w in workers]
    return found[0]


def run_handover(
    stack: Stack, sim: SimulatorHandle, sig: signal.Signals = signal.SIGTERM
) -> dict[str, float]:
    """Start the stack, stop the collecting worker mid-file with ``sig`` and check the job ends
    with one image per item and its tokens exact. The figures measured: ``gap`` (the longest
    pause in storing images from the signal on), ``exited`` (seconds from the signal to the
    worker's exit), ``before`` (images stored by then) and ``rewritten`` (of those, how many were
    stored again later)."""
    stack.start_api()
    stack.start_worker("control", concurrency=2, name="control")
    pair = [stack.start_worker("collect", concurrency=1, name=n) for n in ("c1", "c2")]
    stack.start_beat()
    job_id = stack.submit(job_body(ITEMS))["id"]
    wait_until(
        lambda: len(images(stack, job_id)) >= ITEMS // 5,
        timeout=120,
        message="the collect to be under way",
    )
    holder = collecting(pair)
    other = pair[1 - pair.index(holder)]

    assert len(images(stack, job_id)) < ITEMS, "the collect ended before the worker was stopped"
    # The signal's time on the clock the images' mtimes are on (the kernel's): a new file's.
    # Not time.time_ns(): the clock-ahead run fakes this process's clock, not the files'.
    marker = stack.tmp / f"signal-{sig.name}.mark"
    marker.write_bytes(b"")
    sent_ns, sent = marker.stat().st_mtime_ns, time.monotonic()
    if sig == signal.SIGTERM:
        os.kill(holder.pid, sig)  # the main process only, as Kubernetes sends it
    else:
        holder.kill(sig)  # the whole process group: a machine lost
    holder.popen.wait(60)
    exited = time.monotonic() - sent
    # What the stopped worker stored is among these (the other may have begun meanwhile).
    at_exit = images(stack, job_id)
    if sig == signal.SIGTERM:
        assert "handed over" in holder.log_text(), holder.log_text()[-3000:]

    job = stack.wait_job(job_id, timeout=180)
    after = images(stack, job_id)
    assert job["status"] == "succeeded", stack.logs()
    assert "batches.collect[" in other.log_text(), "the other worker never took the collect"
    # One object per item, the job's counts agree.
    assert len(after) == ITEMS
    assert job["counts"]["succeeded"] == job["images_stored"] == ITEMS
    # Tokens exact: what the job reports is what the simulator billed, for one batch.
    stats = sim.stats()
    billed: Counter[str] = Counter()
    for batch in stats["batches"].values():
        billed.update(batch["tokens"])
    assert stats["batch"]["images"] == ITEMS
    assert len(stats["batches"]) == len(job["upstream_batches"]) == 1
    for kind in ("text_input", "image_input", "image_output"):
        assert job["tokens"].get(kind, 0) == billed.get(kind, 0), kind
    return {
        "gap": longest_pause(after, sent_ns),
        "exited": exited,
        "before": float(len(at_exit)),
        "rewritten": float(sum(1 for n, key in at_exit.items() if after[n] != key)),
    }
