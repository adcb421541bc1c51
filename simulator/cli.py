"""``imagebatch simulator`` / ``python -m simulator``: run the OpenAI simulator under uvicorn.

Every flag has an environment twin, ``IMAGEBATCH_SIM_<FLAG>`` (``--rate`` is
``IMAGEBATCH_SIM_RATE``; the repeatable ``--shutdown`` is one comma-separated
``IMAGEBATCH_SIM_SHUTDOWN``); a flag on the command line wins. Bad values, and flags naming a model
the catalog does not have, exit with argparse's usage message, naming the flag.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from simulator.config import ConfigError, SimulatorConfig

_FLAGS: list[tuple[str, type, str]] = [
    ("host", str, "interface to listen on"),
    ("port", int, "port to listen on"),
    ("data_dir", Path, "where files and batches are kept"),
    ("catalog_file", Path, "model catalog TOML (default: the service's)"),
    ("rate", float, "images per second each batch processes"),
    ("validate_seconds", float, "seconds a batch spends validating"),
    ("finalize_seconds", float, "seconds a batch spends finalizing (and cancelling)"),
    ("completion_window", float, "seconds after creation at which a batch expires"),
    ("rpm", int, "sync requests per minute (0 = no limit)"),
    ("ipm", int, "sync images per minute (0 = no limit)"),
    ("tpm", int, "sync tokens per minute (0 = no limit)"),
    ("limit_window", float, "seconds of the limits a full bucket holds (default 60)"),
    ("batch_queue_tokens", int, "enqueued batch input tokens per model (0 = no limit)"),
    ("fail_rate", float, "share of sync requests and batch lines answered with a 500"),
    ("latency_ms", float, "added latency of each sync image request"),
    ("download_bytes_per_second", int, "pace of file downloads (0 = full speed)"),
    ("create_delay", float, "seconds a batch create takes before the batch exists"),
    ("moderation_words", str, "comma list of blocked words ('word=category' names the category)"),
    ("image_bytes", int, "pad images to about this many bytes (0 = natural)"),
    ("api_key", str, "require this API key"),
    ("max_batch_lines", int, "lines one batch input may hold"),
    ("max_batch_bytes", int, "bytes one batch input may hold"),
    ("batch_unsupported", str, "MODEL[,MODEL]: fail their batches as lacking Batch API support"),
    ("webhook_url", str, "POST OpenAI's signed batch.* events here"),
    ("webhook_secret", str, "whsec_... secret to sign the events with"),
    ("log_level", str, "debug, info, warning or error"),
    ("ssl_certfile", Path, "serve HTTPS with this PEM certificate (chain)"),
    ("ssl_keyfile", Path, "the private key of --ssl-certfile (PEM)"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagebatch simulator",
        description="An offline stand-in for OpenAI's Files, Batches, Images and Models APIs.",
        epilog="Each flag can also be set as IMAGEBATCH_SIM_<FLAG> (e.g. IMAGEBATCH_SIM_RATE=100).",
    )
    for name, kind, help_text in _FLAGS:
        parser.add_argument(
            "--" + name.replace("_", "-"), dest=name, type=kind, default=None, help=help_text
        )
    parser.add_argument(
        "--shutdown",
        dest="shutdown",
        action="append",
        default=None,
        metavar="MODEL=YYYY-MM-DD",
        help="announce this shutdown date for MODEL and refuse it from then on (repeatable)",
    )
    parser.add_argument(
        "--plain-images",
        dest="plain_images",
        action="store_true",
        default=None,
        help="leave the prompt out of the pictures",
    )
    return parser


def parse_config(argv: list[str] | None = None) -> SimulatorConfig:
    """The settings from the environment, overridden by the flags in ``argv``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given: dict[str, Any] = {k: v for k, v in vars(args).items() if v is not None}
    try:
        return SimulatorConfig(**given)
    except ValidationError as exc:
        problems = "; ".join(
            f"--{str(e['loc'][0]).replace('_', '-')}: {e['msg']}" if e.get("loc") else e["msg"]
            for e in exc.errors()
        )
        parser.error(problems or str(exc))
        raise  # unreachable: parser.error exits


def main(argv: list[str] | None = None) -> None:
    """Run the simulator until interrupted."""
    import uvicorn

    from simulator.app import create_app

    config = parse_config(argv)
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        app = create_app(config)
    except ConfigError as exc:
        build_parser().error(str(exc))
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        access_log=False,
        loop="uvloop",
        http="httptools",
        timeout_keep_alive=30,
        ssl_certfile=config.ssl_certfile,
        ssl_keyfile=config.ssl_keyfile,
    )
