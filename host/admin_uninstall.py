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

import asyncio
import logging
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import Field

from host.admin import TENANT_REF_PATTERN
from host.context import PLUGIN_HOST, PluginHost
from host.runtime import HostRuntime
from host.tenancy import resolve_id_or_code
from router.errors import NotFound, TenantFleetError
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
    from shard_migrations.uninstall import UninstallOptions, parse_grace, uninstall

    rt = await _rt(request)
    body = parse_body(UninstallBody, await read_json_object(request))
    package = rt.discovery.get(request.match_info["plugin"])
    tenant_ids = None
    if body.tenant is not None:
        tenant_ids = ((await resolve_id_or_code(rt.resolver, body.tenant)).tenant_id,)
    opts = UninstallOptions(policy=body.policy, tenant_ids=tenant_ids,
                            export_dir=rt.settings.export_dir,
                            grace_s=None if body.grace is None else parse_grace(body.grace))
    recorded: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def on_run(run_id: int) -> None:
        if not recorded.done():
            recorded.set_result(run_id)

    async def go() -> dict[str, Any] | TenantFleetError:
        try:
            report = await uninstall(rt.control, rt.owner_pools, rt.settings, package, opts, resume=body.resume,
                                     on_run=on_run)
        except TenantFleetError as exc:
            if recorded.done():
                raise  # the run failed: recorded as such, and logged by the task's owner
            return exc  # bad input, nothing recorded: the request's answer, not a task failure
        await rt.registry.announce("global", package.id)
        return report.to_dict()

    # owned by the runtime: a fleet-wide run goes on after the answer (and is cancelled,
    # recorded, at shutdown; `resume` finishes it)
    task = rt.tasks.spawn(go(), name=f"uninstall-{package.id}")
    await asyncio.wait({recorded, task}, return_when=asyncio.FIRST_COMPLETED)
    if task.done() or tenant_ids is not None:
        result = await task
        if isinstance(result, TenantFleetError):
            raise result
        return json_response(result, status=202)
    return json_response({"runId": recorded.result(), "pluginId": package.id, "state": "running"}, status=202)


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
