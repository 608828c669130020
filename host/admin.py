"""The admin API under ``/admin`` (admin key required): thin adapters over the registry
and RBAC services.

    GET  /admin/plugins                                       plugins, versions, refused
    POST /admin/plugins/{plugin}/enable | disable             globally
    POST /admin/plugins/{plugin}/kill | revive                the DB kill switch
    GET  /admin/plugins/{plugin}/role-templates
    POST /admin/tenants/{tenant}/plugins/{plugin}/enable      applies pending migrations
    POST /admin/tenants/{tenant}/plugins/{plugin}/disable
    GET|PUT /admin/tenants/{tenant}/plugins/{plugin}/config   JSON object
    GET  /admin/tenants/{tenant}/plugins/{plugin}/role-diff
    POST /admin/tenants/{tenant}/plugins/{plugin}/role-templates/{role}/apply
    PUT  /admin/tenants/{tenant}/roles/{role}                 {displayName, permissions}
    POST /admin/principals                                    {tenant, name, roles} → apiKey (shown once)

``{tenant}`` is a tenant id or code.
"""
from __future__ import annotations

from typing import Annotated, Any, Awaitable, Callable

from aiohttp import web
from pydantic import Field

from host import operations
from host.context import PLUGIN_HOST, PluginHost
from host.keys import REQ_TENANT
from host.runtime import HostRuntime
from host.rbac import PERMISSION_RE, ROLE_KEY_RE
from host.tenancy import resolve_id_or_code
from router.http import json_response, parse_body, read_json_object
from router.models import ApiModel, TenantRecord

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
routes = web.RouteTableDef()

TENANT_REF_PATTERN = (r"^(?:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
                      r"|[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)$")
Text = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00]+$")]
RoleKey = Annotated[str, Field(pattern=ROLE_KEY_RE.pattern)]
Permission = Annotated[str, Field(max_length=200, pattern=PERMISSION_RE.pattern)]


class NewPrincipal(ApiModel):
    """POST /admin/principals: a principal and its API key (shown once)."""
    tenant: Annotated[str, Field(pattern=TENANT_REF_PATTERN)] | None = Field(
        None, description="tenant id or code; none: a fleet-level principal")
    name: Text
    roles: list[RoleKey] = Field(default_factory=list, max_length=100, description="the tenant's role keys")


class RoleBody(ApiModel):
    """PUT /admin/tenants/{tenant}/roles/{role}: the role's permissions, replaced."""
    display_name: Text | None = None
    permissions: list[Permission] = Field(default_factory=list, max_length=1000,
                                          description="each in a plugin's namespace, like inventory.view")


BODIES: dict[tuple[str, str], type[ApiModel] | None] = {
    ("POST", "/admin/principals"): NewPrincipal,
    ("PUT", "/admin/tenants/{tenant}/roles/{role}"): RoleBody,
    ("PUT", "/admin/tenants/{tenant}/plugins/{plugin}/config"): None,  # any JSON object
}


async def _rt(request: web.Request) -> HostRuntime:
    host: PluginHost = request.app[PLUGIN_HOST]
    rt = host.runtime
    await rt.auth.check_admin(rt.settings.admin_key, request)
    return rt


async def _tenant(rt: HostRuntime, request: web.Request, name: str | None = None) -> TenantRecord:
    """The tenant named by id or code (``{tenant}`` in the path unless ``name`` is given)."""
    rec = await resolve_id_or_code(rt.resolver, request.match_info["tenant"] if name is None else name)
    request[REQ_TENANT] = rec.tenant_id
    return rec


def _json(data: Any, status: int = 200) -> web.Response:
    return json_response(data, status=status)


@routes.get("/admin/plugins")
async def list_plugins(request: web.Request) -> web.Response:
    rt = await _rt(request)
    return _json(await rt.registry.list_plugins())


@routes.post("/admin/plugins/{plugin}/{action:enable|disable|kill|revive}")
async def set_global(request: web.Request) -> web.Response:
    rt = await _rt(request)
    return _json(await operations.set_global(rt, request.match_info["plugin"], request.match_info["action"]))


@routes.get("/admin/plugins/{plugin}/role-templates")
async def role_templates(request: web.Request) -> web.Response:
    rt = await _rt(request)
    return _json(rt.registry.role_templates(request.match_info["plugin"]))


@routes.post("/admin/tenants/{tenant}/plugins/{plugin}/{action:enable|disable}")
async def set_tenant(request: web.Request) -> web.Response:
    rt = await _rt(request)
    rec = await _tenant(rt, request)
    return _json(await operations.set_tenant_plugin(rt, request.match_info["plugin"], rec,
                                                    enabled=request.match_info["action"] == "enable"))


@routes.get("/admin/tenants/{tenant}/plugins/{plugin}/config")
async def get_config(request: web.Request) -> web.Response:
    rt = await _rt(request)
    rec = await _tenant(rt, request)
    return _json(await rt.registry.get_tenant_config(request.match_info["plugin"], rec.tenant_id))


@routes.put("/admin/tenants/{tenant}/plugins/{plugin}/config")
async def put_config(request: web.Request) -> web.Response:
    rt = await _rt(request)
    rec = await _tenant(rt, request)
    body = await read_json_object(request)
    return _json(await rt.registry.set_tenant_config(request.match_info["plugin"], rec.tenant_id, body))


@routes.get("/admin/tenants/{tenant}/plugins/{plugin}/role-diff")
async def role_diff(request: web.Request) -> web.Response:
    rt = await _rt(request)
    rec = await _tenant(rt, request)
    return _json(await rt.registry.role_diff(request.match_info["plugin"], rec.tenant_id))


@routes.post("/admin/tenants/{tenant}/plugins/{plugin}/role-templates/{role}/apply")
async def apply_template(request: web.Request) -> web.Response:
    rt = await _rt(request)
    rec = await _tenant(rt, request)
    return _json(await rt.registry.apply_role_template(request.match_info["plugin"], rec.tenant_id,
                                                       request.match_info["role"]))


@routes.put("/admin/tenants/{tenant}/roles/{role}")
async def put_role(request: web.Request) -> web.Response:
    rt = await _rt(request)
    rec = await _tenant(rt, request)
    body = parse_body(RoleBody, await read_json_object(request))
    return _json(await operations.put_role(rt, rec.tenant_id, request.match_info["role"], body.display_name,
                                           body.permissions))


@routes.post("/admin/principals")
async def create_principal(request: web.Request) -> web.Response:
    rt = await _rt(request)
    body = parse_body(NewPrincipal, await read_json_object(request))
    tenant_id = None if body.tenant is None else (await _tenant(rt, request, body.tenant)).tenant_id
    created = await rt.rbac.create_principal(tenant_id=tenant_id, name=body.name, roles=body.roles)
    return _json(created, status=201)


@routes.get("/admin/principals")
async def list_principals(request: web.Request) -> web.Response:
    """``?tenant=<id or code>``: that tenant's principals; without it, the fleet-level ones. No keys."""
    rt = await _rt(request)
    tenant = request.query.get("tenant")
    tenant_id = None if tenant is None else (await _tenant(rt, request, tenant)).tenant_id
    return _json({"tenantId": tenant_id, "principals": await rt.rbac.list_principals(tenant_id)})


@routes.delete("/admin/principals/{principal}")
async def revoke_principal(request: web.Request) -> web.Response:
    """Revoke a key: refused on this host at once, on every other host within about a second."""
    rt = await _rt(request)
    return _json(await operations.revoke_key(rt, request.match_info["principal"]))
