"""Rate limits and spend budgets end to end: two worker processes against a simulator that
enforces the same limits we configure."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.catalog import cached_catalog
from service.jobs.spec import parse_job_json
from service.pricing import Estimate, estimate_job
from service.tenants import digest_key
from tests.support.procs import wait_until
from tests.support.simulator import SimulatorHandle
from tests.support.stack import FINAL, Stack, job_body

pytestmark = pytest.mark.slow

MODEL = "gpt-image-2"
SAME_PROMPT = "Studio photo of a red ceramic mug on white"  # every item costs the same
# ~115 input tokens per item: long prompts make the enqueued-token budget bind at a few dozen items.
LONG_PROMPT = (
    "Studio photo of product {i} on a seamless white background, soft daylight from the left, " * 6
)


def _estimate(body: dict[str, Any]) -> Estimate:
    """The estimate the API gives for a job body (the same functions, called here)."""
    catalog = cached_catalog(None)
    spec = parse_job_json(orjson.dumps(body), catalog, max_items=len(body["items"]))
    return estimate_job(spec.items, catalog)


def _two_workers(stack: Stack, queues: str = "control,collect,sync") -> Stack:
    stack.start_api()
    stack.start_worker(queues, name="a")
    stack.start_worker(queues, name="b")
    stack.start_beat()
    return stack


@dataclass
class SyncRun:
    images: int
    first_request: float  # monotonic: the simulator first saw a request
    last_image: float  # monotonic: the simulator had billed every image
    requests: int
    rate_limited: int

    @property
    def images_per_minute(self) -> float:
        # Intervals between N grants: N - 1 of them, so a perfectly paced run measures the limit.
        return (self.images - 1) * 60 / (self.last_image - self.first_request)


def watch_sync(sim: SimulatorHandle, images: int, timeout: float) -> SyncRun:
    """Poll the simulator's stats until it has billed ``images`` sync images; time the run."""
    first: float | None = None

    def done() -> dict[str, Any] | None:
        nonlocal first
        sync = sim.stats()["sync"]
        if first is None and sync["requests"] > 0:
            first = time.monotonic()
        return sync if sync["images"] >= images else None

    sync = wait_until(done, timeout=timeout, interval=0.05, message=f"{images} sync images")
    end = time.monotonic()
    assert first is not None
    return SyncRun(images, first, end, sync["requests"], sync["rate_limited"])


def _stored_images(stack: Stack, job_id: str) -> list[Path]:
    root = stack.tmp / "storage" / "jobs" / job_id / "images"
    return [p for p in root.glob("*") if not p.name.endswith(".meta.json")]


def test_sync_job_runs_at_the_images_per_minute_limit_without_429s(make_simulator, make_stack):
    limit, n = 720, 240  # 60 at once (a 5-second bucket), then 15 s at the limit's rate
    sim = make_simulator(ipm=limit, limit_window=5, latency_ms=50)
    stack = _two_workers(make_stack(sim, env={"IMAGEBATCH_SYNC_IMAGES_PER_MINUTE": str(limit)}))
    job_id = stack.submit(job_body(n, mode="sync"))["id"]
    run = watch_sync(sim, n, timeout=90)
    job = stack.wait_job(job_id, timeout=30)
    assert job["status"] == "succeeded", stack.logs()
    assert job["mode"] == "sync" and job["counts"]["succeeded"] == n
    assert len(_stored_images(stack, job_id)) == n
    print(
        f"sync: {run.images_per_minute:.0f} images/min of {limit}, "
        f"{run.rate_limited} 429s of {run.requests} requests"
    )
    assert run.rate_limited <= 0.01 * run.requests, run
    assert run.images_per_minute >= 0.9 * limit, run
    # Both worker processes sent requests: the limit held across the cluster, not per process.
    for name in ("a", "b"):
        assert "sync.items" in stack.procs[name].log_text(), name


def test_cancelling_a_sync_job_sends_nothing_more_and_keeps_what_ran(make_simulator, make_stack):
    # A bucket of 6 (3 s of the limit), then 2 images a second: most of the job is still waiting
    # when it is cancelled.
    limit, n = 120, 60
    sim = make_simulator(ipm=limit, limit_window=3)
    stack = _two_workers(make_stack(sim, env={"IMAGEBATCH_SYNC_IMAGES_PER_MINUTE": str(limit)}))
    job_id = stack.submit(job_body(n, mode="sync"))["id"]
    wait_until(lambda: sim.stats()["sync"]["images"] >= 5, timeout=30, message="5 sync images")
    with stack.client() as c:
        assert c.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
    job = stack.wait_job(job_id, timeout=30)
    assert job["status"] == "cancelled", stack.logs()
    done = job["counts"]["succeeded"]
    assert 5 <= done < 20 and job["counts"]["cancelled"] == n - done, job["counts"]
    assert sim.stats()["sync"]["images"] == done  # nothing was sent after the cancel took
    assert len(_stored_images(stack, job_id)) == done


