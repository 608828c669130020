"""The host's resources, opened and closed in one place.

`open_host_runtime` is an `AsyncExitStack`: control pool, shard pools, directory,
resolve client, Redis, registry, background tasks; on exit they close in reverse order
(tasks are cancelled before Redis and the pools close), and a failing step doesn't stop
the others from closing.
"""
from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Final, Mapping

import asyncpg
import orjson
import redis.asyncio as aioredis
from aiohttp import web

from host.cron import Cron, Job
from host.events import EventBus, Subscriber, TaskOwner
from host.keys import registry_channel
from host.metrics import HostMetrics
from host.rbac import Authenticator, RbacService
from host.registry import Registry
from host.tx import TenantTx, keep_connection
from router.client import ResolveClient, redis_address
from router.directory import Directory
from router.errors import ConfigInvalid, FleetError
from router.keys import APP_ROLE
from router.pools import ShardPools, create_pool
from router.runtime import effective_settings
from router.settings import Settings
from shard_migrations.packages import Discovery

SUBSCRIBE_WAIT_S = 5.0


@dataclass
class HostRuntime:
    settings: Settings
    control: asyncpg.Pool
    shard_pools: ShardPools   # the request path's: APP_ROLE, a tenant's role in its transactions
    owner_pools: ShardPools   # the shard DSN's owner role: tenant schemas, plugin migrations
    directory: Directory
    resolver: ResolveClient
    redis: aioredis.Redis
    registry: Registry
    auth: Authenticator
    rbac: RbacService
    tx: TenantTx
    events: EventBus
    cron: Cron
    tasks: TaskOwner
    metrics: HostMetrics
    discovery: Discovery


RUNTIME: Final[web.AppKey["HostRuntime"]] = web.AppKey("tenantfleet_runtime")


@asynccontextmanager
async def open_host_runtime(settings: Settings, discovery: Discovery, metrics: HostMetrics, *,
                            cron_jobs: list[Job] | None = None) -> AsyncIterator[HostRuntime]:
    """Everything a host needs, subscribed to pub/sub before it is handed out.

    Raises FLEET_ERROR (no control plane configured, or Redis not answering), CONFIG_INVALID
    (no Redis URL), SHARD_UNREACHABLE (control plane down).
    """
    settings = effective_settings(settings)
    if not settings.redis_url:
        raise ConfigInvalid("the host needs Redis: set TENANTFLEET_REDIS_URL", key="redis_url")
    async with AsyncExitStack() as stack:
        control = await create_pool(settings.control_dsn, settings, min_size=settings.control_pool_min,
                                    max_size=settings.control_pool_max)
        stack.push_async_callback(control.close)
        await Directory.bootstrap(control)
        holder: list[Directory] = []

        async def dsn_lookup(shard_id: str) -> str | None:
            return await holder[0].dsn_of(shard_id)

        # Two pool sets per shard, both from the shard's DSN. The request path runs as
        # APP_ROLE (the fence only), and each tenant transaction as that tenant's role
        # (its schema's rows, read on public); none of them can create, alter or drop
        # anything, so the public schema grants CREATE to no role the host's requests
        # run as (CVE-2018-1058) even though the DSN is the owner's. Creating
        # tenant schemas and applying plugin migrations (admin API) need the owner: those
        # get pools of their own, opened on first use and holding no idle connections.
        pools = await stack.enter_async_context(
            ShardPools(settings, dsn_lookup, role=APP_ROLE, reset=keep_connection))
        owner_pools = await stack.enter_async_context(ShardPools(settings, dsn_lookup, min_size=0))
        directory = Directory(control, owner_pools, settings)
        holder.append(directory)
        resolver = await stack.enter_async_context(
            ResolveClient(settings, directory.lookup, registry=metrics.registry))
        directory.on_change = resolver.publish
        redis = aioredis.Redis(**redis_address(settings.redis_url), socket_connect_timeout=2.0)
        stack.push_async_callback(redis.aclose)
        tx = TenantTx(settings, resolver, pools, metrics)
        stack.push_async_callback(tx.close)  # its connections go back before the pools close
        tasks = TaskOwner()
        stack.push_async_callback(tasks.close)  # closes before Redis and the pools

        async def publish(change: Mapping[str, Any]) -> None:
            await redis.publish(registry_channel(settings.redis_namespace), orjson.dumps(change))

        registry = Registry(control, settings, discovery, owner_pools, publish)
        await registry.sync_packages(discovery.plugins)
        auth = Authenticator(control)
        events = EventBus(redis, settings.redis_namespace, tasks, metrics)

        async def on_registry() -> None:
            auth.clear()
            await registry.invalidate()

        subscriber = Subscriber(redis, settings.redis_namespace, events, on_registry)
        tasks.spawn(subscriber.run(), name="pubsub")
        try:
            await asyncio.wait_for(subscriber.ready.wait(), SUBSCRIBE_WAIT_S)
        except asyncio.TimeoutError:
            raise FleetError(f"Redis at {settings.redis_url} did not answer within {SUBSCRIBE_WAIT_S:.0f} s; "
                             "the host needs it for invalidations, events and cron") from None
        cron = Cron(redis, settings.redis_namespace, tasks, metrics, registry.enabled_tenants)
        metrics.watch_pools(tx.pool_figures)
        rt = HostRuntime(settings=settings, control=control, shard_pools=pools, owner_pools=owner_pools,
                         directory=directory, resolver=resolver, redis=redis, registry=registry, auth=auth, rbac=RbacService(control),
                         tx=tx, events=events, cron=cron, tasks=tasks,
                         metrics=metrics, discovery=discovery)
        if cron_jobs:
            cron.start(cron_jobs)
        yield rt
