"""The request path's connections to one shard, kept checked out of asyncpg's pool between transactions.

Why not ``async with pool.acquire()`` per transaction: asyncpg's ``Pool.release`` runs
the release in a task of its own under ``asyncio.shield`` (a task and two more loop
iterations per request), arms an inactivity timer, and hands a freed connection to a
waiter through an ``asyncio.Queue``. With 32 requests sharing 8 connections that cost
the host ~15% of its throughput (bench/request_path.py, README "Figures"). Here a
transaction takes a connection with a list pop and gives it back with a list append, or
hands it straight to the longest waiter.

asyncpg still does everything else: it opens connections (with the pool's ``init``: the
app role), replaces broken ones and closes them. A connection goes back to asyncpg's
pool when it is closed or still inside a transaction (asyncpg rolls back, or replaces
it), when it was not needed for a whole ``idle_s`` interval (the pool's own idle
handling then applies), once every `RECYCLE_EVERY` transactions (asyncpg's
``max_queries`` and ``expire_connections`` act on release only), and at `close`.

Recycling by distinct tenants (``recycle_tenants``, `Settings.pool_recycle_tenants`): a
PostgreSQL backend caches the catalog entries of every table it has touched (~10 KB per
table with its indexes) and never evicts them, so a connection that serves tenant after
tenant grows without bound (research/many-schemas.md: 99 MB of cache after 1,000 tenants
of 10 tables). `give` counts the distinct tenants each backend connection has served
(counted per asyncpg connection, so through its trips back to asyncpg's pool too); one
given back after more than ``recycle_tenants`` of them is not reused: a task of its own
closes it (it is outside any transaction: `give` is called after COMMIT or ROLLBACK)
and leases a fresh one in its place, which it then hands to a waiter or the free list.
The slot stays counted meanwhile, so the pool's bound holds; a taker only waits for the
reconnect if every other connection is busy too.

Whoever closes the pool closes its `Leases` first (`TenantTx.close`), or the pool's
close waits for the leased connections.

Not thread-safe, like asyncpg: one event loop.
"""
from __future__ import annotations

import asyncio
import weakref
from collections import deque
from typing import Callable, NamedTuple

import asyncpg
from asyncpg.pool import PoolConnectionProxy

DEFAULT_IDLE_S = 60.0
# Every this many transactions one connection goes back through asyncpg's release, whose
# checks (max_queries, Pool.expire_connections) only run there; the cost is one
# release/acquire cycle per RECYCLE_EVERY transactions.
RECYCLE_EVERY = 1000
# How long closing a recycled connection may take before it is terminated instead.
RECYCLE_CLOSE_TIMEOUT_S = 5.0


class PoolFigures(NamedTuple):
    size: int      # connections open
    idle: int      # open and not in a transaction
    max: int       # the bound (settings.shard_pool_max)
    waiting: int   # transactions waiting for a connection


def is_gone(conn: asyncpg.Connection | PoolConnectionProxy) -> bool:
    """Closed, or already taken back by asyncpg (which detaches the proxy of a connection that closed)."""
    try:
        return conn.is_closed()
    except asyncpg.InterfaceError:  # "released back to the pool": the connection closed under us
        return True


class LeasesClosed(asyncpg.InterfaceError):
    """`take` after `close` (the host is shutting down)."""

    def __init__(self) -> None:
        super().__init__("the host's shard connections are closed")


