"""Fleet migrator: a plugin upgraded across hundreds of tenants on three shards."""
from __future__ import annotations

import asyncpg
from prometheus_client import CollectorRegistry

from shard_migrations.fleet import RunOptions
from shard_migrations.metrics import MigrateMetrics
from tests.conftest import FleetFactory
from tests.migratekit import ledger_rows, make_tenants, migrator, shipped, tenant_objects


async def test_three_hundred_tenants_on_three_shards_upgrade_with_column_index_and_matching_checksums(
        fresh_fleet: FleetFactory) -> None:
    f = await fresh_fleet()
    tenants = await make_tenants(f, 300)
    inv = shipped("inventory")
    async with migrator(f, inv) as m:
        first = await m.apply(RunOptions(to="1.0.0"))
    assert first.state == "done" and first.applied_files == 3 + 300
    registry = CollectorRegistry()
    async with migrator(f, inv, metrics=MigrateMetrics(registry)) as m:
        plan = await m.plan(RunOptions())
        assert plan.files_pending() == 300
        second = await m.apply(RunOptions())
        m.snapshot()
    assert second.state == "done" and second.applied_files == 300
    files = sum(registry.get_sample_value("tenantfleet_migrate_files_applied_total",
                                          {"plugin": "inventory", "shard": s, "scope": "tenant"}) or 0
                for s in f.shard_dsns)
    assert files == 300
    assert registry.get_sample_value("tenantfleet_migrate_units_pending", {"plugin": "inventory", "shard": "shard1"}) == 0

    for shard_id, dsn in f.shard_dsns.items():
        objects = await tenant_objects(dsn)
        mine = [t for t in tenants if t.shard_id == shard_id]
        assert mine
        for t in mine:
            o = objects[t.schema]
            assert "items.location" in o["columns"] and "items_location_idx" in o["indexes"], t
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT count(*) FROM public.inventory_units") == 4
        finally:
            await conn.close()

    by_name = {(m.scope, m.name): m.checksum for m in inv.migrations}
    rows = await ledger_rows(f, "inventory")
    assert len(rows) == 3 + 300 * 2
    assert all(r["checksum"] == by_name[(r["scope"], r["name"])] for r in rows)
    versions = await f.control.fetch("SELECT version_installed, count(*) AS n FROM sys_tenant_plugins "
                                     "WHERE plugin_id = 'inventory' GROUP BY 1")
    assert [(r["version_installed"], r["n"]) for r in versions] == [("1.1.0", 300)]
    assert await f.control.fetchval("SELECT version_installed FROM sys_plugins WHERE plugin_id = 'inventory'") == "1.1.0"
    assert await f.control.fetchval("SELECT enabled FROM sys_tenant_plugins LIMIT 1") is False

    async with migrator(f, inv) as m:
        again = await m.apply(RunOptions())
    assert again.applied_files == 0 and again.state == "done"


async def test_tenant_and_from_options_limit_a_run_to_those_tenants_and_files(fresh_fleet: FleetFactory) -> None:
    f = await fresh_fleet()
    tenants = await make_tenants(f, 9)
    inv = shipped("inventory")
    chosen = tenants[4]
    async with migrator(f, inv) as m:
        only = await m.apply(RunOptions(to="1.0.0", tenant_ids=(chosen.tenant_id,)))
        assert only.state == "done" and only.applied_files == 2      # its shard's public file + its 001
        rows = await ledger_rows(f, "inventory")
        assert {r["tenant_id"] for r in rows if r["scope"] == "tenant"} == {chosen.tenant_id}
        # --from the tenant file 002: public and 001 are not considered, so only 002 is applied
        await m.apply(RunOptions(to="1.0.0"))
        later = await m.apply(RunOptions(from_file="tenant/002_location.sql"))
        assert later.applied_files == len(tenants)
    names = {(r["tenant_id"], r["name"]) for r in await ledger_rows(f, "inventory") if r["scope"] == "tenant"}
    assert len(names) == 2 * len(tenants)
    assert await f.control.fetchval("SELECT version_installed FROM sys_plugins WHERE plugin_id = 'inventory'") == "1.1.0"
