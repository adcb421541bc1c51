"""The network guard: which addresses a webhook may reach, and one deadline per attempt.

Listeners are real sockets on loopback; the guard is what decides whether they are reached.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Iterator

import httpx2
import pytest

from service.redis.leases import pause
from service.webhooks.guard import (
    AddressRefused,
    GuardedTransport,
    address_problem,
    networks,
    webhook_url_problem,
)

REFUSED = [
    ("127.0.0.1", "loopback"),
    ("127.255.0.9", "loopback"),
    ("::1", "loopback"),
    ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
    ("10.0.0.8", "private"),
    ("172.16.5.4", "private"),
    ("192.168.1.1", "private"),
    ("fd00:ec2::254", "private"),  # AWS's IPv6 metadata address
    ("169.254.169.254", "link-local"),  # cloud metadata
    ("fe80::1", "link-local"),
    ("100.64.0.1", "shared"),
    ("100.100.100.200", "shared"),  # Alibaba's metadata
    ("224.0.0.251", "multicast"),
    ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("240.0.0.1", "reserved"),
    ("2002:7f00:1::1", "embeds 127.0.0.1"),  # 6to4 around loopback
    ("64:ff9b::a00:1", "reserved"),  # NAT64 around 10.0.0.1
]


@pytest.mark.parametrize(("address", "kind"), REFUSED)
def test_internal_addresses_are_refused_in_every_spelling(address: str, kind: str) -> None:
    problem = address_problem(ipaddress.ip_address(address))
    assert problem is not None and kind in problem


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses_pass(address: str) -> None:
    assert address_problem(ipaddress.ip_address(address)) is None


def test_allowed_networks_open_exactly_what_they_list() -> None:
    allowed = networks(["127.0.0.0/8", "10.20.0.0/16"])
    assert address_problem(ipaddress.ip_address("127.0.0.1"), allowed) is None
    assert address_problem(ipaddress.ip_address("::ffff:127.0.0.1"), allowed) is None
    assert address_problem(ipaddress.ip_address("10.20.3.4"), allowed) is None
    assert address_problem(ipaddress.ip_address("10.21.3.4"), allowed) is not None
    assert address_problem(ipaddress.ip_address("169.254.169.254"), allowed) is not None


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://2130706433/hook", "numeric spelling"),
        ("http://0x7f.0.0.1/hook", "numeric spelling"),
        ("http://0177.0.0.1/hook", "numeric spelling"),
        ("http://127.1/hook", "numeric spelling"),
        ("http://localhost:8080/hook", "loopback"),
        ("http://[::1]/hook", "loopback"),
        ("http://[::ffff:7f00:1]/hook", "loopback"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("https://user:pw@example.com/hook", "user name or password"),
        ("https://no-such-host.invalid/hook", "does not resolve"),
    ],
)
def test_intake_refuses_webhook_urls_that_reach_inside(url: str, fragment: str) -> None:
    problem = webhook_url_problem(url, ())
    assert problem is not None and fragment in problem, problem


def test_intake_accepts_a_loopback_receiver_the_operator_allowed() -> None:
    assert webhook_url_problem("http://127.0.0.1:9/hook", networks(["127.0.0.1/32"])) is None


@pytest.fixture
def listener() -> Iterator[tuple[int, list[bytes]]]:
    """A loopback HTTP receiver that answers 204 and records what reached it."""
    got: list[bytes] = []
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                got.append(conn.recv(65536))
                conn.sendall(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], got
    stop.set()
    thread.join()
    server.close()


def post(port: int, allowed: list[str], deadline: float = 5.0) -> tuple[int, str | None]:
    transport = GuardedTransport(networks(allowed), time.monotonic() + deadline)
    with httpx2.Client(transport=transport, trust_env=False) as client:
        resp = client.post(f"http://localhost:{port}/hook", content=b"{}")
    return resp.status_code, transport.backend.peer


def test_send_time_refuses_loopback_and_nothing_reaches_it(listener) -> None:
    port, got = listener
    with pytest.raises(AddressRefused, match="loopback"):
        post(port, [])
    # The receiver takes connections in order: if the refused attempt had connected, it would
    # be the first thing it got, before this allowed one.
    assert post(port, ["127.0.0.0/8", "::1/128"])[0] == 204
    assert len(got) == 1


def test_send_time_reaches_an_allowed_network_and_records_the_peer(listener) -> None:
    port, got = listener
    status, peer = post(port, ["127.0.0.0/8", "::1/128"])
    assert status == 204 and peer in ("127.0.0.1", "::1")
    assert got and got[0].startswith(b"POST /hook")


def test_a_trickling_receiver_is_cut_off_at_the_deadline_not_per_read() -> None:
    """One byte every 0.3 s never trips a per-read timeout; the attempt's deadline still holds."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    stop = threading.Event()

    def trickle() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok":
                if pause(stop, 0.3):  # not stop.wait(0.3): it never returns under faketime
                    return
                conn.sendall(bytes([byte]))

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    started = time.monotonic()
    with pytest.raises(httpx2.TimeoutException):
        post(port, ["127.0.0.0/8"], deadline=1.5)
    took = time.monotonic() - started
    stop.set()
    thread.join()
    server.close()
    assert 1.4 < took < 2.5, took
