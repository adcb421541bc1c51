"""A narrow workaround in kombu's Redis transport, so a Redis restart never kills a worker.

The failure (kombu 5.x with Celery 5.7's connection-loss handling): Redis goes away while the
worker's consumer channel is in a ``BRPOP`` (``Channel._in_poll``) and holds unacknowledged
deliveries (an ``acks_late`` task is running). On the connection error Celery calls
``Connection.collect()``: closing the channel fails in ``_brpop_read`` with a connection error
(swallowed), so the channel stays open, and then the transport is detached from its connection
(``transport.client = None``). Celery then calls ``Connection.close()``: the channel's close now
disconnects its pools and restores the unacked deliveries, which needs a new pool, whose
parameters are read from ``transport.client.hostname``: ``AttributeError: 'NoneType' object has
no attribute 'hostname'``. That is not a connection error, so nothing swallows it: "Unrecoverable
error", and the worker process exits with status 0. The same class of failure upstream:
https://github.com/celery/kombu/issues/582 (the same AttributeError from ``_connparams`` when a
channel outlives its connection) and https://github.com/celery/kombu/issues/970 (restoring
unacked messages as a channel closes).

The workaround: a channel whose transport was detached raises a Redis ``ConnectionError`` when
it needs a new connection. That is what it is (there is nothing to connect through), and every
caller in kombu and Celery already treats a connection error on close as "ignore and reconnect".
The unacked deliveries stay in Redis's unacked hash, restored by kombu after the visibility
timeout; our tasks are idempotent and the sweep re-sends lost work long before that.

Applied once, at import (``workers.app`` imports this module), and only to the one method.
"""

from __future__ import annotations

import functools
from typing import Any

import redis
from kombu.transport import redis as kombu_redis

_ORIGINAL = kombu_redis.Channel._connparams


@functools.wraps(_ORIGINAL)
def _connparams(self: Any, asynchronous: bool = False) -> Any:
    if getattr(self.connection, "client", None) is None:
        raise redis.ConnectionError(
            "this broker channel's connection was closed (Redis went away); it will reconnect"
        )
    return _ORIGINAL(self, asynchronous=asynchronous)


def apply() -> None:
    """Install the workaround (idempotent)."""
    if kombu_redis.Channel._connparams is not _connparams:
        kombu_redis.Channel._connparams = _connparams  # type: ignore[method-assign]


apply()
