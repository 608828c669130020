"""Event delivery while hosts differ (a rolling deploy) and under a queue backlog.

Each plugin that subscribes to an event somewhere in the fleet handles it at least once
(host/subscriptions.py, host/events.py); a host without the handler never settles it for
the one that has it; an event nobody subscribes to any more settles; a queue backlog
longer than the lease does not make relays push its events again and again.
"""
from __future__ import annotations

from router.tables import SCHEMA_VERSION

import asyncio
import collections
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

import asyncpg
import orjson
import pytest_asyncio
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from host.context import PLUGIN_HOST
from host.events import EventBus, TaskOwner
from host.fleet.embedded import ValkeyProc
from host.keys import events_queue_key, subscription_queue_key
from host.metrics import HostMetrics
from host.outbox import OutboxStore, Relay
from host.runtime import HostRuntime
from router import schema
from router.models import TenantRecord
from tests.fleetkit import Fleet, Servers, create_database, drop_database
from tests.hostkit import Host, code, discovery_with, host_settings, plugin_package, running_host, tenant_with_key
from tests.test_host_outbox import on_valkey, until, valkey  # noqa: F401  (valkey: a fixture)

# A plugin only some hosts have (a new plugin, or a new version, rolling out). Hosts
# that stopped keep their subscriptions until the TTL: each test has event names of its own.
NEW_PLUGIN = '''
from plugins.api import PluginContext
HEARD = []
NAME = "deploy.{name}"

def setup(ctx: PluginContext) -> None:
    async def on_ping(event):
        HEARD.append(event.id)
    ctx.events.on(NAME, on_ping)
'''


def new_plugin(tmp_path: Path, name: str) -> tuple[str, Any]:
    return plugin_package(tmp_path, NEW_PLUGIN.replace("{name}", name))


def event_name() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


def pushed(metrics: HostMetrics) -> float:
    return metrics.registry.get_sample_value("tenantfleet_events_pushed_total") or 0.0


def not_repushed(metrics: HostMetrics) -> float:
    return metrics.registry.get_sample_value("tenantfleet_events_not_repushed_total") or 0.0


def runtime(host: Host) -> HostRuntime:
    return host.app[PLUGIN_HOST].runtime


async def emit(host: Host, rec: TenantRecord, name: str, n: int) -> list[str]:
    """``n`` events written by ``host`` (as inventory, in one tenant transaction); their ids."""
    ctx = host.app[PLUGIN_HOST].contexts["inventory"]

    async def run(db: Any) -> list[str]:
        return [await ctx.events.emit(name, {"i": i}, db=db) for i in range(n)]
    ids: list[str] = await ctx.with_tenant_tx(rec.tenant_id, run)
    return ids


async def rows(fleet: Fleet, rec: TenantRecord, ids: list[str]) -> list[Any]:
    pool = await fleet.shard_pools.get(rec.shard_id)
    return list(await pool.fetch("SELECT event_id::text, delivered_at, handled_by, attempts FROM fleet.event_outbox "
                                 "WHERE event_id = ANY ($1::uuid[])", [uuid.UUID(i) for i in ids]))


async def enable(host: Host, plugin_id: str, rec: TenantRecord) -> None:
    await host.admin("POST", f"/admin/plugins/{plugin_id}/enable")
    await host.admin("POST", f"/admin/tenants/{rec.tenant_id}/plugins/{plugin_id}/enable")


async def knows(host: Host, plugin_id: str, name: str, present: bool = True) -> None:
    """Wait until ``host`` reads ``plugin_id``'s subscription to ``name`` as live (or gone)."""
    subs = runtime(host).events.subscriptions

    async def seen() -> bool:
        await subs.refresh()
        live = subs.live(name)
        return live is not None and (plugin_id in live) == present
    await until(seen, what=f"{plugin_id}'s subscription to {name} {'seen' if present else 'gone'}")


