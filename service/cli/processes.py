"""One process each, as a deployment runs them: ``imagebatch api | worker | beat | simulator``."""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

from service.settings import get_settings


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
    argv = ["worker", "--queues", args.queues, "--concurrency", str(args.concurrency)]
    argv += ["--hostname", name, "--loglevel", settings.log_level.upper()]
    argv += ["-O", "fair", "--without-gossip", "--without-mingle"]
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


def cmd_failpoints(args: argparse.Namespace) -> int:
    from service.failpoints import REGISTRY

    for fp in REGISTRY:
        print(f"{fp.name}\t{fp.description}" if args.describe else fp.name)
    return 0


def cmd_simulator(argv: list[str]) -> int:
    from simulator.cli import main as sim_main

    sim_main(argv)
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "api",
        help="run the HTTP API",
        description="Run the HTTP API under uvicorn. Settings come from IMAGEBATCH_* variables "
        "(and .env); the flags below override two of them.",
    )
    p.add_argument("--host", help="interface to listen on (default IMAGEBATCH_API_HOST)")
    p.add_argument("--port", type=int, help="port to listen on (default IMAGEBATCH_API_PORT)")
    p = sub.add_parser(
        "worker",
        help="run a Celery worker",
        description="Run a Celery worker that takes tasks from the given queues. Run as many as "
        "you like, on as many machines, against the same Redis and storage.",
    )
    p.add_argument(
        "--queues",
        default="control,collect,sync,webhooks",
        help="comma list of control, collect, sync, webhooks",
    )
    p.add_argument(
        "--concurrency", type=int, default=2, help="worker processes (or threads) (default 2)"
    )
    p.add_argument("--pool", help="Celery pool (prefork, threads, solo)")
    p.add_argument(
        "--name", default="worker", help="name in logs and heartbeats; host and pid are appended"
    )
    sub.add_parser(
        "beat",
        help="run Celery beat (the sweep)",
        description="Run Celery beat: it enqueues the sweep every IMAGEBATCH_POLL_SECONDS. One "
        "beat per deployment is enough.",
    )
    p = sub.add_parser(
        "failpoints",
        help="list every failpoint name, one per line",
        description="List every failpoint, one name per line, in the order a job meets them. "
        "IMAGEBATCH_FAILPOINTS arms them for a drill (name=kill|raise|sleep:N|stop:N[@n][*], "
        "comma-separated); unset, they do nothing.",
    )
    p.add_argument(
        "--describe", action="store_true", help="add what has just happened there, after a tab"
    )
    sub.add_parser(
        "simulator", help="run the offline OpenAI simulator (see `imagebatch simulator --help`)"
    )
