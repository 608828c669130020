"""The tenant app shell (/app) in a real headless browser (Debian's Chromium through
Playwright, tests/browserkit.py) against a real host on a real fleet: sign-in with a
tenant's API key, the menu and widgets by permission and enablement, widgets sandboxed
behind the postMessage bridge (a probe widget of the test's own reports what it could and
couldn't reach), CSRF, escaping, expiry and revocation; and the console's Uninstall button.
The run writes docs/screenshots/app*.png and console-uninstall.png (the README shows them)."""
from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator
from urllib.parse import quote

import aiohttp
import pytest
import pytest_asyncio
from playwright.async_api import Browser, BrowserContext, Frame, Page, expect

from router.models import TenantRecord
from tests.browserkit import SCREENSHOTS, chromium
from tests.fleetkit import Fleet, Servers, open_fleet
from tests.hostkit import ADMIN_KEY, Host, auth, discovery_with, host_settings, plugin_package, running_host

PROBE_SOURCE = '''
from aiohttp import web

from plugins.api import PluginContext, json_body, json_response

REPORTS = []


def setup(ctx: PluginContext) -> None:
    @ctx.router.get("/echo")
    async def echo(request: web.Request) -> web.StreamResponse:
        caller = ctx.caller(request)
        return json_response({"tenant": caller.tenant.code, "principal": caller.principal_name})

    @ctx.router.post("/report")
    async def report(request: web.Request) -> web.StreamResponse:
        REPORTS.append({"tenant": ctx.caller(request).tenant.code, **(await json_body(request))})
        return json_response({"ok": True})
'''

PROBE_MANIFEST = {"widgets": [{"id": "probe", "title": "Probe", "component": "Probe"}]}

PROBE_HTML = '''<!doctype html>
<html><head><meta charset="utf-8"><title>probe</title></head>
<body><pre id="out">running</pre>
<script src="/app/static/bridge.js"></script><script src="Probe.js"></script></body></html>
'''

# What a hostile widget tries: the shell's DOM and cookies, the host without the bridge,
# another plugin's route through the bridge (by path, and by naming the plugin), other
# protocol versions and methods; then it reports what happened through the bridge.
PROBE_JS = '''"use strict";
(async function () {
  const out = {origin: String(window.origin)};
  const attempt = (name, fn) => { try { out[name] = "read: " + String(fn()); } catch (e) { out[name] = "blocked: " + e.name; } };
  attempt("parentDocument", () => window.parent.document.title);
  attempt("parentCookie", () => window.parent.document.cookie);
  attempt("cookie", () => document.cookie);
  const plugin = location.pathname.split("/")[3];
  out.directFetch = await fetch("/app/call/" + plugin + "/echo").then((r) => "status " + r.status, (e) => "blocked: " + e.name);
  const settle = (p) => p.then((result) => ({result: result}), (error) => ({error: error}));
  out.own = await settle(window.tenantfleet.call("/echo"));
  out.climb = await settle(window.tenantfleet.call("/../restock/requests"));
  out.named = await settle(window.tenantfleet.send({method: "call", path: "/requests", plugin: "restock"}));
  out.otherVersion = await settle(window.tenantfleet.send({v: 2, method: "call", path: "/echo"}));
  out.otherMethod = await settle(window.tenantfleet.send({method: "eval", path: "/echo"}));
  out.report = await settle(window.tenantfleet.call("/report", {method: "POST", body: JSON.parse(JSON.stringify(out))}));
  document.getElementById("out").textContent = JSON.stringify(out);
})();
'''


@dataclass
class Shell:
    fleet: Fleet
    host: Host
    browser: Browser
    probe: str          # the probe plugin's id
    probe_module: Any
    export_dir: Path


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def shell(servers: Servers, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Shell]:
    """One fleet of its own, one host with the probe plugin and an export dir, one browser."""
    root = tmp_path_factory.mktemp("appshell")
    pid, pkg = plugin_package(root, PROBE_SOURCE, extra_files={
        "manifest.json": json.dumps(PROBE_MANIFEST), "widgets/Probe.html": PROBE_HTML, "widgets/Probe.js": PROBE_JS})
    export_dir = root / "exports"
    export_dir.mkdir()
    async with AsyncExitStack() as stack:
        fleet = await open_fleet(servers, stack, shards=1)
        host = await stack.enter_async_context(
            running_host(host_settings(fleet, export_dir=export_dir), discovery=discovery_with(pkg)))
        browser = await stack.enter_async_context(chromium())
        for p in ("inventory", "restock", pid):
            await host.admin("POST", f"/admin/plugins/{p}/enable")
        yield Shell(fleet, host, browser, pid, pkg.module, export_dir)


