"""Signing in with an API key, and out."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.console import web
from service.tenants import AuthError

router = APIRouter()


@router.get("/sign-in")
def sign_in_form(request: Request, next: str | None = None) -> Response:
    if web.tenants_of(request).open:
        return web.redirect(request, "/ui/")
    session = web.session_of(request)
    if session is not None and session.signed_in:
        return web.redirect(request, web.local_path(next))
    if session is None:
        web.start_session(request, None)  # anonymous: it only carries the form's CSRF token
    return web.page(request, "sign_in.html", next=web.local_path(next))


@router.post("/sign-in")
async def sign_in(request: Request) -> Response:
    form = await request.form()
    session = web.session_of(request)
    web.check_csrf(request, session, form)
    next_url = web.local_path(str(form.get("next") or ""))
    key = str(form.get("key") or "").strip()
    try:
        tenant = web.tenants_of(request).authenticate(f"Bearer {key}" if key else None)
    except AuthError:
        return web.page(
            request,
            "sign_in.html",
            401,
            next=next_url,
            error="That key was not accepted. Check it and try again.",
        )
    sessions = web.sessions_of(request)
    if session is not None:
        sessions.delete(session.token)
    web.start_session(request, tenant.id)
    return web.redirect(request, next_url)


@router.post("/sign-out")
async def sign_out(request: Request) -> Response:
    form = await request.form()
    session = web.session_of(request)
    web.check_csrf(request, session, form)
    if session is not None:
        web.sessions_of(request).delete(session.token)
    target = "/ui/" if web.tenants_of(request).open else "/ui/sign-in"
    return web.clear_cookie(web.finish(request, web.RedirectResponse(target, status_code=303)))
