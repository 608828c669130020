"""The app shell's pages, sign-in and sign-out, the widgets' documents, and the plugin
routes the bridge calls (mounted under ``/call/{plugin}``)."""
from __future__ import annotations

import functools
import re
import secrets
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from host.appshell import sessions
from host.appshell.plumbing import APP_SESSION, APP_TENANT, WIDGET_HEADERS, form, redirect, render, runtime
from host.console.plumbing import wants_html
from host.console.sessions import csrf_ok
from host.context import PLUGIN_HOST, PluginHost
from host.keys import APP_CALL, APP_COOKIE, APP_LOGIN_COOKIE, APP_PATH, REQ_PLUGIN
from host.loader import enter_plugin
from host.manifest import visible_plugins
from plugins.api import Handler
from router.errors import Forbidden, NotFound, Unauthorized, ValidationFailed
from shard_migrations.packages import Discovery

routes = web.RouteTableDef()
WIDGET_FILE: Final = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}\.(html|js|css)$")
CONTENT_TYPES: Final = {"html": "text/html", "js": "text/javascript", "css": "text/css"}
CALL_METHODS: Final = ("GET", "POST")  # what the bridge's `call` may send


def widget_dir(host: PluginHost, plugin_id: str) -> Path | None:
    """A loaded plugin's ``widgets/`` folder (None: no such plugin, or it ships no widgets)."""
    if plugin_id not in host.contexts:
        return None
    folder = host.runtime.discovery.plugins[plugin_id].path / "widgets"
    return folder if folder.is_dir() else None


def _document(host: PluginHost, plugin_id: str, component: Any) -> str | None:
    """The URL of a manifest component's widget document, if the plugin ships one."""
    folder = widget_dir(host, plugin_id)
    name = f"{component}.html"
    if folder is None or not isinstance(component, str) or not WIDGET_FILE.fullmatch(name) \
            or not (folder / name).is_file():
        return None
    return f"{APP_PATH}/widgets/{plugin_id}/{name}"


async def _shell(request: web.Request, view: dict[str, Any] | None = None) -> web.Response:
    host: PluginHost = request.config_dict[PLUGIN_HOST]
    found = request[APP_SESSION]
    plugins = await visible_plugins(host, found.principal, found.tenant_id)
    widgets = [{**w, "pluginId": p["pluginId"], "src": _document(host, p["pluginId"], w.get("component"))}
               for p in plugins for w in p["widgets"]] if view is None else []
    return await render(request, "shell.html", {"plugins": plugins, "widgets": widgets, "view": view})


@routes.get("")
@routes.get("/")
async def shell(request: web.Request) -> web.Response:
    """The shell: the menu and widgets the signed-in principal may see."""
    return await _shell(request)


@routes.get("/view/{plugin}/{menu}")
async def view(request: web.Request) -> web.Response:
    """A menu entry's page: its route's component in a sandboxed frame, if the plugin ships
    one. NOT_FOUND for an entry the principal may not see (or that doesn't exist)."""
    host: PluginHost = request.config_dict[PLUGIN_HOST]
    found = request[APP_SESSION]
    pid, menu_id = request.match_info["plugin"], request.match_info["menu"]
    for p in await visible_plugins(host, found.principal, found.tenant_id):
        if p["pluginId"] != pid:
            continue
        for entry in p["menu"]:
            if entry.get("id") == menu_id:
                route = next((r for r in p["routes"] if r.get("path") == entry.get("route")), None)
                component = None if route is None else route.get("component")
                return await _shell(request, {"pluginId": pid, "menu": entry, "component": component,
                                              "src": _document(host, pid, component)})
    raise NotFound(f"no menu entry {menu_id} of plugin {pid} for you", pluginId=pid)


@routes.get("/login")
async def login_page(request: web.Request) -> web.Response:
    return await login_form(request)


async def login_form(request: web.Request, *, error: str | None = None, status: int = 200,
                     tenant: str = "") -> web.Response:
    """The sign-in form with a CSRF token of its own (a cookie and the same value in the form)."""
    token = request.cookies.get(APP_LOGIN_COOKIE) or secrets.token_urlsafe(32)
    resp = await render(request, "login.html", {"csrf": token, "error": error, "tenantName": tenant}, status=status)
    resp.set_cookie(APP_LOGIN_COOKIE, token, path=APP_PATH, httponly=True, samesite="Strict",
                    secure=request.secure, max_age=3600)
    return resp