async def test_during_a_rolling_deploy_the_host_with_the_handler_runs_every_event_once_and_the_other_never_settles_it(
        fleet: Fleet, tmp_path: Path) -> None:
    name = event_name()
    pid, pkg = new_plugin(tmp_path, name)
    heard: list[str] = pkg.module.HEARD
    async with running_host(host_settings(fleet), discovery_with(pkg)) as new, \
            running_host(host_settings(fleet)) as old:
        assert pid not in old.app[PLUGIN_HOST].contexts
        rec, _ = await tenant_with_key(fleet, new, plugins=("inventory", pid), roles=())
        await knows(old, pid, pkg.module.NAME)
        ids = [*await emit(old, rec, pkg.module.NAME, 10), *await emit(new, rec, pkg.module.NAME, 10)]

        async def delivered() -> bool:
            return all(r["delivered_at"] is not None for r in await rows(fleet, rec, ids))
        await until(delivered, timeout=30, what="every event delivered")
        # the handler ran once for each event, on the host that has it; each row was settled by it
        assert sorted(heard) == sorted(ids)
        assert all(r["handled_by"] == [pid] for r in await rows(fleet, rec, ids))
        # one message each, on the queue of the subscription (the old host popped none)
        assert pushed(runtime(old).metrics) + pushed(runtime(new).metrics) == len(ids)


async def test_with_redis_down_the_host_without_the_handler_hands_its_events_to_the_one_with_it(
        fleet: Fleet, tmp_path: Path, valkey: ValkeyProc) -> None:  # noqa: F811
    pid, pkg = new_plugin(tmp_path, event_name())
    heard: list[str] = pkg.module.HEARD
    settings = on_valkey(fleet, valkey)
    async with running_host(settings, discovery_with(pkg)) as new, running_host(settings) as old:
        rec, _ = await tenant_with_key(fleet, new, plugins=("inventory", pid), roles=())
        await knows(old, pid, pkg.module.NAME)
        await asyncio.to_thread(valkey.stop)
        ids = await emit(old, rec, pkg.module.NAME, 5)

        async def delivered() -> bool:
            return all(r["delivered_at"] is not None for r in await rows(fleet, rec, ids))
        # handed off at once (due again in a second), not left for the writer's 30 s lease
        await until(delivered, timeout=20, what="every event delivered from the outbox with Redis down")
        assert sorted(heard) == sorted(ids)
        assert all(r["handled_by"] == [pid] for r in await rows(fleet, rec, ids))


async def test_two_plugins_on_different_hosts_each_handle_an_event_once_and_only_both_settle_it(
        fleet: Fleet, tmp_path: Path) -> None:
    name = event_name()
    pid_a, pkg_a = new_plugin(tmp_path, name)
    pid_b, pkg_b = new_plugin(tmp_path, name)
    full = pkg_a.module.NAME
    async with running_host(host_settings(fleet), discovery_with(pkg_a)) as host_a, \
            running_host(host_settings(fleet), discovery_with(pkg_b)) as host_b:
        rec, _ = await tenant_with_key(fleet, host_a, plugins=("inventory", pid_a), roles=())
        await enable(host_b, pid_b, rec)
        await knows(host_a, pid_b, full)
        await knows(host_b, pid_a, full)
        ids = [*await emit(host_a, rec, full, 5), *await emit(host_b, rec, full, 5)]

        async def delivered() -> bool:
            return all(r["delivered_at"] is not None for r in await rows(fleet, rec, ids))
        await until(delivered, timeout=30, what="every event delivered to both plugins")
        assert sorted(pkg_a.module.HEARD) == sorted(ids) and sorted(pkg_b.module.HEARD) == sorted(ids)
        assert all(r["handled_by"] == sorted([pid_a, pid_b]) for r in await rows(fleet, rec, ids))


async def _write_orphans(fleet: Fleet, rec: TenantRecord, name: str, n: int) -> list[str]:
    """What hosts that died after commit leave: ``n`` undelivered rows, their lease over."""
    pool = await fleet.shard_pools.get(rec.shard_id)
    return [str(await pool.fetchval(
        "INSERT INTO fleet.event_outbox (event_id, tenant_id, source, name, payload, next_attempt_at) "
        "VALUES (gen_random_uuid(), $1::uuid, 'test', $2, $3::text::jsonb, now()) RETURNING event_id",
        rec.tenant_id, name, orjson.dumps({"i": i}).decode())) for i in range(n)]


