"""`with_tenant_tx`: one tenant's transaction on its shard, fenced, in a clean connection.

Round trips per call: (1) ``BEGIN; SELECT fleet.enter_tenant(...)`` as one simple query:
shared advisory lock on the tenant, epoch check against the shard's fence, and
``search_path`` set *locally* to the quoted schema, then ``public``; (2..n) whatever
``fn`` runs; (n+1) ``COMMIT``. Everything the fence sets is transaction-local, so the
connection goes back to the pool with no search_path, lock or open transaction: after an
error or a cancellation the transaction is rolled back, and a connection whose state
can't be proven clean (rollback failed, cancelled mid-query) is terminated instead of
being returned.

Why the pools skip asyncpg's reset query: everything this module sets is
transaction-local and every path ends the transaction, so the ``RESET ALL;
pg_advisory_unlock_all(); ...`` round trip asyncpg runs on each release would clean
nothing; asyncpg still rolls back a transaction left open. (Session-level ``SET`` or
session advisory locks taken by plugin code are not undone: the plugin API asks plugins
for transaction-scoped statements only.)

Mixed rollouts and ``InvalidCachedStatementError``: PostgreSQL re-plans a prepared
statement when search_path changes, and refuses (SQLSTATE 0A000) if the result's row
type changed, e.g. ``SELECT *`` from ``items`` on tenant A (has ``location``) then
tenant B (not yet). We keep asyncpg's statement cache (``statement_cache_size=0`` costs
a Parse/Describe round trip on every query, measured in bench/request_path.py) and
instead retry the whole transaction once after that error: asyncpg has already dropped
the stale statements, and the transaction had been aborted, so nothing partial landed.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from typing import Awaitable, Callable, TypeVar

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from host.keys import SQLSTATE_FENCE_STALE, SQLSTATE_LOCK_TIMEOUT, SQLSTATE_NOT_ON_SHARD
from host.metrics import HostMetrics
from host.tenancy import REQUEST_TENANT, Resolver, check_servable
from plugins.api import Db
from router.errors import ShardUnreachable, TenantMoving
from router.models import TenantRecord, parse_tenant_id
from router.pools import ShardPools
from router.settings import Settings

log = logging.getLogger("tenantfleet.host.tx")

T = TypeVar("T")
Conn = asyncpg.Connection | PoolConnectionProxy
TxFn = Callable[[Db], Awaitable[T]]

CACHED_STATEMENT_RETRIES = 1
# A shard that refuses or drops connections (sorted by class, never by message text).
_SHARD_DOWN = (OSError, asyncpg.ConnectionDoesNotExistError, asyncpg.CannotConnectNowError)


class _Stale(Exception):
    """The shard says the resolved placement is out of date."""


async def keep_connection(conn: asyncpg.Connection) -> None:
    """Pool ``reset`` hook: nothing to undo (see the module docstring)."""
    return None


def enter_sql(rec: TenantRecord, wait_ms: int) -> str:
    """The fence statement for ``rec`` (see `_enter_sql`)."""
    return _enter_sql(rec.tenant_id, rec.epoch, wait_ms)


@functools.lru_cache(maxsize=65536)  # one text per (tenant, epoch): no UUID parse per request
def _enter_sql(tenant_id: str, epoch: int, wait_ms: int) -> str:
    """``BEGIN`` and ``fleet.enter_tenant(...)`` as one simple query.

    The one place values are written into SQL text, on purpose: the simple-query protocol
    (the only way asyncpg sends BEGIN and a statement in one round trip) carries no
    parameters. Both values are re-derived from typed values, never from request text:
    ``uuid.UUID`` renders only hex digits and dashes, ``int`` renders only digits.
    """
    tenant = str(uuid.UUID(tenant_id))
    return f"BEGIN; SELECT fleet.enter_tenant('{tenant}'::uuid, {int(epoch)}::bigint, {int(wait_ms)}::int)"


async def abort(conn: Conn) -> None:
    """Roll back; a connection that can't be rolled back cleanly is terminated."""
    if conn.is_closed():
        return
    try:
        await conn.execute("ROLLBACK")
    except asyncio.CancelledError:
        conn.terminate()
        raise
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
        # e.g. "another operation is in progress" after a cancelled query
        conn.terminate()


