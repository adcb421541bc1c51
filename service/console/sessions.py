"""Console sessions and CSRF tokens: who a browser is, and proof a form came from our page.

A session is a random cookie (``ib_console``: HttpOnly, SameSite=Lax, Path=/ui, Secure when the
console is reached over https) whose SHA-256 names a Redis hash (``keys.console_session``)
holding the tenant and the session's CSRF token; it expires after
``IMAGEBATCH_CONSOLE_SESSION_HOURS``, and signing out deletes it at once. Only the digest is in
Redis, so a copy of Redis yields no cookie anyone can use.

* With tenants configured, a browser first gets an anonymous session (no tenant) that only
  carries the CSRF token of the sign-in form; signing in with an API key replaces it by a new
  session of the key's tenant (a new cookie: a session id seen before sign-in is never trusted
  after it).
* With the API open there is no sign-in: the first page a browser opens gives it a session of
  tenant ``default``, for the CSRF token.

CSRF: every form carries the session's token in a hidden ``csrf`` field (scripts send it as the
``X-CSRF-Token`` header) and every POST is refused unless it matches, compared in constant time.
SameSite=Lax already keeps the cookie off cross-site POSTs; the token is the defence that does not
depend on the browser.

Failure semantics: Redis errors propagate (the console answers 500/503); a missing, unknown or
expired session is simply "no session".
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

import redis

from service.redis import keys

COOKIE = "ib_console"
COOKIE_PATH = "/ui"
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"
_TOKEN_BYTES = 32


@dataclass(frozen=True)
class Session:
    token: str  # the cookie value (never stored)
    tenant: str | None  # None: anonymous, before sign-in
    csrf: str

    @property
    def signed_in(self) -> bool:
        return self.tenant is not None


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Sessions:
    """Sessions in Redis, each living ``ttl_seconds`` from its creation."""

    def __init__(self, client: redis.Redis, ttl_seconds: float):
        self.r = client
        self.ttl = max(60, int(ttl_seconds))

    def create(self, tenant: str | None) -> Session:
        token = secrets.token_urlsafe(_TOKEN_BYTES)
        session = Session(token, tenant, secrets.token_urlsafe(_TOKEN_BYTES))
        key = keys.console_session(_digest(token))
        pipe = self.r.pipeline()
        pipe.hset(
            key,
            mapping={"tenant": tenant or "", "csrf": session.csrf, "created": f"{time.time():.0f}"},
        )
        pipe.expire(key, self.ttl)
        pipe.execute()
        return session

    def get(self, token: str | None) -> Session | None:
        if not token or len(token) > 128:
            return None
        raw = self.r.hmget(keys.console_session(_digest(token)), ["tenant", "csrf"])
        tenant, csrf = (v.decode() if isinstance(v, bytes) else v for v in raw)
        if not csrf:
            return None
        return Session(token, tenant or None, csrf)

    def delete(self, token: str) -> None:
        self.r.delete(keys.console_session(_digest(token)))


def csrf_ok(session: Session | None, presented: str | None) -> bool:
    """Whether ``presented`` is the session's CSRF token (constant-time)."""
    if session is None or not presented:
        return False
    return hmac.compare_digest(session.csrf.encode(), presented.encode())
