"""What one image costs Redis and S3, and what the sweep costs per active batch: the inputs of
deploy/SCALING.md.

Three measurements, each printed with the load average (the machine is shared):

1. **Redis memory and commands per item.** One job of N items (50,000 by default: one upstream
   batch) driven through the service's own steps in one process, against a simulator: intake,
   plan, submit, collect, finalize. After each step, ``MEMORY USAGE`` (``SAMPLES 0``: every
   element counted) of every key the job owns, and the Redis commands each step ran
   (``INFO commandstats``) and the CPU Redis spent (``INFO cpu``).
2. **S3 requests per image.** The same steps for a smaller job on S3 storage (moto's server),
   every request the storage client sends counted by operation.
3. **Sweep cost per active batch.** N jobs of one item, each submitted as one upstream batch the
   simulator keeps running; the median of several sweeps over them, split into time in upstream
   calls and the rest, with the Redis commands per sweep. Repeated for two N to get the cost per
   batch (the slope).

Run: ``cd bench && ../.venv/bin/python bench_scale.py`` (about 4 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import orjson
import redis
from _support import ROOT, machine, start_instant_simulator, start_moto, start_redis, wait_until

sys.path.insert(0, str(ROOT))

from service.context import Context, build_context
from service.jobs import intake
from service.jobs.model import CHUNK_COLLECTING
from service.jobs.spec import parse_job_json
from service.lanes import collect, finalize, plan, submit, sweep
from service.redis import keys
from service.settings import Settings
from tests.support.simulator import start_simulator

# Client round trips (a pipeline or a script call is one), counted where redis-py sends;
# INFO commandstats counts every command run, a script's own calls included.
ROUND_TRIPS = [0]
_send = redis.connection.AbstractConnection.send_packed_command


def _counted(self: Any, command: Any, check_health: bool = True) -> None:
    ROUND_TRIPS[0] += 1
    _send(self, command, check_health)


redis.connection.AbstractConnection.send_packed_command = _counted  # type: ignore[method-assign]


def load() -> str:
    return f"load {os.getloadavg()[0]:.1f}"


def context(tmp: Path, redis_url: str, sim_url: str, **settings: Any) -> Context:
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "storage_url": (tmp / "storage").as_uri(),
        "openai_base_url": sim_url,
        "openai_api_key": "sk-bench",
        "data_dir": tmp,
        **settings,
    }
    return build_context(Settings(**values), enqueue=lambda *a: None)


def body(n: int, prefix: str = "sku") -> bytes:
    return orjson.dumps(
        {
            "model": "gpt-image-2",
            "defaults": {"size": "1024x1024", "quality": "low"},
            "items": [
                {"id": f"{prefix}-{i:06d}", "prompt": f"Studio photo of product {i} on white"}
                for i in range(n)
            ],
            "labels": {"campaign": "bench"},
        }
    )


def commands(r: redis.Redis) -> dict[str, int]:
    stats = r.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


def redis_cpu(r: redis.Redis) -> float:
    cpu = r.info("cpu")
    return float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])


def job_memory(r: redis.Redis, job_id: str) -> tuple[int, dict[str, int]]:
    sizes = {}
    for key in r.scan_iter(match=f"*{job_id}*", count=1000):
        sizes[key.decode().replace(job_id, "{job}")] = int(r.memory_usage(key, samples=0) or 0)
    return sum(sizes.values()), sizes


class StepLog(list[dict[str, Any]]):
    """Each step's figures, in order; ``on_step(name)`` runs after each is logged."""

    def __init__(self, on_step: Callable[[str], None] | None = None) -> None:
        super().__init__()
        self.on_step = on_step

    def add(self, entry: dict[str, Any]) -> None:
        self.append(entry)
        if self.on_step:
            self.on_step(entry["step"])


def step(r: redis.Redis, name: str, run: Callable[[], Any], log: StepLog) -> Any:
    before, cpu = commands(r), redis_cpu(r)
    trips = ROUND_TRIPS[0]
    start = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - start
    trips = ROUND_TRIPS[0] - trips
    after = commands(r)
    ran = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    ran.pop("info", None)  # the measuring itself
    log.add(
        {
            "step": name,
            "seconds": seconds,
            "cpu": redis_cpu(r) - cpu,
            "commands": ran,
            "trips": trips,
            "load": load(),
        }
    )
    return result


