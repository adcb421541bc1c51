"""What every console page needs: the viewer (session and tenant), templates, CSRF checks,
responses with the console's security headers, and the error page.

Pages are server-rendered Jinja2 templates (``templates/``) with autoescaping; the few scripts
(``static/console.js``) only enhance what works without them. Every page answers with a strict
Content-Security-Policy (scripts, styles and images from this origin only; nothing inline runs),
``X-Frame-Options: DENY`` and ``Referrer-Policy: same-origin``.

Failure semantics: :class:`ConsoleError` becomes an HTML error page with its status;
:class:`SignInRequired` a redirect to the sign-in page (a 401 for a script's request).
"""

from __future__ import annotations

import datetime as dt
import math
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from service.console.sessions import COOKIE, COOKIE_PATH, CSRF_FIELD, CSRF_HEADER, Session, Sessions
from service.console.sessions import csrf_ok as _csrf_ok
from service.context import Context
from service.jobs.model import Job
from service.tenants import DEFAULT_TENANT_ID, Tenants

HERE = Path(__file__).parent
NONE = "\u2013"  # an en dash: how a missing figure reads
# What intake's job ids look like; anything else is not looked up (it could name another key).
_JOB_ID = re.compile(r"job_[0-9a-f]{20,40}", re.ASCII)
templates = Jinja2Templates(directory=HERE / "templates")

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class ConsoleError(Exception):
    """A page that cannot be shown; ``message`` is written for the person at the browser."""

    def __init__(self, status: int, title: str, message: str):
        super().__init__(message)
        self.status, self.title, self.message = status, title, message


class SignInRequired(Exception):
    """No signed-in session: send the browser to the sign-in page."""


def ctx_of(request: Request) -> Context:
    ctx: Context = request.app.state.ctx
    return ctx


def tenants_of(request: Request) -> Tenants:
    tenants: Tenants = request.app.state.tenants
    return tenants


def sessions_of(request: Request) -> Sessions:
    ctx = ctx_of(request)
    return Sessions(ctx.redis, ctx.settings.console_session_hours * 3600)


def session_of(request: Request) -> Session | None:
    """The browser's session, if any (cached on the request)."""
    if not hasattr(request.state, "console_session"):
        token = request.cookies.get(COOKIE)
        request.state.console_session = sessions_of(request).get(token)
    session: Session | None = request.state.console_session
    return session


def start_session(request: Request, tenant: str | None) -> Session:
    """A new session for this browser; its cookie is set on the response :func:`page` makes."""
    session = sessions_of(request).create(tenant)
    request.state.console_session = session
    request.state.new_cookie = session.token
    return session


def viewer(request: Request) -> Session:
    """The signed-in session (open API: made on first visit), or :class:`SignInRequired`."""
    session = session_of(request)
    if tenants_of(request).open:
        if session is None or session.tenant != DEFAULT_TENANT_ID:
            session = start_session(request, DEFAULT_TENANT_ID)
        return session
    if session is None or not session.signed_in:
        raise SignInRequired
    return session


def own_job(request: Request, session: Session, job_id: str) -> Job:
    """The viewer's job; another tenant's job is the same "not found" as no job at all."""
    job = ctx_of(request).store.job(job_id) if _JOB_ID.fullmatch(job_id) else None
    if job is None or job.tenant != session.tenant:
        raise ConsoleError(404, "Job not found", f"There is no job {job_id[:64]!r} here.")
    return job


def check_csrf(request: Request, session: Session | None, form: Any | None = None) -> None:
    presented = request.headers.get(CSRF_HEADER)
    if presented is None and form is not None:
        value = form.get(CSRF_FIELD)
        presented = value if isinstance(value, str) else None
    if not _csrf_ok(session, presented):
        raise ConsoleError(
            403,
            "Form refused",
            "This form did not come from a page of this console, or it has expired. "
            "Reload the page and try again.",
        )


def _secure(request: Request) -> bool:
    return request.url.scheme == "https" or ctx_of(request).settings.public_url.startswith(
        "https://"
    )