async def _tenant(s: Shell, plugins: tuple[str, ...] = ("inventory", "restock")) -> TenantRecord:
    code = "a-" + uuid.uuid4().hex[:10]
    rec = await s.fleet.directory.create_tenant(code, [f"{code}.example.com"])
    for pid in plugins:
        await s.host.admin("POST", f"/admin/tenants/{rec.tenant_id}/plugins/{pid}/enable")
    for pid, role in (("inventory", "INVENTORY_MANAGER"), ("inventory", "INVENTORY_VIEWER"), ("restock", "RESTOCK_CLERK")):
        if pid in plugins:
            await s.host.admin("POST", f"/admin/tenants/{rec.tenant_id}/plugins/{pid}/role-templates/{role}/apply")
    return rec


async def _key(s: Shell, rec: TenantRecord, name: str, *roles: str) -> tuple[str, str]:
    """(principal id, API key) of a new key of the tenant holding ``roles``."""
    created = await s.host.admin("POST", "/admin/principals", {"tenant": rec.code, "name": name, "roles": list(roles)})
    return created["principalId"], created["apiKey"]


async def _signed_in(s: Shell, tenant: str, key: str) -> tuple[BrowserContext, Page]:
    ctx = await s.browser.new_context(base_url=s.host.url, viewport={"width": 1280, "height": 800})
    page = await ctx.new_page()
    await page.goto("/app/")
    assert page.url.endswith("/app/login"), page.url  # no session: sign in first
    await page.fill("input[name=tenant]", tenant)
    await page.fill("input[name=key]", key)
    async with page.expect_navigation():
        await page.click("#sign-in button[type=submit]")
    assert page.url.endswith("/app/"), page.url
    return ctx, page


async def _menu(page: Page) -> list[str]:
    return [t.strip() for t in await page.locator("#menu a[data-plugin]").all_inner_texts()]


async def _shot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def _frame(page: Page, src_part: str) -> Frame:
    found = [f for f in page.frames if src_part in f.url]
    assert len(found) == 1, [f.url for f in page.frames]
    return found[0]


async def _api(s: Shell, method: str, path: str, key: str, tenant: str, body: Any = None) -> tuple[int, Any]:
    async with s.host.http.request(method, path, json=body, headers=auth(key, tenant)) as r:
        return r.status, await r.json()


async def _csrf(page: Page) -> str:
    token = await page.evaluate("document.body.dataset.csrf")
    assert isinstance(token, str) and len(token) > 20
    return token


async def test_the_menu_shows_only_what_the_principal_may_see_and_no_disabled_plugin(shell: Shell) -> None:
    rec = await _tenant(shell)
    _, manager = await _key(shell, rec, "manager", "INVENTORY_MANAGER", "RESTOCK_CLERK")
    _, viewer = await _key(shell, rec, "viewer", "INVENTORY_VIEWER")
    ctx, page = await _signed_in(shell, rec.code, manager)
    try:
        assert await _menu(page) == ["Inventory", "Stock count", "Restock"]
        assert await page.locator("#widgets article").count() == 2
        assert await page.inner_text("header .who") == "manager"
        await page.click("#menu-inventory-reconcile")
        await page.wait_for_url("**/app/view/inventory/inventory-reconcile")
        assert "inventory ships no page for InventoryReconcile" in await page.inner_text("main")

        await shell.host.admin("POST", f"/admin/tenants/{rec.tenant_id}/plugins/restock/disable")
        await page.goto("/app/")

        assert await _menu(page) == ["Inventory", "Stock count"]
        assert await page.locator("#widget-restock-open").count() == 0
        assert await page.locator("#widget-inventory-low-stock").count() == 1
    finally:
        await ctx.close()
    ctx, page = await _signed_in(shell, f"{rec.code}.example.com", viewer)  # by domain this time
    try:
        assert await _menu(page) == ["Inventory"]  # no "Stock count" (inventory.reconcile), no Restock
        resp = await page.goto("/app/view/inventory/inventory-reconcile")
        assert resp is not None and resp.status == 404
    finally:
        await ctx.close()


