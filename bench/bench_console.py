"""The console's server time: gallery pages of a 50,000-item job, and the job list with 10,000 jobs.

Makes, on a fresh Redis and local storage, one finished job of 50,000 images (ended through the
lanes' own steps, tests/support/jobs.py; images are written without fsync during this setup, as
durability is not what is measured) and 10,000 more small jobs of the same tenant, then times
GET requests to the API process (uvicorn, open API, so the console's session is made on the first
visit):

* the gallery's first page (items 0-47) and a deep page (from item 49,000), warm: every request
  after the first; and a deep page cold: its line index dropped before each request, so it is
  rebuilt with one read of the manifest (what the first visit after an upgrade pays);
* the same deep page as the job's items were read before (from the start of the manifest), timed
  in-process beside the seek, so the two are compared in one run;
* the API's ``GET /v1/jobs/{id}/items?cursor=49000`` (the same seek);
* the job list's first page, a page deep in the 10,000 jobs, and a filter nothing matches (which
  stops after reading its bound of jobs);
* one thumbnail made on first view, then served again (a 304 and a plain read), and what making a
  thumbnail of a realistic 1024x1024 PNG costs in-process (what collect would pay per image if
  thumbnails were made there).

Prints medians and p95 of RUNS requests each, the machine, and the load average.
Target (issue 12): each gallery page under 300 ms.
"""

from __future__ import annotations

import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _support import ROOT, machine, start_redis, start_server

sys.path.insert(0, str(ROOT))

import httpx2
import orjson
from PIL import Image, ImageFilter

from service.jobs import lines, thumbs
from service.redis import keys
from service.storage import manifest_key
from tests.support.context import make_context
from tests.support.jobs import ended_job, picture, submit
from tests.support.procs import free_port

ITEMS = int(os.environ.get("BENCH_ITEMS", "50000"))
JOBS = int(os.environ.get("BENCH_JOBS", "10000"))
DEEP = ITEMS - 1000
RUNS = 30
TARGET_MS = 300


def ms(samples: list[float]) -> str:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"median {statistics.median(ordered) * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms"


def timed(client: httpx2.Client, path: str, runs: int = RUNS, before: Any = None) -> list[float]:
    out = []
    for _ in range(runs):
        if before is not None:
            before()
        start = time.perf_counter()
        resp = client.get(path)
        out.append(time.perf_counter() - start)
        assert resp.status_code == 200, (path, resp.status_code, resp.text[:300])
    return out


def setup(ctx: Any) -> tuple[str, float]:
    real_fsync = os.fsync
    os.fsync = lambda fd: None  # setup only: see the module docstring
    try:
        start = time.perf_counter()
        job = ended_job(ctx, ITEMS, same_picture=picture("bench"), labels={"campaign": "bench"})
        for i in range(JOBS):
            submit(ctx, 1, prefix=f"j{i}")
        took = time.perf_counter() - start
    finally:
        os.fsync = real_fsync
    return job.id, took


def read_from_start(ctx: Any, job_id: str, start: int, limit: int) -> int:
    """The deep page as items were read before: the manifest from its first line."""
    found = 0
    for raw in ctx.storage.iter_lines(manifest_key(job_id)):
        item = orjson.loads(raw)
        if item["index"] >= start:
            found += 1
            if found > limit:
                break
    return found


