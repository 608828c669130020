"""The host after a move (issue 9): it closes its connections to a shard it no longer
serves (drained: idle for idle_shard_close_s; or set offline) and reopens on demand; a
stale fence whose re-resolve still names the old placement backs off instead of
spending every retry at once. Real host, real Mover, real servers."""
from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import asyncpg

from host.metrics import HostMetrics
from host.tx import TenantTx, keep_connection
from router.client import ResolveClient
from router.pools import ShardPools
from shard_migrations.moves.mover import Mover
from tests.conftest import FleetFactory
from tests.fleetkit import Fleet
from tests.hostkit import auth, code, host_settings, running_host, tenant_with_key
from tests.migratekit import wait_for
from tests.test_host_tx import _path


async def _login_backends(fleet: Fleet, shard_id: str) -> int:
    """Backends of the shard's login role (the host's request path) in this fleet's database there."""
    login = await fleet.control.fetchval("SELECT login_role FROM shards WHERE shard_id = $1", shard_id)
    conn = await asyncpg.connect(fleet.shard_dsns[shard_id])
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND usename = $1", login))
    finally:
        await conn.close()


async def test_a_host_closes_its_connections_to_a_drained_shard_and_reopens_when_a_tenant_comes_back(
        fresh_fleet: FleetFactory) -> None:
    f = await fresh_fleet()
    async with running_host(host_settings(f, idle_shard_close_s=1.0)) as h:
        await tenant_with_key(f, h, shard_id="shard1")  # the target has the plugin's public scope
        rec, key = await tenant_with_key(f, h, shard_id="shard2")

        async def served(expected_shard: str) -> None:
            async with h.http.get("/api/plugins/inventory/items?limit=1", headers=auth(key, rec.code)) as r:
                assert r.status == 200, await r.text()
            assert (await f.directory.get(id=rec.tenant_id)).shard_id == expected_shard

        await served("shard2")
        assert await _login_backends(f, "shard2") > 0
        mover = Mover(f.directory, f.settings)
        await mover.start(await f.directory.get(id=rec.tenant_id), "shard1", "offline")  # shard2 is now empty
        await served("shard1")

        async def shard2_closed() -> bool:
            return await _login_backends(f, "shard2") == 0
        await wait_for(shard2_closed, timeout=30, what="the host's connections to the drained shard closed")
        await mover.start(await f.directory.get(id=rec.tenant_id), "shard2", "offline")
        await served("shard2")
        assert await _login_backends(f, "shard2") > 0


async def test_a_host_closes_its_connections_to_a_shard_set_offline(fresh_fleet: FleetFactory) -> None:
    f = await fresh_fleet()
    async with running_host(host_settings(f, idle_shard_close_s=3600.0)) as h:
        rec, key = await tenant_with_key(f, h, shard_id="shard3")
        async with h.http.get("/api/plugins/inventory/items?limit=1", headers=auth(key, rec.code)) as r:
            assert r.status == 200
        assert await _login_backends(f, "shard3") > 0
        await f.directory.set_shard_state("shard3", "offline")

        async def closed() -> bool:
            return await _login_backends(f, "shard3") == 0
        await wait_for(closed, timeout=30, what="the host's connections to the offline shard closed")
        await f.directory.set_shard_state("shard3", "active")
        async with h.http.get("/api/plugins/inventory/items?limit=1", headers=auth(key, rec.code)) as r:
            assert r.status == 200
        assert await _login_backends(f, "shard3") > 0


async def test_a_stale_fence_backs_off_until_the_directory_follows_instead_of_failing_at_once(
        fleet: Fleet) -> None:
    """The shard's fence rises before the directory follows (as in a cutover): the
    transaction waits for the directory (within fence_wait_ms) and then goes through."""
    async with AsyncExitStack() as stack:
        pools = await stack.enter_async_context(ShardPools(fleet.settings, fleet.directory.dsn_of,
                                                           reset=keep_connection))
        resolver = await stack.enter_async_context(ResolveClient(fleet.settings, fleet.directory.lookup))
        metrics = HostMetrics()
        tx = await stack.enter_async_context(TenantTx(fleet.settings, resolver, pools, metrics))
        rec = await fleet.directory.create_tenant(code(), shard_id="shard1")
        assert await tx.run(rec.tenant_id, _path) == f"{rec.schema}, public"  # resolved and cached
        shard = await asyncpg.connect(fleet.shard_dsns["shard1"])
        stack.push_async_callback(shard.close)
        await shard.execute("UPDATE fleet.tenant_fence SET epoch = $2 WHERE tenant_id = $1::uuid",
                            rec.tenant_id, rec.epoch + 1)
        run = asyncio.ensure_future(tx.run(rec.tenant_id, _path))
        try:
            async def backing_off() -> bool:
                return bool(metrics.fence_stale_waits._value.get() > 0)
            await wait_for(backing_off, timeout=10, what="the transaction backing off for the directory")
            assert not run.done()  # neither failed nor spun through its retries
            await fleet.control.execute("UPDATE tenants SET epoch = $2 WHERE tenant_id = $1::uuid",
                                        rec.tenant_id, rec.epoch + 1)  # the directory follows
            assert await asyncio.wait_for(run, 10) == f"{rec.schema}, public"
        finally:
            if not run.done():
                run.cancel()
                await asyncio.gather(run, return_exceptions=True)
        assert metrics.fence_retries._value.get() == 1