async def test_widgets_render_their_plugins_data_through_the_bridge_with_markup_escaped(shell: Shell) -> None:
    rec = await _tenant(shell)
    _, key = await _key(shell, rec, "clerk", "INVENTORY_MANAGER", "RESTOCK_CLERK")
    image = '<img src=x onerror="parent.__pwned = 1; window.__pwned = 1">'
    script = "<script>window.__pwned = 2</script>"
    for sku, name, qty in (("bolt", image, 1), ("nut", script, 2), ("gear", "Gear", 50)):
        status, _ = await _api(shell, "POST", "/api/plugins/inventory/items", key, rec.code,
                               {"sku": sku, "name": name, "qty": qty})
        assert status == 201
    deadline = time.monotonic() + 30
    while True:  # restock raises its requests from inventory's events (delivered after commit)
        _, body = await _api(shell, "GET", "/api/plugins/restock/requests", key, rec.code)
        if len(body["requests"]) == 2:
            break
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.1)
    ctx, page = await _signed_in(shell, rec.code, key)
    try:
        low = page.frame_locator("#widget-inventory-low-stock iframe")
        await expect(low.locator("#status")).to_have_text("2 item(s) below 5")
        rows = await low.locator("#low tbody tr").all_inner_texts()
        assert [r.split("\t")[:2] for r in rows] == [["bolt", image], ["nut", script]]
        assert await low.locator("img").count() == 0 and await low.locator("tbody script").count() == 0
        restock = page.frame_locator("#widget-restock-open iframe")
        await expect(restock.locator("#status")).to_have_text("2 open request(s)")
        assert sorted(r.split("\t")[0] for r in await restock.locator("#open tbody tr").all_inner_texts()) == \
            ["bolt", "nut"]
        assert await page.evaluate("window.__pwned === undefined")
        assert await _frame(page, "LowStockWidget.html").evaluate("window.__pwned === undefined")
        for frame in await page.locator("iframe").all():
            assert await frame.get_attribute("sandbox") == "allow-scripts"
        await _shot(page, "app")
    finally:
        await ctx.close()


async def test_a_widget_can_reach_neither_the_shell_nor_another_plugin(shell: Shell) -> None:
    rec = await _tenant(shell, ("inventory", "restock", shell.probe))
    # restock.view held: a call that climbed out of the probe's path would be answered, so
    # only the shell's refusal can make it fail
    _, key = await _key(shell, rec, "probe user", "INVENTORY_VIEWER", "RESTOCK_CLERK")
    ctx, page = await _signed_in(shell, rec.code, key)
    try:
        probe = page.frame_locator("#widget-probe iframe")
        await expect(probe.locator("#out")).not_to_have_text("running", timeout=15_000)
        seen = json.loads(await probe.locator("#out").inner_text())
        assert seen["origin"] == "null"  # an opaque origin
        assert seen["parentDocument"].startswith("blocked: SecurityError"), seen
        assert seen["parentCookie"].startswith("blocked: SecurityError"), seen
        assert seen["cookie"].startswith("blocked: SecurityError"), seen
        assert seen["directFetch"].startswith("blocked:"), seen  # connect-src 'none'
        assert seen["own"] == {"result": {"tenant": rec.code, "principal": "probe user"}}
        assert seen["climb"]["error"] == {  # the shell refuses the path
            "code": "FORBIDDEN", "message": "a widget may call its own plugin's routes only (a path like /items)"}
        assert (seen["named"]["error"]["code"], seen["named"]["error"]["status"]) == ("NOT_FOUND", 404)  # its own plugin's
        assert seen["otherVersion"]["error"]["code"] == "UNSUPPORTED_VERSION"
        assert seen["otherMethod"]["error"]["code"] == "UNKNOWN_METHOD"
        assert seen["report"] == {"result": {"ok": True}}
        assert [r for r in shell.probe_module.REPORTS if r["tenant"] == rec.code][0]["cookie"] == seen["cookie"]
        # the same, asked from inside the frame by the test
        frame = _frame(page, "Probe.html")
        for expression in ("window.parent.document.body.innerHTML", "document.cookie", "window.parent.document.cookie"):
            with pytest.raises(Exception, match="SecurityError"):
                await frame.evaluate(expression)
        assert await page.locator("#widget-probe iframe").get_attribute("sandbox") == "allow-scripts"
        widget = await page.request.get(f"/app/widgets/{shell.probe}/Probe.html")
        csp = widget.headers["content-security-policy"]
        assert csp.startswith("sandbox allow-scripts;") and "default-src 'none'" in csp and "connect-src" not in csp
        # the server side: a plugin's path serves that plugin's routes only, as the principal
        token = await _csrf(page)
        for method, path, status, code in (("GET", f"/app/call/{shell.probe}/requests", 404, "NOT_FOUND"),
                                           ("GET", "/app/call/inventory/requests", 404, "NOT_FOUND"),
                                           ("GET", "/app/call/restock/items", 404, "NOT_FOUND"),
                                           ("PATCH", "/app/call/inventory/items/1", 404, "NOT_FOUND"),  # GET/POST only
                                           ("POST", "/app/call/inventory/reconcile", 403, "FORBIDDEN"),  # a viewer's
                                           ("GET", "/app/call/restock/requests", 200, None),
                                           ("GET", "/app/call/inventory/items", 200, None)):
            resp = await page.request.fetch(path, method=method, headers={"X-CSRF-Token": token},
                                            data={"counts": [{"sku": "x", "qty": 1}]} if method != "GET" else None)
            assert resp.status == status, (path, await resp.text())
            if code is not None:
                assert (await resp.json())["error"]["code"] == code
    finally:
        await ctx.close()


