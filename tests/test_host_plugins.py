"""Plugins: mounting and api-major refusal, import boundary, events across hosts, cron, kill switch, role templates."""
from __future__ import annotations

import ast
import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from host.context import PLUGIN_HOST
from tests.conftest import FleetFactory
from tests.fleetkit import Fleet
from tests.hostkit import (
    ADMIN_KEY,
    auth,
    discovery_with,
    host_settings,
    plugin_package,
    running_host,
    tenant_with_key,
)

PLUGINS = Path(__file__).resolve().parent.parent / "plugins"

TEST_PLUGIN = '''
import asyncio
from plugins.api import PluginContext, json_response
SLOW_STARTED = asyncio.Event()

def setup(ctx: PluginContext) -> None:
    @ctx.router.get("/ctx")
    async def context(request):
        caller = ctx.caller(request)
        other = await ctx.resolve_tenant(code=request.query["other"])
        missing = await ctx.resolve_tenant(code="no-such-tenant-here")
        return json_response({
            "other": other.tenant_id if other else None, "missing": missing,
            "global": await ctx.config.get_global("greeting", "none"),
            "tenant": await ctx.config.get_tenant(caller.tenant.tenant_id, "colour", "none"),
        })

    @ctx.router.get("/slow")
    async def slow(request):
        SLOW_STARTED.set()
        await asyncio.sleep(0.5)
        return json_response({"done": True})

    @ctx.router.get("/boom")
    async def boom(request):
        raise RuntimeError("secret internals: password=hunter2")

    @ctx.router.get("/ok")
    async def ok(request):
        return json_response({"tenant": ctx.caller(request).tenant.code,
                              "version": ctx.caller(request).plugin_version})
'''


async def _until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.02)


