"""with_tenant_tx: search_path isolation on a pool of one, errors and cancellation, mixed rollouts, the fence."""
from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import Any, AsyncIterator

import asyncpg
import pytest
import pytest_asyncio
import semver

from host.metrics import HostMetrics
from host.tx import TenantTx, enter_sql, keep_connection
from router.client import ResolveClient
from router.errors import TenantMoving
from router.models import TenantRecord
from router.pools import ShardPools
from shard_migrations.engine import apply_tenant
from shard_migrations.packages import discover
from tests.fleetkit import Fleet
from tests.hostkit import code


class Kit:
    def __init__(self, fleet: Fleet, tx: TenantTx, pools: ShardPools, resolver: ResolveClient,
                 metrics: HostMetrics) -> None:
        self.fleet, self.tx, self.pools, self.resolver, self.metrics = fleet, tx, pools, resolver, metrics


@pytest_asyncio.fixture(loop_scope="session")
async def kit(fleet: Fleet) -> AsyncIterator[Kit]:
    """TenantTx over a pool of ONE connection per shard."""
    settings = fleet.settings.model_copy(update={"shard_pool_min": 1, "shard_pool_max": 1})
    async with AsyncExitStack() as stack:
        pools = await stack.enter_async_context(ShardPools(settings, fleet.directory.dsn_of, reset=keep_connection))
        resolver = await stack.enter_async_context(ResolveClient(settings, fleet.directory.lookup))
        metrics = HostMetrics()
        tx = await stack.enter_async_context(TenantTx(settings, resolver, pools, metrics))
        yield Kit(fleet, tx, pools, resolver, metrics)


async def _inventory_tenant(kit: Kit, version: str = "1.1.0", shard_id: str = "shard1") -> TenantRecord:
    rec = await kit.fleet.directory.create_tenant(code(), shard_id=shard_id)
    pkg = discover().get("inventory")
    await apply_tenant(kit.fleet.shard_pools, kit.fleet.settings, pkg, rec, to=semver.Version.parse(version))
    return rec


async def _until_activity(fleet: Fleet, shard_id: str, count_sql: str, timeout: float = 5.0) -> None:
    """Poll the shard until ``count_sql`` (a constant query) counts at least one row."""
    conn = await asyncpg.connect(fleet.shard_dsns[shard_id])
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while not await conn.fetchval(count_sql):
            assert asyncio.get_running_loop().time() < deadline, count_sql
            await asyncio.sleep(0.01)
    finally:
        await conn.close()


async def _path(conn: Any) -> str:
    return str(await conn.fetchval("SELECT current_setting('search_path')"))


async def _session_state(kit: Kit, shard_id: str) -> tuple[str, int, bool]:
    async with kit.tx.connection(shard_id) as conn:  # the one connection, between transactions
        path = await conn.fetchval("SELECT current_setting('search_path')")
        locks = await conn.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()")
        return path, locks, conn.is_in_transaction()


async def test_one_pooled_connection_serves_a_then_b_then_a_each_in_its_own_schema(kit: Kit) -> None:
    a, b = await _inventory_tenant(kit), await _inventory_tenant(kit)
    seen = [await kit.tx.run(t.tenant_id, _path) for t in (a, b, a)]
    assert seen == [f"{a.schema}, public", f"{b.schema}, public", f"{a.schema}, public"]
    assert (await kit.pools.get("shard1")).get_size() == 1
    path, locks, in_tx = await _session_state(kit, "shard1")
    assert a.schema not in path and b.schema not in path and locks == 0 and not in_tx