def realistic_png() -> bytes:
    small = Image.frombytes("RGB", (128, 128), os.urandom(128 * 128 * 3))
    img = small.resize((1024, 1024), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(2))
    img = Image.blend(img, Image.frombytes("RGB", (1024, 1024), os.urandom(1024 * 1024 * 3)), 0.08)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-console-"))
    redis_proc, redis_url = start_redis(tmp / "redis")
    ctx = make_context(tmp, redis_url)
    job_id, took = setup(ctx)
    print(f"setup: {ITEMS:,}-item job and {JOBS:,} one-item jobs in {took:.0f} s")
    port = free_port()
    env = {
        "IMAGEBATCH_REDIS_URL": redis_url,
        "IMAGEBATCH_STORAGE_URL": (tmp / "storage").as_uri(),
        "IMAGEBATCH_DATA_DIR": str(tmp),
        "IMAGEBATCH_LOG_LEVEL": "warning",
        "IMAGEBATCH_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
        "OPENAI_API_KEY": "sk-bench",
    }
    api = start_server(
        [sys.executable, "-m", "service.cli", "api", "--port", str(port)],
        port,
        tmp / "api.log",
        env=env,
    )
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f}")
    try:
        with httpx2.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            c.get("/ui/")  # the session
            gallery = f"/ui/jobs/{job_id}/gallery"
            first = timed(c, gallery)
            deep = timed(c, f"{gallery}?at={DEEP}")

            def drop() -> None:
                ctx.redis.delete(keys.job_line_offsets(job_id, "manifest"))
                ctx.redis.delete(keys.job_line_offsets(job_id, "request"))

            cold = timed(c, f"{gallery}?at={DEEP}", runs=10, before=drop)
            api_items = timed(c, f"/v1/jobs/{job_id}/items?cursor={DEEP}&limit=48")
            listing = timed(c, "/ui/")
            page = c.get("/ui/").text
            deep_list = [0.0]
            cursor = None
            for _ in range(4):  # walk a few pages down, then time one deep in the list
                marker = 'rel="next" href="'
                at = page.find(marker)
                if at < 0:
                    break
                cursor = page[at + len(marker) : page.find('"', at + len(marker))].replace(
                    "&amp;", "&"
                )
                page = c.get(cursor).text
            if cursor:
                deep_list = timed(c, cursor)
            nothing = timed(c, "/ui/?status=failed", runs=10)
            name = "sku-7.png"
            start = time.perf_counter()
            made = c.get(f"/ui/jobs/{job_id}/thumbs/{name}")
            cold_thumb = time.perf_counter() - start
            again = timed(c, f"/ui/jobs/{job_id}/thumbs/{name}")
            revalidated = []
            for _ in range(RUNS):
                start = time.perf_counter()
                r = c.get(
                    f"/ui/jobs/{job_id}/thumbs/{name}",
                    headers={"If-None-Match": made.headers["etag"]},
                )
                revalidated.append(time.perf_counter() - start)
                assert r.status_code == 304
        seek, scan = [], []
        for _ in range(10):
            start = time.perf_counter()
            got = sum(
                1
                for _ in zip(
                    range(49), lines.lines_from(ctx, job_id, "manifest", DEEP), strict=False
                )
            )
            seek.append(time.perf_counter() - start)
            assert got == 49
            start = time.perf_counter()
            read_from_start(ctx, job_id, DEEP, 48)
            scan.append(time.perf_counter() - start)
        png = realistic_png()
        make = []
        for _ in range(10):
            start = time.perf_counter()
            thumbs.make_thumbnail(png)
            make.append(time.perf_counter() - start)
    finally:
        api.stop()
        redis_proc.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"gallery, first page (48 tiles): {ms(first)}")
    print(f"gallery, page at item {DEEP:,}: {ms(deep)}")
    print(f"gallery, page at item {DEEP:,}, line index dropped first: {ms(cold)}")
    print(f"API items?cursor={DEEP:,}&limit=48: {ms(api_items)}")
    print(
        f"in-process, 49 manifest lines at {DEEP:,}: seek {ms(seek)}; from the start {ms(scan)}; "
        f"ratio {statistics.median(scan) / statistics.median(seek):.0f}x"
    )
    print(f"job list, first page of {JOBS + 1:,} jobs: {ms(listing)}")
    print(f"job list, page 5: {ms(deep_list)}")
    print(f"job list, a status no job has (bounded scan): {ms(nothing)}")
    print(
        f"thumbnail: made on first view {cold_thumb * 1000:.1f} ms; served again {ms(again)}; "
        f"revalidated (304) {ms(revalidated)}"
    )
    print(f"making one thumbnail of a realistic 1024x1024 PNG ({len(png) // 1024} KB): {ms(make)}")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    worst = max(statistics.median(first), statistics.median(deep))
    print(
        f"target: gallery pages under {TARGET_MS} ms: {'met' if worst * 1000 < TARGET_MS else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