def finish(request: Request, response: Response) -> Response:
    """Add the security headers, and the cookie of a session started by this request."""
    response.headers.update(SECURITY_HEADERS)
    token = getattr(request.state, "new_cookie", None)
    if token:
        response.set_cookie(
            COOKIE,
            token,
            max_age=int(ctx_of(request).settings.console_session_hours * 3600),
            path=COOKIE_PATH,
            httponly=True,
            samesite="lax",
            secure=_secure(request),
        )
    return response


def page(request: Request, template: str, status: int = 200, **values: Any) -> Response:
    session = getattr(request.state, "console_session", None)
    values.setdefault("session", session)
    values.setdefault("tenants_open", tenants_of(request).open)
    values.setdefault("csrf", session.csrf if session else "")
    values.setdefault("nav", "")
    resp = templates.TemplateResponse(request, template, values, status_code=status)
    return finish(request, resp)


def redirect(request: Request, url: str) -> Response:
    return finish(request, RedirectResponse(url, status_code=303))


def clear_cookie(response: Response) -> Response:
    response.delete_cookie(COOKIE, path=COOKIE_PATH)
    return response


def local_path(next_url: str | None) -> str:
    """``next_url`` if it is a path of the console (never another site), else the job list."""
    if next_url and next_url.startswith("/ui/") and not next_url.startswith("/ui//"):
        return next_url
    return "/ui/"


def is_script(request: Request) -> bool:
    return request.headers.get("x-requested-with") == "console"


async def _console_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ConsoleError)
    if is_script(request):
        resp: Response = HTMLResponse(exc.message, status_code=exc.status)
        return finish(request, resp)
    return page(request, "error.html", exc.status, title=exc.title, message=exc.message)


async def _sign_in(request: Request, exc: Exception) -> Response:
    if is_script(request):
        return finish(request, HTMLResponse("Sign in again.", status_code=401))
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return redirect(request, f"/ui/sign-in?next={quote(target)}")


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ConsoleError, _console_error)
    app.add_exception_handler(SignInRequired, _sign_in)


# --- how figures read ---------------------------------------------------------------------------
def usd(value: float | int | None, digits: int | None = None) -> str:
    if value is None:
        return NONE
    if digits is None:
        digits = 2 if abs(value) >= 10 else 4 if abs(value) < 1 else 3
    return f"${value:,.{digits}f}"


def number(value: float | int | None) -> str:
    return NONE if value is None else f"{value:,.0f}"


def iso(ts: float | str | None) -> str:
    if ts is None or ts == "":
        return ""
    if isinstance(ts, str):
        return ts
    return (
        dt.datetime.fromtimestamp(ts, tz=dt.UTC)
        .isoformat(timespec="seconds")
        .replace("+00:00", "Z")
    )


def ago(when: float | str | None, now: float | None = None) -> str:
    """How long ago: "3 min ago", for a unix time or an ISO time (pages show the time itself on hover)."""
    if when is None or when == "":
        return NONE
    if isinstance(when, str):
        when = dt.datetime.fromisoformat(when.replace("Z", "+00:00")).timestamp()
    seconds = (now if now is not None else dt.datetime.now(dt.UTC).timestamp()) - when
    if seconds < 45:
        return "just now"
    for size, unit in ((86400, "day"), (3600, "h"), (60, "min")):
        if seconds >= size:
            n = math.floor(seconds / size)
            return f"{n} {unit}{'s' if unit == 'day' and n > 1 else ''} ago"
    return "just now"


def until(when: str | None, now: float | None = None) -> str:
    """How long until an ISO time: "in 12 min", for a forecast."""
    if not when:
        return NONE
    then = dt.datetime.fromisoformat(when.replace("Z", "+00:00")).timestamp()
    seconds = then - (now if now is not None else dt.datetime.now(dt.UTC).timestamp())
    if seconds < 60:
        return "in under a minute"
    for size, unit in ((86400, "day"), (3600, "h"), (60, "min")):
        if seconds >= size:
            n = math.floor(seconds / size)
            return f"in {n} {unit}{'s' if unit == 'day' and n > 1 else ''}"
    return "soon"


def percent(part: float, whole: float) -> int:
    return 0 if whole <= 0 else max(0, min(100, round(100 * part / whole)))


templates.env.filters.update(usd=usd, number=number, ago=ago, iso=iso, until=until)
templates.env.globals.update(percent=percent)
