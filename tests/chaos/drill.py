"""A chaos drill: a whole stack of its own (Redis, simulator, API, one worker, beat, a webhook
receiver), a small multi-chunk job, and the checks that it ended exactly: every item succeeded,
every image stored once, the tokens on the job equal to what the simulator billed, no upstream
batch made twice, and the webhook sent.
"""

from __future__ import annotations

import base64
import os
import secrets
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import redis

from service.failpoints import fired
from tests.support.procs import Proc, free_port, start_redis, wait_until
from tests.support.receiver import Receiver
from tests.support.simulator import SimulatorHandle, start_simulator
from tests.support.stack import Stack, job_body

CHUNK_LINES = 4
CHUNKS = 3
ITEMS = CHUNK_LINES * CHUNKS
KINDS = ("text_input", "image_input", "image_output")
# A drill's job may wait out a lease its killed holder took (LEASE_SECONDS; a webhook attempt's
# lasts its timeout + 30 s) and an enqueue marker (15 s).
JOB_TIMEOUT = 200.0
# The plan, submit, finalize and collect leases of a drill's stack.
LEASE_SECONDS = 10
QUEUES = "control,collect,sync,webhooks"
_NOTABLE = ("WARNING", "ERROR", "CRITICAL", "Traceback", "Error", "failpoint", "submitted as")