def test_five_batch_jobs_three_times_the_queue_budget_never_overrun_upstream(
    make_simulator, make_stack
):
    sizes = [90, 30, 60, 80, 40]
    bodies = [job_body(n, prompt=LONG_PROMPT, prefix=f"j{k}") for k, n in enumerate(sizes)]
    tokens = [_estimate(body).tokens.input for body in bodies]
    # Together three times the budget; every job fits alone, some pairs fit together.
    budget = sum(tokens) // 3
    assert max(tokens) <= budget < tokens[0] + tokens[1]
    sim = make_simulator(batch_queue_tokens=budget, rate=40)
    stack = _two_workers(make_stack(sim, env={"IMAGEBATCH_BATCH_QUEUE_TOKENS": str(budget)}))
    ids = [stack.submit(body)["id"] for body in bodies]

    def all_done() -> list[dict[str, Any]] | None:
        jobs = [stack.job(job_id) for job_id in ids]
        return jobs if all(j["status"] in FINAL for j in jobs) else None

    jobs = wait_until(all_done, timeout=120, interval=0.2, message="five jobs to finish")
    for job, n in zip(jobs, sizes, strict=True):
        assert job["status"] == "succeeded", (job, stack.logs())
        assert job["counts"]["succeeded"] == n
        assert len(_stored_images(stack, job["id"])) == n
        # One upstream batch per job, accepted the first time: none was refused and retried.
        assert [(b["upstream_status"], b["attempt"]) for b in job["upstream_batches"]] == [
            ("completed", 1)
        ], job["upstream_batches"]
    # Chunks did wait for the budget (the submit task says so), or the test proved nothing.
    assert any("'waiting'" in stack.procs[w].log_text() for w in ("a", "b"))
    stats = sim.stats()
    assert 0 < stats["models"][MODEL]["peak_enqueued_tokens"] <= budget
    failed = {bid: b for bid, b in stats["batches"].items() if b["status"] != "completed"}
    assert not failed, failed
    assert stats["batch"]["lines_completed"] == sum(sizes)


# --- money ---------------------------------------------------------------------------------------
def test_max_cost_usd_stops_batch_and_sync_jobs_under_their_caps(make_simulator, make_stack):
    n = 40
    sim = make_simulator(rate=200)
    stack = _two_workers(make_stack(sim))
    submitted = {}
    for mode in ("batch", "sync"):
        body = job_body(n, prompt=SAME_PROMPT, mode=mode, prefix=mode)
        per_item = _estimate(body).nanousd(mode) / 1e9 / n
        # Room for 20 items and a half: the half makes "exactly at the cap" impossible.
        cap = round(per_item * 20.5, 9)
        submitted[mode] = (stack.submit({**body, "max_cost_usd": cap})["id"], cap)

    for mode, (job_id, cap) in submitted.items():
        job = stack.wait_job(job_id, timeout=90)
        assert job["status"] == "budget_exhausted", (job, stack.logs())
        assert "max_cost_usd" in job["reason"], job["reason"]
        assert job["cost_usd"]["total"] <= cap
        done = job["counts"]["succeeded"]
        # Batch chunks are capped at a quarter of the cap (5 items here): four of them fit. The
        # sync lane reserves item by item: twenty fit.
        assert done == 20, (mode, job["counts"])
        assert job["counts"]["cancelled"] == n - done and job["counts"]["failed"] == 0
        # What ran was billed upstream exactly as we counted it, and its images are kept.
        billed = sim.stats()[mode]["tokens"]
        assert job["tokens"]["image_output"] == billed["image_output"], mode
        assert job["tokens"]["text_input"] == billed["text_input"], mode
        assert len(_stored_images(stack, job_id)) == done
        manifest = stack.manifest(job_id)
        assert sum(m["cost_usd"] or 0 for m in manifest) == pytest.approx(job["cost_usd"]["total"])
        for m in manifest:
            if m["status"] == "succeeded":
                assert m["keys"] and m["tier"] == mode
            else:
                assert m["status"] == "cancelled" and not m["keys"]


# --- tenants -------------------------------------------------------------------------------------
KEYS = {
    "alpha": "ib_alpha-key-0123456789",
    "beta": "ib_beta-key-0123456789",
    "gamma": "ib_gamma-0123",
}


def _tenants_file(tmp: Path, daily: dict[str, float]) -> Path:
    lines = []
    for tenant, key in KEYS.items():
        lines += [f"[tenants.{tenant}]", f'key_sha256 = ["{digest_key(key)}"]']
        if tenant in daily:
            lines.append(f"daily_usd = {daily[tenant]!r}")
    path = tmp / "tenants.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class Caller:
    """The API as one tenant sees it."""

    def __init__(self, stack: Stack, tenant: str | None = None, key: str | None = None):
        self.stack = stack
        key = key if key is not None else (KEYS[tenant] if tenant else None)
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    def request(self, method: str, path: str, body: Any = None) -> Any:
        with self.stack.client() as c:
            return c.request(method, path, json=body, headers=self.headers)

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        resp = self.request("POST", "/v1/jobs", body)
        assert resp.status_code == 202, resp.text
        return resp.json()  # type: ignore[no-any-return]

    def wait(self, job_id: str, timeout: float = 60) -> dict[str, Any]:
        def final() -> dict[str, Any] | None:
            job = self.request("GET", f"/v1/jobs/{job_id}").json()
            return job if job["status"] in FINAL else None

        return wait_until(final, timeout=timeout, interval=0.2, message=f"job {job_id} to finish")


