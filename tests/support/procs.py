"""Real processes for tests: free ports, waiting on conditions, servers started and stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from service.cli.stack import redis_server_binary

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    condition: Callable[[], T | None],
    timeout: float = 30.0,
    interval: float = 0.05,
    message: str = "condition",
) -> T:
    """Return the first truthy value of ``condition()``, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # the condition may raise until the thing exists
            last_exc = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {message}") from last_exc
        time.sleep(interval)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


class Proc:
    """A child process with its output in a log file, stopped on :meth:`stop`."""

    def __init__(
        self,
        args: Sequence[str],
        log: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ):
        self.args = list(args)
        self.log_path = log
        self._log = log.open("ab")
        full_env = {**os.environ, **(env or {})}
        self.popen = subprocess.Popen(
            self.args,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (a Celery worker's children too)."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.alive():
            self.kill(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.popen.wait(5)
        self._log.close()
        return self.popen.returncode


def start_server(
    args: Sequence[str],
    port: int,
    log: Path,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
    **kw: Any,
) -> Proc:
    """Start a server and wait until its port accepts connections."""
    proc = Proc(args, log, env=env, **kw)

    def up() -> bool:
        if not proc.alive():
            raise RuntimeError(f"{args[0]} exited early:\n{proc.log_text()[-3000:]}")
        return port_open(port)

    wait_until(up, timeout=timeout, message=f"{' '.join(args[:3])} on port {port}")
    return proc


def start_redis(tmp: Path, *, port: int | None = None, aof: bool = False) -> tuple[Proc, str]:
    """A Redis server with its files under ``tmp``; ``aof=True`` keeps an append-only file there
    (as ``imagebatch up`` does), so a server killed -9 and started again on the same ``port``
    and directory comes back with its data."""
    port = port or free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    proc = start_server(
        [
            redis_server_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes" if aof else "no",
            "--dir",
            str(tmp),
        ],
        port,
        tmp / "redis.log",
    )
    return proc, f"redis://127.0.0.1:{port}/0"


def start_moto(tmp: Path) -> tuple[Proc, str]:
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    proc = start_server(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        port,
        tmp / "moto.log",
    )
    return proc, f"http://127.0.0.1:{port}"
