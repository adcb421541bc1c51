"""A chaos drill: a whole stack of its own (Redis, simulator, API, one worker, beat, a webhook
receiver), a small multi-chunk job, and the checks that it ended exactly: every item succeeded,
every image stored once, the tokens on the job equal to what the simulator billed, no upstream
batch made twice, and the webhook sent.
"""

from __future__ import annotations

import base64
import os
import secrets
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
# A drill's job may wait out a lease its killed holder took (plan, submit and finalize hold theirs
# 30 s; a webhook attempt's lasts its timeout + 30 s) and an enqueue marker (15 s).
JOB_TIMEOUT = 150.0
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
                "IMAGEBATCH_COLLECT_LEASE_SECONDS": "10",
                **env,
            },
        )
        stack.tmp.mkdir(parents=True, exist_ok=True)
        self.stack = stack
        stack.start_api()
        stack.start_worker(name="w")
        stack.start_beat()
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
        if self.stack is not None:
            self.stack.stop()
        self.receiver.stop()
        self.sim.stop()
        self.redis.close()
        self.redis_proc.stop()

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
        """The job ended exactly: see the module's docstring."""
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
        if not duplicates_allowed:
            assert model["images"] == ITEMS, f"upstream billed {model['images']} images"
            # No upstream batch made twice for one chunk attempt.
            tags = Counter(
                (b.metadata or {}).get("imagebatch_chunk")
                for b in self.sim.client().batches.list(limit=100)
            )
            assert [t for t, n in tags.items() if n > 1] == [], f"batches per chunk: {tags}"

    def check_webhook(self, job_id: str) -> None:
        """The caller heard that the job finished (at least once; one event id)."""

        def finished() -> list[dict[str, Any]]:
            return [
                body
                for r in list(self.receiver.requests)
                if (body := orjson.loads(r.body)).get("job", {}).get("id") == job_id
            ]

        got = wait_until(finished, timeout=60, message=f"the webhook of {job_id}")
        assert {b["job"]["status"] for b in got} == {"succeeded"}
        assert len({r.headers.get("webhook-id") for r in self.receiver.requests}) == 1

    def check_fired(self, name: str) -> None:
        """The failpoint fired (its marker is in Redis) and killed a worker process, which
        came back: the worker still runs."""
        assert fired(self.redis, name), f"failpoint {name} never fired\n{self.logs()}"
        log = self.worker().log_text()
        assert f"failpoint {name}: kill" in log
        assert "SIGKILL" in log or "signal 9" in log, log[-3000:]
        assert self.worker().alive()


def pid_of(log: str, name: str) -> int | None:
    """The pid a worker log says fired ``name`` (``failpoint <name>: ... (pid N)``)."""
    for line in log.splitlines():
        if f"failpoint {name}:" in line and "(pid " in line:
            return int(line.rsplit("(pid ", 1)[1].rstrip(")\n "))
    return None


def seed() -> int:
    """The random seed of a drill: CHAOS_SEED if set (to repeat a run), else a fresh one."""
    return int(os.environ.get("CHAOS_SEED") or secrets.randbelow(2**31))
