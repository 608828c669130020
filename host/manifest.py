"""``/api/manifest``: what the calling tenant's UI may show.

For the tenant named by the request (``X-Tenant`` or Host) and the caller's key: each
plugin that is loaded, not killed and enabled for the tenant, with the routes, menu
entries and widgets of its ``manifest.json`` whose ``permission`` the caller holds
(an entry without ``permission`` is shown to every caller of the tenant).
"""
from __future__ import annotations

from typing import Any

from aiohttp import web

from host.context import PLUGIN_HOST, PluginHost
from host.tenancy import check_servable
from router.errors import PluginDisabled
from router.http import json_response

SECTIONS = ("routes", "menu", "widgets")


async def manifest(request: web.Request) -> web.Response:
    host: PluginHost = request.app[PLUGIN_HOST]
    rt = host.runtime
    principal, rec = await rt.auth.for_named_tenant(rt.resolver, request)  # as on plugin routes (host.loader)
    check_servable(rec)
    out: list[dict[str, Any]] = []
    for pid in sorted(host.contexts):
        try:
            tp = await rt.registry.gate(pid, rec.tenant_id)
        except PluginDisabled:
            continue
        pkg = rt.discovery.plugins[pid]
        entry: dict[str, Any] = {"pluginId": pid, "version": tp.version_installed}
        for section in SECTIONS:
            entry[section] = [item for item in pkg.manifest.get(section, ())
                              if item.get("permission") is None or item["permission"] in principal.permissions]
        out.append(entry)
    return json_response({"tenantId": rec.tenant_id, "code": rec.code, "plugins": out})
