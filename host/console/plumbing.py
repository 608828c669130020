"""The console's request plumbing: the session and CSRF gate, HTML error pages, security
headers, rendering with the counts every page shows, and the audit of each action."""
from __future__ import annotations

import datetime as dt
import logging
from typing import Any, Awaitable, Callable, Final, Mapping
from urllib.parse import quote, urlsplit

import aiohttp_jinja2
from aiohttp import web

from host import overview
from host.console import audit, sessions
from host.keys import CONSOLE_COOKIE, CONSOLE_LOGIN_COOKIE, CONSOLE_PATH, CSRF_HEADER
from host.runtime import RUNTIME, HostRuntime
from router.errors import Forbidden, PayloadTooLarge, TenantFleetError, ValidationFailed

log = logging.getLogger("tenantfleet.console")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SESSION: Final[web.RequestKey[sessions.Session]] = web.RequestKey("tenantfleet_console_session")
AUDITED: Final[web.RequestKey[bool]] = web.RequestKey("tenantfleet_console_audited")
PUBLIC: Final = (f"{CONSOLE_PATH}/login", f"{CONSOLE_PATH}/static/")
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def runtime(request: web.Request) -> HostRuntime:
    return request.config_dict[RUNTIME]


def session(request: web.Request) -> sessions.Session:
    return request[SESSION]


def redirect(location: str) -> web.Response:
    """303 See Other (the answer to a form's POST: the browser GETs ``location``)."""
    return web.Response(status=303, headers={"Location": location})


def to_sign_in(request: web.Request) -> web.Response:
    """Back to the sign-in page (htmx requests: told to go there with ``HX-Redirect``, and
    back afterwards to the page that polled, not to the fragment it polled)."""
    target = f"{CONSOLE_PATH}/login"
    if request.headers.get("HX-Request") == "true":
        current = urlsplit(request.headers.get("HX-Current-URL", ""))
        page = current.path + (f"?{current.query}" if current.query else "")
        if page.startswith(f"{CONSOLE_PATH}/") and not page.startswith(f"{CONSOLE_PATH}/login"):
            target += "?next=" + quote(page, safe="")
        return web.Response(status=200, headers={"HX-Redirect": target})
    if request.method == "GET" and not request.path.startswith(f"{CONSOLE_PATH}/login"):
        target += "?next=" + quote(request.path_qs, safe="")
    resp = redirect(target)
    resp.del_cookie(CONSOLE_COOKIE, path=CONSOLE_PATH)
    return resp


async def render(request: web.Request, template: str, context: Mapping[str, Any], *, status: int = 200,
                 counts: bool = True) -> web.Response:
    """The page ``template`` with ``context``, the signed-in session and (``counts``) the
    tenants and runs per state for the top of the page."""
    ctx: dict[str, Any] = {"session": request.get(SESSION), "path": request.path, "base": CONSOLE_PATH, **context}
    if counts:
        ctx["counts"] = await overview.state_counts(runtime(request).control)
    return aiohttp_jinja2.render_template(template, request, ctx, status=status)


async def form(request: web.Request) -> Mapping[str, str]:
    """The POSTed form's fields (text only). VALIDATION_FAILED for a body that can't be read
    as a form (not UTF-8, say), PAYLOAD_TOO_LARGE."""
    try:
        data = await request.post()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge("request body too large") from None
    except ValueError:  # UnicodeDecodeError included: bytes the form's charset can't decode
        raise ValidationFailed("the form could not be read (send it as a browser does, UTF-8)", field="body") from None
    return {k: v for k, v in data.items() if isinstance(v, str)}


def wants_html(request: web.Request) -> bool:
    """A browser's request (it asks for text/html): errors are pages. Any other client
    (curl, scripts, tests) gets the JSON envelope, as everywhere else on the host."""
    return "text/html" in request.headers.get("Accept", "")


async def act(request: web.Request, action: str, target: str | None, work: Callable[[], Awaitable[Any]],
              details: Mapping[str, Any] | None = None) -> Any:
    """Run one action and write its audit entry (``ok`` or the error's code) whatever happens."""
    rt = runtime(request)
    try:
        result = await work()
    except TenantFleetError as exc:
        await audit.record(rt.control, actor=session(request).actor, action=action, target=target,
                           outcome=exc.code, details={**(details or {}), "error": exc.message},
                           remote=request.remote)
        request[AUDITED] = True
        raise
    # (any other error is left to the middleware, which writes it as console.refused INTERNAL)
    await audit.record(rt.control, actor=session(request).actor, action=action, target=target, outcome="ok",
                       details=details, remote=request.remote)
    request[AUDITED] = True
    return result


