"""The host over HTTP: serving inventory, the gate, RBAC, tenant isolation, manifest, metrics, bad input."""
from __future__ import annotations

import asyncio
import io
import logging
from typing import AsyncIterator

import jsonschema_rs  # schemathesis's validator (the contract tests' dependency)
import pytest
import pytest_asyncio

from host.fleet.embedded import free_port
from host.openapi import document
from host.rbac import Authenticator, RbacService
from host.registry import Registry
from host.runtime import RUNTIME
from shard_migrations.packages import discover
from tests.conftest import FleetFactory
from tests.fleetkit import Fleet
from tests.hostkit import ADMIN_KEY, Host, auth, code, host_settings, running_host, tenant_with_key


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def host(fleet: Fleet) -> AsyncIterator[Host]:
    async with running_host(host_settings(fleet)) as h:
        yield h


def _snake_keys(doc: object, path: str = "") -> list[str]:
    """Every JSON object key in ``doc`` (recursively) that is not camelCase."""
    found: list[str] = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            if "_" in key or key[:1].isupper():
                found.append(f"{path}.{key}")
            found += _snake_keys(value, f"{path}.{key}")
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            found += _snake_keys(value, f"{path}[{i}]")
    return found


async def test_every_json_field_the_host_answers_with_is_camel_case(fleet: Fleet, host: Host) -> None:
    rec, key = await tenant_with_key(fleet, host)
    h = auth(key, rec.code)
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with host.http.post("/api/plugins/inventory/items", json={"sku": "C-1", "qty": 1}, headers=h) as r:
        assert r.status == 201
        item = await r.json()
    calls = [("PATCH", f"/api/plugins/inventory/items/{item['id']}", h, {"qty": 2}),
             ("GET", f"/api/plugins/inventory/items/{item['id']}", h, None),
             ("GET", "/api/plugins/inventory/items", h, None),
             ("GET", "/api/manifest", h, None),
             ("GET", "/readyz", {}, None),
             ("GET", "/admin/plugins", admin, None),
             ("GET", f"/admin/principals?tenant={rec.tenant_id}", admin, None),
             ("GET", f"/admin/tenants/{rec.tenant_id}/plugins/inventory/role-diff", admin, None),
             ("GET", "/api/plugins/inventory/items?limit=ten", h, None)]  # an error envelope too
    wrong = _snake_keys(item, "POST items")
    for method, path, headers, body in calls:
        async with host.http.request(method, path, headers=headers, json=body) as r:
            wrong += _snake_keys(await r.json(), f"{method} {path}")
    assert wrong == []


async def test_inventory_items_can_be_created_listed_fetched_and_updated(fleet: Fleet, host: Host) -> None:
    rec, key = await tenant_with_key(fleet, host)
    h = auth(key, rec.code)
    async with host.http.post("/api/plugins/inventory/items", json={"sku": "A-1", "qty": 3, "location": "B2"},
                              headers=h) as r:
        assert r.status == 201, await r.text()
        item = await r.json()
    assert item["location"] == "B2" and item["qty"] == 3
    async with host.http.patch(f"/api/plugins/inventory/items/{item['id']}", json={"qty": 7}, headers=h) as r:
        assert (await r.json())["qty"] == 7
    async with host.http.get(f"/api/plugins/inventory/items/{item['id']}", headers=h) as r:
        assert (await r.json())["sku"] == "A-1"
    async with host.http.get("/api/plugins/inventory/items", headers={"Authorization": f"Bearer {key}",
                                                                      "Host": rec.domains[0]}) as r:
        body = await r.json()
        assert r.status == 200 and [i["sku"] for i in body["items"]] == ["A-1"]
        assert r.headers["X-Request-Id"]
    async with host.http.post("/api/plugins/inventory/reconcile", json={"counts": [{"sku": "A-1", "qty": 1}]},
                              headers=h) as r:
        assert (await r.json())["changed"] == [{"sku": "A-1", "was": 7, "now": 1}]