class Leases:
    """Up to the pool's ``max_size`` connections, leased from ``pool`` and reused by turns."""

    def __init__(self, pool: asyncpg.Pool, *, idle_s: float = DEFAULT_IDLE_S,
                 recycle_every: int = RECYCLE_EVERY, recycle_tenants: int = 0,
                 on_recycle: Callable[[], object] | None = None) -> None:
        """``recycle_tenants``: replace a connection once it has served more than this many
        distinct tenants (0: never); ``on_recycle`` is called for each one replaced."""
        self._pool = pool
        self._recycle_every = recycle_every
        self._recycle_tenants = recycle_tenants
        self._on_recycle = on_recycle
        # asyncpg connection -> the tenants it has served; weak, so that a connection
        # asyncpg closed (idle, max_queries, broken) takes its entry with it
        self._served: weakref.WeakKeyDictionary[asyncpg.Connection, set[str]] = weakref.WeakKeyDictionary()
        self.recycled = 0
        self._max = pool.get_max_size()
        self._idle_s = idle_s
        self._free: list[PoolConnectionProxy] = []
        self._waiters: deque[asyncio.Future[PoolConnectionProxy | None]] = deque()
        self._held = 0          # leased from asyncpg: free + in use
        self._low_free = 0      # fewest free since the last sweep: never needed in that interval
        self._sweeper: asyncio.TimerHandle | None = None
        self._returning: set[asyncio.Task[None]] = set()
        self._closed = False
        self._gives = 0

    @property
    def pool(self) -> asyncpg.Pool:
        return self._pool

    def figures(self) -> tuple[int, int, int]:
        """(held, free, waiting): connections leased from asyncpg, those idle here, takers waiting."""
        return self._held, len(self._free), sum(1 for w in self._waiters if not w.done())

    async def take(self) -> PoolConnectionProxy:
        """An open connection outside any transaction; waits while all ``max_size`` are in use.

        Raises what ``pool.acquire()`` raises when a new one must be opened (shard down),
        and `LeasesClosed` after `close`.
        """
        free = self._free
        while True:
            if self._closed:
                raise LeasesClosed()
            while free:
                conn = free.pop()
                if len(free) < self._low_free:
                    self._low_free = len(free)
                if not is_gone(conn):
                    return conn
                self._return(conn)
            if self._held < self._max:
                self._held += 1
                self._arm_sweeper()
                try:
                    return await self._pool.acquire()
                except BaseException:
                    self._held -= 1
                    self._wake_one(None)  # let a waiter try to open one itself
                    raise
            waiter: asyncio.Future[PoolConnectionProxy | None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                handed_over = await waiter
            except asyncio.CancelledError:
                if not waiter.done() or waiter.cancelled():
                    try:
                        self._waiters.remove(waiter)
                    except ValueError:
                        pass
                elif waiter.exception() is None:  # woken as we were cancelled: pass it on
                    handed = waiter.result()
                    if handed is not None:
                        self.give(handed)
                    else:
                        self._wake_one(None)  # a free slot: the next waiter opens a connection
                raise
            if handed_over is not None:
                return handed_over
            # None: a lease was given up (closed connection, failed open); try again

    def give(self, conn: PoolConnectionProxy, tenant: str | None = None) -> None:
        """Give a taken connection back: to the longest waiter, or to the free list.

        ``tenant``: the tenant whose transaction it just ran (for ``recycle_tenants``)."""
        if self._closed or is_gone(conn) or conn.is_in_transaction():
            self._return(conn)
            self._wake_one(None)
            return
        if tenant is not None and self._recycle_tenants and self._served_too_many(conn, tenant):
            self._renew(conn)
            return
        self._gives += 1
        if self._gives % self._recycle_every == 0:
            # now and then through asyncpg's own release, so that its upkeep still applies
            # (max_queries, expire_connections); the next take leases it again
            self._return(conn)
            self._wake_one(None)
            return
        if self._wake_one(conn):
            return
        self._free.append(conn)

    def _served_too_many(self, conn: PoolConnectionProxy, tenant: str) -> bool:
        # the connection behind the proxy (a new proxy comes with every acquire); asyncpg
        # offers no public accessor and the stubs don't declare the slot
        raw: asyncpg.Connection | None = conn._con  # type: ignore[attr-defined]
        if raw is None:
            return False
        served = self._served.get(raw)
        if served is None:
            served = self._served[raw] = set()
        served.add(tenant)
        return len(served) > self._recycle_tenants

    def _renew(self, conn: PoolConnectionProxy) -> None:
        """Close ``conn`` and lease a fresh connection in its place, in a task of its own;
        the slot stays held meanwhile."""
        self.recycled += 1
        if self._on_recycle is not None:
            self._on_recycle()
        task = asyncio.get_running_loop().create_task(self._replace(conn))
        self._returning.add(task)
        task.add_done_callback(self._returning.discard)

    async def _replace(self, conn: PoolConnectionProxy) -> None:
        try:
            # closing hands asyncpg's holder back to its pool (Connection._cleanup), so the
            # acquire below opens a new connection in that holder
            await conn.close(timeout=RECYCLE_CLOSE_TIMEOUT_S)
        except Exception:  # a connection that doesn't close in time or cleanly is cut
            conn.terminate()
        fresh: PoolConnectionProxy | None = None
        if not self._closed:
            try:
                fresh = await self._pool.acquire()
            except Exception:  # shard down: the slot is freed; the next taker opens one (and reports the error)
                fresh = None
        if fresh is None or self._closed:
            self._held -= 1
            if fresh is not None:
                await self._release(fresh)
            self._wake_one(None)
            return
        if not self._wake_one(fresh):
            self._free.append(fresh)

    def _wake_one(self, conn: PoolConnectionProxy | None) -> bool:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return True
        return False

    def _return(self, conn: PoolConnectionProxy) -> None:
        """Release one lease to asyncpg (which rolls back, or replaces a broken connection)."""
        self._held -= 1
        task = asyncio.get_running_loop().create_task(self._release(conn))
        self._returning.add(task)
        task.add_done_callback(self._returning.discard)

    async def _release(self, conn: PoolConnectionProxy) -> None:
        try:
            await self._pool.release(conn)
        except Exception:  # asyncpg terminates what it can't release cleanly; nothing left to do here
            pass

    def _arm_sweeper(self) -> None:
        if self._sweeper is None and not self._closed:
            self._low_free = len(self._free)
            self._sweeper = asyncio.get_running_loop().call_later(self._idle_s, self._sweep)

    def _sweep(self) -> None:
        """Every ``idle_s`` while connections are held: return those that were never needed."""
        self._sweeper = None
        for _ in range(min(self._low_free, len(self._free))):
            self._return(self._free.pop(0))  # the longest idle: taking pops from the end
        if self._held:
            self._arm_sweeper()

    async def close(self) -> None:
        """Return every free lease to asyncpg; later gives return theirs; later takes raise."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        while self._free:
            self._return(self._free.pop())
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(LeasesClosed())
        if self._returning:
            await asyncio.gather(*self._returning, return_exceptions=True)