async def test_a_missing_or_wrong_csrf_token_is_refused_and_nothing_changes(shell: Shell) -> None:
    rec = await _tenant(shell, ("inventory",))
    _, key = await _key(shell, rec, "writer", "INVENTORY_MANAGER")
    ctx, page = await _signed_in(shell, rec.code, key)
    try:
        token = await _csrf(page)
        item = {"sku": "csrf", "qty": 3}
        for headers in ({}, {"X-CSRF-Token": "not-the-token"}):
            resp = await page.request.post("/app/call/inventory/items", data=item, headers=headers)
            assert resp.status == 403 and (await resp.json())["error"]["code"] == "FORBIDDEN"
            resp = await page.request.get("/app/call/inventory/items", headers=headers)
            assert resp.status == 403
        for form in ({}, {"csrf": "not-the-token"}):
            resp = await page.request.post("/app/logout", form=form, max_redirects=0)
            assert resp.status == 403
        _, listed = await _api(shell, "GET", "/api/plugins/inventory/items", key, rec.code)
        assert listed["items"] == []
        assert (await page.goto("/app/")) is not None and page.url.endswith("/app/")  # still signed in

        resp = await page.request.post("/app/call/inventory/items", data=item, headers={"X-CSRF-Token": token})

        assert resp.status == 201
        _, listed = await _api(shell, "GET", "/api/plugins/inventory/items", key, rec.code)
        assert [i["sku"] for i in listed["items"]] == ["csrf"]
        async with page.expect_navigation():
            await page.click("header .signout button")
        assert page.url.endswith("/app/login")
        resp = await page.request.get("/app/call/inventory/items", headers={"X-CSRF-Token": token})
        assert resp.status == 401
    finally:
        await ctx.close()


async def test_an_expired_session_or_a_revoked_key_goes_back_to_sign_in(shell: Shell) -> None:
    rec = await _tenant(shell, ("inventory",))
    _, key = await _key(shell, rec, "short", "INVENTORY_VIEWER")
    principal, other = await _key(shell, rec, "revoked", "INVENTORY_VIEWER")
    ctx, page = await _signed_in(shell, rec.code, key)
    try:
        await shell.fleet.control.execute("UPDATE app_sessions SET expires_at = now() - interval '1 second' "
                                          "WHERE tenant_id = $1", uuid.UUID(rec.tenant_id))
        await page.goto("/app/")
        assert page.url.endswith("/app/login")
        assert "tf_app" not in {c["name"] for c in await ctx.cookies()}
        await _shot(page, "app-sign-in")
    finally:
        await ctx.close()
    ctx, page = await _signed_in(shell, rec.code, other)
    try:
        cookie = next(c for c in await ctx.cookies() if c["name"] == "tf_app")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/app"
        assert other not in cookie["value"]  # the key never goes into a cookie
        await shell.host.admin("DELETE", f"/admin/principals/{principal}")
        await page.goto("/app/")
        assert page.url.endswith("/app/login")
    finally:
        await ctx.close()


