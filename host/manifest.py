"""What a tenant's UI may show: `visible_plugins`, the one service function behind both
``/api/manifest`` (JSON, for the caller's key) and the app shell (``/app``, for the
signed-in session's principal). And ``/api/whoami``: who the caller's key is, checked
like every tenant request and reading nothing more (no plugin registry, no shard).

For a tenant and a principal: each plugin that is loaded, not killed and enabled for the
tenant, with the routes, menu entries and widgets of its ``manifest.json`` whose
``permission`` the principal holds (an entry without ``permission`` is shown to every
principal of the tenant).
"""
from __future__ import annotations

from typing import Any

from aiohttp import web

from host.context import PLUGIN_HOST, PluginHost
from host.rbac import Principal
from host.tenancy import check_servable
from router.errors import PluginDisabled
from router.http import json_response

SECTIONS = ("routes", "menu", "widgets")


async def visible_plugins(host: PluginHost, principal: Principal, tenant_id: str) -> list[dict[str, Any]]:
    """``[{pluginId, version, routes, menu, widgets}]`` by plugin id, each section filtered
    by the principal's permissions; plugins killed or not enabled for the tenant left out."""
    rt = host.runtime
    out: list[dict[str, Any]] = []
    for pid in sorted(host.contexts):
        try:
            tp = await rt.registry.gate(pid, tenant_id)
        except PluginDisabled:
            continue
        pkg = rt.discovery.plugins[pid]
        entry: dict[str, Any] = {"pluginId": pid, "version": tp.version_installed}
        for section in SECTIONS:
            entry[section] = [item for item in pkg.manifest.get(section, ())
                              if item.get("permission") is None or item["permission"] in principal.permissions]
        out.append(entry)
    return out


async def manifest(request: web.Request) -> web.Response:
    """``GET /api/manifest``: for the tenant named by the request (``X-Tenant`` or Host) and the caller's key."""
    host: PluginHost = request.app[PLUGIN_HOST]
    rt = host.runtime
    principal, rec = await rt.auth.for_named_tenant(rt.resolver, request)  # as on plugin routes (host.loader)
    check_servable(rec)
    plugins = await visible_plugins(host, principal, rec.tenant_id)
    return json_response({"tenantId": rec.tenant_id, "code": rec.code, "plugins": plugins})


async def whoami(request: web.Request) -> web.Response:
    """``GET /api/whoami``: the caller's principal and tenant, for the tenant named by the request and the caller's key."""
    host: PluginHost = request.app[PLUGIN_HOST]
    rt = host.runtime
    principal, rec = await rt.auth.for_named_tenant(rt.resolver, request)
    check_servable(rec)
    return json_response({"tenantId": rec.tenant_id, "code": rec.code,
                          "principal": {"principalId": principal.principal_id, "name": principal.name,
                                        "roles": list(principal.roles),
                                        "permissions": sorted(principal.permissions)}})