def drive(ctx: Context, n: int, log: StepLog, memory: list[tuple[str, int]]) -> str:
    """One n-item job through every step of the batch lane; memory after each."""
    r = ctx.redis
    spec = parse_job_json(body(n), ctx.catalog, max_items=n)
    job_id = step(r, "intake", lambda: intake.submit(ctx, spec, "default").job.id, log)
    memory.append(("accepted", job_memory(r, job_id)[0]))
    numbers = step(r, "plan", lambda: plan.plan_job(ctx, job_id), log)
    memory.append(("planned", job_memory(r, job_id)[0]))
    for number in numbers:
        step(r, "submit", lambda number=number: submit.submit_chunk(ctx, job_id, number), log)
    memory.append(("submitted (in flight upstream)", job_memory(r, job_id)[0]))

    def ended() -> bool:
        sweep.sweep(ctx)
        return all(
            (c := ctx.store.chunk(job_id, k)) is not None and c.status == CHUNK_COLLECTING
            for k in numbers
        )

    wait_until(ended, timeout=3600, interval=1, message="the upstream batch to end")
    for number in numbers:
        step(r, "collect", lambda number=number: collect.collect_chunk(ctx, job_id, number), log)
    total, sizes = job_memory(r, job_id)
    memory.append(("collected (every item's usage held)", total))
    for key, size in sorted(sizes.items(), key=lambda kv: -kv[1])[:3]:
        memory.append((f"  of which {key}", size))
    step(r, "finalize", lambda: finalize.finalize_job(ctx, job_id), log)
    total, _ = job_memory(r, job_id)
    memory.append(("finished", total))
    return job_id


def redis_per_item(tmp: Path, redis_url: str, n: int) -> None:
    sim = start_instant_simulator(tmp / "sim", plain_images=True)
    try:
        ctx = context(tmp, redis_url, sim.url, batch_max_lines=50_000)
        ctx.redis.flushdb()
        log = StepLog()
        memory: list[tuple[str, int]] = []
        start = time.perf_counter()
        job_id = drive(ctx, n, log, memory)
        print(f"\n1. Redis per item: one job of {n:,} items, {time.perf_counter() - start:.0f} s")
        print(f"   {'stage':<38} {'job keys':>10} {'per item':>9}")
        for stage, size in memory:
            print(f"   {stage:<38} {size / 1e6:>8.2f}MB {size / n:>8.0f}B")
        print(f"   used_memory after the job: {_used(ctx.redis)}")
        total_cmds: Counter[str] = Counter()
        print(
            f"   {'step':<9} {'seconds':>8} {'round trips':>12} {'per item':>9} "
            f"{'commands run':>13} {'per item':>9} {'Redis CPU':>10}"
        )
        for entry in log:
            calls = sum(entry["commands"].values())
            total_cmds.update(entry["commands"])
            print(
                f"   {entry['step']:<9} {entry['seconds']:>7.1f}s {entry['trips']:>12,} "
                f"{entry['trips'] / n:>9.2f} {calls:>13,} {calls / n:>9.2f} "
                f"{entry['cpu']:>9.2f}s  {entry['load']}"
            )
        cpu = sum(e["cpu"] for e in log)
        calls = sum(total_cmds.values())
        trips = sum(e["trips"] for e in log)
        print(
            f"   total: {trips:,} round trips ({trips / n:.2f} per item), {calls:,} commands run "
            f"({calls / n:.2f} per item); Redis CPU {cpu:.1f} s, "
            f"{1e6 * cpu / n:.0f} us per item; by command: "
            + ", ".join(f"{k} {v / n:.2f}" for k, v in total_cmds.most_common(6))
        )
        _, sizes = job_memory(ctx.redis, job_id)
        print("   finished job's keys: " + ", ".join(f"{k} {v}B" for k, v in sorted(sizes.items())))
        shared = {
            key.decode(): int(ctx.redis.memory_usage(key, samples=0) or 0)
            for key in ctx.redis.scan_iter(count=1000)
            if job_id.encode() not in key
        }
        big = sorted(shared.items(), key=lambda kv: -kv[1])[:4]
        print(
            f"   keys no job owns, after it: {sum(shared.values()) / 1e6:.2f} MB in {len(shared)} "
            "keys; largest " + ", ".join(f"{k} {v / 1e6:.2f}MB" for k, v in big)
        )
        entries_key, used_key = keys.reuse_index("default")
        entries = int(ctx.redis.hlen(entries_key))
        if entries:
            per = (shared.get(entries_key, 0) + shared.get(used_key, 0)) / entries
            print(
                f"   reuse index (kept up to IMAGEBATCH_REUSE_MAX_ENTRIES per tenant): {entries:,} "
                f"entries, {per:.0f} B each"
            )
        ctx.redis.close()
    finally:
        sim.stop()


def _used(r: redis.Redis) -> str:
    return f"{int(r.info('memory')['used_memory']) / 1e6:.1f} MB"


