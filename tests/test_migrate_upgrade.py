"""Fleet migrator: a plugin upgraded across hundreds of tenants on three shards."""
from __future__ import annotations

import asyncpg

from shard_migrations.fleet import RunOptions
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
    async with migrator(f, inv) as m:
        plan = await m.plan(RunOptions())
        assert plan.files_pending() == 300
        second = await m.apply(RunOptions())
    assert second.state == "done" and second.applied_files == 300

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
