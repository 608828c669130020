"""Admin changes that take more than one service call, as one function each: what the
admin API's handlers and the console's actions both call (neither holds logic of its own).

Each change is committed, then announced to every host (`Registry.announce`), so it
reaches every host's caches within a pub/sub hop.
"""
from __future__ import annotations

from typing import Any, Sequence

from host.runtime import HostRuntime
from router.errors import ValidationFailed
from router.models import TenantRecord


async def put_role(rt: HostRuntime, tenant_id: str, role_key: str, display_name: str | None,
                   permissions: Sequence[str]) -> dict[str, Any]:
    """Create or replace one of a tenant's roles (`RbacService.upsert_role`: VALIDATION_FAILED
    for bad keys or permissions outside every plugin's namespace), then announce it."""
    role = await rt.rbac.upsert_role(tenant_id, role_key, display_name or role_key, permissions,
                                     namespaces=rt.registry.discovery.plugins.keys())
    await rt.registry.announce("roles", None, tenant_id)
    return role


async def revoke_key(rt: HostRuntime, principal_id: str) -> dict[str, Any]:
    """Revoke a principal's key: refused on this host at once, on every other host within a
    pub/sub hop. VALIDATION_FAILED (malformed id), NOT_FOUND."""
    revoked = await rt.rbac.revoke_principal(principal_id)
    rt.auth.clear()
    await rt.registry.announce("principals", None, revoked["tenantId"])
    return revoked


async def set_tenant_plugin(rt: HostRuntime, plugin_id: str, tenant: TenantRecord, *, enabled: bool) -> dict[str, Any]:
    """Enable (pending migrations applied first) or disable a plugin for one tenant.
    PLUGIN_NOT_FOUND, MIGRATION_FAILED, MIGRATION_DRIFT, SHARD_*."""
    if enabled:
        return await rt.registry.enable_for_tenant(plugin_id, tenant)
    return await rt.registry.disable_for_tenant(plugin_id, tenant.tenant_id)


async def set_global(rt: HostRuntime, plugin_id: str, action: str) -> dict[str, Any]:
    """``enable``/``disable`` a plugin globally, or ``kill``/``revive`` it (the DB kill switch).
    PLUGIN_NOT_FOUND; VALIDATION_FAILED for another action."""
    if action in ("enable", "disable"):
        await rt.registry.set_global(plugin_id, enabled=action == "enable")
    elif action in ("kill", "revive"):
        await rt.registry.set_global(plugin_id, killed=action == "kill")
    else:
        raise ValidationFailed("action must be enable, disable, kill or revive", field="action")
    return {"pluginId": plugin_id, "action": action}
