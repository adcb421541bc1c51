"""The OpenAI simulator as a real process for tests and benchmarks.

``start_simulator(tmp, rate=2000, validate_seconds=0)`` runs ``python -m simulator`` on a free
port with its data under ``tmp`` and returns a :class:`SimulatorHandle`; flags are the
:class:`simulator.config.SimulatorConfig` field names (``moderation_words="forbidden"``,
``plain_images=True``). The process is stopped with :meth:`SimulatorHandle.stop`; a restart on the
same data directory (:meth:`SimulatorHandle.restart`) keeps its files and batches.
:class:`OtherClient` is another client of the same organization spending from the sync limits.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx2
import openai

from tests.support.procs import Proc, free_port, start_server


def _flag_args(flags: dict[str, Any]) -> list[str]:
    args: list[str] = []
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            if value:
                args.append(flag)
            continue
        args += [flag, str(value)]
    return args


class SimulatorHandle:
    """A running simulator: its URLs, an SDK client, its stats, and stop/restart."""

    def __init__(self, data_dir: Path, flags: dict[str, Any], port: int | None = None) -> None:
        self.data_dir = data_dir
        self.flags = dict(flags)
        self.port = port or free_port()
        scheme = "https" if flags.get("ssl_certfile") else "http"
        self.root = f"{scheme}://127.0.0.1:{self.port}"
        self.url = f"{self.root}/v1"
        self.api_key: str | None = flags.get("api_key")
        self.proc: Proc | None = None

    def start(self) -> SimulatorHandle:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            sys.executable,
            "-m",
            "simulator",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            *_flag_args(self.flags),
        ]
        # The process must not pick up a developer's IMAGEBATCH_SIM_* settings by accident.
        env = {"IMAGEBATCH_SIM_API_KEY": ""}
        self.proc = start_server(args, self.port, self.data_dir / "simulator.log", env=env)
        return self

    def client(self, **kw: Any) -> openai.OpenAI:
        """The official SDK pointed at this simulator (its key, unless ``api_key`` is given)."""
        kw.setdefault("api_key", self.api_key or "sk-simulator")
        kw.setdefault("base_url", self.url)
        return openai.OpenAI(**kw)

    def async_client(self, **kw: Any) -> openai.AsyncOpenAI:
        kw.setdefault("api_key", self.api_key or "sk-simulator")
        kw.setdefault("base_url", self.url)
        return openai.AsyncOpenAI(**kw)

    def stats(self) -> dict[str, Any]:
        """``GET /_simulator/stats``: what the simulator billed (shape in ``simulator.stats``)."""
        resp = httpx2.get(f"{self.root}/_simulator/stats", timeout=10)
        resp.raise_for_status()
        data: dict[str, Any] = resp.json()
        return data

    def reset(self) -> dict[str, Any]:
        resp = httpx2.post(f"{self.root}/_simulator/reset", timeout=10)
        resp.raise_for_status()
        data: dict[str, Any] = resp.json()
        return data

    def log_text(self) -> str:
        return self.proc.log_text() if self.proc else ""

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        code = self.proc.stop()
        self.proc = None
        return code

    def kill(self) -> None:
        """Kill -9: no shutdown, as a crash would."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.popen.wait(10)
            self.proc.stop()
            self.proc = None

    def restart(self) -> SimulatorHandle:
        """Stop (if running) and start again on the same port and data directory."""
        self.stop()
        return self.start()


def start_simulator(tmp_path: Path, **flags: Any) -> SimulatorHandle:
    """Start ``python -m simulator`` on a free port with its data under ``tmp_path``."""
    return SimulatorHandle(Path(tmp_path), flags).start()


def start_instant_simulator(tmp_path: Path, **flags: Any) -> SimulatorHandle:
    """A simulator whose batches validate and finalize at once and whose rate is no constraint,
    for tests of our own steps (``flags`` add to or override those)."""
    return start_simulator(
        tmp_path, **{"rate": 2000, "validate_seconds": 0, "finalize_seconds": 0, **flags}
    )


class OtherClient:
    """Another client of the same organization, spending from the simulator's sync limits: one
    image request on ``model`` every ``1 / per_second`` seconds on a fixed schedule, from a few
    threads (so a slow answer does not slow the schedule), through the SDK with no retries (a
    refused request is counted and skipped)."""

    def __init__(
        self, sim: SimulatorHandle, per_second: float, model: str = "gpt-image-2-2026-04-21"
    ):
        self.client = sim.client(max_retries=0)
        self.model = model
        self.interval = 1 / per_second
        self.sent = self.refused = 0
        self._lock = threading.Lock()
        self._next = 0.0
        self._stop = threading.Event()
        threads = 1 + int(per_second // 4)
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def start(self) -> OtherClient:
        self._next = time.monotonic()
        for thread in self._threads:
            thread.start()
        return self

    def _slot(self) -> float:
        with self._lock:
            at, self._next = self._next, self._next + self.interval
            return at

    def _run(self) -> None:
        while not self._stop.is_set():
            at = self._slot()
            # Sleep steps, not Event.wait(timeout): that can hang under libfaketime.
            while not self._stop.is_set() and time.monotonic() < at:
                time.sleep(min(0.02, max(0.0, at - time.monotonic())))
            if self._stop.is_set():
                return
            try:
                self.client.images.generate(model=self.model, prompt="theirs", quality="low")
                refused = 0
            except openai.RateLimitError:
                refused = 1
            with self._lock:
                self.sent += 1
                self.refused += refused

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        self.client.close()
