"""The host's resources, opened and closed in one place.

`open_host_runtime` is an `AsyncExitStack`: control pool, shard pools, directory,
resolve client, Redis, registry, background tasks (pub/sub listener, event queue
consumer, outbox relay, cron); on exit they close in reverse order (tasks are cancelled
before Redis and the pools close), and a failing step doesn't stop the others from closing.

Redis is not needed to be correct: with it down the host starts (after
`SUBSCRIBE_WAIT_S`) and serves; events go from the outbox to the handlers on this host,
registry and principal changes reach other hosts by the cache TTLs, cron ticks are skipped.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Final, Mapping, Sequence

import asyncpg
import orjson
import redis.asyncio as aioredis
from aiohttp import web
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from host.cron import Cron, Job
from host.events import EventBus, EventHandler, Subscriber, TaskOwner
from host.keys import EVENTS_POP_S, REDIS_TIMEOUT_S, SUBSCRIBE_WAIT_S, registry_channel
from host.metrics import HostMetrics
from host.outbox import SHARD_ERRORS, OutboxStore, Relay
from host.rbac import Authenticator, RbacService
from host.refresh import RefreshAhead
from host.registry import Registry
from host.tx import TenantTx, close_unserved_shards, keep_connection
from router.client import ResolveClient, redis_address
from router.directory import Directory
from router.errors import ConfigInvalid, PluginDisabled
from router.keys import APP_ROLE
from router.pools import ShardPools, create_pool
from router.runtime import effective_settings
from router.settings import Settings
from router.shard_latency import ShardLatency, watch_loop_lag
from shard_migrations.packages import Discovery

log = logging.getLogger("tenantfleet.host.runtime")

LATENCY_PUBLISH_S = 1.0


async def publish_shard_latency(redis: aioredis.Redis, namespace: str, latency: ShardLatency,
                                lag: ShardLatency | None = None) -> None:
    """Publish this host's rolling p95 per shard, its loop lag's p95 added (``lag``, as
    `watch_loop_lag` records it), about once a second (the SLO throttle reads it); Redis
    down: logged once per outage, tried again next second."""
    from router.shard_latency import host_figures, publish_latency

    host_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    failing = False
    while True:
        await asyncio.sleep(LATENCY_PUBLISH_S)
        try:
            await publish_latency(redis, namespace, host_id, *host_figures(latency, lag))
        except (aioredis.RedisError, OSError, asyncio.TimeoutError) as exc:
            if not failing:
                log.warning("shard latency not published (Redis: %s); the SLO throttle sees no figures from this "
                            "host until it is back", exc.__class__.__name__)
            failing = True
        else:
            failing = False


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
    relay: Relay
    cron: Cron
    tasks: TaskOwner
    metrics: HostMetrics
    discovery: Discovery

    def start_delivery(self) -> None:
        """Start taking events: the Redis queue consumer and the outbox relay, owned by
        `tasks`. Call it once the plugins' handlers can run (the app does, right after
        attaching the runtime to its plugin contexts); the CLI never does."""
        self.tasks.spawn(self.events.subscriptions.run(), name="events:subscriptions")
        self.tasks.spawn(self.events.consume(), name="events:queue")
        self.tasks.spawn(self.relay.run(), name="events:relay")


RUNTIME: Final[web.AppKey["HostRuntime"]] = web.AppKey("tenantfleet_runtime")


@asynccontextmanager
async def open_host_runtime(settings: Settings, discovery: Discovery, metrics: HostMetrics, *,
                            cron_jobs: list[Job] | None = None,
                            event_handlers: Sequence[tuple[str, str, EventHandler]] = (),
                            background: bool = True) -> AsyncIterator[HostRuntime]:
    """Everything a host needs; with ``background``, subscribed to pub/sub before it is
    handed out (waiting at most `SUBSCRIBE_WAIT_S` for Redis, then going on without it);
    events are taken once `HostRuntime.start_delivery` is called. Without ``background``
    (the CLI: one change, then exit) no task is started and Redis is not waited for.
    ``event_handlers`` (plugin id, event name, handler) are registered before any event
    is taken; they are this host's event subscriptions (`host.subscriptions`), published
    to the control plane and read back, with the fleet's, before delivery starts.

    Raises FLEET_ERROR (no control plane configured), CONFIG_INVALID (no Redis URL),
    SHARD_UNREACHABLE (control plane down).
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

        async def login_dsn_lookup(shard_id: str) -> str | None:
            return await holder[0].login_dsn_of(shard_id)

        # Two pool sets per shard. The request path logs in as the shard's login role
        # (never the owner: README "Database roles"), runs as APP_ROLE (the fence only),
        # and each tenant transaction as that tenant's role (its schema's rows, read on
        # public); none of them can create, alter or drop anything (CVE-2018-1058), and
        # RESET ROLE gets back a role that holds nothing. Creating tenant schemas and
        # applying plugin migrations (admin API) and the outbox (fleet.*) need the owner:
        # those get pools of their own from the shard DSN, opened on first use and
        # holding no idle connections.
        pools = await stack.enter_async_context(
            ShardPools(settings, login_dsn_lookup, role=APP_ROLE, reset=keep_connection))
        owner_pools = await stack.enter_async_context(ShardPools(settings, dsn_lookup, min_size=0))
        directory = Directory(control, owner_pools, settings)
        holder.append(directory)
        resolver = await stack.enter_async_context(
            ResolveClient(settings, directory.lookup, registry=metrics.registry))
        directory.on_change = resolver.publish
        # Commands are bounded and fail at once (one immediate retry for a pooled socket the
        # server closed), never after redis-py's default retries with backoff: seconds a
        # caller would wait on a Redis that is away. The blocking queue pop and pub/sub get
        # clients of their own, without retries, so a gap is noticed, not papered over.
        address = redis_address(settings.redis_url)
        redis = aioredis.Redis(**address, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S,
                               retry=Retry(NoBackoff(), 1))
        stack.push_async_callback(redis.aclose)
        queue_redis = aioredis.Redis(**address, socket_timeout=EVENTS_POP_S + REDIS_TIMEOUT_S,
                                     socket_connect_timeout=REDIS_TIMEOUT_S, retry=Retry(NoBackoff(), 0))
        stack.push_async_callback(queue_redis.aclose)
        sub_redis = aioredis.Redis(**address, socket_connect_timeout=REDIS_TIMEOUT_S, retry=Retry(NoBackoff(), 0))
        stack.push_async_callback(sub_redis.aclose)
        latency = ShardLatency()
        tx = TenantTx(settings, resolver, pools, metrics, finish_move=directory.finish_committed_move,
                      latency=latency)
        stack.push_async_callback(tx.close)  # its connections go back before the pools close
        tasks = TaskOwner()
        stack.push_async_callback(tasks.close)  # closes before Redis and the pools

        async def publish(change: Mapping[str, Any]) -> None:
            await redis.publish(registry_channel(settings.redis_namespace), orjson.dumps(change))

        # one refresh-ahead budget for both caches: its re-reads hold at most MAX_IN_FLIGHT
        # of the control pool's connections (host.refresh)
        refresh = RefreshAhead("host caches")
        stack.push_async_callback(refresh.close)  # re-reads in flight end before the pools close
        registry = Registry(control, settings, discovery, owner_pools, publish, refresh=refresh)
        await registry.sync_packages(discovery.plugins)
        auth = Authenticator(control, refresh=refresh)
        store = OutboxStore(owner_pools)  # the outbox is fleet.*: the shard owner's

        async def shard_of(tenant_id: str) -> str:
            return (await resolver.resolve(id=tenant_id)).shard_id

        async def event_gate(plugin_id: str, tenant_id: str) -> bool | None:
            """A plugin's handlers run for the tenants that have it enabled; a disabled plugin
            has nothing to do (the event is settled for it), a switched-off one gets the
            event again once revived. Handlers of no plugin package (added in code) always run."""
            if plugin_id not in discovery.plugins:
                return True
            if registry.is_killed(plugin_id):
                return None
            try:
                await registry.gate(plugin_id, tenant_id)
            except PluginDisabled:
                return False
            return True

        events = EventBus(redis, queue_redis, settings.redis_namespace, tasks, metrics, store, shard_of,
                          control=control, gate=event_gate)
        for plugin_id, name, handler in event_handlers:
            events.on(plugin_id, name, handler)

        async def on_registry() -> None:
            auth.clear()
            await registry.invalidate()

        async def shard_ids() -> list[str]:
            return [s.shard_id for s in await directory.list_shards()]

        relay = Relay(store, shard_ids, events.redeliver, names=events.subscriptions.names)
        if background:
            try:  # the fleet's subscriptions known before the first event is delivered
                await events.subscriptions.refresh()
            except SHARD_ERRORS as exc:
                log.warning("event subscriptions not read (%s); events wait for their lease until they are",
                            exc.__class__.__name__)
            async def shard_states() -> dict[str, str]:
                return {s.shard_id: s.state for s in await directory.list_shards()}
            tasks.spawn(close_unserved_shards(tx, shard_states, settings), name="shard-sweeper")
            lag = ShardLatency()
            tasks.spawn(watch_loop_lag(lag), name="loop-lag")
            tasks.spawn(publish_shard_latency(redis, settings.redis_namespace, latency, lag), name="shard-latency")
            subscriber = Subscriber(sub_redis, settings.redis_namespace, on_registry)
            tasks.spawn(subscriber.run(), name="pubsub")
            try:
                await asyncio.wait_for(subscriber.ready.wait(), SUBSCRIBE_WAIT_S)
            except asyncio.TimeoutError:
                log.warning("Redis at %s did not answer within %.0f s; serving without it (events are delivered "
                            "from the outbox, changes reach other hosts by the cache TTLs, cron ticks are skipped)",
                            settings.redis_url, SUBSCRIBE_WAIT_S)
        cron = Cron(redis, settings.redis_namespace, tasks, metrics, registry.enabled_tenants)
        metrics.watch_pools(tx.pool_figures)
        rt = HostRuntime(settings=settings, control=control, shard_pools=pools, owner_pools=owner_pools,
                         directory=directory, resolver=resolver, redis=redis, registry=registry, auth=auth, rbac=RbacService(control),
                         tx=tx, events=events, relay=relay, cron=cron, tasks=tasks,
                         metrics=metrics, discovery=discovery)
        if cron_jobs:
            cron.start(cron_jobs)
        yield rt
