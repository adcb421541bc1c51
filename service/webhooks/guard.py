"""The network guard: which addresses a webhook may reach, checked at intake and at send time.

A webhook URL is the caller's choice, and the service sends to it from inside the operator's
network, so a URL must never reach what only the service can reach: loopback, private,
link-local (cloud metadata at 169.254.169.254), shared (100.64.0.0/10), multicast, reserved or
unspecified addresses, in any spelling (IPv4-mapped and IPv4-embedding IPv6, numeric hosts such
as ``2130706433`` or ``0x7f.1``). Networks listed in ``IMAGEBATCH_WEBHOOK_ALLOWED_NETWORKS``
are the exception, for receivers the operator runs inside.

The check is made twice. At intake the host is resolved and every address it resolves to must be
allowed (:func:`webhook_url_problem`, a 422). At send time :class:`GuardedTransport` resolves the
host again, refuses the request if any address is not allowed, connects to a checked address
itself (so a DNS answer that changes between check and connect gains nothing) and checks the
peer address of the socket it got. Proxies from the environment are never used (they would
hide the real destination) and redirects are never followed.

:class:`GuardedTransport` also holds a whole-attempt deadline: every connect, TLS handshake,
write and read gets the time left, not a fresh timeout, so a receiver trickling one byte at a
time cannot hold a worker longer than the deadline.

Failure semantics: :class:`AddressRefused` (not an httpx error) when the destination is not
allowed; httpcore's ``ConnectTimeout`` / ``ReadTimeout`` / ``WriteTimeout`` (surfacing as httpx2
timeouts) when the deadline passes.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any
from urllib.parse import urlsplit

import httpcore2
import httpx2

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# IPv6 prefixes that embed an IPv4 address in their low 32 bits (RFC 6052 NAT64).
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SHARED = ipaddress.ip_network("100.64.0.0/10")
# A label of a numeric host spelling: decimal, octal (leading 0) or hex (0x).
_NUMERIC_LABEL_RE = re.compile(r"(0x[0-9a-f]*|[0-9]+)\Z", re.IGNORECASE)

# DNS lookups run here so a slow resolver cannot outlast an attempt's deadline.
_RESOLVER = ThreadPoolExecutor(max_workers=4, thread_name_prefix="imagebatch-dns")


class AddressRefused(Exception):
    """The destination resolves to an address webhooks may not reach; says which and why."""


def networks(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    """Parsed ``IMAGEBATCH_WEBHOOK_ALLOWED_NETWORKS`` entries (validated by Settings)."""
    return tuple(ipaddress.ip_network(c.strip(), strict=False) for c in cidrs if c.strip())


def _embedded_v4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    found = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    if ip in _NAT64:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    # ::a.b.c.d (IPv4-compatible, deprecated but still routed by some stacks)
    if int(ip) >> 32 == 0 and int(ip) > 1:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def address_problem(ip: IPAddress, allowed: Sequence[IPNetwork] = ()) -> str | None:
    """Why a webhook may not be sent to ``ip``, or None."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip.version == net.version and ip in net for net in allowed):
        return None
    kind = _kind(ip)
    if kind is None and isinstance(ip, ipaddress.IPv6Address):
        for inner in _embedded_v4(ip):
            inner_kind = _kind(inner)
            if inner_kind is not None:
                return f"{ip} embeds {inner}, a {inner_kind} address"
    if kind is None:
        return None
    article = "an" if kind[0] in "aeiou" else "a"
    return f"{ip} is {article} {kind} address (allow it with IMAGEBATCH_WEBHOOK_ALLOWED_NETWORKS)"


def _kind(ip: IPAddress) -> str | None:
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED:
        return "shared (carrier-grade NAT)"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private:
        return "private"
    if not ip.is_global:
        return "non-public"
    return None


def host_problem(host: str) -> str | None:
    """Why ``host`` is not a plain DNS name or IP literal (numeric tricks), or None."""
    labels = host.rstrip(".").split(".")
    if all(_NUMERIC_LABEL_RE.match(label) for label in labels):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return f"host {host!r} is a numeric spelling; write an IPv4 address as a.b.c.d"
    return None


