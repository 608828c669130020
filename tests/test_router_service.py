"""The router service over real HTTP: resolve, create, shards, health, metrics, bad input."""
from __future__ import annotations

import io
import uuid
from urllib.parse import urlsplit
from contextlib import AsyncExitStack
from typing import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from tests.fleetkit import Fleet, serve_router

ADMIN = {"Authorization": "Bearer test-admin-key"}
READ = {"Authorization": "Bearer test-read-key"}


@pytest_asyncio.fixture(loop_scope="session")
async def router_url(fleet: Fleet) -> AsyncIterator[str]:
    settings = fleet.settings.model_copy(update={"admin_key": "test-admin-key", "read_key": "test-read-key",
                                                  "http_timeout_s": 1.0})
    async with AsyncExitStack() as stack:
        yield await serve_router(settings, stack)


@pytest_asyncio.fixture(loop_scope="session")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def code() -> str:
    return "r-" + uuid.uuid4().hex[:10]


async def test_created_tenant_resolves_by_code_domain_and_id(router_url: str, http: aiohttp.ClientSession) -> None:
    c = code()
    async with http.post(f"{router_url}/v1/tenants", json={"code": c, "domains": [f"{c}.example.com"]},
                         headers=ADMIN) as r:
        assert r.status == 201
        created = await r.json()
    for q in (f"code={c}", f"domain={c}.example.com", f"id={created['tenantId']}"):
        async with http.get(f"{router_url}/v1/tenants/resolve?{q}", headers=READ) as r:
            assert r.status == 200
            assert await r.json() == created
    async with http.get(f"{router_url}/v1/tenants/{created['tenantId']}", headers=READ) as r:
        assert (await r.json())["schemaName"] == created["schemaName"]


