"""Collect: one worker turning an upstream output file into images in storage.

For a batch of N images of about 1.5 MB each (the simulator pads to --image-bytes), prints side
by side: plainly downloading the output file to disk with the SDK, and one worker process
collecting it (stream, parse, decode, store each image, record usage), with that process's peak
RSS. Run for 200 and 2,000 images: the peak must not grow with the batch. Both sides end on disk:
the download is fsynced, as each collected image is; collect is timed inside the worker
process (a running worker has already started), its peak RSS over the whole process.
Targets (issue: the batch path): collect at least half the download rate; peak at most 300 MB.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import psutil
from _support import ROOT, ended_chunk, machine, start_instant_simulator, start_redis

IMAGE_BYTES = 1_500_000


def child(args: argparse.Namespace) -> None:
    """The worker side: collect one chunk, nothing else in the process."""
    from service.context import build_context
    from service.lanes.collect import collect_chunk
    from service.settings import Settings

    settings = Settings(
        redis_url=args.redis,
        storage_url=args.storage,
        openai_base_url=args.sim,
        openai_api_key="sk-bench",
        data_dir=Path(args.storage.removeprefix("file://")).parent,
    )
    ctx = build_context(settings, enqueue=lambda *a: None)
    start = time.perf_counter()
    result = collect_chunk(ctx, args.job, int(args.chunk), upload_threads=args.threads)
    seconds = time.perf_counter() - start
    assert result is not None and result.succeeded == args.expect, result
    print(orjson.dumps({**result.__dict__, "seconds": seconds}).decode())


def run(n: int, tmp: Path, redis_url: str, sim: object, threads: int) -> dict[str, float]:
    from service.context import build_context
    from service.settings import Settings

    storage = (tmp / f"storage-{n}").as_uri()
    settings = Settings(
        redis_url=redis_url,
        storage_url=storage,
        openai_base_url=sim.url,
        openai_api_key="sk-bench",  # type: ignore[attr-defined]
        data_dir=tmp,
    )
    ctx = build_context(settings, enqueue=lambda *a: None)
    job_id, chunk, batch = ended_chunk(ctx, n)

    start = time.perf_counter()
    with ctx.upstream.client.files.with_streaming_response.content(batch.output_file_id) as resp:
        resp.stream_to_file(tmp / "download.jsonl")
    # On disk, as collect's images are (each one is fsynced before it counts).
    fd = os.open(tmp / "download.jsonl", os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    download_s = time.perf_counter() - start
    size = (tmp / "download.jsonl").stat().st_size
    (tmp / "download.jsonl").unlink()

    cmd = [
        sys.executable,
        str(Path(__file__)),
        "--child",
        "--redis",
        redis_url,
        "--storage",
        storage,
        "--sim",
        sim.url,  # type: ignore[attr-defined]
        "--job",
        job_id,
        "--chunk",
        str(chunk),
        "--expect",
        str(n),
        "--threads",
        str(threads),
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, cwd=ROOT / "bench")
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.01)
    out = proc.stdout.read() if proc.stdout else b""
    if proc.returncode != 0:
        raise SystemExit(f"collect failed: {out!r}")
    # The collect itself, timed inside the worker process (a running worker has started already).
    collect_s = orjson.loads(out.splitlines()[-1])["seconds"]
    ctx.redis.close()
    return {
        "n": n,
        "bytes": size,
        "download_s": download_s,
        "collect_s": collect_s,
        "peak_mb": peak / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--redis")
    parser.add_argument("--storage")
    parser.add_argument("--sim")
    parser.add_argument("--job")
    parser.add_argument("--chunk")
    parser.add_argument("--expect", type=int)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--sizes", default="200,2000")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    sys.path.insert(0, str(ROOT))

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        redis_proc, redis_url = start_redis(tmp / "redis")
        sim = start_instant_simulator(tmp / "sim", image_bytes=IMAGE_BYTES)
        try:
            print(f"machine: {machine()}")
            print(
                f"collect: images of ~{IMAGE_BYTES / 1e6:.1f} MB, local storage, one worker process, {args.threads} upload threads"
            )
            print(
                f"{'images':>7} {'output':>9} {'download':>17} {'collect':>17} {'ratio':>6} {'peak RSS':>9}"
            )
            for n in (int(x) for x in args.sizes.split(",")):
                r = run(n, tmp, redis_url, sim, args.threads)
                mb = r["bytes"] / 1e6
                print(
                    f"{n:>7} {mb:>7.0f}MB {r['download_s']:>6.1f}s {mb / r['download_s']:>6.0f}MB/s "
                    f"{r['collect_s']:>6.1f}s {mb / r['collect_s']:>6.0f}MB/s {r['download_s'] / r['collect_s']:>6.2f} "
                    f"{r['peak_mb']:>7.0f}MB"
                )
            print(
                "targets: ratio (collect rate / download rate) >= 0.5; peak RSS <= 300 MB and flat across sizes"
            )
        finally:
            sim.stop()
            redis_proc.stop()


if __name__ == "__main__":
    main()