async def test_an_error_or_a_cancellation_leaves_no_path_lock_or_transaction_behind(kit: Kit) -> None:
    a = await _inventory_tenant(kit)

    async def boom(conn: Any) -> None:
        await conn.execute("INSERT INTO items (sku, qty) VALUES ('gone', 1)")
        raise RuntimeError("handler bug")

    with pytest.raises(RuntimeError):
        await kit.tx.run(a.tenant_id, boom)

    async def slow(conn: Any) -> None:
        await conn.execute("INSERT INTO items (sku, qty) VALUES ('gone2', 1)")
        await conn.execute("SELECT pg_sleep(10)")

    task = asyncio.create_task(kit.tx.run(a.tenant_id, slow))
    await _until_activity(kit.fleet, "shard1", "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(10)'"
                          " AND state = 'active'")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    path, locks, in_tx = await _session_state(kit, "shard1")
    assert a.schema not in path and locks == 0 and not in_tx

    async def count(conn: Any) -> int:
        return int(await conn.fetchval("SELECT count(*) FROM items WHERE sku LIKE 'gone%'"))
    assert await kit.tx.run(a.tenant_id, count) == 0


async def test_mixed_versions_alternate_through_one_connection_without_cached_statement_errors(kit: Kit) -> None:
    new, old = await _inventory_tenant(kit, "1.1.0"), await _inventory_tenant(kit, "1.0.0")

    async def star(conn: Any) -> list[str]:
        # SELECT * changes row type between the two tenants: the classic InvalidCachedStatementError
        await conn.execute("INSERT INTO items (sku, qty) VALUES ('s' || (random() * 1e9)::int, 1)")
        return list((await conn.fetch("SELECT * FROM items ORDER BY id LIMIT 1"))[0].keys())

    for _ in range(3):
        assert "location" in await kit.tx.run(new.tenant_id, star)
        assert "location" not in await kit.tx.run(old.tenant_id, star)


async def _fence(fleet: Fleet, rec: TenantRecord, shard_id: str) -> int | None:
    conn = await asyncpg.connect(fleet.shard_dsns[shard_id])
    try:
        v = await conn.fetchval("SELECT epoch FROM fleet.tenant_fence WHERE tenant_id = $1::uuid", rec.tenant_id)
        return None if v is None else int(v)
    finally:
        await conn.close()


async def test_a_stale_epoch_is_dropped_re_resolved_and_retried(kit: Kit) -> None:
    a = await _inventory_tenant(kit)
    assert (await kit.resolver.resolve(id=a.tenant_id)).epoch == a.epoch  # cached at the old epoch
    conn = await asyncpg.connect(kit.fleet.shard_dsns["shard1"])
    try:
        await conn.execute("UPDATE fleet.tenant_fence SET epoch = epoch + 5 WHERE tenant_id = $1::uuid", a.tenant_id)
    finally:
        await conn.close()
    await kit.fleet.control.execute("UPDATE tenants SET epoch = epoch + 5 WHERE tenant_id = $1::uuid", a.tenant_id)
    before = kit.metrics.fence_retries._value.get()
    assert await kit.tx.run(a.tenant_id, _path) == f"{a.schema}, public"
    assert kit.metrics.fence_retries._value.get() == before + 1
    assert (await kit.resolver.resolve(id=a.tenant_id)).epoch == a.epoch + 5


