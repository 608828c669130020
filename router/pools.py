"""Per-shard asyncpg pools: created lazily on first use, bounded, closed by their owner."""
from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any, Awaitable, Callable

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy

from router.errors import ShardNotFound, ShardUnreachable
from router.settings import Settings

DsnLookup = Callable[[str], Awaitable[str | None]]
# A connection of our own or one lent by a pool: both run queries the same way.
AnyConnection = asyncpg.Connection | PoolConnectionProxy


async def init_connection(conn: asyncpg.Connection) -> None:
    """Codecs every tenantfleet connection uses: json/jsonb as Python values via orjson."""
    for typ in ("json", "jsonb"):
        await conn.set_type_codec(typ, encoder=lambda v: orjson.dumps(v).decode(), decoder=orjson.loads,
                                  schema="pg_catalog")


async def connect(dsn: str, settings: Settings, **kwargs: Any) -> asyncpg.Connection:
    """One connection with tenantfleet's codecs; ShardUnreachable if the server doesn't answer."""
    try:
        conn = await asyncpg.connect(dsn, timeout=settings.connect_timeout_s, **kwargs)
    except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise ShardUnreachable(f"cannot connect to {redact(dsn)}: {exc.__class__.__name__}: {exc}",
                               dsn=redact(dsn)) from exc
    await init_connection(conn)
    result: asyncpg.Connection = conn
    return result


async def create_pool(dsn: str, settings: Settings, *, min_size: int, max_size: int, **kwargs: Any) -> asyncpg.Pool:
    try:
        pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size, init=init_connection,
                                         timeout=settings.connect_timeout_s, **kwargs)
    except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise ShardUnreachable(f"cannot connect to {redact(dsn)}: {exc.__class__.__name__}: {exc}",
                               dsn=redact(dsn)) from exc
    assert pool is not None
    return pool


def redact(dsn: str) -> str:
    """The DSN without its password, for messages and logs."""
    if "@" not in dsn or "://" not in dsn:
        return dsn
    scheme, rest = dsn.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}@{host}"


class ShardPools:
    """One bounded asyncpg pool per shard, opened on first use.

    ``dsn_lookup(shard_id)`` returns the shard's DSN (from the directory) or None.
    Use as ``async with ShardPools(...) as pools``; closing closes every pool, and keeps
    going when one fails (it is terminated instead).
    """

    def __init__(self, settings: Settings, dsn_lookup: DsnLookup, **pool_kwargs: Any) -> None:
        self._settings = settings
        self._dsn_lookup = dsn_lookup
        self._pool_kwargs = pool_kwargs
        self._pools: dict[str, asyncpg.Pool] = {}
        self._locks: dict[str, asyncio.Lock] = {}

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
                dsn = await self._dsn_lookup(shard_id)
                if dsn is None:
                    raise ShardNotFound(f"shard {shard_id} is not registered", shardId=shard_id)
                pool = await create_pool(dsn, self._settings, min_size=self._settings.shard_pool_min,
                                         max_size=self._settings.shard_pool_max, **self._pool_kwargs)
                self._pools[shard_id] = pool
        return pool

    async def drop(self, shard_id: str) -> None:
        """Close one shard's pool (e.g. after its DSN changed); the next `get` reopens it."""
        pool = self._pools.pop(shard_id, None)
        if pool is not None:
            await _close_pool(pool)

    async def close(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        await asyncio.gather(*(_close_pool(p) for p in pools))


async def _close_pool(pool: asyncpg.Pool) -> None:
    try:
        await asyncio.wait_for(pool.close(), timeout=10)
    except (asyncio.TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        pool.terminate()  # as asyncpg does: a pool whose close fails is terminated
