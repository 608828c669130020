"""`tenantfleet serve`, `tenantfleet plugins ...`, `tenantfleet keys create`: adapters over the host's services."""
from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, TypeVar

import click
import orjson

from host.cli.base import CliState, cli, emit, pass_state, run, stop_on_signals
from router.errors import ValidationFailed

# The host runtime (aiohttp, asyncpg, redis, prometheus-client) is imported when a command
# runs, so that loading the CLI stays fast.
if TYPE_CHECKING:
    from host.runtime import HostRuntime
    from router.models import TenantRecord

T = TypeVar("T")


@asynccontextmanager
async def _runtime(state: CliState) -> AsyncIterator[HostRuntime]:
    from host.metrics import HostMetrics
    from host.runtime import open_host_runtime
    from shard_migrations.packages import discover

    # one change, then exit: no listener, no event delivery, and Redis is not waited for
    async with open_host_runtime(state.settings, discover(), HostMetrics(), background=False) as rt:
        yield rt


async def _resolve_tenant(rt: HostRuntime, ref: str) -> TenantRecord:
    """`host.tenancy.resolve_id_or_code` on the runtime's resolver, imported when a command runs."""
    from host.tenancy import resolve_id_or_code as resolve

    return await resolve(rt.resolver, ref)


def _with_runtime(state: CliState, fn: Callable[[HostRuntime], Awaitable[T]]) -> T:
    async def go() -> T:
        async with _runtime(state) as rt:
            return await fn(rt)
    return run(go())


@cli.command()
@click.option("--port", type=int, default=None, help="Port (default TENANTFLEET_HOST_PORT).")
@pass_state
def serve(state: CliState, port: int | None) -> None:
    """Run the plugin host until SIGINT/SIGTERM (stops accepting, drains, then closes)."""
    from host.app import run as run_host
    from host.app import serve as serve_host
    from host.logs import json_logging

    async def go() -> None:
        async def ready(url: str) -> None:
            click.echo(f"host listening on {url}", err=True)
        await serve_host(state.settings, port=port, ready=ready, stop=stop_on_signals())
    with json_logging(state.settings.log_level):
        run_host(go())  # on uvloop when it is installed


@cli.group()
def plugins() -> None:
    """Plugins: list, enable/disable (globally or per tenant), kill switch, config, role templates,
    uninstall (keep, export, purge) and re-import of an export."""


@plugins.command("list")
@pass_state
def plugins_list(state: CliState) -> None:
    """Loaded plugins with versions and state, then the refused ones."""
    data = _with_runtime(state, lambda rt: rt.registry.list_plugins())
    if state.json:
        emit(state, data)
        return
    emit(state, data["plugins"], columns=["pluginId", "version", "versionInstalled", "enabledGlobal", "killed",
                                          "enabledTenants"], title="plugins")
    if data["refused"]:
        emit(state, data["refused"], columns=["pluginId", "reason"], title="refused")


def _toggle(state: CliState, plugin_id: str, tenant: str | None, enable: bool) -> None:
    async def go(rt: HostRuntime) -> dict[str, Any]:
        if tenant is None:
            await rt.registry.set_global(plugin_id, enabled=enable)
            return {"pluginId": plugin_id, "enabledGlobal": enable}
        rec = await _resolve_tenant(rt, tenant)
        if enable:
            return await rt.registry.enable_for_tenant(plugin_id, rec)
        return await rt.registry.disable_for_tenant(plugin_id, rec.tenant_id)
    emit(state, _with_runtime(state, go))


@plugins.command("enable")
@click.argument("plugin_id")
@click.option("--tenant", help="Tenant id or code (default: enable globally).")
@pass_state
def plugins_enable(state: CliState, plugin_id: str, tenant: str | None) -> None:
    """Enable a plugin globally, or for one tenant (applying its pending migrations there)."""
    _toggle(state, plugin_id, tenant, True)


@plugins.command("disable")
@click.argument("plugin_id")
@click.option("--tenant", help="Tenant id or code (default: disable globally).")
@pass_state
def plugins_disable(state: CliState, plugin_id: str, tenant: str | None) -> None:
    """Disable a plugin globally or for one tenant (data is kept)."""
    _toggle(state, plugin_id, tenant, False)