async def test_disabled_plugin_answers_403_plugin_disabled_naming_plugin_and_tenant(
        fleet: Fleet, host: Host, caplog: pytest.LogCaptureFixture) -> None:
    rec, key = await tenant_with_key(fleet, host)
    await host.admin("POST", f"/admin/tenants/{rec.code}/plugins/inventory/disable")
    with caplog.at_level(logging.INFO, logger="tenantfleet.access"):
        async with host.http.get("/api/plugins/inventory/items", headers=auth(key, rec.code)) as r:
            body = await r.json()
    assert r.status == 403
    assert body["error"]["code"] == "PLUGIN_DISABLED"
    assert body["error"]["pluginId"] == "inventory" and body["error"]["tenantId"] == rec.tenant_id
    lines = [getattr(r, "fields") for r in caplog.records if hasattr(r, "fields")]
    line = next(f for f in lines if f["requestId"] == body["error"]["requestId"])
    assert line["pluginId"] == "inventory" and line["tenantId"] == rec.tenant_id and line["status"] == 403
    assert line["route"] == "/api/plugins/inventory/items" and isinstance(line["ms"], float)
    await host.admin("POST", f"/admin/tenants/{rec.code}/plugins/inventory/enable")
    async with host.http.get("/api/plugins/inventory/items", headers=auth(key, rec.code)) as r:
        assert r.status == 200


async def test_missing_key_is_401_and_missing_permission_is_403_naming_it(fleet: Fleet, host: Host) -> None:
    rec, key = await tenant_with_key(fleet, host, roles=("INVENTORY_VIEWER",))
    async with host.http.get("/api/plugins/inventory/items", headers={"X-Tenant": rec.code}) as r:
        assert r.status == 401 and (await r.json())["error"]["code"] == "UNAUTHORIZED"
    async with host.http.get("/api/plugins/inventory/items", headers=auth("tfk_wrong", rec.code)) as r:
        assert r.status == 401
    async with host.http.get("/api/plugins/inventory/items", headers=auth(key, rec.code)) as r:
        assert r.status == 200
    async with host.http.post("/api/plugins/inventory/items", json={"sku": "x", "qty": 1},
                              headers=auth(key, rec.code)) as r:
        body = await r.json()
    assert r.status == 403 and body["error"]["code"] == "FORBIDDEN"
    assert body["error"]["permission"] == "inventory.manage" and "inventory.manage" in body["error"]["message"]


async def test_a_tenants_key_never_reads_another_tenants_rows_whatever_the_headers_say(
        fleet: Fleet, host: Host) -> None:
    a, key_a = await tenant_with_key(fleet, host)
    b, key_b = await tenant_with_key(fleet, host)
    async with host.http.post("/api/plugins/inventory/items", json={"sku": "B-SECRET", "qty": 1},
                              headers=auth(key_b, b.code)) as r:
        assert r.status == 201
    for headers in (auth(key_a, b.code), auth(key_a, b.tenant_id),
                    {"Authorization": f"Bearer {key_a}", "Host": b.domains[0]}):
        async with host.http.get("/api/plugins/inventory/items", headers=headers) as r:
            text = await r.text()
            assert r.status == 403 and "B-SECRET" not in text
    async with host.http.get("/api/plugins/inventory/items", headers=auth(key_a, a.code)) as r:
        assert "B-SECRET" not in await r.text()


async def test_manifest_lists_enabled_plugins_filtered_by_the_callers_permissions(fleet: Fleet, host: Host) -> None:
    rec, viewer = await tenant_with_key(fleet, host, roles=("INVENTORY_VIEWER",))
    async with host.http.get("/api/manifest", headers=auth(viewer, rec.code)) as r:
        body = await r.json()
    assert [p["pluginId"] for p in body["plugins"]] == ["inventory"]
    inv = body["plugins"][0]
    assert [m["id"] for m in inv["menu"]] == ["inventory"]
    assert [w["id"] for w in inv["widgets"]] == ["inventory-low-stock"]
    await host.admin("POST", f"/admin/tenants/{rec.code}/plugins/inventory/role-templates/INVENTORY_MANAGER/apply")
    created = await host.admin("POST", "/admin/principals",
                               {"tenant": rec.code, "name": "mgr", "roles": ["INVENTORY_MANAGER"]})
    async with host.http.get("/api/manifest", headers=auth(created["apiKey"], rec.code)) as r:
        inv = (await r.json())["plugins"][0]
    assert [m["id"] for m in inv["menu"]] == ["inventory", "inventory-reconcile"]


