"""Planning and verify over a fleet whose tenants are in mixed states: up to date, a file
missing, no ledger rows, a drifted file, suspended, not targeted; and the no-op apply's flip
of a stale registry row."""
from __future__ import annotations

import asyncpg

from shard_migrations.fleet import RunOptions
from shard_migrations.verify import verify
from tests.conftest import FleetFactory
from tests.migratekit import make_tenants, migrator, shipped


async def test_plan_and_verify_name_exactly_the_tenants_that_are_not_up_to_date_in_code_order(
        fresh_fleet: FleetFactory) -> None:
    f = await fresh_fleet()
    tenants = sorted(await make_tenants(f, 30), key=lambda t: t.code)
    inv = shipped("inventory")
    async with migrator(f, inv) as m:
        assert (await m.apply(RunOptions())).state == "done"

    # a no-op apply flips a registry row that says otherwise, and touches no other row
    stale = tenants[3]
    await f.control.execute("UPDATE sys_tenant_plugins SET version_installed = '1.0.0' "
                            "WHERE tenant_id = $1 AND plugin_id = 'inventory'", stale.tenant_id)
    before = {r["tenant_id"]: r["updated_at"] for r in await f.control.fetch(
        "SELECT tenant_id::text AS tenant_id, updated_at FROM sys_tenant_plugins WHERE plugin_id = 'inventory'")}
    async with migrator(f, inv) as m:
        noop = await m.apply(RunOptions())
    assert noop.state == "done" and noop.applied_files == 0
    after = {r["tenant_id"]: (r["version_installed"], r["updated_at"]) for r in await f.control.fetch(
        "SELECT tenant_id::text AS tenant_id, version_installed, updated_at FROM sys_tenant_plugins "
        "WHERE plugin_id = 'inventory'")}
    assert {v for v, _ in after.values()} == {"1.1.0"}
    assert [t for t, (_, at) in after.items() if at != before[t]] == [stale.tenant_id]

    # one shard's tenants in every state a plan tells apart
    shard = tenants[0].shard_id
    mine = [t for t in tenants if t.shard_id == shard]
    assert len(mine) >= 6, "placement spreads 30 tenants over 3 shards"
    no_002, no_rows, drifted, suspended, not_targeted = mine[1], mine[2], mine[3], mine[4], mine[5]
    conn = await asyncpg.connect(f.shard_dsns[shard])
    try:
        await conn.execute("DELETE FROM fleet.sys_plugin_migrations WHERE tenant_id = ANY($1::uuid[]) "
                           "AND name = '002_location.sql'", [no_002.tenant_id, not_targeted.tenant_id])
        await conn.execute("DELETE FROM fleet.sys_plugin_migrations WHERE tenant_id = $1", no_rows.tenant_id)
        await conn.execute("UPDATE fleet.sys_plugin_migrations SET checksum = repeat('0', 64) "
                           "WHERE tenant_id = $1 AND name = '002_location.sql'", drifted.tenant_id)
    finally:
        await conn.close()
    await f.directory.suspend(suspended.tenant_id)
    await f.control.execute("UPDATE tenants SET state = 'provisioning' WHERE tenant_id = $1", not_targeted.tenant_id)

    async with migrator(f, inv) as m:
        plan = await m.plan(RunOptions())
        report = await verify(f.control, m.pools, inv)
    sp = plan.shards[shard]
    assert [(t.tenant.code, [x.name for x in t.pending]) for t in sp.tenants] == [
        (no_002.code, ["002_location.sql"]), (no_rows.code, ["001_init.sql", "002_location.sql"])]
    assert sorted(sp.up_to_date) == sorted(t.tenant_id for t in mine if t not in (no_002, no_rows, not_targeted))
    assert [(d.tenant_id, d.name) for d in plan.drift] == [(drifted.tenant_id, "002_location.sql")]
    assert sp.to_dict() == {"shardId": shard, "reachable": True, "error": None, "publicPending": [],
                            "tenantsPending": 2, "tenantsUpToDate": len(mine) - 3, "filesPending": 3, "drift": 1}
    others = [s for sid, s in plan.shards.items() if sid != shard]
    assert all(not s.tenants and not s.drift and not s.public_pending for s in others)
    assert sum(len(s.up_to_date) for s in others) == len(tenants) - len(mine)

    assert report.tenants == len(tenants) - 1 and report.shards == 3 and not report.unreachable
    assert [(d.tenant_id, d.name) for d in report.drift] == [(drifted.tenant_id, "002_location.sql")]
    assert report.missing == [
        {"shardId": shard, "tenantId": no_002.tenant_id, "file": "tenant/002_location.sql"},
        {"shardId": shard, "tenantId": no_rows.tenant_id, "file": "tenant/001_init.sql"},
        {"shardId": shard, "tenantId": no_rows.tenant_id, "file": "tenant/002_location.sql"}]

    # --tenant plans that tenant alone (its shard only)
    async with migrator(f, inv) as m:
        one = await m.plan(RunOptions(tenant_ids=(no_rows.tenant_id,)))
    assert list(one.shards) == [shard] and one.files_pending() == 2 and not one.shards[shard].up_to_date
