"""Shared by the benchmarks: real processes on free ports, and a results line for RESULTS.md."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.procs import Proc, free_port, start_moto, start_redis, start_server, wait_until  # noqa: E402
from tests.support.simulator import SimulatorHandle, start_simulator  # noqa: E402

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


def start_api(tmp: Path, redis_url: str) -> tuple[Proc, int]:
    """The API alone (uvicorn), on local storage and an upstream nobody calls."""
    port = free_port()
    env = {
        "IMAGEBATCH_REDIS_URL": redis_url,
        "IMAGEBATCH_STORAGE_URL": (tmp / "storage").as_uri(),
        "IMAGEBATCH_DATA_DIR": str(tmp),
        "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
        "OPENAI_API_KEY": "sk-bench",
        "IMAGEBATCH_LOG_LEVEL": "warning",
    }
    cmd = [sys.executable, "-m", "service.cli", "api", "--port", str(port)]
    return start_server(cmd, port, tmp / "api.log", env=env), port


def start_instant_simulator(tmp: Path, **flags: object) -> SimulatorHandle:
    """A simulator that finishes batches at once (validation, lines and finalizing)."""
    return start_simulator(
        tmp, **{"rate": 100_000, "validate_seconds": 0, "finalize_seconds": 0, **flags}
    )
