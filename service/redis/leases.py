"""Leases and markers: who may do a step now, and what was done recently.

A :class:`Lease` is a lock that expires unless its holder renews it (``SET NX PX`` with a
token): a worker killed while holding one blocks the guarded step only until the lease lapses,
never for good. A marker (:func:`mark_once`) is a plain ``SET NX PX``: "this was done within the
last N seconds", so a sweep does not enqueue the same task again while one is queued.

Failure semantics: Redis errors propagate to the caller (its task retries); a lease whose holder
stalls past its expiry is lost, and :meth:`Lease.refresh` says so with :class:`LeaseLost`.

A holder knows at once when its lease may be gone: :attr:`Lease.lost` turns true (and stays so)
when a renewal finds another holder, when the keeper thread of :meth:`Lease.held` meets a Redis
error, or simply when the last renewal that succeeded is older than the lease (the holder was
paused, or the keeper is stuck), whichever comes first. :meth:`Lease.ensure` raises
:class:`LeaseLost` then; steps with effects outside Redis (an upstream batch create) call it
right before acting, and write their results with a compare-and-set on the lease's token.
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
        # Monotonic time until which the lease is surely ours: the send time of the last call
        # that set or renewed it, plus the lease (Redis counts from when it received the call).
        self.valid_until = 0.0
        self._lost = threading.Event()
        self._refresh = lua.script(client, "lease_refresh")
        self._drop = lua.script(client, "lease_drop")

    def acquire(self) -> bool:
        sent = self.last = time.monotonic()
        got = bool(self.r.set(self.key, self.token, nx=True, px=self.ms))
        if got:
            self.valid_until = sent + self.ms / 1000
            self._lost.clear()
        return got

    def refresh(self, force: bool = False) -> None:
        """Renew (at most every quarter of the lease); raise LeaseLost if someone else has it."""
        if force or time.monotonic() - self.last > self.ms / 4000:
            sent = self.last = time.monotonic()
            if not self._refresh(keys=[self.key], args=[self.token, self.ms]):
                self._lost.set()
                raise LeaseLost(f"lease {self.key} was lost")
            self.valid_until = sent + self.ms / 1000

    @property
    def lost(self) -> bool:
        """True once this holder can no longer be sure it holds the lease (it never goes back)."""
        if not self._lost.is_set() and time.monotonic() >= self.valid_until:
            self._lost.set()
        return self._lost.is_set()

    def ensure(self) -> None:
        """Raise :class:`LeaseLost` unless the lease is surely still ours."""
        if self.lost:
            raise LeaseLost(f"lease {self.key} may have passed to another holder")

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
                    # Unsure we hold it any more: tell the holder (``lost``), never just stop.
                    self._lost.set()
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
