"""Events survive a Redis outage: the outbox, delivery after commit, the relay, idempotent
handlers; key revocation and plugin disable with Redis down; /readyz asking Redis live.

Each test that stops Redis runs a Valkey of its own (the session's keeps serving the others).
"""
from __future__ import annotations

import asyncio
import time
import uuid
from datetime import datetime, timezone
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import asyncpg
import orjson
import pytest
import pytest_asyncio
from aiohttp import web

from host import outbox
from host.context import PLUGIN_HOST
from host.fleet.embedded import ValkeyProc, free_port
from host.keys import EVENTS_AFTER_COMMIT_MAX
from host.metrics import HostMetrics
from host.tx import TenantTx, keep_connection
from router.client import ResolveClient
from router.keys import APP_ROLE
from router.models import TenantRecord
from router.pools import ShardPools
from router.service import open_service
from router.settings import Settings
from tests.fleetkit import Fleet
from tests.hostkit import Host, auth, host_settings, running_host, tenant_with_key
from tests.migratekit import cli_env, run_cli


@pytest_asyncio.fixture
async def valkey(tmp_path: Path) -> AsyncIterator[ValkeyProc]:
    """A Valkey of this test's own, to stop and start."""
    v = ValkeyProc(root=tmp_path, port=free_port())
    await asyncio.to_thread(v.start)
    try:
        yield v
    finally:
        await asyncio.to_thread(v.stop)


def on_valkey(fleet: Fleet, valkey: ValkeyProc, **overrides: Any) -> Settings:
    return host_settings(fleet, redis_url=valkey.url, **overrides)


