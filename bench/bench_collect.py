"""Collect: one worker turning an upstream output file into images, beside the plain ways.

For a batch of N images of about 1.5 MB each (the simulator pads to --image-bytes), side by side
in one run, several runs each, in alternating order:

* local: plainly downloading the output file to disk with the OpenAI SDK (``stream_to_file``,
  then fsync), against one worker process collecting it into local storage on the same disk
  (stream, parse, decode, store each image fsynced, record usage);
* S3 (moto's server, as the tests use it): a plain boto3 upload of the same images, decoded into
  memory beforehand, ``put_object`` from as many threads as collect uses, against collect into that
  bucket. Beside them, collect's put path alone: the same decoded images through our storage
  adapter, each hashed and sent with the checksum and metadata collect sends, which tells the cost
  of our puts from the cost of getting the images (download, decode, accounting). Each side gets a
  moto server of its own, started before its clock: moto keeps every object in its process and does
  not give the memory back when they are deleted, so a shared server would make whichever side came
  later pay for the earlier ones.

Every side runs in a process of its own, timed inside it, with its peak RSS sampled from outside.
Each also reports the CPU seconds spent while it was timed, by itself and by the servers on this
machine (the simulator, Redis, moto): on two cores, what one side's other processes take is time
moto does not get. The collecting process is a running worker: it has collected a one-image chunk
before the timed one (its upstream client made, its Lua scripts loaded), as a worker that has run a
task has. Ratios are rates against the plain way (1.0 = as fast), medians over the runs.
Targets (issue 13): ratio >= 0.9 for 200 and 2,000 images into both storages; collect's peak RSS
flat in the number of images (at most 300 MB).
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import psutil
from _support import ROOT, ended_chunk, machine, start_instant_simulator, start_moto, start_redis

IMAGE_BYTES = 1_500_000
BUCKET = "bench-collect"
TARGET_RATIO = 0.9
PEAK_MB = 300


# --- the measured sides, each in a process of its own ---------------------------------------


class Window:
    """CPU seconds spent while the timed part runs: by this process, and by the servers it
    talks to (moto, the simulator), read from their pids. A side that is quicker only
    because another process took the machine's cores shows it here."""

    def __init__(self, watched: str) -> None:
        self.procs = {
            name: psutil.Process(int(pid))
            for name, _, pid in (w.partition("=") for w in watched.split(",") if w)
        }

    @staticmethod
    def _cpu(proc: psutil.Process) -> float:
        times = proc.cpu_times()
        return times.user + times.system

    def __enter__(self) -> Window:
        self.own = time.process_time()
        self.start = {name: self._cpu(p) for name, p in self.procs.items()}
        self.began = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.began
        self.cpu = {"cpu": time.process_time() - self.own}
        for name, proc in self.procs.items():
            self.cpu[f"{name}_cpu"] = self._cpu(proc) - self.start[name]


def child_collect(args: argparse.Namespace) -> dict[str, Any]:
    """The worker side: collect a warm-up chunk, then the timed one."""
    sys.path.insert(0, str(ROOT))
    from service.context import build_context
    from service.lanes.collect import collect_chunk
    from service.settings import Settings

    settings = Settings(
        redis_url=args.redis,
        storage_url=args.storage,
        s3_endpoint_url=args.s3 or None,
        s3_region="us-east-1",
        s3_path_style=True,
        openai_base_url=args.sim,
        openai_api_key="sk-bench",
        data_dir=Path(args.data),
    )
    ctx = build_context(settings, enqueue=lambda *a: None)
    warm_job, warm_chunk = args.warm.split(":")
    warm = collect_chunk(ctx, warm_job, int(warm_chunk), upload_threads=args.threads)
    assert warm is not None and warm.succeeded == 1, warm
    with Window(args.watch) as window:
        result = collect_chunk(ctx, args.job, int(args.chunk), upload_threads=args.threads)
    assert result is not None and result.succeeded == args.expect, result
    return {"seconds": window.seconds, "bytes": result.bytes, **window.cpu}