async def test_unknown_tenant_is_404_in_the_envelope(router_url: str, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{router_url}/v1/tenants/resolve?code=nobody-here", headers=READ) as r:
        assert r.status == 404
        body = await r.json()
    assert body["error"]["code"] == "TENANT_NOT_FOUND"
    assert (body["error"]["lookup"], body["error"]["value"]) == ("code", "nobody-here")
    assert body["error"]["requestId"] == r.headers["X-Request-Id"]


@pytest.mark.parametrize("query", ["", "id=not-a-uuid", "code=a&domain=b.example.com", "code=A%20B",
                                   "code=x&code=y", "nope=1", "domain=" + "a" * 300])
async def test_malformed_resolve_queries_are_400_never_500(router_url: str, http: aiohttp.ClientSession,
                                                           query: str) -> None:
    async with http.get(f"{router_url}/v1/tenants/resolve?{query}", headers=READ) as r:
        assert r.status == 400
        assert (await r.json())["error"]["code"] == "VALIDATION_FAILED"


async def test_injection_code_is_refused_and_changes_nothing(router_url: str, http: aiohttp.ClientSession,
                                                             fleet: Fleet) -> None:
    before = await fleet.control.fetchval("SELECT count(*) FROM tenants")
    async with http.post(f"{router_url}/v1/tenants", json={"code": 'x"; DROP SCHEMA public; --'},
                         headers=ADMIN) as r:
        assert r.status == 400
        assert (await r.json())["error"]["code"] == "VALIDATION_FAILED"
    assert await fleet.control.fetchval("SELECT count(*) FROM tenants") == before
    assert await fleet.control.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = 'public'") == 1


@pytest.mark.parametrize("body,status,err", [
    (b"{not json", 400, "VALIDATION_FAILED"),
    (b"[1, 2]", 400, "VALIDATION_FAILED"),
    (b'{"code": 7}', 400, "VALIDATION_FAILED"),
    (b'{"code": "ok-code", "domains": "one.example.com"}', 400, "VALIDATION_FAILED"),
    (b'{"code": "ok-code", "shardId": 3}', 400, "VALIDATION_FAILED"),
    (b'{"code": "ok-code", "domains": ["a.example.com"], "extra": 1}', 400, "VALIDATION_FAILED"),
])
async def test_bad_create_bodies_are_400(router_url: str, http: aiohttp.ClientSession,
                                         body: bytes, status: int, err: str) -> None:
    async with http.post(f"{router_url}/v1/tenants", data=body, headers={**ADMIN, "Content-Type": "application/json"}) as r:
        assert r.status == status
        assert (await r.json())["error"]["code"] == err


async def test_oversized_body_is_413(router_url: str, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{router_url}/v1/tenants", data=io.BytesIO(b"x" * 2_000_000), headers=ADMIN) as r:
        assert r.status == 413
        assert (await r.json())["error"]["code"] == "PAYLOAD_TOO_LARGE"


async def test_writes_need_the_admin_key(router_url: str, http: aiohttp.ClientSession) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        async with http.post(f"{router_url}/v1/tenants", json={"code": code()}, headers=headers) as r:
            assert r.status == 401
            assert (await r.json())["error"]["code"] == "UNAUTHORIZED"


async def test_duplicate_code_is_409(router_url: str, http: aiohttp.ClientSession) -> None:
    c = code()
    async with http.post(f"{router_url}/v1/tenants", json={"code": c}, headers=ADMIN) as r:
        assert r.status == 201
    async with http.post(f"{router_url}/v1/tenants", json={"code": c}, headers=ADMIN) as r:
        assert r.status == 409
        assert (await r.json())["error"]["code"] == "TENANT_EXISTS"


async def test_shards_list_counts_tenants_and_hides_passwords(fleet: Fleet, router_url: str,
                                                              http: aiohttp.ClientSession) -> None:
    async with http.get(f"{router_url}/v1/shards", headers=READ) as r:
        shards = await r.json()
    assert [s["shardId"] for s in shards] == ["shard1", "shard2", "shard3"]
    assert all(s["state"] == "active" and isinstance(s["tenants"], int) for s in shards)
    passwords = {urlsplit(d).password for d in fleet.shard_dsns.values()} - {None}
    # the embedded servers want a password (so their DSNs carry one); an external server
    # may trust loopback, and then test_unreachable_shard_registration_... covers redaction
    assert passwords or fleet.servers.embedded is None, "the embedded servers' DSNs carry passwords"
    assert not [p for p in passwords if p in str(shards)]


async def test_unreachable_shard_registration_is_503_and_not_registered(router_url: str,
                                                                        http: aiohttp.ClientSession) -> None:
    from host.fleet.embedded import free_port
    port = free_port()
    # the password in the user info, and as a query parameter (asyncpg takes both)
    for dsn in (f"postgresql://postgres:secret@127.0.0.1:{port}/postgres",
                f"postgresql://postgres@127.0.0.1:{port}/postgres?sslmode=disable&password=secret"):
        async with http.post(f"{router_url}/v1/shards", json={"shardId": "ghost2", "dsn": dsn}, headers=ADMIN) as r:
            assert r.status == 503 and r.headers["Retry-After"] == "5"
            body = await r.json()
        assert body["error"]["code"] == "SHARD_UNREACHABLE"
        assert "secret" not in str(body) and "127.0.0.1" in body["error"]["message"]
    async with http.get(f"{router_url}/v1/shards", headers=READ) as r:
        assert "ghost2" not in {s["shardId"] for s in await r.json()}


async def test_health_ready_metrics_and_openapi(router_url: str, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{router_url}/healthz") as r:
        assert r.status == 200
    async with http.get(f"{router_url}/readyz") as r:
        assert r.status == 200 and (await r.json())["checks"]["control"] == "ok"
    async with http.get(f"{router_url}/v1/tenants/{uuid.uuid4()}", headers=READ) as r:
        assert r.status == 404
    async with http.get(f"{router_url}/metrics") as r:
        text = await r.text()
    assert 'route="/v1/tenants/{id}"' in text and 'status="4xx"' in text
    async with http.get(f"{router_url}/v1/openapi.json") as r:
        doc = await r.json()
    assert "/v1/tenants/resolve" in doc["paths"] and doc["openapi"].startswith("3.")


async def test_unknown_route_is_an_enveloped_404(router_url: str, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{router_url}/v2/whatever") as r:
        assert r.status == 404
        assert (await r.json())["error"]["code"] == "NOT_FOUND"


async def test_wrong_method_is_an_enveloped_405_naming_the_allowed_ones(router_url: str,
                                                                         http: aiohttp.ClientSession) -> None:
    async with http.delete(f"{router_url}/v1/shards") as r:
        assert r.status == 405
        body = await r.json()
    assert body["error"]["code"] == "METHOD_NOT_ALLOWED" and "GET" in body["error"]["message"]


@pytest.mark.parametrize("path,body,old,new", [
    ("/v1/tenants", {"code": "snake-case", "shard_id": "shard1"}, "shard_id", "shardId"),
    ("/v1/shards", {"shard_id": "s9", "dsn": "postgresql://x@127.0.0.1:1/x"}, "shard_id", "shardId"),
])
async def test_json_fields_are_camel_case_and_the_old_snake_case_name_is_refused_naming_the_new_one(
        router_url: str, http: aiohttp.ClientSession, path: str, body: dict[str, str], old: str, new: str) -> None:
    async with http.post(f"{router_url}{path}", json=body, headers=ADMIN) as r:
        err = (await r.json())["error"]
    assert r.status == 400 and err["code"] == "VALIDATION_FAILED" and err["field"] == old and new in err["message"]
    c = code()
    async with http.post(f"{router_url}/v1/tenants", json={"code": c, "shardId": "shard2"}, headers=ADMIN) as r:
        created = await r.json()
    assert r.status == 201 and set(created) == {"tenantId", "code", "schemaName", "shardId", "state", "epoch", "domains"}
    assert created["shardId"] == "shard2"
    async with http.get(f"{router_url}/v1/shards", headers=READ) as r:
        assert set((await r.json())[0]) == {"shardId", "dsn", "state", "capacity", "weight", "tenants"}