async def test_plugins_mount_under_their_id_and_other_api_majors_are_refused_and_listed(
        fleet: Fleet, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good_id, good = plugin_package(tmp_path, TEST_PLUGIN)
    bad_id, bad = plugin_package(tmp_path, TEST_PLUGIN, api="2.x")
    async with running_host(host_settings(fleet), discovery_with(good, bad)) as host:
        assert any(bad_id in r.getMessage() and "refused" in r.getMessage() for r in caplog.records)
        listed = await host.admin("GET", "/admin/plugins")
        assert bad_id in [r["pluginId"] for r in listed["refused"]]
        assert good_id in [p["pluginId"] for p in listed["plugins"]]
        rec, key = await tenant_with_key(fleet, host, plugins=(good_id,), roles=())
        async with host.http.get(f"/api/plugins/{good_id}/ok", headers=auth(key, rec.code)) as r:
            assert r.status == 200 and (await r.json()) == {"tenant": rec.code, "version": "1.0.0"}
        async with host.http.get(f"/api/plugins/{bad_id}/ok", headers=auth(key, rec.code)) as r:
            body = await r.json()
            assert r.status == 404 and body["error"]["code"] == "PLUGIN_NOT_FOUND" and "refused" in body["error"]["message"]
        async with host.http.get(f"/api/plugins/{good_id}/boom", headers=auth(key, rec.code)) as r:
            text = await r.text()
            assert r.status == 500 and '"INTERNAL"' in text and "hunter2" not in text and "Traceback" not in text
        async with host.http.get(f"/api/plugins/{good_id}/ok", headers=auth(key, rec.code)) as r:
            assert r.status == 200  # still serving


def test_plugins_import_only_the_plugin_api_module() -> None:
    offenders = []
    for path in PLUGINS.rglob("*.py"):
        if path.name == "api.py" and path.parent == PLUGINS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for name in names:
                top = name.split(".")[0]
                if top in ("host", "router", "shard_migrations") or (top == "plugins" and name != "plugins.api"
                                                                     and not name.startswith(f"plugins.{path.relative_to(PLUGINS).parts[0]}")):
                    offenders.append(f"{path.relative_to(PLUGINS)}: {name}")
    assert offenders == []


EVENTS_PLUGIN = '''
from plugins.api import PluginContext
HEARD = []

def setup(ctx: PluginContext) -> None:
    async def broken(event):
        raise ValueError("handler bug")

    async def good(event):
        HEARD.append((id(ctx), event.id, event.payload["n"], event.tenant_id))

    ctx.events.on("ping", broken)
    ctx.events.on("ping", good)
'''


async def test_each_event_reaches_one_host_and_a_failing_handler_stops_nothing_and_gets_it_again(
        fleet: Fleet, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pid, pkg = plugin_package(tmp_path, EVENTS_PLUGIN)
    heard: list[Any] = pkg.module.HEARD
    async with running_host(host_settings(fleet), discovery_with(pkg)) as h1, \
            running_host(host_settings(fleet), discovery_with(pkg)) as h2:
        rec, _ = await tenant_with_key(fleet, h1, plugins=(pid,), roles=())
        ctx = h1.app[PLUGIN_HOST].contexts[pid]

        async def write(db: Any) -> str:
            return str(await ctx.events.emit("ping", {"n": 1}, db=db))  # returns once written
        event_id = await ctx.with_tenant_tx(rec.tenant_id, write)
        await _until(lambda: asyncio.sleep(0, len(heard) >= 1))
        # one host handled it (a work queue, not a broadcast), with the id it was written with
        assert [(i, n, t) for _, i, n, t in heard] == [(event_id, 1, rec.tenant_id)]
        failures = [r for r in caplog.records if r.getMessage() == "event handler failed"]
        assert len(failures) == 1 and getattr(failures[0], "pluginId") == pid
        # the failing handler's event is kept for a retry, with the reason
        row = await fleet.shard_pools.get(rec.shard_id)
        kept = await row.fetchrow("SELECT delivered_at, last_error FROM fleet.event_outbox WHERE event_id = $1::uuid",
                                  event_id)
        assert kept["delivered_at"] is None and "ValueError" in kept["last_error"]
        assert h2.url != h1.url


CRON_PLUGIN = '''
from plugins.api import PluginContext
RUNS = []

def setup(ctx: PluginContext) -> None:
    async def tick(run):
        RUNS.append((run.scheduled, run.tenant_id))
    ctx.cron.register("* * * * * *", tick, name="every_second")
'''


async def test_each_cron_tick_runs_on_exactly_one_of_two_hosts(fleet: Fleet, tmp_path: Path) -> None:
    pid, pkg = plugin_package(tmp_path, CRON_PLUGIN)
    runs: list[Any] = pkg.module.RUNS
    async with running_host(host_settings(fleet), discovery_with(pkg)), \
            running_host(host_settings(fleet), discovery_with(pkg)):
        await _until(lambda: asyncio.sleep(0, len(runs) >= 3), timeout=10)
    ticks = [s for s, _ in runs]
    assert len(ticks) == len(set(ticks)), ticks  # no tick twice
    assert all(t is None for _, t in runs)


async def test_kill_switch_from_env_and_db_flag_reaching_another_host_within_a_second(
        fresh_fleet: FleetFactory) -> None:
    f = await fresh_fleet()
    async with running_host(host_settings(f)) as h1, running_host(host_settings(f)) as h2:
        rec, key = await tenant_with_key(f, h1)
        async with h2.http.get("/api/plugins/inventory/items", headers=auth(key, rec.code)) as r:
            assert r.status == 200
        await h1.admin("POST", "/admin/plugins/inventory/kill")
        started = time.monotonic()

        async def h2_refuses() -> bool:
            async with h2.http.get("/api/plugins/inventory/items", headers=auth(key, rec.code)) as r:
                return r.status == 403 and (await r.json())["error"]["code"] == "PLUGIN_DISABLED"
        await _until(h2_refuses, timeout=1.0)
        assert time.monotonic() - started < 1.0
        await h1.admin("POST", "/admin/plugins/inventory/revive")
        await _until(lambda: _ok(h2, key, rec.code), timeout=1.0)
        await h1.admin("POST", "/admin/plugins/inventory/disable")  # globally

        async def h2_disabled_globally() -> bool:
            async with h2.http.get("/api/plugins/inventory/items", headers=auth(key, rec.code)) as r:
                return r.status == 403 and (await r.json())["error"]["reason"] == "disabled_globally"
        await _until(h2_disabled_globally, timeout=1.0)
        await h1.admin("POST", "/admin/plugins/inventory/enable")
    async with running_host(host_settings(f, killed_plugins="inventory")) as h3:
        async with h3.http.get("/api/plugins/inventory/items", headers=auth(key, rec.code)) as r:
            body = await r.json()
            assert r.status == 403 and body["error"]["reason"] == "killed"
        listed = await h3.admin("GET", "/admin/plugins")
        assert [p["killedBy"] for p in listed["plugins"] if p["pluginId"] == "inventory"] == ["env"]


async def test_a_revoked_key_is_refused_here_at_once_and_on_another_host_within_a_second(fleet: Fleet) -> None:
    async with running_host(host_settings(fleet)) as h1, running_host(host_settings(fleet)) as h2:
        rec, key = await tenant_with_key(fleet, h1)
        assert await _ok(h1, key, rec.code) and await _ok(h2, key, rec.code)  # both hosts cache it
        listed = await h1.admin("GET", f"/admin/principals?tenant={rec.code}")
        assert [p["name"] for p in listed["principals"]] == ["tester"] and key not in str(listed)
        pid = listed["principals"][0]["principalId"]
        revoked = await h1.admin("DELETE", f"/admin/principals/{pid}")
        started = time.monotonic()
        assert revoked == {"principalId": pid, "tenantId": rec.tenant_id, "name": "tester", "revoked": True}
        async with h1.http.get("/api/plugins/inventory/items", headers=auth(key, rec.code)) as r:
            assert r.status == 401 and (await r.json())["error"]["code"] == "UNAUTHORIZED"

        async def h2_refuses() -> bool:
            async with h2.http.get("/api/plugins/inventory/items", headers=auth(key, rec.code)) as r:
                return r.status == 401
        await _until(h2_refuses, timeout=1.0)
        assert time.monotonic() - started < 1.0
        assert (await h1.admin("GET", f"/admin/principals?tenant={rec.code}"))["principals"] == []
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        for path, status, code in ((f"/admin/principals/{pid}", 404, "NOT_FOUND"),
                                   ("/admin/principals/not-a-uuid", 400, "VALIDATION_FAILED")):
            async with h1.http.delete(path, headers=admin) as r:
                assert r.status == status and (await r.json())["error"]["code"] == code
        async with h1.http.get("/admin/principals?tenant=no-such-tenant", headers=admin) as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "TENANT_NOT_FOUND"


async def _ok(host: Any, key: str, tenant: str) -> bool:
    async with host.http.get("/api/plugins/inventory/items", headers=auth(key, tenant)) as r:
        return bool(r.status == 200)


async def test_role_templates_are_diffed_and_applied_only_when_asked(fleet: Fleet) -> None:
    async with running_host(host_settings(fleet)) as host:
        rec, key = await tenant_with_key(fleet, host, roles=())
        await host.admin("PUT", f"/admin/tenants/{rec.code}/roles/INVENTORY_MANAGER",
                         {"displayName": "Mgr", "permissions": ["inventory.view", "restock.custom_thing"]})
        await host.admin("POST", f"/admin/tenants/{rec.code}/plugins/inventory/enable")  # an upgrade/enable
        roles = await fleet.control.fetchval(
            "SELECT permissions FROM roles WHERE tenant_id = $1::uuid AND role_key = 'INVENTORY_MANAGER'", rec.tenant_id)
        assert sorted(roles) == ["inventory.view", "restock.custom_thing"]  # untouched
        diff = await host.admin("GET", f"/admin/tenants/{rec.code}/plugins/inventory/role-diff")
        mgr = next(d for d in diff if d["roleKey"] == "INVENTORY_MANAGER")
        assert mgr["add"] == ["inventory.manage", "inventory.reconcile"] and mgr["tenantOnly"] == ["restock.custom_thing"]
        applied = await host.admin(
            "POST", f"/admin/tenants/{rec.code}/plugins/inventory/role-templates/INVENTORY_MANAGER/apply")
        assert applied["permissions"] == ["inventory.manage", "inventory.reconcile", "inventory.view",
                                          "restock.custom_thing"]
        config = await host.admin("PUT", f"/admin/tenants/{rec.code}/plugins/inventory/config", {"threshold": 3})
        assert config == {"threshold": 3}
        assert await host.admin("GET", f"/admin/tenants/{rec.code}/plugins/inventory/config") == {"threshold": 3}
        async with host.http.put(f"/admin/tenants/{rec.code}/plugins/inventory/config", data=b"[1]",
                                 headers={"Authorization": f"Bearer {ADMIN_KEY}",
                                          "Content-Type": "application/json"}) as r:
            assert r.status == 400


async def test_restock_raises_a_request_when_inventory_reports_low_stock(fleet: Fleet) -> None:
    async with running_host(host_settings(fleet)) as host:
        rec, key = await tenant_with_key(fleet, host, plugins=("inventory", "restock"),
                                         roles=("INVENTORY_MANAGER", "RESTOCK_CLERK"))
        await host.admin("PUT", f"/admin/tenants/{rec.code}/plugins/restock/config", {"threshold": 3})
        async with host.http.post("/api/plugins/inventory/items", json={"sku": "LOW-1", "qty": 2},
                                  headers=auth(key, rec.code)) as r:
            assert r.status == 201
        async with host.http.post("/api/plugins/inventory/items", json={"sku": "OK-1", "qty": 9},
                                  headers=auth(key, rec.code)) as r:
            assert r.status == 201

        async def requested() -> bool:
            async with host.http.get("/api/plugins/restock/requests", headers=auth(key, rec.code)) as r:
                return [q["sku"] for q in (await r.json())["requests"]] == ["LOW-1"]
        await _until(requested)


SLOW_CRON_PLUGIN = '''
import asyncio, time
from plugins.api import PluginContext
RUNS = []

def setup(ctx: PluginContext) -> None:
    async def tick(run):
        RUNS.append((run.scheduled.timestamp(), time.time(), run.tenant_id))
        if len(RUNS) == 1:
            await asyncio.sleep(2.5)  # misses two ticks
    ctx.cron.register("* * * * * *", tick, name="slow", per_tenant=True)
'''


async def test_per_tenant_cron_jobs_get_their_tenant_and_missed_ticks_do_not_pile_up(
        fleet: Fleet, tmp_path: Path) -> None:
    pid, pkg = plugin_package(tmp_path, SLOW_CRON_PLUGIN)
    runs: list[Any] = pkg.module.RUNS
    async with running_host(host_settings(fleet), discovery_with(pkg)) as host:
        rec, _ = await tenant_with_key(fleet, host, plugins=(pid,), roles=())
        await _until(lambda: asyncio.sleep(0, len(runs) >= 3), timeout=8)
    # the plugin id is this test's own, so every run is for this test's tenant
    assert {t for _, _, t in runs} == {rec.tenant_id}
    _, first_started, _ = runs[0]
    slow_ended = first_started + 2.5
    # the ticks missed while the first run was busy are dropped, not replayed in a burst
    assert all(scheduled >= slow_ended - 1.0 for scheduled, _, _ in runs[1:]), runs
    assert len(runs) <= 4


async def test_context_resolves_tenants_and_reads_global_and_tenant_config(fleet: Fleet, tmp_path: Path) -> None:
    pid, pkg = plugin_package(tmp_path, TEST_PLUGIN)
    async with running_host(host_settings(fleet), discovery_with(pkg)) as host:
        rec, key = await tenant_with_key(fleet, host, plugins=(pid,), roles=())
        other, _ = await tenant_with_key(fleet, host, plugins=(), roles=())
        await fleet.control.execute("UPDATE sys_plugins SET config = '{\"greeting\": \"hi\"}' WHERE plugin_id = $1", pid)
        await host.admin("PUT", f"/admin/tenants/{rec.code}/plugins/{pid}/config", {"colour": "teal"})  # reloads
        async with host.http.get(f"/api/plugins/{pid}/ctx", params={"other": other.code},
                                 headers=auth(key, rec.code)) as r:
            assert await r.json() == {"other": other.tenant_id, "missing": None, "global": "hi", "tenant": "teal"}


async def test_shutdown_stops_accepting_and_lets_in_flight_requests_finish(fleet: Fleet, tmp_path: Path) -> None:
    import aiohttp

    from host.app import serving

    pid, pkg = plugin_package(tmp_path, TEST_PLUGIN)
    async with running_host(host_settings(fleet), discovery_with(pkg)) as setup_host:
        rec, key = await tenant_with_key(fleet, setup_host, plugins=(pid,), roles=())
    async with aiohttp.ClientSession() as http:
        async with serving(host_settings(fleet), host="127.0.0.1", port=0, discovery=discovery_with(pkg)) as (_, url):
            in_flight = asyncio.create_task(http.get(f"{url}/api/plugins/{pid}/slow", headers=auth(key, rec.code)))
            await asyncio.wait_for(pkg.module.SLOW_STARTED.wait(), 5)
        # the context has exited: the listener closed first, the slow request was drained
        resp = await in_flight
        assert resp.status == 200 and await resp.json() == {"done": True}
        resp.release()
        with pytest.raises(aiohttp.ClientConnectionError):
            async with http.get(f"{url}/healthz"):
                pass


async def test_a_role_change_on_one_host_reaches_another_hosts_cached_principal_within_a_second(
        fleet: Fleet) -> None:
    async with running_host(host_settings(fleet)) as h1, running_host(host_settings(fleet)) as h2:
        rec, key = await tenant_with_key(fleet, h1)
        assert await _ok(h2, key, rec.code)  # h2 now holds the principal in its header-keyed cache
        await h1.admin("PUT", f"/admin/tenants/{rec.code}/roles/INVENTORY_MANAGER",
                       {"displayName": "Mgr", "permissions": ["restock.custom_thing"]})
        started = time.monotonic()

        async def h2_forbids() -> bool:
            async with h2.http.get("/api/plugins/inventory/items", headers=auth(key, rec.code)) as r:
                return r.status == 403 and (await r.json())["error"]["permission"] == "inventory.view"
        await _until(h2_forbids, timeout=1.0)
        assert time.monotonic() - started < 1.0