async def test_a_wrong_key_another_tenants_key_or_an_unknown_tenant_are_refused_alike(shell: Shell) -> None:
    rec, other = await _tenant(shell, ("inventory",)), await _tenant(shell, ("inventory",))
    _, key = await _key(shell, rec, "mine", "INVENTORY_VIEWER")
    ctx = await shell.browser.new_context(base_url=shell.host.url)
    try:
        page = await ctx.new_page()
        for tenant, given in ((rec.code, "tfk_wrong"), (other.code, key), ("no-such-tenant", key), ("<b>x</b>", key)):
            await page.goto("/app/login")
            await page.fill("input[name=tenant]", tenant)
            await page.fill("input[name=key]", given)
            async with page.expect_navigation() as nav:
                await page.click("#sign-in button[type=submit]")
            resp = await nav.value
            assert resp is not None and resp.status == 401
            assert "unknown tenant or API key" in await page.inner_text(".error")
            assert await page.input_value("input[name=tenant]") == tenant  # shown back as text
        assert "tf_app" not in {c["name"] for c in await ctx.cookies()}
        assert await shell.fleet.control.fetchval("SELECT count(*) FROM app_sessions WHERE tenant_id = $1",
                                                  uuid.UUID(other.tenant_id)) == 0
    finally:
        await ctx.close()


async def test_odd_input_to_the_app_shell_and_the_uninstall_action_is_answered_and_changes_nothing(
        shell: Shell) -> None:
    """NUL, overlong text, unknown names and policies, paths posing as files: a 4xx (or the
    page), never a 500, for browsers and for scripts; no session stored, no run started."""
    rec = await _tenant(shell, ("inventory",))
    nul, long = "\x00", "x" * 5000
    runs = "SELECT count(*) FROM fleet_runs WHERE kind = 'uninstall'"
    before = await shell.fleet.control.fetchval(runs)
    for accept in ("text/html", "application/json"):
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(base_url=shell.host.url, cookie_jar=jar, headers={"Accept": accept}) as http:
            async with http.get("/app/login") as r:
                found = re.search(r'name="csrf" value="([^"]+)"', await r.text())
                assert found
            for tenant, key in ((nul, nul), (long, long), (rec.code, nul), (rec.code, long), (f"{nul}.example.com", "k")):
                async with http.post("/app/login", data={"csrf": found.group(1), "tenant": tenant, "key": key},
                                     allow_redirects=False) as r:
                    assert r.status in (400, 401), (accept, tenant[:20], r.status)
            for path, status in ((f"/app/widgets/{quote(nul)}/x.html", 400), ("/app/widgets/inventory/__init__.py", 404),
                                 ("/app/widgets/inventory/..%2F__init__.py", 404), ("/app/widgets/nosuch/x.html", 404),
                                 ("/app/widgets/inventory/LowStockWidget.html%00", 400),
                                 ("/app/widgets/inventory/LowStockWidget.html", 200),
                                 ("/app/call/inventory/items", 401), (f"/app/view/{quote(nul)}/x", 400), ("/app/view/a/b", 303),
                                 ("/app/", 303)):
                async with http.get(path, allow_redirects=False) as r:
                    assert r.status == status, (accept, path, r.status, (await r.text())[:200])
            async with http.post("/console/login", data={"csrf": "x", "key": ADMIN_KEY}, allow_redirects=False) as r:
                assert r.status == 403  # the console's own sign-in CSRF: refused without its cookie
        async with aiohttp.ClientSession(base_url=shell.host.url, cookie_jar=aiohttp.CookieJar(unsafe=True),
                                         headers={"Accept": accept}) as http:
            async with http.get("/console/login") as r:
                login = re.search(r'name="csrf" value="([^"]+)"', await r.text())
                assert login
            async with http.post("/console/login", data={"csrf": login.group(1), "key": ADMIN_KEY}) as r:
                assert r.status == 200
            async with http.get("/console/plugins", headers={"Accept": "text/html"}) as r:
                csrf = re.search(r'name="csrf" value="([^"]+)"', await r.text())
                assert csrf
            for query, status in (("?policy=sideways", 400), ("?policy=%00", 400), ("?tenant=%00", 400),
                                  ("?tenant=no-such-tenant", 404), ("?policy=export", 200)):
                async with http.get(f"/console/plugins/inventory/uninstall{query}") as r:
                    assert r.status == status, (accept, query, r.status)
            async with http.get("/console/plugins/nosuch/uninstall") as r:
                assert r.status == 404
            for form, status in (({"policy": "export", "tenant": rec.code}, 400),  # not confirmed
                                 ({"confirm": "yes", "policy": "sideways", "tenant": rec.code}, 400),
                                 ({"confirm": "yes", "policy": "purge", "grace": nul, "tenant": rec.code}, 400),
                                 ({"confirm": "yes", "policy": "purge", "grace": "1y", "tenant": rec.code}, 400),
                                 ({"confirm": "yes", "policy": "export", "tenant": nul}, 400),
                                 ({"confirm": "yes", "policy": "export", "tenant": "no-such-tenant"}, 404)):
                async with http.post("/console/plugins/inventory/uninstall", data={"csrf": csrf.group(1), **form},
                                     allow_redirects=False) as r:
                    assert r.status == status, (accept, form, r.status, (await r.text())[:200])
            async with http.post("/console/plugins/nosuch/uninstall",
                                 data={"csrf": csrf.group(1), "confirm": "yes"}, allow_redirects=False) as r:
                assert r.status == 404
    assert await shell.fleet.control.fetchval(runs) == before
    assert await shell.fleet.control.fetchval("SELECT count(*) FROM app_sessions WHERE tenant_id = $1",
                                              uuid.UUID(rec.tenant_id)) == 0
    _, key = await _key(shell, rec, "after", "INVENTORY_VIEWER")
    assert (await _api(shell, "GET", "/api/plugins/inventory/items", key, rec.code))[0] == 200  # still enabled


