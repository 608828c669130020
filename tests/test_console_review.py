"""The console's defences over plain HTTP against a real host on a real fleet (review of
issue 11): what a browser can't easily send (header-breaking ``next=``, encoded paths),
refusals written to the audit log, and runs started twice at once (a double click, two
hosts resuming the same run)."""
from __future__ import annotations

import asyncio
import re
import uuid
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import AsyncIterator

import aiohttp
import asyncpg
import pytest_asyncio
import semver
from yarl import URL

from router.models import TenantRecord
from shard_migrations.keys import advisory_key
from tests.fleetkit import Fleet, Servers, open_fleet
from tests.hostkit import (
    ADMIN_KEY, Host, exchange, host_settings, raw_request, running_host, runtime, tenant_with_key,
)

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@dataclass
class Console:
    fleet: Fleet
    host: Host


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def console(servers: Servers) -> AsyncIterator[Console]:
    async with AsyncExitStack() as stack:
        fleet = await open_fleet(servers, stack, shards=2)
        host = await stack.enter_async_context(running_host(host_settings(fleet)))
        yield Console(fleet, host)


async def _sign_in(c: Console, *, next_: str = "/console/fleet",
                   accept: str = "text/html") -> tuple[aiohttp.ClientSession, aiohttp.ClientResponse]:
    """A client of its own (its own cookie jar) that signs in as a browser does; the answer."""
    http = aiohttp.ClientSession(base_url=c.host.url, cookie_jar=aiohttp.CookieJar(unsafe=True),
                                 headers={"Accept": accept})
    async with http.get("/console/login") as r:
        csrf = re.search(r'name="csrf" value="([^"]+)"', await r.text())
        assert r.status == 200 and csrf
    async with http.post("/console/login", data={"csrf": csrf.group(1), "key": ADMIN_KEY, "operator": "ops",
                                                 "next": next_}, allow_redirects=False) as resp:
        await resp.read()
    return http, resp


async def _session_csrf(http: aiohttp.ClientSession) -> str:
    async with http.get("/console/fleet") as r:
        found = re.search(r'name="csrf" value="([^"]+)"', await r.text())
        assert r.status == 200 and found
        return found.group(1)


async def _one_behind(c: Console) -> TenantRecord:
    code = "r-" + uuid.uuid4().hex[:10]
    rec = await c.fleet.directory.create_tenant(code, [f"{code}.example.com"])
    await c.host.admin("POST", "/admin/plugins/inventory/enable")
    await runtime(c.host).registry.enable_for_tenant("inventory", rec, to=semver.Version(1, 0, 0))
    return rec


async def _wait_state(c: Console, run_id: int, states: tuple[str, ...]) -> str:
    for _ in range(600):
        state = (await c.host.admin("GET", f"/admin/runs/{run_id}"))["state"]
        if state in states:
            return str(state)
        await asyncio.sleep(0.05)
    raise AssertionError(f"run {run_id} never reached {states}")


async def test_a_next_that_would_break_the_redirect_header_is_not_a_500(console: Console) -> None:
    """``next`` with CR/LF (or other control characters) can't go into a Location header:
    the sign-in still succeeds and goes to the Fleet page, never a 500 or a split header."""
    for bad in ("/console/tenants\r\nSet-Cookie: tf_console=x", "/console/fleet\nX-Evil: 1", "/console/\x00"):
        http, resp = await _sign_in(console, next_=bad)
        try:
            assert resp.status == 303, (bad, resp.status)
            assert resp.headers["Location"] == "/console/fleet"
            assert "X-Evil" not in resp.headers
        finally:
            await http.close()


async def test_encoded_paths_do_not_pass_as_public_ones(console: Console) -> None:
    """A path that decodes to one under /console/static/ (or to /console/login) but routes
    elsewhere gets no page without a session."""
    for path in ("/console/static/..%2Ffleet", "/console/static%2F..%2Ffleet", "/console/static/%2E%2E/fleet",
                 "/console/static/../fleet", "/console/login/../fleet", "/console/static/..%2Faudit"):
        status, headers, body = await exchange(console.host.url, raw_request("GET", path, "Accept: text/html"))
        assert status in (303, 404, 400), (path, status)
        assert b"Audit log" not in body or status != 200, path
        assert b"tf_console=" not in body


