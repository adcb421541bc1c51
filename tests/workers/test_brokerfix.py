"""kombu's Redis transport after Redis went away mid-poll: closing the channel must raise a
connection error (which kombu and Celery swallow and reconnect after), never AttributeError
(which kills the worker). A real Redis server, killed."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Queue

from tests.support.procs import start_redis


def _orphaned_channel(tmp_path: Path) -> tuple[Connection, object]:
    """A consumer channel holding an unacked delivery, its Redis killed, and its transport
    detached from the connection: the state Celery's ``collect()`` leaves after a failed BRPOP."""
    proc, url = start_redis(tmp_path / "redis")
    conn = Connection(url)
    queue = Queue("t", Exchange("t"), "t")
    with conn.Producer() as producer:
        producer.publish({"a": 1}, exchange=queue.exchange, routing_key="t", declare=[queue])
    got: list[object] = []
    channel = conn.default_channel
    Consumer(channel, [queue], callbacks=[lambda _b, m: got.append(m)], accept=["json"]).consume()
    conn.drain_events(timeout=5)
    assert got and channel.qos._delivered  # a running acks_late task's message
    proc.kill()
    proc.popen.wait(10)
    proc.stop()
    channel._disconnect_pools()  # what the failed first close did
    channel.connection.client = None  # what Connection._do_close_transport() does
    return conn, channel


def test_closing_a_channel_whose_connection_went_away_is_a_connection_error(tmp_path) -> None:
    import workers.brokerfix  # noqa: F401  (what workers.app imports)

    conn, channel = _orphaned_channel(tmp_path)
    with pytest.raises(redis.ConnectionError):
        channel.close()
    # And so Connection.close(), which Celery calls next, goes through: the worker lives on.
    conn.maybe_close_channel(channel)


def test_without_the_workaround_kombu_raises_attribute_error(tmp_path, monkeypatch) -> None:
    from kombu.transport import redis as kombu_redis

    from workers import brokerfix

    monkeypatch.setattr(kombu_redis.Channel, "_connparams", brokerfix._ORIGINAL)
    _, channel = _orphaned_channel(tmp_path)
    with pytest.raises(AttributeError, match="hostname"):
        channel.close()


def test_the_worker_app_installs_it() -> None:
    from kombu.transport import redis as kombu_redis

    import workers.app  # noqa: F401
    from workers import brokerfix

    assert kombu_redis.Channel._connparams is brokerfix._connparams