@plugins.command("kill")
@click.argument("plugin_id")
@click.option("--revive", is_flag=True, help="Clear the DB kill switch instead.")
@pass_state
def plugins_kill(state: CliState, plugin_id: str, revive: bool) -> None:
    """Flip the DB kill switch; every host refuses the plugin within a second."""
    async def go(rt: HostRuntime) -> dict[str, Any]:
        await rt.registry.set_global(plugin_id, killed=not revive)
        return {"pluginId": plugin_id, "killed": not revive}
    emit(state, _with_runtime(state, go))


@plugins.command("config")
@click.argument("plugin_id")
@click.argument("tenant")
@click.option("--set", "new", help="Replace the tenant's config with this JSON object.")
@pass_state
def plugins_config(state: CliState, plugin_id: str, tenant: str, new: str | None) -> None:
    """Show (or replace with --set) a plugin's config for one tenant."""
    async def go(rt: HostRuntime) -> dict[str, Any]:
        rec = await _resolve_tenant(rt, tenant)
        if new is None:
            return await rt.registry.get_tenant_config(plugin_id, rec.tenant_id)
        try:
            value = orjson.loads(new)
        except orjson.JSONDecodeError:
            raise ValidationFailed("--set must be a JSON object", field="set") from None
        return await rt.registry.set_tenant_config(plugin_id, rec.tenant_id, value)
    emit(state, _with_runtime(state, go))


@plugins.command("roles")
@click.argument("plugin_id")
@click.argument("tenant")
@click.option("--apply", "role_key", help="Apply this role template to the tenant (adds permissions).")
@pass_state
def plugins_roles(state: CliState, plugin_id: str, tenant: str, role_key: str | None) -> None:
    """Diff a plugin's role templates against a tenant's roles, or --apply one."""
    async def go(rt: HostRuntime) -> Any:
        rec = await _resolve_tenant(rt, tenant)
        if role_key is None:
            return await rt.registry.role_diff(plugin_id, rec.tenant_id)
        return await rt.registry.apply_role_template(plugin_id, rec.tenant_id, role_key)
    emit(state, _with_runtime(state, go))


@cli.group()
def keys() -> None:
    """API keys (principals) for tenants."""


@keys.command("create")
@click.option("--tenant", required=True, help="Tenant id or code.")
@click.option("--name", required=True, help="Who the key is for.")
@click.option("--role", "roles", multiple=True, help="A tenant role key (repeatable).")
@pass_state
def keys_create(state: CliState, tenant: str, name: str, roles: tuple[str, ...]) -> None:
    """Create a principal and print its API key (shown once; only its hash is stored)."""
    async def go(rt: HostRuntime) -> dict[str, Any]:
        rec = await _resolve_tenant(rt, tenant)
        return await rt.rbac.create_principal(tenant_id=rec.tenant_id, name=name, roles=list(roles))
    emit(state, _with_runtime(state, go))


@keys.command("list")
@click.option("--tenant", help="Tenant id or code; without it, the fleet-level (admin) principals.")
@pass_state
def keys_list(state: CliState, tenant: str | None) -> None:
    """List principals: id, name, roles, created (never the keys; they are stored hashed)."""
    async def go(rt: HostRuntime) -> list[dict[str, Any]]:
        tenant_id = None if tenant is None else (await _resolve_tenant(rt, tenant)).tenant_id
        return await rt.rbac.list_principals(tenant_id)
    emit(state, _with_runtime(state, go), columns=["principalId", "name", "roles", "isAdmin", "createdAt"])


@keys.command("revoke")
@click.argument("principal_id")
@pass_state
def keys_revoke(state: CliState, principal_id: str) -> None:
    """Revoke a principal's key; every running host refuses it within about a second."""
    async def go(rt: HostRuntime) -> dict[str, Any]:
        revoked = await rt.rbac.revoke_principal(principal_id)
        await rt.registry.announce("principals", None, revoked["tenantId"])
        return revoked
    emit(state, _with_runtime(state, go))
