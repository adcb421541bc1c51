"""Graceful handover: a worker that is shutting down stops its long loops between units of work.

When a worker is asked to stop (SIGTERM to its main process: a Kubernetes scale-down, a rolling
update, ``docker stop``), :func:`request` is called in every process that runs tasks (the worker
tells its pool processes with :data:`SIGNAL`). Loops that can stop between units (collect between
output lines, a sync slice between items) check :func:`requested`; when it is set they finish
the unit in hand, save where they were, release their lease and raise :class:`Handover`. The
task adapter (``workers/base.py``) then sends the same task again, so another worker resumes it
within seconds instead of after the lease's expiry.

The flag is per process and is never cleared: a process asked to hand over is about to exit.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

# What a worker's main process sends its pool processes when it begins to shut down. Not SIGTERM
# (billiard terminates pool processes with it) nor SIGUSR1 (billiard's soft time limit).
SIGNAL = signal.SIGUSR2

_asked = threading.Event()


class Handover(Exception):
    """A task stopped early because its worker is shutting down; it should be sent again.

    Raised only after the task saved its progress and released its lease, so the next worker to
    run it starts where this one stopped.
    """

    def __init__(self, what: str):
        super().__init__(f"{what}: handed over (the worker is shutting down)")
        self.what = what


def request() -> None:
    """Ask every loop in this process to stop at its next unit boundary."""
    _asked.set()


def requested() -> bool:
    """True once this process was asked to hand its work over."""
    return _asked.is_set()


def event() -> threading.Event:
    """The flag itself, for waits that should end early on handover (``leases.pause``)."""
    return _asked


def reset() -> None:
    """Forget a request (a fresh pool process, and tests)."""
    _asked.clear()


def install_signal() -> None:
    """In a pool process: :data:`SIGNAL` from the worker's main process asks for a handover."""

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        request()

    signal.signal(SIGNAL, on_signal)
