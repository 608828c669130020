"""The plugin registry: what is installed, enabled, killed and configured, per tenant.

Source of truth is the control plane (``sys_plugins``, ``sys_tenant_plugins``,
``sys_plugin_role_templates``, ``roles``). Each host keeps a copy for the request path:
the global rows (all of them, small) and the tenant rows it has used (with a TTL).
Every change made through this module is written to the control plane first, then
published on the registry channel; every host's listener (see `host.events.Subscriber`)
then calls `Registry.invalidate`, so an enable, disable or kill-switch flip reaches all
hosts within one pub/sub hop. With Redis down the change still succeeds and applies on
the host that made it at once; other hosts see it within the cache TTL.

Gate: a plugin serves a tenant when it is not killed (``TENANTFLEET_KILLED_PLUGINS`` or
``sys_plugins.killed``), enabled globally, and enabled for the tenant. Role templates
are suggestions: enabling or upgrading a plugin never changes a tenant's roles; only
`apply_role_template` does, when asked.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping

import asyncpg
import orjson
import semver
from redis.exceptions import RedisError

from host.keys import ANNOUNCE_TIMEOUT_S, AUTH_CACHE_TTL_S, REGISTRY_CACHE_TTL_S
from host.refresh import REFRESH_AFTER, RefreshAhead
from router.errors import NotFound, PluginDisabled, ValidationFailed
from router.models import TenantRecord
from router.pools import ShardPools
from router.settings import Settings
from shard_migrations.engine import apply_tenant
from shard_migrations.packages import Discovery, PluginPackage

log = logging.getLogger("tenantfleet.host.registry")

Publish = Callable[[Mapping[str, Any]], Awaitable[None]]
# the gate's fast path: a copy this close to its expiry is due (`RefreshAhead.due`), checked
# inline before calling `_refresh_due`, which checks again
_DUE_S = REGISTRY_CACHE_TTL_S * (1 - REFRESH_AFTER)
MAX_CONFIG_BYTES = 65536


@dataclass(frozen=True, slots=True)
class GlobalPlugin:
    plugin_id: str
    version_installed: str
    enabled_global: bool
    killed: bool
    config: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class TenantPlugin:
    enabled: bool
    version_installed: str
    config: Mapping[str, Any] = field(default_factory=dict)


async def _no_publish(_: Mapping[str, Any]) -> None:
    return None


class Registry:
    """Registry reads (cached, for the request path) and changes (published to every host)."""

    def __init__(self, control: asyncpg.Pool, settings: Settings, discovery: Discovery, pools: ShardPools,
                 publish: Publish = _no_publish, refresh: RefreshAhead | None = None) -> None:
        self.control = control
        self.settings = settings
        self.discovery = discovery
        self.pools = pools
        self.publish = publish
        self._global: dict[str, GlobalPlugin] = {}
        self._tenant: dict[tuple[str, str], tuple[TenantPlugin | None, float]] = {}
        self._loaded_at = 0.0
        # Bumped by `invalidate`: a tenant row read while a change was being announced may be
        # the old one, so it is returned but not cached.
        self._generation = 0
        self._expiry_reload = asyncio.Lock()
        self._reloading = asyncio.Lock()
        # Copies in use are re-read before they expire, off the request path (host.refresh).
        self.refresh = refresh or RefreshAhead("registry")
        # Settings are frozen: parse TENANTFLEET_KILLED_PLUGINS once, not on every request.
        self._env_killed = settings.killed_plugin_set

    # --- loading and invalidation --------------------------------------------------------
    async def sync_packages(self, packages: Mapping[str, PluginPackage]) -> None:
        """Register loaded plugins and their role templates (existing rows are kept)."""
        async with self.control.acquire() as conn, conn.transaction():
            for pkg in packages.values():
                await conn.execute(
                    "INSERT INTO sys_plugins (plugin_id, api_version, version_installed) VALUES ($1, $2, $3) "
                    "ON CONFLICT (plugin_id) DO NOTHING", pkg.id, pkg.api, str(pkg.version))
                for tpl in pkg.role_templates:
                    await conn.execute(
                        "INSERT INTO sys_plugin_role_templates (plugin_id, role_key, display_name, permissions, version)"
                        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                        pkg.id, tpl["role_key"], tpl.get("display_name", tpl["role_key"]),
                        list(tpl["permissions"]), str(pkg.version))
        await self.reload()

    async def reload(self) -> None:
        # One at a time: two reloads in flight could finish out of order and leave the
        # older read in place (a kill switch undone on this host until the next reload).
        async with self._reloading:
            rows = await self.control.fetch(
                "SELECT plugin_id, version_installed, enabled_global, killed, config FROM sys_plugins")
            self._global = {r["plugin_id"]: GlobalPlugin(r["plugin_id"], r["version_installed"],
                                                         r["enabled_global"], r["killed"], r["config"]) for r in rows}
            self._loaded_at = time.monotonic()

    async def invalidate(self) -> None:
        """Forget cached tenant rows and re-read the global ones (a change was announced)."""
        self._generation += 1
        self._tenant.clear()
        await self.reload()

    async def announce(self, what: str, plugin_id: str | None, tenant_id: str | None = None) -> bool:
        """Drop this host's cached copies, then tell every host (principal caches included).

        Called after the change is committed, so it never fails the change: the message is
        best-effort, bounded by `ANNOUNCE_TIMEOUT_S`. If Redis doesn't take it (down, slow),
        other hosts see the change when their cached copies expire (`REGISTRY_CACHE_TTL_S`,
        `AUTH_CACHE_TTL_S`). Returns whether the announcement went out.
        """
        await self.invalidate()
        try:
            await asyncio.wait_for(self.publish({"what": what, "pluginId": plugin_id, "tenantId": tenant_id}),
                                   ANNOUNCE_TIMEOUT_S)
            return True
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            log.warning("change to %s not announced (%s); other hosts see it within %.0f s (cache TTL)", what,
                        exc.__class__.__name__, max(REGISTRY_CACHE_TTL_S, AUTH_CACHE_TTL_S),
                        extra={"pluginId": plugin_id, "tenantId": tenant_id})
            return False

    # --- the gate (request path) -----------------------------------------------------------
    def is_killed(self, plugin_id: str) -> bool:
        if plugin_id in self._env_killed:
            return True
        g = self._global.get(plugin_id)
        return g is not None and g.killed

    async def tenant_plugin(self, tenant_id: str, plugin_id: str) -> TenantPlugin | None:
        now = time.monotonic()
        if now - self._loaded_at > REGISTRY_CACHE_TTL_S:
            # safety net for a missed pub/sub message; one reload for all the requests that
            # find the copy expired at once, not one control-plane query each
            async with self._expiry_reload:
                if time.monotonic() - self._loaded_at > REGISTRY_CACHE_TTL_S:
                    await self.reload()
            now = time.monotonic()  # an entry that expired while we waited is not served
        hit = self._tenant.get((tenant_id, plugin_id))
        if hit is not None and hit[1] > now:
            self._refresh_due(tenant_id, plugin_id, hit[1], now)
            return hit[0]
        return await self._read_tenant(tenant_id, plugin_id)

    def _refresh_due(self, tenant_id: str, plugin_id: str, expires: float, now: float) -> None:
        """Start the background re-reads due: the global rows, the tenant's row (``expires``)."""
        if self.refresh.due(self._loaded_at + REGISTRY_CACHE_TTL_S, now, REGISTRY_CACHE_TTL_S):
            self.refresh.start(("registry", "global"), self.reload)
        if self.refresh.due(expires, now, REGISTRY_CACHE_TTL_S):
            self.refresh.start(("tenant", tenant_id), functools.partial(self._read_tenant, tenant_id, plugin_id))

    async def _read_tenant(self, tenant_id: str, plugin_id: str) -> TenantPlugin | None:
        """Read the tenant's rows for every plugin in one query (a request that gates two
        plugins, like the manifest, then waits for one round trip, not two) and cache them,
        a loaded plugin without a row as None; unless an invalidation came meanwhile.
        Returns ``plugin_id``'s."""
        now = time.monotonic()
        generation = self._generation
        rows = await self.control.fetch(
            "SELECT plugin_id, enabled, version_installed, config FROM sys_tenant_plugins WHERE tenant_id = $1::uuid",
            tenant_id)
        found: dict[str, TenantPlugin | None] = dict.fromkeys((*self.discovery.plugins, plugin_id))
        for r in rows:
            found[r["plugin_id"]] = TenantPlugin(r["enabled"], r["version_installed"], r["config"])
        if generation == self._generation:
            if len(self._tenant) > 100_000 * (len(self.discovery.plugins) + 1):  # ~100,000 tenants' rows
                self._tenant.clear()
            expires = now + REGISTRY_CACHE_TTL_S
            for pid, tp in found.items():
                self._tenant[(tenant_id, pid)] = (tp, expires)
        return found[plugin_id]

    async def gate(self, plugin_id: str, tenant_id: str) -> TenantPlugin:
        """The tenant's row for a plugin it may use now; PLUGIN_DISABLED (with why) otherwise."""
        # Fast path (every request of an enabled plugin): the same checks and caches as
        # below, without the extra coroutine and error details (bench/request_path.py).
        g = self._global.get(plugin_id)
        if g is not None and g.enabled_global and not g.killed and plugin_id not in self._env_killed:
            now = time.monotonic()
            hit = self._tenant.get((tenant_id, plugin_id))
            if hit is not None and hit[1] > now and now - self._loaded_at <= REGISTRY_CACHE_TTL_S:
                tp = hit[0]
                if tp is not None and tp.enabled:
                    if hit[1] - now < _DUE_S or now - self._loaded_at > REGISTRY_CACHE_TTL_S - _DUE_S:
                        self._refresh_due(tenant_id, plugin_id, hit[1], now)
                    return tp
        details = {"pluginId": plugin_id, "tenantId": tenant_id}
        if self.is_killed(plugin_id):
            raise PluginDisabled(f"plugin {plugin_id} is switched off", reason="killed", **details)
        g = self._global.get(plugin_id)
        if g is None or not g.enabled_global:
            raise PluginDisabled(f"plugin {plugin_id} is disabled", reason="disabled_globally", **details)
        tp = await self.tenant_plugin(tenant_id, plugin_id)
        if tp is None or not tp.enabled:
            raise PluginDisabled(f"plugin {plugin_id} is not enabled for this tenant", reason="disabled_for_tenant",
                                 **details)
        return tp

    def global_config(self, plugin_id: str) -> Mapping[str, Any]:
        g = self._global.get(plugin_id)
        return {} if g is None else g.config

    # --- changes (admin API, CLI, `up`) ------------------------------------------------------
    def package(self, plugin_id: str) -> PluginPackage:
        return self.discovery.get(plugin_id)

    async def list_plugins(self) -> dict[str, Any]:
        """Loaded plugins with their registry state, and the refused ones with reasons."""
        await self.reload()
        counts = {r["plugin_id"]: r["n"] for r in await self.control.fetch(
            "SELECT plugin_id, count(*) AS n FROM sys_tenant_plugins WHERE enabled GROUP BY plugin_id")}
        plugins = []
        for pid, pkg in sorted(self.discovery.plugins.items()):
            g = self._global.get(pid)
            plugins.append({"pluginId": pid, "version": str(pkg.version), "api": pkg.api,
                            "versionInstalled": g.version_installed if g else None,
                            "enabledGlobal": bool(g and g.enabled_global), "killed": self.is_killed(pid),
                            "killedBy": ("env" if pid in self._env_killed else
                                         "db" if g and g.killed else None),
                            "enabledTenants": counts.get(pid, 0)})
        refused = [{"pluginId": k, "reason": v} for k, v in sorted(self.discovery.refused.items())]
        return {"plugins": plugins, "refused": refused}

    async def set_global(self, plugin_id: str, *, enabled: bool | None = None, killed: bool | None = None) -> None:
        """Enable/disable a plugin globally or flip its kill switch. PLUGIN_NOT_FOUND."""
        pkg = self.package(plugin_id)
        await self.control.execute(
            "INSERT INTO sys_plugins (plugin_id, api_version, version_installed, enabled_global, killed) "
            "VALUES ($1, $2, $3, coalesce($4, false), coalesce($5, false)) ON CONFLICT (plugin_id) DO UPDATE SET "
            "enabled_global = coalesce($4, sys_plugins.enabled_global), killed = coalesce($5, sys_plugins.killed), "
            "updated_at = now()", plugin_id, pkg.api, str(pkg.version), enabled, killed)
        log.info("plugin %s: enabled_global=%s killed=%s", plugin_id, enabled, killed,
                 extra={"pluginId": plugin_id})
        await self.announce("global", plugin_id)

    async def enable_for_tenant(self, plugin_id: str, tenant: TenantRecord, *,
                                to: semver.Version | None = None) -> dict[str, Any]:
        """Apply the plugin's pending migrations to the tenant, then enable it there.

        The tenant's ``version_installed`` becomes the loaded package's version, or ``to``
        (an older shipped version, whose files alone are applied: `tenantfleet loadtest
        prepare` sets tenants up one version behind, for the upgrade scenario). Roles are
        not touched. Raises PLUGIN_NOT_FOUND, MIGRATION_FAILED, MIGRATION_DRIFT, SHARD_*.
        """
        pkg = self.package(plugin_id)
        version = pkg.version if to is None else to
        await self.control.execute(
            "INSERT INTO sys_plugins (plugin_id, api_version, version_installed) VALUES ($1, $2, $3) "
            "ON CONFLICT (plugin_id) DO NOTHING", plugin_id, pkg.api, str(version))
        applied = await apply_tenant(self.pools, self.settings, pkg, tenant, to=to, control=self.control)
        await self.control.execute(
            "INSERT INTO sys_tenant_plugins (tenant_id, plugin_id, enabled, version_installed) "
            "VALUES ($1::uuid, $2, true, $3) ON CONFLICT (tenant_id, plugin_id) DO UPDATE SET enabled = true, "
            "version_installed = EXCLUDED.version_installed, updated_at = now()",
            tenant.tenant_id, plugin_id, str(version))
        log.info("plugin %s enabled for tenant %s (%d files applied)", plugin_id, tenant.tenant_id, len(applied),
                 extra={"pluginId": plugin_id, "tenantId": tenant.tenant_id})
        await self.announce("tenant", plugin_id, tenant.tenant_id)
        return {"pluginId": plugin_id, "tenantId": tenant.tenant_id, "enabled": True,
                "versionInstalled": str(version), "applied": applied}

    async def disable_for_tenant(self, plugin_id: str, tenant_id: str) -> dict[str, Any]:
        """Disable for one tenant (data and version are kept). PLUGIN_NOT_FOUND."""
        self.package(plugin_id)
        await self.control.execute(
            "UPDATE sys_tenant_plugins SET enabled = false, updated_at = now() "
            "WHERE tenant_id = $1::uuid AND plugin_id = $2", tenant_id, plugin_id)
        await self.announce("tenant", plugin_id, tenant_id)
        return {"pluginId": plugin_id, "tenantId": tenant_id, "enabled": False}

    async def get_tenant_config(self, plugin_id: str, tenant_id: str) -> dict[str, Any]:
        self.package(plugin_id)
        config = await self.control.fetchval(
            "SELECT config FROM sys_tenant_plugins WHERE tenant_id = $1::uuid AND plugin_id = $2",
            tenant_id, plugin_id)
        return dict(config or {})

    async def set_tenant_config(self, plugin_id: str, tenant_id: str, config: Any) -> dict[str, Any]:
        """Replace the tenant's config for a plugin (a JSON object, at most 64 KiB).

        Raises VALIDATION_FAILED, PLUGIN_NOT_FOUND, and PLUGIN_DISABLED if the plugin was
        never enabled for the tenant (there is no row to hold the config).
        """
        self.package(plugin_id)
        if not isinstance(config, dict):
            raise ValidationFailed("config must be a JSON object", field="config")
        if len(orjson.dumps(config)) > MAX_CONFIG_BYTES:
            raise ValidationFailed(f"config must be at most {MAX_CONFIG_BYTES} bytes of JSON", field="config")
        done = await self.control.fetchval(
            "UPDATE sys_tenant_plugins SET config = $3, updated_at = now() "
            "WHERE tenant_id = $1::uuid AND plugin_id = $2 RETURNING 1", tenant_id, plugin_id, config)
        if not done:
            raise PluginDisabled(f"plugin {plugin_id} was never enabled for this tenant", pluginId=plugin_id,
                                 tenantId=tenant_id)
        await self.announce("config", plugin_id, tenant_id)
        return config

    async def enabled_tenants(self, plugin_id: str) -> list[str]:
        rows = await self.control.fetch(
            "SELECT tp.tenant_id::text AS tenant_id FROM sys_tenant_plugins tp JOIN tenants t USING (tenant_id) "
            "WHERE tp.plugin_id = $1 AND tp.enabled AND t.state = 'active' ORDER BY 1", plugin_id)
        return [r["tenant_id"] for r in rows]

    # --- role templates ----------------------------------------------------------------------
    def role_templates(self, plugin_id: str) -> list[dict[str, Any]]:
        """The templates the loaded package ships."""
        pkg = self.package(plugin_id)
        return [{"roleKey": t["role_key"], "displayName": t.get("display_name", t["role_key"]),
                 "permissions": sorted(t["permissions"]), "version": str(pkg.version)} for t in pkg.role_templates]

    async def role_diff(self, plugin_id: str, tenant_id: str) -> list[dict[str, Any]]:
        """Per template: what applying it would add to the tenant's role (never removes)."""
        templates = self.role_templates(plugin_id)
        existing = {r["role_key"]: r["permissions"] for r in await self.control.fetch(
            "SELECT role_key, permissions FROM roles WHERE tenant_id = $1::uuid AND role_key = ANY ($2::text[])",
            tenant_id, [t["roleKey"] for t in templates])}
        out = []
        for tpl in templates:
            current = existing.get(tpl["roleKey"])
            have = set(current or [])
            out.append({"roleKey": tpl["roleKey"], "exists": current is not None,
                        "add": sorted(set(tpl["permissions"]) - have),
                        "tenantOnly": sorted(have - set(tpl["permissions"])),
                        "upToDate": set(tpl["permissions"]) <= have})
        return out

    async def apply_role_template(self, plugin_id: str, tenant_id: str, role_key: str) -> dict[str, Any]:
        """Add the template's permissions to the tenant's role (created if missing).

        The tenant's own extra permissions stay. Raises PLUGIN_NOT_FOUND, NOT_FOUND (no such template).
        """
        tpl = next((t for t in self.role_templates(plugin_id) if t["roleKey"] == role_key), None)
        if tpl is None:
            raise NotFound(f"plugin {plugin_id} has no role template {role_key}", field="roleKey")
        perms = await self.control.fetchval(
            "INSERT INTO roles (tenant_id, role_key, display_name, permissions) VALUES ($1::uuid, $2, $3, $4) "
            "ON CONFLICT (tenant_id, role_key) DO UPDATE SET permissions = ARRAY(SELECT DISTINCT p FROM "
            "unnest(roles.permissions || EXCLUDED.permissions) AS p ORDER BY p), updated_at = now() "
            "RETURNING permissions", tenant_id, role_key, tpl["displayName"], tpl["permissions"])
        await self.announce("roles", plugin_id, tenant_id)
        return {"tenantId": tenant_id, "roleKey": role_key, "permissions": list(perms)}
