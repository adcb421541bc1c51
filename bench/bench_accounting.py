"""Accounting: what pricing each item's usage and adding it to spend and totals costs in collect.

Collects one upstream batch of 1,000 images (the simulator pads each to about 200 KB, so a
collect takes seconds) with accounting on and off, alternately, from the same Redis state each
time (every key is dumped once the batch has ended and restored before each run). "On" is
collect as the service runs it: usage priced from the catalog, record_success adding job spend,
token, cost and image totals. "Off" is collect_chunk(account=False), a measurement-only knob:
the same exactly-once record_success call marks each item succeeded, with nothing priced and
no increments. Prints the median collect time of each (wall, and CPU of the collecting process,
which other processes on the machine disturb less), the overhead both as the difference of the
medians and as the median over adjacent on/off pairs, and the two paths timed on their own per
item (no images), which shows the cost without the noise of a whole collect.
Target (issue: metrics): accounting adds at most 5 % to collect time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from _support import ROOT, ended_chunk, machine, start_instant_simulator, start_redis

sys.path.insert(0, str(ROOT))

from service.context import Context, build_context
from service.lanes.collect import collect_chunk
from service.lanes.items import record_usage
from service.settings import Settings

IMAGES = 1000
IMAGE_BYTES = 200_000
RUNS = 9  # of each; alternating, each pair in the opposite order to the last
TARGET_PCT = 5.0


def snapshot(ctx: Context) -> list[tuple[bytes, int, bytes]]:
    """Every key with its TTL and DUMP payload: the state to restore before each run."""
    out = []
    for key in ctx.redis.scan_iter(count=1000):
        ttl = int(ctx.redis.pttl(key))
        out.append((key, max(ttl, 0), ctx.redis.dump(key)))
    return out


def restore(ctx: Context, state: list[tuple[bytes, int, bytes]]) -> None:
    ctx.redis.flushdb()
    pipe = ctx.redis.pipeline(transaction=False)
    for key, ttl, payload in state:
        pipe.restore(key, ttl, payload, replace=True)
    pipe.execute()


def collect(
    ctx: Context, job_id: str, chunk: int, n: int, account: bool, threads: int
) -> tuple[float, float]:
    """One collect of the chunk: (wall seconds, CPU seconds of this process, every thread)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = collect_chunk(ctx, job_id, chunk, account=account, upload_threads=threads)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert result is not None and result.succeeded == n, result
    spend = ctx.store.spend(job_id)
    # Each mode did what it says: spend recorded with accounting on, none with it off.
    assert (spend.get("image_output", 0) > 0) == account, spend
    return wall, cpu


def first_usage(ctx: Context, file_id: str) -> dict[str, Any]:
    """The ``usage`` of the output file's first line, as upstream reported it."""
    with ctx.upstream.file_lines(file_id) as lines:
        for raw in lines:
            usage: dict[str, Any] = orjson.loads(raw)["response"]["body"]["usage"]
            return usage
    raise SystemExit("the output file is empty")


def per_item(
    ctx: Context,
    state: list[tuple[bytes, int, bytes]],
    job_id: str,
    chunk: int,
    usage: dict[str, Any],
    n: int,
) -> tuple[float, float]:
    """Microseconds per item to record success with accounting and without, nothing else.

    Three rounds of each, alternating; the median round counts.
    """
    job = ctx.store.job(job_id)
    assert job is not None
    stored = [f"jobs/{job_id}/images/sku.png"]
    record = {"tokens": {}, "cost_nanousd": 0, "tier": "batch", "keys": stored, "chunk": chunk}
    on: list[float] = []
    off: list[float] = []
    for _ in range(3):
        restore(ctx, state)
        start = time.perf_counter()
        for index in range(n):
            record_usage(ctx, job, chunk, index, usage, stored, tier="batch")
        on.append((time.perf_counter() - start) / n * 1e6)
        restore(ctx, state)
        start = time.perf_counter()
        for index in range(n):
            ctx.store.record_success(job_id, index, record, [])
        off.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(on), statistics.median(off)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=IMAGES)
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--threads", type=int, default=8, help="collect's upload threads")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        redis_proc, redis_url = start_redis(tmp / "redis")
        sim = start_instant_simulator(tmp / "sim", image_bytes=IMAGE_BYTES)
        settings = Settings(
            redis_url=redis_url,
            storage_url=(tmp / "storage").as_uri(),
            openai_base_url=sim.url,
            openai_api_key="sk-bench",
            data_dir=tmp,
        )
        ctx = build_context(settings, enqueue=lambda *a: None)
        try:
            load_before = f"{os.getloadavg()[0]:.1f}"
            job_id, chunk, batch = ended_chunk(ctx, args.images, {"campaign": "bench"})
            state = snapshot(ctx)
            runs: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
            restore(ctx, state)
            # Warm-up: page cache, connections.
            collect(ctx, job_id, chunk, args.images, True, args.threads)
            for run in range(args.runs):
                for account in (True, False) if run % 2 == 0 else (False, True):
                    restore(ctx, state)
                    runs[account].append(
                        collect(ctx, job_id, chunk, args.images, account, args.threads)
                    )
            us_on, us_off = per_item(
                ctx, state, job_id, chunk, first_usage(ctx, batch.output_file_id), args.images
            )
            size = ctx.upstream.file_size(batch.output_file_id)
            load_after = f"{os.getloadavg()[0]:.1f}"
        finally:
            ctx.redis.close()
            sim.stop()
            redis_proc.stop()

    def medians(which: int) -> tuple[float, float, float, float]:
        """Median on, median off, their difference in %, and the median of adjacent pairs' %."""
        on = [r[which] for r in runs[True]]
        off = [r[which] for r in runs[False]]
        m_on, m_off = statistics.median(on), statistics.median(off)
        # Each on run against the off run next to it: robust to the machine drifting.
        pairs = statistics.median((a - b) / b * 100 for a, b in zip(on, off, strict=True))
        return m_on, m_off, (m_on - m_off) / m_off * 100, pairs

    on, off, overhead, paired = medians(0)
    cpu_on, cpu_off, cpu_overhead, cpu_paired = medians(1)
    per_image_us = off / args.images * 1e6
    print(f"machine: {machine()}; load average {load_before} before, {load_after} after")
    print(
        f"accounting: collect of {args.images:,} images of ~{IMAGE_BYTES / 1e3:.0f} KB "
        f"({size / 1e6:.0f} MB output file), local storage, one process, {args.threads} upload threads; "
        f"{args.runs} runs each, alternating"
    )
    for label, account, wall, cpu in (("on: ", True, on, cpu_on), ("off:", False, off, cpu_off)):
        walls = ", ".join(f"{w:.2f}" for w, _ in runs[account])
        print(
            f"  accounting {label} median {wall:.2f} s wall, {cpu:.2f} s CPU (wall runs: {walls})"
        )
    print(
        f"  overhead, wall: {overhead:+.1f} % (medians), {paired:+.1f} % (median of adjacent pairs)"
        f"   target <= {TARGET_PCT:.0f} %"
    )
    print(
        f"  overhead, CPU of the collecting process: {cpu_overhead:+.1f} % (medians), "
        f"{cpu_paired:+.1f} % (pairs)"
    )
    print(
        f"  per item, alone: record_usage {us_on:.0f} us, bare record_success {us_off:.0f} us; "
        f"accounting {us_on - us_off:.0f} us an item = {(us_on - us_off) / per_image_us * 100:.1f} % "
        f"of collect's {per_image_us / 1e3:.2f} ms an image"
    )
    if overhead > TARGET_PCT:
        print("  MISSED the target")


if __name__ == "__main__":
    main()
