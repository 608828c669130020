"""Per-shard asyncpg pools: created lazily on first use, bounded, closed by their owner."""
from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any, Awaitable, Callable, Coroutine

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy

from router.background import lower_backend_priority
from router.errors import ShardNotFound, ShardUnreachable
from router.settings import Settings

DsnLookup = Callable[[str], Awaitable[str | None]]
# A connection of our own or one lent by a pool: both run queries the same way.
AnyConnection = asyncpg.Connection | PoolConnectionProxy
# What connecting raises when the server is down, refuses us or doesn't answer in time.
CONNECT_ERRORS = (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


async def init_connection(conn: asyncpg.Connection) -> None:
    """Codecs every tenantfleet connection uses: json/jsonb as Python values via orjson."""
    for typ in ("json", "jsonb"):
        await conn.set_type_codec(typ, encoder=lambda v: orjson.dumps(v).decode(), decoder=orjson.loads,
                                  schema="pg_catalog")


async def connect(dsn: str, settings: Settings, **kwargs: Any) -> asyncpg.Connection:
    """One connection with tenantfleet's codecs; ShardUnreachable if the server doesn't answer."""
    try:
        conn = await asyncpg.connect(dsn, timeout=settings.connect_timeout_s, **kwargs)
    except CONNECT_ERRORS as exc:
        raise _unreachable(dsn, exc) from exc
    await init_connection(conn)
    result: asyncpg.Connection = conn
    return result


def _unreachable(dsn: str, exc: BaseException) -> ShardUnreachable:
    return ShardUnreachable(f"cannot connect to {redact(dsn)}: {exc.__class__.__name__}: {exc}", dsn=redact(dsn))


def role_init(role: str) -> Callable[[asyncpg.Connection], Coroutine[Any, Any, None]]:
    """A pool ``init`` that also switches each new connection to ``role`` for its lifetime.

    Once per connection, never per request: ``set_config('role', $1, false)`` is ``SET
    ROLE`` with the name as a value (no identifier in SQL text), set at session level, and
    the role survives the pool's reset (``RESET ALL`` skips it; PostgreSQL marks ``role``
    GUC_NO_RESET_ALL) and every transaction. Not a startup parameter (``server_settings``):
    poolers such as PgBouncer refuse unknown startup parameters, and ``init`` fails with a
    clear error on a shard not prepared for the role.

    What it does not do: the session user is still the DSN's owner, so SQL that runs
    ``RESET ROLE`` (or ``set_config('role', 'none', false)``) gets the owner back. It keeps
    plugin SQL from creating or altering objects by mistake or through a query built from
    input; it is not a wall against code that sets out to escape it (plugin code runs in
    the host process, next to the DSN, anyway). A LOGIN role of its own per shard would
    be that wall.
    """
    async def init(conn: asyncpg.Connection) -> None:
        await init_connection(conn)
        try:
            await conn.execute("SELECT pg_catalog.set_config('role', $1, false)", role)
        except asyncpg.InvalidParameterValueError as exc:  # 22023: no such role on this server
            raise ShardUnreachable(f"role {role} does not exist on this shard: prepare the shard with this "
                                   "version of tenantfleet (`tenantfleet up`, or Directory.prepare_shards)",
                                   role=role) from exc
    return init


async def create_pool(dsn: str, settings: Settings, *, min_size: int, max_size: int, role: str | None = None,
                      **kwargs: Any) -> asyncpg.Pool:
    """A bounded pool with tenantfleet's codecs; with ``role``, every connection runs as
    that role (see `role_init`). SHARD_UNREACHABLE if the server doesn't answer."""
    try:
        pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size,
                                         init=init_connection if role is None else role_init(role),
                                         timeout=settings.connect_timeout_s, **kwargs)
    except CONNECT_ERRORS as exc:
        raise _unreachable(dsn, exc) from exc
    assert pool is not None
    return pool


# query parameters of a postgresql:// URL that carry secrets (libpq's and asyncpg's names)
_SECRET_PARAMS = frozenset({"password", "sslpassword"})


def redact(dsn: str) -> str:
    """The DSN without its password, for messages and logs: the one in the user info and
    ``password``/``sslpassword`` query parameters (``postgresql://u@h/db?password=...``
    connects as well, and must not show either)."""
    if "://" not in dsn:
        return dsn
    scheme, rest = dsn.split("://", 1)
    head, sep, query = rest.partition("?")
    if "@" in head:
        creds, host = head.rsplit("@", 1)
        head = f"{creds.split(':', 1)[0]}@{host}"
    kept = "&".join(p for p in query.split("&") if p and p.split("=", 1)[0].lower() not in _SECRET_PARAMS)
    return f"{scheme}://{head}?{kept}" if sep and kept else f"{scheme}://{head}"