def child_download(args: argparse.Namespace) -> dict[str, Any]:
    """The plain download: the SDK streams the output file to disk; on disk once fsynced."""
    from openai import OpenAI

    client = OpenAI(base_url=args.sim, api_key="sk-bench")
    dest = Path(args.dest)
    with Window(args.watch) as window:
        with client.files.with_streaming_response.content(args.file) as resp:
            resp.stream_to_file(dest)
        fd = os.open(dest, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    size = dest.stat().st_size
    dest.unlink()
    return {"seconds": window.seconds, "bytes": size, **window.cpu}


def child_upload(args: argparse.Namespace) -> dict[str, Any]:
    """The plain S3 upload: the same images, decoded into memory first (not timed), put by a
    pool of ``threads`` (the same as collect's) with boto3's defaults. With ``--via storage``,
    collect's put path instead: each image hashed and put through our S3 adapter with the
    checksum and metadata collect gives it."""
    import hashlib

    import boto3
    import pybase64
    from openai import OpenAI

    client = OpenAI(base_url=args.sim, api_key="sk-bench")
    images: list[tuple[str, bytes]] = []
    with client.files.with_streaming_response.content(args.file) as resp:
        for line in resp.iter_lines():
            if line.strip():
                rec = orjson.loads(line)
                for k, item in enumerate(rec["response"]["body"]["data"]):
                    blob = pybase64.b64decode(item["b64_json"], validate=True)
                    images.append((f"{args.prefix}/{rec['custom_id']}-{k}.png", blob))
    s3 = storage = None
    if args.via == "boto3":
        s3 = boto3.client("s3", endpoint_url=args.s3, region_name="us-east-1")
    else:
        sys.path.insert(0, str(ROOT))
        from service.settings import Settings
        from service.storage.s3 import S3Storage

        settings = Settings(
            storage_url=f"s3://{BUCKET}",
            s3_endpoint_url=args.s3,
            s3_region="us-east-1",
            s3_path_style=True,
        )
        storage = S3Storage.from_settings(settings)

    def put(item: tuple[str, bytes]) -> None:
        key, blob = item
        if s3 is not None:
            s3.put_object(Bucket=BUCKET, Key=key, Body=blob, ContentType="image/png")
            return
        digest = hashlib.sha256(blob).hexdigest()
        meta = {"job": args.prefix, "item": key, "model": "gpt-image-2", "sha256": digest}
        meta.update(size="1024x1024", quality="low")
        assert storage is not None
        storage.put_bytes(key, blob, content_type="image/png", metadata=meta, sha256=digest)

    with Window(args.watch) as window, ThreadPoolExecutor(max_workers=args.threads) as pool:
        list(pool.map(put, images))
    return {"seconds": window.seconds, "bytes": sum(len(b) for _, b in images), **window.cpu}


def run_child(mode: str, options: dict[str, object]) -> dict[str, Any]:
    """One measured process: its own timing (last stdout line) and its peak RSS in MB."""
    cmd = [sys.executable, str(Path(__file__)), "--child", mode]
    for name, value in options.items():
        cmd += [f"--{name}", str(value)]
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
        raise SystemExit(f"{mode} failed: {out!r}")
    return {**orjson.loads(out.splitlines()[-1]), "peak_mb": peak / 1e6}


# --- the run ------------------------------------------------------------------------------


@contextmanager
def fresh_moto(tmp: Path) -> Iterator[tuple[str, int]]:
    """A moto server with an empty bucket, for one measured side; its URL and pid."""
    import boto3

    proc, url = start_moto(tmp)
    try:
        boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket=BUCKET)
        yield url, proc.pid
    finally:
        proc.stop()


def measure_size(
    n: int,
    tmp: Path,
    redis_url: str,
    sim: Any,
    runs: int,
    threads: int,
    storages: list[str],
    servers: str,
) -> dict[str, list[dict[str, Any]]]:
    """Each side of each storage, ``runs`` times. ``servers`` names the pids of the servers
    both sides use (``simulator=PID,redis=PID``), whose CPU each side reports."""
    from bench_accounting import restore, snapshot

    from service.context import build_context
    from service.settings import Settings

    ctx = build_context(
        Settings(
            redis_url=redis_url,
            storage_url=(tmp / "setup").as_uri(),
            openai_base_url=sim.url,
            openai_api_key="sk-bench",
            data_dir=tmp,
        ),
        enqueue=lambda *a: None,
    )
    ctx.redis.flushdb()
    warm_job, warm_chunk, _ = ended_chunk(ctx, 1)
    job_id, chunk, batch = ended_chunk(ctx, n)
    state = snapshot(ctx)
    common = {"redis": redis_url, "sim": sim.url, "data": tmp, "threads": threads}
    local: dict[str, object] = {"watch": servers}
    collect = {
        **common,
        "job": job_id,
        "chunk": chunk,
        "expect": n,
        "warm": f"{warm_job}:{warm_chunk}",
    }
    out: dict[str, list[dict[str, Any]]] = {}

    def local_collect(run: int) -> dict[str, Any]:
        storage = tmp / f"storage-{n}-{run}"
        restore(ctx, state)
        try:
            options = {**collect, **local, "storage": storage.as_uri(), "s3": ""}
            return run_child("collect", options)
        finally:
            shutil.rmtree(storage, ignore_errors=True)

    def download(run: int) -> dict[str, Any]:
        dest = tmp / f"download-{n}-{run}.jsonl"
        options = {**local, "sim": sim.url, "file": batch.output_file_id, "dest": dest}
        return run_child("download", options)

    def s3_collect(run: int) -> dict[str, Any]:
        restore(ctx, state)
        with fresh_moto(tmp / f"moto-{n}-{run}-collect") as (s3_url, moto):
            storage = f"s3://{BUCKET}/collect-{n}-{run}"
            watch = f"{servers},moto={moto}"
            return run_child(
                "collect", {**collect, "storage": storage, "s3": s3_url, "watch": watch}
            )

    def s3_upload(run: int, via: str) -> dict[str, Any]:
        with fresh_moto(tmp / f"moto-{n}-{run}-{via}") as (s3_url, moto):
            options = {
                **common,
                "s3": s3_url,
                "file": batch.output_file_id,
                "prefix": via,
                "via": via,
                "watch": f"{servers},moto={moto}",
            }
            return run_child("upload", options)

    Side = tuple[str, Callable[[int], dict[str, Any]]]
    sides: dict[str, list[Side]] = {
        "local": [("download", download), ("collect", local_collect)],
        "s3": [
            ("s3 upload", functools.partial(s3_upload, via="boto3")),
            ("s3 puts", functools.partial(s3_upload, via="storage")),
            ("s3 collect", s3_collect),
        ],
    }
    for run in range(runs):
        for storage in storages:
            order = sides[storage] if run % 2 == 0 else sides[storage][::-1]
            for name, case in order:
                os.sync()  # each side starts with no one else's dirty pages to write back
                out.setdefault(name, []).append(case(run))
    ctx.redis.close()
    return out