@routes.post("/login")
async def login(request: web.Request) -> web.Response:
    """Exchange a tenant's API key for a session cookie (the form's own CSRF token checked
    first); the session of the cookie it replaces, if any, is ended."""
    rt = runtime(request)
    data = await form(request)
    tenant = data.get("tenant", "")[:253]
    try:
        if not csrf_ok(request.cookies.get(APP_LOGIN_COOKIE) or "", data.get("csrf")):
            raise Forbidden("missing or wrong CSRF token on the sign-in form: load it again", field="csrf")
        token, _, _ = await sessions.sign_in(rt.control, rt.auth, rt.resolver, tenant=tenant,
                                             key=data.get("key", ""), remote=request.remote,
                                             ttl_s=rt.settings.app_session_s)
    except (Forbidden, Unauthorized, ValidationFailed) as exc:
        if not wants_html(request):
            raise  # any other client: the JSON envelope, as everywhere on the host
        return await login_form(request, error=exc.message, status=exc.status, tenant=tenant)
    # the cookie this browser held (another tenant's or key's session) is replaced: end its session
    await sessions.sign_out(rt.control, request.cookies.get(APP_COOKIE))
    resp = redirect(f"{APP_PATH}/")
    resp.set_cookie(APP_COOKIE, token, path=APP_PATH, httponly=True, samesite="Strict",
                    secure=request.secure, max_age=int(rt.settings.app_session_s))
    resp.del_cookie(APP_LOGIN_COOKIE, path=APP_PATH)
    return resp


@routes.post("/logout")
async def logout(request: web.Request) -> web.Response:
    await sessions.sign_out(runtime(request).control, request.cookies.get(APP_COOKIE))
    resp = redirect(f"{APP_PATH}/login")
    resp.del_cookie(APP_COOKIE, path=APP_PATH)
    return resp


@routes.get("/widgets/{plugin}/{file}")
async def widget_file(request: web.Request) -> web.StreamResponse:
    """A file of a plugin's ``widgets/`` folder (its name checked: letters, digits, ``_-``,
    one ``.html``, ``.js`` or ``.css``; never a path), with `WIDGET_HEADERS`. Public: it is
    the plugin's code, with no tenant data in it (a sandboxed document's own requests
    carry no cookie of this host, SameSite=Strict); the data comes through the bridge."""
    host: PluginHost = request.config_dict[PLUGIN_HOST]
    pid, name = request.match_info["plugin"], request.match_info["file"]
    folder = widget_dir(host, pid)
    match = WIDGET_FILE.fullmatch(name)
    if folder is None or match is None or not (folder / name).is_file():
        raise NotFound(f"plugin {pid} ships no widget file {name}", pluginId=pid)
    body = (folder / name).read_bytes()
    return web.Response(body=body, content_type=CONTENT_TYPES[match.group(1)], charset="utf-8",
                        headers=dict(WIDGET_HEADERS))


def mount_calls(app: web.Application, host: PluginHost, discovery: Discovery) -> None:
    """Each loaded plugin's GET and POST routes at ``/call/{plugin}{route}``, behind the
    session (`host.appshell.plumbing`) and the plugin gate (`host.loader.enter_plugin`);
    anything else under ``/call`` is NOT_FOUND: a route of another plugin can't be
    reached through a plugin's path."""
    for pid, ctx in host.contexts.items():
        for route in ctx.router.routes:
            if route.method in CALL_METHODS:
                app.router.add_route(route.method, f"{APP_CALL}/{pid}{route.path}",
                                     _as_session(host, pid, route.handler))
    app.router.add_route("*", APP_CALL + "/{plugin}/{tail:.*}", _not_a_route)


def _as_session(host: PluginHost, plugin_id: str, handler: Handler) -> Handler:
    @functools.wraps(handler)
    async def gated(request: web.Request) -> web.StreamResponse:
        request[REQ_PLUGIN] = plugin_id
        await enter_plugin(host, plugin_id, request, request[APP_SESSION].principal, request[APP_TENANT])
        return await handler(request)
    return gated


async def _not_a_route(request: web.Request) -> web.StreamResponse:
    pid = request.match_info["plugin"]
    raise NotFound(f"plugin {pid} has no route {request.method} /{request.match_info['tail']} for the app shell",
                   pluginId=pid)
