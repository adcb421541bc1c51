"""Leases and markers: who may do a step now, and what was done recently.

A :class:`Lease` is a lock that expires unless its holder renews it (``SET NX PX`` with a
token): a worker killed while holding one blocks the guarded step only until the lease lapses,
never for good. A marker (:func:`mark_once`) is a plain ``SET NX PX``: "this was done within the
last N seconds", so a sweep does not enqueue the same task again while one is queued.

Failure semantics: Redis errors propagate to the caller (its task retries); a lease whose holder
stalls past its expiry is lost, and :meth:`Lease.refresh` says so with :class:`LeaseLost`.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator

import redis

from service.redis import lua


class LeaseLost(RuntimeError):
    """Another worker holds this lease now (this holder stalled past its expiry)."""


class Lease:
    """A lock that expires unless its holder renews it.

    :meth:`refresh` renews on progress (a stalled holder loses the lease, so a hung collect is
    handed to another worker); :meth:`held` renews from a background thread for steps whose
    progress cannot be observed (one long upload).
    """

    def __init__(self, client: redis.Redis, key: str, seconds: float):
        self.r, self.key = client, key
        self.token = uuid.uuid4().hex
        self.ms = max(1, int(seconds * 1000))
        self.last = 0.0
        self._refresh = lua.script(client, "lease_refresh")
        self._drop = lua.script(client, "lease_drop")

    def acquire(self) -> bool:
        self.last = time.monotonic()
        return bool(self.r.set(self.key, self.token, nx=True, px=self.ms))

    def refresh(self, force: bool = False) -> None:
        """Renew (at most every quarter of the lease); raise LeaseLost if someone else has it."""
        if force or time.monotonic() - self.last > self.ms / 4000:
            self.last = time.monotonic()
            if not self._refresh(keys=[self.key], args=[self.token, self.ms]):
                raise LeaseLost(f"lease {self.key} was lost")

    def release(self) -> None:
        self._drop(keys=[self.key], args=[self.token])

    @contextlib.contextmanager
    def held(self) -> Iterator[bool]:
        """Yield whether the lease was taken; while held, a thread renews it."""
        if not self.acquire():
            yield False
            return
        stop = threading.Event()

        def keep() -> None:
            while not pause(stop, self.ms / 3000):
                try:
                    self.refresh(force=True)
                except (LeaseLost, redis.RedisError):
                    return

        keeper = threading.Thread(target=keep, name=f"lease:{self.key}", daemon=True)
        keeper.start()
        try:
            yield True
        finally:
            stop.set()
            keeper.join()
            self.release()


def pause(stop: threading.Event, seconds: float, step: float = 0.1) -> bool:
    """Wait ``seconds``, or less if ``stop`` is set; True when stopped.

    Sleeps in short steps instead of ``stop.wait(seconds)``: a timed wait on a condition takes an
    absolute deadline on the monotonic clock, which clock-shifting tools (libfaketime, used to run
    the tests with the clock a year ahead) turn into a wait that never ends.
    """
    deadline = time.monotonic() + seconds
    while not stop.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(step, left))
    return True


def mark_once(client: redis.Redis, key: str, seconds: float) -> bool:
    """Set the marker ``key`` for ``seconds`` unless it is set; True when this call set it."""
    return bool(client.set(key, "1", nx=True, px=max(1, int(seconds * 1000))))


def unmark(client: redis.Redis, key: str) -> None:
    client.delete(key)