def report(n: int, out: dict[str, list[dict[str, Any]]]) -> list[str]:
    def med(name: str, field: str = "seconds") -> float:
        return statistics.median(r[field] for r in out[name])

    def peak(name: str) -> float:
        return max(r["peak_mb"] for r in out[name])

    def runs(name: str) -> str:
        return "/".join(f"{r['seconds']:.2f}" for r in out[name])

    def pairs(plain: str, ours: str) -> float:
        # Each run's side against the plain run beside it: robust to the machine drifting.
        return statistics.median(
            p["seconds"] / o["seconds"] for p, o in zip(out[plain], out[ours], strict=True)
        )

    def cpu(names: list[str]) -> str:
        # CPU seconds while timed, medians: what each side cost the machine, and where.
        return "  ".join(
            f"{who} " + " | ".join(f"{med(name, field):.2f}" for name in names)
            for who, field in (
                ("process", "cpu"),
                ("simulator", "simulator_cpu"),
                ("redis", "redis_cpu"),
                ("moto", "moto_cpu"),
            )
            if field in out[names[0]][0]
        )

    rows = []
    for plain, ours, what in (("download", "collect", "local"), ("s3 upload", "s3 collect", "S3")):
        if plain not in out:
            continue
        # MB moved: the output file read for local, the images written for S3.
        mb = med(plain, "bytes") / 1e6
        ratio = med(plain) / med(ours)
        rows.append(
            f"{n:>6} {what:>5} {mb:>6.0f}MB  {plain:>9} {med(plain):>6.2f}s {peak(plain):>5.0f}MB"
            f"  collect {med(ours):>6.2f}s {peak(ours):>4.0f}MB  ratio {ratio:>4.2f}"
            f" (pairs {pairs(plain, ours):.2f})  runs {runs(plain)} | {runs(ours)}"
        )
        names, labels = [plain, ours], "plain | collect"
        if what == "S3":
            puts = "s3 puts"
            rows.append(
                f"{'':>13} our put path alone {med(puts):.2f}s: ratio {med(plain) / med(puts):.2f}"
                f" (pairs {pairs(plain, puts):.2f})  runs {runs(puts)}"
            )
            names, labels = [plain, puts, ours], "plain | put path | collect"
        rows.append(f"{'':>13} CPU s while timed ({labels}): {cpu(names)}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=["collect", "download", "upload"])
    for name in (
        "redis",
        "storage",
        "s3",
        "sim",
        "job",
        "chunk",
        "warm",
        "data",
        "file",
        "dest",
        "prefix",
    ):
        parser.add_argument(f"--{name}")
    parser.add_argument("--watch", default="", help="name=pid,...: servers whose CPU to report")
    parser.add_argument("--via", choices=["boto3", "storage"], default="boto3")
    parser.add_argument("--expect", type=int)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--sizes", default="200,2000")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--storages", default="local,s3", help="local, s3 or both (default)")
    args = parser.parse_args()
    if args.child:
        measured = {"collect": child_collect, "download": child_download, "upload": child_upload}
        print(orjson.dumps(measured[args.child](args)).decode())
        return
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        redis_proc, redis_url = start_redis(tmp / "redis")
        sim = start_instant_simulator(tmp / "sim", image_bytes=IMAGE_BYTES)
        try:
            print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f} at the start")
            print(
                f"collect: images of ~{IMAGE_BYTES / 1e6:.1f} MB, one worker process, "
                f"{args.threads} upload threads; {args.runs} runs of each side, alternating; "
                "medians (s), peak RSS (max over runs)"
            )
            rows: list[str] = []
            assert sim.proc is not None
            servers = f"simulator={sim.proc.pid},redis={redis_proc.pid}"
            for n in (int(x) for x in args.sizes.split(",")):
                storages = args.storages.split(",")
                out = measure_size(
                    n, tmp, redis_url, sim, args.runs, args.threads, storages, servers
                )
                new = report(n, out)
                rows += new
                print("\n".join(new), flush=True)
            print(f"load average {os.getloadavg()[0]:.1f} at the end")
            print(
                f"targets: ratio (plain time / collect time) >= {TARGET_RATIO}; "
                f"collect peak RSS <= {PEAK_MB} MB and flat across sizes"
            )
        finally:
            sim.stop()
            redis_proc.stop()


if __name__ == "__main__":
    main()