async def test_a_refused_action_is_in_the_audit_log(console: Console) -> None:
    """A signed-in operator's action refused before it started (an unknown tenant, a bad run
    id) is written to the audit log with its error code, as a failed one is; so is a sign-in
    refused for its CSRF token."""
    http, _ = await _sign_in(console)
    try:
        csrf = await _session_csrf(http)
        nosuch = "nosuch-" + uuid.uuid4().hex[:8]
        async with http.post(f"/console/tenants/{nosuch}/suspend", data={"csrf": csrf},
                             allow_redirects=False) as r:
            assert r.status == 404
        async with http.post("/console/runs/0/resume", data={"csrf": csrf}, allow_redirects=False) as r:
            assert r.status == 400
        async with http.post("/console/login", data={"csrf": "forged", "key": ADMIN_KEY, "operator": "mallory"},
                             allow_redirects=False) as r:
            assert r.status == 403
        rows = await console.fleet.control.fetch(
            "SELECT actor, action, target, outcome, details FROM console_audit ORDER BY audit_id DESC LIMIT 3")
        got = [(r["action"], r["target"], r["outcome"]) for r in rows]
        assert got == [("console.sign-in", None, "FORBIDDEN"),
                       ("console.refused", "/console/runs/0/resume", "VALIDATION_FAILED"),
                       ("console.refused", f"/console/tenants/{nosuch}/suspend", "TENANT_NOT_FOUND")], got
        assert rows[0]["actor"] == "mallory" and rows[1]["actor"].startswith("ops (session ")
        assert rows[2]["details"]["route"] == "/console/tenants/{tenant}/{action}"
    finally:
        await http.close()


async def test_an_upgrade_double_clicked_starts_one_run(console: Console) -> None:
    """Two upgrade requests at once (a double click; or two operators): one run starts, the
    other is told RUN_BUSY with the run's id."""
    rec = await _one_behind(console)
    lock = await asyncpg.connect(console.fleet.shard_dsns[rec.shard_id])
    try:  # the tenant's unit stays busy, so the first run is still running when the second asks
        await lock.execute("SELECT pg_advisory_lock($1)", advisory_key("inventory", "tenant", rec.tenant_id))
        before = await console.fleet.control.fetchval("SELECT count(*) FROM fleet_runs WHERE kind = 'migrate'")

        async def upgrade() -> tuple[int, dict[str, object]]:
            async with console.host.http.post("/admin/plugins/inventory/upgrade", headers=ADMIN) as r:
                return r.status, await r.json()

        answers = sorted(await asyncio.gather(upgrade(), upgrade()), key=lambda a: a[0])
        assert [s for s, _ in answers] == [202, 409], answers
        assert answers[1][1]["error"]["code"] == "RUN_BUSY"  # type: ignore[index]
        after = await console.fleet.control.fetchval("SELECT count(*) FROM fleet_runs WHERE kind = 'migrate'")
        assert after == before + 1
        run_id = int(answers[0][1]["runId"])  # type: ignore[call-overload]
        await lock.execute("SELECT pg_advisory_unlock_all()")
        assert await _wait_state(console, run_id, ("done", "failed")) == "done"
    finally:
        await lock.close()


async def test_a_run_resumed_on_two_hosts_at_once_runs_once(console: Console) -> None:
    """A failed run resumed from two hosts at the same moment: one takes it (202), the other
    is told RUN_BUSY; the run ends done, owned by one process."""
    rec = await _one_behind(console)
    lock = await asyncpg.connect(console.fleet.shard_dsns[rec.shard_id])
    try:
        async with running_host(host_settings(console.fleet, shard_give_up_s=1.0)) as quick:
            await lock.execute("SELECT pg_advisory_lock($1)", advisory_key("inventory", "tenant", rec.tenant_id))
            run_id = (await quick.admin("POST", "/admin/plugins/inventory/upgrade"))["runId"]
            assert await _wait_state(console, run_id, ("done", "failed")) == "failed"
            await lock.execute("SELECT pg_advisory_unlock_all()")

            async def resume(h: Host) -> int:
                async with h.http.post(f"/admin/runs/{run_id}/resume", headers=ADMIN) as r:
                    await r.read()
                    return r.status

            statuses = sorted(await asyncio.gather(resume(console.host), resume(quick)))
            assert statuses == [202, 409], statuses
            assert await _wait_state(console, run_id, ("done", "failed")) == "done"
    finally:
        await lock.close()