def resolve(host: str, port: int, timeout: float) -> list[IPAddress]:
    """Every address ``host`` resolves to (an IP literal resolves to itself)."""
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    future = _RESOLVER.submit(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
    try:
        infos = future.result(timeout=max(timeout, 0.01))
    except FutureTimeout:
        raise httpcore2.ConnectTimeout(f"resolving {host} took too long") from None
    out: list[IPAddress] = []
    for info in infos:
        # The scope id of a link-local IPv6 answer ("fe80::1%eth0") is not part of the address.
        addr = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if addr not in out:
            out.append(addr)
    return out


def check_addresses(
    host: str, addresses: Sequence[IPAddress], allowed: Sequence[IPNetwork]
) -> None:
    """Raise :class:`AddressRefused` unless every address of ``host`` is allowed."""
    if not addresses:
        raise AddressRefused(f"{host} resolves to no address")
    for addr in addresses:
        problem = address_problem(addr, allowed)
        if problem is not None:
            raise AddressRefused(problem if host.strip("[]") == str(addr) else f"{host}: {problem}")


def webhook_url_problem(
    url: str, allowed: Sequence[IPNetwork], *, timeout: float = 5.0
) -> str | None:
    """Why a webhook may not be sent to ``url`` (already a well-formed http(s) URL), or None.

    Resolves the host: a name that does not resolve, or resolves to any address that is not
    allowed, is refused.
    """
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        return "the URL must not carry a user name or password"
    host = parts.hostname or ""
    problem = host_problem(host)
    if problem:
        return problem
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        addresses = resolve(host, port, timeout)
    except (OSError, httpcore2.ConnectTimeout) as exc:
        return f"host {host!r} does not resolve ({exc})"
    try:
        check_addresses(host, addresses, allowed)
    except AddressRefused as exc:
        return f"webhooks may not be sent there: {exc}"
    return None


class _DeadlineStream(httpcore2.NetworkStream):
    """A socket stream whose every operation gets only the time left before the deadline."""

    def __init__(self, inner: httpcore2.NetworkStream, deadline: float) -> None:
        self._inner, self._deadline = inner, deadline

    def _left(self, timeout: float | None, exc: type[Exception]) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise exc("the webhook attempt ran out of time")
        return left if timeout is None else min(timeout, left)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._left(timeout, httpcore2.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._left(timeout, httpcore2.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore2.NetworkStream:
        left = self._left(timeout, httpcore2.ConnectTimeout)
        return _DeadlineStream(
            self._inner.start_tls(ssl_context, server_hostname, left), self._deadline
        )

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _GuardedBackend(httpcore2.SyncBackend):
    """Resolves, checks and connects to a checked address itself; records where it connected."""

    def __init__(self, allowed: Sequence[IPNetwork], deadline: float) -> None:
        self.allowed, self.deadline = allowed, deadline
        self.peer: str | None = None

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.NetworkStream:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise httpcore2.ConnectTimeout("the webhook attempt ran out of time")
        addresses = resolve(host, port, left)
        check_addresses(host, addresses, self.allowed)
        last: Exception | None = None
        for addr in addresses:
            left = self.deadline - time.monotonic()
            if left <= 0:
                break
            try:
                stream = super().connect_tcp(str(addr), port, min(timeout or left, left))
            except httpcore2.ConnectError as exc:
                last = exc
                continue
            sock = stream.get_extra_info("socket")
            peer = ipaddress.ip_address(sock.getpeername()[0].split("%", 1)[0])
            problem = address_problem(peer, self.allowed)
            if problem is not None:
                stream.close()
                raise AddressRefused(f"connected to {host} at {problem}")
            self.peer = str(peer)
            return _DeadlineStream(stream, self.deadline)
        if last is not None:
            raise last
        raise httpcore2.ConnectTimeout("the webhook attempt ran out of time")


class GuardedTransport(httpx2.HTTPTransport):
    """An httpx2 transport for one webhook attempt: guarded addresses, one deadline, no proxy."""

    def __init__(self, allowed: Sequence[IPNetwork], deadline: float) -> None:
        super().__init__(trust_env=False)
        self.backend = _GuardedBackend(allowed, deadline)
        # httpx2's transport takes no network backend, so its pool is rebuilt around ours; one
        # connection, never kept alive, because each attempt has a transport of its own.
        self._pool = httpcore2.ConnectionPool(
            ssl_context=httpx2.create_ssl_context(trust_env=False),
            max_connections=1,
            max_keepalive_connections=0,
            network_backend=self.backend,
        )