async def test_events_of_a_subscription_that_is_gone_fleet_wide_settle_and_are_kept_while_it_lives(
        fleet: Fleet) -> None:
    async with running_host(host_settings(fleet)) as host:
        rec, _ = await tenant_with_key(fleet, host, roles=())
        rt = runtime(host)
        # another host that has the handler, alive (its heartbeat fresh) but not popping now
        other = uuid.uuid4().hex
        await fleet.control.execute("INSERT INTO event_subscriptions (host_id, plugin_id, event_name) "
                                    "VALUES ($1, 'elsewhere', 'deploy.gone')", other)
        await knows(host, "elsewhere", "deploy.gone")
        ids = await _write_orphans(fleet, rec, "deploy.gone", 3)
        ids += await emit(host, rec, "deploy.gone", 2)
        sweeps = rt.relay.sweeps
        await until(lambda: asyncio.sleep(0, rt.relay.sweeps >= sweeps + 3), what="three relay sweeps")
        # this host has no handler: it neither claims nor settles them
        assert all(r["delivered_at"] is None and r["handled_by"] == [] for r in await rows(fleet, rec, ids))
        assert max(r["attempts"] for r in await rows(fleet, rec, ids)) == 1

        # that host stopped heartbeating longer ago than the TTL (it stopped and nothing replaced it)
        await fleet.control.execute("UPDATE event_subscriptions SET seen_at = now() - interval '1 hour' "
                                    "WHERE host_id = $1", other)
        await knows(host, "elsewhere", "deploy.gone", present=False)
        pool = await fleet.shard_pools.get(rec.shard_id)
        await pool.execute("UPDATE fleet.event_outbox SET next_attempt_at = now() WHERE event_id = ANY ($1::uuid[])",
                           [uuid.UUID(i) for i in ids])  # the writer's lease over, as 30 s later

        async def settled() -> bool:
            return all(r["delivered_at"] is not None for r in await rows(fleet, rec, ids))
        await until(settled, what="the events of a subscription gone fleet-wide settled")
        assert all(r["handled_by"] == [] and r["attempts"] <= 2 for r in await rows(fleet, rec, ids))
        # and new ones settle at once, without waiting for a lease
        fresh = await emit(host, rec, "deploy.gone", 2)

        async def fresh_settled() -> bool:
            return all(r["delivered_at"] is not None and r["attempts"] == 1 for r in await rows(fleet, rec, fresh))
        await until(fresh_settled, what="new events nobody subscribes to settled by their writer")
        r = fleet.redis()
        try:  # the messages pushed for the subscription while it lived: nobody pops them
            await r.delete(subscription_queue_key(fleet.settings.redis_namespace, "elsewhere", "deploy.gone"))
        finally:
            await r.aclose()


