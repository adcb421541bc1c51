"""From an upstream batch's completion to the job's ``succeeded``: OpenAI's webhooks vs polling.

Two whole stacks as real processes (API, one Celery worker for every queue, beat, local storage),
each on its own Redis database and its own simulator, up at the same time:

* webhooks: ``IMAGEBATCH_POLL_SECONDS=60`` and ``OPENAI_WEBHOOK_SECRET`` set; the simulator sends
  its signed ``batch.*`` events to ``POST /v1/webhooks/openai`` (``--webhook-url``), as OpenAI
  does to a registered endpoint;
* polling: the default ``IMAGEBATCH_POLL_SECONDS=5`` and no webhooks: the sweep finds the batch.

Each trial submits one job of 100 generations (gpt-image-2, 1024x1024 low), one upstream batch,
to one stack; trials alternate between the stacks so both see the same machine load. The
simulator takes about 5.5 s per batch (1 s validating, 25 images/s, 0.5 s finalizing).

Measured per trial, the same way for both: the moment the batch is ``completed`` upstream (the
bench polls the simulator's ``GET /v1/batches/{id}`` every 20 ms; those requests are the bench's,
not the service's) and the moment our ``GET /v1/jobs/{id}`` says ``succeeded`` (polled every
20 ms); the lag is the difference. Upstream requests the service spent on the batch are the
increase of its own ``imagebatch_upstream_requests_total`` (every attempt, by endpoint) over the
trial, read from ``/metrics`` once the job has finished.

Target (issue 9): at most 2 s from completion to ``succeeded`` with webhooks.
"""

from __future__ import annotations

import base64
import os
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx2
import redis
from _support import ROOT, machine, start_redis

sys.path.insert(0, str(ROOT))

from tests.support.simulator import SimulatorHandle
from tests.support.stack import Stack, job_body

TRIALS = 6  # per mode
ITEMS = 100
SIM_FLAGS = {
    "rate": 25,
    "validate_seconds": 1,
    "finalize_seconds": 0.5,
    "log_level": "warning",
    "plain_images": True,
}
TICK = 0.02
_REQUESTS = re.compile(
    r'^imagebatch_upstream_requests_total\{endpoint="([^"]*)",status="(\d+)"\} (\S+)$', re.M
)


@dataclass
class Trial:
    lag: float  # seconds from upstream completion to our succeeded
    requests: Counter[str]  # upstream requests by endpoint during the trial


class Mode:
    """One stack and its simulator."""

    def __init__(self, name: str, tmp: Path, redis_url: str, webhooks: bool) -> None:
        self.name = name
        flags: dict[str, object] = dict(SIM_FLAGS)
        env = {"IMAGEBATCH_POLL_SECONDS": "5"}
        if webhooks:
            secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
            flags["webhook_secret"] = secret
            env.update({"IMAGEBATCH_POLL_SECONDS": "60", "OPENAI_WEBHOOK_SECRET": secret})
        self.sim = SimulatorHandle(tmp / f"sim-{name}", flags)
        redis.Redis.from_url(redis_url).flushdb()
        self.stack = Stack(tmp / f"stack-{name}", redis_url, self.sim.url, env=env)
        self.stack.tmp.mkdir(parents=True)
        if webhooks:
            self.sim.flags["webhook_url"] = f"{self.stack.api}/v1/webhooks/openai"
        self.poll_seconds = float(env["IMAGEBATCH_POLL_SECONDS"])

    def start(self) -> None:
        self.sim.start()
        self.stack.start()

    def stop(self) -> None:
        self.stack.stop()
        self.sim.stop()

    def requests(self) -> Counter[str]:
        text = httpx2.get(f"{self.stack.api}/metrics", timeout=30).text
        out: Counter[str] = Counter()
        for endpoint, _status, value in _REQUESTS.findall(text):
            out[endpoint] += int(float(value))
        return out

    def trial(self, n: int) -> Trial:
        before = self.requests()
        job_id = self.stack.submit(job_body(ITEMS, prefix=f"t{n}", reuse="never"))["id"]
        api, sim = self.stack.client(), self.sim.client(max_retries=0)
        deadline = time.monotonic() + 120
        batch_id = None
        while batch_id is None:
            batches = api.get(f"/v1/jobs/{job_id}").json()["upstream_batches"]
            batch_id = batches[0]["batch_id"] if batches else None
            _tick(deadline)
        while sim.batches.retrieve(batch_id).status != "completed":
            _tick(deadline)
        completed = time.monotonic()
        while (job := api.get(f"/v1/jobs/{job_id}").json())["status"] != "succeeded":
            assert job["status"] not in ("failed", "partially_failed", "cancelled"), job
            _tick(deadline)
        succeeded = time.monotonic()
        api.close()
        sim.close()
        return Trial(succeeded - completed, self.requests() - before)