class ShardPools:
    """One bounded asyncpg pool per shard, opened on first use.

    ``dsn_lookup(shard_id)`` returns the shard's DSN (from the directory) or None; it is
    asked again for every new connection (a changed password applies from the next one).
    Connections run as the DSN's role (the owner: DDL, the directory, the migrator), or,
    with ``role``, switch to it once each (the host's request path: `APP_ROLE`).
    ``min_size`` / ``max_size`` override the settings' shard pool bounds. ``background``:
    the pool serves a migration (or moves that may yield, `router.background.moves_yield`),
    whose backends get the
    settings' ``operation_nice`` CPU priority (and ``SCHED_IDLE`` with ``operation_idle``)
    where they run on this machine (`router.background`).
    Use as ``async with ShardPools(...) as pools``; closing closes every pool, and keeps
    going when one fails (it is terminated instead).
    """

    def __init__(self, settings: Settings, dsn_lookup: DsnLookup, *, role: str | None = None,
                 min_size: int | None = None, max_size: int | None = None, background: bool = False,
                 **pool_kwargs: Any) -> None:
        self._settings = settings
        self._nice = settings.operation_nice if background else 0
        self._idle = settings.operation_idle
        self.note: dict[str, Any] = {}   # what the owner wants said about the pools (e.g. why they yield or not)
        self._dsn_lookup = dsn_lookup
        self._role = role
        self._min_size = settings.shard_pool_min if min_size is None else min_size
        self._max_size = settings.shard_pool_max if max_size is None else max_size
        self._pool_kwargs = pool_kwargs
        self._pools: dict[str, asyncpg.Pool] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    @property
    def yields(self) -> bool:
        """Whether the pools' backends run at the operations' lower priority."""
        return self._nice > 0

    async def __aenter__(self) -> "ShardPools":
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    def opened(self) -> dict[str, asyncpg.Pool]:
        return dict(self._pools)

    async def get(self, shard_id: str) -> asyncpg.Pool:
        pool = self._pools.get(shard_id)
        if pool is not None:
            return pool
        lock = self._locks.setdefault(shard_id, asyncio.Lock())
        async with lock:
            pool = self._pools.get(shard_id)
            if pool is None:
                dsn = await self._lookup(shard_id)
                pool = await create_pool(dsn, self._settings, min_size=self._min_size, max_size=self._max_size,
                                         role=self._role, connect=self._connector(shard_id), **self._pool_kwargs)
                self._pools[shard_id] = pool
        return pool

    async def _lookup(self, shard_id: str) -> str:
        dsn = await self._dsn_lookup(shard_id)
        if dsn is None:
            raise ShardNotFound(f"shard {shard_id} is not registered", shardId=shard_id)
        return dsn

    def _connector(self, shard_id: str) -> Callable[..., Coroutine[Any, Any, asyncpg.Connection]]:
        """The pool's ``connect``: every new connection looks the DSN up again, so a password
        changed in the directory (a rotated login password, a replaced shard password)
        is used from the next connection on, without reopening the pool."""
        async def connect_fresh(*_dsn: Any, **kwargs: Any) -> asyncpg.Connection:
            conn: asyncpg.Connection = await asyncpg.connect(await self._lookup(shard_id), **kwargs)
            if self._nice:
                try:
                    await lower_backend_priority(conn, self._nice, self._idle)
                except BaseException:
                    await conn.close(timeout=self._settings.connect_timeout_s)
                    raise
            return conn
        return connect_fresh

    async def drop(self, shard_id: str) -> None:
        """Close one shard's pool (e.g. after its DSN changed); the next `get` reopens it."""
        pool = self.detach(shard_id)
        if pool is not None:
            await close_pool(pool)

    def detach(self, shard_id: str) -> asyncpg.Pool | None:
        """Take one shard's pool out at once, without closing it (the caller closes it with
        `close_pool`): from now on `get` opens a fresh pool instead of returning this one."""
        return self._pools.pop(shard_id, None)

    async def close(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        await asyncio.gather(*(close_pool(p) for p in pools))


async def close_pool(pool: asyncpg.Pool) -> None:
    """Close ``pool``, waiting up to 10 s for connections still in use; terminated if that fails."""
    try:
        await asyncio.wait_for(pool.close(), timeout=10)
    except (asyncio.TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        pool.terminate()  # as asyncpg does: a pool whose close fails is terminated
