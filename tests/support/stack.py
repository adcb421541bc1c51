"""The whole imagebatch stack as real processes, for end-to-end tests.

API under uvicorn, Celery workers (prefork, real broker on the test Redis), beat, the simulator
over HTTP, and local or S3 (moto) storage. Each piece can be killed and restarted.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import httpx2
import orjson

from tests.support.procs import Proc, free_port, start_server, wait_until

FINAL = {"succeeded", "partially_failed", "failed", "cancelled", "budget_exhausted"}


class Stack:
    def __init__(
        self,
        tmp: Path,
        redis_url: str,
        upstream_url: str,
        *,
        storage_url: str | None = None,
        env: dict[str, str] | None = None,
    ):
        self.tmp = tmp
        self.api_port = free_port()
        self.env = {
            "IMAGEBATCH_REDIS_URL": redis_url,
            "IMAGEBATCH_DATA_DIR": str(tmp / "data"),
            "IMAGEBATCH_STORAGE_URL": storage_url or (tmp / "storage").as_uri(),
            "IMAGEBATCH_API_PORT": str(self.api_port),
            "IMAGEBATCH_PUBLIC_URL": f"http://127.0.0.1:{self.api_port}",
            "IMAGEBATCH_POLL_SECONDS": "0.3",
            "IMAGEBATCH_LOG_LEVEL": "info",
            "OPENAI_BASE_URL": upstream_url,
            "OPENAI_API_KEY": "sk-test",
            **(env or {}),
        }
        self.procs: dict[str, Proc] = {}
        self._n = 0
        # Sent with every request of client(): e.g. {"Authorization": "Bearer <key>"} to act as a
        # tenant when the stack has a tenants file.
        self.headers: dict[str, str] = {}

    # --- processes ----------------------------------------------------------------------------
    def _exe(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "service.cli", *args]

    def start_api(self) -> Proc:
        proc = start_server(
            self._exe("api", "--host", "127.0.0.1", "--port", str(self.api_port)),
            self.api_port,
            self.tmp / "api.log",
            env=self.env,
            timeout=60,
        )
        self.procs["api"] = proc
        return proc

    def start_worker(
        self,
        queues: str = "control,collect,sync,webhooks",
        concurrency: int = 2,
        name: str | None = None,
    ) -> Proc:
        self._n += 1
        name = name or f"w{self._n}"
        proc = Proc(
            self._exe(
                "worker", "--queues", queues, "--concurrency", str(concurrency), "--name", name
            ),
            self.tmp / f"worker-{name}.log",
            env=self.env,
        )
        wait_until(
            lambda: "ready." in proc.log_text() or (not proc.alive() and _raise(proc)),
            timeout=60,
            message=f"worker {name} ready",
        )
        self.procs[name] = proc
        return proc

    def start_beat(self) -> Proc:
        proc = Proc(self._exe("beat"), self.tmp / "beat.log", env=self.env)
        self.procs["beat"] = proc
        return proc

    def start(self, workers: int = 1) -> Stack:
        self.start_api()
        for _ in range(workers):
            self.start_worker()
        self.start_beat()
        return self

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop()
        self.procs.clear()

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name)
        proc.kill(sig)
        proc.popen.wait(30)

    # --- the API ------------------------------------------------------------------------------
    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def client(self, headers: dict[str, str] | None = None, **kw: Any) -> httpx2.Client:
        """A client of the API with the stack's headers, plus ``headers`` (they win)."""
        return httpx2.Client(
            base_url=self.api, timeout=60, headers={**self.headers, **(headers or {})}, **kw
        )

    def submit(self, body: dict[str, Any], **headers: str) -> dict[str, Any]:
        with self.client() as c:
            resp = c.post(
                "/v1/jobs",
                content=orjson.dumps(body),
                headers={"Content-Type": "application/json", **headers},
            )
        assert resp.status_code == 202, resp.text
        return resp.json()  # type: ignore[no-any-return]

    def job(self, job_id: str) -> dict[str, Any]:
        with self.client() as c:
            resp = c.get(f"/v1/jobs/{job_id}")
        assert resp.status_code == 200, resp.text
        return resp.json()  # type: ignore[no-any-return]

    def wait_job(
        self, job_id: str, timeout: float = 120, statuses: set[str] = FINAL
    ) -> dict[str, Any]:
        return wait_until(
            lambda: (j := self.job(job_id))["status"] in statuses and j,
            timeout=timeout,
            interval=0.2,
            message=f"job {job_id} to reach {sorted(statuses)}",
        )

    def manifest(self, job_id: str) -> list[dict[str, Any]]:
        with self.client() as c:
            resp = c.get(f"/v1/jobs/{job_id}/manifest")
        assert resp.status_code == 200, resp.text
        return [orjson.loads(line) for line in resp.content.splitlines() if line.strip()]

    def logs(self) -> str:
        out = []
        for path in sorted(self.tmp.glob("*.log")):
            out.append(f"==== {path.name}\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(out)


def _raise(proc: Proc) -> bool:
    raise RuntimeError(f"process exited early:\n{proc.log_text()[-3000:]}")


def job_body(
    n: int,
    *,
    size: str = "1024x1024",
    quality: str = "low",
    fmt: str = "png",
    prefix: str = "sku",
    prompt: str = "Studio photo of product {i} on white",
    **extra: Any,
) -> dict[str, Any]:
    return {
        "model": "gpt-image-2",
        "defaults": {"size": size, "quality": quality, "output_format": fmt},
        "items": [{"id": f"{prefix}-{i}", "prompt": prompt.format(i=i)} for i in range(n)],
        **extra,
    }
