"""Fleet migrator: two migrators at once, a tenant whose table is locked, and one tenant
brought up to date through `apply_tenant` (the host's "enable plugin" path)."""
from __future__ import annotations

import asyncio
import json

import asyncpg

from shard_migrations.engine import apply_tenant
from shard_migrations.fleet import RunOptions, migration_pools
from tests.conftest import FleetFactory
from tests.migratekit import cli_env, ledger_rows, make_tenants, migrator, run_cli, shipped, tenant_objects, wait_for


async def test_two_migrators_started_at_once_apply_every_file_exactly_once(fresh_fleet: FleetFactory) -> None:
    f = await fresh_fleet()
    tenants = await make_tenants(f, 90)
    env = cli_env(f)
    args = ("--json", "migrate", "apply", "inventory", "--concurrency", "2", "--batch-size", "10")
    (rc1, out1, err1), (rc2, out2, err2) = await asyncio.gather(run_cli(f, *args, env=env), run_cli(f, *args, env=env))
    assert (rc1, rc2) == (0, 0), err1 + err2
    applied = json.loads(out1)["appliedFiles"] + json.loads(out2)["appliedFiles"]
    expected = len(f.shard_dsns) + 2 * len(tenants)
    assert applied == expected
    rows = await ledger_rows(f, "inventory")
    assert len(rows) == expected
    assert len({(r["shard_id"], r["scope"], r["tenant_id"], r["name"]) for r in rows}) == expected


async def test_a_tenant_whose_table_is_locked_backs_off_and_completes_after_release_without_holding_up_the_rest(
        fresh_fleet: FleetFactory) -> None:
    f = await fresh_fleet(lock_timeout_ms=100)
    tenants = await make_tenants(f, 30)
    inv = shipped("inventory")
    async with migrator(f, inv) as m:
        assert (await m.apply(RunOptions(to="1.0.0"))).state == "done"
    victim = tenants[0]
    others = {t.tenant_id for t in tenants} - {victim.tenant_id}
    holder = await asyncpg.connect(f.shard_dsns[victim.shard_id])
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT set_config('search_path', quote_ident($1) || ', public', true)", victim.schema)
        await holder.fetchval("SELECT count(*) FROM items")      # ACCESS SHARE until the transaction ends
        async with migrator(f, inv) as m:
            run = asyncio.create_task(m.apply(RunOptions()))

            async def rest_done_and_victim_retrying() -> bool:
                rows = await ledger_rows(f, "inventory")
                upgraded = {r["tenant_id"] for r in rows if r["name"] == "002_location.sql"}
                attempts = await f.control.fetchval(
                    "SELECT attempts FROM fleet_run_items WHERE tenant_id = $1 ORDER BY run_id DESC LIMIT 1",
                    victim.tenant_id)
                return others <= upgraded and (attempts or 0) >= 2

            await wait_for(rest_done_and_victim_retrying, timeout=60, what="the other tenants while one is locked")
            assert not run.done()
            # another process sees the live run and the tenant still open
            rc, out, err = await run_cli(f, "--json", "migrate", "status", str(m.run_id))
            assert rc == 0, err
            status = json.loads(out)
            assert status["state"] == "running" and status["alive"] is True
            victim_shard = next(s for s in status["shards"] if s["shardId"] == victim.shard_id)
            assert victim_shard["running"] == 1 and victim_shard["attempts"] >= 2
            assert "items.location" not in (await tenant_objects(f.shard_dsns[victim.shard_id]))[victim.schema]["columns"]
            await tx.rollback()
            report = await asyncio.wait_for(run, 60)
    finally:
        await holder.close()
    assert report.state == "done" and report.applied_files == len(tenants)
    assert "items.location" in (await tenant_objects(f.shard_dsns[victim.shard_id]))[victim.schema]["columns"]
    error = await f.control.fetchval("SELECT last_error FROM fleet_run_items WHERE run_id = $1 AND tenant_id = $2",
                                     report.run_id, victim.tenant_id)
    assert error is None


async def test_apply_tenant_brings_one_new_tenant_up_to_date_and_then_has_nothing_to_do(
        fresh_fleet: FleetFactory) -> None:
    f = await fresh_fleet()
    await make_tenants(f, 3)
    inv = shipped("inventory")
    async with migrator(f, inv) as m:
        await m.apply(RunOptions())
    new = (await make_tenants(f, 1))[0]
    async with migration_pools(f.settings, f.directory.dsn_of) as pools:
        applied, again = await asyncio.gather(apply_tenant(pools, f.settings, inv, new),
                                              apply_tenant(pools, f.settings, inv, new))
        assert sorted(applied + again) == ["tenant/001_init.sql", "tenant/002_location.sql"]
        assert await apply_tenant(pools, f.settings, inv, new) == []
    # on a shard that never had the plugin: its public files come first
    g = await fresh_fleet(shards=1)
    lone = (await make_tenants(g, 1))[0]
    applied = await apply_tenant(g.shard_pools, g.settings, inv, lone)
    assert applied == ["public/001_reference.sql", "tenant/001_init.sql", "tenant/002_location.sql"]
    assert len(await ledger_rows(g, "inventory")) == 3
