"""Opening the router's resources from settings: control pool, shard pools, directory.

With no ``TENANTFLEET_CONTROL_DSN`` the embedded fleet's endpoints are read from
``<fleet_dir>/fleet.json`` (written by `tenantfleet up`), so every CLI command works
against the fleet `make up` started.
"""
from __future__ import annotations

import json
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator

import asyncpg

from router.directory import Directory
from router.errors import FleetError
from router.pools import ShardPools, create_pool
from router.settings import Settings


def effective_settings(settings: Settings) -> Settings:
    """Settings with control_dsn and redis_url filled in from the embedded fleet if unset.

    Raises FleetError when neither is available.
    """
    if settings.control_dsn:
        return settings
    state = settings.fleet_dir / "fleet.json"
    if not state.exists():
        raise FleetError(f"no fleet: set TENANTFLEET_CONTROL_DSN, or run `make up` (no {state})")
    info = json.loads(state.read_text())["info"]
    return settings.model_copy(update={"control_dsn": info["control_dsn"],
                                       "redis_url": settings.redis_url or info["redis_url"]})


@dataclass
class RouterRuntime:
    settings: Settings
    control: asyncpg.Pool
    shard_pools: ShardPools
    directory: Directory


@asynccontextmanager
async def open_runtime(settings: Settings, *, bootstrap: bool = True) -> AsyncIterator[RouterRuntime]:
    """Control pool, shard pools and directory, closed in reverse order on exit.

    The directory announces nothing until its owner sets ``directory.on_change``."""
    settings = effective_settings(settings)
    async with AsyncExitStack() as stack:
        control = await create_pool(settings.control_dsn, settings, min_size=settings.control_pool_min,
                                    max_size=settings.control_pool_max)
        stack.push_async_callback(control.close)
        if bootstrap:
            await Directory.bootstrap(control)

        async def dsn_lookup(shard_id: str) -> str | None:
            return await directory.dsn_of(shard_id)  # bound below, before any pool is opened

        pools = await stack.enter_async_context(ShardPools(settings, dsn_lookup))
        directory = Directory(control, pools, settings)
        yield RouterRuntime(settings, control, pools, directory)