async def test_the_consoles_uninstall_button_exports_and_the_run_reaches_done(shell: Shell) -> None:
    rec = await _tenant(shell, ("inventory",))
    _, key = await _key(shell, rec, "stock", "INVENTORY_MANAGER")
    for sku in ("a", "b", "c"):
        assert (await _api(shell, "POST", "/api/plugins/inventory/items", key, rec.code, {"sku": sku, "qty": 9}))[0] == 201
    ctx = await shell.browser.new_context(base_url=shell.host.url, viewport={"width": 1280, "height": 800})
    try:
        page = await ctx.new_page()
        await page.goto("/console/login")
        await page.fill("input[name=key]", ADMIN_KEY)
        async with page.expect_navigation():
            await page.click("button[type=submit]")
        await page.goto("/console/plugins")
        await page.select_option("#plugin-inventory select[name=policy]", "export")
        async with page.expect_navigation():
            await page.click("#plugin-inventory button.uninstall")
        assert "/console/plugins/inventory/uninstall?policy=export" in page.url
        assert await page.inner_text("#uninstall-policy") == "export"
        await page.fill("#uninstall-confirm input[name=tenant]", rec.code)
        await _shot(page, "console-uninstall")
        forged = await page.request.post("/console/plugins/inventory/uninstall",
                                         form={"confirm": "yes", "policy": "export", "tenant": rec.code},
                                         max_redirects=0)
        assert forged.status == 403  # no CSRF token: nothing started
        runs = await shell.fleet.control.fetchval("SELECT count(*) FROM fleet_runs WHERE kind = 'uninstall'")
        assert runs == 0

        async with page.expect_navigation():
            await page.click("#uninstall-confirm button[type=submit]")

        assert re.search(r"/console/runs/\d+$", page.url), page.url
        run_id = int(page.url.rsplit("/", 1)[1])
        await expect(page.locator("#run-state")).to_have_text("done", timeout=30_000)
        await expect(page.locator("#run-percent")).to_have_text("100%")
        status = await shell.host.admin("GET", f"/admin/runs/{run_id}")
        assert status["state"] == "done" and status["kind"] == "uninstall"
        manifest = json.loads((shell.export_dir / "inventory" / rec.tenant_id / "manifest.json").read_text())
        assert [(t["name"], t["rows"]) for t in manifest["tables"]] == [("items", 3)]
        code, body = await _api(shell, "GET", "/api/plugins/inventory/items", key, rec.code)
        assert (code, body["error"]["code"]) == (403, "PLUGIN_DISABLED")
        await page.goto("/console/runs?kind=uninstall")
        assert str(run_id) in await page.inner_text("#runs")
        await page.goto("/console/audit")
        assert "plugin.uninstall" in await page.inner_text("#audit")
    finally:
        await ctx.close()