async def test_a_write_through_a_stale_placement_lands_on_the_new_shard_only(kit: Kit) -> None:
    a = await _inventory_tenant(kit, shard_id="shard1")
    await kit.resolver.resolve(id=a.tenant_id)  # the host caches shard1
    # a hand-made move to shard2: schema + table there, fences and directory bumped
    new_epoch = a.epoch + 1
    pkg = discover().get("inventory")
    moved = TenantRecord(a.tenant_id, a.code, a.schema, "shard2", "active", new_epoch, a.domains)
    dst = await asyncpg.connect(kit.fleet.shard_dsns["shard2"])
    try:
        await dst.execute("SELECT fleet.create_tenant_schema($1)", a.schema)
        await dst.execute("INSERT INTO fleet.tenant_fence (tenant_id, schema_name, epoch) VALUES ($1::uuid, $2, $3)",
                          a.tenant_id, a.schema, new_epoch)
    finally:
        await dst.close()
    await apply_tenant(kit.fleet.shard_pools, kit.fleet.settings, pkg, moved)
    src = await asyncpg.connect(kit.fleet.shard_dsns["shard1"])
    try:
        await src.execute("UPDATE fleet.tenant_fence SET epoch = $2 WHERE tenant_id = $1::uuid", a.tenant_id, new_epoch)
    finally:
        await src.close()
    await kit.fleet.control.execute("UPDATE tenants SET shard_id = 'shard2', epoch = $2 WHERE tenant_id = $1::uuid",
                                    a.tenant_id, new_epoch)

    async def write(conn: Any) -> str:
        await conn.execute("INSERT INTO items (sku, qty) VALUES ('after-move', 1)")
        return str(await conn.fetchval("SELECT current_database()"))

    db = await kit.tx.run(a.tenant_id, write)
    assert kit.fleet.shard_dsns["shard2"].endswith("/" + db)
    for shard_id, expected in (("shard1", 0), ("shard2", 1)):
        conn = await asyncpg.connect(kit.fleet.shard_dsns[shard_id])
        try:
            async with conn.transaction():
                await conn.execute("SELECT set_config('search_path', quote_ident($1), true)", a.schema)
                rows = await conn.fetchval("SELECT count(*) FROM items WHERE sku = 'after-move'")
        finally:
            await conn.close()
        assert rows == expected, shard_id


async def test_public_schema_grants_create_to_no_role_the_host_connects_as(fleet: Fleet) -> None:
    for dsn in fleet.shard_dsns.values():
        conn = await asyncpg.connect(dsn)
        try:
            assert not await conn.fetchval("SELECT has_schema_privilege('public', 'public', 'CREATE')")
            non_super = await conn.fetch(
                "SELECT rolname FROM pg_roles WHERE rolcanlogin AND NOT rolsuper "
                "AND has_schema_privilege(oid, 'public', 'CREATE')")
            assert non_super == []
        finally:
            await conn.close()


async def test_a_mover_holding_the_tenant_makes_transactions_wait_then_503_tenant_moving(fleet: Fleet) -> None:
    settings = fleet.settings.model_copy(update={"fence_wait_ms": 300})
    async with AsyncExitStack() as stack:
        pools = await stack.enter_async_context(ShardPools(settings, fleet.directory.dsn_of, reset=keep_connection))
        resolver = await stack.enter_async_context(ResolveClient(settings, fleet.directory.lookup))
        tx = await stack.enter_async_context(TenantTx(settings, resolver, pools, HostMetrics()))
        rec = await fleet.directory.create_tenant(code(), shard_id="shard1")
        mover = await asyncpg.connect(fleet.shard_dsns["shard1"])
        stack.push_async_callback(mover.close)
        async with mover.transaction():
            await mover.execute("SELECT pg_advisory_xact_lock(fleet.tenant_lock_key($1::uuid))", rec.tenant_id)
            started = asyncio.get_running_loop().time()
            with pytest.raises(TenantMoving) as caught:
                await tx.run(rec.tenant_id, _path)
            assert caught.value.status == 503 and caught.value.details["retryAfter"] == 1
            assert asyncio.get_running_loop().time() - started >= 0.25  # it waited for the mover first
            waiting = asyncio.create_task(tx.run(rec.tenant_id, _path))
            await _until_activity(fleet, "shard1", "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                                  " AND NOT granted")  # queued behind the mover
        assert await waiting == f"{rec.schema}, public"  # released in time: it went through


async def test_the_fence_runs_read_committed_whatever_the_default_isolation(fleet: Fleet) -> None:
    """Under a REPEATABLE READ default the fence's snapshot would predate its wait for a
    mover, and it would read the epoch from before a cutover: the host's BEGIN says READ
    COMMITTED itself."""
    rec = await fleet.directory.create_tenant(code())
    conn = await asyncpg.connect(fleet.shard_dsns[rec.shard_id])
    try:
        await conn.execute("SET default_transaction_isolation = 'serializable'")
        await conn.execute(enter_sql(rec, 100))
        assert await conn.fetchval("SELECT current_setting('transaction_isolation')") == "read committed"
        await conn.execute("ROLLBACK")
    finally:
        await conn.close()