async def test_whoami_names_the_callers_principal_and_tenant_and_reads_no_registry(fleet: Fleet, host: Host) -> None:
    rec, viewer = await tenant_with_key(fleet, host, roles=("INVENTORY_VIEWER",))
    other, other_key = await tenant_with_key(fleet, host)
    registry = host.app[RUNTIME].registry
    registry._tenant.clear()
    async with host.http.get("/api/whoami", headers=auth(viewer, rec.code)) as r:
        assert r.status == 200
        body = await r.json()
    assert body["tenantId"] == rec.tenant_id and body["code"] == rec.code
    assert body["principal"]["name"] == "tester" and body["principal"]["roles"] == ["INVENTORY_VIEWER"]
    assert "inventory.view" in body["principal"]["permissions"]
    assert not any(t == rec.tenant_id for t, _ in registry._tenant)  # the plugin registry was not read
    async with host.http.get("/api/whoami", headers=auth(viewer, other.code)) as r:  # another tenant's name
        assert r.status == 403 and (await r.json())["error"]["code"] == "FORBIDDEN"
    async with host.http.get("/api/whoami", headers={"X-Tenant": rec.code}) as r:  # no key
        assert r.status == 401 and (await r.json())["error"]["code"] == "UNAUTHORIZED"
    async with host.http.get("/api/whoami", headers=auth("tfk_" + "x" * 43, rec.code)) as r:  # unknown key
        assert r.status == 401


async def test_metrics_label_requests_by_route_template_never_the_raw_path(fleet: Fleet, host: Host) -> None:
    rec, key = await tenant_with_key(fleet, host)
    async with host.http.post("/api/plugins/inventory/items", json={"sku": "M-1", "qty": 1},
                              headers=auth(key, rec.code)) as r:
        item = await r.json()
    async with host.http.get(f"/api/plugins/inventory/items/{item['id']}", headers=auth(key, rec.code)) as r:
        assert r.status == 200
    async with host.http.get("/metrics") as r:
        text = await r.text()
    assert 'route="/api/plugins/inventory/items/{id}"' in text
    assert f'/items/{item["id"]}"' not in text
    assert 'tenantfleet_plugin_requests_total{plugin="inventory",route="/api/plugins/inventory/items/{id}",' \
           'status_class="2xx"}' in text
    assert "tenantfleet_plugin_request_seconds_bucket" in text and "tenantfleet_fence_retries_total" in text
    assert "tenantfleet_host_pool_connections" in text


async def test_bad_input_gets_the_envelope_never_a_500(fleet: Fleet, host: Host) -> None:
    rec, key = await tenant_with_key(fleet, host)
    h = auth(key, rec.code)
    hj = {**h, "Content-Type": "application/json"}
    cases = [
        ("GET", "/api/plugins/nosuch/items", h, None, 404, "PLUGIN_NOT_FOUND"),
        # a tenant's key is not told which other tenants exist: 403, as for one that does
        ("GET", "/api/plugins/inventory/items", auth(key, "no-such-tenant"), None, 403, "FORBIDDEN"),
        ("GET", "/api/plugins/inventory/nosuch", h, None, 404, "NOT_FOUND"),
        ("GET", "/api/plugins/inventory/items?limit=abc", h, None, 400, "VALIDATION_FAILED"),
        ("GET", "/api/plugins/inventory/items/notanumber", h, None, 400, "VALIDATION_FAILED"),
        ("POST", "/api/plugins/inventory/items", hj, b"{not json", 400, "VALIDATION_FAILED"),
        ("POST", "/api/plugins/inventory/items", hj, b"[1, 2]", 400, "VALIDATION_FAILED"),
        ("POST", "/api/plugins/inventory/items", hj, b'{"sku": 5, "qty": "many"}', 400, "VALIDATION_FAILED"),
        ("POST", "/api/plugins/inventory/items", hj, b'{"sku": "x", "qty": true}', 400, "VALIDATION_FAILED"),
        ("POST", "/api/plugins/inventory/items", h, io.BytesIO(b'{"sku": "x", "qty": 1}' + b" " * 2_000_000), 413,
         "PAYLOAD_TOO_LARGE"),
        ("GET", "/api/plugins/inventory/items", {**h, "X-Big": "x" * 20000}, None, 400, "VALIDATION_FAILED"),
        ("GET", "/admin/plugins", {}, None, 401, "UNAUTHORIZED"),
        ("GET", "/admin/plugins", {"Authorization": "Bearer nope"}, None, 401, "UNAUTHORIZED"),
        ("GET", "/admin/plugins", {"Authorization": f"Bearer {key}"}, None, 403, "FORBIDDEN"),
    ]
    for method, path, headers, data, status, code in cases:
        async with host.http.request(method, path, headers=headers, data=data) as r:
            body = await r.json()
            assert (r.status, body["error"]["code"]) == (status, code), (method, path, body)
            assert body["error"]["requestId"]