class Drill:
    """One stack; :meth:`start` it with the failpoints to arm, :meth:`stop` it at the end."""

    def __init__(self, tmp: Path, *, aof: bool = False, **sim_flags: Any) -> None:
        self.tmp = tmp
        self.redis_dir = tmp / "redis"
        self.redis_port = free_port()
        self.aof = aof
        self.redis_proc, self.redis_url = start_redis(self.redis_dir, port=self.redis_port, aof=aof)
        self.redis = redis.Redis.from_url(self.redis_url)
        flags = {"rate": 2000, "validate_seconds": 0, "finalize_seconds": 0, **sim_flags}
        self.sim: SimulatorHandle = start_simulator(tmp / "sim", **flags)
        self.receiver = Receiver([200]).start()
        self.secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        self.stack: Stack | None = None

    def start(self, failpoints: str = "", **env: str) -> Stack:
        stack = Stack(
            self.tmp / "stack",
            self.redis_url,
            self.sim.url,
            env={
                "IMAGEBATCH_FAILPOINTS": failpoints,
                "IMAGEBATCH_BATCH_MAX_LINES": str(CHUNK_LINES),
                "IMAGEBATCH_WEBHOOK_SECRET": self.secret,
                "IMAGEBATCH_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
                "IMAGEBATCH_WEBHOOK_TIMEOUT_SECONDS": "2",
                # Short leases: a killed holder blocks its step for seconds, not half a minute.
                "IMAGEBATCH_LEASE_SECONDS": str(LEASE_SECONDS),
                "IMAGEBATCH_COLLECT_LEASE_SECONDS": str(LEASE_SECONDS),
                "IMAGEBATCH_BATCH_CREATE_TIMEOUT_SECONDS": "10",
                **env,
            },
        )
        stack.tmp.mkdir(parents=True, exist_ok=True)
        self.stack = stack
        # The worker and beat start while the API does (each takes seconds on a busy machine).
        worker = Proc(
            stack._exe("worker", "--queues", QUEUES, "--concurrency", "2", "--name", "w"),
            stack.tmp / "worker-w.log",
            env=stack.env,
        )
        stack.procs["w"] = worker
        stack.start_beat()
        stack.start_api()
        wait_until(
            lambda: "ready." in worker.log_text() or (not worker.alive() and _exited(worker)),
            timeout=90,
            message="the worker to be ready",
        )
        return stack

    def submit(self, *, sync: bool = False) -> str:
        assert self.stack is not None
        extra: dict[str, Any] = {"webhook_url": f"{self.receiver.url}/hooks"}
        if sync:
            extra["mode"] = "sync"
        return str(self.stack.submit(job_body(ITEMS, **extra))["id"])

    def kill_redis(self) -> None:
        """Kill Redis -9, as a crash would (no shutdown, no final AOF rewrite)."""
        self.redis_proc.kill()
        self.redis_proc.popen.wait(10)
        self.redis_proc.stop()

    def start_redis_again(self) -> None:
        """Start Redis on the same port and directory: it loads its AOF."""
        self.redis_proc, _ = start_redis(self.redis_dir, port=self.redis_port, aof=self.aof)

    def stop(self) -> None:
        """Kill everything -9: the drill is over, nothing needs a clean shutdown."""
        procs = list(self.stack.procs.values()) if self.stack else []
        for proc in [*procs, self.redis_proc]:
            proc.kill(signal.SIGCONT)  # a process a drill froze cannot die of SIGTERM
            proc.kill(signal.SIGKILL)
        for proc in [*procs, self.redis_proc]:
            proc.stop()
        self.receiver.stop()
        self.sim.kill()
        self.redis.close()

    def logs(self) -> str:
        """What went wrong, from every log: its warnings, errors and failpoint lines (the
        sweep's steady info lines would bury them)."""
        parts = []
        logs = sorted(self.stack.tmp.glob("*.log")) if self.stack else []
        for path in [*logs, self.sim.data_dir / "simulator.log"]:
            lines = [
                line
                for line in path.read_text(errors="replace").splitlines()
                if any(w in line for w in _NOTABLE)
            ]
            parts.append(f"==== {path.name}\n" + "\n".join(lines[-40:]))
        return "\n".join(parts)

    def worker(self) -> Proc:
        assert self.stack is not None
        return self.stack.procs["w"]

    # --- the checks ---------------------------------------------------------------------------
    def wait_fired(self, name: str, timeout: float = 60.0) -> None:
        """Wait until the failpoint ``name`` has fired somewhere in the stack."""
        wait_until(
            lambda: fired(self.redis, name), timeout=timeout, message=f"failpoint {name} to fire"
        )

    def wait_ended(self, job_id: str, timeout: float = JOB_TIMEOUT) -> dict[str, Any]:
        assert self.stack is not None
        try:
            return self.stack.wait_job(job_id, timeout=timeout)
        except TimeoutError:
            job = self.stack.job(job_id)
            raise AssertionError(
                f"job {job_id} did not end within {timeout:.0f}s: status {job['status']}, "
                f"counts {job['counts']}, batches {job['upstream_batches']}\n{self.logs()}"
            ) from None

    def check_exact(self, job: dict[str, Any], *, duplicates_allowed: bool = False) -> None:
        """The job ended exactly: see the module's docstring. ``duplicates_allowed``: a second
        batch for a chunk may exist if the job accounts for it (its tokens are on the job)."""
        assert self.stack is not None
        job_id = job["id"]
        assert job["status"] == "succeeded", f"{job['status']} {job['counts']}\n{self.logs()}"
        assert job["counts"]["succeeded"] == ITEMS
        # Every image stored once: one manifest line and one file per item, nothing else.
        manifest = self.stack.manifest(job_id)
        assert sorted(m["id"] for m in manifest) == sorted(f"sku-{i}" for i in range(ITEMS))
        images = sorted((self.stack.tmp / "storage" / "jobs" / job_id / "images").iterdir())
        assert [p.name for p in images] == sorted(f"sku-{i}.png" for i in range(ITEMS))
        assert job["images_stored"] == ITEMS
        # Tokens on the job are what upstream billed; each item billed once.
        stats = self.sim.stats()
        model = stats["models"][job["model"]]
        billed = model["tokens"]
        assert {k: job["tokens"][k] for k in KINDS} == {k: billed[k] for k in KINDS}, (
            f"job {job['tokens']} vs billed {billed}"
        )
        tags = Counter(
            (b.metadata or {}).get("imagebatch_chunk")
            for b in self.sim.client().batches.list(limit=100)
        )
        twice = {t: n for t, n in tags.items() if n > 1}
        if duplicates_allowed:
            # Each one found, and what it billed counted on the job (the tokens above).
            assert sum(twice.values()) - len(twice) == len(job.get("duplicate_batches") or [])
        else:
            assert model["images"] == ITEMS, f"upstream billed {model['images']} images"
            assert twice == {}, f"batches per chunk attempt: {tags}"

    def check_webhook(self, job_id: str) -> None:
        """The caller heard that the job finished (at least once; one event id), and the
        delivery is recorded as delivered."""
        assert self.stack is not None
        stack = self.stack

        def delivered() -> bool:
            with stack.client() as c:
                return bool(c.get(f"/v1/jobs/{job_id}/webhooks").json()["status"] == "delivered")

        wait_until(delivered, timeout=90, interval=0.5, message=f"the webhook of {job_id}")

        def finished() -> list[dict[str, Any]]:
            return [
                body
                for r in list(self.receiver.requests)
                if (body := orjson.loads(r.body)).get("job", {}).get("id") == job_id
            ]

        got = wait_until(finished, timeout=60, message=f"the webhook of {job_id}")
        assert {b["job"]["status"] for b in got} == {"succeeded"}
        assert len({r.headers.get("webhook-id") for r in self.receiver.requests}) == 1

    def check_killed(self, name: str) -> None:
        """The failpoint fired (its marker is in Redis) and killed a worker process, which
        Celery replaced: the worker still runs."""
        assert fired(self.redis, name), f"failpoint {name} never fired\n{self.logs()}"
        wait_until(
            lambda: "signal 9 (SIGKILL)" in self.worker().log_text(),
            timeout=30,
            message=f"the worker to report the process failpoint {name} killed",
        )
        assert f"failpoint {name}: kill" in self.worker().log_text()
        assert self.worker().alive()


def _exited(proc: Proc) -> bool:
    raise RuntimeError(f"the worker exited while starting:\n{proc.log_text()[-3000:]}")


def pid_of(log: str, name: str) -> int | None:
    """The pid a worker log says fired ``name`` (``failpoint <name>: ... (pid N)``)."""
    for line in log.splitlines():
        if f"failpoint {name}:" in line and "(pid " in line:
            return int(line.rsplit("(pid ", 1)[1].rstrip(")\n "))
    return None


def seed() -> int:
    """The random seed of a drill: CHAOS_SEED if set (to repeat a run), else a fresh one."""
    return int(os.environ.get("CHAOS_SEED") or secrets.randbelow(2**31))
