"""How fast intake reads and prices a large job.

Figures printed (best of a few runs, after one warm-up):

* parse_job_json of 50,000 items (~15-word prompts, a few per-item overrides, 10 % edits);
* parse_job_csv of the same 50,000 rows as a CSV catalog with a template;
* estimate_job of the 50,000 parsed items (o200k_base prompt counts + catalog tables);
* o200k_base counting of the 50,000 prompts: one at a time vs tiktoken's threaded batch;
* the parsed items' memory (tracemalloc), the largest thing intake holds.

Targets: parse well under 1 s, estimate under 1.5 s. Run: ``.venv/bin/python bench/bench_intake_parse.py``.
"""

from __future__ import annotations

import csv
import io
import random
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import orjson

from service.catalog import cached_catalog
from service.jobs.spec import parse_job_csv, parse_job_json
from service.pricing import estimate_job
from service.tokens import encoding

ITEMS = 50_000
RUNS = 3
WORDS = [
    "studio",
    "photo",
    "of",
    "a",
    "red",
    "blue",
    "green",
    "ceramic",
    "glass",
    "steel",
    "mug",
    "cup",
    "bowl",
    "plate",
    "vase",
    "on",
    "white",
    "background",
    "soft",
    "light",
    "kitchen",
    "shelf",
    "wooden",
    "table",
    "product",
    "shot",
    "close",
    "up",
    "matte",
    "glossy",
]
COLORS = ("red", "blue", "green", "black", "white", "amber")


def best_of(fn: Callable[[], Any], runs: int = RUNS) -> tuple[float, Any]:
    fn()  # warm-up: caches, allocator
    best, result = float("inf"), None
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    catalog = cached_catalog()
    rng = random.Random(0)
    items: list[dict[str, Any]] = []
    rows: list[dict[str, str]] = []
    for i in range(ITEMS):
        prompt = " ".join(rng.choice(WORDS) for _ in range(14)) + f" #{i}"
        item: dict[str, Any] = {"id": f"sku-{i:06d}", "prompt": prompt}
        if i % 3 == 0:
            item["quality"] = "medium"
        if i % 7 == 0:
            item["size"] = "1536x1024"
        if i % 10 == 0:
            item["images"] = [f"s3://catalog/{i}.jpg"]
        items.append(item)
        rows.append(
            {
                "sku": f"sku-{i:06d}",
                "color": rng.choice(COLORS),
                "title": " ".join(rng.choice(WORDS) for _ in range(8)),
                "images": f"s3://catalog/{i}.jpg" if i % 10 == 0 else "",
            }
        )
    body = orjson.dumps(
        {
            "model": "gpt-image-2",
            "defaults": {"size": "1024x1024", "quality": "low", "output_format": "webp"},
            "items": items,
            "labels": {"campaign": "bench"},
            "max_cost_usd": 1000.0,
        }
    )
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["sku", "color", "title", "images"])
    writer.writeheader()
    writer.writerows(rows)
    csv_body = out.getvalue().encode()
    params = {
        "template": "Studio photo of a {color} {title}",
        "size": "1024x1024",
        "quality": "low",
    }

    start = time.perf_counter()
    encoding()
    print(f"o200k_base load (once per process):          {time.perf_counter() - start:6.3f} s")

    t_json, spec = best_of(lambda: parse_job_json(body, catalog, max_items=100_000))
    print(f"parse_job_json  {ITEMS:,} items ({len(body) / 1e6:.1f} MB):   {t_json:6.3f} s")
    t_csv, csv_spec = best_of(lambda: parse_job_csv(csv_body, params, catalog, max_items=100_000))
    print(f"parse_job_csv   {ITEMS:,} rows ({len(csv_body) / 1e6:.1f} MB):    {t_csv:6.3f} s")
    assert len(spec.items) == ITEMS and len(csv_spec.items) == ITEMS

    t_est, est = best_of(lambda: estimate_job(spec.items, catalog))
    print(f"estimate_job    {ITEMS:,} items:              {t_est:6.3f} s")
    print(
        f"  -> {est.tokens.total:,} tokens, ${est.usd_batch:,.2f} batch / ${est.usd_sync:,.2f} sync"
    )

    prompts = [i.prompt for i in spec.items]
    enc = encoding()
    t_seq, _ = best_of(lambda: [len(enc.encode_ordinary(p)) for p in prompts])
    t_batch, _ = best_of(lambda: enc.encode_ordinary_batch(prompts), runs=1)
    print(f"o200k count one by one  {ITEMS:,} prompts:    {t_seq:6.3f} s")
    print(f"o200k encode_ordinary_batch (threads):       {t_batch:6.3f} s")

    tracemalloc.start()
    spec = parse_job_json(body, catalog, max_items=100_000)
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(
        f"parsed items held: {current / 1e6:.1f} MB ({current / ITEMS:.0f} B/item); "
        f"peak while parsing {peak / 1e6:.1f} MB (body {len(body) / 1e6:.1f} MB)"
    )
    ok = t_json < 1.0 and t_est < 1.5
    print("targets (parse < 1 s, estimate < 1.5 s):", "met" if ok else "MISSED")


if __name__ == "__main__":
    main()
