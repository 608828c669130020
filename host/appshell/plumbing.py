"""The app shell's request plumbing: the session, tenant and CSRF gate, error pages, and
the security headers of every answer (the shell's pages, the widgets' documents, errors)."""
from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable, Final, Mapping

import aiohttp_jinja2
from aiohttp import web

from host.appshell import sessions
from host.console.plumbing import wants_html
from host.console.sessions import csrf_ok
from host.keys import APP_CALL, APP_COOKIE, APP_PATH, CSRF_HEADER, REQ_TENANT
from host.runtime import RUNTIME, HostRuntime
from host.tenancy import check_servable
from router.errors import Forbidden, PayloadTooLarge, TenantFleetError, Unauthorized, ValidationFailed
from router.models import TenantRecord

log = logging.getLogger("tenantfleet.appshell")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
APP_SESSION: Final[web.RequestKey[sessions.AppSession]] = web.RequestKey("tenantfleet_app_session")
APP_TENANT: Final[web.RequestKey[TenantRecord]] = web.RequestKey("tenantfleet_app_tenant")
# routes (by their canonical form, never the raw path) that need no session
PUBLIC: Final = frozenset({f"{APP_PATH}/login", f"{APP_PATH}/static"})
# routes that need the session and its CSRF token but not its tenant servable: signing out
# works while the tenant is suspended (or not ready), as the error page's button promises
ANY_TENANT_STATE: Final = frozenset({f"{APP_PATH}/logout"})
WIDGETS: Final = f"{APP_PATH}/widgets/"
CALLS: Final = f"{APP_PATH}{APP_CALL}/"
SHELL_HEADERS: Final = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "frame-src 'self'; connect-src 'self'; frame-ancestors 'none'; form-action 'self'; "
                               "base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
# A widget's document (and its script and style): sandboxed on an opaque origin even when
# opened directly, this host's script and style only, no connection anywhere (its data
# comes through the bridge), framed by this host's pages only.
WIDGET_HEADERS: Final = {
    "Content-Security-Policy": "sandbox allow-scripts; default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; frame-ancestors 'self'; form-action 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def runtime(request: web.Request) -> HostRuntime:
    return request.config_dict[RUNTIME]


def redirect(location: str) -> web.Response:
    """303 See Other (the answer to a form's POST: the browser GETs ``location``)."""
    return web.Response(status=303, headers={"Location": location})


async def form(request: web.Request) -> Mapping[str, str]:
    """The POSTed form's text fields. VALIDATION_FAILED for a body that isn't a readable form."""
    try:
        data = await request.post()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge("request body too large") from None
    except ValueError:
        raise ValidationFailed("the form could not be read (send it as a browser does, UTF-8)", field="body") from None
    return {k: v for k, v in data.items() if isinstance(v, str)}


async def render(request: web.Request, template: str, context: Mapping[str, Any], *,
                 status: int = 200) -> web.Response:
    ctx: dict[str, Any] = {"session": request.get(APP_SESSION), "tenant": request.get(APP_TENANT),
                           "base": APP_PATH, **context}
    return aiohttp_jinja2.render_template(template, request, ctx, status=status)


def _canonical(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return "" if resource is None else resource.canonical


def _is_call(request: web.Request) -> bool:
    return _canonical(request).startswith(CALLS)


@web.middleware
async def app_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    canonical = _canonical(request)
    html = wants_html(request) and not canonical.startswith(CALLS)
    try:
        resp = await _guarded(request, handler, canonical)
    except TenantFleetError as exc:
        if not html:
            raise  # the host's envelope middleware answers with the JSON envelope
        resp = await _error_page(request, exc.status, exc.code, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400 or not html:
            raise
        resp = await _error_page(request, exc.status, "NOT_FOUND" if exc.status == 404 else "METHOD_NOT_ALLOWED"
                                 if exc.status == 405 else "BAD_REQUEST", exc.reason)
    except Exception:
        if not html:
            raise
        log.exception("app shell %s %s failed", request.method, request.path)
        resp = await _error_page(request, 500, "INTERNAL", "internal error (logged on the host)")
    return resp


async def security_headers(request: web.Request, resp: web.StreamResponse) -> None:
    """The app shell's ``on_response_prepare``: every answer under ``/app`` gets
    `SHELL_HEADERS` (a widget's file: `WIDGET_HEADERS`) and ``no-store`` (the static files
    excepted), including the JSON envelope the host's middleware writes for an error that
    `app_middleware` passes on (a bridge call, a script), which never comes back through it."""
    canonical = _canonical(request)
    widget = canonical.startswith(WIDGETS) and resp.status == 200
    for name, value in (WIDGET_HEADERS if widget else SHELL_HEADERS).items():
        resp.headers.setdefault(name, value)
    if canonical != f"{APP_PATH}/static":
        resp.headers.setdefault("Cache-Control", "no-store")


async def _guarded(request: web.Request, handler: Handler, canonical: str) -> web.StreamResponse:
    """Public routes as they are; everything else needs a live session (pages: back to
    sign-in without one; bridge calls: 401), for a bridge call (any method) or a POST the
    session's CSRF token (403 otherwise, nothing read or changed), and then (sign-out
    excepted) the session's tenant servable."""
    if canonical in PUBLIC or canonical.startswith(WIDGETS):
        return await handler(request)
    rt = runtime(request)
    call = canonical.startswith(CALLS)
    found = await sessions.load(rt.control, rt.auth, request.cookies.get(APP_COOKIE))
    if found is None:
        if call:
            raise Unauthorized("no session (signed out, expired, or its key revoked): sign in again")
        resp = redirect(f"{APP_PATH}/login")
        resp.del_cookie(APP_COOKIE, path=APP_PATH)
        return resp
    request[APP_SESSION] = found
    if call or request.method not in ("GET", "HEAD"):
        given = request.headers.get(CSRF_HEADER)
        if given is None and not call:
            given = (await form(request)).get("csrf")
        if not csrf_ok(found.csrf, given):
            raise Forbidden("missing or wrong CSRF token: reload the page and try again; nothing was changed",
                            field="csrf")
    if canonical in ANY_TENANT_STATE:
        return await handler(request)
    rec = await rt.resolver.resolve(id=found.tenant_id)
    request[REQ_TENANT] = rec.tenant_id
    request[APP_TENANT] = rec
    check_servable(rec)
    return await handler(request)


async def _error_page(request: web.Request, status: int, code: str, message: str) -> web.Response:
    try:
        return await render(request, "error.html", {"status": status, "code": code, "message": message},
                            status=status)
    except Exception:
        log.warning("app shell error page for %s not rendered", code, exc_info=True)
        return web.Response(status=status, text=f"{code}: {message}")