async def until(cond: Callable[[], Awaitable[bool]], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``cond`` until it holds; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while not await cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def restock_requests(host: Host, key: str, tenant: str) -> list[dict[str, Any]]:
    async with host.http.get("/api/plugins/restock/requests", headers=auth(key, tenant)) as r:
        assert r.status == 200
        requests: list[dict[str, Any]] = (await r.json())["requests"]
        return requests


async def restock_tenant(fleet: Fleet, host: Host) -> tuple[TenantRecord, str]:
    rec, key = await tenant_with_key(fleet, host, plugins=("inventory", "restock"),
                                     roles=("INVENTORY_MANAGER", "RESTOCK_CLERK"))
    await host.admin("PUT", f"/admin/tenants/{rec.code}/plugins/restock/config", {"threshold": 3})
    return rec, key


async def outbox_row(fleet: Fleet, rec: TenantRecord, event_id: str) -> Any:
    pool = await fleet.shard_pools.get(rec.shard_id)
    return await pool.fetchrow("SELECT * FROM fleet.event_outbox WHERE event_id = $1::uuid", event_id)


async def outbox_rows(fleet: Fleet, rec: TenantRecord) -> list[Any]:
    pool = await fleet.shard_pools.get(rec.shard_id)
    return list(await pool.fetch("SELECT * FROM fleet.event_outbox WHERE tenant_id = $1::uuid ORDER BY created_at",
                                 rec.tenant_id))


async def test_with_redis_stopped_an_item_create_answers_201_promptly_and_its_restock_request_still_appears(
        fleet: Fleet, valkey: ValkeyProc) -> None:
    async with running_host(on_valkey(fleet, valkey)) as host:
        rec, key = await restock_tenant(fleet, host)
        await asyncio.to_thread(valkey.stop)

        # promptly: well inside the ~4 s the request used to hang before its 500
        async with host.http.post("/api/plugins/inventory/items", json={"sku": "LOW-1", "qty": 2},
                                  headers=auth(key, rec.code), timeout=aiohttp.ClientTimeout(total=3)) as r:
            assert r.status == 201, await r.text()
            item = await r.json()
        async with host.http.post("/api/plugins/inventory/items", json={"sku": "LOW-1", "qty": 2},
                                  headers=auth(key, rec.code)) as r:
            assert r.status == 400  # the row was committed exactly once

        async def requested() -> bool:
            return [q["sku"] for q in await restock_requests(host, key, rec.code)] == ["LOW-1"]
        await until(requested, what="the restock request raised from the outbox while Redis is down")
        rows = await outbox_rows(fleet, rec)
        assert [(r["name"], r["payload"]) for r in rows] == [
            ("inventory.item_created", {"id": item["id"], "sku": "LOW-1", "qty": 2})]

        async def delivered() -> bool:
            return all(r["delivered_at"] is not None for r in await outbox_rows(fleet, rec))
        await until(delivered, what="the outbox row marked delivered")


async def test_a_rolled_back_transaction_leaves_no_event_and_bad_events_are_refused(fleet: Fleet) -> None:
    async with running_host(host_settings(fleet)) as host:
        rec, _ = await tenant_with_key(fleet, host, roles=())
        ctx = host.app[PLUGIN_HOST].contexts["inventory"]

        class Abort(Exception):
            pass

        async def emit_then_fail(db: Any) -> None:
            await ctx.events.emit("inventory.item_created", {"sku": "gone"}, db=db)
            raise Abort()
        with pytest.raises(Abort):
            await ctx.with_tenant_tx(rec.tenant_id, emit_then_fail)
        assert await outbox_rows(fleet, rec) == []

        for name, payload in (("Not A Name", {}), ("x.y", {"s": "nul\x00"}), ("x.y", [1])):
            async def bad(db: Any, name: str = name, payload: Any = payload) -> None:
                await ctx.events.emit(name, payload, db=db)
            with pytest.raises(Exception) as caught:
                await ctx.with_tenant_tx(rec.tenant_id, bad)
            assert getattr(caught.value, "code", None) == "VALIDATION_FAILED"
        outside: list[Any] = []

        async def keep(db: Any) -> None:
            outside.append(db)
        await ctx.with_tenant_tx(rec.tenant_id, keep)
        with pytest.raises(RuntimeError):  # emitting needs the live transaction's handle
            await ctx.events.emit("x.y", {}, db=outside[0])
        assert await outbox_rows(fleet, rec) == []


async def _in_tenant_tx(fleet: Fleet, rec: TenantRecord, fn: Callable[[Any], Awaitable[Any]]) -> Any:
    """``fn`` in a fenced transaction of ``rec`` as the request path runs it (its own
    TenantTx, no host)."""
    async with AsyncExitStack() as stack:
        pools = await stack.enter_async_context(
            ShardPools(fleet.settings, fleet.directory.dsn_of, role=APP_ROLE, reset=keep_connection))
        resolver = await stack.enter_async_context(ResolveClient(fleet.settings, fleet.directory.lookup))
        tx = await stack.enter_async_context(TenantTx(fleet.settings, resolver, pools, HostMetrics()))
        return await tx.run(rec.tenant_id, fn)


async def _write_as_a_host_that_died(fleet: Fleet, rec: TenantRecord, sku: str, qty: int) -> str:
    """What a host leaves behind when it dies after commit, before delivering: the item and
    its event committed together (as the request path's role, through fleet.emit_event),
    the writer's lease already over, no delivery ever attempted."""
    async def write(db: Any) -> str:
        row = await db.fetchrow("INSERT INTO items (sku, qty) VALUES ($1, $2) RETURNING id", sku, qty)
        body = outbox.encode_event("inventory.item_created", {"id": row["id"], "sku": sku, "qty": qty})
        return await outbox.write(db, rec.tenant_id, "inventory", "inventory.item_created", body, lease_s=0)
    return str(await _in_tenant_tx(fleet, rec, write))


async def test_an_event_no_host_delivered_is_delivered_later_and_a_redelivery_does_not_double_its_effect(
        fleet: Fleet) -> None:
    async with running_host(host_settings(fleet)) as setup:
        rec, key = await restock_tenant(fleet, setup)
    # no host runs now: the event waits in the outbox
    event_id = await _write_as_a_host_that_died(fleet, rec, "ORPHAN-1", 1)
    assert (await outbox_row(fleet, rec, event_id))["delivered_at"] is None

    async with running_host(host_settings(fleet)) as host:  # its relay finds the row
        async def requested() -> bool:
            return [q["sku"] for q in await restock_requests(host, key, rec.code)] == ["ORPHAN-1"]
        await until(requested, what="the orphaned event's restock request")

        async def delivered() -> bool:
            return (await outbox_row(fleet, rec, event_id))["delivered_at"] is not None
        await until(delivered, what="the orphaned event marked delivered")

        # The same event again (a host died after the handlers ran, before marking the row),
        # once the first request is no longer open: the handler recognises the id.
        async def order(db: Any) -> None:
            await db.execute("UPDATE restock_requests SET status = 'ordered'")
        await host.app[PLUGIN_HOST].contexts["restock"].with_tenant_tx(rec.tenant_id, order)
        pool = await fleet.shard_pools.get(rec.shard_id)
        before = (await outbox_row(fleet, rec, event_id))["attempts"]
        await pool.execute("UPDATE fleet.event_outbox SET delivered_at = NULL, next_attempt_at = now() "
                           "WHERE event_id = $1::uuid", event_id)

        async def redelivered() -> bool:
            row = await outbox_row(fleet, rec, event_id)
            return row["delivered_at"] is not None and row["attempts"] > before
        await until(redelivered, what="the redelivery")
        assert [(q["sku"], q["status"]) for q in await restock_requests(host, key, rec.code)] == [
            ("ORPHAN-1", "ordered")]


async def test_delivered_rows_are_cleaned_up_and_the_request_role_cannot_touch_the_outbox_table(
        fleet: Fleet) -> None:
    async with running_host(host_settings(fleet)) as setup:
        rec, _ = await restock_tenant(fleet, setup)
    event_id = await _write_as_a_host_that_died(fleet, rec, "OLD-1", 9)
    pool = await fleet.shard_pools.get(rec.shard_id)
    await pool.execute("UPDATE fleet.event_outbox SET delivered_at = now() - interval '2 hours' "
                       "WHERE event_id = $1::uuid", event_id)
    store = outbox.OutboxStore(fleet.shard_pools)
    assert await store.cleanup(rec.shard_id) >= 1
    assert await outbox_row(fleet, rec, event_id) is None
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(f"SET LOCAL ROLE {APP_ROLE}")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetch("SELECT * FROM fleet.event_outbox")
    # and the role a tenant's transaction actually runs as (the fence switches to it)
    for sql in ("SELECT * FROM fleet.event_outbox",
                "UPDATE fleet.event_outbox SET delivered_at = now()",
                "DELETE FROM fleet.event_outbox"):
        async def touch(db: Any, sql: str = sql) -> None:
            await db.execute(sql)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await _in_tenant_tx(fleet, rec, touch)


async def test_revoke_and_disable_succeed_with_redis_down_and_this_host_refuses_at_once(
        fleet: Fleet, valkey: ValkeyProc) -> None:
    async with running_host(on_valkey(fleet, valkey)) as host:
        rec, key = await tenant_with_key(fleet, host)
        other, other_key = await tenant_with_key(fleet, host)
        cli_rec, cli_key = await tenant_with_key(fleet, host)
        for k, c in ((key, rec.code), (other_key, other.code), (cli_key, cli_rec.code)):
            async with host.http.get("/api/plugins/inventory/items", headers=auth(k, c)) as r:
                assert r.status == 200  # cached on this host
        principal = (await host.admin("GET", f"/admin/principals?tenant={rec.code}"))["principals"][0]["principalId"]
        cli_principal = (await host.admin("GET", f"/admin/principals?tenant={cli_rec.code}"))["principals"][0][
            "principalId"]
        await asyncio.to_thread(valkey.stop)

        revoked = await host.admin("DELETE", f"/admin/principals/{principal}")
        assert revoked["revoked"] is True
        async with host.http.get("/api/plugins/inventory/items", headers=auth(key, rec.code)) as r:
            assert r.status == 401
        await host.admin("POST", f"/admin/tenants/{other.code}/plugins/inventory/disable")
        async with host.http.get("/api/plugins/inventory/items", headers=auth(other_key, other.code)) as r:
            assert r.status == 403 and (await r.json())["error"]["code"] == "PLUGIN_DISABLED"

        # the CLI, with the same Redis down: the database write is what counts
        env = cli_env(fleet, redis_url=valkey.url)
        rc, out, err = await run_cli(fleet, "--json", "keys", "revoke", cli_principal, env=env, timeout=60)
        assert rc == 0, err
        assert orjson.loads(out)["revoked"] is True
        rc, _, err = await run_cli(fleet, "--json", "plugins", "disable", "inventory", "--tenant", other.code,
                                   env=env, timeout=60)
        assert rc == 0, err
        assert await fleet.control.fetchval("SELECT count(*) FROM principals WHERE principal_id = $1::uuid",
                                            cli_principal) == 0


async def _json(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    # readiness must answer within its own bounds (1-2 s per check), never hang
    async with http.get(url, timeout=aiohttp.ClientTimeout(total=15)) as r:
        return r.status, await r.json()


async def test_readyz_of_host_and_router_ask_redis_now_and_report_it_down(
        fleet: Fleet, valkey: ValkeyProc) -> None:
    settings = on_valkey(fleet, valkey)
    async with running_host(settings) as host, AsyncExitStack() as stack:
        app = await open_service(settings, stack)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        router = f"http://127.0.0.1:{runner.addresses[0][1]}/readyz"

        status, body = await _json(host.http, "/readyz")
        assert status == 200 and body["status"] == "ready" and body["checks"]["redis"] == "ok"
        status, body = await _json(host.http, router)
        assert status == 200 and body["checks"]["redis"] == "ok"

        await asyncio.to_thread(valkey.stop)
        # asked at once, with nothing else having touched Redis since it stopped
        status, body = await _json(host.http, "/readyz")
        assert status == 200 and body["status"] == "degraded" and body["checks"]["redis"] != "ok", body
        assert body["checks"]["control"] == "ok"
        status, body = await _json(host.http, router)
        assert status == 200 and body["status"] == "ready" and body["checks"]["redis"].startswith("unavailable"), body
        # Not restarted here: closing the resolve client (router/client.py) right after its
        # listener resubscribed to a restarted Valkey sometimes hangs in redis-py's
        # get_message, a shutdown hazard of that client outside this test's subject.


async def test_a_handler_sees_the_payload_as_committed_json_also_when_this_host_runs_it_with_redis_down(
        fleet: Fleet, valkey: ValkeyProc) -> None:
    """The same event reaches handlers as JSON whichever way it travels: through Redis, from
    the relay, or run here at once with Redis down; never the emitter's own objects (a
    UUID, a datetime) nor what the emitter changed in its dict after emitting."""
    async with running_host(on_valkey(fleet, valkey)) as host:
        rec, _ = await tenant_with_key(fleet, host, roles=())
        plugin_host = host.app[PLUGIN_HOST]
        seen: list[dict[str, Any]] = []

        async def record(event: Any) -> None:
            seen.append(dict(event.payload))
        plugin_host.runtime.events.on("test", "review.payload_checked", record)
        await asyncio.to_thread(valkey.stop)

        ref = uuid.uuid4()
        at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
        payload: dict[str, Any] = {"ref": ref, "at": at, "n": 1}

        async def emit(db: Any) -> None:
            await plugin_host.contexts["inventory"].events.emit("review.payload_checked", payload, db=db)
            payload["n"] = 2  # after emit: not part of the event
        await plugin_host.contexts["inventory"].with_tenant_tx(rec.tenant_id, emit)

        async def handled() -> bool:
            return bool(seen)
        await until(handled, what="the handler run on this host with Redis down")
        assert seen == [{"ref": str(ref), "at": "2026-01-02T03:04:05+00:00", "n": 1}]


async def test_a_shard_whose_outbox_hangs_does_not_hold_up_the_relay_on_the_other_shards(fleet: Fleet) -> None:
    """A claim that waits (here a lock on one shard's outbox; a blackholed server alike)
    stalls that shard's sweeps only: an orphaned event on another shard is still delivered."""
    async with running_host(host_settings(fleet)) as host:
        rec, key = await restock_tenant(fleet, host)
        stuck_shard = next(s for s in fleet.shard_dsns if s != rec.shard_id)
        stuck = await asyncpg.connect(fleet.shard_dsns[stuck_shard])
        try:
            async with stuck.transaction():
                await stuck.execute("LOCK TABLE fleet.event_outbox IN ACCESS EXCLUSIVE MODE")

                async def relay_waits() -> bool:  # this host's relay is stuck in its claim there
                    return bool(await stuck.fetchval(
                        "SELECT count(*) FROM pg_locks WHERE NOT granted "
                        "AND relation = 'fleet.event_outbox'::regclass"))
                await until(relay_waits, what="the relay's claim waiting on the locked outbox")
                event_id = await _write_as_a_host_that_died(fleet, rec, "STUCK-ELSEWHERE", 1)

                async def delivered() -> bool:
                    return (await outbox_row(fleet, rec, event_id))["delivered_at"] is not None
                await until(delivered, what="the other shard's orphaned event delivered")
                assert [q["sku"] for q in await restock_requests(host, key, rec.code)] == ["STUCK-ELSEWHERE"]
        finally:
            await stuck.close()


async def test_with_redis_down_a_host_holds_a_bounded_number_of_committed_events_and_the_rest_wait_in_the_outbox(
        fleet: Fleet, valkey: ValkeyProc) -> None:
    """Requests can commit events faster than this host's handlers run them (Redis down, so
    they run here): past `EVENTS_AFTER_COMMIT_MAX` the events are left in the outbox for
    the relay rather than piling up in memory, and none is lost."""
    async with running_host(on_valkey(fleet, valkey)) as host:
        rec, _ = await tenant_with_key(fleet, host, roles=())
        plugin_host = host.app[PLUGIN_HOST]
        gate = asyncio.Event()
        handled: list[str] = []

        async def slow(event: Any) -> None:
            await gate.wait()
            handled.append(event.id)
        plugin_host.runtime.events.on("test", "review.slow", slow)
        await asyncio.to_thread(valkey.stop)
        ctx = plugin_host.contexts["inventory"]

        def after_commit_tasks() -> int:
            return sum(t.get_name() == "events:after-commit" for t in asyncio.all_tasks())

        async def emit(n: int) -> None:
            async def run(db: Any) -> None:
                for i in range(n):
                    await ctx.events.emit("review.slow", {"i": i}, db=db)
            await ctx.with_tenant_tx(rec.tenant_id, run)
        await emit(1)
        assert after_commit_tasks() == 1  # waiting in its handler
        await emit(EVENTS_AFTER_COMMIT_MAX)
        assert after_commit_tasks() == 1  # the second transaction's events wait in the outbox

        gate.set()
        pool = await fleet.shard_pools.get(rec.shard_id)

        async def first_delivered() -> bool:
            return len(handled) == 1
        await until(first_delivered, what="the held event delivered")
        # the writer's lease over (as if 30 s passed): the relay delivers the rest, here
        await pool.execute("UPDATE fleet.event_outbox SET next_attempt_at = now() "
                           "WHERE tenant_id = $1::uuid AND delivered_at IS NULL", rec.tenant_id)

        async def all_delivered() -> bool:
            return not await pool.fetchval("SELECT count(*) FROM fleet.event_outbox "
                                           "WHERE tenant_id = $1::uuid AND delivered_at IS NULL", rec.tenant_id)
        await until(all_delivered, timeout=30, what="every event delivered by the relay")
        assert len(set(handled)) == EVENTS_AFTER_COMMIT_MAX + 1


async def test_a_tenant_transaction_cannot_write_events_in_another_tenants_name(fleet: Fleet) -> None:
    """fleet.emit_event is callable by every request-path role (SECURITY DEFINER): it takes
    events for the calling transaction's own tenant only, not for another tenant on the
    shard (whose handlers would then act in that tenant's schema)."""
    async with running_host(host_settings(fleet)) as host:
        rec, _ = await tenant_with_key(fleet, host, roles=())
        other, _ = await tenant_with_key(fleet, host, roles=())
        while other.shard_id != rec.shard_id:
            other, _ = await tenant_with_key(fleet, host, roles=())
        ctx = host.app[PLUGIN_HOST].contexts["inventory"]

        async def forge(db: Any) -> None:
            await db.fetchval("SELECT fleet.emit_event($1::uuid, 'restock', 'inventory.item_created', "
                              "'{\"sku\": \"X\", \"qty\": 1}'::jsonb, 0)", other.tenant_id)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await ctx.with_tenant_tx(rec.tenant_id, forge)
        assert await outbox_rows(fleet, other) == []

        async def own(db: Any) -> str:
            return str(await db.fetchval("SELECT fleet.emit_event($1::uuid, 'inventory', 'review.own', "
                                         "'{}'::jsonb, 30)", rec.tenant_id))
        assert await outbox_row(fleet, rec, await ctx.with_tenant_tx(rec.tenant_id, own)) is not None