async def test_readiness_names_the_shard_that_does_not_answer_and_checks_the_others(
        fresh_fleet: FleetFactory) -> None:
    fleet = await fresh_fleet()
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"  # nothing listens there
    await fleet.control.execute("INSERT INTO shards (shard_id, dsn, state) VALUES ('ghost', $1, 'draining')", dead)
    async with running_host(host_settings(fleet)) as h:
        async with h.http.get("/readyz") as r:
            body = await r.json()
        responses = document(h.app)["paths"]["/readyz"]["get"]["responses"]
    assert r.status == 503 and body["status"] == "unready"
    # the host's OpenAPI document describes this answer (not only the error envelope)
    readiness = responses["503"]["content"]["application/json"]["schema"]["anyOf"][0]
    assert jsonschema_rs.is_valid(readiness, body), body
    assert not jsonschema_rs.is_valid(responses["200"]["content"]["application/json"]["schema"], body)
    assert body["checks"].pop("shard:ghost") == "ShardUnreachable"
    assert body["checks"].pop("redis") == "ok"
    assert set(body["checks"].values()) == {"ok"} and len(body["checks"]) == 1 + len(fleet.shard_dsns)


async def test_health_readiness_and_plugin_health(host: Host) -> None:
    async with host.http.get("/healthz") as r:
        assert r.status == 200
    async with host.http.get("/readyz") as r:
        body = await r.json()
        assert r.status == 200, body
        assert body["checks"]["control"] == "ok" and sum(k.startswith("shard:") for k in body["checks"]) == 3
    async with host.http.get("/api/plugins/inventory/health") as r:
        body = await r.json()
        assert r.status == 200 and body["status"] == "ok" and body["checks"][0]["ok"]


async def test_one_route_serves_both_sides_of_a_rollout_through_one_pooled_connection(fleet: Fleet) -> None:
    import semver

    from shard_migrations.engine import apply_tenant
    from shard_migrations.packages import discover

    async with running_host(host_settings(fleet, shard_pool_min=1, shard_pool_max=1)) as one:
        new, key_new = await tenant_with_key(fleet, one, shard_id="shard2")
        old, key_old = await tenant_with_key(fleet, one, shard_id="shard2", plugins=())
        await apply_tenant(fleet.shard_pools, fleet.settings, discover().get("inventory"), old,
                           to=semver.Version.parse("1.0.0"))
        await fleet.control.execute(
            "INSERT INTO sys_tenant_plugins (tenant_id, plugin_id, enabled, version_installed) "
            "VALUES ($1::uuid, 'inventory', true, '1.0.0')", old.tenant_id)
        await one.admin("POST", f"/admin/tenants/{old.code}/plugins/inventory/role-templates/INVENTORY_MANAGER/apply")
        for tenant, key in ((new, key_new), (old, key_old)):
            async with one.http.post("/api/plugins/inventory/items", json={"sku": "R-1", "qty": 1},
                                     headers=auth(key, tenant.code)) as r:
                assert r.status == 201, await r.text()
        for _ in range(3):
            async with one.http.get("/api/plugins/inventory/items", headers=auth(key_new, new.code)) as r:
                assert r.status == 200 and "location" in (await r.json())["items"][0]
            async with one.http.get("/api/plugins/inventory/items", headers=auth(key_old, old.code)) as r:
                assert r.status == 200 and "location" not in (await r.json())["items"][0]
        async with one.http.post("/api/plugins/inventory/items", json={"sku": "R-2", "qty": 1, "location": "X"},
                                 headers=auth(key_old, old.code)) as r:
            assert r.status == 400 and (await r.json())["error"]["field"] == "location"
        pool = one.app[RUNTIME].shard_pools.opened()["shard2"]
        assert pool.get_size() == 1


async def test_openapi_document_lists_plugin_admin_and_host_routes(host: Host) -> None:
    async with host.http.get("/openapi.json") as r:
        doc = await r.json()
    assert doc["openapi"].startswith("3.")
    assert doc["paths"]["/api/plugins/inventory/items/{id}"]["get"]["tags"] == ["plugin:inventory"]
    assert "post" in doc["paths"]["/admin/principals"] and "/readyz" in doc["paths"]


def test_json_logging_writes_each_record_as_one_json_line_and_keeps_tracebacks_in_the_log() -> None:
    import orjson

    from host.logs import json_logging

    buf = io.StringIO()
    fields = {"pluginId": "inventory", "tenantId": "t", "route": "/r", "status": 200, "ms": 1.5, "requestId": "x"}
    with json_logging("INFO", buf):
        logging.getLogger("tenantfleet.access").info("req", extra={"fields": fields})
        try:
            raise RuntimeError("deep detail")
        except RuntimeError:
            logging.getLogger("tenantfleet.host").exception("unhandled", extra={"requestId": "x"})
    first, second = [orjson.loads(line) for line in buf.getvalue().splitlines()]
    assert {k: first[k] for k in fields} == fields
    assert second["msg"] == "unhandled" and second["requestId"] == "x" and "deep detail" in second["exc"]


