"""Connections to Redis, made in one place from ``IMAGEBATCH_REDIS_URL``: one server, or the
primary that Redis Sentinel names.

Two forms of the URL are accepted:

- ``redis://[[user]:password@]host:6379/0`` (also ``rediss://``, ``unix://``): one server, read
  by redis-py as it reads any URL.
- ``redis+sentinel://[[user]:password@]host1:26379,host2:26379,host3:26379/mymaster/0``: the
  sentinels (port 26379 when left out), the name they monitor the primary under, and the
  database (0 when left out). The user and password are the Redis servers'; sentinels that
  require a password of their own take ``?sentinel_password=…`` (and ``sentinel_username=…``).

:func:`connect` makes the client for job state, budgets and counters; :func:`broker` gives Celery
the same place as a broker (kombu's ``sentinel://`` transport for a Sentinel URL). Nothing else
parses the URL.

Failure semantics: a malformed URL is a ``ValueError`` naming the part at fault, raised when a
process starts. With Sentinel, a call that meets a connection error (the primary gone, or demoted
to a replica) asks the sentinels for the primary again and retries with backoff for up to
:data:`FAILOVER_SECONDS`, so a failover is ridden out; after that ``redis.ConnectionError``
propagates and the caller's task retries it like any transient error. A retried call may run
twice if the reply, not the request, was lost: every state transition is guarded (Lua,
``HSETNX``, compare-and-set), so only a plain counter can be off by one. Writes the old primary
acknowledged but had not yet passed to its replica are lost in a failover (Redis replicates
asynchronously); deploy/SCALING.md says how much, and the settings that narrow it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qs, quote, unquote, urlsplit

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelManagedConnection

from service.settings import Settings

SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379
# Sentinel's default down-after-milliseconds is 30 s and an election takes a few more: calls
# keep retrying for twice that before they fail.
FAILOVER_SECONDS = 60.0
# A sentinel or primary that does not answer a connect within this is tried again (or the next
# sentinel asked); a reply slower than REPLY_TIMEOUT counts as a lost connection.
CONNECT_TIMEOUT = 2.0
REPLY_TIMEOUT = 30.0
# Celery's own publish retry policy (its default), kept for a single server.
_CELERY_PUBLISH_RETRY = {"max_retries": 3, "interval_start": 0, "interval_step": 0.2}

T = TypeVar("T")


@dataclass(frozen=True)
class SentinelTarget:
    """A ``redis+sentinel://`` URL, parsed."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None

    @property
    def sentinel_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "socket_connect_timeout": CONNECT_TIMEOUT,
            "socket_timeout": CONNECT_TIMEOUT,
            # A sentinel that does not answer is skipped for the next one at once (redis-py's
            # default retries each for seconds); the call as a whole is retried above it.
            "retry": Retry(NoBackoff(), 0),
        }
        if self.sentinel_username:
            kwargs["username"] = self.sentinel_username
        if self.sentinel_password:
            kwargs["password"] = self.sentinel_password
        return kwargs


@dataclass(frozen=True)
class Broker:
    """What Celery needs to reach the broker: its URL, transport options and publish retries."""

    url: str
    transport_options: dict[str, Any]
    publish_retry_policy: dict[str, Any]


def require_url(settings: Settings) -> str:
    if not settings.redis_url:
        raise RuntimeError(
            "IMAGEBATCH_REDIS_URL is not set; run `imagebatch up` for the embedded Redis, "
            "or point IMAGEBATCH_REDIS_URL at your Redis (redis://host:6379/0, or "
            "redis+sentinel://host1:26379,host2:26379,host3:26379/mymaster/0)"
        )
    return settings.redis_url


