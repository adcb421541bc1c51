"""OpenAI's batch webhooks from the simulator: every terminal event, signed, retried, delivered.

The receiver is a real HTTP server in the test process. It checks every attempt with the official
SDK's verifier (``client.webhooks.unwrap``), answers 500 to the first attempt at each event when
asked to, and looks the batch up through the SDK when the event arrives, as the service will.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import openai
import pytest

from simulator.cli import parse_config
from tests.simulator.conftest import TERMINAL, gen_line, submit, wait_status
from tests.support.procs import free_port, wait_until
from tests.support.simulator import SimulatorHandle


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


class Receiver:
    """A webhook endpoint on 127.0.0.1 that verifies and records what it is sent."""

    def __init__(self, secret: str, fail_first: int = 0, port: int = 0) -> None:
        self.secret = secret
        self.fail_first = fail_first
        self.verifier = openai.OpenAI(api_key="sk-unused", base_url="http://127.0.0.1:9/v1")
        self.clients: list[openai.OpenAI] = []
        self.lock = threading.Lock()
        # One entry per attempt: (headers, body, verified event or None, batch status seen).
        self.attempts: list[tuple[dict[str, str], bytes, Any, str | None]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                status = receiver.take(dict(self.headers.items()), body)
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/openai"

    def take(self, headers: dict[str, str], body: bytes) -> int:
        headers = {k.lower(): v for k, v in headers.items()}
        try:
            event = self.verifier.webhooks.unwrap(body, headers, secret=self.secret)
        except openai.InvalidWebhookSignatureError:
            event = None
        seen = self.batch_status(event.data.id) if event is not None else None
        with self.lock:
            self.attempts.append((headers, body, event, seen))
            tries = sum(1 for h, *_ in self.attempts if h["webhook-id"] == headers["webhook-id"])
        if event is None:
            return 400
        return 500 if tries <= self.fail_first else 200

    def batch_status(self, batch_id: str) -> str | None:
        for client in self.clients:
            try:
                return client.batches.retrieve(batch_id).status
            except openai.NotFoundError:
                continue
        return None

    def delivered(self) -> dict[str, Any]:
        """Batch id -> the verified event of the attempt answered 200."""
        out: dict[str, Any] = {}
        with self.lock:
            tries: Counter[str] = Counter()
            for headers, _, event, _ in self.attempts:
                tries[headers["webhook-id"]] += 1
                if event is not None and tries[headers["webhook-id"]] > self.fail_first:
                    out[event.data.id] = event
        return out

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.verifier.close()


@pytest.fixture
def receivers() -> Any:
    made: list[Receiver] = []

    def make(secret: str, **kw: Any) -> Receiver:
        r = Receiver(secret, **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.stop()


def webhook_stats(sim: SimulatorHandle) -> dict[str, Any]:
    stats: dict[str, Any] = sim.stats()["webhooks"]
    return stats


def test_every_terminal_event_is_signed_retried_after_a_500_and_delivered(make_sim, receivers):
    secret = new_secret()
    hooks = receivers(secret, fail_first=1)
    flags = {"webhook_url": hooks.url, "webhook_secret": secret}
    fast = make_sim(**flags)
    # Batches here sit in `validating` for a minute and expire after 3 s: one is cancelled as
    # soon as it exists, the other expires.
    slow = make_sim(validate_seconds=60, completion_window=3, **flags)
    fast_client, slow_client = fast.client(max_retries=0), slow.client(max_retries=0)
    hooks.clients = [fast_client, slow_client]

    completed = submit(fast_client, [gen_line("a")]).id
    failed = submit(fast_client, [gen_line("b", model="gpt-image-2.5-flare")]).id
    cancelled = submit(slow_client, [gen_line("d")]).id
    slow_client.batches.cancel(cancelled)
    expired = submit(slow_client, [gen_line("c")]).id
    expected = {
        completed: "batch.completed",
        failed: "batch.failed",
        expired: "batch.expired",
        cancelled: "batch.cancelled",
    }

    delivered = wait_until(
        lambda: (d := hooks.delivered()).keys() == expected.keys() and d,
        timeout=60,
        message="an event for each of the four batches",
    )
    for sim in (fast, slow):
        wait_until(
            lambda s=sim: webhook_stats(s)["pending"] == 0, message="nothing left to deliver"
        )

    for batch_id, event in delivered.items():
        assert event.type == expected[batch_id]
        assert event.id.startswith("evt_") and event.object == "event"
        client = fast_client if batch_id in (completed, failed) else slow_client
        batch = client.batches.retrieve(batch_id)
        assert batch.status == expected[batch_id].removeprefix("batch.")
        ended = getattr(batch, f"{batch.status}_at")
        assert event.created_at == ended

    with hooks.lock:
        attempts = list(hooks.attempts)
    # Signed on every attempt, and only by this secret.
    assert all(event is not None for _, _, event, _ in attempts)
    headers, body, _, _ = attempts[0]
    with pytest.raises(openai.InvalidWebhookSignatureError):
        hooks.verifier.webhooks.unwrap(body, headers, secret=new_secret())
    assert json.loads(body).keys() == {"id", "object", "type", "created_at", "data"}
    assert headers["webhook-signature"].startswith("v1,")
    assert headers["webhook-id"].startswith("wh_")
    # Each event was tried twice (a 500, then a 200), under one webhook-id with the same body.
    by_id: dict[str, list[bytes]] = {}
    for h, b, _, _ in attempts:
        by_id.setdefault(h["webhook-id"], []).append(b)
    assert len(by_id) == 4
    assert all(len(bodies) == 2 and bodies[0] == bodies[1] for bodies in by_id.values())
    # The batch was already in its final state whenever an event reached the receiver.
    assert all(seen in TERMINAL for *_, seen in attempts)

    assert webhook_stats(fast) == {
        "enabled": True,
        "url": hooks.url,
        "events": 2,
        "by_type": {
            "batch.completed": 1,
            "batch.failed": 1,
            "batch.expired": 0,
            "batch.cancelled": 0,
        },
        "attempts": 4,
        "delivered": 2,
        "failed_attempts": 2,
        "abandoned": 0,
        "pending": 0,
    }
    slow_stats = webhook_stats(slow)
    assert slow_stats["by_type"] == {
        "batch.completed": 0,
        "batch.failed": 0,
        "batch.expired": 1,
        "batch.cancelled": 1,
    }
    assert (slow_stats["attempts"], slow_stats["delivered"]) == (4, 2)


def test_events_wait_for_a_receiver_that_is_not_there_yet(make_sim, receivers):
    secret = new_secret()
    port = free_port()
    sim = make_sim(webhook_url=f"http://127.0.0.1:{port}/hooks", webhook_secret=secret)
    client = sim.client(max_retries=0)
    # Nothing listens: the batch still runs to the end; its event keeps being retried.
    batch = wait_status(client, submit(client, [gen_line("a")]).id)
    assert batch.status == "completed"
    wait_until(
        lambda: webhook_stats(sim)["failed_attempts"] >= 2,
        message="connection errors to be retried",
    )
    stats = webhook_stats(sim)
    assert (stats["events"], stats["delivered"], stats["pending"]) == (1, 0, 1)

    hooks = receivers(secret, port=port)
    hooks.clients = [client]
    delivered = wait_until(hooks.delivered, timeout=90, message="the retried event")
    assert list(delivered) == [batch.id]
    assert delivered[batch.id].type == "batch.completed"
    wait_until(lambda: webhook_stats(sim)["delivered"] == 1, message="the delivery to count")
    assert webhook_stats(sim)["pending"] == 0


def test_without_a_webhook_url_nothing_is_sent(sim, client):
    assert wait_status(client, submit(client, [gen_line("a")]).id).status == "completed"
    stats = sim.stats()["webhooks"]
    assert stats["enabled"] is False and stats["events"] == 0 and stats["url"] is None


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--webhook-url", "http://127.0.0.1:1/h"], "set together"),
        (["--webhook-secret", new_secret()], "set together"),
        (["--webhook-url", "ftp://x/h", "--webhook-secret", new_secret()], "--webhook-url"),
        (["--webhook-url", "http://x/h", "--webhook-secret", "secret"], "--webhook-secret"),
        (["--webhook-url", "http://x/h", "--webhook-secret", "whsec_!!"], "--webhook-secret"),
    ],
)
def test_webhook_flags_come_in_pairs_and_the_secret_is_whsec(capsys, argv, fragment):
    with pytest.raises(SystemExit):
        parse_config(argv)
    err = capsys.readouterr().err
    assert fragment in err
    assert "whsec_!!" not in err  # a secret is never echoed


def test_webhook_settings_have_env_twins(monkeypatch):
    secret = new_secret()
    monkeypatch.setenv("IMAGEBATCH_SIM_WEBHOOK_URL", "http://127.0.0.1:8000/v1/webhooks/openai")
    monkeypatch.setenv("IMAGEBATCH_SIM_WEBHOOK_SECRET", secret)
    config = parse_config([])
    assert config.webhook_url == "http://127.0.0.1:8000/v1/webhooks/openai"
    assert config.webhook_secret is not None
    assert config.webhook_secret.get_secret_value() == secret