async def test_odd_input_to_every_page_and_action_is_never_a_500(console: Console) -> None:
    """Control characters, NUL, overlong text and malformed ids in paths, queries and forms:
    each answered with a 4xx (or the page), never a 500, for browsers and for scripts."""
    rec = await _one_behind(console)
    nul, long = "\x00", "x" * 5000
    gets = [f"/console/tenants/{nul}", f"/console/tenants/{long}", "/console/tenants?q=%00", "/console/tenants?state=%00",
            "/console/keys?tenant=%00", f"/console/keys?tenant={long}", "/console/roles?tenant=%00",
            f"/console/roles?tenant={long}", "/console/runs/%00", "/console/runs/99999999999999999999",
            "/console/runs/1/progress?x=%00", "/console/runs?kind=%00", "/console/login?next=%00"]
    posts = [(f"/console/tenants/{rec.code}/plugins/inventory/config", {"config": '{"a": "\\u0000"}'}),
             (f"/console/tenants/{rec.code}/plugins/inventory/config", {"config": '{"a": "' + nul + '"}'}),
             (f"/console/tenants/{rec.code}/plugins/inventory/config", {"config": '{"\\u0000": 1}'}),
             (f"/console/tenants/{rec.code}/plugins/{nul}/enable", {}),
             (f"/console/tenants/{rec.code}/plugins/nosuch/disable", {}),
             ("/console/plugins/nosuch/upgrade", {}), ("/console/plugins/inventory/upgrade", {"to": "not-a-version"}),
             ("/console/plugins/inventory/upgrade", {"to": nul}),
             (f"/console/roles/{rec.code}/inventory/{nul}/apply", {}), (f"/console/roles/{rec.code}/nosuch/x/apply", {}),
             ("/console/keys", {"tenant": nul, "name": "a", "roles": ""}),
             ("/console/keys", {"tenant": "", "name": nul, "roles": ""}),
             ("/console/keys", {"tenant": rec.code, "name": "a", "roles": nul}),
             ("/console/keys", {"tenant": rec.code, "name": long, "roles": long}),
             (f"/console/keys/{nul}/revoke", {}), (f"/console/keys/{uuid.uuid4()}/revoke", {}),
             ("/console/runs/99999999/resume", {}), ("/console/runs/99999999/abort", {})]
    for accept in ("text/html", "application/json"):
        http, _ = await _sign_in(console, accept=accept)
        try:
            csrf = await _session_csrf(http)
            for path in gets:
                async with http.get(path, allow_redirects=False) as r:
                    assert r.status < 500, (accept, path, r.status, (await r.text())[:300])
            for path, data in posts:
                async with http.post(path, data={"csrf": csrf, **data}, allow_redirects=False) as r:
                    assert r.status < 500, (accept, path, data, r.status, (await r.text())[:300])
        finally:
            await http.close()


async def test_only_the_admin_key_gets_a_console_session(console: Console) -> None:
    """A tenant's key (even one with every role) or any other key is refused at sign-in
    (401, no session stored, the refusal audited); a key sent as a bearer token opens no page."""
    _, tenant_key = await tenant_with_key(console.fleet, console.host)
    before = await console.fleet.control.fetchval("SELECT count(*) FROM console_sessions")
    for key in (tenant_key, ADMIN_KEY[:-1], ADMIN_KEY.upper(), "x" + ADMIN_KEY, ""):
        http = aiohttp.ClientSession(base_url=console.host.url, cookie_jar=aiohttp.CookieJar(unsafe=True))
        try:
            async with http.get("/console/login") as r:
                found = re.search(r'name="csrf" value="([^"]+)"', await r.text())
                assert found
            async with http.post("/console/login", data={"csrf": found.group(1), "key": key, "operator": "t"},
                                 allow_redirects=False) as r:
                assert r.status == 401 and "tf_console" not in r.cookies, (key, r.status)
            for bearer in (tenant_key, ADMIN_KEY):
                async with http.get("/console/fleet", headers={"Authorization": f"Bearer {bearer}"},
                                    allow_redirects=False) as r:
                    assert r.status == 303 and r.headers["Location"].startswith("/console/login")
        finally:
            await http.close()
    assert await console.fleet.control.fetchval("SELECT count(*) FROM console_sessions") == before
    refused = await console.fleet.control.fetchval(
        "SELECT count(*) FROM console_audit WHERE action = 'console.sign-in' AND outcome = 'UNAUTHORIZED' AND actor = 't'")
    assert refused >= 5