def _assert_problem(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    problem: dict[str, Any] = resp.json()
    assert problem["status"] == status and problem["title"] and problem["detail"]
    return problem


def test_keys_are_required_and_tenants_see_only_their_own_jobs(
    make_simulator, make_stack, tmp_path
):
    sim = make_simulator()
    tenants = _tenants_file(tmp_path, {})
    stack = _two_workers(make_stack(sim, env={"IMAGEBATCH_TENANTS_FILE": str(tenants)}))
    alpha, beta = Caller(stack, "alpha"), Caller(stack, "beta")

    for caller in (Caller(stack), Caller(stack, key="ib_not-a-key")):
        for method, path in (("POST", "/v1/jobs"), ("GET", "/v1/jobs"), ("GET", "/v1/jobs/x")):
            resp = caller.request(method, path, job_body(2) if method == "POST" else None)
            _assert_problem(resp, 401)
            assert resp.headers["www-authenticate"].lower().startswith("bearer")
    assert (
        "Unknown API key"
        in Caller(stack, key="ib_wrong").request("GET", "/v1/jobs").json()["detail"]
    )

    a1 = alpha.submit(job_body(3, prefix="a"))["id"]
    a2 = alpha.submit(job_body(3, prefix="a"))["id"]
    b1 = beta.submit(job_body(3, prefix="b"))["id"]
    assert (
        alpha.wait(a1)["status"]
        == alpha.wait(a2)["status"]
        == beta.wait(b1)["status"]
        == "succeeded"
    )

    assert {j["id"] for j in alpha.request("GET", "/v1/jobs").json()["data"]} == {a1, a2}
    assert {j["id"] for j in beta.request("GET", "/v1/jobs").json()["data"]} == {b1}
    # Another tenant's job is answered exactly like a job that does not exist.
    for path in (f"/v1/jobs/{a1}", f"/v1/jobs/{a1}/items", f"/v1/jobs/{a1}/manifest"):
        assert "no job" in _assert_problem(beta.request("GET", path), 404)["detail"]
    _assert_problem(beta.request("POST", f"/v1/jobs/{a1}/cancel"), 404)
    with stack.client() as c:
        image = c.get(f"/v1/objects/jobs/{a1}/images/a-0.png", headers=beta.headers)
    _assert_problem(image, 404)
    assert alpha.request("GET", f"/v1/jobs/{a1}").json()["status"] == "succeeded"
    assert alpha.request("GET", f"/v1/jobs/{a1}/items").json()["data"][0]["status"] == "succeeded"


def test_tenant_daily_cap_refuses_at_intake_and_stops_jobs_that_raced_past_it(
    make_simulator, make_stack, tmp_path
):
    sim = make_simulator()
    n = 10
    # reuse never: a rerun of a finished job's items would cost nothing and fit any cap.
    body = job_body(n, prompt=SAME_PROMPT, reuse="never")
    one_job = _estimate(body).nanousd("batch") / 1e9
    cap = round(one_job * 1.5, 6)  # room for one job and a half
    tenants = _tenants_file(tmp_path, {"gamma": cap})
    stack = make_stack(sim, env={"IMAGEBATCH_TENANTS_FILE": str(tenants)})
    gamma = Caller(stack, "gamma")

    # A job bigger than the whole cap is refused at intake, with what is left.
    stack.start_api()
    problem = _assert_problem(
        gamma.request("POST", "/v1/jobs", job_body(2 * n, prompt=SAME_PROMPT)), 422
    )
    assert "daily budget" in problem["detail"], problem
    assert problem["remaining_usd"]["day"] == pytest.approx(cap)
    assert gamma.request("GET", "/v1/jobs").json()["data"] == []

    # Two jobs that each fit are both accepted before any worker has reserved anything;
    # the workers then let only one of them spend.
    first, second = gamma.submit(body)["id"], gamma.submit(body)["id"]
    stack.start_worker(name="a")
    stack.start_worker(name="b")
    stack.start_beat()
    jobs = [gamma.wait(first), gamma.wait(second)]
    assert sorted(j["status"] for j in jobs) == ["budget_exhausted", "succeeded"], jobs
    stopped = next(j for j in jobs if j["status"] == "budget_exhausted")
    assert "tenant 'gamma'" in stopped["reason"] and stopped["cost_usd"]["total"] == 0
    assert stopped["counts"]["cancelled"] == n
    spent = sum(j["cost_usd"]["total"] for j in jobs)
    assert spent == pytest.approx(one_job) and spent <= cap

    # Now less than one job is left today: the next is refused at intake, naming what is left.
    problem = _assert_problem(gamma.request("POST", "/v1/jobs", body), 422)
    assert problem["remaining_usd"]["day"] == pytest.approx(cap - spent, abs=1e-6)
    # Other tenants have their own budgets.
    Caller(stack, "alpha").submit(body)
