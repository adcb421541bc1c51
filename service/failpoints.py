"""Failpoints: named places in the batch path, the sync lane, finalize and webhooks where a test
(or an operator rehearsing a failure) can make the process die, pause or fail on purpose.

Every state transition calls ``failpoint("<name>")``. Unless ``IMAGEBATCH_FAILPOINTS`` names
it, that call does nothing and costs about one function call (``bench/bench_failpoints.py``
measures it). :data:`REGISTRY` lists every name with what has just happened there;
``imagebatch failpoints`` prints the names, one per line.

``IMAGEBATCH_FAILPOINTS`` is a comma list of ``name=action``:

``kill``
    SIGKILL this process (no cleanup, as a crash or the OOM killer would).
``sleep:N``
    the calling thread sleeps N seconds (other threads, a lease keeper's too, go on).
``stop:N``
    the whole process is frozen for N seconds (SIGSTOP, then a helper sends SIGCONT): no thread
    runs, so a lease it holds lapses, as when a machine or VM is paused.
``raise``
    raise :class:`FailpointError`, a transient error (a task retries it).

``@n`` after the action fires on the n-th time this process reaches the point (default the
first). A failpoint fires once per stack: before it acts it takes a marker in Redis
(``SET NX``), so the process restarted after a kill, or another worker, goes on past it. A
``*`` at the end (``collect.line=raise@2*``) fires on every hit from the n-th on, in every
process, without a marker. Example: ``plan.chunk_planned=kill,submit.batch_created=stop:40``.

Failure semantics: the marker is taken before the action; if Redis cannot be reached the
failpoint does not fire (it says so in the log) rather than fire again after a restart.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import NamedTuple

import redis

from service.errors import TransientError
from service.redis import keys

log = logging.getLogger("imagebatch.failpoints")

# How long a fired failpoint's marker is kept: longer than any drill, short enough not to linger.
MARKER_SECONDS = 7 * 24 * 3600


class Failpoint(NamedTuple):
    name: str
    description: str


# Every failpoint, in the order a job meets them; each name is used by exactly one call in the
# code (tests/service/test_failpoints.py checks both ways).
REGISTRY: tuple[Failpoint, ...] = (
    Failpoint("plan.chunk_assembled", "a chunk is recorded with its items, still assembling"),
    Failpoint("plan.chunk_planned", "a chunk is planned and waiting; its submit is not queued"),
    Failpoint("plan.chunk_queued", "a chunk's submit is queued"),
    Failpoint("submit.budget_reserved", "a chunk's budgets are reserved; nothing uploaded"),
    Failpoint("submit.input_uploaded", "a chunk's input file is uploaded; its id not recorded"),
    Failpoint("submit.create_started", "create_started is recorded; the batch is not created"),
    Failpoint("submit.batch_created", "the upstream batch exists; its id is not recorded"),
    Failpoint("submit.batch_recorded", "the batch id is recorded; the chunk is not submitted"),
    Failpoint("submit.chunk_submitted", "the chunk is submitted and on the active set"),
    Failpoint("sweep.pass", "a sweep holds its lock; nothing polled yet"),
    Failpoint("sweep.batch_ended", "a chunk whose batch ended is collecting; collect not queued"),
    Failpoint("collect.started", "a collect holds the chunk's lease; nothing read"),
    Failpoint("collect.line", "an output line is read; its images are not stored"),
    Failpoint("collect.image_stored", "a line's images are stored; its usage is not recorded"),
    Failpoint("collect.usage_recorded", "a line's usage is recorded: the item is succeeded"),
    Failpoint("collect.checkpoint", "the collect cursor is saved: lines before it are done"),
    Failpoint("collect.output_done", "the output file is read; errors and missing lines not"),
    Failpoint("collect.chunk_done", "the chunk is done; its budgets not released, nothing next"),
    Failpoint("finalize.before_status", "the manifest is written; the final status is not"),
    Failpoint("finalize.after_status", "the final status is written; the webhook not scheduled"),
    Failpoint("sync.before_request", "a sync item's money is held; the request is not sent"),
    Failpoint("sync.image_stored", "a sync item's image is stored; its usage is not recorded"),
    Failpoint("sync.usage_recorded", "a sync item's usage is recorded; its spend not settled"),
    Failpoint("webhook.before_record", "a webhook attempt was made; it is not recorded"),
    Failpoint("webhook.after_record", "a webhook attempt is recorded"),
)
NAMES = frozenset(fp.name for fp in REGISTRY)
ACTIONS = ("kill", "sleep", "stop", "raise")

_SPEC = re.compile(
    r"^(?P<action>kill|raise|sleep:(?P<sleep>\d+(?:\.\d+)?)|stop:(?P<stop>\d+(?:\.\d+)?))"
    r"(?:@(?P<nth>[1-9]\d*))?(?P<every>\*)?$"
)


class FailpointError(TransientError):
    """Raised by a failpoint whose action is ``raise``: a transient failure, on purpose."""


@dataclass(frozen=True)
class Spec:
    """What one armed failpoint does."""

    action: str  # kill, sleep, stop or raise
    seconds: float = 0.0
    nth: int = 1
    every: bool = False


def parse(text: str | None) -> dict[str, Spec]:
    """``name=action[@n][*],...`` into specs; ValueError naming the part that is wrong."""
    specs: dict[str, Spec] = {}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, action = (s.strip() for s in part.partition("="))
        if name not in NAMES:
            raise ValueError(f"{part!r}: no failpoint named {name!r} (imagebatch failpoints)")
        m = _SPEC.match(action) if sep else None
        if m is None:
            raise ValueError(
                f"{part!r}: the action must be kill, raise, sleep:SECONDS or stop:SECONDS, "
                "optionally followed by @N and *"
            )
        kind = m["action"].partition(":")[0]
        specs[name] = Spec(
            action=kind,
            seconds=float(m["sleep"] or m["stop"] or 0),
            nth=int(m["nth"] or 1),
            every=bool(m["every"]),
        )
    return specs


# The armed failpoints of this process: empty unless IMAGEBATCH_FAILPOINTS names some.
_armed: dict[str, Spec] = {}
_client: redis.Redis | None = None
_hits: dict[str, int] = {}
_lock = threading.Lock()


def arm(text: str | None, client: redis.Redis | None) -> None:
    """Arm this process's failpoints (``text`` as in ``IMAGEBATCH_FAILPOINTS``; empty disarms).

    ``client`` holds the once-per-stack markers. Called when a process builds its context.
    """
    global _client
    specs = parse(text)
    with _lock:
        _hits.clear()
        _client = client
        _armed.clear()
        _armed.update(specs)
    if specs:
        log.warning("failpoints armed: %s", ", ".join(sorted(specs)))


def failpoint(name: str) -> None:
    """Mark a state transition; acts only if ``name`` is armed (see the module's docstring)."""
    if _armed:
        _hit(name)


def _hit(name: str) -> None:
    spec = _armed.get(name)
    if spec is None:
        return
    with _lock:
        count = _hits[name] = _hits.get(name, 0) + 1
    if count < spec.nth or (count > spec.nth and not spec.every):
        return
    if not spec.every and not _take_marker(name):
        return
    _act(name, spec)


def _take_marker(name: str) -> bool:
    """True when this process is the first in the stack to fire ``name``."""
    if _client is None:
        return True
    try:
        return bool(
            _client.set(keys.failpoint_fired(name), os.getpid(), nx=True, ex=MARKER_SECONDS)
        )
    except redis.RedisError as exc:
        log.warning("failpoint %s not fired: its marker could not be taken (%s)", name, exc)
        return False


def fired(client: redis.Redis, name: str) -> bool:
    """Whether ``name`` fired in the stack on ``client`` (its marker is there)."""
    return bool(client.exists(keys.failpoint_fired(name)))


def _act(name: str, spec: Spec) -> None:
    pid = os.getpid()
    log.warning("failpoint %s: %s (pid %d)", name, _describe(spec), pid)
    if spec.action == "kill":
        os.kill(pid, signal.SIGKILL)
        time.sleep(60)  # the signal is on its way; nothing after the failpoint may run
    elif spec.action == "sleep":
        time.sleep(spec.seconds)
    elif spec.action == "stop":
        _freeze(pid, spec.seconds)
    else:
        raise FailpointError(f"failpoint {name}: a failure on purpose")


def _freeze(pid: int, seconds: float) -> None:
    """Stop the whole process; a detached helper continues it after ``seconds``."""
    subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, signal, sys, time; time.sleep(float(sys.argv[1])); "
            "os.kill(int(sys.argv[2]), signal.SIGCONT)",
            str(seconds),
            str(pid),
        ],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.kill(pid, signal.SIGSTOP)


def _describe(spec: Spec) -> str:
    what = f"{spec.action}:{spec.seconds:g}" if spec.action in ("sleep", "stop") else spec.action
    return f"{what} (hit {spec.nth}{' and every one after' if spec.every else ''})"
