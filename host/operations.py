"""Admin changes that take more than one service call, as one function each: what the
admin API's handlers and the console's actions both call (neither holds logic of its own).

Each change is committed, then announced to every host (`Registry.announce`), so it
reaches every host's caches within a pub/sub hop.
"""
from __future__ import annotations

import asyncio
from typing import Any, Sequence

from host.runtime import HostRuntime
from host.tenancy import resolve_id_or_code
from host.runner import live_run, starting
from router.errors import RunBusy, TenantFleetError, ValidationFailed
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


async def uninstall_plugin(rt: HostRuntime, plugin_id: str, *, policy: str | None = None, tenant: str | None = None,
                           grace: str | None = None, resume: int | None = None, wait: bool = True) -> dict[str, Any]:
    """Uninstall a plugin (``keep``, ``export`` or ``purge``; None: the plugin's own policy)
    from one tenant (id or code), or from every tenant as a recorded run; exports go to the
    host's ``TENANTFLEET_EXPORT_DIR`` only. With a tenant (and ``wait``), the run's report
    once it is done; otherwise ``{runId, pluginId, state: running}`` as soon as the run is
    recorded (the run goes on as a task the runtime owns: cancelled, recorded, at shutdown;
    `resume` finishes it). The console doesn't wait: a tenant whose plugin unit is busy (a
    migration, a move) is waited for up to ``migrate_move_wait_s``, an hour by default.

    Refused before anything changes: PLUGIN_NOT_FOUND, TENANT_NOT_FOUND, VALIDATION_FAILED
    (unknown policy, a policy the plugin can't do, bad grace, no or unwritable export dir),
    RUN_NOT_FOUND, RUN_BUSY (an uninstall run of the plugin live on any host, or being
    started right now).
    """
    from shard_migrations.uninstall import POLICIES, UninstallOptions, parse_grace, uninstall

    if policy is not None and policy not in POLICIES:
        raise ValidationFailed(f"policy must be one of {', '.join(POLICIES)}", field="policy")
    package = rt.discovery.get(plugin_id)
    tenant_ids = None if tenant is None else ((await resolve_id_or_code(rt.resolver, tenant)).tenant_id,)
    opts = UninstallOptions(policy=policy, tenant_ids=tenant_ids, export_dir=rt.settings.export_dir,
                            grace_s=None if grace is None else parse_grace(grace))
    recorded: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def on_run(run_id: int) -> None:
        if not recorded.done():
            recorded.set_result(run_id)

    async def go() -> dict[str, Any] | TenantFleetError:
        try:
            report = await uninstall(rt.control, rt.owner_pools, rt.settings, package, opts, resume=resume,
                                     on_run=on_run)
        except TenantFleetError as exc:
            if recorded.done():
                raise  # the run failed: recorded as such, and logged by the task's owner
            return exc  # bad input, nothing recorded: the caller's answer, not a task failure
        await rt.registry.announce("global", package.id)
        return report.to_dict()

    # one start at a time per plugin on every host (a double click, two operators), and none
    # while an uninstall run of the plugin is running (a purge waiting out its grace is not):
    # RUN_BUSY, nothing recorded
    async with starting(rt, package.id):
        live = await live_run(rt, "uninstall", package.id, ("running",))
        if live is not None:
            raise RunBusy(f"run {live} uninstalls {package.id} right now: watch it in Runs", runId=live,
                          pluginId=package.id)
        task = rt.tasks.spawn(go(), name=f"uninstall-{package.id}")
        await asyncio.wait({recorded, task}, return_when=asyncio.FIRST_COMPLETED)
    if task.done() or (tenant_ids is not None and wait):
        result: dict[str, Any] | TenantFleetError = await task
        if isinstance(result, TenantFleetError):
            raise result
        return result
    return {"runId": recorded.result(), "pluginId": package.id, "state": "running"}
