"""Result reuse in the lanes, step by step, against a real Redis, the simulator and local storage.

Each step is called the way a worker's task would call it; the simulator's billing says what went
upstream.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from PIL import Image

from service.context import Context
from service.jobs import intake
from service.jobs import model as js
from service.jobs.reuse import ReuseIndex
from service.jobs.spec import parse_job_json
from service.lanes import collect, finalize, plan, submit, sweep, sync
from service.storage import image_key
from tests.support.context import make_context
from tests.support.procs import wait_until
from tests.support.simulator import SimulatorHandle, start_instant_simulator
from tests.support.stack import job_body


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimulatorHandle]:
    handle = start_instant_simulator(tmp_path_factory.mktemp("sim"))
    yield handle
    handle.stop()


@pytest.fixture
def ctx(
    tmp_path: Path, redis_url: str, redis_client: Any, sim: SimulatorHandle
) -> Iterator[Context]:
    context = make_context(tmp_path, redis_url, sim.url, local_ref_roots=[tmp_path / "refs"])
    yield context
    context.redis.close()


def accept(ctx: Context, body: dict[str, Any], tenant: str = "default") -> str:
    spec = parse_job_json(orjson.dumps(body), ctx.catalog, max_items=1000)
    return intake.submit(ctx, spec, tenant).job.id


def run(ctx: Context, job_id: str) -> str | None:
    """Every step of the batch lane until the job finalizes; its final status."""
    chunks = plan.plan_job(ctx, job_id)
    for n in chunks:
        assert submit.submit_chunk(ctx, job_id, n) == "submitted"

    def ended() -> bool:
        sweep.sweep(ctx)
        return all(ctx.store.chunk(job_id, n).status == js.CHUNK_COLLECTING for n in chunks)

    wait_until(ended, timeout=30, message="every upstream batch to end")
    for n in chunks:
        collect.collect_chunk(ctx, job_id, n)
    return finalize.finalize_job(ctx, job_id)


def billed_images(sim: SimulatorHandle) -> int:
    return int(sim.stats()["batch"]["images"]) + int(sim.stats()["sync"]["images"])


def manifest(ctx: Context, job_id: str) -> dict[str, dict[str, Any]]:
    lines = ctx.storage.iter_lines(f"jobs/{job_id}/manifest.jsonl")
    return {m["id"]: m for m in (orjson.loads(raw) for raw in lines if raw.strip())}


def test_an_unchanged_rerun_copies_every_image_and_calls_upstream_for_nothing(
    ctx: Context, sim: SimulatorHandle, tmp_path: Path
) -> None:
    first = accept(ctx, job_body(6))
    assert run(ctx, first) == "succeeded"
    assert ReuseIndex.of(ctx, "default").size() == 6
    before = billed_images(sim)

    body = job_body(8)  # the same six, and two new ones
    body["items"][2]["prompt"] = "A changed prompt for item 2"
    second = accept(ctx, body)
    assert ctx.store.job(second).estimate["reuse"] == {  # priced: only what is left to make
        "items": 5,
        "images": 5,
        "unchecked_edits": 0,
    }
    assert run(ctx, second) == "succeeded"
    assert billed_images(sim) - before == 3  # items 2, 6 and 7
    counts, spend = ctx.store.counts(second), ctx.store.spend(second)
    assert counts["succeeded"] == 8 and spend["reused"] == 5 and spend["images"] == 8
    lines = manifest(ctx, second)
    reused = {i for i, m in lines.items() if m.get("reused_from")}
    assert reused == {"sku-0", "sku-1", "sku-3", "sku-4", "sku-5"}
    assert lines["sku-0"]["reused_from"] == {"job_id": first, "item_id": "sku-0"}
    assert lines["sku-0"]["cost_usd"] == 0 and lines["sku-0"]["saved_usd"] > 0
    assert lines["sku-2"]["cost_usd"] > 0 and "reused_from" not in lines["sku-2"]
    for item in ("sku-0", "sku-2", "sku-7"):
        path = tmp_path / "storage" / image_key(second, item, "png")
        with Image.open(path) as img:
            assert img.size == (1024, 1024)
    # The index now points at the newest copies.
    assert ReuseIndex.of(ctx, "default").lookup([lines["sku-0"]["fingerprint"]])[0].job_id == second


def test_a_vanished_image_is_generated_again_not_linked(
    ctx: Context, sim: SimulatorHandle, tmp_path: Path
) -> None:
    first = accept(ctx, job_body(3))
    assert run(ctx, first) == "succeeded"
    ctx.storage.delete(image_key(first, "sku-1", "png"))
    before = billed_images(sim)
    second = accept(ctx, job_body(3))
    assert run(ctx, second) == "succeeded"
    assert billed_images(sim) - before == 1
    lines = manifest(ctx, second)
    assert "reused_from" not in lines["sku-1"] and lines["sku-0"]["reused_from"]
    assert (tmp_path / "storage" / image_key(second, "sku-1", "png")).exists()


def test_reuse_never_generates_everything_and_tenants_never_share(
    ctx: Context, sim: SimulatorHandle
) -> None:
    first = accept(ctx, job_body(4))
    assert run(ctx, first) == "succeeded"
    before = billed_images(sim)
    never = accept(ctx, job_body(4, reuse="never"))
    assert "reuse" not in ctx.store.job(never).estimate
    assert run(ctx, never) == "succeeded"
    other = accept(ctx, job_body(4), tenant="someone-else")
    assert ctx.store.job(other).estimate["reuse"]["items"] == 0
    assert run(ctx, other) == "succeeded"
    assert billed_images(sim) - before == 8
    assert not any(m.get("reused_from") for m in manifest(ctx, other).values())


def test_edits_reuse_by_reference_content_not_by_name(
    ctx: Context, sim: SimulatorHandle, tmp_path: Path
) -> None:
    refs = tmp_path / "refs"
    refs.mkdir()
    for name, colour in (("a.png", (200, 30, 30)), ("b.png", (200, 30, 30)), ("c.png", (0, 0, 0))):
        Image.new("RGB", (64, 64), colour).save(refs / name)

    def body(ref: str) -> dict[str, Any]:
        out = job_body(1)
        out["items"][0]["images"] = [(refs / ref).as_uri()]
        return out

    assert run(ctx, accept(ctx, body("a.png"))) == "succeeded"
    before = billed_images(sim)
    same_bytes = accept(ctx, body("b.png"))  # another name, the same photo
    assert ctx.store.job(same_bytes).estimate["reuse"]["unchecked_edits"] == 1
    assert run(ctx, same_bytes) == "succeeded"
    assert billed_images(sim) == before
    Image.new("RGB", (64, 64), (0, 0, 255)).save(refs / "b.png")  # the photo changed
    changed = accept(ctx, body("b.png"))
    assert run(ctx, changed) == "succeeded"
    assert billed_images(sim) == before + 1


def test_the_sync_lane_reuses_before_sending(ctx: Context, sim: SimulatorHandle) -> None:
    assert run(ctx, accept(ctx, job_body(3))) == "succeeded"
    before = billed_images(sim)
    job_id = accept(ctx, job_body(4, mode="sync"))
    sync.fan_out(ctx, job_id)
    outcome = sync.run_slice(ctx, job_id, 0, 4)
    assert outcome["succeeded"] == 4
    assert billed_images(sim) - before == 1
    assert finalize.finalize_job(ctx, job_id) == "succeeded"
    assert ctx.store.spend(job_id)["reused"] == 3
    assert ctx.store.spend(job_id)["cost:sync"] > 0
