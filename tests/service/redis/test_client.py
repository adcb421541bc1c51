"""The one place IMAGEBATCH_REDIS_URL is read: both URL forms parsed (and bad ones refused by
name), Celery's broker made from them, and a client on real sentinels that rides out a
failover."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from kombu import Connection

from service import queues
from service.redis.client import (
    FailoverRetry,
    SentinelTarget,
    broker,
    connect,
    connect_url,
    parse_sentinel,
)
from service.settings import Settings
from tests.support.sentinel import (
    MASTER,
    SentinelGroup,
    sentinel_command,
    sentinel_required,
    start_sentinel_group,
    wait_for_demotion,
    wait_for_new_primary,
)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "redis+sentinel://10.0.0.1:26379,10.0.0.2:26380,sentinel-c/mymaster/3",
            SentinelTarget(
                (("10.0.0.1", 26379), ("10.0.0.2", 26380), ("sentinel-c", 26379)), "mymaster", 3
            ),
        ),
        (
            "redis+sentinel://:s%40cret@a:1,b:2/prod",
            SentinelTarget((("a", 1), ("b", 2)), "prod", 0, password="s@cret"),
        ),
        (
            "redis+sentinel://app:pw@[::1]:26379/m/0?sentinel_password=sp",
            SentinelTarget(
                (("::1", 26379),), "m", 0, username="app", password="pw", sentinel_password="sp"
            ),
        ),
    ],
)
def test_sentinel_urls_are_parsed(url: str, expected: SentinelTarget) -> None:
    assert parse_sentinel(url) == expected


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6379/0", "rediss://h:6380/1", "unix:///run/redis.sock"]
)
def test_single_server_urls_are_left_to_redis_py(url: str) -> None:
    assert parse_sentinel(url) is None
    assert broker(url).url == url
    assert broker(url).transport_options == {}


@pytest.mark.parametrize(
    ("url", "names"),
    [
        ("redis+sentinel:///mymaster/0", "no sentinel address"),
        ("redis+sentinel://a:26379", "/MASTER_NAME"),
        ("redis+sentinel://a:26379/m/0/extra", "/MASTER_NAME"),
        ("redis+sentinel://a:26379/m/zero", "database must be a number"),
        ("redis+sentinel://a:port/m", "bad sentinel address 'a:port'"),
        ("redis+sentinel://a/m?password=x", "unknown parameter(s) ['password']"),
    ],
)
def test_a_bad_sentinel_url_is_refused_naming_the_part(url: str, names: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_sentinel(url)
    assert "IMAGEBATCH_REDIS_URL" in str(err.value) and names in str(err.value)


def test_an_unset_url_says_how_to_set_either_form() -> None:
    with pytest.raises(RuntimeError, match="redis\\+sentinel://"):
        connect(Settings(redis_url=None))


def test_the_broker_for_sentinel_is_kombus_sentinel_transport() -> None:
    target = broker("redis+sentinel://:p%3Aw@h1:26379,h2:26380/prod/2?sentinel_password=sp")
    assert target.url == "sentinel://:p%3Aw@h1:26379/2;sentinel://:p%3Aw@h2:26380/2"
    assert target.transport_options["master_name"] == "prod"
    assert target.transport_options["sentinel_kwargs"]["password"] == "sp"
    # Publishing waits out a failover: Celery's default gives up after about 0.6 s.
    policy = target.publish_retry_policy
    waited = sum(
        min(policy["interval_start"] + i * policy["interval_step"], policy["interval_max"])
        for i in range(policy["max_retries"])
    )
    assert waited >= 30
    # kombu reads the same URL back: every sentinel, the password and the database.
    conn = Connection(target.url, transport_options=target.transport_options)
    assert conn.transport_cls == "sentinel"
    assert conn.alt == target.url.split(";")
    assert (conn.password, conn.virtual_host) == ("p:w", "2")


def test_the_retry_deadline_bounds_a_call_however_many_tries() -> None:
    retry = FailoverRetry(0.5)
    calls = []

    def down() -> None:
        calls.append(time.monotonic())
        raise redis.ConnectionError("refused")

    start = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        retry.call_with_retry(down, lambda _: None)
    assert time.monotonic() - start < 1.5
    assert len(calls) >= 3


# --- on real sentinels ------------------------------------------------------------------------


@pytest.fixture
def group(tmp_path: Path) -> Iterator[SentinelGroup]:
    if sentinel_command() is None:
        if sentinel_required():
            pytest.fail("redis-sentinel is required under CI (Debian's redis-sentinel package)")
        pytest.skip("redis-sentinel is not installed")
    group = start_sentinel_group(tmp_path)
    yield group
    group.stop()


def test_the_client_writes_to_the_primary_and_follows_a_failover(group: SentinelGroup) -> None:
    client = connect(Settings(redis_url=group.url))
    client.set("probe", "before")
    assert group.server(group.primary_port).get("probe") == b"before"
    with pytest.raises(redis.ReadOnlyError):
        group.server(group.replica_port).set("probe", "x")

    # Writes run on while the sentinels move the primary; none of them fails.
    stop = threading.Event()
    written: list[int] = []
    errors: list[Exception] = []

    def writer() -> None:
        i = 0
        while not stop.is_set():
            try:
                client.rpush("seq", i)
                written.append(i)
                i += 1
            except Exception as exc:  # the test's point: there must be none
                errors.append(exc)
                return
            time.sleep(0.005)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert wait_until_more(written, 30)
        before = len(written)
        group.sentinel().sentinel_failover(MASTER)
        wait_for_new_primary(group, group.primary_port)
        # The client learns of the move when the old primary, demoted, refuses a write.
        wait_for_demotion(group, group.primary_port)
        assert wait_until_more(written, len(written) + 20)
    finally:
        stop.set()
        thread.join(10)
    assert not errors, errors
    new = group.server(group.replica_port)
    assert new.info("replication")["role"] == "master"
    assert new.get("probe") == b"before"
    # What was written before the failover and since the client moved is on the new primary,
    # in order. Writes the old primary took between the election and its demotion are not:
    # Sentinel does not pause clients (bench/bench_failover.py measures how many).
    kept = [int(v) for v in new.lrange("seq", 0, -1)]
    assert kept[:before] == written[:before]
    assert kept[-20:] == written[-20:]
    assert kept == sorted(set(kept)) and set(kept) <= set(written)


def wait_until_more(values: list[int], n: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while len(values) < n:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_write_cut_off_by_a_killed_primary_goes_to_the_new_one(group: SentinelGroup) -> None:
    client = connect(Settings(redis_url=group.url))
    stop = threading.Event()
    written: list[int] = []

    def writer() -> None:
        i = 0
        while not stop.is_set():
            client.rpush("seq", i)
            written.append(i)
            i += 1
            time.sleep(0.002)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert wait_until_more(written, 50)
        group.kill("primary")
        wait_for_new_primary(group, group.primary_port)
        # Within seconds of the election, not at the retry deadline (a minute): redis-py alone
        # reconnects a call cut off mid-command to the dead primary's address until then.
        assert wait_until_more(written, len(written) + 50, timeout=10)
    finally:
        stop.set()
        thread.join(70)
    kept = [int(v) for v in group.server(group.replica_port).lrange("seq", 0, -1)]
    assert kept[-50:] == written[-50:]


def test_the_producer_enqueues_on_the_primary_across_a_failover(group: SentinelGroup) -> None:
    app = queues.producer(group.url)
    queues.Enqueuer(app)(queues.SWEEP)
    assert group.server(group.primary_port).llen(queues.CONTROL) == 1
    group.sentinel().sentinel_failover(MASTER)
    wait_for_new_primary(group, group.primary_port)
    wait_for_demotion(group, group.primary_port)
    queues.Enqueuer(app)(queues.SWEEP)
    assert group.server(group.replica_port).llen(queues.CONTROL) == 2


def test_with_every_sentinel_gone_a_call_fails_within_its_deadline(group: SentinelGroup) -> None:
    client = connect_url(group.url, failover_seconds=1.0)
    client.ping()
    for i in range(3):
        group.kill(f"sentinel{i}")
    group.kill("primary")
    start = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        client.set("k", "v")
    # About failover_seconds, not tries x tries of it.
    assert time.monotonic() - start < 5