def _public(path: str) -> bool:
    return path == PUBLIC[0] or path.startswith(PUBLIC[1])


@web.middleware
async def console_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        resp = await _guarded(request, handler)
    except TenantFleetError as exc:
        if not wants_html(request):
            raise  # the host's envelope middleware answers with the JSON envelope
        resp = await _error_page(request, exc.status, exc.code, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400 or not wants_html(request):
            raise
        resp = await _error_page(request, exc.status, "NOT_FOUND" if exc.status == 404 else "METHOD_NOT_ALLOWED"
                                 if exc.status == 405 else "BAD_REQUEST", exc.reason)
    except Exception:
        if not wants_html(request):
            raise
        log.exception("console %s %s failed", request.method, request.path)
        resp = await _error_page(request, 500, "INTERNAL", "internal error (logged on the host)")
    for name, value in SECURITY_HEADERS.items():
        resp.headers.setdefault(name, value)
    if not request.path.startswith(PUBLIC[1]):
        resp.headers.setdefault("Cache-Control", "no-store")
    return resp


async def _guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
    if _public(request.path):
        return await handler(request)
    rt = runtime(request)
    found = await sessions.load(rt.control, request.cookies.get(CONSOLE_COOKIE), admin_key=rt.settings.admin_key)
    if found is None:
        return to_sign_in(request)
    request[SESSION] = found
    if request.method not in ("GET", "HEAD"):
        given = request.headers.get(CSRF_HEADER)
        if given is None:
            given = (await form(request)).get("csrf")
        if not sessions.csrf_ok(found.csrf, given):
            await audit.record(rt.control, actor=found.actor, action="csrf.refused", target=request.path,
                               outcome=Forbidden.code, remote=request.remote)
            raise Forbidden("missing or wrong CSRF token: reload the page and try again; nothing was changed",
                            field="csrf")
        try:
            return await handler(request)
        except Exception as exc:
            if not request.get(AUDITED):  # refused before `act` wrote it (unknown tenant, bad id, a bug)
                await _audit_refusal(request, found, exc)
            raise
    return await handler(request)


async def _audit_refusal(request: web.Request, found: sessions.Session, exc: Exception) -> None:
    """The audit entry of an action refused before `act` ran: the path asked for, the error's code."""
    if isinstance(exc, TenantFleetError):
        outcome, message = exc.code, exc.message
    elif isinstance(exc, web.HTTPException):
        outcome, message = f"HTTP_{exc.status}", exc.reason
    else:
        outcome, message = "INTERNAL", exc.__class__.__name__
    route = request.match_info.route.resource
    try:
        await audit.record(runtime(request).control, actor=found.actor, action="console.refused",
                           target=request.path, outcome=outcome, remote=request.remote,
                           details={"route": None if route is None else route.canonical, "error": message})
    except Exception:  # the control plane is down: the refusal itself is what the operator sees
        log.warning("console: the refusal of %s %s was not audited", request.method, request.path, exc_info=True)


async def _error_page(request: web.Request, status: int, code: str, message: str) -> web.Response:
    counts = SESSION in request
    try:
        return await render(request, "error.html", {"status": status, "code": code, "message": message},
                            status=status, counts=counts)
    except Exception:  # the page itself can't be rendered (control plane down): plain text, same status
        log.warning("console error page for %s not rendered", code, exc_info=True)
        return web.Response(status=status, text=f"{code}: {message}")


def login_csrf(request: web.Request) -> str | None:
    return request.cookies.get(CONSOLE_LOGIN_COOKIE)


def _ts(value: Any) -> str:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return "-" if value is None else str(value)


def _bytes(value: Any) -> str:
    if not isinstance(value, int):
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _dash(value: Any) -> Any:
    return "-" if value is None else value


def filters() -> dict[str, Callable[[Any], Any]]:
    return {"ts": _ts, "bytes": _bytes, "dash": _dash}
