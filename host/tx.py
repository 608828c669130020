"""`with_tenant_tx`: one tenant's transaction on its shard, fenced, in a clean connection.

Round trips per call: (1) ``BEGIN ISOLATION LEVEL READ COMMITTED; SELECT fleet.enter_tenant(...)``
as one simple query:
shared advisory lock on the tenant, epoch check against the shard's fence, and, set
*locally*, ``search_path`` to the quoted schema, then ``public``, and ``role`` to the
tenant's own role (see below); (2..n) whatever ``fn`` runs; (n+1) ``COMMIT`` and the
session clean-up (see below).
Everything the fence sets is transaction-local, so the connection goes back to the pool
as the app role with no search_path, lock or open transaction: after an error or a
cancellation the transaction is rolled back, and a connection whose state can't be
proven clean (rollback failed, cancelled mid-query) is terminated instead of being
returned.

Isolation is the database's: each connection runs as the app role (`router.keys.APP_ROLE`,
switched once when opened), which holds no right on any tenant schema; the fence
switches the transaction to ``fleet.tenant_role(schema)``, which holds that tenant's
schema (and read on ``public``) only, so a fully-qualified name of another tenant's
table fails with SQLSTATE 42501 whatever ``fn`` spells. The switch happens inside
``fleet.enter_tenant`` (a plain function: PostgreSQL refuses to set ``role`` inside a
SECURITY DEFINER one), so it costs no round trip and no statement of its own.

Connections come from `host.leases` (kept checked out of asyncpg's pool between
transactions: a list pop and append instead of asyncpg's acquire/release cycle), and
``fn`` gets a `TenantDb` that refuses every use once its transaction has ended. A
connection lost under a transaction (terminated backend, closed socket) is answered with
SHARD_UNREACHABLE, whichever asyncpg error surfaced, and replaced for the next one.

Session state left by SQL inside a transaction (a session-level ``SET`` or
``set_config(..., false)``, a ``WITH HOLD`` cursor, a ``LISTEN``, a session advisory lock
such as one on another tenant's ``fleet.tenant_lock_key``, which would hold off that
tenant's moves for as long as the connection lives) must not outlive it on a pooled
connection. Session advisory locks can't be taken at all where the shard's owner could
revoke EXECUTE on PostgreSQL's session-level lock functions from PUBLIC (a superuser
owner: `router.schema`'s hardening; the transaction-level ones stay, the fence uses
them), so there is nothing to release. The rest is undone in the round trip that ends the
transaction: ``COMMIT`` is sent as one simple query with ``RESET ALL; CLOSE ALL; UNLISTEN
*`` after it (`COMMIT_SQL`), and, on a shard where tenant roles can still take session
locks (a non-superuser owner couldn't revoke), ``SELECT pg_advisory_unlock_all()`` too
(`COMMIT_UNLOCK_SQL`). Which one a shard needs is asked once per pool (`SESSION_LOCKS_SQL`,
when the host first uses the shard or reopens its pool). Why not always the unlock: that
``SELECT`` alone was ~30 us of PostgreSQL CPU per transaction, the three utility
statements together ~10 (bench/session_cleanup.py), against a request's ~450 us of CPU.
PostgreSQL runs the statements after an explicit COMMIT in an implicit transaction of
their own, and skips them if the COMMIT fails; that path, and every rollback, ends with
`ROLLBACK_SQL`: the same clean-up with the unlock, whatever the shard (errors are rare).
``RESET ALL`` leaves ``role`` alone (PostgreSQL marks it GUC_NO_RESET_ALL): a role left at
session level is caught by the next fence (`_WrongRole`). So the pools skip asyncpg's own
reset query on release, a round trip that would clean nothing more; asyncpg still rolls
back a transaction left open.

What this does not close (PostgreSQL's limit, README "Database roles"): SQL inside a
tenant transaction can ``SET ROLE`` to *another tenant's* role on the same shard, and so
read and write that tenant's rows (nothing more: no DDL, no third tenant, not the fence,
not the owner). PostgreSQL checks ``SET ROLE`` against the session user only, and the
session user (the shard's login role) must be able to switch to every tenant role,
because one pooled connection serves every tenant of the shard in turn and the fence
switches with ``set_config('role', ...)``. Nothing narrows that per transaction without
a catalog write: without the SET option (PostgreSQL 16+) the fence can't switch either,
and the switch can't move into a SECURITY DEFINER function that SQL couldn't repeat,
because PostgreSQL refuses to set ``role`` inside any SECURITY DEFINER function (both
pinned by tests/test_login_role.py); no hook sees ``SET`` (event triggers fire for DDL
only), and a ``GRANT``/``REVOKE`` per request would write the catalog and serialise on it.
Plugins are trusted code that the operator reviews; the narrow context takes values as
parameters, never as SQL text, so an injected value can't set a role.

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
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, Coroutine, Mapping, TypeVar

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from host.keys import (
    SHARD_SWEEP_MAX_S, SQLSTATE_FENCE_STALE, SQLSTATE_LOCK_TIMEOUT, SQLSTATE_NOT_ON_SHARD, STALE_BACKOFF_INITIAL_S,
    STALE_BACKOFF_MAX_S,
)
from host.leases import Leases, LeasesClosed, PoolFigures, is_gone
from host.metrics import HostMetrics
from host.tenancy import REQUEST_TENANT, Resolver, check_servable
from plugins.api import Db
from router.errors import ShardUnreachable, TenantFleetError, TenantMoving
from router.models import TenantRecord, parse_tenant_id
from router.pools import ShardPools, close_pool
from router.settings import Settings
from router.shard_latency import ShardLatency

log = logging.getLogger("tenantfleet.host.tx")

T = TypeVar("T")
Conn = asyncpg.Connection | PoolConnectionProxy
TxFn = Callable[[Db], Awaitable[T]]
FinishMove = Callable[[str], Awaitable[TenantRecord | None]]

# What ends every tenant transaction, in the same round trip as its COMMIT or ROLLBACK
# (one simple query; see the module docstring): undo what SQL inside it may have left at
# session level for the next transaction on the connection (another tenant's).
_CLEAN_SESSION = "; RESET ALL; CLOSE ALL; UNLISTEN *"
_UNLOCK = "; SELECT pg_catalog.pg_advisory_unlock_all()"
COMMIT_SQL = "COMMIT" + _CLEAN_SESSION                  # where tenant roles can't take session locks
COMMIT_UNLOCK_SQL = COMMIT_SQL + _UNLOCK                # where they can
ROLLBACK_SQL = "ROLLBACK" + _CLEAN_SESSION + _UNLOCK    # every rollback: rare, so always everything
# Whether the request path's roles may take session-level advisory locks on this shard:
# the login role (after a RESET ROLE), the app role, and the tenant roles' group (each
# tenant role holds only what PUBLIC and the group hold). PostgreSQL's session-level
# lockers are exactly these four names (two signatures each).
SESSION_LOCKS_SQL = (
    "SELECT pg_catalog.bool_or(pg_catalog.has_function_privilege(r.name, p.oid, 'EXECUTE')) "
    "FROM pg_catalog.pg_proc p, (VALUES (session_user), (current_user), (fleet.tenant_group_role())) r(name) "
    "WHERE p.pronamespace = 'pg_catalog'::pg_catalog.regnamespace AND p.proname IN "
    "('pg_advisory_lock', 'pg_advisory_lock_shared', 'pg_try_advisory_lock', 'pg_try_advisory_lock_shared')")

CACHED_STATEMENT_RETRIES = 1
WRONG_ROLE_RETRIES = 1  # a fresh connection runs as the app role: one retry is enough
# Opening a connection failed: the shard refuses, drops or doesn't answer (sorted by class,
# never by message text). Errors under a transaction are classified by `is_gone` instead.
# (28000/28P01: the login was refused, e.g. a password rotated between the directory's
# answer and the connection; the next connection reads the new one.)
_CONNECT_FAILED = (OSError, TimeoutError, asyncpg.ConnectionDoesNotExistError, asyncpg.CannotConnectNowError,
                   asyncpg.InvalidAuthorizationSpecificationError)


class _Stale(Exception):
    """The shard says the resolved placement is out of date."""


class _WrongRole(Exception):
    """The fence was refused (SQLSTATE 42501): the connection no longer runs as the app
    role. SQL of an earlier transaction on it set ``role`` at session level
    (``set_config('role', x, false)``, which outlives that transaction's COMMIT): to
    another tenant's role, which may not run the fence, every later transaction on the
    connection would fail. The connection has been terminated; the pool opens a new one."""


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
    # READ COMMITTED whatever the server's or role's default_transaction_isolation: under
    # REPEATABLE READ the snapshot would be taken as the fence's statement starts, before
    # it waits for a mover, and the fence would read the epoch from before the cutover
    return (f"BEGIN ISOLATION LEVEL READ COMMITTED; "
            f"SELECT fleet.enter_tenant('{tenant}'::uuid, {int(epoch)}::bigint, {int(wait_ms)}::int)")


async def abort(conn: Conn) -> None:
    """Roll back; a connection that can't be rolled back cleanly is terminated."""
    if is_gone(conn):
        return
    try:
        await conn.execute(ROLLBACK_SQL)
    except asyncio.CancelledError:
        conn.terminate()
        raise
    except (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError, TimeoutError):
        # e.g. "another operation is in progress" after a cancelled query or a lost connection
        conn.terminate()


class TenantTx:
    """Runs functions inside fenced tenant transactions on the tenant's shard.

    Its connections stay leased from ``pools`` (`host.leases`): `close` it (or use it as
    ``async with``) before closing the pools, or their close waits for them.
    """

    def __init__(self, settings: Settings, resolver: Resolver, pools: ShardPools, metrics: HostMetrics,
                 finish_move: FinishMove | None = None, latency: ShardLatency | None = None) -> None:
        self._settings = settings
        self._resolver = resolver
        self._pools = pools
        self._metrics = metrics
        # `Directory.finish_committed_move`: a move whose mover stopped past its commit point
        self._finish_move = finish_move
        self.latency = latency   # each committed transaction's time per shard (the SLO throttle's figure)
        self._finishing: dict[str, asyncio.Task[TenantRecord | None]] = {}  # one call per tenant at a time
        self._leased: dict[str, Leases] = {}
        self._used: dict[str, float] = {}   # shard id -> when a tenant transaction last started there
        self._commit: dict[str, str] = {}  # per shard: COMMIT_SQL or COMMIT_UNLOCK_SQL (`_commit_statement`)
        self._closed = False

    async def __aenter__(self) -> "TenantTx":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def run(self, tenant_id: str, fn: TxFn[T]) -> T:
        """See `_run`; its time, retries and failures included, is the shard's latency figure."""
        if self.latency is None:
            return await self._run(tenant_id, fn)
        started = time.monotonic()
        shard: list[str] = []
        try:
            return await self._run(tenant_id, fn, shard)
        finally:
            if shard:
                self.latency.observe(shard[-1], time.monotonic() - started)

    async def _run(self, tenant_id: str, fn: TxFn[T], shard: list[str] | None = None) -> T:
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
        stale_waited = 0.0
        statement_tries = 0
        role_tries = 0
        while True:
            check_servable(rec)
            leases = await self._leases(rec.shard_id)
            self._used[rec.shard_id] = time.monotonic()
            if shard is not None:
                shard.append(rec.shard_id)
            try:
                return await self._attempt(leases, rec, fn)
            except _Stale:
                fence_tries += 1
                self._metrics.fence_retries.inc()
                log.info("stale fence for tenant %s at epoch %s; re-resolving", rec.tenant_id, rec.epoch)
                if fence_tries > self._settings.fence_retries:
                    raise TenantMoving(f"tenant {rec.code} is moving; retry shortly", tenantId=rec.tenant_id,
                                       retryAfter=1) from None
                stale = rec
                rec, stale_waited = await self._re_resolve(stale, stale_waited)
                if REQUEST_TENANT.get() is stale:
                    REQUEST_TENANT.set(rec)  # later transactions of this request use the new placement
            except asyncpg.InvalidCachedStatementError:
                statement_tries += 1
                self._metrics.cached_statement_retries.inc()
                if statement_tries > CACHED_STATEMENT_RETRIES:
                    raise
            except _WrongRole as exc:
                role_tries += 1
                log.warning("shard %s: a connection left in another role was replaced", rec.shard_id)
                if role_tries > WRONG_ROLE_RETRIES:
                    raise ShardUnreachable(f"shard {rec.shard_id} refuses the fence to the app role: prepare the "
                                           "shard with this version of tenantfleet (`tenantfleet up`)",
                                           shardId=rec.shard_id) from exc.__cause__

    async def _re_resolve(self, stale: TenantRecord, waited: float) -> tuple[TenantRecord, float]:
        """The tenant's placement after its fence said ``stale`` is out of date, and the time
        spent waiting so far in this call. While the directory still answers the stale
        placement (a cutover raises the source's fence first and switches the directory a
        moment later), back off a few ms, doubling, for at most ``fence_wait_ms`` in all
        (then TENANT_MOVING): never a burst of ``fence_retries`` tries in a row."""
        budget = self._settings.fence_wait_ms / 1000
        finish_after = self._settings.move_finish_after_ms / 1000
        pause = STALE_BACKOFF_INITIAL_S
        finish_tried = False
        while True:
            self._resolver.drop(stale.tenant_id, stale_epoch=stale.epoch)
            rec = await self._resolver.resolve(id=stale.tenant_id)
            if rec.epoch > stale.epoch or rec.shard_id != stale.shard_id:
                return rec, waited
            if waited >= finish_after and not finish_tried:
                # longer than a cutover takes: the mover may have stopped past its commit
                # point; the directory then follows the fence (idempotent, a no-op otherwise)
                finish_tried = True
                if await self._finish(stale.tenant_id) is not None:
                    continue
            if waited >= budget:
                raise TenantMoving(f"tenant {stale.code} is moving; retry shortly", tenantId=stale.tenant_id,
                                   retryAfter=1)
            step = min(pause, budget - waited)
            self._metrics.fence_stale_waits.inc()
            await asyncio.sleep(step)
            waited += step
            pause = min(pause * 2, STALE_BACKOFF_MAX_S)

    async def _finish(self, tenant_id: str) -> TenantRecord | None:
        """`finish_move` for the tenant, shared by the requests waiting on it; None on any
        failure (the request then waits out its budget and answers TENANT_MOVING)."""
        if self._finish_move is None:
            return None
        task = self._finishing.get(tenant_id)
        if task is None:
            task = asyncio.ensure_future(self._finish_move(tenant_id))
            self._finishing[tenant_id] = task
            task.add_done_callback(lambda _t: self._finishing.pop(tenant_id, None))
        try:
            rec = await asyncio.shield(task)
        except TenantFleetError as exc:
            log.warning("tenant %s: finishing its move failed: %s", tenant_id, exc)
            return None
        except Exception:
            log.warning("tenant %s: finishing its move failed", tenant_id, exc_info=True)
            return None
        if rec is not None:
            self._metrics.moves_finished.inc()
        return rec

    async def _leases(self, shard_id: str) -> Leases:
        leases = self._leased.get(shard_id)
        if leases is not None and not leases.pool.is_closing():
            return leases
        if self._closed:
            raise LeasesClosed()
        pool = await self._pools.get(shard_id)  # SHARD_NOT_FOUND, SHARD_UNREACHABLE
        if self._closed:  # closed while the pool opened: nothing would ever give leases back
            raise LeasesClosed()
        leases = self._leased.get(shard_id)
        if leases is None or leases.pool is not pool:  # first use, or the pool was reopened
            stale, leases = leases, Leases(pool, recycle_tenants=self._settings.pool_recycle_tenants,
                                           on_recycle=self._metrics.connections_recycled.inc)
            self._leased[shard_id] = leases
            self._commit.pop(shard_id, None)  # asked again on the (re)opened pool's first transaction
            if stale is not None:
                await stale.close()
        return leases

    @asynccontextmanager
    async def connection(self, shard_id: str) -> AsyncIterator[PoolConnectionProxy]:
        """One of the request path's connections to ``shard_id``, outside any tenant (e.g.
        ``/readyz``'s ``SELECT 1``); given back afterwards. SHARD_NOT_FOUND if unregistered,
        SHARD_UNREACHABLE if a connection can't be opened."""
        leases = await self._leases(shard_id)
        conn = await _take(leases, shard_id)
        try:
            yield conn
        finally:
            leases.give(conn)

    def pool_figures(self) -> dict[str, PoolFigures]:
        """Per shard: connections open, idle, the bound and takers waiting (for /metrics)."""
        out = {}
        for shard_id, leases in self._leased.items():
            _, free, waiting = leases.figures()
            pool = leases.pool
            out[shard_id] = PoolFigures(pool.get_size(), free + pool.get_idle_size(), pool.get_max_size(), waiting)
        return out

    async def close_unserved(self, shard_states: Mapping[str, str]) -> list[str]:
        """Close the leased connections and the pool of every shard this host no longer
        serves: one ``shard_states`` (the directory's shard id -> state) marks ``offline``
        or no longer lists, or one no tenant transaction started on for
        ``idle_shard_close_s`` (e.g. drained: its tenants were moved away). Returns the
        shards closed. A tenant that lands on one again reopens it on demand (`_leases`);
        a transaction still running on one finishes, its connection then goes back to
        the closing pool (asyncpg waits for it, then terminates what is left)."""
        now = time.monotonic()
        idle_s = self._settings.idle_shard_close_s
        gone = [sid for sid in self._pools.opened()
                if shard_states.get(sid, "offline") == "offline" or now - self._used.get(sid, 0.0) >= idle_s]
        # every one taken out before the first await: a transaction or a /readyz probe that
        # arrives while they close opens a fresh pool, never leases from one being closed
        closing = [(sid, self._leased.pop(sid, None), self._pools.detach(sid)) for sid in gone]
        for sid in gone:
            self._used.pop(sid, None)
        for sid, leases, pool in closing:
            if leases is not None:
                await leases.close()
            if pool is not None:
                await close_pool(pool)
            log.info("shard %s: closed this host's connections to it (%s)", sid,
                     "offline or removed" if shard_states.get(sid, "offline") == "offline" else
                     f"no tenant served there for {idle_s:g} s")
        return gone

    async def close(self) -> None:
        """Give every connection back to its pool (before the pools close)."""
        self._closed = True  # later transactions raise LeasesClosed instead of leasing anew
        leased, self._leased = list(self._leased.values()), {}
        await asyncio.gather(*(leases.close() for leases in leased))

    def _enter_statement(self, rec: TenantRecord) -> str:
        """The simple query that opens ``rec``'s transaction: BEGIN and the fence, which also
        switches to the tenant's role. (bench/request_path.py replaces it in a subclass of
        its own to measure what the switch costs; nothing else does.)"""
        return enter_sql(rec, self._settings.fence_wait_ms)

    async def _commit_statement(self, conn: PoolConnectionProxy) -> str:
        """What ends a transaction on ``conn``'s shard: `COMMIT_UNLOCK_SQL` where the request
        path's roles can take session advisory locks, else `COMMIT_SQL` (one query, outside
        any transaction; asked once per pool). (bench/request_path.py replaces it in a
        subclass of its own to measure what the clean-up costs; nothing else does.)"""
        return COMMIT_UNLOCK_SQL if await conn.fetchval(SESSION_LOCKS_SQL) else COMMIT_SQL

    async def _attempt(self, leases: Leases, rec: TenantRecord, fn: TxFn[T]) -> T:
        conn = await _take(leases, rec.shard_id)
        db = TenantDb(conn)
        fencing = True
        try:
            commit = self._commit.get(rec.shard_id)
            if commit is None:
                commit = self._commit[rec.shard_id] = await self._commit_statement(conn)
            await conn.execute(self._enter_statement(rec))
            fencing = False
            result = await fn(db)
            await conn.execute(commit)
            return result
        except BaseException as exc:
            lost = is_gone(conn)  # before the rollback, which terminates what it can't roll back
            await abort(conn)
            if lost and isinstance(exc, Exception) and not isinstance(exc, TenantFleetError):
                # whichever asyncpg error surfaced (a closed connection, a FATAL from a
                # terminated backend, a protocol left mid-operation), the shard is the cause
                raise ShardUnreachable(f"shard {rec.shard_id}: connection lost ({exc.__class__.__name__})",
                                       shardId=rec.shard_id) from exc
            if fencing and isinstance(exc, asyncpg.PostgresError):
                if exc.sqlstate in (SQLSTATE_FENCE_STALE, SQLSTATE_NOT_ON_SHARD):
                    raise _Stale() from exc
                if exc.sqlstate == SQLSTATE_LOCK_TIMEOUT:
                    raise TenantMoving(f"tenant {rec.code} is being moved; retry shortly", tenantId=rec.tenant_id,
                                       retryAfter=1) from exc
                if isinstance(exc, asyncpg.InsufficientPrivilegeError):
                    conn.terminate()  # its session's role is not the app role any more: see _WrongRole
                    raise _WrongRole() from exc
                if isinstance(exc, asyncpg.InvalidParameterValueError):  # 22023: the tenant's role is missing
                    raise ShardUnreachable(f"shard {rec.shard_id} has no role for tenant {rec.code}: prepare the "
                                           "shard with this version of tenantfleet (`tenantfleet up`)",
                                           shardId=rec.shard_id, tenantId=rec.tenant_id) from exc
            raise
        finally:
            db._conn = None
            leases.give(conn, rec.tenant_id)


async def close_unserved_shards(tx: TenantTx, shard_states: Callable[[], Awaitable[Mapping[str, str]]],
                                settings: Settings) -> None:
    """Run forever (an owned task): every quarter of ``idle_shard_close_s`` (at most
    `SHARD_SWEEP_MAX_S`), `TenantTx.close_unserved` with the directory's shard states. A
    control plane that doesn't answer skips that round (nothing is closed on a guess)."""
    interval = min(settings.idle_shard_close_s / 4, SHARD_SWEEP_MAX_S)
    while True:
        await asyncio.sleep(interval)
        try:
            states = await shard_states()
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, TenantFleetError) as exc:
            log.warning("shard states not read (%s); no pool closed this round", exc.__class__.__name__)
            continue
        await tx.close_unserved(states)


