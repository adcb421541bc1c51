"""Shared by the benchmarks: real processes on free ports, and a results line for RESULTS.md."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.procs import Proc, free_port, start_moto, start_redis, start_server, wait_until  # noqa: E402

__all__ = [
    "ROOT",
    "Proc",
    "free_port",
    "machine",
    "start_moto",
    "start_redis",
    "start_server",
    "wait_until",
]


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"