def _tick(deadline: float) -> None:
    if time.monotonic() > deadline:
        raise TimeoutError("trial did not finish within 120 s")
    time.sleep(TICK)


def summary(name: str, mode: Mode, trials: list[Trial]) -> tuple[float, float]:
    lags = sorted(t.lag for t in trials)
    polls = statistics.median(t.requests["/v1/batches/{id}"] for t in trials)
    total = statistics.median(sum(t.requests.values()) for t in trials)
    print(
        f"| {name} | {mode.poll_seconds:.0f} s | {statistics.median(lags):.2f} s "
        f"| {lags[0]:.2f} / {lags[-1]:.2f} s | {polls:.0f} | {total:.0f} |"
    )
    return statistics.median(lags), total


def main() -> None:
    started, load_before = time.monotonic(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        redis_proc, url = start_redis(tmp / "redis")
        base = url.rsplit("/", 1)[0]
        modes = [
            Mode("webhooks", tmp, f"{base}/1", webhooks=True),
            Mode("polling", tmp, f"{base}/2", webhooks=False),
        ]
        results: dict[str, list[Trial]] = {m.name: [] for m in modes}
        try:
            for mode in modes:
                mode.start()
            for n in range(TRIALS):
                for mode in modes if n % 2 == 0 else reversed(modes):
                    trial = mode.trial(n)
                    results[mode.name].append(trial)
                    print(
                        f"  {mode.name} #{n}: lag {trial.lag:.2f} s, {dict(trial.requests)}",
                        file=sys.stderr,
                    )
            last = {m.name: m.requests() for m in modes}
        finally:
            for mode in modes:
                mode.stop()
            redis_proc.stop()
    print(f"machine: {machine()}; load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}")
    print(
        f"{TRIALS} trials per mode, alternating; one job of {ITEMS} generations (one batch) each; "
        f"simulator: {SIM_FLAGS['validate_seconds']} s validating, {SIM_FLAGS['rate']} images/s, "
        f"{SIM_FLAGS['finalize_seconds']} s finalizing"
    )
    print(
        "| mode | IMAGEBATCH_POLL_SECONDS | completion -> succeeded (median) | min / max "
        "| batch polls per batch (median) | upstream requests per batch (median) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    hook_lag, hook_total = summary("webhooks", modes[0], results["webhooks"])
    poll_lag, poll_total = summary("polling", modes[1], results["polling"])
    print(
        f"polling / webhooks: lag x{poll_lag / hook_lag:.1f}, upstream requests per batch "
        f"x{poll_total / hook_total:.2f}; endpoints over the whole run: "
        + "; ".join(f"{name} {dict(counts)}" for name, counts in last.items())
    )
    ok = max(t.lag for t in results["webhooks"]) <= 2.0
    print(
        f"target: completion -> succeeded <= 2 s with webhooks (every trial): "
        f"{'met' if ok else 'MISSED'}   (bench wall time {time.monotonic() - started:.0f} s)"
    )


if __name__ == "__main__":
    main()
