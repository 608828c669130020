"""The request path's leased connections (host/leases.py): hand-over to waiters, cancelled
waiters, broken connections, idle return, close, and handles that outlive their transaction."""
from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, AsyncIterator

import asyncpg
import pytest
import pytest_asyncio

from host.leases import Leases, LeasesClosed
from host.metrics import HostMetrics
from host.tx import TenantTx, keep_connection
from router.client import ResolveClient
from router.errors import ShardUnreachable
from router.keys import APP_ROLE
from router.models import TenantRecord
from router.pools import ShardPools
from tests.fleetkit import Fleet, until
from tests.hostkit import code


class Kit:
    def __init__(self, tx: TenantTx, pools: ShardPools, tenant: TenantRecord) -> None:
        self.tx, self.pools, self.tenant = tx, pools, tenant


@pytest_asyncio.fixture(loop_scope="session")
async def one(fleet: Fleet) -> AsyncIterator[Kit]:
    """A TenantTx over ONE app-role connection to shard1, and a tenant there."""
    settings = fleet.settings.model_copy(update={"shard_pool_min": 0, "shard_pool_max": 1})
    async with AsyncExitStack() as stack:
        pools = await stack.enter_async_context(
            ShardPools(settings, fleet.directory.dsn_of, role=APP_ROLE, reset=keep_connection))
        resolver = await stack.enter_async_context(ResolveClient(settings, fleet.directory.lookup))
        tx = await stack.enter_async_context(TenantTx(settings, resolver, pools, HostMetrics()))
        yield Kit(tx, pools, await fleet.directory.create_tenant(code(), shard_id="shard1"))


@asynccontextmanager
async def shard1_pool(fleet: Fleet, max_size: int = 1) -> AsyncIterator[asyncpg.Pool]:
    """An owner-role asyncpg pool of at most ``max_size`` connections to shard1, as the host builds them."""
    settings = fleet.settings.model_copy(update={"shard_pool_min": 0, "shard_pool_max": max_size})
    async with ShardPools(settings, fleet.directory.dsn_of, reset=keep_connection) as pools:
        yield await pools.get("shard1")


async def _pid(db: Any) -> int:
    return int(await db.fetchval("SELECT pg_backend_pid()"))


def _waiting(kit: Kit) -> int:
    figures = kit.tx.pool_figures().get("shard1")
    return 0 if figures is None else figures.waiting


def _in_use(kit: Kit) -> bool:
    figures = kit.tx.pool_figures().get("shard1")
    return figures is not None and figures.size == 1 and figures.idle == 0


async def test_many_transactions_share_one_connection_by_turns(one: Kit) -> None:
    gate = asyncio.Event()

    async def held(db: Any) -> int:
        await gate.wait()  # the first holds the connection until the rest are waiting
        return await _pid(db)
    first = asyncio.create_task(one.tx.run(one.tenant.tenant_id, held))
    rest = [asyncio.create_task(one.tx.run(one.tenant.tenant_id, _pid)) for _ in range(20)]
    await until(lambda: _waiting(one) == 20, what="20 waiters")
    gate.set()
    pids = await asyncio.gather(first, *rest)
    assert len(set(pids)) == 1
    figures = one.tx.pool_figures()["shard1"]
    assert (figures.size, figures.idle, figures.waiting) == (1, 1, 0)


async def test_a_cancelled_waiter_neither_takes_nor_loses_the_connection(one: Kit) -> None:
    gate = asyncio.Event()

    async def held(db: Any) -> int:
        await gate.wait()
        return await _pid(db)
    first = asyncio.create_task(one.tx.run(one.tenant.tenant_id, held))
    await until(lambda: _in_use(one), what="the first transaction holding the connection")
    waiting = [asyncio.create_task(one.tx.run(one.tenant.tenant_id, _pid)) for _ in range(2)]
    await until(lambda: _waiting(one) == 2, what="2 waiters")
    waiting[0].cancel()
    gate.set()
    results = await asyncio.gather(first, *waiting, return_exceptions=True)
    assert isinstance(results[1], asyncio.CancelledError) and results[2] == results[0]
    assert await asyncio.wait_for(one.tx.run(one.tenant.tenant_id, _pid), 5) == results[0]
    assert one.tx.pool_figures()["shard1"].waiting == 0


