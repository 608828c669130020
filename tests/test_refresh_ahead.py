"""Refresh-ahead (host.refresh): a cached principal or registry row in use is re-read in the
background before its TTL ends, so no request waits for the control plane on expiry, and
what the TTL promises is kept (a change made in SQL, announced to nobody, still shows
within the TTL, an invalidation during a re-read still wins)."""
from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import asyncpg
import pytest
import pytest_asyncio

from host.keys import AUTH_CACHE_TTL_S, REGISTRY_CACHE_TTL_S
from host.rbac import Authenticator, hash_key
from host.refresh import FAILED_BACKOFF_S, MAX_IN_FLIGHT, RefreshAhead
from host.registry import Registry
from router.errors import PluginDisabled
from shard_migrations.packages import discover
from tests.fleetkit import Fleet
from tests.hostkit import Host, auth, host_settings, running_host, runtime, tenant_with_key


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def host(fleet: Fleet) -> AsyncIterator[Host]:
    async with running_host(host_settings(fleet)) as h:
        yield h


def _make_due(cache: dict, key: object) -> None:  # type: ignore[type-arg]
    """Age a cached entry into its refresh window (1 s of its TTL left), as time would."""
    value, _ = cache[key]
    cache[key] = (value, time.monotonic() + 1.0)


@asynccontextmanager
async def _registry(fleet: Fleet, host: Host, cls: type[Registry] = Registry,
                    control: Any = None) -> AsyncIterator[tuple[Any, Registry]]:
    """A tenant with inventory enabled and a registry of its own that has gated it once."""
    rec, _ = await tenant_with_key(fleet, host)
    registry = cls(control or fleet.control, fleet.settings, discover(), fleet.shard_pools)
    try:
        await registry.reload()
        assert (await registry.gate("inventory", rec.tenant_id)).enabled
        yield rec, registry
    finally:
        await registry.refresh.close()


async def test_a_due_principal_is_served_cached_and_reread_in_the_background(fleet: Fleet, host: Host) -> None:
    rec, key = await tenant_with_key(fleet, host, roles=("INVENTORY_VIEWER",))
    await fleet.control.execute("UPDATE roles SET permissions = '{inventory.view}' "
                                "WHERE tenant_id = $1::uuid AND role_key = 'INVENTORY_VIEWER'", rec.tenant_id)
    authn = Authenticator(fleet.control)
    try:
        assert (await authn.principal(key)).permissions == {"inventory.view"}
        await fleet.control.execute("UPDATE roles SET permissions = '{inventory.manage}' "
                                    "WHERE tenant_id = $1::uuid AND role_key = 'INVENTORY_VIEWER'", rec.tenant_id)
        assert (await authn.principal(key)).permissions == {"inventory.view"}  # fresh: cached, no re-read
        assert authn.refresh.started == 0
        _make_due(authn._cache, hash_key(key))
        assert (await authn.principal(key)).permissions == {"inventory.view"}  # due: still served cached
        assert authn.refresh.started == 1
        await authn.refresh.wait()
        assert (await authn.principal(key)).permissions == {"inventory.manage"}  # the re-read's row
        _, expires = authn._cache[hash_key(key)]
        assert expires - time.monotonic() > AUTH_CACHE_TTL_S - 2  # a whole TTL again
    finally:
        await authn.refresh.close()


async def test_a_key_revoked_in_sql_is_refused_after_the_background_reread(fleet: Fleet, host: Host) -> None:
    rec, key = await tenant_with_key(fleet, host)
    url, headers = "/api/plugins/inventory/items", auth(key, rec.code)
    async with host.http.get(url, headers=headers) as r:
        assert r.status == 200
    authn = runtime(host).auth
    _make_due(authn._by_header, headers["Authorization"])  # the request path's first look ...
    _make_due(authn._cache, hash_key(key))  # ... and the entry it copies, which age together
    await fleet.control.execute("DELETE FROM principals WHERE key_hash = $1", hash_key(key))  # nobody told
    async with host.http.get(url, headers=headers) as r:
        assert r.status == 200  # inside the TTL the cached principal serves, as before
    await authn.refresh.wait()
    async with host.http.get(url, headers=headers) as r:
        assert r.status == 401  # seen before the TTL ended, not on a request's path
    assert headers["Authorization"] not in authn._by_header


async def test_a_due_tenant_plugin_row_is_reread_and_a_disable_in_sql_then_gates(fleet: Fleet, host: Host) -> None:
    async with _registry(fleet, host) as (rec, registry):
        await fleet.control.execute("UPDATE sys_tenant_plugins SET enabled = false "
                                    "WHERE tenant_id = $1::uuid AND plugin_id = 'inventory'", rec.tenant_id)
        assert (await registry.gate("inventory", rec.tenant_id)).enabled and registry.refresh.started == 0
        _make_due(registry._tenant, (rec.tenant_id, "inventory"))
        assert (await registry.gate("inventory", rec.tenant_id)).enabled  # the gate's fast path: served cached
        assert registry.refresh.started == 1
        await registry.refresh.wait()
        with pytest.raises(PluginDisabled):
            await registry.gate("inventory", rec.tenant_id)


