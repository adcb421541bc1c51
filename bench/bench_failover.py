"""Redis Sentinel failover: how long writes stop, and how many acknowledged writes are lost.

A writer appends 0, 1, 2, … to a list through the service's own client
(``service.redis.client.connect_url`` on a ``redis+sentinel://`` URL), about one write a
millisecond, recording each value Redis acknowledged. Then one of three things happens to the
primary, and once the sentinels have a new primary (and a live old one has been demoted) the
writer runs on for a second and the list on the new primary is compared with what was
acknowledged:

- ``kill``: SIGKILL, as a crashed machine.
- ``switchover``: ``SENTINEL FAILOVER``, as a planned maintenance.
- ``stall``: SIGSTOP for 3 s, then SIGCONT, as a machine that hangs or is cut off and comes back.

Each under three configurations of the Redis servers:

- ``async``: one replica, Redis's defaults (asynchronous replication).
- ``min-replicas``: two replicas, ``min-replicas-to-write 1`` and ``min-replicas-max-lag 1`` on
  every server: a primary that has heard from no replica for a second refuses writes.
- ``wait``: two replicas; each write is followed by ``WAIT 1 500`` on the same connection and
  counts as acknowledged only when a replica has it. (With one replica, nothing is confirmed
  after a kill until the old primary returns: the new primary has no replica left.)

Sentinels here call a primary down after 1 s (production default 30 s). Prints, per case: the
election time (event to every sentinel naming the new primary), the longest pause between two
acknowledged writes, the acknowledged writes lost, and the load average.
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
from _support import machine

from service.redis.client import connect_url
from tests.support.sentinel import (
    MASTER,
    SentinelGroup,
    start_sentinel_group,
    wait_for_demotion,
    wait_for_new_primary,
)

MIN_REPLICAS = ("--min-replicas-to-write", "1", "--min-replicas-max-lag", "1")
CONFIGS = {
    "async": {"replicas": 1, "server_args": ()},
    "min-replicas": {"replicas": 2, "server_args": MIN_REPLICAS},
    "wait": {"replicas": 2, "server_args": ()},
}
EVENTS = ("kill", "switchover", "stall")


@dataclass
class Writer:
    client: redis.Redis
    wait: bool
    acked: list[tuple[int, float]] = field(default_factory=list)
    unconfirmed: int = 0
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            try:
                if self.wait:
                    pipe = self.client.pipeline(transaction=False)
                    pipe.rpush("seq", i)
                    pipe.execute_command("WAIT", 1, 500)
                    _, replicas = pipe.execute()
                    if int(replicas) < 1:
                        self.unconfirmed += 1
                    else:
                        self.acked.append((i, time.monotonic()))
                else:
                    self.client.rpush("seq", i)
                    self.acked.append((i, time.monotonic()))
            except redis.RedisError as exc:
                self.errors.append(f"{i}: {exc}")
            i += 1
            time.sleep(0.001)


def run_case(tmp: Path, config: str, event: str) -> dict[str, float]:
    group: SentinelGroup = start_sentinel_group(tmp, **CONFIGS[config])  # type: ignore[arg-type]
    try:
        writer = Writer(connect_url(group.url), wait=config == "wait")
        thread = threading.Thread(target=writer.run, daemon=True)
        thread.start()
        time.sleep(2)
        old = group.primary_port
        at = time.monotonic()
        if event == "kill":
            group.kill("primary")
        elif event == "switchover":
            group.sentinel().sentinel_failover(MASTER)
        else:
            os.kill(group.procs["primary"].pid, signal.SIGSTOP)
        election = wait_for_new_primary(group, old)
        if event == "stall":
            time.sleep(max(0.0, 3 - (time.monotonic() - at)))
            os.kill(group.procs["primary"].pid, signal.SIGCONT)
        if event != "kill":
            wait_for_demotion(group, old)
        time.sleep(1)
        writer.stop.set()
        thread.join(90)
        new = group.server(group.master_port())
        kept = {int(v) for v in new.lrange("seq", 0, -1)}
        acked = [i for i, _ in writer.acked]
        lost = [i for i in acked if i not in kept]
        times = [t for _, t in writer.acked]
        gap = max((b - a for a, b in itertools.pairwise(times)), default=0.0)
        rate = len(times) / (times[-1] - times[0]) if len(times) > 1 else 0.0
        return {
            "election": election,
            "gap": gap,
            "acked": len(acked),
            "lost": len(lost),
            "lost_ms": 1000 * len(lost) / rate if rate else 0.0,
            "unconfirmed": writer.unconfirmed,
            "errors": len(writer.errors),
            "rate": rate,
            "first_error": writer.errors[0] if writer.errors else "",  # type: ignore[dict-item]
        }
    finally:
        group.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1, help="runs of each case (medians shown)")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--events", default=",".join(EVENTS))
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print("sentinels: down-after-milliseconds 1000, quorum 2 of 3; writer ~1 write/ms")
    print(
        f"{'config':>13} {'event':>11} {'election':>9} {'pause':>7} {'acked':>7} "
        f"{'lost':>6} {'lost ms':>8} {'no-repl':>8} {'errors':>7} {'load':>5}"
    )
    for config in args.configs.split(","):
        for event in args.events.split(","):
            runs = []
            for n in range(args.runs):
                with tempfile.TemporaryDirectory() as tmp:
                    runs.append(run_case(Path(tmp) / f"{config}-{event}-{n}", config, event))
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "first_error"}
            print(
                f"{config:>13} {event:>11} {med['election']:>8.2f}s {med['gap']:>6.2f}s "
                f"{med['acked']:>7.0f} {med['lost']:>6.0f} {med['lost_ms']:>7.0f} "
                f"{med['unconfirmed']:>8.0f} {med['errors']:>7.0f} {os.getloadavg()[0]:>5.1f}"
            )
            for r in runs:
                if r["first_error"]:
                    print(f"{'':>26}first error: {r['first_error']}")
    print(
        "lost: acknowledged writes missing on the new primary (lost ms: at the writer's rate); "
        "no-repl: writes WAIT reported no replica had (not counted as acknowledged); "
        "errors: calls that failed after the client's retries"
    )


if __name__ == "__main__":
    main()
