"""The admin API's plugin uninstall and export re-import (admin key required), over the
same service functions as `tenantfleet plugins uninstall|import-export` and the console:

    POST /admin/plugins/{plugin}/uninstall          {policy?, tenant?, grace?, resume?}
         202: with a tenant, the run's report once it is done; without, {runId, state:
         running} as soon as the run is recorded (its progress at GET /admin/runs/{run})
    POST /admin/tenants/{tenant}/plugin-exports/import   {export: "PLUGIN/TENANT_ID"}:
         200 {pluginId, rows, verified}

Exports are written to, and read from, the host's ``TENANTFLEET_EXPORT_DIR`` only: a
request never names a path on the host (export and purge-with-export are refused when it
is unset).

Bad input (unknown plugin, policy or tenant, an export dir that can't be written, a
corrupt export) is answered before anything is changed.
"""
from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import Field

from host import operations
from host.admin import TENANT_REF_PATTERN
from host.context import PLUGIN_HOST, PluginHost
from host.runtime import HostRuntime
from host.tenancy import resolve_id_or_code
from router.errors import NotFound
from router.http import json_response, parse_body, read_json_object
from router.models import ApiModel

log = logging.getLogger("tenantfleet.host.uninstall")
routes = web.RouteTableDef()
EXPORT_REF_PATTERN = r"^[a-z][a-z0-9_]{1,30}/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"


class UninstallBody(ApiModel):
    """POST /admin/plugins/{plugin}/uninstall."""
    policy: Literal["keep", "export", "purge"] | None = Field(None, description="default: the plugin's own")
    tenant: Annotated[str, Field(pattern=TENANT_REF_PATTERN)] | None = None
    grace: Annotated[str, Field(max_length=20)] | None = Field(None, description="90, 90s, 15m, 2h, 7d")
    resume: Annotated[int, Field(ge=1, le=2**63 - 1)] | None = None


class ImportBody(ApiModel):
    """POST /admin/tenants/{tenant}/plugin-exports/import."""
    export: Annotated[str, Field(pattern=EXPORT_REF_PATTERN, description="PLUGIN/TENANT_ID under the export dir")]


BODIES: dict[tuple[str, str], type[ApiModel] | None] = {
    ("POST", "/admin/plugins/{plugin}/uninstall"): UninstallBody,
    ("POST", "/admin/tenants/{tenant}/plugin-exports/import"): ImportBody,
}


async def _rt(request: web.Request) -> HostRuntime:
    host: PluginHost = request.app[PLUGIN_HOST]
    rt = host.runtime
    await rt.auth.check_admin(rt.settings.admin_key, request)
    return rt


@routes.post("/admin/plugins/{plugin}/uninstall")
async def post_uninstall(request: web.Request) -> web.Response:
    """Uninstall a plugin (keep, export or purge) from one tenant, or from every tenant as a recorded run."""
    rt = await _rt(request)
    body = parse_body(UninstallBody, await read_json_object(request))
    result = await operations.uninstall_plugin(rt, request.match_info["plugin"], policy=body.policy,
                                               tenant=body.tenant, grace=body.grace, resume=body.resume)
    return json_response(result, status=202)


@routes.post("/admin/tenants/{tenant}/plugin-exports/import")
async def post_import(request: web.Request) -> web.Response:
    """Re-import one tenant's plugin export (checksums verified) into this tenant."""
    from shard_migrations.uninstall import import_export

    rt = await _rt(request)
    body = parse_body(ImportBody, await read_json_object(request))
    rec = await resolve_id_or_code(rt.resolver, request.match_info["tenant"])
    if rt.settings.export_dir is None:
        raise NotFound("this host keeps no exports (TENANTFLEET_EXPORT_DIR is not set)", field="export")
    out = await import_export(rt.control, rt.owner_pools, rt.settings, rt.discovery, rec,
                              rt.settings.export_dir / body.export)
    await rt.registry.announce("tenant", out["pluginId"], rec.tenant_id)
    return json_response(out)