async def test_a_cutover_outlasting_the_fence_wait_is_503_tenant_moving_with_retry_after(fleet: Fleet) -> None:
    import asyncpg

    async with running_host(host_settings(fleet, fence_wait_ms=200)) as h:
        rec, key = await tenant_with_key(fleet, h)
        mover = await asyncpg.connect(fleet.shard_dsns[rec.shard_id])
        try:
            async with mover.transaction():
                await mover.execute("SELECT pg_advisory_xact_lock(fleet.tenant_lock_key($1::uuid))", rec.tenant_id)
                async with h.http.get("/api/plugins/inventory/items", headers=auth(key, rec.code)) as r:
                    body = await r.json()
                    assert r.status == 503 and body["error"]["code"] == "TENANT_MOVING"
                    assert r.headers["Retry-After"] == "1"
        finally:
            await mover.close()
        async with h.http.get("/api/plugins/inventory/items", headers=auth(key, rec.code)) as r:
            assert r.status == 200


async def test_a_principal_read_in_flight_when_the_cache_is_cleared_is_not_cached(fleet: Fleet) -> None:
    c = code()
    rec = await fleet.directory.create_tenant(c, [f"{c}.example.com"])
    rbac = RbacService(fleet.control)
    await rbac.upsert_role(rec.tenant_id, "CLERK", "Clerk", ["inventory.view"], namespaces={"inventory"})
    key = (await rbac.create_principal(tenant_id=rec.tenant_id, name="clerk", roles=["CLERK"]))["apiKey"]
    authn = Authenticator(fleet.control)
    reading = asyncio.create_task(authn.principal(key))
    await asyncio.sleep(0)  # the read is now waiting on PostgreSQL
    authn.clear()  # a change was announced meanwhile: what the read saw may be stale
    assert (await reading).permissions == {"inventory.view"}
    await rbac.upsert_role(rec.tenant_id, "CLERK", "Clerk", ["inventory.manage"], namespaces={"inventory"})
    assert (await authn.principal(key)).permissions == {"inventory.manage"}


async def test_a_tenant_plugin_row_read_in_flight_during_an_invalidation_is_not_cached(
        fleet: Fleet, host: Host) -> None:
    rec, _ = await tenant_with_key(fleet, host)
    registry = Registry(fleet.control, fleet.settings, discover(), fleet.shard_pools)
    await registry.reload()
    reading = asyncio.create_task(registry.tenant_plugin(rec.tenant_id, "inventory"))
    await asyncio.sleep(0)  # the read is now waiting on PostgreSQL
    await registry.invalidate()  # a change was announced meanwhile: what the read saw may be stale
    tp = await reading
    assert tp is not None and tp.enabled
    await fleet.control.execute("UPDATE sys_tenant_plugins SET enabled = false "
                                "WHERE tenant_id = $1::uuid AND plugin_id = 'inventory'", rec.tenant_id)
    tp = await registry.tenant_plugin(rec.tenant_id, "inventory")
    assert tp is not None and not tp.enabled


class _CountingRegistry(Registry):
    reloads = 0

    async def reload(self) -> None:
        self.reloads += 1
        await super().reload()


async def test_requests_finding_the_registry_copy_expired_together_share_one_reload(
        fleet: Fleet, host: Host) -> None:
    rec, _ = await tenant_with_key(fleet, host)
    registry = _CountingRegistry(fleet.control, fleet.settings, discover(), fleet.shard_pools)  # never loaded yet
    found = await asyncio.gather(*(registry.tenant_plugin(rec.tenant_id, "inventory") for _ in range(20)))
    assert all(tp is not None and tp.enabled for tp in found)
    assert registry.reloads == 1


async def test_a_plugin_path_asked_with_another_method_is_405_with_allow(host: Host) -> None:
    async with host.http.delete("/api/plugins/inventory/items") as r:
        assert r.status == 405
        assert set(r.headers["Allow"].split(", ")) == {"GET", "HEAD", "POST"}  # HEAD wherever GET
        assert (await r.json())["error"]["code"] == "METHOD_NOT_ALLOWED"
    async with host.http.put("/api/plugins/inventory/items/7") as r:  # a path with a parameter
        assert r.status == 405 and "PATCH" in r.headers["Allow"].split(", ")
    async with host.http.get("/api/plugins/inventory/no-such-route") as r:  # not a method problem
        assert r.status == 404 and (await r.json())["error"]["code"] == "NOT_FOUND"
