"""Shared by the benchmarks: real processes on free ports, and a results line for RESULTS.md."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.context import Context
    from service.jobs.model import Chunk
    from service.upstream import Batch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.procs import Proc, free_port, start_moto, start_redis, start_server, wait_until  # noqa: E402
from tests.support.simulator import SimulatorHandle, start_simulator  # noqa: E402

__all__ = [
    "ROOT",
    "Proc",
    "ended_chunk",
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


def ended_chunk(
    ctx: Context, n: int, labels: dict[str, str] | None = None
) -> tuple[str, int, Batch]:
    """A job of ``n`` generations, accepted, planned into one chunk, submitted and ended
    upstream: ready to collect. Returns (job id, chunk number, the upstream batch)."""
    import orjson

    from service.jobs import intake
    from service.jobs.model import CHUNK_COLLECTING
    from service.jobs.spec import parse_job_json
    from service.lanes import plan, submit, sweep

    body = {
        "model": ctx.catalog.default_model,
        "defaults": {"size": "1024x1024", "quality": "low"},
        "items": [{"id": f"sku-{i}", "prompt": f"Product photo {i}"} for i in range(n)],
        "labels": labels or {},
        "reuse": "never",  # measured: the generation path, never a copy of an earlier run
    }
    spec = parse_job_json(orjson.dumps(body), ctx.catalog, max_items=n)
    job_id = intake.submit(ctx, spec, "default").job.id
    (number,) = plan.plan_job(ctx, job_id)
    assert submit.submit_chunk(ctx, job_id, number) == "submitted"

    def ended() -> Chunk | None:
        sweep.sweep(ctx)
        chunk = ctx.store.chunk(job_id, number)
        return chunk if chunk and chunk.status == CHUNK_COLLECTING and chunk.batch_id else None

    chunk = wait_until(ended, timeout=1800, interval=0.5, message="the upstream batch to finish")
    return job_id, number, ctx.upstream.batch(str(chunk.batch_id))