@pytest_asyncio.fixture
async def queue_redis(fleet: Fleet) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis(host=fleet.servers.redis_host, port=fleet.servers.redis_port, db=fleet.servers.redis_db,
                       socket_timeout=2.0, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    try:
        yield r
    finally:
        await r.aclose()


async def test_a_queue_backlog_longer_than_the_lease_does_not_make_relays_push_its_events_again(
        fleet: Fleet, queue_redis: aioredis.Redis) -> None:
    """Leases of one second (a parameter, not 30 s of waiting): while the events wait in
    the queue, lease after lease runs out and the relays claim them again, but push none
    of them a second time; once consumers pop them, each is handled (once here)."""
    rec = await fleet.directory.create_tenant(code(), [])
    name = f"backlog.t{uuid.uuid4().hex[:8]}"
    namespace = f"backlog{uuid.uuid4().hex[:8]}"  # queues of its own
    lease = 1.0
    handled: collections.Counter[str] = collections.Counter()

    async def handler(event: Any) -> None:
        handled[event.id] += 1

    tasks = TaskOwner()
    store = OutboxStore(fleet.shard_pools)

    async def shard_of(tenant_id: str) -> str:
        return rec.shard_id
    buses = [EventBus(queue_redis, queue_redis, namespace, tasks, HostMetrics(), store, shard_of, lease_s=lease)
             for _ in range(2)]  # two hosts: two relays claiming
    for bus in buses:
        bus.on("bk", name, handler)

    async def shards() -> list[str]:
        return [rec.shard_id]
    relays = [Relay(store, shards, bus.redeliver, sweep_s=0.05, lease_s=lease, names=lambda: ([name], None))
              for bus in buses]
    key = subscription_queue_key(namespace, "bk", name)
    try:
        ids = await _write_orphans(fleet, rec, name, 40)
        for relay in relays:
            tasks.spawn(relay.run(), name="relay")

        async def leases_came_round() -> bool:  # claimed, pushed, then claimed twice more
            return min(r["attempts"] for r in await rows(fleet, rec, ids)) >= 4
        await until(leases_came_round, timeout=30, what="leases running out under the backlog")
        pool = await fleet.shard_pools.get(rec.shard_id)

        async def held_longer() -> bool:  # as long as the queue's oldest waited, not one lease more
            return bool(await pool.fetchval(
                "SELECT count(*) FROM fleet.event_outbox WHERE event_id = ANY ($1::uuid[]) "
                "AND next_attempt_at > now() + make_interval(secs => $2)", [uuid.UUID(i) for i in ids], 1.5 * lease))
        await until(held_longer, timeout=30, what="rows still queued held for longer than a lease")
        queued = collections.Counter(orjson.loads(m)["id"] for m in await queue_redis.lrange(key, 0, -1))
        assert sorted(queued) == sorted(ids) and set(queued.values()) == {1}, queued
        assert sum(not_repushed(bus.metrics) for bus in buses) > 0

        for bus in buses:  # consumers now: the backlog drains
            tasks.spawn(bus.consume(), name="events:queue")

        async def all_delivered() -> bool:
            return all(r["delivered_at"] is not None for r in await rows(fleet, rec, ids))
        await until(all_delivered, timeout=30, what="the backlog handled")
        assert set(handled) == set(ids)
        assert max(handled.values()) <= 2  # at least once, and never the backlog's own repeats
        assert sum(pushed(bus.metrics) for bus in buses) <= 2 * len(ids)
    finally:
        await tasks.close()
        await queue_redis.delete(key)


async def test_a_shard_made_by_the_previous_version_gets_the_handled_by_column_and_a_control_plane_the_table(
        servers: Servers) -> None:
    admin_dsn = next(iter(servers.shard_admin_dsns.values()))
    name = f"tf_{uuid.uuid4().hex[:12]}_v3"
    dsn = await create_database(admin_dsn, name)
    try:
        conn = await asyncpg.connect(dsn)
        try:
            await schema.ensure_shard(conn)
            # the outbox as version 3 made it, with an undelivered row
            await conn.execute("ALTER TABLE fleet.event_outbox DROP COLUMN handled_by")
            await conn.execute("INSERT INTO fleet.event_outbox (event_id, tenant_id, source, name, payload) "
                               "VALUES (gen_random_uuid(), gen_random_uuid(), 'inventory', 'x.y', '{}')")
            await conn.execute("DROP TABLE IF EXISTS event_subscriptions")
            await schema.ensure_shard(conn)
            await schema.ensure_control(conn)
            assert await conn.fetchval("SELECT handled_by FROM fleet.event_outbox") == []
            assert await conn.fetchval("SELECT count(*) FROM event_subscriptions") == 0
            assert await conn.fetchval("SELECT version FROM tenantfleet_schema WHERE component = 'control'") == SCHEMA_VERSION
        finally:
            await conn.close()
    finally:
        await drop_database(admin_dsn, name)


FLAKY_PLUGIN = '''
from plugins.api import PluginContext
HEARD = []
NAME = "deploy.{name}"

def setup(ctx: PluginContext) -> None:
    async def on_ping(event):
        HEARD.append(event.id)
        if HEARD.count(event.id) == 1:
            raise RuntimeError("first time fails")
    ctx.events.on(NAME, on_ping)
'''


async def test_a_failing_plugin_gets_the_event_again_alone_and_the_one_that_handled_it_does_not(
        fleet: Fleet, tmp_path: Path) -> None:
    name = event_name()
    flaky_id, flaky = plugin_package(tmp_path, FLAKY_PLUGIN.replace("{name}", name))
    steady_id, steady = new_plugin(tmp_path, name)
    async with running_host(host_settings(fleet), discovery_with(flaky, steady)) as host:
        rec, _ = await tenant_with_key(fleet, host, plugins=("inventory", flaky_id, steady_id), roles=())
        ids = await emit(host, rec, flaky.module.NAME, 3)

        async def delivered() -> bool:
            return all(r["delivered_at"] is not None for r in await rows(fleet, rec, ids))
        await until(delivered, timeout=30, what="every event delivered after the retry")
        assert sorted(flaky.module.HEARD) == sorted(ids * 2)
        assert sorted(steady.module.HEARD) == sorted(ids)  # not run again for the other's failure
        assert all(r["handled_by"] == sorted([flaky_id, steady_id]) for r in await rows(fleet, rec, ids))


async def test_a_message_an_earlier_host_pushed_on_the_shared_list_is_handled_by_every_plugin_here(
        fleet: Fleet, tmp_path: Path) -> None:
    pid, pkg = new_plugin(tmp_path, event_name())
    async with running_host(host_settings(fleet), discovery_with(pkg)) as host:
        rec, _ = await tenant_with_key(fleet, host, plugins=("inventory", pid), roles=())
        [event_id] = await _write_orphans(fleet, rec, pkg.module.NAME, 1)
        pool = await fleet.shard_pools.get(rec.shard_id)
        await pool.execute("UPDATE fleet.event_outbox SET next_attempt_at = now() + interval '1 hour' "
                           "WHERE event_id = $1::uuid", event_id)  # leased: only the message delivers it
        # the message as tenantfleet before subscriptions wrote it (no plugin, no queuedAt)
        legacy = orjson.dumps({"id": event_id, "shard": rec.shard_id, "tenant": rec.tenant_id, "source": "test",
                               "name": pkg.module.NAME, "payload": {"i": 0}, "attempt": 1})
        r = fleet.redis()
        try:
            await r.lpush(events_queue_key(fleet.settings.redis_namespace), legacy)
        finally:
            await r.aclose()

        async def delivered() -> bool:
            return all(r["delivered_at"] is not None for r in await rows(fleet, rec, [event_id]))
        await until(delivered, what="the earlier host's message handled")
        assert pkg.module.HEARD == [event_id]
        assert [r["handled_by"] for r in await rows(fleet, rec, [event_id])] == [[pid]]


async def test_a_plugin_disabled_for_the_tenant_settles_its_events_unhandled_and_a_switched_off_one_waits(
        fleet: Fleet, tmp_path: Path) -> None:
    pid, pkg = new_plugin(tmp_path, event_name())
    heard: list[str] = pkg.module.HEARD
    async with running_host(host_settings(fleet), discovery_with(pkg)) as host:
        rec, _ = await tenant_with_key(fleet, host, plugins=("inventory", pid), roles=())
        other, _ = await tenant_with_key(fleet, host, roles=())  # the plugin is not enabled there
        skipped = await emit(host, other, pkg.module.NAME, 2)

        async def settled() -> bool:
            return all(r["delivered_at"] is not None for r in await rows(fleet, other, skipped))
        await until(settled, what="the events of a tenant without the plugin settled")
        assert heard == []  # nothing to do there: not called, not retried
        assert all(r["handled_by"] == [pid] and r["attempts"] == 1 for r in await rows(fleet, other, skipped))

        await host.admin("POST", f"/admin/plugins/{pid}/kill")
        waiting = await emit(host, rec, pkg.module.NAME, 2)
        pool = await fleet.shard_pools.get(rec.shard_id)

        async def refused() -> bool:
            return all(r["last_error"] and "not now" in r["last_error"] for r in await pool.fetch(
                "SELECT last_error FROM fleet.event_outbox WHERE event_id = ANY ($1::uuid[])",
                [uuid.UUID(i) for i in waiting]))
        await until(refused, what="the switched-off plugin's events kept for later")
        assert heard == [] and all(r["delivered_at"] is None for r in await rows(fleet, rec, waiting))

        await host.admin("POST", f"/admin/plugins/{pid}/revive")
        await pool.execute("UPDATE fleet.event_outbox SET next_attempt_at = now() WHERE event_id = ANY ($1::uuid[])",
                           [uuid.UUID(i) for i in waiting])  # their backoff over

        async def handled() -> bool:
            return all(r["delivered_at"] is not None for r in await rows(fleet, rec, waiting))
        await until(handled, what="the revived plugin's events handled")
        assert sorted(heard) == sorted(waiting)