async def test_a_session_ends_when_the_admin_key_is_changed(console: Console) -> None:
    """Sessions are bound to the admin key they were opened with: a host whose admin key has
    been rotated (after a leak, say) signs out every session opened with the old one, and a
    form sent with such a session and its CSRF token changes nothing."""
    rec = await _one_behind(console)
    http, _ = await _sign_in(console)
    try:
        csrf = await _session_csrf(http)
        jar = http.cookie_jar.filter_cookies(URL(console.host.url + "/console/fleet"))
        cookie = {"Cookie": f"tf_console={jar['tf_console'].value}"}
        async with running_host(host_settings(console.fleet, admin_key="rotated-admin-key-" + "y" * 16)) as rotated:
            async with rotated.http.get("/console/fleet", headers=cookie, allow_redirects=False) as r:
                assert r.status == 303 and r.headers["Location"].startswith("/console/login"), r.status
            async with rotated.http.post(f"/console/tenants/{rec.code}/suspend", data={"csrf": csrf}, headers=cookie,
                                         allow_redirects=False) as r:
                assert r.status == 303 and r.headers["Location"] == "/console/login"
        assert (await console.fleet.directory.get(id=rec.tenant_id)).state == "active"
        async with http.get("/console/fleet", allow_redirects=False) as r:
            assert r.status == 200  # still good where the key is the one it was opened with
    finally:
        await http.close()


async def test_a_flood_of_refused_sign_ins_cannot_hide_an_action_from_the_audit_page(console: Console) -> None:
    """Anyone who can reach the host can write refused sign-ins; past a page of them an
    operator's action fell off the Audit page for good. Now the page hides them when asked
    and pages back (``?before=``) to every entry."""
    rec = await _one_behind(console)
    http, _ = await _sign_in(console)
    try:
        csrf = await _session_csrf(http)
        async with http.post(f"/console/tenants/{rec.code}/suspend", data={"csrf": csrf}, allow_redirects=False) as r:
            assert r.status == 303
        async with aiohttp.ClientSession(base_url=console.host.url, cookie_jar=aiohttp.CookieJar(unsafe=True)) as anyone:
            for _ in range(3):  # the flood, as it comes over HTTP ...
                async with anyone.get("/console/login") as r:
                    found = re.search(r'name="csrf" value="([^"]+)"', await r.text())
                    assert found
                async with anyone.post("/console/login", data={"csrf": found.group(1), "key": "guess"}) as r:
                    assert r.status == 401
        await console.fleet.control.execute(  # ... and a page more of it, written as those were
            "INSERT INTO console_audit (actor, action, outcome, remote) "
            "SELECT '?', 'console.sign-in', 'UNAUTHORIZED', '203.0.113.9' FROM generate_series(1, 250)")
        target = f"{rec.code}</td>"
        async with http.get("/console/audit") as r:
            page = await r.text()
            assert target not in page  # a page of the flood only
        async with http.get("/console/audit?hide=refused-sign-ins") as r:
            assert target in await r.text()
        path, pages = "/console/audit", 0
        while target not in page:
            older = re.search(r'id="older" href="([^"]+)"', page)
            assert older and pages < 5, "the action is not reachable by paging back"
            async with http.get(older.group(1).replace("&amp;", "&")) as r:
                page = await r.text()
            pages += 1
        for bad in ("/console/audit?before=x", "/console/audit?before=0", "/console/audit?hide=all"):
            async with http.get(bad, allow_redirects=False) as r:
                assert r.status == 400
    finally:
        await http.close()


async def test_a_poll_that_finds_the_session_gone_returns_to_the_page_not_the_fragment(console: Console) -> None:
    """The run page's progress poll (htmx) with no session is sent to sign-in, and from there
    back to the run's page, not to the bare progress fragment it was polling."""
    headers = {"HX-Request": "true", "HX-Current-URL": f"{console.host.url}/console/runs/7"}
    async with console.host.http.get("/console/runs/7/progress", headers=headers, allow_redirects=False) as r:
        assert r.headers["HX-Redirect"] == "/console/login?next=%2Fconsole%2Fruns%2F7"
    for current, expected in (("https://evil.example//evil.example/x", "/console/login"),
                              ("https://evil.example/console/x y", "/console/login?next=%2Fconsole%2Fx%20y")):
        hx = {"HX-Request": "true", "HX-Current-URL": current}  # only a console path of this host is kept
        async with console.host.http.get("/console/runs/7/progress", headers=hx, allow_redirects=False) as r:
            assert r.headers["HX-Redirect"] == expected