async def test_the_global_rows_are_reloaded_ahead_of_their_expiry(fleet: Fleet, host: Host) -> None:
    async with _registry(fleet, host) as (rec, registry):
        registry._loaded_at = time.monotonic() - REGISTRY_CACHE_TTL_S + 1.0  # 1 s left
        loaded_at = registry._loaded_at
        assert (await registry.gate("inventory", rec.tenant_id)).enabled
        await registry.refresh.wait()
        assert registry._loaded_at > loaded_at + REGISTRY_CACHE_TTL_S - 2


async def test_a_reread_in_flight_during_an_invalidation_is_not_kept(fleet: Fleet, host: Host) -> None:
    async with _registry(fleet, host) as (rec, registry):
        _make_due(registry._tenant, (rec.tenant_id, "inventory"))
        await registry.gate("inventory", rec.tenant_id)  # starts the re-read
        await asyncio.sleep(0)  # it is now waiting on PostgreSQL
        await registry.invalidate()  # a change announced meanwhile: the re-read may have seen the old row
        await registry.refresh.wait()
        assert (rec.tenant_id, "inventory") not in registry._tenant


async def test_a_failing_reread_leaves_the_entry_to_expire_and_raises_nowhere(fleet: Fleet, host: Host) -> None:
    pool = await asyncpg.create_pool(fleet.settings.control_dsn, min_size=1, max_size=1)
    async with _registry(fleet, host, control=pool) as (rec, registry):
        _make_due(registry._tenant, (rec.tenant_id, "inventory"))
        (_, expires) = registry._tenant[(rec.tenant_id, "inventory")]
        await pool.close()  # the control plane is away for the re-read
        assert (await registry.gate("inventory", rec.tenant_id)).enabled  # served cached, no error
        await registry.refresh.wait()
        assert registry.refresh.started == 1
        assert registry._tenant[(rec.tenant_id, "inventory")][1] == expires  # left to expire at its TTL


async def test_one_reread_per_key_and_at_most_max_in_flight() -> None:
    refresh = RefreshAhead("test")
    release = asyncio.Event()
    ran: list[int] = []

    async def reread(i: int) -> None:
        ran.append(i)
        await release.wait()

    for i in range(MAX_IN_FLIGHT + 5):
        refresh.start(i, lambda i=i: reread(i))  # type: ignore[misc]
        refresh.start(i, lambda i=i: reread(i))  # type: ignore[misc]  # the same key again: not twice
    await asyncio.sleep(0)
    assert sorted(ran) == list(range(MAX_IN_FLIGHT))
    release.set()
    await refresh.wait()
    refresh.start("after", lambda: reread(-1))
    await refresh.wait()
    assert ran[-1] == -1 and refresh.started == MAX_IN_FLIGHT + 1
    await refresh.close()
    refresh.start("closed", lambda: reread(-2))
    await asyncio.sleep(0)
    assert -2 not in ran


class _CountingReads(Registry):
    reads = 0

    async def _read_tenant(self, tenant_id: str, plugin_id: str):  # type: ignore[no-untyped-def]
        self.reads += 1
        return await super()._read_tenant(tenant_id, plugin_id)


async def test_a_tenants_plugin_rows_are_read_in_one_query(fleet: Fleet, host: Host) -> None:
    async with _registry(fleet, host, _CountingReads) as (rec, registry):  # inventory enabled, restock not
        assert await registry.tenant_plugin(rec.tenant_id, "restock") is None  # the manifest's second plugin
        assert isinstance(registry, _CountingReads) and registry.reads == 1


async def test_a_key_whose_reread_failed_is_not_reread_again_within_the_backoff() -> None:
    refresh = RefreshAhead("test")
    calls: list[str] = []

    async def failing() -> None:
        calls.append("x")
        raise ConnectionRefusedError("the control plane is away")

    async def fine() -> None:
        calls.append("ok")

    refresh.start("k", failing)
    await refresh.wait()
    refresh.start("k", fine)  # every request finding the entry due would ask again: not within the backoff
    refresh.start("other", fine)  # other keys are not held back
    await refresh.wait()
    assert calls == ["x", "ok"] and refresh.started == 2
    refresh._failed["k"] -= FAILED_BACKOFF_S  # as time would
    refresh.start("k", fine)
    await refresh.wait()
    assert calls == ["x", "ok", "ok"] and "k" not in refresh._failed
    await refresh.close()


async def test_the_hosts_caches_share_one_reread_budget(host: Host) -> None:
    rt = runtime(host)
    assert rt.auth.refresh is rt.registry.refresh  # at most MAX_IN_FLIGHT control connections between them