async def test_a_waiter_cancelled_as_the_connection_reaches_it_passes_it_on(fleet: Fleet) -> None:
    async with shard1_pool(fleet) as pool:
        leases = Leases(pool)
        conn = await leases.take()
        first, second = asyncio.create_task(leases.take()), asyncio.create_task(leases.take())
        await until(lambda: leases.figures()[2] == 2, what="2 waiters")
        leases.give(conn)   # handed to `first`, which has not run yet...
        first.cancel()      # ...and is cancelled before it does
        with pytest.raises(asyncio.CancelledError):
            await first
        assert await asyncio.wait_for(second, 5) is conn
        leases.give(conn)
        assert await asyncio.wait_for(leases.take(), 5) is conn
        leases.give(conn)
        await leases.close()


async def test_a_connection_killed_under_a_transaction_is_replaced_for_the_next(one: Kit, fleet: Fleet) -> None:
    pid = await one.tx.run(one.tenant.tenant_id, _pid)
    admin = await asyncpg.connect(fleet.shard_dsns["shard1"])
    try:
        async def killed(db: Any) -> None:
            await admin.execute("SELECT pg_terminate_backend($1)", pid)
            await db.fetchval("SELECT 1")
        with pytest.raises(ShardUnreachable):  # not asyncpg's "released back to the pool"
            await one.tx.run(one.tenant.tenant_id, killed)
    finally:
        await admin.close()
    new_pid = await asyncio.wait_for(one.tx.run(one.tenant.tenant_id, _pid), 5)
    assert new_pid != pid
    assert (await one.pools.get("shard1")).get_size() == 1


async def test_a_handle_kept_past_its_transaction_refuses_every_use(one: Kit) -> None:
    kept: list[Any] = []

    async def keep(db: Any) -> None:
        kept.append(db)
        await db.execute("SELECT 1")
        # nothing that could outlive the transaction is handed out at all: a prepared
        # statement, cursor, transaction object or listener kept by tenant A would run
        # inside (or hear) tenant B's transaction on the same connection
        for name in ("prepare", "cursor", "transaction", "add_log_listener", "add_listener", "copy_to_table"):
            assert not hasattr(db, name), name
    await one.tx.run(one.tenant.tenant_id, keep)
    for use in (lambda: kept[0].fetchval("SELECT 1"), lambda: kept[0].execute("SELECT 1"),
                lambda: kept[0].fetch("SELECT 1"), lambda: kept[0].fetchrow("SELECT 1"),
                lambda: kept[0].executemany("SELECT $1", [(1,)])):
        with pytest.raises(asyncpg.InterfaceError, match="transaction has ended"):
            use()


async def test_after_close_a_transaction_is_refused_and_leases_nothing(fleet: Fleet) -> None:
    settings = fleet.settings.model_copy(update={"shard_pool_min": 0, "shard_pool_max": 1})
    rec = await fleet.directory.create_tenant(code(), shard_id="shard1")
    async with AsyncExitStack() as stack:
        pools = await stack.enter_async_context(ShardPools(settings, fleet.directory.dsn_of, reset=keep_connection))
        resolver = await stack.enter_async_context(ResolveClient(settings, fleet.directory.lookup))
        tx = TenantTx(settings, resolver, pools, HostMetrics())
        await tx.run(rec.tenant_id, _pid)
        await tx.close()
        with pytest.raises(LeasesClosed):
            await tx.run(rec.tenant_id, _pid)
        assert tx.pool_figures() == {}
        pool = await pools.get("shard1")
        assert pool.get_idle_size() == pool.get_size() == 1  # all back: the pools close at once