async def _take(leases: Leases, shard_id: str) -> PoolConnectionProxy:
    try:
        return await leases.take()
    except _CONNECT_FAILED as exc:
        raise ShardUnreachable(f"shard {shard_id} is unreachable: {exc.__class__.__name__}",
                               shardId=shard_id) from exc


class TenantDb:
    """What ``fn`` gets: the transaction's connection, for the `plugins.api.Db` methods only.

    The connection itself goes on serving other tenants' transactions (`host.leases`), so
    nothing handed out may outlive ``fn``'s transaction: every call after it ended raises
    ``asyncpg.InterfaceError``, and what could be kept and used later (prepared statements,
    cursors, transaction objects, listeners, the raw connection) is not offered at all.
    """
    __slots__ = ("_conn",)

    def __init__(self, conn: PoolConnectionProxy) -> None:
        self._conn: PoolConnectionProxy | None = conn

    def _live(self) -> PoolConnectionProxy:
        conn = self._conn
        if conn is None:
            raise asyncpg.InterfaceError("this connection's with_tenant_tx transaction has ended")
        return conn

    def fetch(self, query: str, *args: Any, timeout: float | None = None) -> Coroutine[Any, Any, list[Any]]:
        return self._live().fetch(query, *args, timeout=timeout)

    def fetchrow(self, query: str, *args: Any, timeout: float | None = None) -> Coroutine[Any, Any, Any]:
        return self._live().fetchrow(query, *args, timeout=timeout)

    def fetchval(self, query: str, *args: Any, column: int = 0, timeout: float | None = None) -> Coroutine[Any, Any, Any]:
        return self._live().fetchval(query, *args, column=column, timeout=timeout)

    def execute(self, query: str, *args: Any, timeout: float | None = None) -> Coroutine[Any, Any, str]:
        return self._live().execute(query, *args, timeout=timeout)

    def executemany(self, command: str, args: Any, *, timeout: float | None = None) -> Coroutine[Any, Any, None]:
        return self._live().executemany(command, args, timeout=timeout)
