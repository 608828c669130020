"""The one HTTP edge (router/http.py) on both services: keys and their statuses, 405 with
Allow, one request-id rule, inputs that used to answer 500, and request deadlines."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import AsyncIterator
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest
import pytest_asyncio

from host.fleet.embedded import free_port
from router.models import MAX_DOMAINS
from router.runtime import ADMIN_KEY_FILE, READ_KEY_FILE, effective_settings, fleet_key
from router.settings import Settings
from tests.conftest import FleetFactory
from tests.fleetkit import Fleet, serve_router
from tests.hostkit import (ADMIN_KEY, Host, auth, code, exchange, host_settings, raw_request, running_host,
                           tenant_with_key)

ROUTER_ADMIN = "edge-admin-key"
ROUTER_READ = "edge-read-key"
TIMEOUT_S = 1.0
RADMIN = {"Authorization": f"Bearer {ROUTER_ADMIN}"}
RREAD = {"Authorization": f"Bearer {ROUTER_READ}"}


@asynccontextmanager
async def router_service(settings: Settings) -> AsyncIterator[str]:
    async with AsyncExitStack() as stack:
        yield await serve_router(settings.model_copy(update={
            "admin_key": ROUTER_ADMIN, "read_key": ROUTER_READ, "http_timeout_s": TIMEOUT_S}), stack)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def router(fleet: Fleet) -> AsyncIterator[str]:
    async with router_service(fleet.settings) as url:
        yield url


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def host(fleet: Fleet) -> AsyncIterator[Host]:
    async with running_host(host_settings(fleet, http_timeout_s=TIMEOUT_S)) as h:
        yield h


@pytest_asyncio.fixture(loop_scope="session")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def raw(url: str, request: bytes) -> tuple[int, dict[str, str], dict[str, object]]:
    """Send ``request`` bytes as they are (no client library re-encoding); status, headers, JSON body."""
    status, headers, body = await exchange(url, request, timeout=10)
    return status, headers, orjson.loads(body)


def get(path: str, *headers: bytes) -> bytes:
    return raw_request("GET", path, *headers)


# --- keys ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("header", [None, b"Authorization: Basic abc", b"Authorization: Bearer",
                                    b"Authorization: Bearer wrong", "Authorization: Bearer ключ".encode(),
                                    b"Authorization: Bearer \xff\xfe"])
async def test_a_missing_malformed_wrong_or_non_ascii_key_is_401_with_www_authenticate_on_both_services(
        router: str, host: Host, fleet: Fleet, header: bytes | None) -> None:
    rec, key = await tenant_with_key(fleet, host)
    extra = () if header is None else (header,)
    for url, path in ((router, "/v1/tenants"), (router, "/v1/shards"), (router, "/v1/tenants/resolve?code=x"),
                      (router, f"/v1/tenants/{rec.tenant_id}"),
                      (host.url, "/admin/plugins"), (host.url, "/api/plugins/inventory/items")):
        status, headers, body = await raw(url, get(path, b"X-Tenant: " + rec.code.encode(), *extra))
        assert (status, body["error"]["code"]) == (401, "UNAUTHORIZED"), (path, body)  # type: ignore[index]
        assert headers["www-authenticate"].startswith("Bearer"), path


async def test_the_read_key_reads_but_may_not_write_and_the_admin_key_does_both(
        router: str, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{router}/v1/shards", headers=RREAD) as r:
        assert r.status == 200
    async with http.get(f"{router}/v1/tenants", headers=RADMIN) as r:
        assert r.status == 200
    async with http.post(f"{router}/v1/tenants", json={"code": code()}, headers=RREAD) as r:
        assert r.status == 403 and (await r.json())["error"]["code"] == "FORBIDDEN"
        assert "WWW-Authenticate" not in r.headers
    for path in ("/healthz", "/readyz", "/metrics", "/v1/openapi.json"):
        async with http.get(f"{router}{path}") as r:
            assert r.status == 200, path


async def test_a_tenant_key_on_admin_is_403_and_the_admin_key_passes(host: Host, fleet: Fleet) -> None:
    _, key = await tenant_with_key(fleet, host)
    async with host.http.get("/admin/plugins", headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 403 and (await r.json())["error"]["code"] == "FORBIDDEN"
    async with host.http.get("/admin/plugins", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as r:
        assert r.status == 200


# --- one envelope -------------------------------------------------------------------------------

async def test_405_names_the_allowed_methods_in_allow_on_both_services(router: str, host: Host,
                                                                       http: aiohttp.ClientSession) -> None:
    for url in (f"{router}/v1/shards", f"{host.url}/admin/plugins"):
        async with http.delete(url, headers=RADMIN) as r:
            assert r.status == 405
            assert (await r.json())["error"]["code"] == "METHOD_NOT_ALLOWED"
            assert "GET" in r.headers["Allow"]


async def test_one_request_id_rule(router: str, host: Host, http: aiohttp.ClientSession) -> None:
    for url in (f"{router}/healthz", f"{host.url}/healthz"):
        async with http.get(url, headers={"X-Request-Id": "abc-123"}) as r:
            assert r.headers["X-Request-Id"] == "abc-123"
        async with http.get(url, headers={"X-Request-Id": "has space"}) as r:
            assert r.headers["X-Request-Id"] not in ("has space", "")
        async with http.get(url) as r:
            assert r.headers["Content-Type"] == "application/json"


# --- inputs that answered 500 -------------------------------------------------------------------

@pytest.mark.parametrize("query", ["shard=shard1%00", "offset=1103142582953399675889682814599168",
                                   "limit=99999999999999999999", "offset=%D9%A1", "offset=1_0", "offset=%205",
                                   "offset=05", "offset=-1", "limit=0", "limit=1&limit=2", "nope=1"])
async def test_bad_list_parameters_are_400(router: str, http: aiohttp.ClientSession, query: str) -> None:
    async with http.get(f"{router}/v1/tenants?{query}", headers=RREAD) as r:
        assert r.status == 400, await r.text()
        assert (await r.json())["error"]["code"] == "VALIDATION_FAILED"


async def test_too_many_domains_are_refused_and_nothing_is_created(router: str, http: aiohttp.ClientSession,
                                                                   fleet: Fleet) -> None:
    c = code()
    domains = [f"d{i}.{c}.example.com" for i in range(MAX_DOMAINS + 1)]
    async with http.post(f"{router}/v1/tenants", json={"code": c, "domains": domains}, headers=RADMIN) as r:
        body = await r.json()
        assert r.status == 400 and body["error"]["field"] == "domains" and str(MAX_DOMAINS) in body["error"]["message"]
    assert await fleet.control.fetchval("SELECT count(*) FROM tenants WHERE code = $1", c) == 0


async def test_creating_a_tenant_on_a_shard_that_is_down_is_503_with_retry_after(
        fresh_fleet: FleetFactory, http: aiohttp.ClientSession) -> None:
    fleet = await fresh_fleet(shards=1)
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"  # nothing listens there
    await fleet.control.execute("INSERT INTO shards (shard_id, dsn, state) VALUES ('ghost', $1, 'active')", dead)
    async with router_service(fleet.settings) as url:
        c = code()
        async with http.post(f"{url}/v1/tenants", json={"code": c, "shardId": "ghost"}, headers=RADMIN) as r:
            body = await r.json()
            assert (r.status, body["error"]["code"]) == (503, "SHARD_UNREACHABLE")
            assert int(r.headers["Retry-After"]) > 0
    assert await fleet.control.fetchval("SELECT count(*) FROM tenants WHERE code = $1", c) == 0


async def test_nul_in_any_stored_string_is_400_and_changes_nothing(host: Host, fleet: Fleet) -> None:
    rec, key = await tenant_with_key(fleet, host)
    h = auth(key, rec.code)
    for body in ({"sku": "a\u0000b", "qty": 1}, {"sku": "ok", "name": "n\u0000", "qty": 1},
                 {"sku": "ok", "qty": 1, "location": "\u0000"}):
        async with host.http.post("/api/plugins/inventory/items", json=body, headers=h) as r:
            err = (await r.json())["error"]
            assert r.status == 400 and err["code"] == "VALIDATION_FAILED", err
            assert err["field"] == next(k for k, v in body.items() if isinstance(v, str) and "\x00" in v)
    async with host.http.get("/api/plugins/inventory/items", headers=h) as r:
        assert (await r.json())["items"] == []
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with host.http.put(f"/admin/tenants/{rec.code}/plugins/inventory/config", json={"k": {"x": ["\u0000"]}},
                             headers=admin) as r:
        assert r.status == 400 and (await r.json())["error"]["field"] == "k.x[0]"
    async with host.http.post("/admin/principals", json={"tenant": rec.code, "name": "x\u0000"}, headers=admin) as r:
        assert r.status == 400 and (await r.json())["error"]["field"] == "name"
    async with host.http.get(f"/admin/principals?tenant={rec.code}%00", headers=admin) as r:
        assert r.status == 400
    assert await host.admin("GET", f"/admin/tenants/{rec.code}/plugins/inventory/config") == {}
    names = [p["name"] for p in (await host.admin("GET", f"/admin/principals?tenant={rec.code}"))["principals"]]
    assert names == ["tester"]


@pytest.mark.parametrize("path", ["/api/plugins/inventory/items?limit=%D9%A1", "/api/plugins/inventory/items?limit=05",
                                  "/api/plugins/inventory/items?offset=1103142582953399675889682814599168",
                                  "/api/plugins/inventory/items?limit=1&limit=2", "/api/plugins/inventory/items/%D9%A1",
                                  "/api/plugins/inventory/items/1_0", "/api/plugins/inventory/items/%201"])
async def test_numbers_are_plain_digits_and_parameters_are_given_once_on_plugin_routes(
        host: Host, fleet: Fleet, path: str) -> None:
    rec, key = await tenant_with_key(fleet, host)
    async with host.http.get(path, headers=auth(key, rec.code)) as r:
        assert r.status == 400 and (await r.json())["error"]["code"] == "VALIDATION_FAILED"


async def test_an_unknown_role_and_a_permission_outside_every_plugin_are_refused(host: Host, fleet: Fleet) -> None:
    rec, _ = await tenant_with_key(fleet, host)
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with host.http.post("/admin/principals", json={"tenant": rec.code, "name": "x", "roles": ["NO_SUCH"]},
                              headers=admin) as r:
        err = (await r.json())["error"]
        assert r.status == 404 and err["role"] == "NO_SUCH" and "NO_SUCH" in err["message"]
    async with host.http.put(f"/admin/tenants/{rec.code}/roles/CLERK",
                             json={"permissions": ["inventory.view", "nosuchplugin.view"]}, headers=admin) as r:
        err = (await r.json())["error"]
        assert r.status == 400 and err["permission"] == "nosuchplugin.view"
    assert await fleet.control.fetchval("SELECT count(*) FROM roles WHERE tenant_id = $1::uuid AND role_key = 'CLERK'",
                                        rec.tenant_id) == 0


# --- deadlines ----------------------------------------------------------------------------------

async def _closed_within(url: str, data: bytes, deadline: float) -> bytes:
    """Send ``data`` and read until the server closes; what it sent. Fails past ``deadline``."""
    u = urlsplit(url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), deadline)  # b"" or a response, then EOF
    finally:
        writer.close()


@pytest.mark.parametrize("which", ["router", "host"])
async def test_idle_and_half_sent_requests_are_cut_after_the_deadline(router: str, host: Host, which: str) -> None:
    url = router if which == "router" else host.url
    started = time.monotonic()
    assert await _closed_within(url, b"", TIMEOUT_S + 5) == b""  # idle: never sends a thing
    assert await _closed_within(url, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Half: ", TIMEOUT_S + 5) == b""
    assert time.monotonic() - started < 2 * (TIMEOUT_S + 5)
    # half a body: the handler waits for it until the deadline, then answers 408 and closes
    path, auth_header = (("/v1/tenants", f"Bearer {ROUTER_ADMIN}") if which == "router"
                         else ("/admin/principals", f"Bearer {ADMIN_KEY}"))
    sent = await _closed_within(url, (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth_header}\r\n"
                                      "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"co").encode(),
                                TIMEOUT_S + 5)
    assert sent.startswith(b"HTTP/1.1 408") and b"REQUEST_TIMEOUT" in sent


async def test_a_request_finished_in_time_is_served(router: str) -> None:
    status, _, body = await raw(router, get("/v1/tenants/resolve?id=" + str(uuid.uuid4()),
                                            f"Authorization: Bearer {ROUTER_READ}".encode()))
    assert status == 404 and body["error"]["code"] == "TENANT_NOT_FOUND"  # type: ignore[index]


def test_the_embedded_fleets_keys_are_generated_once_0600_and_picked_up_by_every_command(tmp_path: Path) -> None:
    fleet_dir = tmp_path / "fleet"
    admin = fleet_key(fleet_dir, ADMIN_KEY_FILE, "", create=True)
    read = fleet_key(fleet_dir, READ_KEY_FILE, "", create=True)
    assert admin != read and len(read) >= 40
    assert fleet_key(fleet_dir, READ_KEY_FILE, "", create=True) == read  # kept, not replaced
    assert {(fleet_dir / n).stat().st_mode & 0o777 for n in (ADMIN_KEY_FILE, READ_KEY_FILE)} == {0o600}
    (fleet_dir / "fleet.json").write_text(json.dumps({"info": {"control_dsn": "postgresql://x@127.0.0.1:1/x",
                                                               "redis_url": "redis://127.0.0.1:1"}}))
    s = effective_settings(Settings.load(environ={}, fleet_dir=fleet_dir))
    assert (s.admin_key, s.read_key) == (admin, read)
    s = effective_settings(Settings.load(environ={}, fleet_dir=fleet_dir, read_key="configured"))
    assert s.read_key == "configured"  # a configured key wins


# --- bodies the edge reads (found in review: each answered 500 or waited for nothing) -----------

def post(path: str, auth_header: str, body: bytes, *headers: bytes, length: int | None = None) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: {auth_header}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body) if length is None else length}\r\n"
            ).encode() + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


@pytest.mark.parametrize("encoding", [b"gzip", b"deflate"])
async def test_a_body_that_is_not_what_its_content_encoding_says_is_400_on_both_services(
        router: str, host: Host, fleet: Fleet, encoding: bytes) -> None:
    c = code()
    for url, path, key in ((router, "/v1/tenants", f"Bearer {ROUTER_ADMIN}"),
                           (host.url, "/admin/principals", f"Bearer {ADMIN_KEY}")):
        status, _, body = await raw(url, post(path, key, b'{"code": "' + c.encode() + b'"}',
                                              b"Content-Encoding: " + encoding))
        assert (status, body["error"]["field"]) == (400, "body"), body  # type: ignore[index]
    assert await fleet.control.fetchval("SELECT count(*) FROM tenants WHERE code = $1", c) == 0


async def test_json_nested_deeper_than_the_limit_is_400_and_changes_nothing(host: Host, fleet: Fleet) -> None:
    rec, _ = await tenant_with_key(fleet, host)
    path = f"/admin/tenants/{rec.code}/plugins/inventory/config"
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    # 300 levels: orjson reads it, but can't write it back (its limit is 254)
    deep = b'{"x": ' + b"[" * 300 + b"]" * 300 + b"}"
    async with host.http.put(path, data=deep, headers={**admin, "Content-Type": "application/json"}) as r:
        body = await r.json()
        assert r.status == 400 and body["error"]["field"] == "body", body
    shallow = {"x": [[["ok"]]]}
    async with host.http.put(path, json=shallow, headers=admin) as r:
        assert r.status == 200
    assert await host.admin("GET", path) == shallow


async def test_a_content_length_over_the_limit_is_413_without_waiting_for_the_body(router: str, fleet: Fleet) -> None:
    # nothing of the body is sent: without the up-front check this would wait and answer 408
    status, _, body = await raw(router, post("/v1/tenants", f"Bearer {ROUTER_ADMIN}", b"",
                                             length=fleet.settings.max_body_bytes + 1))
    assert (status, body["error"]["code"]) == (413, "PAYLOAD_TOO_LARGE"), body  # type: ignore[index]


async def test_an_inventory_item_answers_in_camel_case(host: Host, fleet: Fleet) -> None:
    rec, key = await tenant_with_key(fleet, host)
    async with host.http.post("/api/plugins/inventory/items", json={"sku": "cc-1", "qty": 1},
                              headers=auth(key, rec.code)) as r:
        item = await r.json()
        assert r.status == 201
    async with host.http.get(f"/api/plugins/inventory/items/{item['id']}", headers=auth(key, rec.code)) as r:
        fetched = await r.json()
    for got in (item, fetched):
        assert {"createdAt", "updatedAt"} <= got.keys() and not any("_" in k for k in got), got


async def test_without_a_key_nothing_is_said_about_the_tenant_a_request_names(
        router: str, host: Host, fleet: Fleet, http: aiohttp.ClientSession) -> None:
    rec, _ = await tenant_with_key(fleet, host)
    suspended, _ = await tenant_with_key(fleet, host)
    async with http.post(f"{router}/v1/tenants/{suspended.tenant_id}/suspend", headers=RADMIN) as r:
        assert r.status == 200
    other, other_key = await tenant_with_key(fleet, host)
    for path in ("/api/plugins/inventory/items", "/api/manifest"):
        for name in (rec.code, "no-such-tenant", suspended.code, str(uuid.uuid4())):
            for key in (None, "Bearer not-a-key"):
                headers = {"X-Tenant": name} if key is None else {"X-Tenant": name, "Authorization": key}
                async with host.http.get(path, headers=headers) as r:
                    assert (r.status, (await r.json())["error"]["code"]) == (401, "UNAUTHORIZED"), (path, name, key)
        # another tenant's key learns no more than that it isn't its tenant (not that it is suspended)
        async with host.http.get(path, headers=auth(other_key, suspended.code)) as r:
            assert (r.status, (await r.json())["error"]["code"]) == (403, "FORBIDDEN"), path
        async with host.http.get(path, headers=auth(other_key, other.code)) as r:
            assert r.status == 200, path


@pytest.mark.parametrize("which", ["router", "host"])
async def test_a_long_header_or_path_gets_the_envelope_on_both_services(router: str, host: Host, which: str) -> None:
    url = router if which == "router" else host.url
    status, _, body = await raw(url, get("/healthz", b"X-Long: " + b"a" * 20_000))
    assert (status, body["error"]["code"]) == (400, "VALIDATION_FAILED"), body  # type: ignore[index]
    status, _, body = await raw(url, get("/healthz/" + "a" * 20_000))
    assert (status, body["error"]["code"]) == (404, "NOT_FOUND"), body  # type: ignore[index]
