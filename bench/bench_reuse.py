"""Reuse: rerunning an unchanged 20,000-item catalog, beside its first run.

The whole stack as real processes (API, a control worker, a collect worker, beat, Redis, local
storage) against a simulator that finishes batches at once. The catalog is a 20,000-row CSV
submitted with a template. The first run makes every image upstream; each rerun of the same
catalog should make none (every item is completed by copying the image the tenant already has).
Measured per run: POST /v1/jobs to `succeeded`, and upstream image requests (batch lines the
simulator executed plus sync requests, from its billing stats) and upstream API calls of any
kind (imagebatch_upstream_requests_total).
Target (issue 11): a rerun makes 0 upstream image requests and succeeds in under 20 s.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx2
from _support import ROOT, machine, start_redis

sys.path.insert(0, str(ROOT))

from prometheus_client.parser import text_string_to_metric_families

from tests.support.simulator import SimulatorHandle, start_simulator
from tests.support.stack import Stack

ROWS = 20_000
RERUNS = 3
TEMPLATE = "Studio photo of a {color} {title} on white"


def catalog() -> bytes:
    colours = ("red", "blue", "green", "black", "white")
    lines = [f"sku-{i},{colours[i % 5]},ceramic mug model {i}" for i in range(ROWS)]
    return ("sku,color,title\n" + "\n".join(lines) + "\n").encode()


def image_requests(sim: SimulatorHandle) -> int:
    stats = sim.stats()
    return (
        int(stats["batch"]["lines_completed"])
        + int(stats["batch"]["lines_failed"])
        + int(stats["sync"]["requests"])
    )


def upstream_calls(stack: Stack) -> float:
    text = httpx2.get(f"{stack.api}/metrics", timeout=30).text
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        if fam.name == "imagebatch_upstream_requests"
        for s in fam.samples
        if s.name.endswith("_total")
    )


def run(stack: Stack, sim: SimulatorHandle, body: bytes) -> dict[str, Any]:
    requests, calls = image_requests(sim), upstream_calls(stack)
    start = time.perf_counter()
    with stack.client() as c:
        resp = c.post(
            "/v1/jobs",
            content=body,
            params={"template": TEMPLATE, "quality": "low"},
            headers={"Content-Type": "text/csv"},
        )
    assert resp.status_code == 202, resp.text
    done = stack.wait_job(resp.json()["id"], timeout=1800)
    seconds = time.perf_counter() - start
    assert done["status"] == "succeeded", done
    return {
        "seconds": seconds,
        "image_requests": image_requests(sim) - requests,
        "upstream_calls": upstream_calls(stack) - calls,
        "reused": done["counts"]["reused"],
        "estimate_reused": resp.json()["estimate"].get("reuse", {}).get("items", 0),
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        redis_proc, redis_url = start_redis(tmp / "redis")
        sim = start_simulator(
            tmp / "sim", rate=1_000_000, validate_seconds=0, finalize_seconds=0, plain_images=True
        )
        stack = Stack(
            tmp / "stack",
            redis_url,
            sim.url,
            env={"IMAGEBATCH_POLL_SECONDS": "1"},
        )
        stack.tmp.mkdir()
        try:
            stack.start_api()
            stack.start_worker("control,sync", name="control")
            stack.start_worker("collect", concurrency=1, name="collect")
            stack.start_beat()
            body = catalog()
            first = run(stack, sim, body)
            reruns = [run(stack, sim, body) for _ in range(RERUNS)]
            times = [r["seconds"] for r in reruns]
            print(f"machine: {machine()}")
            print(f"reuse: a {ROWS:,}-row catalog (CSV + template), then rerun unchanged {RERUNS}x")
            print(
                f"  first run: {first['seconds']:.1f} s to succeeded, "
                f"{first['image_requests']:,} upstream image requests, "
                f"{first['upstream_calls']:.0f} upstream API calls"
            )
            print(
                f"  rerun:     median {statistics.median(times):.1f} s to succeeded "
                f"(runs: {', '.join(f'{t:.1f}' for t in times)}), upstream image requests "
                f"{[r['image_requests'] for r in reruns]}, upstream API calls "
                f"{[int(r['upstream_calls']) for r in reruns]}, reused {[r['reused'] for r in reruns]}"
                f" (estimate said {[r['estimate_reused'] for r in reruns]})"
            )
            print(
                f"  ratio first/rerun: {first['seconds'] / statistics.median(times):.1f}x   "
                f"target: rerun 0 image requests, < 20 s"
            )
        finally:
            stack.stop()
            sim.stop()
            redis_proc.stop()


if __name__ == "__main__":
    main()
