"""Loading plugins into the app: api-major check, ``setup(ctx)``, mounting, the plugin gate.

Every route a plugin registers is mounted at ``/api/plugins/{id}{path}`` (a GET route
answers HEAD too, without the body) behind the gate: resolve the tenant, authenticate the caller for that tenant, check kill switch
and enablement (403 PLUGIN_DISABLED with ``{pluginId, tenantId}``), then the handler.
A plugin whose ``meta.api`` major differs from the host's is refused with a log line
and listed by the admin API; so is one whose ``setup`` fails or is missing.
"""
from __future__ import annotations

import functools
import logging
from typing import Any

from aiohttp import web

from host.context import HostPluginContext, PluginHost
from host.keys import REQ_CALLER, REQ_PLUGIN
from host.rbac import Principal
from host.tenancy import REQUEST_TENANT, check_servable
from plugins.api import API_MAJOR, Caller, Handler, Tenant, json_response
from router.errors import MethodNotAllowed, NotFound, PluginNotFound
from router.models import TenantRecord
from shard_migrations.packages import Discovery, PluginPackage

log = logging.getLogger("tenantfleet.host.loader")

PREFIX = "/api/plugins"


def load_plugins(discovery: Discovery, host: PluginHost) -> None:
    """Run each acceptable plugin's ``setup``; record the refused ones with a reason."""
    host.refused.update(discovery.refused)
    for pid, pkg in sorted(discovery.plugins.items()):
        if pkg.api_major != API_MAJOR:
            reason = f"plugin api {pkg.api} is not supported (host speaks {API_MAJOR}.x)"
            log.error("plugin %s %s refused: %s", pid, pkg.version, reason, extra={"pluginId": pid})
            host.refused[pid] = reason
            continue
        setup = getattr(pkg.module, "setup", None)
        if not callable(setup):
            host.refused[pid] = "no setup(ctx) function"
            log.error("plugin %s refused: no setup(ctx) function", pid, extra={"pluginId": pid})
            continue
        ctx = HostPluginContext(pid, host)
        try:
            setup(ctx)
        except Exception as exc:  # a broken plugin must not take the host down
            host.refused[pid] = f"setup failed: {exc.__class__.__name__}: {exc}"
            log.exception("plugin %s refused: setup failed", pid, extra={"pluginId": pid})
            continue
        host.contexts[pid] = ctx
    for pid in host.refused:
        discovery.plugins.pop(pid, None)
    discovery.refused.update(host.refused)  # the admin API lists them from here


def mount(app: web.Application, host: PluginHost, discovery: Discovery) -> None:
    """Add every loaded plugin's routes, its health route, and the catch-all for unknown ones."""
    for pid, ctx in host.contexts.items():
        pkg = discovery.plugins[pid]
        app.router.add_get(f"{PREFIX}/{pid}/health", functools.partial(_health, host, pkg))
        served = {(route.method, route.path) for route in ctx.router.routes}
        for route in ctx.router.routes:
            path, gated = f"{PREFIX}/{pid}{route.path}", _gated(host, pid, route.handler)
            app.router.add_route(route.method, path, gated)
            if route.method == "GET" and ("HEAD", route.path) not in served:
                app.router.add_route("HEAD", path, gated)  # HEAD is GET without the body (as aiohttp's add_get)
    app.router.add_route("*", PREFIX + "/{plugin}", functools.partial(_unknown, host))
    app.router.add_route("*", PREFIX + "/{plugin}/{tail:.*}", functools.partial(_unknown, host))


def _gated(host: PluginHost, plugin_id: str, handler: Handler) -> Handler:
    @functools.wraps(handler)
    async def gated(request: web.Request) -> web.StreamResponse:
        rt = host.runtime
        request[REQ_PLUGIN] = plugin_id
        # the key first: without one, nothing is said about the tenant (found or not, suspended),
        # nor to another tenant's key (the same 403 whether the tenant exists or not)
        principal, rec = await rt.auth.for_named_tenant(rt.resolver, request)
        await enter_plugin(host, plugin_id, request, principal, rec)
        return await handler(request)
    return gated


async def enter_plugin(host: PluginHost, plugin_id: str, request: web.Request, principal: Principal,
                       rec: TenantRecord) -> None:
    """The plugin gate once the caller is known to belong to ``rec``: the tenant servable,
    the plugin not killed and enabled for it (PLUGIN_DISABLED), then the `Caller` the
    plugin's handler reads (its RBAC checks run on ``principal``'s permissions) and the
    tenant its transactions are fenced on. What ``/api/plugins`` does for a key, and the
    app shell (`host.appshell`) for a signed-in session."""
    check_servable(rec)
    REQUEST_TENANT.set(rec)
    tp = await host.runtime.registry.gate(plugin_id, rec.tenant_id)
    request[REQ_CALLER] = Caller(
        tenant=Tenant(rec.tenant_id, rec.code, rec.domains), principal_id=principal.principal_id,
        principal_name=principal.name, permissions=principal.permissions, plugin_version=tp.version_installed,
        config=tp.config)


async def _health(host: PluginHost, pkg: PluginPackage, request: web.Request) -> web.Response:
    """Plugin health: loaded, kill switch, and the plugin's own checks (no tenant, no key)."""
    rt = host.runtime
    request[REQ_PLUGIN] = pkg.id
    checks: list[dict[str, Any]] = []
    ok = True
    for check in host.contexts[pkg.id].health_checks:
        try:
            checks.append({"ok": True, **(await check())})
        except Exception as exc:  # the check's failure is the answer, not a host error
            ok = False
            checks.append({"ok": False, "error": exc.__class__.__name__})
            log.warning("health check of %s failed", pkg.id, exc_info=True, extra={"pluginId": pkg.id})
    killed = rt.registry.is_killed(pkg.id)
    status = "killed" if killed else "ok" if ok else "failing"
    return json_response({"pluginId": pkg.id, "version": str(pkg.version), "status": status, "checks": checks},
                         status=200 if status == "ok" else 503)


async def _unknown(host: PluginHost, request: web.Request) -> web.StreamResponse:
    pid = request.match_info["plugin"]
    if pid not in host.contexts:
        why = host.refused.get(pid)
        raise PluginNotFound(f"no plugin {pid}" + (f" (refused: {why})" if why else ""), pluginId=pid)
    # The catch-all takes every method, so aiohttp's own 405 never happens under a plugin:
    # a path the plugin serves with other methods is answered 405 with them in Allow.
    allowed: set[str] = set()
    prefix = f"{PREFIX}/{pid}/"
    for resource in request.app.router.resources():
        if resource.canonical.startswith(prefix):
            match, methods = await resource.resolve(request)
            if match is None:
                allowed |= methods
    if allowed:
        names = sorted(allowed)
        raise MethodNotAllowed(f"{request.method} is not allowed here; allowed: {', '.join(names)}",
                               allowed=names, pluginId=pid)
    raise NotFound(f"plugin {pid} has no route {request.method} {request.path}", pluginId=pid)