class TenantTx:
    """Runs functions inside fenced tenant transactions on the tenant's shard."""

    def __init__(self, settings: Settings, resolver: Resolver, pools: ShardPools, metrics: HostMetrics) -> None:
        self._settings = settings
        self._resolver = resolver
        self._pools = pools
        self._metrics = metrics

    async def run(self, tenant_id: str, fn: TxFn[T]) -> T:
        """Run ``fn(conn)`` in a transaction scoped to the tenant; return its result.

        Inside a plugin route, the tenant the request resolved to is reused. On a stale
        fence the cached entry is dropped, the tenant re-resolved and ``fn`` retried, at
        most ``settings.fence_retries`` times; ``fn`` may therefore run more than once,
        but only one run ever commits. Raises TENANT_NOT_FOUND, TENANT_SUSPENDED,
        TENANT_NOT_READY, TENANT_MOVING (fence still stale after the retries, or a
        mover held the tenant longer than ``fence_wait_ms``), SHARD_UNREACHABLE, and
        whatever ``fn`` raises (after rolling back).
        """
        rec = REQUEST_TENANT.get()
        if rec is None or rec.tenant_id != tenant_id:
            rec = await self._resolver.resolve(id=parse_tenant_id(tenant_id))
        fence_tries = 0
        statement_tries = 0
        while True:
            check_servable(rec)
            pool = await self._pools.get(rec.shard_id)
            try:
                return await self._attempt(pool, rec, fn)
            except _SHARD_DOWN as exc:
                raise ShardUnreachable(f"shard {rec.shard_id} is unreachable: {exc.__class__.__name__}",
                                       shardId=rec.shard_id) from exc
            except _Stale:
                fence_tries += 1
                self._metrics.fence_retries.inc()
                self._resolver.drop(rec.tenant_id, stale_epoch=rec.epoch)
                log.info("stale fence for tenant %s at epoch %s; re-resolving", rec.tenant_id, rec.epoch)
                if fence_tries > self._settings.fence_retries:
                    raise TenantMoving(f"tenant {rec.code} is moving; retry shortly", tenantId=rec.tenant_id,
                                       retryAfter=1) from None
                stale, rec = rec, await self._resolver.resolve(id=rec.tenant_id)
                if REQUEST_TENANT.get() is stale:
                    REQUEST_TENANT.set(rec)  # later transactions of this request use the new placement
            except asyncpg.InvalidCachedStatementError:
                statement_tries += 1
                self._metrics.cached_statement_retries.inc()
                if statement_tries > CACHED_STATEMENT_RETRIES:
                    raise

    async def _attempt(self, pool: asyncpg.Pool, rec: TenantRecord, fn: TxFn[T]) -> T:
        async with pool.acquire() as conn:
            try:
                await conn.execute(enter_sql(rec, self._settings.fence_wait_ms))
            except asyncpg.PostgresError as exc:
                await abort(conn)
                if exc.sqlstate in (SQLSTATE_FENCE_STALE, SQLSTATE_NOT_ON_SHARD):
                    raise _Stale() from exc
                if exc.sqlstate == SQLSTATE_LOCK_TIMEOUT:
                    raise TenantMoving(f"tenant {rec.code} is being moved; retry shortly", tenantId=rec.tenant_id,
                                       retryAfter=1) from exc
                raise
            except BaseException:
                await abort(conn)
                raise
            try:
                result = await fn(conn)
            except BaseException:
                await abort(conn)
                raise
            try:
                await conn.execute("COMMIT")
            except BaseException:
                await abort(conn)
                raise
            return result