def s3_per_image(tmp: Path, redis_url: str, n: int) -> None:
    # moto takes any credentials; never a developer's real ones.
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")
    moto, endpoint = start_moto(tmp / "moto")
    sim = start_instant_simulator(tmp / "sim-s3", plain_images=True)
    try:
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="bench")
        ctx = context(
            tmp,
            redis_url,
            sim.url,
            storage_url="s3://bench/prod",
            s3_endpoint_url=endpoint,
            s3_path_style=True,
            s3_region="us-east-1",
        )
        ctx.redis.flushdb()
        counts: Counter[str] = Counter()
        client = ctx.storage.client  # type: ignore[attr-defined]
        client.meta.events.register(
            "before-send.s3", lambda request, **kw: counts.update([kw["event_name"].split(".")[-1]])
        )
        per_step: Counter[tuple[str, str]] = Counter()
        seen: Counter[str] = Counter()

        def snapshot(name: str) -> None:
            for op, v in (counts - seen).items():
                per_step[(name, op)] += v
            seen.update(counts - seen)

        drive(ctx, n, StepLog(snapshot), [])
        total = sum(counts.values())
        print(f"\n2. S3 requests: one job of {n:,} images on S3 (moto), {load()}")
        for name in dict.fromkeys(name for name, _ in per_step):
            ops = {op: v for (step_name, op), v in per_step.items() if step_name == name}
            print(f"   {name:<9} " + ", ".join(f"{op} {v:,}" for op, v in ops.items()))
        print(f"   total {total:,}: {total / n:.3f} per image")
        ctx.redis.close()
    finally:
        sim.stop()
        moto.stop()


def sweep_cost(tmp: Path, redis_url: str, sizes: list[int], sweeps: int) -> None:
    # Batches that validate at once and then run at 1 image an hour: every one stays active.
    sim = start_simulator(tmp / "sim-sweep", rate=1 / 3600, validate_seconds=0, finalize_seconds=0)
    try:
        print(f"\n3. Sweep over N active upstream batches (one 1-item job each), {sweeps} sweeps")
        print(
            f"   {'N':>5} {'sweep':>8} {'upstream':>9} {'the rest':>9} {'per batch':>10} "
            f"{'round trips':>11} {'per batch':>10}"
        )
        results = []
        for n in sizes:
            ctx = context(tmp, redis_url, sim.url)
            ctx.redis.flushdb()
            for i in range(n):
                spec = parse_job_json(body(1, prefix=f"j{i}"), ctx.catalog, max_items=1)
                job_id = intake.submit(ctx, spec, "default").job.id
                (number,) = plan.plan_job(ctx, job_id)
                assert submit.submit_chunk(ctx, job_id, number) == "submitted"
            sweep.sweep(ctx)  # the first sweep sees every batch validated
            upstream = {"s": 0.0}
            poll = ctx.upstream.batch

            def timed(
                batch_id: str,
                poll: Callable[[str], Any] = poll,
                upstream: dict[str, float] = upstream,
            ) -> Any:
                start = time.perf_counter()
                try:
                    return poll(batch_id)
                finally:
                    upstream["s"] += time.perf_counter() - start

            ctx.upstream.batch = timed  # type: ignore[method-assign]
            walls, ups, trips = [], [], []
            for _ in range(sweeps):
                upstream["s"] = 0.0
                before = ROUND_TRIPS[0]
                start = time.perf_counter()
                seen = sweep.sweep(ctx)
                walls.append(time.perf_counter() - start)
                trips.append(ROUND_TRIPS[0] - before)
                ups.append(upstream["s"])
                assert seen["polled"] == n, seen
            wall, up, cmd = (statistics.median(x) for x in (walls, ups, trips))
            results.append((n, wall, up, cmd))
            print(
                f"   {n:>5} {wall * 1e3:>6.0f}ms {up * 1e3:>7.0f}ms {(wall - up) * 1e3:>7.0f}ms "
                f"{wall / n * 1e3:>8.2f}ms {cmd:>11,.0f} {cmd / n:>10.1f}  {load()}"
            )
            ctx.redis.close()
        (n0, w0, u0, c0), (n1, w1, u1, c1) = results[0], results[-1]
        print(
            f"   slope {n0}->{n1}: {(w1 - w0) / (n1 - n0) * 1e3:.2f} ms per batch "
            f"({(u1 - u0) / (n1 - n0) * 1e3:.2f} ms in the upstream call, "
            f"{((w1 - u1) - (w0 - u0)) / (n1 - n0) * 1e3:.2f} ms the rest), "
            f"{(c1 - c0) / (n1 - n0):.1f} Redis round trips per batch"
        )
    finally:
        sim.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=50_000, help="items of the memory job")
    parser.add_argument("--s3-items", type=int, default=1_000, help="images of the S3 job")
    parser.add_argument("--batches", default="50,300", help="active batch counts to sweep over")
    parser.add_argument("--sweeps", type=int, default=7)
    parser.add_argument("--only", choices=["redis", "s3", "sweep"])
    args = parser.parse_args()
    print(f"machine: {machine()}, {load()}")
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        redis_proc, redis_url = start_redis(tmp / "redis")
        try:
            if args.only in (None, "redis"):
                redis_per_item(tmp / "mem", redis_url, args.items)
            if args.only in (None, "s3"):
                s3_per_image(tmp / "s3", redis_url, args.s3_items)
            if args.only in (None, "sweep"):
                sizes = [int(x) for x in args.batches.split(",")]
                sweep_cost(tmp / "sweep", redis_url, sizes, args.sweeps)
        finally:
            redis_proc.stop()


if __name__ == "__main__":
    main()