async def test_a_free_slot_reaching_a_cancelled_waiter_is_passed_on(fleet: Fleet) -> None:
    async with shard1_pool(fleet) as pool:
        leases = Leases(pool)
        conn = await leases.take()
        first, second = asyncio.create_task(leases.take()), asyncio.create_task(leases.take())
        await until(lambda: leases.figures()[2] == 2, what="2 waiters")
        conn.terminate()
        leases.give(conn)   # a dead connection: its slot is free, `first` is told to open one...
        first.cancel()      # ...and is cancelled before it can
        with pytest.raises(asyncio.CancelledError):
            await first
        fresh = await asyncio.wait_for(second, 5)
        assert not fresh.is_closed()
        leases.give(fresh)
        await leases.close()


async def test_a_waiter_cancelled_while_leases_close_ends_cancelled(fleet: Fleet) -> None:
    async with shard1_pool(fleet) as pool:
        leases = Leases(pool)
        conn = await leases.take()
        waiter = asyncio.create_task(leases.take())
        await until(lambda: leases.figures()[2] == 1, what="a waiter")
        closing = asyncio.create_task(leases.close())
        await asyncio.sleep(0)  # close has failed the waiter, which has not run yet
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        assert waiter.cancelled()  # the cancellation wins, not LeasesClosed
        leases.give(conn)
        await closing


async def test_connections_pass_through_asyncpgs_release_now_and_then(fleet: Fleet) -> None:
    async with shard1_pool(fleet) as pool:
        leases = Leases(pool, recycle_every=5)
        conn = await leases.take()
        before = conn.get_server_pid()
        leases.give(conn)
        await pool.expire_connections()  # acted on by asyncpg at release only
        pids = []
        for _ in range(6):
            conn = await leases.take()
            pids.append(conn.get_server_pid())
            leases.give(conn)
        assert pids[:4] == [before] * 4 and pids[-1] != before  # the 5th give went through asyncpg
        await leases.close()


async def test_unneeded_connections_go_back_to_asyncpg_after_the_idle_interval(fleet: Fleet) -> None:
    async with shard1_pool(fleet, 3) as pool:
        leases = Leases(pool, idle_s=0.2)
        taken = [await leases.take() for _ in range(3)]
        assert pool.get_idle_size() == 0
        for conn in taken:
            leases.give(conn)
        assert leases.figures() == (3, 3, 0)
        # one stays busy: two were never needed for a whole interval and go back
        busy = await leases.take()
        await until(lambda: leases.figures()[:2] == (1, 0) and pool.get_idle_size() == 2,
                    what="the two unneeded connections back in asyncpg's pool")
        leases.give(busy)
        await leases.close()
        assert pool.get_idle_size() == pool.get_size() == 3


async def test_close_returns_every_connection_and_fails_waiters(fleet: Fleet) -> None:
    async with shard1_pool(fleet) as pool:
        leases = Leases(pool)
        conn = await leases.take()
        waiter = asyncio.create_task(leases.take())
        await until(lambda: leases.figures()[2] == 1, what="a waiter")
        await leases.close()
        with pytest.raises(LeasesClosed):
            await waiter
        leases.give(conn)  # given back after close: straight to asyncpg
        await until(lambda: pool.get_idle_size() == 1, what="the connection back in asyncpg's pool")
        with pytest.raises(LeasesClosed):
            await leases.take()


async def test_a_connection_that_served_more_than_the_bound_of_tenants_is_replaced(fleet: Fleet) -> None:
    bound, extra = 3, 2
    settings = fleet.settings.model_copy(update={"shard_pool_min": 0, "shard_pool_max": 1,
                                                 "pool_recycle_tenants": bound})
    tenants = [await fleet.directory.create_tenant(code(), shard_id="shard1") for _ in range(bound + 1 + extra)]
    metrics = HostMetrics()
    async with AsyncExitStack() as stack:
        pools = await stack.enter_async_context(
            ShardPools(settings, fleet.directory.dsn_of, role=APP_ROLE, reset=keep_connection))
        resolver = await stack.enter_async_context(ResolveClient(settings, fleet.directory.lookup))
        tx = await stack.enter_async_context(TenantTx(settings, resolver, pools, metrics))
        # the same tenants again and again cost nothing: only distinct ones count
        first = {await tx.run(tenants[i % bound].tenant_id, _pid) for i in range(3 * bound)}
        assert len(first) == 1
        # one more distinct tenant: its transaction completes on the old backend, which is
        # then replaced; every transaction succeeds, none waits on a failure
        pids = [await tx.run(rec.tenant_id, _pid) for rec in tenants[bound:]]
        assert pids[0] in first
        assert all(pid not in first for pid in pids[1:])
        assert len(set(pids[1:])) == 1  # the new backend has served only `extra` tenants: kept
        assert metrics.registry.get_sample_value("tenantfleet_host_connections_recycled_total") == 1
        figures = tx.pool_figures()["shard1"]
        assert (figures.size, figures.waiting) == (1, 0)


