"""The operator console (/console) in a real headless browser (Debian's Chromium through
Playwright, tests/browserkit.py) against a real host on a real fleet: sign-in, toggles,
role templates, an upgrade watched live, CSRF, expiry, escaping, config validation, keys.
The run writes a screenshot of each page to docs/screenshots/ (the README shows them)."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import asyncpg
import pytest_asyncio
import semver
from playwright.async_api import Browser, BrowserContext, Page, expect

from router.models import TenantRecord
from shard_migrations.keys import advisory_key
from tests.browserkit import SCREENSHOTS, chromium
from tests.fleetkit import Fleet, Servers, open_fleet
from tests.hostkit import (
    ADMIN_KEY, Host, auth, discovery_with, host_settings, plugin_package, running_host, runtime, tenant_with_key,
)


@dataclass
class Console:
    fleet: Fleet
    host: Host
    browser: Browser


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def console(servers: Servers) -> AsyncIterator[Console]:
    """One fleet of its own (plugin versions are fleet-wide state), one host, one browser."""
    async with AsyncExitStack() as stack:
        fleet = await open_fleet(servers, stack, shards=2)
        host = await stack.enter_async_context(running_host(host_settings(fleet)))
        browser = await stack.enter_async_context(chromium())
        yield Console(fleet, host, browser)


async def _tenant(c: Console, *, plugins: tuple[str, ...] = ("inventory",), shard_id: str | None = None) -> TenantRecord:
    code = "c-" + uuid.uuid4().hex[:10]
    rec = await c.fleet.directory.create_tenant(code, [f"{code}.example.com"], shard_id=shard_id)
    for pid in plugins:
        await c.host.admin("POST", f"/admin/plugins/{pid}/enable")
        await c.host.admin("POST", f"/admin/tenants/{rec.tenant_id}/plugins/{pid}/enable")
    return rec


async def _signed_in(c: Console, operator: str = "ops") -> tuple[BrowserContext, Page]:
    ctx = await c.browser.new_context(base_url=c.host.url, viewport={"width": 1280, "height": 800})
    page = await ctx.new_page()
    await page.goto("/console/fleet")
    assert page.url.endswith("/console/login?next=%2Fconsole%2Ffleet"), page.url  # no session: sign in first
    await page.fill("input[name=operator]", operator)
    await page.fill("input[name=key]", ADMIN_KEY)
    async with page.expect_navigation():
        await page.click("button[type=submit]")
    assert page.url.endswith("/console/fleet"), page.url
    return ctx, page


async def _submit(page: Page, selector: str) -> Any:
    async with page.expect_navigation() as nav:
        await page.click(selector)
    return await nav.value


async def _shot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / f"console-{name}.png"), full_page=True)


async def _enabled_tenants(c: Console, plugin: str) -> int:
    listed = await c.host.admin("GET", "/admin/plugins")
    return int(next(p for p in listed["plugins"] if p["pluginId"] == plugin)["enabledTenants"])


async def test_sign_in_toggle_a_plugin_for_a_tenant_and_the_admin_api_reports_it(console: Console) -> None:
    rec = await _tenant(console, plugins=())
    await console.host.admin("POST", "/admin/plugins/restock/enable")
    served, key = await tenant_with_key(console.fleet, console.host)
    for _ in range(5):  # plugin requests this host served on the tenant's shard: its p95 on the Fleet page
        async with console.host.http.get("/api/plugins/inventory/items", headers=auth(key, served.code)) as r:
            assert r.status == 200
    ctx, page = await _signed_in(console)
    try:
        assert await page.locator("#shards tbody tr").count() == 2
        assert "ready" in await page.inner_text("#shards")
        row = await page.inner_text(f"#shard-{served.shard_id}")
        assert " ms (5 requests)" in row, row
        await _shot(page, "fleet")
        await page.goto(f"/console/tenants?q={rec.code[:6]}")
        assert rec.code in await page.inner_text("#tenants")
        await page.goto(f"/console/tenants?q={rec.code}.example")  # by domain
        assert await page.locator("#tenants tbody tr").count() == 1
        await _shot(page, "tenants")
        await page.click(f"#tenants a:text-is('{rec.code}')")
        await page.wait_for_url(f"**/console/tenants/{rec.code}")
        before = await _enabled_tenants(console, "restock")
        assert await page.inner_text("#plugin-restock .enabled") == "no"

        await _submit(page, "#plugin-restock button.toggle")

        assert await page.inner_text("#plugin-restock .enabled") == "yes"
        assert await _enabled_tenants(console, "restock") == before + 1
        assert await console.host.admin("GET", f"/admin/tenants/{rec.code}/plugins/restock/config") == {}
        await _shot(page, "tenant")
        await _submit(page, "#plugin-restock button.toggle")
        assert await _enabled_tenants(console, "restock") == before
        await page.goto("/console/audit")
        audit = await page.inner_text("#audit")
        assert "tenant.plugin.enable" in audit and "tenant.plugin.disable" in audit and "ops (session" in audit
        await _shot(page, "audit")
    finally:
        await ctx.close()


async def test_apply_one_role_from_the_diff_and_only_that_role_changes(console: Console) -> None:
    rec = await _tenant(console)
    ctx, page = await _signed_in(console)
    try:
        await page.goto(f"/console/roles?tenant={rec.code}")
        diff = await page.inner_text("#diff-inventory")
        assert "INVENTORY_MANAGER: +inventory.reconcile" in diff and "INVENTORY_VIEWER: +inventory.view" in diff
        await _shot(page, "roles")

        await _submit(page, "#diff-inventory #role-INVENTORY_MANAGER button.apply")

        after = await console.host.admin("GET", f"/admin/tenants/{rec.code}/plugins/inventory/role-diff")
        by_key = {r["roleKey"]: r for r in after}
        assert by_key["INVENTORY_MANAGER"]["upToDate"] and by_key["INVENTORY_MANAGER"]["exists"]
        assert not by_key["INVENTORY_VIEWER"]["exists"]  # the other template was not applied
        assert await page.locator("#tenant-roles #tenant-role-INVENTORY_MANAGER").count() == 1
        assert await page.locator("#tenant-roles #tenant-role-INVENTORY_VIEWER").count() == 0
        assert await page.locator("#diff-inventory #role-INVENTORY_MANAGER button.apply").count() == 0
    finally:
        await ctx.close()


async def test_an_upgrade_started_in_the_console_reaches_100_percent_without_a_reload(console: Console) -> None:
    rt = runtime(console.host)
    tenants = [await _tenant(console, plugins=()) for _ in range(3)]
    await console.host.admin("POST", "/admin/plugins/inventory/enable")
    for rec in tenants:  # one version behind: the upgrade has 002_location.sql to apply to each
        await rt.registry.enable_for_tenant("inventory", rec, to=semver.Version(1, 0, 0))
    held = tenants[0]
    # the run can't finish while this holds the first tenant's migration lock (the
    # migrator skips it and comes back): the page must show it short of 100% first
    lock = await asyncpg.connect(console.fleet.shard_dsns[held.shard_id])
    ctx, page = await _signed_in(console)
    try:
        await lock.execute("SELECT pg_advisory_lock($1)", advisory_key("inventory", "tenant", held.tenant_id))
        await page.goto("/console/plugins")
        assert "1.0.0: 3" in await page.inner_text("#plugin-inventory")
        await _shot(page, "plugins")

        await _submit(page, "#plugin-inventory button.upgrade")

        assert "/console/runs/" in page.url
        run_id = int(page.url.rsplit("/", 1)[1])
        await page.evaluate("window.__sameDocument = true")
        await expect(page.locator("#run-percent")).not_to_have_text("0%")  # the other tenants' items
        assert await page.inner_text("#run-percent") != "100%"
        assert (await page.inner_text("#run-state")).startswith("running")
        await lock.execute("SELECT pg_advisory_unlock_all()")

        await expect(page.locator("#run-percent")).to_have_text("100%", timeout=30_000)
        await expect(page.locator("#run-state")).to_have_text("done")
        await expect(page.locator("#counts .run-running b")).to_have_text("0")  # the counts on top too
        assert await page.evaluate("window.__sameDocument === true")  # updated in place, never reloaded
        assert "tenant" in await page.inner_text("#run-shards")
        await _shot(page, "run")
        status = await console.host.admin("GET", f"/admin/runs/{run_id}")
        assert status["state"] == "done" and status["percent"] == 100 and status["failed"] == 0
        for rec in tenants:
            row = await console.fleet.control.fetchval(
                "SELECT version_installed FROM sys_tenant_plugins WHERE tenant_id = $1 AND plugin_id = 'inventory'",
                uuid.UUID(rec.tenant_id))
            assert row == "1.1.0"
        await page.goto("/console/runs")
        assert str(run_id) in await page.inner_text("#runs")
        await _shot(page, "runs")
    finally:
        await lock.close()
        await ctx.close()


async def test_a_missing_or_wrong_csrf_token_is_refused_and_nothing_changes(console: Console) -> None:
    rec = await _tenant(console)
    ctx, page = await _signed_in(console)
    try:
        await page.goto(f"/console/tenants/{rec.code}")
        url = f"/console/tenants/{rec.code}/suspend"
        missing = await page.request.post(url, form={"x": "1"}, max_redirects=0)
        wrong = await page.request.post(url, form={"csrf": "not-the-token"}, max_redirects=0)
        header = await page.request.post(url, headers={"X-CSRF-Token": "not-the-token"}, max_redirects=0)
        for resp in (missing, wrong, header):
            assert resp.status == 403
            assert "FORBIDDEN" in await resp.text() and "CSRF" in await resp.text()
        assert (await console.fleet.directory.get(id=rec.tenant_id)).state == "active"
        assert (await console.fleet.directory.get(id=rec.tenant_id)).epoch == rec.epoch

        await _submit(page, "form[action$='/suspend'] button")  # the page's own form carries the token

        assert (await console.fleet.directory.get(id=rec.tenant_id)).state == "suspended"
        assert await page.inner_text("#tenant-state") == "suspended"
        await _submit(page, "form[action$='/resume'] button")
        assert (await console.fleet.directory.get(id=rec.tenant_id)).state == "active"
    finally:
        await ctx.close()


async def test_an_expired_session_goes_back_to_sign_in_and_changes_nothing(console: Console) -> None:
    rec = await _tenant(console)
    ctx, page = await _signed_in(console)
    try:
        await page.goto(f"/console/tenants/{rec.code}")
        await console.fleet.control.execute("UPDATE console_sessions SET expires_at = now() - interval '1 second'")

        await _submit(page, "form[action$='/suspend'] button")  # the token is right, the session gone

        assert "/console/login" in page.url
        assert (await console.fleet.directory.get(id=rec.tenant_id)).state == "active"
        await page.goto("/console/tenants")
        assert page.url.endswith("/console/login?next=%2Fconsole%2Ftenants")
        await _shot(page, "sign-in")
    finally:
        await ctx.close()


async def test_sign_out_ends_the_session_and_a_wrong_key_is_refused(console: Console) -> None:
    ctx, page = await _signed_in(console)
    try:
        await _submit(page, "header .signout button")
        assert "/console/login" in page.url
        await page.goto("/console/fleet")
        assert "/console/login" in page.url
        await page.fill("input[name=key]", "not-the-admin-key")
        resp = await _submit(page, "button[type=submit]")
        assert resp.status == 401 and "not the admin key" in await page.inner_text(".error")
        cookies = {c["name"]: c for c in await ctx.cookies()}
        assert "tf_console" not in cookies
    finally:
        await ctx.close()


async def test_markup_in_config_values_and_names_is_shown_escaped(console: Console) -> None:
    rec = await _tenant(console)
    script = "<script>window.__pwned = 1</script>"
    image = "<img src=x onerror=\"window.__pwned = 2\">"
    await console.host.admin("PUT", f"/admin/tenants/{rec.code}/plugins/inventory/config", {"note": image})
    ctx, page = await _signed_in(console, operator=script)
    try:
        await page.goto(f"/console/tenants/{rec.code}")
        assert await page.input_value("#config-inventory textarea") == '{\n  "note": "<img src=x onerror=\\"window.__pwned = 2\\">"\n}'
        assert await page.inner_text("header .who") == script
        await page.goto("/console/audit")
        assert script in await page.inner_text("#audit")
        assert await page.evaluate("window.__pwned === undefined")
        assert await page.locator("main img").count() == 0 and await page.locator("main script").count() == 0
    finally:
        await ctx.close()


async def test_invalid_json_config_shows_the_error_in_the_form_and_saves_nothing(console: Console) -> None:
    rec = await _tenant(console)
    await console.host.admin("PUT", f"/admin/tenants/{rec.code}/plugins/inventory/config", {"threshold": 5})
    ctx, page = await _signed_in(console)
    try:
        await page.goto(f"/console/tenants/{rec.code}")
        for text, error in (('{"threshold": 6,', "config is not valid JSON"), ("[6]", "config must be a JSON object")):
            await page.fill("#config-inventory textarea", text)
            resp = await _submit(page, "#config-inventory button")
            assert resp.status == 400
            assert error in await page.inner_text("#config-inventory .error")
            assert await page.input_value("#config-inventory textarea") == text  # what was typed stays
            got = await console.host.admin("GET", f"/admin/tenants/{rec.code}/plugins/inventory/config")
            assert got == {"threshold": 5}
        await page.fill("#config-inventory textarea", '{"threshold": 7}')
        resp = await _submit(page, "#config-inventory button")
        assert resp.status == 200
        assert await console.host.admin("GET", f"/admin/tenants/{rec.code}/plugins/inventory/config") == {"threshold": 7}
    finally:
        await ctx.close()


async def test_keys_are_created_with_roles_shown_once_and_revoked(console: Console) -> None:
    rec = await _tenant(console)
    await console.host.admin("POST", f"/admin/tenants/{rec.code}/plugins/inventory/role-templates/INVENTORY_VIEWER/apply")
    ctx, page = await _signed_in(console)
    try:
        await page.goto(f"/console/keys?tenant={rec.code}")
        await page.fill("#create-key input[name=name]", "clerk")
        await page.fill("#create-key input[name=roles]", "INVENTORY_VIEWER")
        resp = await _submit(page, "#create-key button")
        assert resp.status == 201
        key = await page.inner_text("#new-key")
        async with console.host.http.get("/api/plugins/inventory/items",
                                         headers={"Authorization": f"Bearer {key}", "X-Tenant": rec.code}) as r:
            assert r.status == 200
        listed = await console.host.admin("GET", f"/admin/principals?tenant={rec.code}")
        assert [(p["name"], p["roles"]) for p in listed["principals"]] == [("clerk", ["INVENTORY_VIEWER"])]
        await page.goto(f"/console/keys?tenant={rec.code}")
        await _shot(page, "keys")

        await _submit(page, "#keys button.danger")

        assert (await console.host.admin("GET", f"/admin/principals?tenant={rec.code}"))["principals"] == []
        async with console.host.http.get("/api/plugins/inventory/items",
                                         headers={"Authorization": f"Bearer {key}", "X-Tenant": rec.code}) as r:
            assert r.status == 401
        await page.goto(f"/console/keys?tenant={rec.code}")
        await page.fill("#create-key input[name=name]", "nobody")
        await page.fill("#create-key input[name=roles]", "NO_SUCH_ROLE")
        resp = await _submit(page, "#create-key button")
        assert resp.status == 404 and "NO_SUCH_ROLE" in await page.inner_text(".error")
    finally:
        await ctx.close()


async def _one_behind(c: Console) -> TenantRecord:
    """A tenant with inventory one version behind (its upgrade has a file to apply)."""
    rec = await _tenant(c, plugins=())
    await c.host.admin("POST", "/admin/plugins/inventory/enable")
    await runtime(c.host).registry.enable_for_tenant("inventory", rec, to=semver.Version(1, 0, 0))
    return rec


async def test_a_failed_run_shows_its_errors_and_resume_finishes_it_from_any_host(console: Console) -> None:
    """A second host, whose runs give up on a busy tenant after a second: the run fails with
    the tenant's item and its error on the page; once the tenant is free, Resume finishes
    it. The session signed in on the first host is good on the second (sessions are in
    the control plane, shared by every host)."""
    rec = await _one_behind(console)
    lock = await asyncpg.connect(console.fleet.shard_dsns[rec.shard_id])
    try:
        async with running_host(host_settings(console.fleet, shard_give_up_s=1.0)) as other:
            await _fail_then_resume(console, rec, lock, other)
    finally:
        await lock.close()


async def _fail_then_resume(console: Console, rec: TenantRecord, lock: asyncpg.Connection, other: Host) -> None:
    ctx, page = await _signed_in(console)
    try:
        await lock.execute("SELECT pg_advisory_lock($1)", advisory_key("inventory", "tenant", rec.tenant_id))
        await page.goto(f"{other.url}/console/plugins")
        assert "/console/plugins" in page.url  # no second sign-in

        await _submit(page, "#plugin-inventory button.upgrade")

        run_id = int(page.url.rsplit("/", 1)[1])
        await expect(page.locator("#run-state")).to_have_text("failed", timeout=30_000)
        failures = await page.inner_text("#run-failures")
        assert f"tenant:{rec.tenant_id}" in failures and rec.shard_id in failures
        await lock.execute("SELECT pg_advisory_unlock_all()")

        await _submit(page, "#run-progress form[action$='/resume'] button")

        await expect(page.locator("#run-state")).to_have_text("done", timeout=30_000)
        await expect(page.locator("#run-percent")).to_have_text("100%")
        status = await console.host.admin("GET", f"/admin/runs/{run_id}")
        assert status["state"] == "done" and status["failed"] == 0
        await page.goto(f"{other.url}/console/audit")
        assert "run.resume" in await page.inner_text("#audit")
    finally:
        await ctx.close()


async def test_a_migration_run_stopped_from_the_console_is_cancelled_and_resumes(console: Console) -> None:
    rec = await _one_behind(console)
    lock = await asyncpg.connect(console.fleet.shard_dsns[rec.shard_id])
    ctx, page = await _signed_in(console)
    try:
        await lock.execute("SELECT pg_advisory_lock($1)", advisory_key("inventory", "tenant", rec.tenant_id))
        await page.goto("/console/plugins")
        await _submit(page, "#plugin-inventory button.upgrade")
        run_id = int(page.url.rsplit("/", 1)[1])
        await expect(page.locator("#run-progress form[action$='/abort'] button")).to_have_text("Stop")

        await _submit(page, "#run-progress form[action$='/abort'] button")

        await expect(page.locator("#run-state")).to_have_text("cancelled")
        assert (await console.host.admin("GET", f"/admin/runs/{run_id}"))["state"] == "cancelled"
        await lock.execute("SELECT pg_advisory_unlock_all()")
        await _submit(page, "#run-progress form[action$='/resume'] button")
        await expect(page.locator("#run-state")).to_have_text("done", timeout=30_000)
        version = await console.fleet.control.fetchval(
            "SELECT version_installed FROM sys_tenant_plugins WHERE tenant_id = $1 AND plugin_id = 'inventory'",
            uuid.UUID(rec.tenant_id))
        assert version == "1.1.0"
    finally:
        await lock.close()
        await ctx.close()


async def test_moves_show_on_the_runs_page_and_an_open_move_is_aborted_there(console: Console) -> None:
    from shard_migrations.moves.mover import Mover

    rec = await _tenant(console)
    target = next(s for s in console.fleet.shard_dsns if s != rec.shard_id)
    await _tenant(console, shard_id=target)  # the target has inventory's public files too (a move checks)
    moved = await Mover(console.fleet.directory, console.fleet.settings).start(rec, target, "offline")
    stuck = await _tenant(console)  # a move recorded and never driven (as a killed mover leaves one)
    run_id = await console.fleet.control.fetchval(
        "INSERT INTO fleet_runs (kind, params, state) VALUES ('move', '{}'::jsonb, 'failed') RETURNING run_id")
    await console.fleet.control.execute(
        "INSERT INTO tenant_moves (run_id, tenant_id, source_shard, target_shard, mode, phase, epoch_before) "
        "VALUES ($1, $2::uuid, $3, $4, 'offline', 'planned', $5)", run_id, stuck.tenant_id, stuck.shard_id,
        next(s for s in console.fleet.shard_dsns if s != stuck.shard_id), stuck.epoch)
    ctx, page = await _signed_in(console)
    try:
        await page.goto("/console/runs?kind=move")
        runs = await page.inner_text("#runs")
        assert f"{rec.code}: {rec.shard_id} → {target}" in runs and stuck.code in runs
        await page.goto(f"/console/runs/{moved.run_id}")
        assert await page.inner_text("#run-percent") == "100%" and await page.inner_text("#run-state") == "done"
        assert await page.locator("#run-progress form[action$='/abort']").count() == 0  # done: nothing to undo
        await page.goto(f"/console/runs/{run_id}")

        await _submit(page, "#run-progress form[action$='/abort'] button")

        assert await page.inner_text("#run-state") == "cancelled"
        assert await console.fleet.control.fetchval("SELECT phase FROM tenant_moves WHERE run_id = $1", run_id) \
            == "aborted"
        after = await console.fleet.directory.get(id=stuck.tenant_id)
        assert (after.shard_id, after.state) == (stuck.shard_id, "active")
    finally:
        await ctx.close()


PLAIN_PLUGIN = '''
from plugins.api import PluginContext


def setup(ctx: PluginContext) -> None:
    return None
'''


async def test_a_plugins_own_strings_are_shown_escaped(console: Console, tmp_path: Path) -> None:
    """A role template's display name is the plugin's text: shown as text, never as markup."""
    markup = '<img src=x onerror="window.__pwned = 3"><script>window.__pwned = 4</script>'
    roles = [{"role_key": "MARKUP_ROLE", "display_name": markup, "permissions": ["markup.view"]}]
    pid, pkg = plugin_package(tmp_path, PLAIN_PLUGIN, extra_files={"roles.json": json.dumps(roles)})
    rec = await _tenant(console)
    async with running_host(host_settings(console.fleet), discovery=discovery_with(pkg)) as other:
        ctx, page = await _signed_in(console)
        try:
            await page.goto(f"{other.url}/console/roles?tenant={rec.code}")
            assert markup in await page.inner_text(f"#diff-{pid}")
            assert await page.evaluate("window.__pwned === undefined")
            assert await page.locator("main img").count() == 0 and await page.locator("main script").count() == 0
        finally:
            await ctx.close()


async def test_the_admin_api_behind_the_runs_refuses_bad_input_clearly(console: Console) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    await _one_behind(console)
    async with console.host.http.post("/admin/plugins/inventory/upgrade", headers=admin) as r:
        assert r.status == 202
        done = (await r.json())["runId"]
    deadline = time.monotonic() + 30
    while (await console.host.admin("GET", f"/admin/runs/{done}"))["state"] != "done":
        assert time.monotonic() < deadline, "the upgrade started through the admin API did not finish"
        await asyncio.sleep(0.05)
    cases = [("GET", "/admin/runs/abc", None, 400, "VALIDATION_FAILED"),
             ("GET", "/admin/runs/0", None, 400, "VALIDATION_FAILED"),
             ("GET", "/admin/runs/99999999", None, 404, "RUN_NOT_FOUND"),
             ("GET", "/admin/runs?kind=sideways", None, 400, "VALIDATION_FAILED"),
             ("POST", "/admin/plugins/nosuch/upgrade", None, 404, "PLUGIN_NOT_FOUND"),
             ("POST", "/admin/plugins/inventory/upgrade", b"[1]", 400, "VALIDATION_FAILED"),
             ("POST", f"/admin/runs/{done}/resume", None, 409, "RUN_BUSY"),
             ("POST", f"/admin/runs/{done}/abort", None, 409, "RUN_BUSY"),
             ("POST", "/admin/runs/99999999/abort", None, 404, "RUN_NOT_FOUND")]
    before = await console.fleet.control.fetchval("SELECT count(*) FROM fleet_runs")
    for method, path, body, status, code in cases:
        headers = {**admin, "Content-Type": "application/json"} if body is not None else admin
        async with console.host.http.request(method, path, data=body, headers=headers) as r:
            got = await r.json()
            assert (r.status, got["error"]["code"]) == (status, code), (path, got)
    assert await console.fleet.control.fetchval("SELECT count(*) FROM fleet_runs") == before  # nothing started
    async with console.host.http.get("/admin/runs") as r:
        assert r.status == 401
    overview = await console.host.admin("GET", "/admin/overview")
    assert overview["counts"]["runs"]["done"] >= 1 and len(overview["shards"]) == 2