def parse_sentinel(url: str) -> SentinelTarget | None:
    """The Sentinel parts of ``url``; None when it names a single server."""
    if not url.startswith(f"{SCHEME}://"):
        return None
    parts = urlsplit(url)
    where = f"IMAGEBATCH_REDIS_URL ({SCHEME}://…)"
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    sentinels = tuple(_host_port(h, where) for h in hosts.split(",") if h)
    if not sentinels:
        raise ValueError(f"{where}: no sentinel address; expected host1:26379,host2:26379,…")
    path = [unquote(p) for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ValueError(
            f"{where}: the path must be /MASTER_NAME or /MASTER_NAME/DB, got {parts.path!r}"
        )
    db = path[1] if len(path) == 2 else "0"
    if not db.isdigit():
        raise ValueError(f"{where}: the database must be a number, got {db!r}")
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    unknown = set(query) - {"sentinel_username", "sentinel_password"}
    if unknown:
        raise ValueError(
            f"{where}: unknown parameter(s) {sorted(unknown)}; "
            "only sentinel_username and sentinel_password are read"
        )
    return SentinelTarget(
        sentinels=sentinels,
        master=path[0],
        db=int(db),
        username=unquote(username) or None,
        password=unquote(password) or None,
        sentinel_username=query.get("sentinel_username") or None,
        sentinel_password=query.get("sentinel_password") or None,
    )


def _host_port(text: str, where: str) -> tuple[str, int]:
    if text.startswith("["):  # [v6]:port
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    if not host or (port and not port.isdigit()):
        raise ValueError(f"{where}: bad sentinel address {text!r}; expected host:port")
    return host, int(port) if port else SENTINEL_PORT


class FailoverRetry(Retry):
    """Retry connection errors with backoff until ``seconds`` have passed, however many tries.

    redis-py counts tries, and uses one retry object both for a command and for the connect
    inside it: with a count, a primary that stays down costs tries x tries. A deadline bounds
    the whole call (the inner connect gives up by then too). A ``NOREPLICAS`` refusal (the
    primary runs with ``min-replicas-to-write`` and has lost its replicas, as an old primary
    does once a new one is elected) is retried the same way: the write did not happen, and the
    retry reconnects to whichever server the sentinels name.
    """

    def __init__(self, seconds: float = FAILOVER_SECONDS):
        super().__init__(ExponentialBackoff(cap=1.0, base=0.05), retries=-1)
        self.seconds = seconds

    def call_with_retry(
        self,
        do: Callable[[], T],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        deadline = time.monotonic() + self.seconds
        failures = 0
        retried: tuple[type[Exception], ...] = (*self._supported_errors, redis.ResponseError)
        while True:
            try:
                return do()
            except retried as error:
                if isinstance(error, redis.ResponseError) and not _no_replicas(error):
                    raise
                if is_retryable and not is_retryable(error):
                    raise
                failures += 1
                if with_failure_count:
                    fail(error, failures)
                else:
                    fail(error)
                delay = self._backoff.compute(failures)
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)


def _no_replicas(error: Exception) -> bool:
    return str(error).startswith("NOREPLICAS")


class PrimaryConnection(SentinelManagedConnection):
    """A connection to Sentinel's primary that asks for its address on every reconnect.

    redis-py's own reconnects a connection that dropped mid-command to the address it had
    (redis/redis-py#3874): a call that lost the old primary kept retrying it after the
    sentinels had elected a new one, until its deadline (measured: stuck 5 s of 5 in two runs
    of three). Asking on each socket open costs one ``SENTINEL MASTERS`` per new connection.
    """

    def _connect(self) -> Any:
        if self.connection_pool.is_master:
            self.host, self.port = self.connection_pool.get_master_address()
        return super()._connect()


def connect(settings: Settings) -> redis.Redis:
    """The Redis client for state, budgets and counters: the one server, or Sentinel's primary."""
    return connect_url(require_url(settings))


def connect_url(url: str, failover_seconds: float = FAILOVER_SECONDS) -> redis.Redis:
    target = parse_sentinel(url)
    if target is None:
        return redis.Redis.from_url(url, health_check_interval=30, socket_keepalive=True)
    sentinel = Sentinel(
        list(target.sentinels),
        sentinel_kwargs=target.sentinel_kwargs,
        socket_connect_timeout=CONNECT_TIMEOUT,
        socket_timeout=REPLY_TIMEOUT,
        socket_keepalive=True,
        health_check_interval=30,
    )
    return sentinel.master_for(
        target.master,
        connection_class=PrimaryConnection,
        db=target.db,
        username=target.username,
        password=target.password,
        retry=FailoverRetry(failover_seconds),
    )


def broker(url: str) -> Broker:
    """Celery's broker for ``IMAGEBATCH_REDIS_URL`` (the ``visibility_timeout`` is the caller's).

    With Sentinel: kombu's ``sentinel://`` transport, one ``sentinel://host:port/db`` per sentinel
    joined by ``;``, the master's name and the sentinels' credentials as transport options, and
    publishing that retries through a failover instead of failing after Celery's 0.6 s.
    """
    target = parse_sentinel(url)
    if target is None:
        return Broker(url, {}, dict(_CELERY_PUBLISH_RETRY))
    auth = ""
    if target.username or target.password:
        auth = f"{quote(target.username or '', safe='')}:{quote(target.password or '', safe='')}@"
    hosts = [f"[{h}]" if ":" in h else h for h, _ in target.sentinels]
    kombu_url = ";".join(
        f"sentinel://{auth}{host}:{port}/{target.db}"
        for host, (_, port) in zip(hosts, target.sentinels, strict=True)
    )
    options = {"master_name": target.master, "sentinel_kwargs": target.sentinel_kwargs}
    retry = {
        "max_retries": int(FAILOVER_SECONDS),
        "interval_start": 0,
        "interval_step": 0.5,
        "interval_max": 1.0,
    }
    return Broker(kombu_url, options, retry)
