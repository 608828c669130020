"""Service functions behind `tenantfleet loadtest prepare` and `tenantfleet loadtest slow-shard`.

`prepare_load_tenants` sets up the tenants a load test acts for: created if missing
(``PREFIX-0001`` ...), inventory enabled (by default one version behind the shipped one, so
the ``upgrade`` scenario has a next version to roll), its role templates applied, an API
key each, and ``items`` inventory items (ids 1..items). It returns the targets document
that `loadtests` reads (the format is loadtests/targets.py's; this module doesn't import
it: the load tests and the asyncio code stay apart).

`hold_shard` makes one shard slow on purpose for the ``shard-slow`` scenario: for
``seconds`` it repeatedly takes, for ``hold_ms``, the exclusive tenant lock a mover takes at
cutover (``pg_advisory_xact_lock(fleet.tenant_lock_key(id))``) on every tenant of that
shard, then releases it for ``gap_ms``; requests to those tenants wait in the fence
meanwhile. Bounded in time; values only as parameters.
"""
from __future__ import annotations

import asyncio
import re
import time
from typing import Any, Mapping

import semver

from host.metrics import HostMetrics
from host.runtime import HostRuntime, open_host_runtime
from plugins.api import Db
from router.errors import NotFound, TenantNotFound, ValidationFailed
from router.models import TenantRecord
from router.settings import Settings
from shard_migrations.packages import PluginPackage, discover

PLUGIN = "inventory"
PREFIX = re.compile(r"^[a-z][a-z0-9]{0,19}$")
PARALLEL = 8
PRINCIPAL = "loadtest"
TARGETS_VERSION = 1     # loadtests/targets.py's format
MAX_HOLD_TENANTS = 10_000


def previous_version(pkg: PluginPackage) -> semver.Version:
    """The newest version a migration file of ``pkg`` introduced before its own (its own if none)."""
    older = sorted({m.since for m in pkg.migrations if m.since < pkg.version})
    return older[-1] if older else pkg.version


async def _one(rt: HostRuntime, code: str, items: int, version: semver.Version,
               known_keys: Mapping[str, str]) -> dict[str, Any]:
    try:
        rec: TenantRecord = await rt.directory.get(code=code)
        fresh = False
    except TenantNotFound:
        rec = await rt.directory.create_tenant(code, [])
        fresh = True
    if fresh:
        # a reused tenant keeps the version it has (a past upgrade run may have moved it on)
        await rt.registry.enable_for_tenant(PLUGIN, rec, to=version)
        for tpl in rt.registry.role_templates(PLUGIN):
            await rt.registry.apply_role_template(PLUGIN, rec.tenant_id, tpl["roleKey"])
    key = known_keys.get(code)
    if key is None:
        roles = [tpl["roleKey"] for tpl in rt.registry.role_templates(PLUGIN)]
        key = (await rt.rbac.create_principal(tenant_id=rec.tenant_id, name=PRINCIPAL, roles=roles))["apiKey"]

    async def seed(db: Db) -> None:
        await db.execute("INSERT INTO items (sku, name, qty) SELECT 'seed-' || g, 'Seed item ' || g, g "
                         "FROM generate_series(1, $1::int) AS g ON CONFLICT (sku) DO NOTHING", items)
    await rt.tx.run(rec.tenant_id, seed)
    return {"tenantId": rec.tenant_id, "code": rec.code, "shardId": rec.shard_id, "apiKey": key, "items": items}


async def prepare_load_tenants(settings: Settings, *, tenants: int, url: str, prefix: str = "lt", items: int = 20,
                               version: str | None = None,
                               known_keys: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Set up ``tenants`` load-test tenants and return the targets document (see module docstring).

    ``version``: the inventory version new tenants get (default: the one before the shipped
    one). ``known_keys`` ({code: key}, e.g. from an earlier targets file) are reused instead
    of creating a new key. Idempotent for existing tenants. Raises VALIDATION_FAILED (bad
    prefix, count, items or version), PLUGIN_NOT_FOUND, MIGRATION_FAILED, SHARD_UNREACHABLE.
    """
    if not PREFIX.match(prefix):
        raise ValidationFailed("prefix must be a lowercase letter then up to 19 lowercase letters or digits",
                               field="prefix")
    if not 1 <= tenants <= 10_000:
        raise ValidationFailed("tenants must be between 1 and 10000", field="tenants")
    if not 1 <= items <= 100_000:
        raise ValidationFailed("items must be between 1 and 100000", field="items")
    async with open_host_runtime(settings, discover(), HostMetrics(), background=False) as rt:
        pkg = rt.registry.package(PLUGIN)
        target = previous_version(pkg) if version is None else pkg.check_target(version)
        sem = asyncio.Semaphore(PARALLEL)

        async def one(i: int) -> dict[str, Any]:
            async with sem:
                return await _one(rt, f"{prefix}-{i:04d}", items, target, known_keys or {})
        rows = await asyncio.gather(*(one(i) for i in range(1, tenants + 1)))
        await rt.registry.set_global(PLUGIN, enabled=True)
    return {"version": TARGETS_VERSION, "url": url, "plugin": PLUGIN, "pluginVersion": str(target),
            "tenants": list(rows)}


async def hold_shard(settings: Settings, shard_id: str, *, seconds: float, hold_ms: int = 250,
                     gap_ms: int = 250) -> dict[str, Any]:
    """Make ``shard_id`` slow for ``seconds`` (see the module docstring); returns what was held.

    Raises VALIDATION_FAILED for bad bounds, NOT_FOUND for a shard without tenants,
    SHARD_NOT_FOUND / SHARD_UNREACHABLE."""
    if not 0 < seconds <= 3600:
        raise ValidationFailed("seconds must be above 0 and at most 3600", field="seconds")
    if not 1 <= hold_ms <= 60_000 or not 0 <= gap_ms <= 60_000:
        raise ValidationFailed("hold-ms must be 1-60000 and gap-ms 0-60000", field="hold_ms")
    async with open_host_runtime(settings, discover(), HostMetrics(), background=False) as rt:
        records = await rt.directory.list_tenants(shard_id=shard_id, limit=MAX_HOLD_TENANTS)
        if not records:
            await rt.directory.get_shard(shard_id)  # SHARD_NOT_FOUND for an unknown shard
            raise NotFound(f"shard {shard_id} has no tenants to hold", shardId=shard_id)
        ids = [r.tenant_id for r in records]
        pool = await rt.owner_pools.get(shard_id)
        deadline = time.monotonic() + seconds
        holds = 0
        async with pool.acquire() as conn:
            while time.monotonic() < deadline:
                async with conn.transaction():
                    await conn.execute("SELECT set_config('lock_timeout', $1, true)", f"{max(hold_ms, 1000)}ms")
                    await conn.fetchval("SELECT count(pg_advisory_xact_lock(fleet.tenant_lock_key(t))) "
                                        "FROM unnest($1::uuid[]) AS t", ids)
                    holds += 1
                    await asyncio.sleep(min(hold_ms / 1000, max(0.0, deadline - time.monotonic())))
                await asyncio.sleep(min(gap_ms / 1000, max(0.0, deadline - time.monotonic())))
    return {"shardId": shard_id, "tenants": len(ids), "holds": holds, "seconds": seconds,
            "holdMs": hold_ms, "gapMs": gap_ms}