async def test_transactions_waiting_while_a_connection_is_replaced_get_the_new_one(fleet: Fleet) -> None:
    async with shard1_pool(fleet) as pool:
        leases = Leases(pool, recycle_tenants=1)
        conn = await leases.take()
        old = conn.get_server_pid()
        leases.give(conn, "a")
        conn = await leases.take()
        waiters = [asyncio.create_task(leases.take()) for _ in range(2)]
        await until(lambda: leases.figures()[2] == 2, what="2 waiters")
        leases.give(conn, "b")  # the 2nd distinct tenant: closed, a new one leased for the first waiter
        fresh = await asyncio.wait_for(waiters[0], 5)
        assert fresh.get_server_pid() != old and not fresh.is_closed()
        assert leases.figures()[0] == 1  # still one slot held: the bound of 1 was kept throughout
        leases.give(fresh, "c")
        assert await asyncio.wait_for(waiters[1], 5) is fresh
        leases.give(fresh)
        await leases.close()
        assert pool.get_size() == pool.get_idle_size() == 1


async def test_a_connection_whose_query_was_cancelled_is_not_handed_out_mid_cancel(one: Kit) -> None:
    # /readyz runs SELECT 1 under a timeout on the request path's connections: a timeout
    # cancels the query, and the connection must not reach the next user while PostgreSQL
    # is still cancelling it ("another operation is in progress")
    for _ in range(3):
        with pytest.raises(asyncio.TimeoutError):
            async with one.tx.connection("shard1") as conn:
                await asyncio.wait_for(conn.fetchval("SELECT pg_sleep(5)"), 0.05)
        async with one.tx.connection("shard1") as conn:
            assert await conn.fetchval("SELECT 1") == 1
        assert await one.tx.run(one.tenant.tenant_id, _pid) > 0


async def test_users_arriving_while_a_shards_connections_close_get_a_fresh_pool(fleet: Fleet) -> None:
    # the sweep that closes the pool of a shard this host no longer serves (close_unserved)
    # must not hand its dying pool to a /readyz probe or a transaction that arrives meanwhile
    settings = fleet.settings.model_copy(update={"shard_pool_min": 0, "shard_pool_max": 2})
    tenant = await fleet.directory.create_tenant(code(), shard_id="shard1")
    async with AsyncExitStack() as stack:
        pools = await stack.enter_async_context(
            ShardPools(settings, fleet.directory.dsn_of, role=APP_ROLE, reset=keep_connection))
        resolver = await stack.enter_async_context(ResolveClient(settings, fleet.directory.lookup))
        tx = await stack.enter_async_context(TenantTx(settings, resolver, pools, HostMetrics()))
        for _ in range(5):
            await tx.run(tenant.tenant_id, _pid)
            old = pools.opened()["shard1"]
            sweep = asyncio.create_task(tx.close_unserved({"shard1": "offline", "shard2": "active"}))
            errors: list[BaseException] = []

            async def probe() -> None:
                try:
                    async with tx.connection("shard1") as conn:
                        assert await conn.fetchval("SELECT 1") == 1
                except Exception as exc:  # noqa: BLE001 - every failure is the finding
                    errors.append(exc)

            while not sweep.done():
                await asyncio.gather(probe(), probe())
            assert await sweep == ["shard1"]
            assert errors == []
            fresh = pools.opened()["shard1"]
            assert fresh is not old and not fresh.is_closing()
            assert old.is_closing()
            await tx.run(tenant.tenant_id, _pid)
