"""Service functions that give a tenant working access: plugins enabled, roles, an API key.

For `tenantfleet up` (demo tenants) and `tenantfleet keys create`. The key is returned
once and only its hash is stored.
"""
from __future__ import annotations

from typing import Any, Sequence

from host.metrics import HostMetrics
from host.runtime import HostRuntime, open_host_runtime
from router.models import TenantRecord
from router.settings import Settings
from shard_migrations.packages import discover

DEFAULT_PLUGINS = ("inventory", "restock")


async def grant_access(rt: HostRuntime, tenant: TenantRecord, *, plugins: Sequence[str] = DEFAULT_PLUGINS,
                       name: str = "demo", enable_global: bool = True) -> dict[str, Any]:
    """Enable ``plugins`` for ``tenant`` (globally too, unless told not to; pending migrations
    are applied), apply each plugin's role templates to the tenant explicitly, and create a
    principal holding those roles.

    Returns ``{"tenantId", "code", "principalId", "apiKey", "roles", "plugins"}``. Raises
    PLUGIN_NOT_FOUND, MIGRATION_FAILED, MIGRATION_DRIFT, SHARD_UNREACHABLE.
    """
    roles: list[str] = []
    for pid in plugins:
        if enable_global:
            await rt.registry.set_global(pid, enabled=True)
        await rt.registry.enable_for_tenant(pid, tenant)
        for tpl in rt.registry.role_templates(pid):
            await rt.registry.apply_role_template(pid, tenant.tenant_id, tpl["roleKey"])
            roles.append(tpl["roleKey"])
    created = await rt.rbac.create_principal(tenant_id=tenant.tenant_id, name=name, roles=roles)
    return {"tenantId": tenant.tenant_id, "code": tenant.code, "principalId": created["principalId"],
            "apiKey": created["apiKey"], "roles": roles, "plugins": list(plugins)}


async def provision_tenants(settings: Settings, tenants: Sequence[TenantRecord], *,
                            plugins: Sequence[str] = DEFAULT_PLUGINS, name: str = "demo") -> dict[str, str]:
    """`grant_access` for each tenant with a runtime of its own; ``{code: apiKey}``.

    For `tenantfleet up` before it serves; changes are published, so running hosts see them.
    """
    keys: dict[str, str] = {}
    async with open_host_runtime(settings, discover(), HostMetrics()) as rt:
        for tenant in tenants:
            keys[tenant.code] = (await grant_access(rt, tenant, plugins=plugins, name=name))["apiKey"]
    return keys
